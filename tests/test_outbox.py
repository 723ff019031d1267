from __future__ import annotations

import threading
from pathlib import Path

from bgwatch import outbox


def test_atomic_write_never_shows_half_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "big.bin"
    payloads = [bytes([i]) * 4_000_000 for i in range(1, 6)]
    seen: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                continue
            seen.add(len(data))
            assert len(set(data)) <= 1

    thread = threading.Thread(target=reader)
    thread.start()
    for payload in payloads:
        outbox.atomic_write(target, payload)
    stop.set()
    thread.join()
    assert seen <= {4_000_000}, f"a reader saw a partial file: sizes {seen}"
    assert target.read_bytes() == payloads[-1]
    assert [p.name for p in target.parent.iterdir()] == ["big.bin"], "no temp file left behind"


def test_reserve_never_clashes_across_inputs(tmp_path: Path) -> None:
    owners: dict[Path, str] = {}
    box = outbox.Outbox(owners.get)
    first = box.reserve(tmp_path, "sub/photo.jpg", "", ".png")
    second = box.reserve(tmp_path, "sub/photo.png", "", ".png")
    assert first == tmp_path / "sub" / "photo.png"
    assert second == tmp_path / "sub" / "photo-2.png"
    for path, rel in ((first, "sub/photo.jpg"), (second, "sub/photo.png")):
        outbox.atomic_write(path, b"x")
        box.release(path)
        owners[path] = rel
    # reprocessing an input replaces its own output, never the other one's
    assert box.reserve(tmp_path, "sub/photo.png", "", ".png") == second
    assert box.reserve(tmp_path, "sub/photo.jpg", "", ".png") == first
    assert box.reserve(tmp_path, "sub/photo.jpg", "_cut", ".webp") == tmp_path / "sub" / "photo_cut.webp"


def test_failed_gets_the_reason_beside_it(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    claimed = inbox / ".bgwatch" / "claimed" / "h" / "a" / "x.jpg"
    claimed.parent.mkdir(parents=True)
    claimed.write_bytes(b"broken")
    (inbox / "failed" / "a").mkdir(parents=True)
    (inbox / "failed" / "a" / "x.jpg").write_bytes(b"an earlier failure")
    target = outbox.move_to_failed(inbox, claimed, "a/x.jpg", "x.jpg: truncated JPEG")
    assert target == inbox / "failed" / "a" / "x-2.jpg", "an earlier failure is never overwritten"
    assert target.read_bytes() == b"broken"
    note = target.with_name("x-2.jpg.error.txt").read_text()
    assert "truncated JPEG" in note and "bgwatch retry" in note


def test_own_temp_leftovers_are_removed_and_other_hosts_are_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / "sub" / ".photo.png.ws1.abc123.bgwatch-tmp"
    theirs = tmp_path / "sub" / ".photo.png.ws2.def456.bgwatch-tmp"
    mine.parent.mkdir()
    mine.write_bytes(b"half")
    theirs.write_bytes(b"half")
    assert outbox.remove_own_temp_files(tmp_path, "ws1") == 1
    assert not mine.exists() and theirs.exists()
    outbox.atomic_write(tmp_path / "x.png", b"done", owner="ws1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "x.png"]
