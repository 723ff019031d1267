"""Claim-by-rename on real folders: one winner per file, heartbeats, stale hosts' claims returned."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from bgwatch import claim
from bgwatch.claim import Heartbeat, claimed_dir, reclaim_stale, unclaim


def drop(path: Path, data: bytes = b"image bytes") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_claim_renames_into_the_hosts_folder_keeping_the_rel_path(tmp_path: Path) -> None:
    src = drop(tmp_path / "shoot" / "a" / "photo.jpg")
    inode = src.stat().st_ino
    got = claim.claim(tmp_path, src, "ws1")
    assert got == claimed_dir(tmp_path, "ws1") / "shoot" / "a" / "photo.jpg"
    assert got == tmp_path / ".bgwatch" / "claimed" / "ws1" / "shoot" / "a" / "photo.jpg"
    assert not src.exists()
    assert got.read_bytes() == b"image bytes"
    assert got.stat().st_ino == inode  # renamed, not copied
    assert claim.list_claims(tmp_path, "ws1") == [got]


def test_claim_of_a_vanished_file_is_none(tmp_path: Path) -> None:
    assert claim.claim(tmp_path, tmp_path / "gone.jpg", "ws1") is None


def test_claim_refuses_paths_outside_the_inbox_and_bad_hosts(tmp_path: Path) -> None:
    outside = drop(tmp_path / "elsewhere" / "x.jpg")
    with pytest.raises(ValueError):
        claim.claim(tmp_path / "inbox", outside, "ws1")
    with pytest.raises(ValueError):
        claim.claim(tmp_path, drop(tmp_path / ".bgwatch" / "claimed" / "ws2" / "x.jpg"), "ws1")
    for host in ("", "..", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="host name"):
            claimed_dir(tmp_path, host)


def test_a_second_claim_of_the_same_name_never_replaces_the_first(tmp_path: Path) -> None:
    first = claim.claim(tmp_path, drop(tmp_path / "photo.jpg", b"first"), "ws1")
    second = claim.claim(tmp_path, drop(tmp_path / "photo.jpg", b"second"), "ws1")
    assert first is not None and second is not None
    assert second.name == "photo (2).jpg"
    assert (first.read_bytes(), second.read_bytes()) == (b"first", b"second")


def test_sidecars_are_claimed_and_returned_the_same_way(tmp_path: Path) -> None:
    image = drop(tmp_path / "sub" / "photo.jpg")
    sidecar = drop(tmp_path / "sub" / "photo.yaml", b"mode: color\n")
    got_image = claim.claim(tmp_path, image, "ws1")
    got_sidecar = claim.claim(tmp_path, sidecar, "ws1")
    assert got_image is not None and got_sidecar is not None
    assert got_sidecar.parent == got_image.parent and got_sidecar.name == "photo.yaml"
    assert unclaim(tmp_path, got_sidecar, "ws1") == sidecar
    assert sidecar.read_bytes() == b"mode: color\n"


def test_unclaim_returns_the_file_and_picks_a_free_name(tmp_path: Path) -> None:
    claimed = claim.claim(tmp_path, drop(tmp_path / "sub" / "photo.jpg", b"claimed"), "ws1")
    assert claimed is not None
    drop(tmp_path / "sub" / "photo.jpg", b"dropped again meanwhile")
    back = unclaim(tmp_path, claimed, "ws1")
    assert back == tmp_path / "sub" / "photo (2).jpg"
    assert back.read_bytes() == b"claimed"
    assert (tmp_path / "sub" / "photo.jpg").read_bytes() == b"dropped again meanwhile"
    assert not (claimed_dir(tmp_path, "ws1") / "sub").exists()  # empty folders cleaned up
    with pytest.raises(FileNotFoundError):
        unclaim(tmp_path, claimed, "ws1")


def test_two_threads_as_two_hosts_exactly_one_wins(tmp_path: Path) -> None:
    files = [drop(tmp_path / f"p{i:02}.jpg", bytes([i])) for i in range(40)]
    barrier = threading.Barrier(2)
    results: dict[str, list[Path | None]] = {}

    def worker(host: str) -> None:
        barrier.wait()
        results[host] = [claim.claim(tmp_path, f, host) for f in files]

    threads = [threading.Thread(target=worker, args=(h,)) for h in ("ws1", "ws2")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    for i, f in enumerate(files):
        winners = [r[i] for r in results.values() if r[i] is not None]
        assert len(winners) == 1, f.name
        assert winners[0].read_bytes() == bytes([i])
    assert not any(f.exists() for f in files)
    assert len(claim.list_claims(tmp_path, "ws1")) + len(claim.list_claims(tmp_path, "ws2")) == 40


def _claim_all(inbox: str, host: str, names: list[str], start: object, out: object) -> None:
    start.wait()  # type: ignore[attr-defined]  # a barrier: both processes are ready
    won = [n for n in names if claim.claim(Path(inbox), Path(inbox) / n, host) is not None]
    out.put((host, won))  # type: ignore[attr-defined]


@pytest.mark.slow
def test_two_processes_race_for_the_same_files_exactly_one_wins_each(tmp_path: Path) -> None:
    """Separate processes share no lock: only the rename decides."""
    names = [f"p{i:03}.jpg" for i in range(200)]
    for n in names:
        drop(tmp_path / n)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), host, names, start, out))
             for host in ("ws1", "ws2")]
    for p in procs:
        p.start()
    won = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert sorted(won["ws1"] + won["ws2"]) == names  # every file won once, by one host
    assert len(claim.list_claims(tmp_path, "ws1")) == len(won["ws1"])


def test_heartbeat_beats_and_ages(tmp_path: Path) -> None:
    now = [5000.0]
    hb = Heartbeat(tmp_path, "ws1", clock=lambda: now[0])
    assert hb.age("ws1") is None
    assert hb.beat()
    assert hb.path == tmp_path / ".bgwatch" / "heartbeats" / "ws1"
    assert float(hb.path.read_text()) == 5000.0 and hb.path.stat().st_mtime == 5000.0
    now[0] += 42
    assert hb.age("ws1") == pytest.approx(42)
    assert hb.beat()
    assert hb.age("ws1") == pytest.approx(0)
    assert [p.name for p in hb.path.parent.iterdir()] == ["ws1"]  # no temp files left


def test_heartbeat_on_a_missing_inbox_says_so_without_creating_it(tmp_path: Path) -> None:
    hb = Heartbeat(tmp_path / "unmounted", "ws1")
    assert hb.beat() is False
    assert not (tmp_path / "unmounted").exists()


def test_reclaim_returns_a_stale_hosts_claims_and_leaves_live_hosts_alone(tmp_path: Path) -> None:
    now = 10_000.0
    lease = 300.0
    Heartbeat(tmp_path, "stale", clock=lambda: now - 1000).beat()
    Heartbeat(tmp_path, "live", clock=lambda: now - 10).beat()
    Heartbeat(tmp_path, "me", clock=lambda: now - 5000).beat()  # my own: never by this call
    stale = [claim.claim(tmp_path, drop(tmp_path / rel, rel.encode()), "stale")
             for rel in ("a.jpg", "deep/er/b.jpg", "deep/er/b.yaml")]
    live = claim.claim(tmp_path, drop(tmp_path / "c.jpg"), "live")
    mine = claim.claim(tmp_path, drop(tmp_path / "d.jpg"), "me")
    drop(tmp_path / "a.jpg", b"a new a.jpg dropped since")

    back = reclaim_stale(tmp_path, lease, "me", now)

    assert sorted(back) == sorted([tmp_path / "a (2).jpg", tmp_path / "deep/er/b.jpg",
                                   tmp_path / "deep/er/b.yaml"])
    assert (tmp_path / "a (2).jpg").read_bytes() == b"a.jpg"
    assert (tmp_path / "a.jpg").read_bytes() == b"a new a.jpg dropped since"
    assert (tmp_path / "deep/er/b.yaml").read_bytes() == b"deep/er/b.yaml"
    assert not any(p is not None and p.exists() for p in stale)
    assert claim.list_claims(tmp_path, "stale") == []
    assert live is not None and live.exists() and mine is not None and mine.exists()
    assert reclaim_stale(tmp_path, lease, "me", now) == []  # nothing twice


def test_reclaim_without_a_heartbeat_goes_by_the_claimed_folder_age(tmp_path: Path) -> None:
    got = claim.claim(tmp_path, drop(tmp_path / "x.jpg"), "ghost")
    assert got is not None
    folder = claimed_dir(tmp_path, "ghost")
    mtime = folder.stat().st_mtime
    assert reclaim_stale(tmp_path, 300, "me", mtime + 10) == []  # it may be starting up
    os.utime(folder, (mtime - 1000, mtime - 1000))
    assert reclaim_stale(tmp_path, 300, "me", mtime) == [tmp_path / "x.jpg"]


def test_reclaim_with_no_work_folder_is_a_no_op(tmp_path: Path) -> None:
    assert reclaim_stale(tmp_path, 300, "me", 0.0) == []


def test_liveness_ignores_clock_skew_and_forged_timestamps(tmp_path: Path) -> None:
    from bgwatch.claim import Liveness, claim, reclaim_stale

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jpg").write_bytes(b"a")
    assert claim(inbox, inbox / "a.jpg", "ws2") is not None
    beat = inbox / ".bgwatch" / "heartbeats" / "ws2"
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.write_text("0\n")  # a host whose clock is decades behind (or a forged stamp)
    local = [1000.0]
    liveness = Liveness(clock=lambda: local[0])
    assert reclaim_stale(inbox, 30, "ws1", now=2e9, liveness=liveness) == [], "first seen: fresh"
    local[0] += 20
    beat.write_text("1\n")  # it beats: alive, whatever its clock says
    local[0] += 20
    assert reclaim_stale(inbox, 30, "ws1", now=2e9, liveness=liveness) == []
    local[0] += 31  # silent for longer than the lease, on this host's clock
    assert [p.name for p in reclaim_stale(inbox, 30, "ws1", now=2e9, liveness=liveness)] == ["a.jpg"]
