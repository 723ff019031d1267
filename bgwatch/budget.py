"""Admission by estimated working set: the jobs in flight together never plan to use more than
`limits.max_memory`.

Each job's need is estimated from its header (width × height, operation; pipeline.jobmemory.job_memory)
before a pixel is decoded. A job that does not fit beside the others waits in its prepare thread while
the other prepare threads go on with jobs that do fit: big images do not hold up small ones. A job alone
is always admitted (one that could never fit was refused before, by jobmemory.check_job_memory), and a big
job that has waited `patience` seconds goes next: small ones then wait for it, so it is never starved.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class MemoryBudget:
    def __init__(self, total: int, *, patience: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.patience = patience
        self.clock = clock
        self._held: dict[int, int] = {}
        self._next: int | None = None  # a job that waited past its patience: admitted before any other
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._cond:
            return sum(self._held.values())

    def set_total(self, total: int) -> None:
        with self._cond:
            self.total = total
            self._cond.notify_all()

    def acquire(self, run_id: int, need: int, stop: threading.Event) -> bool:
        """Wait until `need` bytes fit (or nothing else runs); False if `stop` was set meanwhile."""
        since = self.clock()
        with self._cond:
            while not stop.is_set():
                used = sum(self._held.values())
                mine_next = self._next in (None, run_id)
                if mine_next and (not self._held or used + need <= self.total):
                    self._held[run_id] = need
                    if self._next == run_id:
                        self._next = None
                    return True
                if self._next is None and self.clock() - since >= self.patience:
                    self._next = run_id  # from now on the others wait for this one
                self._cond.wait(timeout=0.2)
            if self._next == run_id:
                self._next = None
                self._cond.notify_all()
            return False

    def release(self, run_id: int) -> None:
        """The job ended (done, failed, superseded); idempotent."""
        with self._cond:
            if self._held.pop(run_id, None) is not None:
                self._cond.notify_all()
