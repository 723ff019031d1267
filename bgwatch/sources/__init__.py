"""Where jobs come from and how they end, behind one protocol: the daemon wires sources, the ledger and the
workers, and never branches on where a job came from.

    FolderSource (folder.py)  the configured inboxes: watch, claim on the share, fenced delivery
    HttpSource   (http.py)    the HTTP door's uploads: results in its results folder

Each job carries an opaque ticket from its source (a folder job's claim on the share); only the source that
made it looks inside (`owns`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bgwatch.config import Config
    from bgwatch.jobs import Job, RunResult
    from bgwatch.pipeline.stages import Finished


class JobSource(Protocol):
    def owns(self, job: Job) -> bool:
        """Whether this source made the job (its ticket is one of this source's)."""

    def recover(self) -> list[Job]:
        """At start, on the main thread: settle what the last run left; the jobs to queue again."""

    def poll(self) -> None:
        """Main thread, every loop: take new work (claim, record, submit), record what the workers reported."""

    def deliver(self, finished: Finished, last_try: bool = False) -> None:
        """A worker thread: put the finished job's output where it belongs and report how the run ended."""

    def fail(self, job: Job, reason: str) -> None:
        """A worker thread: the job failed; file its input as failed and report it."""

    def beat(self) -> None:
        """The heartbeat thread: tell the other hosts this one lives; note those silent longer than the lease
        (settled by `sweep` on the main thread). Never touches the runs table."""

    def sweep(self) -> None:
        """Main thread: settle what other hosts left (silent longer than the lease)."""

    def reconfigure(self, config: Config) -> None:
        """Main thread: a reloaded config.yaml (the daemon has checked it and kept state_dir and host)."""

    def problems(self) -> list[str]:
        """What keeps this source's work waiting, one line each (for `bgwatch status`)."""

    def recorded(self, result: RunResult) -> None:
        """Main thread: a run's end was recorded by the ledger (wake whoever waits for it)."""

    def busy(self) -> bool:
        """Jobs of this source recorded and not ended (a TERM drains them)."""

    def stop_accepting(self) -> None:
        """Stopping: take no new work from here on."""

    def close(self) -> None:
        """Stopped: let go of what the source holds open."""
