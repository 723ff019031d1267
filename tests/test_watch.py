"""The watcher: filters, the stability rule on a fake clock, and real watchdog observers (inotify and
polling) on real folders, including the failures it must recover from by itself."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath

import pytest

from bgwatch.config import InboxConfig, WatchSettings
from bgwatch.sidecars import file_kind, is_ignored, is_rules_file
from bgwatch.watch import InboxWatcher, StabilityTracker

# ------------------------------------------------------------------ filters


@pytest.mark.parametrize(
    "rel",
    [".hidden.jpg", "._photo.jpg", ".DS_Store", "Thumbs.db", "thumbs.db", "desktop.ini", "~$report.jpg",
     "photo.jpg.part", "photo.jpg.crdownload", ".syncthing.photo.jpg.tmp", ".photo.jpg.Ab12Cd",
     "photo.jpg.tmp", "done/photo.jpg", "failed/photo.jpg", "failed/photo.jpg.error.txt",
     ".bgwatch/claimed/ws1/photo.jpg", ".bgwatch/heartbeats/ws1", "sub/.hidden/photo.jpg",
     ".git/photo.jpg", "@eaDir/photo.jpg", "sub/.photo.yaml", ".bgwatch.yml"],
)
def test_ignored(rel: str) -> None:
    assert is_ignored(PurePath(rel))


@pytest.mark.parametrize(
    "rel, kind",
    [("photo.jpg", "image"), ("PHOTO.JPEG", "image"), ("sub/done/photo.png", "image"),
     ("a/failed/b.webp", "image"), ("x.tif", "image"), ("photo.yaml", "sidecar"),
     ("photo.jpg.yml", "sidecar"), (".bgwatch.yaml", "rules"), ("sub/deep/.bgwatch.yaml", "rules"),
     ("notes.txt", None), ("donefile.jpg", "image")],
)
def test_taken(rel: str, kind: str | None) -> None:
    assert not is_ignored(PurePath(rel))
    assert file_kind(PurePath(rel)) == kind
    assert is_rules_file(PurePath(rel)) == (kind == "rules")


def test_rules_files_in_ignored_places_are_ignored() -> None:
    assert is_ignored(PurePath("done/.bgwatch.yaml"))
    assert is_ignored(PurePath(".hidden/.bgwatch.yaml"))


# ------------------------------------------------------------------ stability, fake clock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_once_size_and_mtime_hold_for_the_settle_time(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(2.0, clock)
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x" * 10)
    tracker.hint(f)
    assert tracker.ready() == []
    clock.now += 1.9
    assert tracker.ready() == []
    with f.open("ab") as fh:  # still growing: the clock starts again
        fh.write(b"more")
    tracker.hint(f)  # its modified event
    clock.now += 0.2
    assert tracker.ready() == []
    clock.now += 1.9
    assert tracker.ready() == []
    clock.now += 0.5  # the next look (every check_seconds) after the settle time
    assert tracker.ready() == [f]
    clock.now += 10
    tracker.hint(f)
    assert tracker.ready() == []  # once only
    assert tracker.pending() == 0


def test_a_change_no_event_told_of_is_still_seen_in_time(tmp_path: Path) -> None:
    """Between events a file is looked at only every check_seconds, which may only delay it."""
    clock = Clock()
    tracker = StabilityTracker(2.0, clock, check_seconds=0.5)
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x" * 10)
    tracker.hint(f)
    tracker.ready()
    clock.now += 1.9
    assert tracker.ready() == []
    with f.open("ab") as fh:  # on a share: no event
        fh.write(b"more")
    for _ in range(22):  # 2.2 s in 0.1 s steps: never ready, however the looks fall
        clock.now += 0.1
        assert tracker.ready() == []
    clock.now += 0.5
    assert tracker.ready() == [f]


def test_on_a_local_disk_a_file_unchanged_since_its_ctime_for_the_settle_time_is_ready_at_once(
        tmp_path: Path) -> None:
    """A file there before the daemon started: its ctime, stamped by this kernel, already says it has not
    changed for the settle time. Only on the inbox's own local device (not on a share mounted below it), and
    never by its mtime, which copy tools set to the past on a file they are writing."""
    old = tmp_path / "old.jpg"
    old.write_bytes(b"o")
    wall = Clock()
    wall.now = os.stat(old).st_ctime + 2.1  # looked at 2.1 s after its last change
    here = os.stat(tmp_path).st_dev
    for device, ready in ((None, []), (here + 1, []), (here, [old])):  # a share below the inbox: another device
        tracker = StabilityTracker(2.0, Clock(), wall_clock=wall)
        tracker.kernel_device = device
        tracker.hint(old)
        assert tracker.ready() == ready
    fresh, copied = tmp_path / "fresh.jpg", tmp_path / "copied.jpg"
    fresh.write_bytes(b"f")
    copied.write_bytes(b"c")
    os.utime(copied, ns=(1, 1))  # cp -p: an mtime in 1970 on bytes just written
    clock = Clock()
    tracker = StabilityTracker(2.0, clock)  # the real wall clock
    tracker.kernel_device = here
    tracker.hint(fresh)
    tracker.hint(copied)
    assert tracker.ready() == []
    clock.now += 2.1
    assert tracker.ready() == [copied, fresh]


def test_a_wall_clock_step_turns_the_ctime_short_cut_off(tmp_path: Path) -> None:
    clock = Clock()
    wall = Clock()
    wall.now = time.time()
    tracker = StabilityTracker(2.0, clock, wall_clock=wall)
    tracker.kernel_device = os.stat(tmp_path).st_dev
    f = tmp_path / "a.jpg"
    assert tracker.ready() == []
    f.write_bytes(b"a")
    tracker.hint(f)
    wall.now += 3600  # stepped an hour ahead: every file would look an hour old
    assert tracker.ready() == []
    clock.now += 2.1
    wall.now += 2.1
    assert tracker.ready() == [f]


def test_a_ctime_in_whole_seconds_counts_from_the_end_of_its_second() -> None:
    from bgwatch.stability import _changed_at

    assert _changed_at(1_700_000_000_000_000_000) == 1_700_000_001.0  # truncated to the second it fell in
    assert abs(_changed_at(1_700_000_000_123_456_789) - 1_700_000_000.143456789) < 1e-6  # a clock tick


@pytest.mark.parametrize("fstype, local", [("ext4", True), ("xfs", True), ("tmpfs", True), ("nfs4", False),
                                           ("cifs", False), ("fuse.sshfs", False), ("fuse", False), ("9p", False)])
def test_only_local_filesystems_count_as_stamped_by_this_kernel(tmp_path: Path, fstype: str, local: bool) -> None:
    from bgwatch.watch import _kernel_stamped

    mountinfo = (f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                 f"40 22 0:50 / {tmp_path} rw,relatime - {fstype} server:/share rw\n")
    assert _kernel_stamped(tmp_path / "inbox", mountinfo) is local


def settled_once(tmp_path: Path) -> tuple[Clock, StabilityTracker, Path]:
    """One file, seen, left alone for the settle time, and reported ready once."""
    clock = Clock()
    tracker = StabilityTracker(1.0, clock)
    f = tmp_path / "a.jpg"
    f.write_bytes(b"one")
    tracker.hint(f)
    tracker.ready()
    clock.now += 1
    assert tracker.ready() == [f]
    return clock, tracker, f


def test_a_changed_file_is_ready_again_and_a_vanished_one_dropped(tmp_path: Path) -> None:
    clock, tracker, f = settled_once(tmp_path)
    f.write_bytes(b"two, longer")
    tracker.hint(f)
    assert tracker.ready() == []
    clock.now += 1
    assert tracker.ready() == [f]
    f.unlink()
    tracker.recheck_all()
    assert tracker.ready() == [] and len(tracker) == 0


def test_forget_then_seen_again_is_ready_again(tmp_path: Path) -> None:
    clock, tracker, f = settled_once(tmp_path)
    tracker.forget(f)
    tracker.hint(f)
    tracker.ready()
    clock.now += 1
    assert tracker.ready() == [f]


def test_a_rename_back_into_place_counts_as_reappearing(tmp_path: Path) -> None:
    """Same size and mtime, but it went away and came back (a claim returned): report it again."""
    clock, tracker, f = settled_once(tmp_path)
    os.rename(f, tmp_path / "elsewhere")
    time.sleep(0.01)  # ctime has a clock of its own
    os.rename(tmp_path / "elsewhere", f)
    tracker.hint(f)
    tracker.ready()
    clock.now += 1
    assert tracker.ready() == [f]


def test_a_local_writers_close_makes_the_file_ready_at_the_first_look(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(2.0, clock)  # default quick_seconds: a close-after-write is proof enough
    f = tmp_path / "a.jpg"
    f.write_bytes(b"whole")
    tracker.hint(f, closed=True)
    assert tracker.ready() == [f]
    g = tmp_path / "b.jpg"  # no close seen (polling, or a move in from another folder): the settle time
    g.write_bytes(b"whole")
    tracker.hint(g)
    assert tracker.ready() == []
    clock.now += 1.9
    assert tracker.ready() == []
    clock.now += 0.6  # looked at again check_seconds (0.5) after the last look
    assert tracker.ready() == [g]


def test_two_closes_before_the_first_look_get_the_settle_time(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(2.0, clock)
    f = tmp_path / "a.jpg"
    f.write_bytes(b"chunk 1, chunk 2")
    tracker.hint(f, closed=True)
    tracker.hint(f, closed=True)  # a writer that closes between chunks
    assert tracker.ready() == []
    clock.now += 2.1
    assert tracker.ready() == [f]


def test_a_close_wakes_whoever_waits_for_ready_files(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    wake = threading.Event()
    watcher = InboxWatcher([inbox_config(inbox, False)], WatchSettings(settle_seconds=2.0), wake=wake)
    with watcher:
        assert watcher.status()[0].observer == "inotify"
        wake.clear()
        (inbox / "a.jpg").write_bytes(b"whole")
        assert wake.wait(10), "the close-after-write did not wake the intake"
        assert [path for _, path in watcher.poll_ready()] == [inbox / "a.jpg"]


def test_a_rename_holds_the_events_behind_it_for_milliseconds_not_half_a_second(tmp_path: Path) -> None:
    """watchdog waits 0.5 s by default to pair a rename's two halves, holding back every event behind it;
    claims and deliveries are renames. This fails if a watchdog release moves the delay elsewhere."""
    from bgwatch.observers import MOVE_PAIRING_SECONDS

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher = InboxWatcher([inbox_config(inbox, False)], WatchSettings(settle_seconds=2.0))
    with watcher:
        [w] = watcher._watches
        assert w.observer is not None
        [emitter] = w.observer.emitters
        queue = emitter._inotify._move_event_grouper._queue  # type: ignore[attr-defined]
        assert queue.delay == MOVE_PAIRING_SECONDS
        (inbox / "a.jpg").write_bytes(b"whole")
        os.rename(inbox / "a.jpg", inbox / "b.jpg")  # still paired: one move, taken under its new name
        deadline = time.monotonic() + 10
        got: list[Path] = []
        while not got and time.monotonic() < deadline:
            got = [path for _, path in watcher.poll_ready()]
            time.sleep(0.02)
        assert got == [inbox / "b.jpg"]


def test_close_after_write_shortens_the_wait(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(5.0, clock, quick_seconds=0.5)
    f = tmp_path / "a.jpg"
    f.write_bytes(b"whole")
    tracker.hint(f)
    tracker.hint(f, closed=True)
    assert tracker.ready() == []  # a second look is always needed
    clock.now += 0.5
    assert tracker.ready() == [f]


def test_written_again_after_its_close_gets_the_full_wait(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(5.0, clock, quick_seconds=0.5)
    f = tmp_path / "a.jpg"
    f.write_bytes(b"chunk 1")
    tracker.hint(f, closed=True)
    tracker.ready()
    with f.open("ab") as fh:  # a writer that closes between chunks
        fh.write(b"chunk 2")
    clock.now += 0.6
    assert tracker.ready() == []
    tracker.hint(f, closed=True)  # its second close
    clock.now += 0.6
    assert tracker.ready() == []
    clock.now += 4.5
    assert tracker.ready() == [f]


def test_symlinks_and_folders_are_never_ready(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(0.0, clock)
    target = tmp_path / "outside.jpg"
    target.write_bytes(b"x")
    link = tmp_path / "link.jpg"
    link.symlink_to(target)
    (tmp_path / "dir.jpg").mkdir()
    tracker.hint(link)
    tracker.hint(tmp_path / "dir.jpg")
    assert tracker.ready() == [] and len(tracker) == 0


# ------------------------------------------------------------------ real observers

MODES = [pytest.param(False, id="inotify"), pytest.param(True, id="polling")]


def inbox_config(path: Path, poll: bool) -> InboxConfig:
    return InboxConfig(path=path, outbox=path.parent / f"{path.name}-out", poll=poll)


class Harness:
    """A started watcher plus everything poll_ready() has returned so far."""

    def __init__(self, watcher: InboxWatcher) -> None:
        self.watcher = watcher
        self.pairs: list[tuple[Path, Path]] = []  # (inbox path, file)
        self.got: list[Path] = []

    def poll(self) -> list[Path]:
        for inbox, path in self.watcher.poll_ready():
            self.pairs.append((inbox.path, path))
            self.got.append(path)
        return self.got

    def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if condition():
                return
            time.sleep(0.03)
        raise AssertionError(f"not met within {timeout} s; got {self.got}; status {self.watcher.status()}")

    def until_got(self, *paths: Path, timeout: float = 10.0) -> None:
        self.until(lambda: all(p in self.got for p in paths), timeout)

    def keep_polling(self, seconds: float) -> None:
        """For 'never' and 'only once' checks: poll on for a while (through rescans)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            time.sleep(0.03)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    started: list[InboxWatcher] = []

    def make(*inboxes: InboxConfig, settle: float = 0.3, rescan: float = 30.0) -> Harness:
        watcher = InboxWatcher(list(inboxes), WatchSettings(settle_seconds=settle, rescan_seconds=rescan))
        started.append(watcher)
        watcher.start()
        return Harness(watcher)

    yield make
    for watcher in started:
        watcher.stop()


@pytest.mark.parametrize("poll", MODES)
def test_files_present_at_start_are_taken_and_ignored_ones_are_not(
    tmp_path: Path, poll: bool, watch: Callable[..., Harness]
) -> None:
    inbox = tmp_path / "inbox"
    wanted = [inbox / rel for rel in
              ("a.jpg", "sub/b.png", "sub/b.yaml", "sub/.bgwatch.yaml", "sub/done/c.jpg")]
    unwanted = [inbox / rel for rel in
                ("done/x.jpg", "failed/y.jpg", ".bgwatch/claimed/h/z.jpg", ".hidden.jpg",
                 "Thumbs.db", "p.jpg.part", "notes.txt", ".syncthing.q.jpg.tmp")]
    for f in wanted + unwanted:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"data")
    h = watch(inbox_config(inbox, poll))
    assert h.watcher.healthy()
    assert not h.watcher.settled()
    h.until_got(*wanted)
    h.until(h.watcher.settled)
    assert sorted(h.got) == sorted(wanted)


@pytest.mark.parametrize("poll", MODES)
def test_a_file_written_in_chunks_is_not_taken_early(
    tmp_path: Path, poll: bool, watch: Callable[..., Harness]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    h = watch(inbox_config(inbox, poll), settle=1.0)
    target = inbox / "big.jpg"
    finished: list[float] = []

    def writer() -> None:  # one open file, a chunk every 0.5 s for 3 s: a slow copy from a share
        with target.open("wb") as fh:
            for _ in range(6):
                fh.write(os.urandom(64 * 1024))
                fh.flush()
                time.sleep(0.5)
        finished.append(time.monotonic())

    thread = threading.Thread(target=writer)
    thread.start()
    h.until(lambda: bool(h.got), timeout=15)
    taken = time.monotonic()
    thread.join()
    # A chunk lands every 0.5 s: a file taken while still written would be seen at least a quarter of that
    # before the writer closed it (the close itself makes it ready at once on inotify).
    assert finished and taken > finished[0] - 0.25, "taken while it was still being written"
    assert target.stat().st_size == 6 * 64 * 1024
    h.keep_polling(0.5)
    assert h.got == [target]


def test_a_writer_that_appends_under_a_temporary_name_is_taken_whole_after_its_rename(
    tmp_path: Path, watch: Callable[..., Harness]
) -> None:
    """A local close is proof of a whole file, so a writer that closes between chunks writes under a
    temporary name (ignored) and renames at the end: the documented contract (README, "Dropping files")."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    h = watch(inbox_config(inbox, False), settle=1.0)
    partial = inbox / "appended.jpg.part"
    for _ in range(6):  # open, append, close, every 0.35 s
        with partial.open("ab") as fh:
            fh.write(os.urandom(32 * 1024))
        h.keep_polling(0.35)
        assert h.got == [], "a temporary name was taken"
    os.rename(partial, inbox / "appended.jpg")
    h.until_got(inbox / "appended.jpg")
    assert (inbox / "appended.jpg").stat().st_size == 6 * 32 * 1024


def test_a_closed_or_moved_in_file_skips_most_of_the_settle_time(
    tmp_path: Path, watch: Callable[..., Harness]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    h = watch(inbox_config(inbox, False), settle=60.0)  # a settle time no test would wait out
    (inbox / "copied.jpg").write_bytes(b"whole file")
    staged = tmp_path / "staging.jpg"
    staged.write_bytes(b"moved in")
    os.rename(staged, inbox / "moved.jpg")
    h.until_got(inbox / "copied.jpg", inbox / "moved.jpg", timeout=30)  # long before the 60 s settle


@pytest.mark.parametrize("poll", MODES)
def test_a_file_the_events_missed_is_found_by_the_rescan(
    tmp_path: Path, poll: bool, watch: Callable[..., Harness]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    h = watch(inbox_config(inbox, poll), rescan=1.0)
    [w] = h.watcher._watches  # deafen the live observer, as NFS would: no events, no failure
    assert w.observer is not None and w.handler is not None and w.observed is not None
    w.observer.remove_handler_for_watch(w.handler, w.observed)
    missed = inbox / "sub" / "missed.jpg"
    missed.parent.mkdir()
    missed.write_bytes(b"data")
    h.until_got(missed, timeout=5)
    assert h.watcher.status()[0].restarts == 0  # found by the rescan, not by a restart


@pytest.mark.parametrize("poll", MODES)
def test_a_rename_inside_the_inbox_is_taken_once_under_its_new_name(
    tmp_path: Path, poll: bool, watch: Callable[..., Harness]
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    old = inbox / "IMG_0001.jpg"
    old.write_bytes(b"data")  # there before the watcher: found by its scan, so the settle time applies
    h = watch(inbox_config(inbox, poll), settle=0.5, rescan=0.4)
    h.keep_polling(0.2)
    new = inbox / "sub" / "product-front.jpg"
    os.rename(old, new)
    h.until_got(new)
    h.keep_polling(1.0)  # through several rescans
    assert h.got == [new]


@pytest.mark.parametrize("poll", MODES)
def test_a_deleted_and_recreated_inbox_folder_is_watched_again(
    tmp_path: Path, poll: bool, watch: Callable[..., Harness]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    h = watch(inbox_config(inbox, poll))  # rescan 30 s: only events or a restart can find files
    (inbox / "before.jpg").write_bytes(b"1")
    h.until_got(inbox / "before.jpg")
    shutil.rmtree(inbox)
    h.until(lambda: not h.watcher.healthy())
    h.keep_polling(0.3)  # missing for a while: no exception, just unhealthy
    assert "inbox" in h.watcher.status()[0].problem
    inbox.mkdir()
    h.until(h.watcher.healthy)
    (inbox / "after.jpg").write_bytes(b"2")
    h.until_got(inbox / "after.jpg")
    assert h.watcher.status()[0].restarts >= 1


@pytest.mark.parametrize("poll", MODES)
def test_a_killed_observer_is_restarted(tmp_path: Path, poll: bool, watch: Callable[..., Harness]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    h = watch(inbox_config(inbox, poll))
    [w] = h.watcher._watches
    killed = w.observer
    assert killed is not None
    killed.stop()  # behind the watcher's back, as an exception in a handler would
    killed.join(timeout=5)
    h.until(lambda: h.watcher.status()[0].restarts == 1)
    assert h.watcher.healthy() and w.observer is not killed
    (inbox / "later.jpg").write_bytes(b"data")
    h.until_got(inbox / "later.jpg")


def test_a_missing_inbox_is_retried_and_never_raises(tmp_path: Path, watch: Callable[..., Harness]) -> None:
    present, missing = tmp_path / "present", tmp_path / "not-yet"
    present.mkdir()
    h = watch(inbox_config(present, False), inbox_config(missing, False))
    assert not h.watcher.healthy()
    [ok, bad] = h.watcher.status()
    assert ok.healthy and not bad.healthy and "missing" in bad.problem
    (present / "a.jpg").write_bytes(b"a")
    h.until_got(present / "a.jpg")  # the other inbox goes on
    missing.mkdir()
    (missing / "b.jpg").write_bytes(b"b")
    h.until_got(missing / "b.jpg")
    assert h.watcher.healthy()


def test_a_nested_inbox_owns_its_files(tmp_path: Path, watch: Callable[..., Harness]) -> None:
    outer, inner = tmp_path / "outer", tmp_path / "outer" / "special"
    inner.mkdir(parents=True)
    h = watch(inbox_config(outer, False), inbox_config(inner, False))
    (outer / "o.jpg").write_bytes(b"o")
    (inner / "i.jpg").write_bytes(b"i")
    h.until(lambda: len(h.got) >= 2)
    h.keep_polling(0.5)
    assert sorted(h.pairs) == sorted([(outer, outer / "o.jpg"), (inner, inner / "i.jpg")])


def test_forget_lets_a_file_be_reported_again(tmp_path: Path, watch: Callable[..., Harness]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    h = watch(inbox_config(inbox, False), rescan=0.3)
    f = inbox / "a.jpg"
    f.write_bytes(b"a")
    h.until_got(f)
    h.watcher.forget(f)  # e.g. no room in the window: leave it for later
    h.until(lambda: h.got.count(f) == 2)


def test_an_event_the_handler_chokes_on_is_logged_not_raised(tmp_path: Path) -> None:
    """An exception escaping a handler would kill the observer thread: it must be caught and logged."""
    from loguru import logger
    from watchdog.events import FileCreatedEvent

    from bgwatch.watch import _InboxEvents

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher = InboxWatcher([inbox_config(inbox, False)], WatchSettings(settle_seconds=0.1))
    [w] = watcher._watches
    handler = _InboxEvents(w, lambda _w, _p: None)
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="ERROR")
    try:
        handler.dispatch(FileCreatedEvent(src_path=12345))  # type: ignore[arg-type]  # not a path
    finally:
        logger.remove(sink)
    assert any("carrying on" in m and "Traceback" in m for m in messages)
    handler.dispatch(FileCreatedEvent(src_path=str(inbox / "fine.jpg")))
    assert len(w.tracker) == 1  # and the next event is handled as usual


def _inotify_watches() -> dict[int, int]:
    """inode -> event mask of every inotify watch of this process, as the kernel lists them (/proc/self/fdinfo)."""
    watches: dict[int, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("inotify wd:"):
                fields = dict(part.split(":", 1) for part in line.split()[1:] if ":" in part)
                watches[int(fields["ino"], 16)] = int(fields["mask"], 16)
    return watches


def _inotify_watched_inodes() -> set[int]:
    return set(_inotify_watches())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")
def test_bgwatchs_custody_folder_gets_no_inotify_watch(tmp_path: Path) -> None:
    """Claims, fences, markers and deliveries are never input: an inotify watch on .bgwatch/ would turn each
    job's steps there into events two watchdog threads read and throw away. Every other folder is watched,
    done/, failed/ and a nested inbox's root included (see the next test for why)."""
    outer = tmp_path / "outer"
    own = [outer / rel for rel in (".bgwatch/claimed/ws1", ".bgwatch/delivering/ws1/tok")]
    users = [outer / rel for rel in ("sub", "sub/deep", "sub/done", "done/sub", "failed")]
    nested = outer / "special"
    for folder in [*own, *users, nested / "inner"]:
        folder.mkdir(parents=True)
    watcher = InboxWatcher([inbox_config(outer, False), inbox_config(nested, False)],
                           WatchSettings(settle_seconds=0.2))
    with watcher:
        later = outer / "sub" / "later"
        later.mkdir()  # made while watched: watched too
        (outer / ".bgwatch" / "delivering" / "ws1" / "tok2").mkdir()  # and this one not
        ino = lambda p: os.stat(p).st_ino  # noqa: E731
        deadline = time.monotonic() + 10
        while ino(later) not in _inotify_watched_inodes() and time.monotonic() < deadline:
            time.sleep(0.02)
        watched = _inotify_watched_inodes()
        assert all(ino(p) in watched for p in [outer, *users, later, nested, nested / "inner"])
        assert not any(ino(p) in watched for p in [outer / ".bgwatch", *own,
                                                   outer / ".bgwatch" / "delivering" / "ws1" / "tok2"])
        (outer / "sub" / "deep" / "a.jpg").write_bytes(b"a")
        got: list[Path] = []
        while not got and time.monotonic() < deadline:
            got = [path for _, path in watcher.poll_ready()]
            time.sleep(0.02)
        assert got == [outer / "sub" / "deep" / "a.jpg"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")
def test_a_folder_moved_into_a_nested_inbox_is_not_heard_where_it_was(tmp_path: Path) -> None:
    """A folder moved into a folder the outer watch did not watch would keep its watch under its old path
    (nothing pairs the move): a file closed in it would read as closed at the old path, and the quick path
    would take a same-named file still being written there. The nested inbox's root is watched, so the move
    pairs and the old path stays quiet."""
    outer, out = tmp_path / "in", tmp_path / "out"
    nested = outer / "sub"
    (outer / "shoot").mkdir(parents=True)
    nested.mkdir()
    watcher = InboxWatcher([InboxConfig(outer, out), InboxConfig(nested, tmp_path / "out2")],
                           WatchSettings(settle_seconds=30.0, rescan_seconds=3600))
    with watcher:
        ino = lambda p: os.stat(p).st_ino  # noqa: E731
        deadline = time.monotonic() + 10
        while ino(outer / "shoot") not in _inotify_watched_inodes() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.rename(outer / "shoot", nested / "shoot")  # the user files a folder into the nested inbox
        (outer / "shoot").mkdir()  # and makes a new one of that name in the outer inbox
        while ino(outer / "shoot") not in _inotify_watched_inodes() and time.monotonic() < deadline:
            time.sleep(0.02)
        with open(outer / "shoot" / "a.jpg", "wb") as copying:  # a copy in progress
            copying.write(b"\xff\xd8" + b"x" * 1000)
            copying.flush()
            seen = watcher.poll_ready()
            (nested / "shoot" / "a.jpg").write_bytes(b"other")  # closed in the moved folder
            (outer / "shoot" / "b.jpg").write_bytes(b"b")  # closed after it, in the outer inbox
            while not any(path.name == "b.jpg" for _, path in seen) and time.monotonic() < deadline:
                seen += watcher.poll_ready()
                time.sleep(0.02)
        assert [path for _, path in seen if path.name == "b.jpg"] == [outer / "shoot" / "b.jpg"]
        assert outer / "shoot" / "a.jpg" not in [path for _, path in seen]


def test_files_there_before_the_watch_are_ready_at_its_first_look_on_a_local_disk(tmp_path: Path) -> None:
    """run --once over files copied in before it started: they wait no settle time (the watcher's own clock
    is frozen here, so only their ctime can make them ready)."""
    from bgwatch.watch import _kernel_stamped

    if not _kernel_stamped(tmp_path):
        pytest.skip("the test folder is not on a local filesystem")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jpg").write_bytes(b"a")
    deadline = time.monotonic() + 10
    while time.time() - os.stat(inbox / "a.jpg").st_ctime < 0.4 and time.monotonic() < deadline:
        time.sleep(0.02)
    watcher = InboxWatcher([inbox_config(inbox, False)], WatchSettings(settle_seconds=0.3), Clock())
    with watcher:
        assert [path for _, path in watcher.poll_ready()] == [inbox / "a.jpg"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")
def test_inotify_is_asked_for_no_open_or_read_events(tmp_path: Path) -> None:
    """Each custody step opens the inbox folder: with IN_OPEN and IN_CLOSE_NOWRITE asked for, every job made
    several events that watchdog's thread read and dropped."""
    in_open, in_close_nowrite, in_access = 0x20, 0x10, 0x1
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    with InboxWatcher([inbox_config(inbox, False)], WatchSettings(settle_seconds=0.2)):
        masks = [m for ino, m in _inotify_watches().items() if ino in (os.stat(inbox).st_ino,
                                                                        os.stat(inbox / "sub").st_ino)]
    assert len(masks) == 2
    assert not any(m & (in_open | in_close_nowrite | in_access) for m in masks)
    assert all(m & 0x8 and m & 0x80 and m & 0x100 for m in masks)  # close-after-write, moved in, created
