"""The HTTP door as a job source: a thin adapter over httpjobs.HttpDoor (which owns the uploads, the window
and the results folder), so the daemon treats its jobs like any other."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bgwatch import runs

if TYPE_CHECKING:
    from bgwatch.config import Config
    from bgwatch.httpjobs import HttpDoor
    from bgwatch.jobs import Job, RunResult
    from bgwatch.outcomes import Outcomes
    from bgwatch.pipeline.stages import Finished


class HttpSource:
    def __init__(self, door: HttpDoor, outcomes: Outcomes) -> None:
        self.door = door
        self.outcomes = outcomes

    def owns(self, job: Job) -> bool:
        return job.ticket is None and self.door.knows(job.run_id)

    def recover(self) -> list[Job]:
        """The door settles its own leftovers (failing the requests a stop cut off), then listens."""
        self.door.open()
        return []

    def poll(self) -> None:
        self.door.tick()

    def deliver(self, finished: Finished, last_try: bool = False) -> None:
        self.door.deliver(finished)

    def fail(self, job: Job, reason: str) -> None:
        self.outcomes.put(runs.failed(job.run_id, reason))

    def beat(self) -> None:
        return None

    def sweep(self) -> None:
        return None

    def reconfigure(self, config: Config) -> None:
        self.door.reconfigure(config)

    def problems(self) -> list[str]:
        return []

    def recorded(self, result: RunResult) -> None:
        self.door.recorded(result)

    def busy(self) -> bool:
        return self.door.busy()

    def stop_accepting(self) -> None:
        self.door.stop_accepting()

    def close(self) -> None:
        self.door.close()
