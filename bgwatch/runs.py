"""The run ledger: the one writer of run records, and the one place a run's ending is put into words.

A run is added when a source has a job (its spec resolved, its output name chosen), started when a worker
takes it, finished once, or requeued after a restart. All of it happens on the daemon's main thread, in
the order the outcomes arrived (intake.apply_outcomes); workers never write a run. A locked or full
database delays the writing (the caller keeps the outcome and tries again); it never loses one.

The endings below are the only RunResults bgwatch builds (the folder and HTTP sources, `bgwatch process`):
each says what happened in words.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bgwatch.jobs import JobState, RunResult
from bgwatch.store import RunRow
from bgwatch.storebase import RunStore

if TYPE_CHECKING:
    from bgwatch.custody import Claim, Custody
    from bgwatch.pipeline.stages import Finished


class Ledger:
    """Writes the runs table for one host. Main thread only."""

    def __init__(self, store: RunStore, host: str) -> None:
        self.store = store
        self.host = host

    def add(self, *, key: str, inbox: str, rel_path: str, source_path: str, input_sha256: str = "",
            spec_json: str = "{}", output_path: str = "") -> int:
        return self.store.add_run(key=key, inbox=inbox, rel_path=rel_path, source_path=source_path,
                                  input_sha256=input_sha256, spec_json=spec_json, host=self.host,
                                  output_path=output_path)

    def start(self, run_id: int, at: float) -> None:
        self.store.start_run(run_id, self.host, at=at)

    def finish(self, result: RunResult) -> None:
        self.store.finish_run(result.run_id, result.state,
                              output_path=str(result.output_path) if result.output_path else "",
                              error=result.error, mask_engine=result.mask_engine, bg_engine=result.bg_engine,
                              seed=result.seed, timings=result.timings,
                              source_path=str(result.parked) if result.parked else None)

    def requeue(self, run_id: int) -> None:
        self.store.requeue(run_id)

    def note(self, run_id: int, text: str) -> None:
        """What an open run waits for (shown by `history` until it ends)."""
        self.store.note(run_id, text)

    def open_runs(self) -> list[RunRow]:
        """This host's runs left 'queued' or 'running' (after a restart: orphans by definition)."""
        return self.store.runs_in((JobState.QUEUED, JobState.RUNNING), host=self.host)


# ---------------------------------------------------------------------- how runs end


def done(run_id: int, output: Path | None, finished: Finished | None = None, *, problem: str = "",
         parked: Path | None = None) -> RunResult:
    """Delivered: the output is in place (`problem`: the original could not be filed yet, and why)."""
    if finished is None:
        return RunResult(run_id, JobState.DONE, output, error=problem, parked=parked)
    return RunResult(run_id, JobState.DONE, output, error=problem, mask_engine=finished.mask_engine,
                     bg_engine=finished.bg_engine, seed=finished.seed, timings=finished.timings, parked=parked)


def failed(run_id: int, reason: str, parked: Path | None = None) -> RunResult:
    return RunResult(run_id, JobState.FAILED, error=reason, parked=parked)


def skipped(run_id: int, output: Path | None, earlier_id: int, parked: Path | None) -> RunResult:
    return RunResult(run_id, JobState.SKIPPED, output, error=f"same image and spec as run {earlier_id}", parked=parked)


def superseded(run_id: int, why: str) -> RunResult:
    return RunResult(run_id, JobState.SUPERSEDED, error=why)


def taken_back(run_id: int) -> RunResult:
    return superseded(run_id, "its claim was taken back by another host (this one was silent longer than the "
                              "lease); that host processes the file, so this result was dropped")


def share_away(run_id: int) -> RunResult:
    return superseded(run_id, "the inbox's share went away while this file was processed; it stays claimed on the "
                              "share, where another host (or this one, when the share is back) takes it again")


def outbox_away(run_id: int, where: str) -> RunResult:
    return superseded(run_id, f"the outbox is not there ({where}: share not mounted?); the file went back to the "
                              "inbox and is taken again when the outbox returns")


def handed_over(run_id: int) -> RunResult:
    return superseded(run_id, "another host took this delivery over mid-way (this one was silent longer than the "
                              "lease) and finishes it with this run's output")


def undone(run_id: int, why: str) -> RunResult:
    return superseded(run_id, f"its delivery was undone ({why}); the original went back to the inbox and is "
                              "processed again")


def fail_filed(custody: Custody, claim: Claim, run_id: int, reason: str) -> RunResult:
    """File a failed job's original in failed/ (fenced) and say how the run ended. Never raises OSError:
    a failed/ that cannot be written leaves the original where it is, and says so."""
    from bgwatch import safefs

    try:
        settled = custody.fail(claim, run_id, reason)
    except safefs.FolderMissing:
        return share_away(run_id)
    except OSError as exc:
        return failed(run_id, f"{reason} (and the original could not be moved to failed/: {exc}; it stays in "
                              f"{custody.inbox / '.bgwatch'} until the next start)")
    if settled is None:
        return taken_back(run_id)
    return failed(run_id, f"{reason} ({settled.problem})" if settled.problem else reason, settled.parked)
