"""End to end: real folders, a real watchdog observer, real SQLite, the classical mask engine."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from bgwatch.daemon import Daemon
from bgwatch.samples import write_samples
from bgwatch.single import retry_runs
from bgwatch.store import Store
from tests.helpers import DaemonThread, files_under, make_config, wait_for

ROOT = Path(__file__).resolve().parents[1]


def png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def statuses(config) -> dict[str, str]:
    store = Store(config.db_path)
    rows = {r["rel_path"]: r["status"] for r in store.history(limit=1000)[::-1]}
    store.close()
    return rows


def test_once_processes_good_files_and_fails_bad_ones_with_reasons(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    good = write_samples(inbox, 2, size=(320, 240), seed=3)
    jpeg = good[0].read_bytes()
    (inbox / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (inbox / "notes.png").write_text("this is not an image")
    (inbox / "empty.jpg").write_bytes(b"")
    (inbox / "bomb.png").write_bytes(png_header_claiming(30000, 30000))

    code = Daemon(config, once=True).run()

    assert code == 1, "--once exits 1 when any file failed"
    outbox = config.inboxes[0].outbox
    assert files_under(outbox) == sorted(p.with_suffix(".png").name for p in good)
    failed = files_under(inbox / "failed")
    for name in ("truncated.jpg", "notes.png", "empty.jpg", "bomb.png"):
        assert name in failed and f"{name}.error.txt" in failed
    reasons = {n: (inbox / "failed" / f"{n}.error.txt").read_text() for n in ("empty.jpg", "bomb.png")}
    assert "empty" in reasons["empty.jpg"].lower()
    assert "pixels" in reasons["bomb.png"].lower()
    assert files_under(inbox / "done") == sorted(p.name for p in good)
    rows = statuses(config)
    assert sorted(rows.values()) == ["done", "done", "failed", "failed", "failed", "failed"]
    for path in outbox.iterdir():
        with Image.open(path) as img:
            assert img.mode == "RGBA" and img.size == (320, 240)


def test_same_bytes_and_spec_are_skipped_and_a_changed_spec_reprocesses(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    [shot] = write_samples(inbox, 1, size=(256, 256), seed=5)
    assert Daemon(config, once=True).run() == 0
    output = next(config.inboxes[0].outbox.iterdir())
    first_mtime = output.stat().st_mtime_ns

    shutil.copy(inbox / "done" / shot.name, inbox / shot.name)
    assert Daemon(config, once=True).run() == 0
    store = Store(config.db_path)
    last = store.history(limit=1)[0]
    assert last["status"] == "skipped" and last["output_path"] == str(output)
    assert output.stat().st_mtime_ns == first_mtime, "a skipped run does not write again"

    (inbox / ".bgwatch.yaml").write_text("mode: color\nbackground_color: '#ff0000'\n")
    shutil.copy(inbox / "done" / shot.name, inbox / shot.name)
    assert Daemon(config, once=True).run() == 0
    last = store.history(limit=1)[0]
    assert last["status"] == "done" and '"mode": "color"' in last["spec_json"]
    with Image.open(output) as img:
        assert img.mode == "RGB" and img.getpixel((2, 2)) == (255, 0, 0)
    store.close()


def test_live_daemon_takes_new_files_mirrors_subfolders_and_never_clashes(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    with DaemonThread(config):
        [shot] = write_samples(inbox / "spring" / "shoes", 1, size=(256, 192), seed=1)
        wait_for(lambda: (outbox / "spring" / "shoes" / (shot.stem + ".png")).exists())
        # photo.jpg and photo.png both become photo.png: neither may overwrite the other
        moved = inbox / "done" / "spring" / "shoes" / shot.name
        wait_for(moved.exists)  # the output is written first, then the original is filed
        with Image.open(moved) as img:
            img.save(inbox / "photo.png")
        shutil.copy(moved, inbox / "photo.jpg")
        wait_for(lambda: len(files_under(outbox)) == 3)
    assert files_under(outbox) == ["photo-2.png", "photo.png", f"spring/shoes/{shot.stem}.png"]
    assert f"spring/shoes/{shot.name}" in files_under(inbox / "done")
    assert not files_under(inbox / ".bgwatch" / "claimed")


@pytest.mark.parametrize("policy", ["delete", "keep"])
def test_on_success_delete_and_keep(tmp_path: Path, policy: str) -> None:
    config = make_config(tmp_path, {"cleanup": {"on_success": policy}})
    inbox = config.inboxes[0].path
    [shot] = write_samples(inbox, 1, size=(200, 200), seed=2)
    with DaemonThread(config) as daemon:
        wait_for(lambda: len(files_under(config.inboxes[0].outbox)) == 1)
        time.sleep(2.5)  # two rescans: a kept file must not be taken again
        assert len(daemon.results) == 1
    assert shot.exists() == (policy == "keep")
    assert not (inbox / "done").exists()


def test_jobs_per_minute_delays_but_never_drops(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"jobs_per_minute": 120})  # one job every 0.5 s
    write_samples(config.inboxes[0].path, 4, size=(160, 120), seed=7)
    start = time.monotonic()
    assert Daemon(config, once=True).run() == 0
    assert len(files_under(config.inboxes[0].outbox)) == 4
    assert time.monotonic() - start >= 1.4, "4 jobs at 120/min take at least 1.5 s"


def test_retry_puts_a_failed_original_back(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    (inbox / "late.jpg").write_bytes(b"")
    assert Daemon(config, once=True).run() == 1
    run_id = Store(config.db_path).history(status="failed")[0]["id"]
    moved, problems = retry_runs(config, [run_id], all_failed=False)
    assert problems == [] and len(moved) == 1
    assert (inbox / "late.jpg").exists()
    assert not (inbox / "failed" / "late.jpg.error.txt").exists()
    _, problems = retry_runs(config, [run_id, 999], all_failed=False)
    assert any("999" in p for p in problems)


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_leaves_one_output_per_input(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"jobs_per_minute": 60})  # slow enough to be killed mid-way
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    shots = write_samples(inbox, 5, size=(320, 240), seed=11)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bgwatch", "run", "-c", str(config.source)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(files_under(outbox)) >= 1, timeout=60)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = sqlite3.connect(config.db_path).execute("SELECT COUNT(*) FROM runs WHERE status != 'done'").fetchone()
    assert before[0] >= 1, "the kill landed after the work was done; the test proves nothing"

    restarted = subprocess.run([sys.executable, "-m", "bgwatch", "run", "--once", "--no-progress", "-c",
                                str(config.source)], env=env, capture_output=True, text=True, timeout=120)
    assert restarted.returncode == 0, restarted.stderr
    assert files_under(outbox) == sorted(s.with_suffix(".png").name for s in shots), "no half-written leftovers"
    assert files_under(inbox / "done") == sorted(s.name for s in shots)
    db = sqlite3.connect(config.db_path)
    assert db.execute("SELECT COUNT(*) FROM runs WHERE status IN ('running', 'queued')").fetchone()[0] == 0
    assert not files_under(inbox / ".bgwatch" / "claimed")


def test_unwritable_outbox_fails_the_file_and_the_daemon_goes_on(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"blocked": {}, "fine": {}})
    blocked, fine = config.inboxes
    blocked.outbox.parent.mkdir(parents=True, exist_ok=True)
    blocked.outbox.write_text("a file where the outbox folder should be (as a full or read-only disk would)")
    write_samples(blocked.path, 1, size=(128, 128), seed=4)
    write_samples(fine.path, 1, size=(128, 128), seed=5)
    assert Daemon(config, once=True).run() == 1
    [note] = (blocked.path / "failed").glob("*.error.txt")
    assert "the output could not be written" in note.read_text() and "not a folder" in note.read_text()
    assert len(files_under(fine.outbox)) == 1


def test_a_vanished_inbox_folder_is_watched_again_when_it_returns(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    with DaemonThread(config) as daemon:
        write_samples(inbox, 1, size=(128, 128), seed=4)
        wait_for(lambda: len(daemon.results) == 1)
        shutil.rmtree(inbox)  # the share went away
        time.sleep(1.5)
        inbox.mkdir()  # and came back
        write_samples(inbox, 1, size=(128, 128), seed=5)
        wait_for(lambda: len(daemon.results) == 2, timeout=30)
    assert [r.state.value for r in daemon.results] == ["done", "done"]
    assert len(files_under(outbox)) == 2


def test_kill_between_output_and_done_reuses_its_own_output_name(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    [shot] = write_samples(inbox, 1, size=(160, 120), seed=60)
    assert Daemon(config, once=True).run() == 0
    # rewind to "output written, row still running, original still claimed" (a kill -9 at that moment)
    claimed = inbox / ".bgwatch" / "claimed" / "testhost" / shot.name
    claimed.parent.mkdir(parents=True, exist_ok=True)
    (inbox / "done" / shot.name).rename(claimed)
    db = sqlite3.connect(config.db_path)
    db.execute("UPDATE runs SET status = 'running', source_path = ?", [str(claimed)])
    db.commit()
    db.close()
    assert Daemon(config, once=True).run() == 0
    assert files_under(outbox) == [shot.with_suffix(".png").name], "no second output beside the first"
    assert statuses(config) == {shot.name: "done"}


def test_a_new_file_claimed_under_an_old_name_is_processed_not_filed(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    [shot] = write_samples(inbox, 1, size=(160, 120), seed=61)
    assert Daemon(config, once=True).run() == 0
    # a different image claimed to the same path, then a kill before its run was recorded
    claimed = inbox / ".bgwatch" / "claimed" / "testhost" / shot.name
    claimed.parent.mkdir(parents=True, exist_ok=True)
    write_samples(tmp_path / "other", 1, size=(160, 120), seed=62)[0].rename(claimed)
    assert Daemon(config, once=True).run() == 0
    store = Store(config.db_path)
    assert [r["status"] for r in store.history()] == ["done", "done"]
    assert len(files_under(inbox / "done")) == 2


@pytest.mark.slow
def test_a_full_outbox_is_named_retried_with_back_off_and_delivered_when_there_is_room(tmp_path: Path) -> None:
    """ENOSPC on the outbox: not a takeover, not a hot loop. The log says "No space left", `status` lists
    the waiting run, the claim holds; once there is room, the same run delivers (one output, 'done')."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the outbox needs root")
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    outbox.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(outbox)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{level} {message}")
    try:
        filler = outbox / "filler.bin"
        with open(filler, "wb") as handle, contextlib.suppress(OSError):  # the outbox full to the last block
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        [shot] = write_samples(inbox, 1, size=(256, 192), seed=70)
        with DaemonThread(config) as daemon:
            wait_for(lambda: daemon.intake.retries.problems(), timeout=30)
            assert any("No space left on device" in p and str(outbox) in p for p in daemon._problems())
            row = daemon.store.history(limit=1)[0]
            assert "No space left on device" in row["error"] and row["status"] == "running"
            assert files_under(inbox / ".bgwatch" / "claimed") == [f"testhost/{shot.name}"]
            time.sleep(3)
            tries = sum("waiting to be delivered" in line for line in lines)
            assert 1 <= tries <= 3, f"{tries} delivery attempts in ~3 s: a hot loop"
            filler.unlink()
            wait_for(lambda: (inbox / "done" / shot.name).exists(), timeout=90)
            wait_for(lambda: not daemon.intake.inflight, timeout=10)
        assert statuses(config) == {shot.name: "done"}
        assert files_under(outbox) == [shot.with_suffix(".png").name]
        assert not any("taken back by another host" in line for line in lines)
        assert any("WARNING" in line and "No space left on device" in line for line in lines)
    finally:
        logger.remove(sink)
        subprocess.run(["umount", "-l", str(outbox)], check=False)


def test_an_original_that_cannot_be_filed_is_a_warning_and_a_status_line(tmp_path: Path) -> None:
    """done/ made a plain file: the output is delivered, the original waits in delivering/; the run says so,
    the log warns, and `status` names the waiting original (not a silent "ok")."""
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    (inbox / "done").write_text("a file where done/ should be")
    [shot] = write_samples(inbox, 1, size=(96, 96), seed=71)
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{level} {message}")
    try:
        daemon = Daemon(config, once=True)
        daemon.run()
    finally:
        logger.remove(sink)
    [result] = list(daemon.results)
    assert result.state.value == "done" and "could not be filed" in result.error
    assert any(line.startswith("WARNING") and "could not be filed" in line for line in lines)
    [problem] = [p for p in daemon._problems() if "original waiting" in p]
    assert "delivering/" in problem and "not a folder" in problem
    box = f"testhost/{daemon.epoch}-{result.run_id}"
    assert files_under(inbox / ".bgwatch" / "delivering") == sorted([f"{box}/{shot.name}", f"{box}/marker.json"])


def test_storage_errors_reach_metrics_through_the_published_status() -> None:
    from bgwatch.metrics import Metrics

    status = {"in_flight": 1, "waiting": 0, "stages": {}, "inboxes": [], "storage_errors": {"ENOSPC": 3}}
    text = Metrics(status=lambda: status).render().decode()
    assert 'bgwatch_storage_errors_total{error="ENOSPC"} 3.0' in text


def test_the_status_file_is_replaced_whole_and_never_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """status.json is rewritten every 2 s and says nothing true once the daemon is gone: a reader sees a whole
    file (temp and rename), but the main loop does not wait for the disk; a damaged one reads as no status."""
    from bgwatch import report
    from bgwatch.service import STATUS_FILE

    config = make_config(tmp_path)
    daemon = Daemon(config)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    daemon._publish_status()
    assert synced == []
    status = report.live_status(config)
    assert status is not None and status["pid"] == os.getpid()
    assert [p.name for p in config.state_dir.iterdir() if p.name.startswith(".")] == []  # no temp left
    (config.state_dir / STATUS_FILE).write_bytes(b"\0" * 16)  # what a power cut may leave
    assert report.live_status(config) is None
    daemon.store.close()


def test_a_run_once_over_inboxes_with_nothing_waiting_loads_no_mask_net(tmp_path: Path) -> None:
    """The mask nets are loaded at start only where there is work: originals in done/ or claims in
    .bgwatch/ are none, an image in a subfolder is."""
    from bgwatch.daemon import _has_image

    inbox = tmp_path / "inbox"
    for rel in ("done/a.jpg", "failed/b.png", ".bgwatch/claimed/h/c.jpg", "sub/notes.txt", ".hidden/d.jpg"):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(b"x")
    assert not _has_image(inbox)
    (inbox / "sub" / "deep").mkdir()
    (inbox / "sub" / "deep" / "e.JPG").write_bytes(b"x")
    assert _has_image(inbox)
    assert not _has_image(tmp_path / "missing")
