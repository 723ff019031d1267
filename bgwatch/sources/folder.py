"""The configured inboxes as a job source: the intake (watch, claim, record, submit) in front, fenced
delivery on the share (custody) behind, recovery at start, and the files of silent hosts settled."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from loguru import logger

from bgwatch import runs, safefs
from bgwatch.custody import Claim, Custody, DeliveryBlocked
from bgwatch.errors import BgwatchError
from bgwatch.outcomes import Blocked
from bgwatch.recovery import recover
from bgwatch.storebase import StoreUnavailable
from bgwatch.text import shown

if TYPE_CHECKING:
    from bgwatch.config import Config
    from bgwatch.intake import Intake, Site
    from bgwatch.jobs import Job, RunResult
    from bgwatch.pipeline.stages import Finished


def claim_of(job: Job) -> Claim:
    """A folder job's ticket: its claim on the share."""
    if not isinstance(job.ticket, Claim):
        raise TypeError(f"run {job.run_id} is not a folder job")
    return job.ticket


RECOVER_SECONDS = 2.0  # how often an inbox whose work folder could not be opened is tried again
Sites = Callable[["Config", "dict[str, Site]"], "dict[str, Site]"]  # (new config, the sites now) -> the new sites


class FolderSource:
    def __init__(self, intake: Intake, host: str, epoch: str, sites: Sites) -> None:
        self.intake = intake
        self.make_sites = sites  # the daemon's: each inbox's custody, heartbeat and coordinator
        self.host = host
        self.epoch = epoch
        self._silent: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()  # (inbox name, host)
        self._next_recovery = 0.0

    def owns(self, job: Job) -> bool:
        return isinstance(job.ticket, Claim)

    def recover(self) -> list[Job]:
        self._next_recovery = time.monotonic() + RECOVER_SECONDS
        return recover(self.intake, self.host)

    def poll(self) -> None:
        self._recover_waiting()
        self.intake.tick()

    def _recover_waiting(self) -> None:
        """Inboxes that wait for their work folder to open (recovery.py) are tried again every few seconds;
        once one opens, its leftovers are settled, its open runs taken again, and claiming there resumes."""
        waiting = [name for name, site in self.intake.sites.items() if site.waits]
        if not waiting or time.monotonic() < self._next_recovery:
            return
        self._next_recovery = time.monotonic() + RECOVER_SECONDS
        try:
            jobs = recover(self.intake, self.host, only=waiting)
        except StoreUnavailable as exc:  # the studio store away: its runs are read when it is back
            logger.warning("inbox(es) {}: recovery waits for the store ({})", ", ".join(map(shown, waiting)),
                           shown(str(exc)))
            return
        for job in jobs:
            self.intake.submit(job)
        for name in waiting:
            site = self.intake.sites[name]
            if not site.waits:
                logger.info("{}: its work folder opens again; recovered, claiming there again", site.inbox.path)

    def problems(self) -> list[str]:
        return [f"inbox {site.inbox.path} waits: {site.waits}" for site in self.intake.sites.values() if site.waits]

    def reconfigure(self, config: Config) -> None:
        """Inboxes added, removed or changed: their sites rebuilt (heartbeats kept), the watchers restarted."""
        self.intake.reconfigure(config, self.make_sites(config, self.intake.sites))

    def _site(self, job: Job) -> Site:
        site = self.intake.sites.get(job.inbox)
        if site is None:  # removed by a config reload while the job ran
            raise BgwatchError(f"inbox {job.inbox} was removed from the configuration while this file was "
                               "processed; put the file back in a configured inbox to process it")
        return site

    def deliver(self, finished: Finished, last_try: bool = False) -> None:
        """Deliver a finished job, fenced, and say how its run ended: 'done' only when its delivery finished.
        Storage errors hand it back (Blocked) to be tried again with back-off; on the last try it fails."""
        job = finished.job
        claim = claim_of(job)
        site = self._site(job)
        outcomes = self.intake.outcomes
        try:
            settled = site.custody.deliver(claim, job.run_id, site.inbox.outbox, job.output_rel, finished.data,
                                           site.inbox.on_success, input_sha256=job.input_sha256)
        except safefs.FolderMissing as exc:
            try:
                site.custody.unclaim(claim)
            except OSError:  # the inbox's share is away too
                outcomes.put(runs.share_away(job.run_id))
                return
            outcomes.put(runs.outbox_away(job.run_id, str(exc.filename)))
            return
        except DeliveryBlocked as blocked:
            if blocked.storage and not last_try:
                outcomes.put(Blocked(finished, str(blocked), blocked.errno))
                return
            self.fail(job, f"the output could not be written: {blocked}")
            return
        if settled is None:
            outcomes.put(runs.taken_back(job.run_id))
        elif settled.handed_over and not settled.finished:
            outcomes.put(runs.handed_over(job.run_id))
        elif not settled.finished:
            outcomes.put(runs.undone(job.run_id, settled.returned))
        else:
            outcomes.put(runs.done(job.run_id, settled.output, finished, problem=settled.problem,
                                   parked=settled.parked))

    def fail(self, job: Job, reason: str) -> None:
        claim = claim_of(job)
        site = self.intake.sites.get(job.inbox)
        custody = site.custody if site is not None else Custody(claim.inbox, claim.host, self.epoch)
        self.intake.outcomes.put(runs.fail_filed(custody, claim, job.run_id, reason))

    def recorded(self, result: RunResult) -> None:
        return None  # the intake ends its own runs (it recorded them)

    def busy(self) -> bool:
        return self.intake.busy()

    def stop_accepting(self) -> None:
        return None  # the main loop stops ticking the intake: nothing more is claimed

    def close(self) -> None:
        self.intake.stop()

    # ------------------------------------------------------------------ silent hosts

    def beat(self) -> None:
        """Beat in every inbox and note the hosts silent longer than the lease. No SQLite here, and nothing
        read that another host wrote but heartbeats (markers are read by the main thread, in sweep)."""
        for name, site in list(self.intake.sites.items()):
            if not site.coordinator.beat():
                continue
            for host in site.coordinator.silent_hosts():
                self._silent.put((name, host))

    def sweep(self) -> None:
        """Main thread: settle the deliveries and return the claims of the hosts found silent."""
        seen: set[tuple[str, str]] = set()
        while True:
            try:
                name, host = self._silent.get_nowait()
            except queue.Empty:
                return
            site = self.intake.sites.get(name)
            if (name, host) in seen or site is None or site.waits or not site.coordinator.may_claim():
                continue
            seen.add((name, host))
            try:
                returned = site.coordinator.reclaim_silent(host)
            except (OSError, ValueError) as exc:
                logger.error("{}: cannot settle silent host {}'s files: {}", site.inbox.path, shown(host),
                             shown(str(exc)))
                continue
            if returned:
                logger.warning("host {} has been silent longer than the lease ({:g} s): settled its {} file(s) in {}",
                               shown(host), site.heartbeat.lease_seconds, len(returned), site.inbox.path)
