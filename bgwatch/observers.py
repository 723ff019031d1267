"""The watchdog observers an inbox is watched with: inotify (a rename's halves paired in milliseconds), or
polling where inotify cannot see (network drives) or refuses (its limits)."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

from loguru import logger
from watchdog.observers.api import BaseObserver

INOTIFY_LIMITS = {errno.ENOSPC, errno.EMFILE, errno.ENFILE}  # watch / instance / descriptor limits


def polling_interval(settle_seconds: float) -> float:
    """How often a polling observer looks: discovery latency only; stability is the tracker's job."""
    return min(max(settle_seconds / 2, 0.25), 2.0)


# watchdog holds every event behind a rename's IN_MOVED_FROM for 0.5 s, waiting for its IN_MOVED_TO; the
# kernel queues the two together, so a few milliseconds pair them. Each claim and delivery is a rename, so
# with the default a file dropped while others are processed waited up to half a second to be seen.
MOVE_PAIRING_SECONDS = 0.02


def native_observer(unwatched: Callable[[bytes], bool] | None = None) -> tuple[BaseObserver, str]:
    """The inotify observer (elsewhere watchdog's native one). `unwatched`: folders below the watched one that
    get no inotify watch (bgwatch's own work folders): every claim, marker and parked original there would
    otherwise be an event read, paired and dispatched by two Python threads, to be thrown away."""
    if sys.platform.startswith("linux"):
        from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver

        pruned = _pruned_group(unwatched)

        class QuickPairingEmitter(InotifyFullEmitter):
            def on_thread_start(self) -> None:
                if pruned is not None and getattr(self, "_inotify_fd", None) is not None:
                    self._inotify = pruned(self._inotify_fd, os.fsencode(self.watch.path),
                                           is_recursive=self.watch.is_recursive,
                                           event_mask=self.get_event_mask_from_filter(),
                                           follow_symlink=self.watch.follow_symlink)
                else:
                    super().on_thread_start()
                # watchdog 7's grouper keeps its delay on its queue; another layout keeps watchdog's delay.
                queue = getattr(getattr(self._inotify, "_move_event_grouper", None), "_queue", None)
                if queue is not None and hasattr(queue, "delay"):
                    queue.delay = MOVE_PAIRING_SECONDS

        # Full events: a file moved in from outside arrives as a move (a whole file), not a create.
        observer = InotifyObserver(generate_full_events=True)
        observer._emitter_class = QuickPairingEmitter
        return observer, "inotify"
    from watchdog.observers import Observer

    return Observer(), "native"


def _pruned_group(unwatched: Callable[[bytes], bool] | None) -> type | None:
    """watchdog's recursive inotify watch group, adding no watch on the `unwatched` folders (the watched
    folder itself is always watched). None where watchdog's layout is not the one this knows: everything
    is watched, as before."""
    if unwatched is None:
        return None
    skip = unwatched
    try:
        from watchdog.observers.inotify import InotifyWatchGroup
    except ImportError:
        return None
    if not callable(getattr(InotifyWatchGroup, "_add_callback", None)):
        return None

    class PrunedWatchGroup(InotifyWatchGroup):
        def _add_callback(self, path: bytes) -> None:
            if path != self.path and skip(path):
                return
            super()._add_callback(path)

    return PrunedWatchGroup


def polling_observer(settle_seconds: float) -> BaseObserver:
    from watchdog.observers.polling import PollingObserver

    return PollingObserver(timeout=polling_interval(settle_seconds))


def halt(observer: BaseObserver) -> None:
    """Stop an observer and wait for it briefly; it may be half-started, stopped, or dead."""
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except Exception:  # a broken observer must not stop the watcher from replacing it
        logger.exception("error stopping an observer; dropping it")
