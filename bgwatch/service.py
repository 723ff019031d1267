"""How a bgwatch process lives as a service, apart from what it does: one daemon per state folder
(InstanceLock), systemd's notify protocol (sd_notify), the progress the watchdog is judged by (Progress),
handing memory back after a burst (trim_memory), and the live status file.

Kept light (no pipeline import): `bgwatch status` reads the lock and the status file through it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from bgwatch.errors import ConfigError

STATUS_FILE = "status.json"


def trim_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim): the decoded images of a burst
    leave freed-but-kept arenas in every worker thread; a no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return


M_ARENA_MAX = -8  # glibc's mallopt parameter


def share_cores(cores: int, pool_threads: int) -> None:
    """Process-wide settings for a daemon whose stage pools already run images in parallel (the daemon owns
    its process: set when it starts, before the workers).

    - OpenCV runs its own thread pool inside each call: each call gets the cores' share of the pool threads
      (on 2 cores: 1; +5% images/s with the real U²-Net, bench/bench_mask_layout.py).
    - At most one C-heap arena a core (glibc's default is eight a core): the threads' freed images and the
      mask runs' buffers reuse each other's pages instead of each thread keeping its own (about 100 MB
      less peak RSS with the real U²-Net on 2 cores, bench/bench_cleanup.py); a no-op without glibc.
    - The soft limit on open files raised to the hard one: inboxes, shares, models and (with the HTTP API)
      connections all take file handles, and 1,024 runs out before any of them is refused.
    """
    import cv2

    cv2.setNumThreads(max(1, cores // max(1, pool_threads)))
    limit_malloc_arenas(cores)
    raise_open_file_limit()


def limit_malloc_arenas(cores: int) -> bool:
    """glibc's mallopt(M_ARENA_MAX): at most max(2, cores) arenas; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, max(2, cores)))
    except (OSError, AttributeError):
        return False


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (systemd's default soft limit is 1,024, the hard
    one far more): connections, folders and models all take file handles. Returns the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.debug("could not raise the open-file limit from {} to {}: {}", soft, target, exc)
    return int(soft)


def open_file_limit() -> int:
    """The soft limit on open files (what the process may open now)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a receiver that does not read must not hold the daemon
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.debug("sd_notify failed: {}", exc)


class InstanceLock:
    """One daemon per state folder: its open rows are then orphans after a crash, by definition."""

    # `held` (bgwatch status, report, a second start) takes a shared lock for a moment to look: a daemon
    # starting in that moment tries again, every RETRY seconds for PATIENCE, before it calls the folder taken.
    PATIENCE, RETRY = 0.5, 0.02

    def __init__(self, state_dir: Path, *, sleep: Callable[[float], None] = time.sleep) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "bgwatch.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        tries = round(self.PATIENCE / self.RETRY)
        while not self._lock():
            if tries == 0:
                os.close(self._fd)
                raise ConfigError(state_dir, "state_dir",
                                  f"another bgwatch is already running with this state folder (lock {self.path})")
            tries -= 1
            sleep(self.RETRY)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def _lock(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        os.close(self._fd)

    @staticmethod
    def held(state_dir: Path) -> bool:
        path = state_dir / "bgwatch.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


class Progress:
    """When each worker thread last made progress, and whether it is inside a job (for the watchdog)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._busy_since: dict[str, float | None] = {}

    def idle(self) -> None:
        with self._lock:
            self._busy_since[threading.current_thread().name] = None

    def busy(self) -> None:
        with self._lock:
            self._busy_since[threading.current_thread().name] = self.clock()

    def stalled(self, limit: float) -> list[str]:
        now = self.clock()
        with self._lock:
            return [name for name, since in self._busy_since.items() if since is not None and now - since > limit]
