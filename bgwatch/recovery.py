"""Start-up recovery: after a crash, a kill or a power cut, settle what this host left half done.

One file at a time, each step guarded: a bad entry (a name that is not UTF-8, a planted link, a file
where a folder should be) is logged and left, and the daemon always starts.

1. This host's delivering folders are settled (custody.settle): a delivery whose output is written is
   finished (original to done/), anything else goes back to the inbox.
2. Its open runs ('queued' or 'running': with one daemon per state folder, they are orphans by
   definition) are taken again when their claimed file is still there; a run whose file is gone was
   taken back by another host while this one was stopped, and is recorded as superseded (or done, when
   step 1 finished its delivery).
3. Claimed files no run holds go back to the inbox; half-written outputs of this host are removed.

An inbox whose work folder (.bgwatch and below) bgwatch may not open, another user's `mkdir -m 700` say, is
left as it is: its Site.waits says why (logged, and a `status` problem line), nothing is claimed there and
its open runs stay open; the other inboxes go on. The folder source runs its recovery again once it opens.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Collection
from pathlib import Path, PurePosixPath

from loguru import logger

from bgwatch import runs, safefs, sidecars
from bgwatch.custody import CLAIMED, TAKEN, WORK_DIR, Claim, Settled
from bgwatch.errors import BgwatchError
from bgwatch.intake import InFlight, Intake, Site
from bgwatch.jobs import Job, JobSpec
from bgwatch.store import RunRow
from bgwatch.text import shown

_RECOVERABLE = (OSError, ValueError, UnicodeError, sqlite3.Error, BgwatchError, KeyError, TypeError)


def recover(intake: Intake, host: str, only: Collection[str] | None = None) -> list[Job]:
    """Settle this host's leftovers (in the inboxes named in `only`, else in all); returns the jobs to queue
    again. Each inbox's work folders are opened first: one that cannot be opened makes that inbox wait."""
    sites = {name: site for name, site in intake.sites.items() if only is None or name in only}
    for site in sites.values():
        try:
            site.custody.own_deliveries()
            site.custody.own_claims()
        except OSError as exc:
            _wait(site, exc)
        else:
            site.waits = ""
    settled: dict[int, tuple[Site, Settled]] = {}
    for site in sites.values():
        if site.waits:
            continue
        try:
            tokens = site.custody.own_deliveries()
        except OSError as exc:
            _wait(site, exc)
            continue
        for token in tokens:
            try:
                result = site.custody.settle(host, token)
                if TAKEN not in token:  # taken over from another host: its run ids are not ours
                    settled[int(token.rsplit("-", 1)[1])] = (site, result)
                logger.info("{}: delivery {} {} after the restart", site.inbox.path, shown(token),
                            "finished" if result.finished else "undone (its file is back in the inbox)")
            except (*_RECOVERABLE,) as exc:
                logger.error("{}: cannot settle delivery {}: {}", site.inbox.path, shown(token), shown(str(exc)))
    jobs: list[Job] = []
    held: set[tuple[str, str]] = set()
    for row in intake.ledger.open_runs():
        row_site = sites.get(row.inbox)
        if (only is not None and row_site is None) or (row_site is not None and row_site.waits):
            continue  # another inbox's run, or one left open until its inbox can be opened
        try:
            job = _reopen(intake, row, settled)
        except (*_RECOVERABLE,) as exc:
            logger.error("run {} ({}): cannot recover it: {}", row.id, shown(row.rel_path), exc)
            continue
        if job is not None and isinstance(job.ticket, Claim):
            jobs.append(job)
            held.add((job.inbox, job.ticket.name))
            if job.ticket.sidecar:
                held.add((job.inbox, job.ticket.sidecar))
    for name, site in sites.items():
        if site.waits:
            continue
        try:
            claims = site.custody.own_claims()
        except OSError as exc:
            _wait(site, exc)
            continue
        for claimed in claims:
            if (name, claimed) in held:
                continue
            try:
                back = site.custody.return_claimed(claimed)
            except (*_RECOVERABLE,) as exc:
                logger.error("{}: cannot return the claimed {} to the inbox: {}", site.inbox.path, shown(claimed), exc)
                continue
            if back is not None:
                logger.info("returned unfinished claim {} to {}", shown(back), site.inbox.path)
        _remove_own_temp_files(site, host)
    return jobs


def _wait(site: Site, exc: OSError) -> None:
    """The inbox's work folder cannot be opened: it waits, and says why (logged when the reason changes)."""
    where = exc.filename or site.custody.inbox / WORK_DIR
    why = f"cannot open {shown(str(where))}: {shown(exc.strerror or str(exc))}"
    if why != site.waits:
        logger.error("{}: {}. Nothing is claimed or recovered in this inbox until it can be opened; the other "
                     "inboxes go on", site.inbox.path, why)
    site.waits = why


def _reopen(intake: Intake, row: RunRow, settled: dict[int, tuple[Site, Settled]]) -> Job | None:
    ledger = intake.ledger
    site = intake.sites.get(row.inbox)
    if row.id in settled:
        _, result = settled[row.id]
        if result.finished and result.disposition == "failed":
            ledger.finish(runs.failed(row.id, result.reason, result.parked))
        elif result.finished:
            ledger.finish(runs.done(row.id, result.output, problem=result.problem, parked=result.parked))
        else:
            ledger.finish(runs.superseded(row.id, f"interrupted by a restart before its delivery finished "
                                                  f"({result.returned}); returned to the inbox and taken again as "
                                                  "a new run"))
        return None
    if site is None:
        ledger.finish(runs.superseded(row.id, "its inbox is no longer configured"))
        return None
    base = site.custody.inbox / WORK_DIR / CLAIMED / site.custody.host
    source = Path(row.source_path)
    try:
        name = PurePosixPath(*source.relative_to(base).parts).as_posix()
    except ValueError:
        name = ""
    if not name or not os.path.lexists(source):
        delivered = _delivered(site, row)
        if delivered is not None:  # killed after its delivery, before the 'done' was recorded
            ledger.finish(runs.done(row.id, delivered, problem="recorded at the restart: its delivery had finished"))
            logger.info("run {} ({}): delivered before the restart -> {}", row.id, shown(row.rel_path),
                        shown(str(delivered)))
            return None
        why = "its file was taken back by another host while this one was stopped, and processed there"
        ledger.finish(runs.superseded(row.id, why))
        logger.info("run {} ({}): {}", row.id, shown(row.rel_path), why)
        return None
    sidecar = sidecars.find_sidecar(source)
    claim = Claim(site.custody.inbox, site.custody.host, row.rel_path, name,
                  PurePosixPath(*sidecar.relative_to(base).parts).as_posix() if sidecar is not None else None)
    if row.spec_json == "{}" or not row.output_path:
        ledger.finish(runs.superseded(row.id, "interrupted before it was queued; taken again"))
        return None  # its claim goes back to the inbox
    spec = JobSpec.from_dict(json.loads(row.spec_json))
    output_rel = PurePosixPath(*Path(row.output_path).relative_to(site.inbox.outbox).parts).as_posix()
    ledger.requeue(row.id)
    logger.warning("run {} ({}) was open when bgwatch stopped; taking it again", row.id, shown(row.rel_path))
    job = Job(run_id=row.id, inbox=row.inbox, rel_path=row.rel_path, source=source, spec=spec,
              input_sha256=row.input_sha256, key=row.key, ticket=claim, root=claim.inbox, output_rel=output_rel)
    intake.inflight[row.id] = InFlight(job, site)
    return job


def _delivered(site: Site, row: RunRow) -> Path | None:
    """Where this run's output is, if the share's owner records say this very run delivered it."""
    if not row.output_path:
        return None
    try:
        wanted = PurePosixPath(*Path(row.output_path).relative_to(site.inbox.outbox).parts).as_posix()
    except ValueError:
        return None
    got = site.custody.outputs.of_run(wanted, site.custody.host, row.id, row.input_sha256)
    return site.inbox.outbox / got if got is not None else None


def _remove_own_temp_files(site: Site, host: str) -> None:
    """Half-written outputs this host left in the outbox when it died (never another host's)."""
    try:
        with safefs.Folder.open_root(site.inbox.outbox) as outbox:
            leftovers = [p for p, _ in outbox.files() if safefs.is_own_temp(p[-1], host)]
            for parts in leftovers:
                with outbox.sub(*parts[:-1]) as folder:
                    folder.unlink(parts[-1])
    except OSError:
        return
    if leftovers:
        logger.info("{}: removed {} half-written output(s) left by the last run", site.inbox.outbox, len(leftovers))

