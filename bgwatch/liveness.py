"""Which hosts are alive on a shared inbox: heartbeats written, and judged, without SQLite.

Each host refreshes `<inbox>/.bgwatch/heartbeats/<host>` (its epoch and the time) from a thread that
does nothing else, so a locked database or a long job never makes a live host look dead. Others judge a
heartbeat by whether it *changes*, timed on their own monotonic clock: clock skew between workstations,
or a timestamp forged by anyone who can write to the share, cannot make a live host look dead.

A host that cannot beat in an inbox stops claiming there (`Heartbeat.fresh`). A heartbeat that changes
under this host's name without this host writing it means a second live daemon uses the same name (a
cloned VM, no `host:` set): it is reported, and this host stops claiming there until the other heartbeat has
stopped changing for a whole lease (the other daemon stopped, or a forged file was written once); `status`
says why meanwhile.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from bgwatch import safefs
from bgwatch.claims import WORK_DIR, check_host
from bgwatch.text import shown

HEARTBEATS = "heartbeats"


class Heartbeat:
    """This host's heartbeat in one inbox."""

    def __init__(self, inbox: Path, host: str, epoch: str, lease_seconds: float,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.inbox = Path(inbox)
        self.host = check_host(host)
        self.epoch = epoch
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.wall = wall
        self.last_ok: float | None = None  # monotonic time of the last beat that was written
        self._written: bytes | None = None
        self.twin: str = ""  # the epoch of another live daemon using this host name, if one was seen
        self._twin_seen: float = 0.0  # monotonic time the other daemon's beat was last found
        self._problem: str = ""  # why the last beat could not be written

    def beat(self) -> bool:
        """Refresh the heartbeat; False (logged once per outage) when it cannot be written."""
        try:
            with safefs.Folder.open_root(self.inbox) as root, root.sub(WORK_DIR, HEARTBEATS, create=True) as folder:
                self._check_twin(folder)
                data = json.dumps({"host": self.host, "epoch": self.epoch, "time": self.wall()}).encode()
                folder.write_atomic(self.host, data, owner=self.host)
                self._written = data
        except OSError as exc:
            if not self._problem:
                logger.warning("cannot write the heartbeat in {}: {}; not claiming there until it works",
                               self.inbox, exc.strerror or exc)
            self._problem = f"the heartbeat cannot be written ({exc.strerror or exc})"
            return False
        if self._problem:
            logger.info("heartbeat in {} written again", self.inbox)
            self._problem = ""
        self.last_ok = self.clock()
        return True

    def _check_twin(self, folder: safefs.Folder) -> None:
        try:
            current = folder.read_bytes(self.host, 4096)
        except FileNotFoundError:
            return
        if self._written is None or current == self._written:
            if self.twin and self.clock() - self._twin_seen >= self.lease_seconds:
                logger.warning("the other heartbeat under the host name {} on {} (epoch {}) has not changed for "
                               "{:g} s: claiming there again", self.host, self.inbox, self.twin, self.lease_seconds)
                self.twin = ""
            return
        try:
            epoch = str(json.loads(current).get("epoch", "?"))[:64]
        except (ValueError, AttributeError, UnicodeError):
            epoch = "?"
        self._twin_seen = self.clock()
        if epoch != self.epoch and epoch != self.twin:
            self.twin = epoch
            logger.error("another live bgwatch uses the host name {} on {} (its epoch {}, ours {}): two daemons "
                         "with one name would take each other's claims; set a distinct `host:` in each "
                         "config.yaml. Not claiming there meanwhile.", self.host, self.inbox, epoch, self.epoch)

    def fresh(self) -> bool:
        """Whether this host may claim here: its last beat is recent and no twin uses its name."""
        if self.twin or self.last_ok is None:
            return False
        return self.clock() - self.last_ok < self.lease_seconds / 2

    def why_not_claiming(self) -> str:
        """Why this host does not claim here ("" when it does), in words for `bgwatch status`."""
        if self.twin:
            return (f"another daemon writes the heartbeat of host name {self.host} (epoch {shown(self.twin)}); "
                    f"claiming resumes once it has not changed for {self.lease_seconds:g} s")
        if self._problem:
            return self._problem
        if not self.fresh():
            return "no recent heartbeat"
        return ""

    def remove(self) -> None:
        """On a clean stop, after this host's claims went back or were finished."""
        try:
            with safefs.Folder.open_root(self.inbox) as root, root.sub(WORK_DIR, HEARTBEATS) as folder:
                folder.unlink(self.host)
        except OSError:
            return


class Liveness:
    """Judges other hosts by whether their heartbeat changes, on this host's monotonic clock. A host is
    first seen as fresh, so a starting daemon waits a whole lease before it returns anyone's claims."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[bytes, float]] = {}

    def silent_for(self, inbox: Path, host: str) -> float:
        try:
            with safefs.Folder.open_root(inbox) as root, root.sub(WORK_DIR, HEARTBEATS) as folder:
                st = folder.lstat(host)
                content = folder.read_bytes(host, 4096) + f"|{st.st_mtime_ns if st else 0}".encode()
        except (OSError, ValueError):
            content = b""
        key, now = (str(inbox), host), self.clock()
        previous = self._seen.get(key)
        if previous is None or previous[0] != content:
            self._seen[key] = (content, now)
            return 0.0
        return now - previous[1]


def new_epoch() -> str:
    """This daemon's incarnation: claims' fencing tokens and heartbeats carry it."""
    return f"{time.time_ns():x}{os.getpid():x}"
