"""Watching the inboxes: which files are there, and which of them are complete.

Events are hints. One real watchdog observer per inbox (inotify, or polling for network drives, where
inotify does not see other hosts' writes) feeds paths to a StabilityTracker; an initial scan at start
and a full rescan every `rescan_seconds` are the truth, so a missed event delays a file, never loses it.
A file is ready once its size and mtime have stayed the same for `settle_seconds`.

The watcher supervises its observers: a dead observer thread, or a watch that ended because the inbox
folder was deleted, moved or replaced, is restarted by the next `poll_ready()`. A missing inbox folder is
retried there too and reported by `healthy()`; it never raises.

What `poll_ready()` reports, each once when stable: images, sidecars and `.bgwatch.yaml` rule files (a dot
file that `sidecars.is_ignored` lets through); `sidecars.file_kind()` tells which. Other files stay with one warning.
Symlinks are never reported: a link could point anywhere on the machine.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from loguru import logger
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch

from bgwatch.claims import WORK_DIR
from bgwatch.config import InboxConfig, WatchSettings
from bgwatch.observers import INOTIFY_LIMITS, halt, native_observer, polling_observer
from bgwatch.sidecars import IMAGE_SUFFIXES, file_kind, is_ignored
from bgwatch.stability import StabilityTracker
from bgwatch.text import shown

# ------------------------------------------------------------------ the watcher


@dataclass(frozen=True, slots=True)
class InboxStatus:
    inbox: InboxConfig
    healthy: bool
    observer: str  # "inotify" | "polling" | "" (none running)
    problem: str  # why it is unhealthy ("" when healthy)
    restarts: int  # observers restarted after a failure
    tracked: int  # files being watched for stability


@dataclass(eq=False)
class _Watch:
    inbox: InboxConfig
    root: Path
    tracker: StabilityTracker
    nested: tuple[Path, ...]  # roots of other inboxes inside this one: theirs, not ours
    observer: BaseObserver | None = None
    handler: FileSystemEventHandler | None = None
    observed: ObservedWatch | None = None
    kind: str = ""
    force_polling: bool = False  # inotify refused (watch or instance limits): polling instead
    root_id: tuple[int, int] | None = None
    root_gone: threading.Event = field(default_factory=threading.Event)
    started_once: bool = False
    restarts: int = 0
    problem: str = "not started"
    retry_at: float = 0.0
    next_rescan: float = 0.0

    def rel(self, path: Path) -> PurePath | None:
        """Path relative to the root, or None if it is not ours to report."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        if is_ignored(rel) or any(n == path or n in path.parents for n in self.nested):
            return None
        return rel

    def unwatched(self, folder: bytes) -> bool:
        """Folders that get no inotify watch: bgwatch's custody folder at the root (.bgwatch/: claims,
        fences, markers, deliveries; never input, and each job's steps there would be events two watchdog
        threads read and throw away). Only that one: a folder a user moves into an unwatched folder keeps its
        watch under its old path (nothing pairs the move), so events inside it would be reported where it
        was; users move folders into done/, failed/ or a nested inbox, never into bgwatch's custody."""
        custody = os.fsencode(self.root) + b"/" + os.fsencode(WORK_DIR)
        return folder == custody or folder.startswith(custody + b"/")


# The events _InboxEvents acts on. Given to watchdog, which then asks inotify for no others: no open/close-
# without-write events, of which bgwatch's own work makes several per job (every custody step opens the
# inbox folder), each read and parsed by watchdog's thread only to be dropped.
HANDLED = (FileMovedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileAttribEvent,
           FileDeletedEvent, DirDeletedEvent, DirCreatedEvent)


class _InboxEvents(FileSystemEventHandler):
    """Turns one inbox's watchdog events into hints. Never raises: that would kill the observer thread."""

    def __init__(self, watch: _Watch, rescan_dir: Callable[[_Watch, Path], None],
                 wake: threading.Event | None = None) -> None:
        self.watch = watch
        self.rescan_dir = rescan_dir
        self.wake = wake

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._handle(event)
        except Exception:  # the observer thread must survive anything; the rescan catches up
            logger.exception("error handling {} in inbox {}; carrying on", event, self.watch.root)

    def _handle(self, event: FileSystemEvent) -> None:
        w = self.watch
        src = Path(os.fsdecode(event.src_path)) if event.src_path else None
        if isinstance(event, FileMovedEvent):
            dest = Path(os.fsdecode(event.dest_path)) if event.dest_path else None
            if src is not None:
                w.tracker.forget(src)
            if dest is not None and w.rel(dest) is not None:
                w.tracker.hint(dest, closed=True)  # a rename delivers a whole file
                self._wake()
        elif isinstance(event, FileClosedEvent):
            if src is not None and w.rel(src) is not None:
                w.tracker.hint(src, closed=True)
                self._wake()
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent, FileAttribEvent)):
            if src is not None and w.rel(src) is not None:
                w.tracker.hint(src)
        elif isinstance(event, FileDeletedEvent):
            if src is not None:
                w.tracker.forget(src)
        elif isinstance(event, DirDeletedEvent):
            if src is not None:
                if src == w.root:
                    w.root_gone.set()
                w.tracker.forget_under(src)
        elif isinstance(event, DirMovedEvent):
            dest = Path(os.fsdecode(event.dest_path)) if event.dest_path else None
            if src is not None:
                if src == w.root:
                    w.root_gone.set()
                w.tracker.forget_under(src)
            if dest is not None and w.rel(dest) is not None:
                self.rescan_dir(w, dest)
        elif isinstance(event, DirCreatedEvent) and src is not None and w.rel(src) is not None:
            self.rescan_dir(w, src)  # files may land in it before its watch exists


    def _wake(self) -> None:
        """A file may be ready now: the intake need not wait for its next tick."""
        if self.wake is not None:
            self.wake.set()




class InboxWatcher:
    """Watches all inboxes and reports each complete file once (see the module docstring).

    `poll_ready()` and `forget()` may be called from any thread; observers run in their own threads.
    """

    RETRY_SECONDS = 1.0  # how often a missing inbox folder or a failed observer is tried again

    def __init__(
        self,
        inboxes: Sequence[InboxConfig],
        settings: WatchSettings,
        clock: Callable[[], float] = time.monotonic,
        *,
        wake: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._wake = wake  # set when an event says a file may be ready (the intake's main loop waits on it)
        self._lock = threading.RLock()
        self._pending_lock = threading.Lock()
        self._pending_dirs: list[tuple[_Watch, Path]] = []
        self._started = False
        self._left: dict[Path, str] = {}  # files seen and not taken, with why (for status and `--once`)
        roots = [Path(os.path.abspath(inbox.path)) for inbox in inboxes]
        self._watches = [
            _Watch(
                inbox=inbox,
                root=root,
                tracker=StabilityTracker(settings.settle_seconds, clock),
                nested=tuple(other for other in roots if root in other.parents),
            )
            for inbox, root in zip(inboxes, roots, strict=True)
        ]

    # -------------------------------------------------------------- public

    def start(self) -> None:
        """Start an observer per inbox and scan each; a missing inbox is retried later, not an error."""
        with self._lock:
            self._started = True
            now = self._clock()
            for w in self._watches:
                self._supervise(w, now)

    def stop(self) -> None:
        with self._lock:
            self._started = False
            for w in self._watches:
                self._stop_observer(w)
                w.problem = "stopped"
                w.retry_at = 0.0

    def __enter__(self) -> InboxWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def poll_ready(self) -> list[tuple[InboxConfig, Path]]:
        """Files that have become stable since the last call (images, sidecars, rule files), each once.

        Also the supervision step: restarts dead observers, retries missing inboxes, runs due rescans.
        """
        with self._lock:
            if not self._started:
                return []
            now = self._clock()
            for w in self._watches:
                self._supervise(w, now)
                if w.observer is not None and now >= w.next_rescan:
                    self._scan(w, w.root)
                    w.tracker.recheck_all()
                    w.next_rescan = now + self.settings.rescan_seconds
            with self._pending_lock:
                pending, self._pending_dirs = self._pending_dirs, []
            for w, folder in pending:
                self._scan(w, folder)
            out: list[tuple[InboxConfig, Path]] = []
            for w in self._watches:
                for path in w.tracker.ready():
                    rel = w.rel(path)
                    if rel is None:
                        continue
                    if file_kind(rel) is None:
                        logger.warning(
                            "{}: not an image ({}) or a sidecar; left where it is",
                            shown(str(path)), ", ".join(sorted(IMAGE_SUFFIXES)),
                        )
                        self._left[path] = "not an image or a sidecar"
                        continue
                    out.append((w.inbox, path))
            return out

    def left(self) -> dict[Path, str]:
        """Files bgwatch saw in the inboxes and will not take (that still exist), with the reason."""
        with self._lock:
            for path in [p for p in self._left if not os.path.lexists(p)]:
                del self._left[path]
            return dict(self._left)

    def _leave(self, path: Path, why: str) -> None:
        if path not in self._left and len(self._left) < 10_000:
            logger.warning("{}: {}; left where it is", shown(str(path)), why)
            self._left[path] = why

    def forget(self, path: Path) -> None:
        """The caller took `path` (claimed it) or set it aside: stop tracking it until it shows up again."""
        path = Path(os.path.abspath(path))
        for w in self._watches:
            w.tracker.forget(path)

    def settled(self) -> bool:
        """Nothing is waiting to become stable: all that the scans and events found has been reported.

        (A missing inbox holds nothing to wait for.) `run --once` stops when this and the rest are idle.
        """
        with self._lock:
            return self._started and all(w.tracker.pending() == 0 for w in self._watches)

    def healthy(self) -> bool:
        """True when every inbox folder exists and has a live observer."""
        with self._lock:
            return self._started and all(w.observer is not None and not w.problem for w in self._watches)

    def status(self) -> list[InboxStatus]:
        with self._lock:
            return [
                InboxStatus(
                    inbox=w.inbox,
                    healthy=w.observer is not None and not w.problem,
                    observer=w.kind if w.observer is not None else "",
                    problem=w.problem,
                    restarts=w.restarts,
                    tracked=len(w.tracker),
                )
                for w in self._watches
            ]

    # -------------------------------------------------------------- supervision

    def _observer_problem(self, w: _Watch) -> str:
        """Why this inbox's observer needs (re)starting; "" when it is fine."""
        obs = w.observer
        if obs is None:
            return w.problem or "not started"
        if not obs.is_alive() or not obs.should_keep_running():
            return "observer thread stopped"
        try:
            emitters = list(obs.emitters)
        except RuntimeError:  # changed while we looked: look again next time
            return ""
        if w.root_gone.is_set() or not emitters or not all(e.is_alive() for e in emitters):
            return "the watch on the inbox folder ended (folder deleted or moved?)"
        try:
            ident = _dir_identity(w.root)
        except OSError as exc:
            return f"inbox folder unavailable: {exc.strerror or exc}"
        if ident != w.root_id:
            return "inbox folder was replaced"
        return ""

    def _supervise(self, w: _Watch, now: float) -> None:
        problem = self._observer_problem(w)
        if not problem:
            return
        if w.observer is not None:
            logger.warning("inbox {}: {}; restarting its watch", w.root, problem)
            self._stop_observer(w)
            w.problem = problem
            w.retry_at = 0.0
        if now < w.retry_at:
            return
        w.retry_at = now + self.RETRY_SECONDS
        try:
            ident = _dir_identity(w.root)
        except OSError as exc:
            self._set_problem(w, f"inbox folder missing or unreadable ({exc.strerror or exc}); retrying")
            return
        try:
            w.observer, w.kind = self._start_observer(w)
        except OSError as exc:
            self._set_problem(w, f"cannot watch the inbox folder: {exc.strerror or exc}; retrying")
            return
        except Exception as exc:  # supervision must outlive any observer failure; it retries
            logger.exception("inbox {}: cannot start an observer", w.root)
            self._set_problem(w, f"cannot watch the inbox folder: {exc}; retrying")
            return
        w.root_id = ident
        w.root_gone.clear()
        w.tracker.kernel_device = ident[0] if _kernel_stamped(w.root) else None
        if w.started_once:
            w.restarts += 1
            logger.info("inbox {}: watching again ({})", w.root, w.kind)
        else:
            logger.info("inbox {}: watching ({})", w.root, w.kind)
        w.started_once = True
        w.problem = ""
        # Whatever happened while nobody watched is found by a full scan, now.
        self._scan(w, w.root)
        w.tracker.recheck_all()
        w.next_rescan = now + self.settings.rescan_seconds

    def _set_problem(self, w: _Watch, problem: str) -> None:
        if problem != w.problem:
            logger.warning("inbox {}: {}", w.root, problem)
        w.problem = problem

    def _start_observer(self, w: _Watch) -> tuple[BaseObserver, str]:
        handler = _InboxEvents(w, self._queue_dir_scan, self._wake)
        while True:
            if w.inbox.poll or w.force_polling:
                observer: BaseObserver = polling_observer(self.settings.settle_seconds)
                kind = "polling"
            else:
                try:
                    observer, kind = native_observer(w.unwatched)
                except OSError as exc:
                    if exc.errno not in INOTIFY_LIMITS:
                        raise
                    self._fall_back_to_polling(w, exc)
                    continue
            try:
                w.handler = handler
                w.observed = observer.schedule(handler, str(w.root), recursive=True, event_filter=list(HANDLED))
                observer.start()
            except OSError as exc:
                halt(observer)
                if kind == "polling" or exc.errno not in INOTIFY_LIMITS:
                    raise
                self._fall_back_to_polling(w, exc)
                continue
            return observer, kind

    @staticmethod
    def _fall_back_to_polling(w: _Watch, exc: OSError) -> None:
        logger.error(
            "inbox {}: inotify refused ({}); polling instead. Raise fs.inotify.max_user_watches "
            "/ max_user_instances to use inotify.", w.root, exc.strerror or exc,
        )
        w.force_polling = True

    def _stop_observer(self, w: _Watch) -> None:
        observer, w.observer = w.observer, None
        if observer is not None:
            halt(observer)

    # -------------------------------------------------------------- scanning

    def _queue_dir_scan(self, w: _Watch, folder: Path) -> None:
        with self._pending_lock:
            self._pending_dirs.append((w, folder))

    def _scan(self, w: _Watch, folder: Path) -> None:
        """Hint every file below `folder` that is ours; unreadable subfolders are skipped with a warning."""
        for path in _walk_files(folder, w.root, w.nested, self._leave):
            w.tracker.hint(path)


# Filesystems on this machine's own disks (or memory): their file times come from this kernel's clock.
KERNEL_STAMPED_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "overlay"})


def _kernel_stamped(root: Path, mountinfo: str | None = None) -> bool:
    """Whether the inbox at `root` is on a local filesystem (stability.StabilityTracker.kernel_device): never a
    network share or a FUSE mount, whose times come from other hosts' clocks or a user-space daemon."""
    from bgwatch import mounts

    text = mounts.read_text("/proc/self/mountinfo") if mountinfo is None else mountinfo
    mount = mounts.mount_of(Path(os.path.realpath(root)), mounts.parse_mountinfo(text))
    return mount is not None and mount.fstype in KERNEL_STAMPED_FS


def _dir_identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(path))
    return st.st_dev, st.st_ino


def _walk_files(folder: Path, root: Path, nested: Iterable[Path],
                leave: Callable[[Path, str], None] | None = None) -> list[Path]:
    nested = tuple(nested)
    found: list[Path] = []
    stack = [folder]
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(here))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            logger.warning("cannot list {}: {}", shown(str(here)), exc.strerror or exc)
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                rel = path.relative_to(root)
            except ValueError:
                continue
            if is_ignored(rel) or path in nested:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                elif entry.is_file(follow_symlinks=False):
                    found.append(path)
                elif leave is not None and file_kind(rel) is not None:
                    leave(path, "a symbolic link, pipe or device, not a file: bgwatch reads only regular files"
                          if not entry.is_symlink() else "a symbolic link: bgwatch never follows links in an inbox")
            except OSError:
                continue
    return found
