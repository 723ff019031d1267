"""A file's life on disk, on real folders: claim, fenced delivery, park, settle after a crash, reclaim."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bgwatch import safefs
from bgwatch.custody import Custody, check_host
from bgwatch.liveness import Heartbeat, Liveness


def drop(path: Path, data: bytes = b"image bytes") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files(root: Path) -> list[str]:
    """Files below root, leaving out the outputs' owner records (.bgwatch/outputs/), which stay."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and "outputs" not in p.relative_to(root).parts[:2])


@pytest.fixture()
def inbox(tmp_path: Path) -> Path:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "outbox").mkdir()
    return tmp_path / "inbox"


def test_claim_renames_into_the_hosts_folder_keeping_the_rel_path(inbox: Path) -> None:
    src = drop(inbox / "shoot" / "a" / "photo.jpg")
    inode = src.stat().st_ino
    claim = Custody(inbox, "ws1", "e1").claim("shoot/a/photo.jpg")
    assert claim is not None and claim.rel == claim.name == "shoot/a/photo.jpg"
    assert claim.path == inbox / ".bgwatch" / "claimed" / "ws1" / "shoot" / "a" / "photo.jpg"
    assert not src.exists() and claim.path.stat().st_ino == inode  # renamed, not copied
    assert Custody(inbox, "ws1", "e1").own_claims() == ["shoot/a/photo.jpg"]


def test_claim_of_a_vanished_file_is_none_and_bad_names_are_refused(inbox: Path) -> None:
    custody = Custody(inbox, "ws1", "e1")
    assert custody.claim("gone.jpg") is None
    for rel in ("../x.jpg", ".bgwatch/claimed/ws2/x.jpg", "done/x.jpg"):
        with pytest.raises(ValueError):
            custody.claim(rel)
    for host in ("", "..", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="host name"):
            check_host(host)


def test_a_claim_whose_folder_is_pruned_under_it_moves_again(inbox: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker prunes this host's empty claimed/<host>/shoot/ (its last file delivered) between the
    claim opening that folder and renaming into it: the file is still in the inbox, so the claim is made
    again, never read as "another host took it" (seen in CI: the file was then left unprocessed)."""
    drop(inbox / "shoot" / "photo.jpg")
    real = safefs.move_into_own
    pruned: list[Path] = []

    def pruned_first(src: safefs.Folder, src_name: str, dst: safefs.Folder, name: str) -> str | None:
        if not pruned:
            pruned.append(dst.path)
            dst.path.rmdir()  # what Folder.prune does once the folder's last claim is delivered
        return real(src, src_name, dst, name)

    monkeypatch.setattr(safefs, "move_into_own", pruned_first)
    claim = Custody(inbox, "ws1", "e1").claim("shoot/photo.jpg")
    assert pruned == [inbox / ".bgwatch" / "claimed" / "ws1" / "shoot"]
    assert claim is not None and claim.path == pruned[0] / "photo.jpg" and claim.path.is_file()
    assert not (inbox / "shoot" / "photo.jpg").exists()


def test_a_move_into_a_removed_folder_says_so_and_moves_nothing(inbox: Path) -> None:
    drop(inbox / "photo.jpg")
    (inbox / "gone").mkdir()
    with safefs.Folder.open_root(inbox) as src, src.sub("gone") as dst:
        (inbox / "gone").rmdir()
        with pytest.raises(safefs.FolderRemoved):
            safefs.move_into_own(src, "photo.jpg", dst, "photo.jpg")
        (inbox / "photo.jpg").unlink()
        assert safefs.move_into_own(src, "photo.jpg", dst, "photo.jpg") is None, "a source gone: lost, as ever"


def test_a_second_claim_of_one_name_is_numbered_and_delivers_under_its_own_name(inbox: Path) -> None:
    custody = Custody(inbox, "ws1", "e1")
    first = custody.claim("photo.jpg") if drop(inbox / "photo.jpg", b"first") else None
    second = custody.claim("photo.jpg") if drop(inbox / "photo.jpg", b"second") else None
    assert first is not None and second is not None and second.name == "photo-2.jpg"
    outbox = inbox.parent / "outbox"
    assert custody.deliver(first, 1, outbox, "photo.png", b"out1", "move") is not None
    assert custody.deliver(second, 2, outbox, "photo-2.png", b"out2", "move") is not None
    # neither original replaced the other in done/
    assert (inbox / "done" / "photo.jpg").read_bytes() == b"first"
    assert (inbox / "done" / "photo-2.jpg").read_bytes() == b"second"
    assert files(inbox / ".bgwatch") == []


def test_sidecars_travel_with_their_image(inbox: Path) -> None:
    drop(inbox / "sub" / "photo.jpg")
    drop(inbox / "sub" / "photo.yaml", b"mode: color\n")
    custody = Custody(inbox, "ws1", "e1")
    claim = custody.claim("sub/photo.jpg", "sub/photo.yaml")
    assert claim is not None and claim.sidecar == "sub/photo.yaml"
    assert custody.unclaim(claim) == "sub/photo.jpg"
    assert files(inbox) == ["sub/photo.jpg", "sub/photo.yaml"]
    claim = custody.claim("sub/photo.jpg", "sub/photo.yaml")
    assert claim is not None
    settled = custody.fail(claim, 7, "truncated JPEG")
    assert settled is not None and settled.parked == inbox / "failed" / "sub" / "photo.jpg"
    assert files(inbox / "failed") == ["sub/photo.jpg", "sub/photo.jpg.error.txt", "sub/photo.yaml"]
    assert "truncated JPEG" in (inbox / "failed" / "sub" / "photo.jpg.error.txt").read_text()


def test_a_claim_taken_back_is_superseded_and_writes_nothing(inbox: Path) -> None:
    drop(inbox / "a.jpg")
    paused = Custody(inbox, "ws1", "e1")
    claim = paused.claim("a.jpg")
    assert claim is not None
    assert Custody(inbox, "ws2", "e2").reclaim("ws1") == ["a.jpg"]  # ws1 was silent longer than the lease
    outbox = inbox.parent / "outbox"
    assert paused.deliver(claim, 1, outbox, "a.png", b"late", "move") is None  # the fence says no
    assert paused.fail(claim, 1, "late failure") is None
    assert files(outbox) == [] and files(inbox) == ["a.jpg"]


def test_keep_puts_the_original_back_and_every_host_knows_it_was_done(inbox: Path) -> None:
    drop(inbox / "a.jpg")
    drop(inbox / "a.yaml", b"background_color: '#eeeeee'\n")
    custody = Custody(inbox, "ws1", "e1")
    claim = custody.claim("a.jpg", "a.yaml")
    assert claim is not None
    custody.deliver(claim, 1, inbox.parent / "outbox", "a.png", b"out", "keep")
    assert files(inbox) == sorted([f".bgwatch/kept/{p.name}" for p in (inbox / ".bgwatch/kept").iterdir()]
                                  + ["a.jpg", "a.yaml"])
    other = Custody(inbox, "ws2", "e2")
    assert other.kept.is_kept("a.jpg", os.lstat(inbox / "a.jpg"))
    assert other.kept.sidecar_unchanged("a.jpg", "a.yaml", os.lstat(inbox / "a.yaml"))
    (inbox / "a.yaml").write_text("background_color: '#000000'\n")
    os.utime(inbox / "a.yaml", ns=(1, 1))
    assert not other.kept.sidecar_unchanged("a.jpg", "a.yaml", os.lstat(inbox / "a.yaml"))
    (inbox / "a.jpg").write_bytes(b"a new photo under the old name")
    assert not other.kept.is_kept("a.jpg", os.lstat(inbox / "a.jpg"))


_CRASHING_DELIVERY = """
import os
import signal
import sys
from pathlib import Path
from bgwatch.custody import Custody

def power_cut(step):
    if step == "delivered":
        os.kill(os.getpid(), signal.SIGKILL)

inbox = Path(sys.argv[1])
custody = Custody(inbox, "ws1", "e1", step=power_cut)
claim = custody.claim("shot.jpg")
custody.deliver(claim, 5, inbox.parent / "outbox", "shot.png", b"the output", "move")
print("not reached")
"""


def test_a_kill_after_the_output_is_written_is_finished_by_another_host(inbox: Path) -> None:
    drop(inbox / "shot.jpg", b"original")
    proc = subprocess.run([sys.executable, "-c", _CRASHING_DELIVERY, str(inbox)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9 and "not reached" not in proc.stdout
    outbox = inbox.parent / "outbox"
    assert files(outbox) == ["shot.png"]
    assert (inbox / ".bgwatch" / "delivering" / "ws1").is_dir()
    # another host finds ws1 silent: it finishes the move to done/ instead of processing the file again
    assert Custody(inbox, "ws2", "e2", outbox).reclaim("ws1") == ["e1-5: finished"]
    assert (inbox / "done" / "shot.jpg").read_bytes() == b"original"
    assert files(outbox) == ["shot.png"] and (outbox / "shot.png").read_bytes() == b"the output"
    assert [p for p in files(inbox) if not p.startswith("done/")] == []


def test_a_kill_after_a_numbered_output_is_finished_with_that_output(inbox: Path) -> None:
    """The name it wanted was another input's: its output went to shot-2.png. The host that settles it is
    told that name by the marker on the share."""
    outbox = inbox.parent / "outbox"
    drop(inbox / "shot.jpg", b"original")
    (outbox / "shot.png").write_bytes(b"another input's output")
    proc = subprocess.run([sys.executable, "-c", _CRASHING_DELIVERY, str(inbox)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9
    assert Custody(inbox, "ws2", "e2", outbox).reclaim("ws1") == ["e1-5: finished"]
    assert (inbox / "done" / "shot.jpg").read_bytes() == b"original"
    assert (outbox / "shot.png").read_bytes() == b"another input's output"
    assert (outbox / "shot-2.png").read_bytes() == b"the output"


def test_a_kill_after_a_numbered_output_is_finished_once_when_the_outbox_was_drained(inbox: Path) -> None:
    """Its output went to shot-4.png; a consumer then took shot.png to shot-3.png away before anyone
    settled it. Searched by its bytes from the name it wanted, the output would not be found and the
    original would go back to the inbox to be made twice: the marker names shot-4.png."""
    outbox = inbox.parent / "outbox"
    drop(inbox / "shot.jpg", b"original")
    earlier = ["shot.png", "shot-2.png", "shot-3.png"]
    for name in earlier:
        (outbox / name).write_bytes(b"earlier " + name.encode())
    proc = subprocess.run([sys.executable, "-c", _CRASHING_DELIVERY, str(inbox)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9
    assert (outbox / "shot-4.png").read_bytes() == b"the output"
    for name in earlier:
        (outbox / name).unlink()
    assert Custody(inbox, "ws2", "e2", outbox).reclaim("ws1") == ["e1-5: finished"]
    assert (inbox / "done" / "shot.jpg").read_bytes() == b"original"
    assert not (inbox / "shot.jpg").exists()
    assert sorted(p.name for p in outbox.iterdir()) == ["shot-4.png"]


@pytest.mark.parametrize("when", ["after the marker", "after the owner's last check"])
def test_a_delivery_taken_over_mid_way_is_finished_once_by_the_taker(inbox: Path, when: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """ws1 stalls (a paused VM, a starved heartbeat) between writing its marker and renaming its output into
    place; ws2 finds it silent and takes the delivery over. Exactly one of them finishes it, with ws1's
    own output: the original is not returned to the inbox to be processed a second time."""
    outbox = inbox.parent / "outbox"
    drop(inbox / "shot.jpg", b"original")
    owner = Custody(inbox, "ws1", "e1", outbox)
    taker = Custody(inbox, "ws2", "e2", outbox)
    claim = owner.claim("shot.jpg")
    assert claim is not None
    real_holds = Custody._holds
    taken: list[list[str]] = []

    def holds_then_taken_over(self: Custody, token: str) -> bool:
        if self is not owner or taken:
            return real_holds(self, token)
        if when == "after the marker":
            taken.append(taker.reclaim("ws1"))
            return real_holds(self, token)
        held = real_holds(self, token)
        taken.append(taker.reclaim("ws1"))
        return held

    monkeypatch.setattr(Custody, "_holds", holds_then_taken_over)
    settled = owner.deliver(claim, 5, outbox, "shot.png", b"the output", "move")
    assert settled is not None and settled.handed_over and not settled.finished  # the taker finishes it
    assert taken == [["e1-5: finished"]]
    assert files(outbox) == ["shot.png"] and (outbox / "shot.png").read_bytes() == b"the output"
    assert (inbox / "done" / "shot.jpg").read_bytes() == b"original"
    assert [p for p in files(inbox) if not p.startswith("done/")] == []


def test_a_forged_marker_cannot_rename_files_outside_the_outbox(inbox: Path, tmp_path: Path) -> None:
    """A marker is a file on the share: one naming another folder as its outbox is not trusted."""
    elsewhere = tmp_path / "elsewhere"
    drop(elsewhere / ".ws1.0123456789ab.bgw-tmp", b"x")
    drop(inbox / "shot.jpg", b"original")
    owner = Custody(inbox, "ws1", "e1", inbox.parent / "outbox")
    claim = owner.claim("shot.jpg")
    assert claim is not None
    box = owner._fence(claim, owner.token(3))
    assert box is not None
    import hashlib
    import json

    forged = {"rel": "shot.jpg", "output": str(elsewhere / "victim"), "sha256": hashlib.sha256(b"x").hexdigest(),
              "disposition": "move", "outbox": str(elsewhere), "output_rel": "victim",
              "temp": ".ws1.0123456789ab.bgw-tmp"}
    with box:
        box.write_atomic("marker.json", json.dumps(forged).encode())
    settled = Custody(inbox, "ws2", "e2", inbox.parent / "outbox").reclaim("ws1")
    assert settled == ["e1-3: returned"]
    assert files(elsewhere) == [".ws1.0123456789ab.bgw-tmp"]
    quarantined = ".bgwatch/quarantine/ws2-e1-3~from-ws1"
    assert files(inbox) == [f"{quarantined}.json", f"{quarantined}.txt", "shot.jpg"]
    assert "is not a file of the outbox" in (inbox / f"{quarantined}.txt").read_text()


def test_a_kill_before_the_output_is_written_returns_the_original(inbox: Path) -> None:
    drop(inbox / "shot.jpg", b"original")
    custody = Custody(inbox, "ws1", "e1")
    claim = custody.claim("shot.jpg")
    assert claim is not None
    box = custody._fence(claim, custody.token(9))  # fenced, then the power went
    assert box is not None
    box.close()
    settled = Custody(inbox, "ws1", "e2").settle("ws1", "e1-9")  # the host itself, at its next start
    assert not settled.finished
    assert files(inbox) == ["shot.jpg"]


def test_planted_symlinks_never_move_foreign_files(inbox: Path, tmp_path: Path) -> None:
    private = tmp_path / "private"
    drop(private / "ws9" / "secret.jpg")
    drop(private / "ws9" / "notes.txt")
    (inbox / ".bgwatch").mkdir()
    os.symlink(private, inbox / ".bgwatch" / "claimed")
    custody = Custody(inbox, "ws1", "e1")
    assert custody.other_hosts() == []
    assert custody.reclaim("ws9") == []
    drop(inbox / "photo.jpg")
    with pytest.raises(safefs.UnsafeFolder):
        custody.claim("photo.jpg")
    assert files(private) == ["ws9/notes.txt", "ws9/secret.jpg"] and (inbox / "photo.jpg").exists()
    # a done/ that leads out of the inbox is refused, the original stays claimed
    (inbox / ".bgwatch" / "claimed").unlink()
    os.symlink(private, inbox / "done")
    claim = custody.claim("photo.jpg")
    assert claim is not None
    settled = custody.deliver(claim, 1, inbox.parent / "outbox", "photo.png", b"x", "move")
    assert settled is not None and settled.parked is None and "symbolic link" in settled.problem
    assert files(private) == ["ws9/notes.txt", "ws9/secret.jpg"]
    assert files(inbox / ".bgwatch" / "delivering") == ["ws1/e1-1/marker.json", "ws1/e1-1/photo.jpg"]
    # only images and sidecars ever come back from a dead host's claims
    (inbox / "done").unlink()
    drop(inbox / ".bgwatch" / "claimed" / "ws8" / "a.jpg")
    drop(inbox / ".bgwatch" / "claimed" / "ws8" / "run.sh")
    assert custody.reclaim("ws8") == ["a.jpg"]


def test_a_filesystem_without_noreplace_or_links_gets_unique_names(inbox: Path) -> None:
    drop(inbox / "done" / "photo.jpg", b"old")
    drop(inbox / "photo.jpg", b"new")
    dev = os.stat(inbox).st_dev
    safefs._strategy[dev] = safefs.UNIQUE
    try:
        custody = Custody(inbox, "ws1", "e1")
        claim = custody.claim("photo.jpg")
        assert claim is not None
        settled = custody.deliver(claim, 1, inbox.parent / "outbox", "photo.png", b"x", "move")
    finally:
        del safefs._strategy[dev]
    assert settled is not None and settled.parked is not None
    assert settled.parked.name.startswith("photo-ws1-") and settled.parked.read_bytes() == b"new"
    assert (inbox / "done" / "photo.jpg").read_bytes() == b"old"


_KILLED_AFTER_RESERVING = """
import os
import signal
import sys
from pathlib import Path
from bgwatch import safefs
from bgwatch.custody import Custody

inbox, where = Path(sys.argv[1]), sys.argv[2]
for folder in (inbox, inbox.parent / "outbox"):
    safefs._strategy[os.stat(folder).st_dev] = safefs.UNIQUE
reserve = safefs.Folder.reserve

def reserve_then_power_cut(self, name, tag):
    made = reserve(self, name, tag)
    if self.path.name == where:
        os.kill(os.getpid(), signal.SIGKILL)
    return made

safefs.Folder.reserve = reserve_then_power_cut
custody = Custody(inbox, "ws1", "e1", inbox.parent / "outbox")
claim = custody.claim("shot.jpg")
custody.deliver(claim, 5, inbox.parent / "outbox", "shot.png", b"the output", "move")
print("not reached")
"""


@pytest.mark.parametrize("where", ["outbox", "done"])
def test_a_kill_between_reserving_a_name_and_renaming_over_it_keeps_the_name(inbox: Path, where: str) -> None:
    """On a share with neither no-replace renames nor links (SMB-like), a name is reserved by an exclusive
    create and the file renamed over it. A kill between the two left an empty stray under the name, and
    the file was then placed under a unique name beside it (seen in the fault suite). The reservation names
    its delivery: whoever settles that delivery renames over it."""
    outbox = inbox.parent / "outbox"
    drop(inbox / "shot.jpg", b"original")
    proc = subprocess.run([sys.executable, "-c", _KILLED_AFTER_RESERVING, str(inbox), where], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -9 and "not reached" not in proc.stdout, proc.stderr
    reserved = (outbox / "shot.png") if where == "outbox" else (inbox / "done" / "shot.jpg")
    assert reserved.read_bytes().startswith(b"bgwatch: this name is reserved"), "killed after reserving"
    devs = {os.stat(inbox).st_dev, os.stat(outbox).st_dev}
    for dev in devs:
        safefs._strategy[dev] = safefs.UNIQUE
    try:
        # a stranger's reservation of the same name is never taken for this delivery's
        drop(inbox / "other" / "shot.jpg", b"a stranger")
        with safefs.Folder.open_root(inbox) as root, root.sub("other") as src, root.sub("done", create=True) as dst:
            if where == "done":
                got = safefs.move_to_free_name(src, "shot.jpg", dst, "shot.jpg", unique_tag="ws3-abc",
                                               reservation="ws3-e3-1")
                assert got == "shot-ws3-abc.jpg"
        assert Custody(inbox, "ws2", "e2", outbox).reclaim("ws1") == ["e1-5: finished"]
    finally:
        for dev in devs:
            del safefs._strategy[dev]
    assert (inbox / "done" / "shot.jpg").read_bytes() == b"original"
    assert files(outbox) == ["shot.png"] and (outbox / "shot.png").read_bytes() == b"the output"
    left = [p for p in files(inbox) if not p.startswith(("done/", "other/"))]
    assert left == [], left


def test_a_claim_return_cut_after_reserving_is_finished_in_the_returning_hosts_name(
        inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim returned to the inbox on an SMB-like share, killed after reserving its name: the same host
    started again, or another host taking its claims over, renames over that reservation (named for the
    claim), never leaves it in the inbox as a file that was never dropped. A reservation named for a move
    whose source has gone is left for whoever moves that file now."""
    drop(inbox / "shoot" / "photo.jpg", b"original")
    dev = os.stat(inbox).st_dev
    safefs._strategy[dev] = safefs.UNIQUE
    try:
        claim = Custody(inbox, "ws1", "e1").claim("shoot/photo.jpg")
        assert claim is not None
        with safefs.Folder.open_root(inbox) as root, root.sub("shoot") as folder:
            assert folder.reserve("photo.jpg", "ws1/claimed/shoot/photo.jpg")  # then the power went
        assert Custody(inbox, "ws2", "e2").reclaim("ws1") == ["shoot/photo.jpg"]
        assert files(inbox) == ["shoot/photo.jpg"] and (inbox / "shoot" / "photo.jpg").read_bytes() == b"original"
        drop(inbox / "shoot" / "taken.jpg", b"another")

        def taken_meanwhile(*args: object, **kwargs: object) -> None:
            raise FileNotFoundError(2, "moved by the host that took this move over")

        with safefs.Folder.open_root(inbox) as root, root.sub("shoot") as folder:
            monkeypatch.setattr(safefs.os, "rename", taken_meanwhile)
            for reservation, kept in (("ws9/claimed/taken.jpg", True), (None, False)):
                folder.unlink("again.jpg")
                got = safefs.move_to_free_name(folder, "taken.jpg", folder, "again.jpg", unique_tag="ws9-abc",
                                               reservation=reservation)
                assert got is None
                assert (folder.lstat("again.jpg") is not None) is kept
    finally:
        del safefs._strategy[dev]


def test_names_up_to_the_filesystem_limit_are_numbered_within_it(inbox: Path) -> None:
    name = "é" * 125 + ".jpg"  # 254 bytes
    assert len(os.fsencode(safefs.numbered(name, 12))) <= 255
    assert safefs.numbered(name, 12).endswith("-12.jpg")
    custody = Custody(inbox, "ws1", "e1")
    drop(inbox / name, b"one")
    first = custody.claim(name)
    drop(inbox / name, b"two")
    second = custody.claim(name)
    assert first is not None and second is not None and second.name.endswith("-2.jpg")
    assert len(safefs.temp_name(name, "ws1")) < 40


def _claim_all(inbox: str, host: str, names: list[str], start: object, out: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    custody = Custody(Path(inbox), host, host)
    won = [n for n in names if custody.claim(n) is not None]
    out.put((host, won))  # type: ignore[attr-defined]


@pytest.mark.slow
def test_two_processes_race_for_the_same_files_exactly_one_wins_each(inbox: Path) -> None:
    names = [f"p{i:03}.jpg" for i in range(200)]
    for n in names:
        drop(inbox / n)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(inbox), host, names, start, out)) for host in ("ws1", "ws2")]
    for p in procs:
        p.start()
    won = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert sorted(won["ws1"] + won["ws2"]) == names


def test_heartbeat_never_creates_a_missing_inbox_and_stops_claims(tmp_path: Path) -> None:
    now = [0.0]
    beat = Heartbeat(tmp_path / "unmounted" / "inbox", "ws1", "e1", 10, clock=lambda: now[0])
    assert not beat.beat() and not beat.fresh()
    assert not (tmp_path / "unmounted").exists()
    (tmp_path / "unmounted" / "inbox").mkdir(parents=True)
    assert beat.beat() and beat.fresh()
    now[0] += 6  # more than half a lease without a beat: stop claiming
    assert not beat.fresh()


def test_a_second_live_daemon_with_the_same_host_name_is_detected(inbox: Path) -> None:
    one = Heartbeat(inbox, "ws1", "epoch-a", 10)
    two = Heartbeat(inbox, "ws1", "epoch-b", 10)
    assert one.beat() and two.beat()
    assert one.beat()  # finds epoch-b's beat where its own should be
    assert one.twin == "epoch-b" and not one.fresh()


def test_liveness_is_judged_by_change_on_the_local_clock(inbox: Path) -> None:
    now = [100.0]
    liveness = Liveness(clock=lambda: now[0])
    beat = Heartbeat(inbox, "ws2", "e2", 10, wall=lambda: 1e12)  # a forged, far-future timestamp
    beat.beat()
    assert liveness.silent_for(inbox, "ws2") == 0.0
    now[0] += 30
    assert liveness.silent_for(inbox, "ws2") == 30.0  # unchanged for 30 s: silent, whatever it claims
    beat.beat()
    assert liveness.silent_for(inbox, "ws2") == 0.0


def test_a_move_killed_between_link_and_unlink_is_finished_not_doubled(inbox: Path) -> None:
    # claim killed after link(): the file is in the inbox and in claimed/ws1/ under one inode
    drop(inbox / "a.jpg", b"A")
    (inbox / ".bgwatch" / "claimed" / "ws1").mkdir(parents=True)
    os.link(inbox / "a.jpg", inbox / ".bgwatch" / "claimed" / "ws1" / "a.jpg")
    restarted = Custody(inbox, "ws1", "e2")
    assert restarted.return_claimed("a.jpg") is None  # the extra link is dropped, not returned as a-2.jpg
    assert files(inbox) == ["a.jpg"]
    # ... and if another host had taken the inbox name on meanwhile, the same
    os.link(inbox / "a.jpg", inbox / ".bgwatch" / "claimed" / "ws1" / "a.jpg")
    assert Custody(inbox, "ws2", "e3").claim("a.jpg") is not None
    assert Custody(inbox, "ws3", "e4").reclaim("ws1") == []
    assert files(inbox) == [".bgwatch/claimed/ws2/a.jpg"]
    # parking killed after link(): done/ already holds the original under its name
    drop(inbox / "b.jpg", b"B")
    custody = Custody(inbox, "ws1", "e5")
    claim = custody.claim("b.jpg")
    assert claim is not None
    box = custody._fence(claim, custody.token(3))
    assert box is not None
    with box:
        box.write_atomic("marker.json", b'{"disposition": "failed", "reason": "x"}')
    (inbox / "failed").mkdir()
    os.link(inbox / ".bgwatch" / "delivering" / "ws1" / "e5-3" / "b.jpg", inbox / "failed" / "b.jpg")
    settled = Custody(inbox, "ws1", "e6").settle("ws1", "e5-3")
    assert settled.parked == inbox / "failed" / "b.jpg"
    assert sorted(p.name for p in (inbox / "failed").iterdir()) == ["b.jpg", "b.jpg.error.txt"]
