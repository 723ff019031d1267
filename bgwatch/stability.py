"""When is a file complete? Size and mtime unchanged for settle_seconds, judged with an injected clock.

Pure logic over os.stat: the watcher feeds it paths (events are hints) and asks which are ready. A
close-after-write or moved-in event (inotify: local writers) makes a file ready at its next look
(quick_seconds, 0 by default): a local writer's close is proof the file is whole. A write seen after that
close, or a second close before the look, cancels the short-cut and the full settle time applies. A writer
that closes and reopens a file to append must write under a temporary name and rename (see README).

Where the inbox's filesystem is stamped by this machine's kernel (a local disk: `kernel_device`), a file's
ctime says when it last changed by the same clock a watcher would use, so a file on that device whose
ctime is already settle_seconds old at the first look (one there before the daemon started) is as settled
as one watched that long. ctime, not mtime: a copy tool (cp -p, rsync -t) sets an old mtime on a file it
has just written, but nothing sets ctime but the kernel, at every write, truncate, rename and attribute
change. Never on a share, nor on a share mounted below a local inbox (another device): there the times
come from other hosts' clocks (and FUSE daemons). A step of the wall clock seen while the daemon runs turns
the short-cut off; one made before the daemon's first look is not seen.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

# size and mtime_ns, plus: ctime_ns (a claim renamed back into the inbox is new again) and st_blocks (a
# Samba share may show a file at full size with a frozen mtime while its blocks are still being filled).
_Signature = tuple[int, int, int, int]


@dataclass(slots=True)
class _Entry:
    since: float  # when the signature was last seen to change (or the file first seen)
    sig: _Signature | None = None
    reported: _Signature | None = None  # the signature last returned by ready()
    active: bool = True  # stat it at the next ready(); reported files rest until hinted again
    closed_at: float | None = None  # a close-after-write / moved-in hint, not yet contradicted
    closed_sig: _Signature | None = None  # the signature first seen after that hint
    closes: int = 0  # more than one close: a writer that closes between chunks; no short cut
    checked: float = float("-inf")  # when it was last stat'ed (-inf: at the next ready(), whatever the time)


class StabilityTracker:
    """Which tracked files have kept the same size and mtime (and ctime, blocks) for `settle_seconds`.

    Pure logic with the clock passed in; it only stats the files it is told about.

    A close-after-write or moved-in hint (`closed=True`) shortens the wait to `quick_seconds`, but only
    while the file keeps the size+mtime first seen after that hint, and only for the first close: a writer
    that closes between chunks gets the full settle time. Thread-safe: observer threads hint while the
    caller calls ready().
    """

    def __init__(
        self,
        settle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        quick_seconds: float | None = None,
        check_seconds: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settle_seconds = float(settle_seconds)
        # A close-after-write seen by inotify is a local writer's proof that the file is whole: taken at the
        # next look. The settle wait stays for polling (no close events), for a file written again after
        # its close (closed_sig changes) and for a second close before the look (closes > 1).
        self.quick_seconds = 0.0 if quick_seconds is None else float(quick_seconds)
        # Between events, a settling file is stat'ed at most this often: a thousand files dropped on a share
        # at once must not cost ten thousand stats a second. Checking less often is never less safe: a write
        # between two looks still shows in the next one, and the settle time counts from that look.
        self.check_seconds = (
            min(self.settle_seconds / 4, 0.5) if check_seconds is None else check_seconds
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Path, _Entry] = {}
        # The device (st_dev) of the inbox's local filesystem, whose ctimes this machine's kernel stamps: a
        # file there has been settled for its ctime's age. None: no such device (a share, FUSE). A file on
        # another device (a share mounted below the inbox) is never judged by its ctime.
        self.kernel_device: int | None = None
        self._wall = wall_clock
        self._wall_offset: float | None = None  # wall - monotonic at the last look: a jump is a clock step
        self._stepped = False

    def __len__(self) -> int:
        return len(self._entries)

    def pending(self) -> int:
        """Tracked files whose current state ready() has not settled yet."""
        with self._lock:
            return sum(1 for entry in self._entries.values() if entry.active)

    def hint(self, path: Path, *, closed: bool = False) -> None:
        """Something happened to `path` (an event or a scan found it); check it at the next ready()."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                entry = self._entries[path] = _Entry(since=now)
            entry.active = True
            entry.checked = float("-inf")
            if closed:
                entry.closes += 1
                entry.closed_at = now
                entry.closed_sig = None

    def forget(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(path, None)

    def forget_under(self, folder: Path) -> None:
        """Forget every tracked file below `folder` (it was deleted or moved away)."""
        with self._lock:
            for path in [p for p in self._entries if folder in p.parents]:
                del self._entries[path]

    def recheck_all(self) -> None:
        """Stat every tracked file at the next ready(), reported ones too (they may have gone)."""
        with self._lock:
            for entry in self._entries.values():
                entry.active = True
                entry.checked = float("-inf")

    def ready(self) -> list[Path]:
        """Files newly stable since the last call (sorted); vanished files are dropped."""
        now = self._clock()
        wall = self._kernel_wall(now)
        with self._lock:
            todo = [
                (path, entry) for path, entry in self._entries.items()
                if entry.active and now - entry.checked >= self.check_seconds
            ]
        seen: list[tuple[Path, _Entry, _Signature | None, bool]] = []
        for path, entry in todo:  # stat outside the lock: a share can be slow
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                seen.append((path, entry, None, False))
                continue
            except OSError as exc:  # e.g. a network share briefly away: keep it, look again later
                logger.debug("cannot stat {}: {}", path, exc)
                entry.checked = now
                continue
            if not stat.S_ISREG(st.st_mode):
                seen.append((path, entry, None, False))
                continue
            seen.append((path, entry, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_blocks),
                         st.st_dev == self.kernel_device))
        out: list[Path] = []
        with self._lock:
            for path, entry, sig, local in seen:
                if self._entries.get(path) is not entry:
                    continue  # forgotten (or forgotten and hinted anew) while we looked
                entry.checked = now
                if sig is None:
                    del self._entries[path]
                elif self._settled(entry, sig, now, wall if local else None):
                    entry.active = False
                    if sig != entry.reported:
                        entry.reported = sig
                        entry.closed_at = entry.closed_sig = None
                        entry.closes = 0
                        out.append(path)
        return sorted(out)

    def _kernel_wall(self, now: float) -> float | None:
        """The wall clock to judge ctimes by; None where they are not this kernel's, or the clock stepped."""
        if self.kernel_device is None or self._stepped:
            return None
        wall = self._wall()
        offset, self._wall_offset = self._wall_offset, wall - now
        if offset is not None and abs(wall - now - offset) > 0.5:  # slewing moves it by microseconds a look
            logger.warning("the wall clock stepped by {:+.1f} s: files are watched for the whole settle time "
                           "from now on", wall - now - offset)
            self._stepped = True
            return None
        return wall

    def _settled(self, entry: _Entry, sig: _Signature, now: float, wall: float | None = None) -> bool:
        if sig != entry.sig:
            entry.sig = sig
            entry.since = now
        if wall is not None and wall - _changed_at(sig[2]) >= self.settle_seconds:
            return True  # unchanged since its ctime, by this kernel's clock: as good as watched that long
        if entry.closed_at is not None:
            if entry.closed_sig is None:
                entry.closed_sig = sig
            elif entry.closed_sig != sig:  # written again after its close: no short cut
                entry.closed_at = entry.closed_sig = None
        quiet = now - entry.since
        if quiet >= self.settle_seconds:
            return True
        return (
            entry.closed_at is not None
            and entry.closes == 1
            and now - max(entry.since, entry.closed_at) >= self.quick_seconds
        )


def _changed_at(ctime_ns: int) -> float:
    """The latest moment the kernel can have stamped `ctime_ns` (seconds): stamps come from a coarse clock
    up to a tick (<= 10 ms) behind, and a filesystem keeping whole seconds (ext4 with small inodes)
    truncates them."""
    return ctime_ns / 1e9 + (1.0 if ctime_ns % 1_000_000_000 == 0 else 0.02)
