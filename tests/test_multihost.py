"""Several workstations, one share: real daemons on FUSE bind mounts, faults at random moments, and the
invariants checked afterwards (every input exactly once in done/ or failed/, one output each, nothing
overwritten, nothing stranded, databases intact). DESIGN.md "Several workstations, one share"; issue 7.

Each scenario is a plain function that takes a Cluster and returns a Report, so bench/bench_faults.py
runs the same code with more rounds and prints the table. One scenario alone:

    .venv/bin/pytest -q tests/test_multihost.py -k sigstop -p no:cacheprovider -s

The daemons run `python -m bgwatch` from this interpreter: to try another checkout of bgwatch, put it
first on PYTHONPATH. Needs /dev/fuse and bindfs (installed when root); skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hosts import LEASE_SECONDS, Cluster, Host, wait_until
from share import Report, Share, check_share, fuse_problem, image_bytes

from bgwatch.doctor import FREE_SPACE_ERROR

MID_SIZE = 320  # px: a job of ~0.4 s here, so that a fault finds jobs in flight


def _claims(cluster: Cluster, host: Host) -> int:
    return sum(1 for p in cluster.share.claimed_files() if f"/{host.name}/" in p.as_posix())


def _wait_for_claims(cluster: Cluster, host: Host, want: int = 2, timeout: float = 15.0) -> int:
    """Wait (briefly polling) until `host` holds `want` claims, so that a fault lands mid-job; returns how
    many it holds (fewer if the deadline came first)."""
    wait_until(lambda: _claims(cluster, host) >= want, timeout, interval=0.01)
    return _claims(cluster, host)


def _drop_over(cluster: Cluster, count: int, seconds: float, **kwargs: Any) -> None:
    """Drop `count` images spread over `seconds`, as files keep arriving during a fault."""
    batches = max(1, int(seconds / 0.5))
    for i in range(batches):
        n = count // batches + (1 if i < count % batches else 0)
        if n:
            cluster.share.drop_images(n, **kwargs)
        time.sleep(seconds / batches)


# ---------------------------------------------------------------------- scenarios


def scenario_sigkill(cluster: Cluster, rounds: int = 30, files: int = 180, seed: int = 7) -> Report:
    """SIGKILL of a random host at random moments while files keep arriving; usually restarted at once,
    sometimes only after more than a lease, so that the others take its claims back."""
    rng = random.Random(seed)
    cluster.start()
    per_round = max(1, files // rounds)
    later: dict[Host, float] = {}
    delayed = 0
    for _ in range(rounds):
        cluster.share.drop_images(per_round)
        time.sleep(rng.uniform(0.3, 1.3))
        now = time.monotonic()
        for host, due in list(later.items()):
            if now >= due:
                del later[host]
                host.start()
        cluster.supervise()
        live = [h for h in cluster.hosts if h.alive and h not in later]
        if len(live) < 2:
            continue  # only after a daemon died by itself: one host always works, so the batch moves on
        victim = rng.choice(live)
        victim.kill()
        if not later and rng.random() < 0.25:  # one host at a time stays down past the lease
            later[victim] = time.monotonic() + LEASE_SECONDS + rng.uniform(1.5, 3.0)
            delayed += 1
        else:
            victim.start()
    extra = files - per_round * rounds
    if extra > 0:
        cluster.share.drop_images(extra)
    for host, due in later.items():
        time.sleep(max(0.0, due - time.monotonic()))
        host.start()
    cluster.notes.append(f"{sum(h.kills for h in cluster.hosts)} SIGKILLs, {delayed} restarted after the lease")
    cluster.wait_finished(90)
    return cluster.finish("SIGKILL at random moments", rounds)


def scenario_sigstop(cluster: Cluster, files: int = 60, pause: float = 3 * LEASE_SECONDS) -> Report:
    """One host stopped (SIGSTOP) mid-batch for about three leases while files keep arriving; the others
    take its claims back; when it wakes up its late jobs must not be delivered a second time."""
    cluster.start()
    victim = cluster.hosts[1]
    cluster.share.drop_images(files // 2, size=MID_SIZE)
    _wait_for_claims(cluster, victim)
    time.sleep(0.3)  # its first claims are being worked on now, not only recorded
    victim.suspend()
    cluster.notes.append(f"{victim.name} stopped holding {_claims(cluster, victim)} claim(s)")
    _drop_over(cluster, files - files // 2, pause, size=MID_SIZE)
    victim.resume()
    cluster.wait_finished(90)
    time.sleep(LEASE_SECONDS)  # the woken host's late jobs get their chance to go wrong
    return cluster.finish(f"SIGSTOP {pause:g} s (lease {LEASE_SECONDS:g} s)", 1)


def scenario_db_lock(cluster: Cluster, files: int = 60, hold: float = 30.0) -> Report:
    """One host's SQLite database held with BEGIN EXCLUSIVE for `hold` seconds mid-batch: work is
    delayed, never stranded, failed or done twice."""
    cluster.start()
    victim = cluster.hosts[0]
    cluster.share.drop_images(files // 2, size=MID_SIZE)
    _wait_for_claims(cluster, victim)
    held = victim.hold_db_lock(hold)
    if not held.wait(15):
        cluster.violations.append(f"harness: {victim.name}'s database could not be locked within 15 s")
    start = time.monotonic()
    _drop_over(cluster, files - files // 2, hold / 3, size=MID_SIZE)
    time.sleep(max(0.0, hold - (time.monotonic() - start)))
    cluster.wait_finished(90)
    return cluster.finish(f"database locked {hold:g} s", 1)


def scenario_unmount(cluster: Cluster, files: int = 60, down: float = 5.0) -> Report:
    """One host's share unmounted mid-batch for a few seconds, then mounted again. The daemon must not
    create anything in the empty mount point (a real share could then not be mounted over it)."""
    cluster.start()
    victim = cluster.hosts[2]
    cluster.share.drop_images(files // 2, size=MID_SIZE)
    held = _wait_for_claims(cluster, victim)
    victim.unmount()
    cluster.notes.append(f"{victim.name} lost its share holding {held} claim(s)")
    _drop_over(cluster, files - files // 2, down, size=MID_SIZE)
    victim.remount()  # records a violation if the mount point is not empty
    cluster.wait_finished(90)
    return cluster.finish(f"share unmounted {down:g} s", 1)


def scenario_crash_after_delivery(cluster: Cluster, files: int = 40) -> Report:
    """Crash points (tests/faultd.py) kill a daemon at three moments of a delivery: with its marker written
    and its output not yet placed (restarted only after the lease: the others take the delivery over), right
    after the output is placed (restarted at once: it recovers its own), and in the middle of filing the
    original. Nobody may write a second output, file an original twice or lose one."""
    plan = [(cluster.hosts[0], "marker", LEASE_SECONDS + 2.0), (cluster.hosts[1], "delivered:3", 0.0),
            (cluster.hosts[2 % len(cluster.hosts)], "filing:2", 0.0)]
    for host, point, _ in plan:
        host.start(crash_at=point, expect_exit=True)
    cluster.share.drop_images(files // 2)
    deadline = time.monotonic() + 20
    for host, point, restart_after in plan:
        code = host.wait_exit(deadline - time.monotonic())
        if code is None:
            cluster.violations.append(f"{host.name}: the crash point {point} never fired (daemon still "
                                      "running 20 s after the batch)")
            host.kill()
        elif code != -9:
            cluster.violations.append(f"{host.name}: the crash point ended the daemon with code {code}, not SIGKILL")
        if restart_after:
            time.sleep(restart_after)
        host.start()
    cluster.share.drop_images(files - files // 2)
    cluster.wait_finished(90)
    return cluster.finish("SIGKILL at the marker, after the output, mid-filing", 3)


def scenario_same_name_twice(cluster: Cluster, pairs: int = 6, files: int = 20, size: int = 200) -> Report:
    """A name dropped again (other bytes) while its first copy is in flight: both originals end in
    done/ (the second numbered, `dup-2.png`), neither is overwritten."""
    cluster.start()
    names = ["dup.png"] + [f"dup_{chr(ord('b') + i)}.png" for i in range(pairs - 1)]
    cluster.share.drop_images(files // 2)
    for i, name in enumerate(names):
        cluster.share.drop(name, image_bytes(10_000 + i, size=size))
        inbox_copy = cluster.share.inbox / name
        wait_until(lambda p=inbox_copy: not p.exists(), 15, interval=0.01)  # claimed: now in flight
        # Same size: both copies tend to finish, and park, at about the same moment.
        cluster.share.drop(name, image_bytes(20_000 + i, size=size))
    # Two inputs whose outputs want one name (pair_X.jpg and pair_X.png, dropped together, taken by two hosts)
    for i in range(pairs):
        cluster.share.drop(f"pair_{i}.jpg", image_bytes(40_000 + i, size=size, fmt="JPEG"))
        cluster.share.drop(f"pair_{i}.png", image_bytes(50_000 + i, size=size))
    cluster.share.drop_images(files - files // 2)
    cluster.wait_finished(90)
    report = cluster.finish(f"same name twice ({pairs} names), {pairs} output-name pairs", pairs)
    done = cluster.share.inbox / "done"
    for name in names:
        stem = name[:-4]
        got = sorted(p.name for p in done.glob("*.png") if re.fullmatch(rf"{re.escape(stem)}(-\d+)?\.png", p.name))
        if got != sorted([name, f"{stem}-2.png"]):
            report.violations.append(f"{name}: done/ holds {got}, expected [{name}, {stem}-2.png]")
    return report


def scenario_full_outbox(cluster: Cluster, files: int = 12, wait: float = 8.0) -> Report:
    """The outbox fills up (a small tmpfs under the share's outbox, filled to the last block) while files
    arrive: no run may fail or be called a takeover, the logs must name "No space left on device" without
    a hot loop, and once there is room every input gets its one output."""
    outbox = cluster.share.outbox
    size = FREE_SPACE_ERROR + (8 << 20)  # enough for the daemons' start-up check, then filled
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(outbox)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("a full outbox needs a small tmpfs, mounted as root")
    try:
        cluster.start()
        for host in cluster.hosts:
            host.wait_ready()
        filler = outbox / ".filler"
        with open(filler, "wb") as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        cluster.share.drop_images(files, size=MID_SIZE)
        time.sleep(wait)
        logs = [h.log_path.read_text(errors="replace") for h in cluster.hosts]
        named = sum(log.count("No space left on device") for log in logs)
        tries = sum(log.count("waiting to be delivered") for log in logs)
        cluster.notes.append(f"outbox full for {wait:g} s: {named} log line(s) name ENOSPC, {tries} delivery "
                             "attempt(s) logged")
        if not named:
            cluster.violations.append("no log line says 'No space left on device' while the outbox was full")
        if tries > files * (3 + wait / 2):
            cluster.violations.append(f"{tries} delivery attempts in {wait:g} s for {files} file(s): a hot loop")
        for text in ("taken back by another host", "Logging error"):
            if any(text in log for log in logs):
                cluster.violations.append(f"a full outbox was reported as {text!r}")
        filler.unlink()
        cluster.wait_finished(120)
        return cluster.finish(f"outbox full {wait:g} s", 1)
    finally:
        cluster.stop()
        subprocess.run(["umount", "-l", str(outbox)], capture_output=True, check=False)


def scenario_share_mode(cluster: Cluster, files: int = 18, pairs: int = 3, kills: int = 4, seed: int = 15) -> Report:
    """Issue 15's studio on one kind of share (cluster.share.fs: the FUSE passthrough answering in 10-20 ms,
    posix, nfs or smb): three daemons, the same names dropped again while in flight, pairs of inputs that
    want one output name, and SIGKILLs at random moments. Every input must end with exactly one output of
    its own, and no original may be renamed when nothing clashed."""
    rng = random.Random(seed)
    cluster.start()
    for host in cluster.hosts:
        host.wait_ready()
    for i in range(pairs):
        name = f"same_{i}.png"
        cluster.share.drop(name, image_bytes(60_000 + i, size=160))
        cluster.share.drop(f"pair_{i}.jpg", image_bytes(70_000 + i, size=160, fmt="JPEG"))
        cluster.share.drop(f"pair_{i}.png", image_bytes(80_000 + i, size=160))
        wait_until(lambda n=name: not (cluster.share.inbox / n).exists(), 10, interval=0.02)
        cluster.share.drop(name, image_bytes(90_000 + i, size=160))
    for _ in range(kills):
        cluster.share.drop_images(max(1, files // kills), size=160)
        time.sleep(rng.uniform(0.3, 1.2))
        victim = rng.choice([h for h in cluster.hosts if h.alive] or cluster.hosts)
        victim.kill()
        victim.start()
    cluster.notes.append(f"{cluster.share.fs} share, {kills} SIGKILLs")
    cluster.wait_finished(150)
    return cluster.finish(f"{cluster.share.fs} share: SIGKILLs, same names, output-name pairs", kills)


def scenario_full_state_folder(cluster: Cluster, files: int = 12, wait: float = 8.0) -> Report:
    """One host's state folder (its SQLite database and logs) fills up mid-batch: no run may be left
    'queued' or 'running', the console may not flood (loguru's "Logging error" tracebacks, a retry loop's
    warnings), the other host goes on, and once there is room the host works again."""
    victim = cluster.hosts[0]
    state = victim.state_dir
    size = FREE_SPACE_ERROR + (8 << 20)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(state)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("a full state folder needs a small tmpfs, mounted as root")
    try:
        cluster.start()
        for host in cluster.hosts:
            host.wait_ready()
        before = len(victim.log_path.read_text(errors="replace").splitlines())
        filler = state / "filler.bin"
        with open(filler, "wb") as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        cluster.share.drop_images(files, size=MID_SIZE)
        time.sleep(wait)
        lines = victim.log_path.read_text(errors="replace").splitlines()[before:]
        floods = sum("Logging error" in line for line in lines)
        cluster.notes.append(f"{victim.name}'s state folder full for {wait:g} s: {len(lines)} console line(s), "
                             f"{floods} 'Logging error' traceback(s)")
        if len(lines) > 60 + 40 * wait:
            cluster.violations.append(f"{victim.name}: {len(lines)} console lines in {wait:g} s with a full state "
                                      "folder: a flood")
        filler.unlink()
        cluster.wait_finished(120)
        return cluster.finish(f"state folder full {wait:g} s", 1)
    finally:
        cluster.stop()
        subprocess.run(["umount", "-l", str(state)], capture_output=True, check=False)


def scenario_stop_mid_filing(cluster: Cluster, files: int = 16) -> Report:
    """A host paused (SIGSTOP, at a crash point of tests/faultd.py) in the middle of filing an original, its
    output already placed, for two leases: another host takes the delivery over and files it; when the
    paused host wakes up it must not file the original a second time (issue 15: x.jpg and x-2.jpg in
    done/, one file with two links, where inode numbers cannot be trusted)."""
    victim = cluster.hosts[0]
    victim.start(stop_at="filing:2")
    for host in cluster.hosts[1:]:
        host.start()
    cluster.share.drop_images(files, size=MID_SIZE)
    if not wait_until(lambda: victim.stopped, 30, interval=0.05):
        cluster.violations.append(f"{victim.name}: never reached the filing stop point")
    else:
        cluster.notes.append(f"{victim.name} stopped mid-filing for {2 * LEASE_SECONDS + 1:g} s")
        time.sleep(2 * LEASE_SECONDS + 1)
    victim.resume()
    cluster.wait_finished(90)
    time.sleep(LEASE_SECONDS)  # the woken host's late moves get their chance to go wrong
    return cluster.finish(f"SIGSTOP mid-filing on a {cluster.share.fs} share", 1)


KEEP_SIDECAR = 'background_color: "#eeeeee"\n'


def scenario_keep(cluster: Cluster, files: int = 30, slow_size: int = 2400) -> Report:
    """on_success: keep on every host, a sidecar beside every image, one slow job: each image is
    processed exactly once across the hosts and kept in the inbox, and nothing is taken again."""
    cluster.start()
    cluster.share.drop("slow.yaml", KEEP_SIDECAR.encode())
    cluster.share.drop("slow.png", image_bytes(30_000, size=slow_size))
    _drop_over(cluster, files, 3.0, sidecar=KEEP_SIDECAR)
    cluster.wait_finished(120)
    time.sleep(3 * 2 + 1)  # a few rescans: kept originals taken again would show up now
    report = cluster.finish("keep mode, sidecars, a slow job", 1)
    _check_sidecar_applied(cluster, report)
    return report


def scenario_keep_once(cluster: Cluster, files: int = 20, slow_size: int = 2400, timeout: float = 90.0) -> Report:
    """`bgwatch run --once` on one host in keep mode, with sidecars and a slow job, must exit."""
    host = cluster.hosts[0]
    cluster.share.drop("slow.yaml", KEEP_SIDECAR.encode())
    cluster.share.drop("slow.png", image_bytes(30_001, size=slow_size))
    cluster.share.drop_images(files, sidecar=KEEP_SIDECAR)
    code = host.run_once(timeout)
    if code is None:
        cluster.violations.append(f"run --once did not exit within {timeout:g} s (killed); log:\n{host.log_tail()}")
    elif code != 0:
        cluster.violations.append(f"run --once exited {code}; log:\n{host.log_tail()}")
    report = cluster.finish("keep mode, run --once", 1)
    _check_sidecar_applied(cluster, report)
    return report


def _check_sidecar_applied(cluster: Cluster, report: Report) -> None:
    """The sidecar's background colour reached the outputs (a corner pixel is the backdrop)."""
    from PIL import Image

    for drop in cluster.share.images[:5]:
        path = cluster.share.outbox / f"{drop.stem}.png"
        if not path.exists():
            continue
        with Image.open(path) as image:
            pixel = image.convert("RGB").getpixel((0, 0))
        if max(abs(c - 0xEE) for c in pixel) > 8:
            report.violations.append(f"{path.name}: corner {pixel} is not the sidecar's #eeeeee")


# ---------------------------------------------------------------------- tests


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Clusters on tmp_path; every daemon is killed and every mount undone afterwards, whatever happens."""
    reason = fuse_problem()
    if reason is not None:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    made: list[Cluster] = []

    def make(name: str = "cluster", **kwargs: Any) -> Cluster:
        fs_reason = fuse_problem(kwargs.get("fs", "bindfs"))
        if fs_reason is not None:
            print(f"skipped: {fs_reason}")
            pytest.skip(fs_reason)
        cluster = Cluster(tmp_path / name, **kwargs)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


def _assert_clean(report: Report) -> None:
    print("\n" + report.describe())
    assert not report.violations, report.describe()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_sigkill_at_random_moments(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_sigkill(make_cluster()))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sigstop_longer_than_the_lease(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_sigstop(make_cluster()))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_database_locked_30s(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_db_lock(make_cluster()))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_share_unmounted_and_mounted_again(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_unmount(make_cluster()))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_crash_between_output_write_and_done(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_crash_after_delivery(make_cluster()))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_same_name_dropped_twice_while_in_flight(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_same_name_twice(make_cluster()))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_full_outbox_is_waited_out_not_failed(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_full_outbox(make_cluster(hosts=2)))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_full_state_folder_strands_no_row_and_floods_nothing(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_full_state_folder(make_cluster(hosts=2)))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_host_paused_mid_filing_files_nothing_twice(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_stop_mid_filing(make_cluster()))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_smb_like_share_with_sigkills_and_same_names(make_cluster: Callable[..., Cluster]) -> None:
    """The hardest of the three share modes in `make test` (bench/bench_faults.py runs all three): no
    RENAME_NOREPLACE, no hard links, inode numbers that change, 10-20 ms a call."""
    _assert_clean(scenario_share_mode(make_cluster(fs="smb")))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_keep_mode_with_sidecars_and_a_slow_job(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_keep(make_cluster(on_success="keep")))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_keep_mode_run_once_exits(make_cluster: Callable[..., Cluster]) -> None:
    _assert_clean(scenario_keep_once(make_cluster(hosts=1, on_success="keep")))


def test_the_checker_ties_an_output_to_an_original_renamed_on_a_clash() -> None:
    """On a share without no-replace renames or links, an original that goes back to the inbox while a new
    drop holds its name is renamed `stem-<host>-<6 hex>`, and its output follows that name: it is one of
    the stem's outputs (a second one), not an output of no input."""
    from share import _output_stem

    stems = {"same_1", "img-0001"}
    assert _output_stem("same_1-h1-5f0b5b.png", stems, ".png") == ("same_1", 2)
    assert _output_stem("same_1-2.png", stems, ".png") == ("same_1", 2)
    assert _output_stem("same_1.png", stems, ".png") == ("same_1", 1)
    assert _output_stem("other-h1-5f0b5b.png", stems, ".png") is None
    assert _output_stem("same_1-h1-5f0b5.png", stems, ".png") is None


def test_the_checker_tells_an_empty_smb_reservation_from_a_stray(tmp_path: Path) -> None:
    """On an SMB-like share a kill between a reservation's exclusive create and its tag write leaves an
    empty file under the name, the original filed beside it under a unique name: a note there (the one
    window SMB leaves open, safefs.Folder.reserve), a violation anywhere else, and a tagged reservation
    left behind is a violation on every share."""
    def end_state(root: Path, fs: str, stray: bytes) -> Report:
        share = Share(root, fs=fs)
        [drop] = share.drop_images(1)
        (share.inbox / "done").mkdir()
        (share.outbox / f"{drop.stem}.png").write_bytes((share.inbox / drop.name).read_bytes())
        (share.inbox / drop.name).rename(share.inbox / "done" / f"{drop.stem}-h1-abc123.png")
        (share.inbox / "done" / drop.name).write_bytes(stray)
        return check_share(share, [])

    empty = end_state(tmp_path / "smb", "smb", b"")
    assert empty.violations == [] and empty.renamed == 0
    assert any("an empty reservation left by a kill" in n for n in empty.notes), empty.notes
    assert end_state(tmp_path / "posix", "bindfs", b"").renamed == 1
    tagged = end_state(tmp_path / "tagged", "smb", b"bgwatch: this name is reserved for a file on its way (h1-e1-5)\n")
    assert tagged.renamed == 1 and any("never dropped" in v for v in tagged.violations), tagged.violations


def test_the_checker_names_every_kind_of_violation(tmp_path: Path) -> None:
    """The checker itself, on an end state built by hand (no daemons, no FUSE): each broken invariant
    is reported, and a clean end state gives none. Outputs are tied to inputs by their pixels."""
    share = Share(tmp_path)
    drops = share.drop_images(9)
    data = {d.name: (share.inbox / d.name).read_bytes() for d in drops}
    done, failed, claimed = share.inbox / "done", share.inbox / "failed", share.inbox / ".bgwatch/claimed/h2"
    for folder in (done, failed, claimed):
        folder.mkdir(parents=True)
    clean = Share(tmp_path / "clean")
    for drop in clean.drop_images(2):
        (clean.inbox / "done").mkdir(exist_ok=True)
        (clean.outbox / f"{drop.stem}.png").write_bytes((clean.inbox / drop.name).read_bytes())
        (clean.inbox / drop.name).rename(clean.inbox / "done" / drop.name)
    assert check_share(clean, []).violations == []

    names = [d.name for d in drops]
    (share.inbox / names[0]).rename(done / names[0])  # fine
    (share.outbox / f"{drops[0].stem}.png").write_bytes(data[names[0]])
    (share.inbox / names[1]).rename(done / names[1])  # processed twice: a numbered output
    (share.outbox / f"{drops[1].stem}.png").write_bytes(data[names[1]])
    (share.outbox / f"{drops[1].stem}-2.png").write_bytes(data[names[1]])
    (share.inbox / names[2]).rename(claimed / names[2])  # stranded in claimed/
    (share.inbox / names[3]).unlink()  # lost
    (share.inbox / names[4]).rename(done / names[4])  # overwritten by the next one's bytes
    (share.inbox / names[5]).replace(done / names[4])
    os.link(done / names[0], done / "img-0001-2.png")  # parked twice: a link never unlinked
    (share.inbox / names[6]).rename(failed / names[6])  # failed without its note; a temp output
    (share.outbox / f".{drops[6].stem}.png.h1.x.bgwatch-tmp").write_bytes(b"half")
    (share.inbox / names[7]).rename(done / names[7])  # its output replaced by another input's output
    (share.outbox / f"{drops[7].stem}.png").write_bytes(data[names[8]])
    (share.inbox / names[8]).rename(done / "img-0009-h1-abc123.png")  # renamed although nothing clashed
    (share.outbox / f"{drops[8].stem}.png").write_bytes(data[names[8]])
    db = tmp_path / "h1" / "state" / "bgwatch.db"
    db.parent.mkdir(parents=True)
    out = tmp_path / "h1" / "mnt" / "outbox"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, rel_path TEXT, input_sha256 TEXT, status TEXT, "
                     "output_path TEXT)")
        conn.executemany("INSERT INTO runs (rel_path, input_sha256, status, output_path) VALUES (?, ?, ?, ?)",
                         [(names[0], drops[0].sha256, "done", ""), (names[0], drops[0].sha256, "done", ""),
                          (names[2], drops[2].sha256, "running", ""), (names[1], drops[1].sha256, "failed", ""),
                          (names[7], drops[7].sha256, "done", str(out / f"{drops[7].stem}.png"))])
    conn.close()
    report = check_share(share, [db])
    text = "\n".join(report.violations)
    print(report.describe())
    assert (report.lost, report.stranded) == (2, 1)  # names[3] gone; names[4] overwritten by names[5]
    assert report.twice == 3  # names[1] by its -2 output, names[0] by its two 'done' rows, names[8] by its pixels
    # names[7]'s output holds names[8]'s pixels; names[5] and names[7] have no output of their own;
    # names[5] (over names[4]) and names[8] are filed under other names
    assert (report.overwritten, report.no_output, report.renamed) == (1, 2, 2)
    for expected in (f"{names[1]}: processed twice", f"{names[2]}: stranded at inbox/.bgwatch/claimed/h2",
                     f"{names[3]}: lost", f"{names[4]}: lost", "overwritten?", f"{names[6]}: in failed/ without",
                     "a temp file left in the outbox", f"h1: run 3 ({names[2]}) left 'running'",
                     f"{names[0]}: 2 'done' rows", f"h1: {names[1]} recorded 'failed' although it finished",
                     f"left in the work folder: .bgwatch/claimed/h2/{names[2]}",
                     f"{names[0]}: ends 2 times: inbox/done/img-0001-2.png, inbox/done/img-0001.png (hard links",
                     f"{names[7]}: finished, but no output in the outbox holds its pixels",
                     f"run 5 ({names[7]}) wrote {drops[7].stem}.png, which now holds {names[8]}'s pixels",
                     f"{names[8]}: filed as inbox/done/img-0009-h1-abc123.png although nothing clashed"):
        assert expected in text, expected
