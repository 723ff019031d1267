"""How a job's end reaches the main thread: what the workers hand back (Started, a RunResult), the queue
that carries it and wakes the main loop, and the endings every worker uses (superseded, share_away,
fail_job)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bgwatch import safefs
from bgwatch.custody import Claim, Custody
from bgwatch.jobs import JobState, RunResult

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
    """The workers' outcomes for the main thread; each one wakes it, so a finished job frees its room in
    the window at once."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item: Outcome, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake.set()


def superseded(run_id: int) -> RunResult:
    return RunResult(run_id, JobState.SUPERSEDED,
                     error="its claim was taken back by another host (this one was silent longer than the lease); "
                           "that host processes the file, so this result was dropped")


def share_away(run_id: int) -> RunResult:
    return RunResult(run_id, JobState.SUPERSEDED,
                     error="the inbox's share went away while this file was processed; it stays claimed on the "
                           "share, where another host (or this one, when the share is back) takes it again")


def fail_job(custody: Custody, claim: Claim, run_id: int, reason: str) -> RunResult:
    """File a failed job's original in failed/ (fenced) and say how the run ended. Never raises OSError:
    a failed/ that cannot be written leaves the original where it is, and says so."""
    try:
        settled = custody.fail(claim, run_id, reason)
    except safefs.FolderMissing:
        return share_away(run_id)
    except OSError as exc:
        return RunResult(run_id, JobState.FAILED,
                         error=f"{reason} (and the original could not be moved to failed/: {exc}; it stays in "
                               f"{custody.inbox / '.bgwatch'} until the next start)")
    if settled is None:
        return superseded(run_id)
    return RunResult(run_id, JobState.FAILED, error=f"{reason} ({settled.problem})" if settled.problem else reason,
                     parked=settled.parked)
