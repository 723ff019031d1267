"""How a job's end reaches the main thread: what the workers hand back (Started, Blocked, a RunResult) and
the queue that carries it and wakes the main loop. The main thread records them through the ledger
(runs.py); how a run ends is put into words there."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bgwatch.jobs import RunResult

if TYPE_CHECKING:
    from bgwatch.pipeline.stages import Finished


@dataclass(frozen=True, slots=True)
class Started:
    """A worker began a job (the run row goes 'running')."""

    run_id: int
    at: float


@dataclass(frozen=True, slots=True)
class Blocked:
    """A finished job's output could not be written (the outbox full, read-only, failing): its claim still
    holds; the main thread tries the delivery again later (retries.py)."""

    finished: Finished
    cause: str  # the folder and the error, in words
    code: int  # errno

    @property
    def run_id(self) -> int:
        return self.finished.job.run_id


Outcome = Started | RunResult | Blocked


class Outcomes(queue.SimpleQueue[Outcome]):
    """The workers' outcomes for the main thread; each ending wakes it, so a finished job frees its room in
    the window at once. A start does not: it frees nothing, and is recorded (with the time the worker
    took) at the main loop's next turn, in order, before that job's ending (one wake a job, not two)."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item: Outcome, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if not isinstance(item, Started):
            self.wake.set()
