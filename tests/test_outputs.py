"""Outputs reserved on the share (outputs.py, delivery.py): no output replaced by another input's, the same
input replacing its own, honest endings, storage errors named, markers treated as data. Real folders only;
the full-outbox test mounts a small tmpfs (root), else it is skipped with the reason."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgwatch import fileid, safefs
from bgwatch.custody import Custody, DeliveryBlocked


def drop(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture()
def share(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "outbox").mkdir()
    return tmp_path / "inbox", tmp_path / "outbox"


@contextlib.contextmanager
def no_replace_nor_links(folder: Path) -> Iterator[None]:
    """Treat the filesystem of `folder` as an SMB mount: no RENAME_NOREPLACE and no hard links."""
    dev = os.stat(folder).st_dev
    before = safefs._strategy.get(dev)
    safefs._strategy[dev] = safefs.UNIQUE
    try:
        yield
    finally:
        safefs._strategy.pop(dev, None)
        if before is not None:
            safefs._strategy[dev] = before


def test_two_hosts_wanting_one_output_name_both_keep_their_own(share: tuple[Path, Path]) -> None:
    """photo.jpg on ws1 and photo.png on ws2 (different images) both want photo.png: the second delivery
    takes photo-2.png on the share, whatever each host remembers; nothing is replaced."""
    inbox, outbox = share
    drop(inbox / "photo.jpg", b"first image")
    drop(inbox / "photo.png", b"second image")
    one, two = Custody(inbox, "ws1", "e1", outbox), Custody(inbox, "ws2", "e2", outbox)
    first, second = one.claim("photo.jpg"), two.claim("photo.png")
    assert first is not None and second is not None
    a = one.deliver(first, 1, outbox, "photo.png", b"output of the first", "move")
    b = two.deliver(second, 1, outbox, "photo.png", b"output of the second", "move")
    assert a is not None and a.finished and a.output == outbox / "photo.png"
    assert b is not None and b.finished and b.output == outbox / "photo-2.png"
    assert (outbox / "photo.png").read_bytes() == b"output of the first"
    assert (outbox / "photo-2.png").read_bytes() == b"output of the second"


def test_the_same_input_replaces_its_own_output_and_nobody_elses(share: tuple[Path, Path]) -> None:
    inbox, outbox = share
    custody = Custody(inbox, "ws1", "e1", outbox)
    drop(inbox / "a" / "shot.jpg", b"the shot")
    claim = custody.claim("a/shot.jpg")
    assert claim is not None
    custody.deliver(claim, 1, outbox, "a/shot.png", b"white backdrop", "move")
    # the same bytes dropped again under the same name, with another spec (a sidecar): its own output
    drop(inbox / "a" / "shot.jpg", b"the shot")
    again = Custody(inbox, "ws2", "e2", outbox).claim("a/shot.jpg")
    assert again is not None
    settled = Custody(inbox, "ws2", "e2", outbox).deliver(again, 9, outbox, "a/shot.png", b"grey backdrop", "move")
    assert settled is not None and settled.output == outbox / "a" / "shot.png"
    assert tree(outbox) == ["a/shot.png"] and (outbox / "a" / "shot.png").read_bytes() == b"grey backdrop"
    # other bytes under the old name: a new output name, the delivered one stays
    drop(inbox / "a" / "shot.jpg", b"another shot")
    other = custody.claim("a/shot.jpg")
    assert other is not None
    settled = custody.deliver(other, 2, outbox, "a/shot.png", b"other output", "move")
    assert settled is not None and settled.output == outbox / "a" / "shot-2.png"
    assert (outbox / "a" / "shot.png").read_bytes() == b"grey backdrop"
    # an output a user replaced by hand is not the input's own any more
    (outbox / "a" / "shot.png").write_bytes(b"retouched by hand")
    drop(inbox / "a" / "shot.jpg", b"the shot")
    third = custody.claim("a/shot.jpg")
    assert third is not None
    settled = custody.deliver(third, 3, outbox, "a/shot.png", b"white again", "move")
    assert settled is not None and settled.output == outbox / "a" / "shot-3.png"
    assert (outbox / "a" / "shot.png").read_bytes() == b"retouched by hand"


def test_without_noreplace_or_links_names_are_reserved_and_only_a_real_clash_is_renamed(
        share: tuple[Path, Path]) -> None:
    """An SMB-like share: outputs and originals keep their plain names when nothing clashes (an exclusive
    create reserves the name); only a real clash gets a name unique by construction or the next number."""
    inbox, outbox = share
    drop(inbox / "photo.jpg", b"new")
    custody = Custody(inbox, "ws1", "e1", outbox)
    with no_replace_nor_links(inbox):  # the outbox lies on the same filesystem
        claim = custody.claim("photo.jpg")
        assert claim is not None
        settled = custody.deliver(claim, 1, outbox, "photo.png", b"out 1", "move")
        assert settled is not None and settled.parked == inbox / "done" / "photo.jpg"
        assert settled.output == outbox / "photo.png"
        drop(inbox / "photo.jpg", b"newer")
        claim = custody.claim("photo.jpg")
        assert claim is not None
        settled = custody.deliver(claim, 2, outbox, "photo.png", b"out 2", "move")
    assert settled is not None and settled.output == outbox / "photo-2.png"
    assert settled.parked is not None and settled.parked.name.startswith("photo-ws1-")
    assert (outbox / "photo.png").read_bytes() == b"out 1" and (inbox / "done" / "photo.jpg").read_bytes() == b"new"


def test_a_delivery_taken_over_while_filing_files_the_original_once(share: tuple[Path, Path]) -> None:
    """ws1 pauses in the middle of filing (its output is placed); ws2 takes the delivery over. The
    original ends once in done/ (not as x.jpg and x-2.jpg) and the output once in the outbox."""
    inbox, outbox = share
    drop(inbox / "x.jpg", b"original")
    taker = Custody(inbox, "ws2", "e2", outbox)
    taken: list[list[str]] = []

    def pause_while_filing(step: str) -> None:
        if step == "filing" and not taken:
            taken.append(taker.reclaim("ws1"))

    owner = Custody(inbox, "ws1", "e1", outbox, step=pause_while_filing)
    claim = owner.claim("x.jpg")
    assert claim is not None
    settled = owner.deliver(claim, 4, outbox, "x.png", b"output", "move")
    assert taken == [["e1-4: finished"]]
    assert settled is not None and settled.finished and settled.parked is None
    assert settled.handed_over and settled.problem == ""  # delivered here, filed by the taker: 'done'
    assert tree(inbox / "done") == ["x.jpg"] and tree(outbox) == ["x.png"]
    assert not (inbox / ".bgwatch" / "delivering" / "ws1").exists() or tree(inbox / ".bgwatch" / "delivering") == []


def test_subfolder_deliveries_leave_no_folders_behind(share: tuple[Path, Path]) -> None:
    inbox, outbox = share
    custody = Custody(inbox, "ws1", "e1", outbox)
    for i in range(3):
        drop(inbox / "shoot" / f"day{i}" / "p.jpg", f"p{i}".encode())
        claim = custody.claim(f"shoot/day{i}/p.jpg")
        assert claim is not None
        custody.deliver(claim, i, outbox, f"shoot/day{i}/p.png", b"out", "move")
    left = inbox / ".bgwatch" / "delivering"
    assert [p for p in left.rglob("*")] == [left / "ws1"] or [p for p in left.rglob("*")] == []


def test_a_planted_marker_is_quarantined_and_reads_nothing_outside(share: tuple[Path, Path], tmp_path: Path) -> None:
    """Markers are data: one naming a file outside its folder and the outbox (a hash oracle, a stall on
    /proc/self/pagemap), one too large, one not JSON: each is quarantined with its reason, read nothing,
    and its original goes back to the inbox."""
    inbox, outbox = share
    secret = drop(tmp_path / "private" / "key.pem", b"secret")
    plants = {
        "oracle": {"rel": "a.jpg", "disposition": "move", "output": str(secret),
                   "sha256": hashlib.sha256(b"secret").hexdigest()},
        "proc": {"rel": "b.jpg", "disposition": "move", "output_rel": "../../../proc/self/pagemap",
                 "sha256": "0" * 64},
        "huge": "x" * (1 << 17),
        "garbage": "{not json",
    }
    for i, (name, marker) in enumerate(plants.items()):
        box = inbox / ".bgwatch" / "delivering" / "ghost" / f"t-{i}"
        drop(box / f"{name}.jpg", name.encode())
        (box / "marker.json").write_text(marker if isinstance(marker, str) else json.dumps(marker))
    back = Custody(inbox, "ws1", "e1", outbox).reclaim("ghost")
    assert sorted(back) == [f"t-{i}: returned" for i in range(4)] + [] or len(back) == 4
    assert sorted(p.name for p in inbox.glob("*.jpg")) == sorted(f"{n}.jpg" for n in plants)
    reasons = sorted((inbox / ".bgwatch" / "quarantine").glob("*.txt"))
    assert len(reasons) == 4
    text = " ".join(r.read_text() for r in reasons)
    assert "outside" in text and "larger than" in text and "is not a file of the outbox" in text
    assert tree(outbox) == []


def test_a_full_outbox_is_named_and_the_claim_still_holds(share: tuple[Path, Path], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as a full outbox needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        inbox, _ = share
        drop(inbox / "big.jpg", b"original")
        custody = Custody(inbox, "ws1", "e1", small)
        claim = custody.claim("big.jpg")
        assert claim is not None
        with pytest.raises(DeliveryBlocked) as blocked:
            custody.deliver(claim, 1, small, "big.png", os.urandom(256 * 1024), "move")
        assert blocked.value.storage and blocked.value.errno == errno.ENOSPC
        assert "No space left on device" in str(blocked.value) and str(small) in str(blocked.value)
        assert tree(small) == []  # no temp output left behind
        assert tree(inbox) == [".bgwatch/claimed/ws1/big.jpg"]  # the claim holds: no takeover, no failure
        # once there is room, the same claim delivers
        settled = custody.deliver(claim, 1, small, "big.png", b"small output", "move")
        assert settled is not None and settled.finished and (small / "big.png").read_bytes() == b"small output"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_half_done_link_move_is_recognised_without_inode_numbers(share: tuple[Path, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Filing killed between link and unlink leaves one file under two names. Where a mount makes up inode
    numbers (FUSE, SMB noserverino), the two names do not share one: the content decides, so the original
    is filed once (done/x.jpg), not twice (x.jpg and x-2.jpg)."""
    inbox, _ = share
    src, done = inbox / "held", inbox / "done"
    drop(src / "x.jpg", b"the original")
    done.mkdir()
    os.link(src / "x.jpg", done / "x.jpg")  # the link happened, the unlink did not
    monkeypatch.setattr(fileid, "same_file", lambda a, b: False)  # inode numbers that never match
    with safefs.Folder.open_root(src) as a, safefs.Folder.open_root(done) as b:
        assert safefs.move_to_free_name(a, "x.jpg", b, "x.jpg", unique_tag="ws1-000000") == "x.jpg"
    assert tree(done) == ["x.jpg"] and not (src / "x.jpg").exists()
    # two different files under those names are never taken for one
    drop(src / "y.jpg", b"one")
    drop(done / "y.jpg", b"two")
    with safefs.Folder.open_root(src) as a, safefs.Folder.open_root(done) as b:
        assert safefs.move_to_free_name(a, "y.jpg", b, "y.jpg", unique_tag="ws1-000000") == "y-2.jpg"


def test_deliveries_waiting_for_storage_back_off_and_give_up_in_the_end() -> None:
    from bgwatch.retries import MAX_DELAY, Retries

    retries: Retries[str] = Retries(give_up_seconds=300)
    assert retries.add(7, "job", "outbox: No space left on device (ENOSPC)", errno.ENOSPC, 0.0) == (1, 2.0)
    assert retries.due(1.0) == [] and retries.due(2.0) == [("job", False)]
    assert retries.due(100.0) == []  # being tried: not handed out twice
    delays = [retries.add(7, "job", "again", errno.ENOSPC, 0.0)[1] for _ in range(8)]
    assert delays == [4.0, 8.0, 16.0, 32.0, MAX_DELAY, MAX_DELAY, MAX_DELAY, MAX_DELAY]
    assert retries.due(400.0) == [("job", True)]  # past give_up_seconds since the first failure: the last try
    assert retries.errors == {"ENOSPC": 9} and "run 7: again" in retries.problems()[0]
    assert retries.clear(7) and not retries.clear(7) and len(retries) == 0
