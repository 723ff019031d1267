"""Intake: from a stable file in an inbox to a recorded, queued run; and where every run ends.

One thread owns all of this (the daemon's main thread): it classifies what the watcher reports, waits
for sidecars, claims files while this host has room in its window, resolves their spec, records the run
and hands the job to the pipeline (`submit`). Workers never touch this state or the runs table: they put
what happened (`Started`, or a `RunResult`) on `outcomes`, and `tick()` records it. A database lock
therefore delays the recording, and never strands or fails a job; a claimed file that no job holds
(its run could not be recorded) is returned to the inbox by the sweep.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from loguru import logger

from bgwatch import fileid, outputs, rules, runs, sidecars
from bgwatch.config import Config, InboxConfig
from bgwatch.coordination import Coordinator
from bgwatch.custody import Claim, Custody, DeliveryBlocked
from bgwatch.delivery import waiting as waiting_note
from bgwatch.errors import BgwatchError, SpecError
from bgwatch.jobs import Job, JobSpec, JobState, RunResult, job_key
from bgwatch.liveness import Heartbeat
from bgwatch.orphans import OrphanSidecars
from bgwatch.outcomes import Blocked, Outcome, Outcomes, Started
from bgwatch.retries import Retries
from bgwatch.sidecars import FOLDER_FILE, IMAGE_SUFFIXES, SIDECAR_SUFFIXES, UNREADABLE_IMAGE_SUFFIXES
from bgwatch.storebase import RunStore
from bgwatch.text import on_share, shown
from bgwatch.watch import InboxWatcher

if TYPE_CHECKING:
    from bgwatch.pipeline.stages import Finished

RECENT_RESULTS = 1000
DB_PAUSE_SECONDS = (2.0, 60.0)  # claiming pauses this long (doubling) while runs cannot be recorded


@dataclass(slots=True)
class Site:
    """One configured inbox as this host serves it: its config, its files' custody, its heartbeat, and
    the coordination with the other hosts of its share (claims, holds, silent hosts)."""

    inbox: InboxConfig
    custody: Custody
    heartbeat: Heartbeat
    coordinator: Coordinator
    waits: str = ""  # why nothing is claimed here until it clears (a work folder bgwatch may not open)


@dataclass(slots=True)
class Waiting:
    site: Site
    first_seen: float


@dataclass(frozen=True, slots=True)
class Looked:
    """Beside a waiting image: its sidecar (or why not), and without one its spec (None: resolve after the claim)."""

    sidecar: Path | None
    error: str = ""
    spec: JobSpec | None = None


@dataclass(slots=True)
class InFlight:
    job: Job
    site: Site


@dataclass(slots=True)
class Counters:
    failures: int = 0
    results: deque[RunResult] = field(default_factory=lambda: deque(maxlen=RECENT_RESULTS))


class Intake:
    def __init__(self, config: Config, store: RunStore, sites: dict[str, Site], submit: Callable[[Job], None], *,
                 once: bool = False, on_result: Callable[[RunResult], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wake: threading.Event | None = None) -> None:
        self.config = config
        self.store = store
        # the one writer of run records (this thread); endings the store refused wait in state_dir's journal
        self.ledger = runs.Ledger(store, config.host, journal=config.state_dir / runs.JOURNAL)
        self.sites = sites
        self.submit = submit
        self.once = once
        self.on_result = on_result
        self.clock = clock
        # Set by the watcher on a close-after-write and by every outcome: the main thread's tick is due.
        self.wake = wake if wake is not None else threading.Event()
        self.outcomes = Outcomes(self.wake)
        self.watcher: InboxWatcher | None = None
        self.pending: dict[Path, Waiting] = {}  # stable images not yet claimed (no room, or awaiting sidecar)
        self.orphans = OrphanSidecars(store, lambda: self.config, self._requeue)
        self.inflight: dict[int, InFlight] = {}
        self.counters = Counters(results=deque(maxlen=None if once else RECENT_RESULTS))
        self.retries: Retries[Finished] = Retries()
        self.waiting_originals: dict[tuple[str, str], str] = {}  # (inbox, token) -> why it is not filed
        self._unapplied: deque[Outcome] = deque()
        self._db_trouble = False
        self._db_pause = 0.0  # claiming paused until then: runs could not be recorded (a full state disk)
        self._db_pause_step = DB_PAUSE_SECONDS[0]
        self._next_sweep = 0.0
        self._unheld: dict[tuple[str, str], int] = {}  # claims no job holds, by how many sweeps saw them
        self.stuck: set[tuple[str, str]] = set()  # claimed files that could not be filed (logged)
        self._sweep_trouble: dict[str, str] = {}  # inbox name -> why its work folder could not be read (logged)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.watcher = InboxWatcher(self.config.inboxes, self.config.watch, wake=self.wake)
        self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()

    def reconfigure(self, config: Config, sites: dict[str, Site]) -> None:
        old, self.config, self.sites = self.config, config, sites
        if [(ib.path, ib.poll) for ib in old.inboxes] != [(ib.path, ib.poll) for ib in config.inboxes] or (
                old.watch != config.watch):
            self.stop()
            self.start()

    def room(self) -> int:
        return self.config.pipeline.window_per_worker - len(self.inflight)

    def busy(self) -> bool:
        return bool(self.inflight) or bool(self._unapplied) or not self.outcomes.empty()

    def idle(self) -> bool:
        """Nothing left to take: `run --once` exits (orphan sidecars are left for a later run)."""
        assert self.watcher is not None
        blocked: dict[str, bool] = {}  # a blocked inbox's files are left by --once: asked once per inbox
        waiting = any(not (self.once and self._blocked_once(w.site, blocked)) for w in self.pending.values())
        return not waiting and (self.once or not self.orphans.waiting) and self.watcher.settled()

    # ------------------------------------------------------------------ tick

    def tick(self) -> None:
        assert self.watcher is not None
        now = self.clock()
        self.apply_outcomes()
        for inbox, path in self.watcher.poll_ready():
            self._guarded(path, self._classify, inbox, path, now)
        self._take_pending(now)
        self.orphans.check(now)
        if now >= self._next_sweep:
            self._next_sweep = now + max(self.config.watch.lease_seconds / 2, 1.0)
            self._sweep()

    @staticmethod
    def _guarded(path: Path, step: Callable[..., object], *args: object) -> None:
        """One file's trouble (a vanished share, a read-only folder, a locked database, a planted link) is
        logged and retried at the next rescan; it never stops the daemon."""
        try:
            step(*args)
        except FileNotFoundError as exc:  # taken by another host meanwhile: an ordinary race on a share
            logger.debug("{}: gone before it could be taken ({})", shown(str(path)), shown(str(exc)))
        except (OSError, BgwatchError, sqlite3.Error, ValueError, UnicodeError) as exc:
            logger.error("{}: {}", shown(str(path)), shown(str(exc)))

    def _site(self, inbox: InboxConfig) -> Site | None:
        return self.sites.get(inbox.name)

    def _classify(self, inbox: InboxConfig, path: Path, now: float) -> None:
        site = self._site(inbox)
        if site is None:
            return  # removed by a config reload
        name = path.name
        suffix = path.suffix.lower()
        rel = site.inbox.rel_path(path)
        if name == FOLDER_FILE:
            logger.info("folder rules {} changed: they apply to files arriving from now on", shown(str(path)))
        elif suffix in SIDECAR_SUFFIXES:
            images = sidecars.sidecar_images(path)
            st = os.lstat(path)
            for image in images:
                if site.custody.kept.sidecar_unchanged(site.inbox.rel_path(image), name, st):
                    continue  # put back beside its kept image, unchanged
                site.custody.kept.forget(site.inbox.rel_path(image))  # a new or changed sidecar: redo it
                self.pending.setdefault(image, Waiting(site, now))
            if not images:
                self.orphans.waiting.setdefault(path, Waiting(site, now))
        elif suffix in IMAGE_SUFFIXES or suffix in UNREADABLE_IMAGE_SUFFIXES:
            st = os.lstat(path)
            if site.inbox.on_success == "keep" and site.custody.kept.is_kept(rel, st):
                return
            self.pending.setdefault(path, Waiting(site, now))

    def _requeue(self, path: Path, site: Site) -> None:
        self.pending.setdefault(path, Waiting(site, self.clock()))

    def _take_pending(self, now: float) -> None:
        if now < self._db_pause:
            return
        blocked: dict[str, bool] = {}
        for path in list(self.pending):
            if self.room() <= 0:
                return
            waiting = self.pending[path]
            if not os.path.lexists(path):
                del self.pending[path]
                continue
            if self._blocked_once(waiting.site, blocked):
                continue
            found = self._look(waiting.site, path)
            if found.spec is not None and found.spec.require_sidecar and (
                    now - waiting.first_seen < self.config.watch.sidecar_seconds):
                continue  # require_sidecar: wait up to watch.sidecar_seconds for it, then go (and fail)
            del self.pending[path]
            self._guarded(path, self.take, waiting.site, path, found)

    def _blocked_once(self, site: Site, seen: dict[str, bool]) -> bool:
        """_blocked, asked once per inbox in one pass over the waiting files."""
        name = site.inbox.name
        return seen[name] if name in seen else seen.setdefault(name, self._blocked(site))

    @staticmethod
    def _blocked(site: Site) -> bool:
        """Claim nothing where this host cannot beat (share away, a twin uses its name) or the outbox is
        missing (its share away). An outbox that is a file is not waited for: the jobs fail and say so."""
        return bool(site.waits) or not site.coordinator.may_claim() or not os.path.lexists(site.inbox.outbox)

    def _look(self, site: Site, path: Path) -> Looked:
        """The image's sidecar, and without one its spec (so that take() resolves it once, not twice)."""
        try:
            sidecar = sidecars.find_sidecar(path)
        except SpecError as exc:
            return Looked(None, str(exc))
        if sidecar is not None:
            return Looked(sidecar)
        try:
            return Looked(None, spec=rules.resolve(path, site.inbox, self.config, sidecar=None).spec)
        except (BgwatchError, OSError, ValueError):
            return Looked(None)  # take it now; resolved again after the claim, its error is reported on the run

    # ------------------------------------------------------------------ take

    def take(self, site: Site, path: Path, looked: Looked | None = None) -> int | None:
        """Claim one stable image (and its sidecar), record its run and queue it. Returns the run id.
        `looked`: its sidecar (and spec) as _take_pending just found them."""
        inbox = site.inbox
        rel = inbox.rel_path(path)
        if looked is None:
            looked = self._look(site, path)
        sidecar, sidecar_error = looked.sidecar, looked.error
        try:
            claim = site.coordinator.claim(rel, inbox.rel_path(sidecar) if sidecar is not None else None)
        except sqlite3.Error as exc:  # a studio store that is away: the file waits, and is claimed once it is back
            logger.debug("{}: not claimed now ({})", shown(rel), exc)
            self._requeue(path, site)
            return None
        logger.debug("{}: claim {} (window {}/{})", shown(rel), "won" if claim else "lost to another host",
                     len(self.inflight), self.config.pipeline.window_per_worker)
        if claim is None:
            logger.debug("{}: another host took it", shown(rel))
            return None
        if self.watcher is not None:
            self.watcher.forget(path)
        if inbox.on_success == "keep" and site.custody.kept.is_kept(rel, os.lstat(claim.path)):
            site.custody.unclaim(claim)  # put back by the host that processed it while this one waited
            return None
        try:
            run_id = self._record(site, claim, path, sidecar_error,
                                  looked.spec if claim.sidecar is None and sidecar is None else None)
        except OSError as exc:  # the claimed file itself: gone (another host's takeover) or unreadable
            site.custody.unclaim(claim)
            (logger.debug if isinstance(exc, FileNotFoundError) else logger.warning)(
                "{}: could not be read after its claim ({}); returned to the inbox", shown(rel), shown(str(exc)))
            return None
        except sqlite3.Error as exc:
            # Not recorded: the file goes back to the inbox and is taken again later, never stranded. Claiming
            # pauses (doubling) so that a full state disk costs one line per pause, not a loop of them.
            site.custody.unclaim(claim)
            self.pending.setdefault(path, Waiting(site, self.clock()))
            self._db_pause = self.clock() + self._db_pause_step
            if self._db_pause_step == DB_PAUSE_SECONDS[0]:
                logger.warning("{}: could not record the run ({}); returned to the inbox, and claiming pauses "
                               "until runs can be recorded again", shown(rel), shown(str(exc)))
            self._db_pause_step = min(self._db_pause_step * 2, DB_PAUSE_SECONDS[1])
            return None
        if self._db_pause_step != DB_PAUSE_SECONDS[0]:
            logger.info("runs are recorded again; claiming goes on")
            self._db_pause_step = DB_PAUSE_SECONDS[0]
        return run_id

    def _record(self, site: Site, claim: Claim, path: Path, sidecar_error: str, spec: JobSpec | None = None) -> int:
        """`spec`: resolved a moment ago without a sidecar (none found, none claimed); else resolved here."""
        inbox, rel = site.inbox, claim.rel
        claimed_sidecar = claim.sidecar_path
        st = os.lstat(claim.path)
        if not stat.S_ISREG(st.st_mode):  # swapped for a link or a FIFO while it waited
            run_id = self.ledger.add(key="-", inbox=inbox.name, rel_path=rel, source_path=str(claim.path))
            self._fail_now(site, claim, run_id, "not a regular file (a symbolic link, pipe or device); "
                           "bgwatch reads only files")
            return run_id
        sha = fileid.sha256_file(claim.path)
        suffix = PurePosixPath(rel).suffix.lower()
        if suffix in UNREADABLE_IMAGE_SUFFIXES:
            run_id = self.ledger.add(key=sha, inbox=inbox.name, rel_path=rel, source_path=str(claim.path),
                                     input_sha256=sha)
            self._fail_now(site, claim, run_id, f"{suffix[1:].upper()} is not a format bgwatch reads; allowed: "
                           f"{', '.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} (convert it and drop it again)")
            return run_id
        try:
            if sidecar_error:
                raise SpecError(rel, "sidecar", sidecar_error)
            if spec is None:
                spec = rules.resolve(path, inbox, self.config, sidecar=claimed_sidecar).spec
            if spec.require_sidecar and claimed_sidecar is None:
                raise SpecError(
                    path.parent / FOLDER_FILE, "require_sidecar",
                    f"no sidecar arrived for {path.name} within {self.config.watch.sidecar_seconds:g} s",
                    f"drop {path.stem}.yaml beside it, or set require_sidecar: false")
        except (BgwatchError, ValueError) as exc:
            run_id = self.ledger.add(key=sha, inbox=inbox.name, rel_path=rel, source_path=str(claim.path),
                                     input_sha256=sha)
            self._fail_now(site, claim, run_id, str(exc))
            return run_id
        from bgwatch.pipeline.imageio import output_extension

        key = job_key(sha, spec)
        earlier = None if spec.reprocess else self.store.find_done(key)
        # The name it wants; the name it gets is taken on the share when it is delivered (outputs.place).
        output_rel = outputs.wanted(rel, spec.output.suffix, output_extension(spec.output))
        run_id = self.ledger.add(key=key, inbox=inbox.name, rel_path=rel, source_path=str(claim.path),
                                 input_sha256=sha, spec_json=spec.to_json(), output_path=str(inbox.outbox / output_rel))
        job = Job(run_id=run_id, inbox=inbox.name, rel_path=rel, source=claim.path, spec=spec, input_sha256=sha,
                  key=key, ticket=claim, root=claim.inbox, output_rel=output_rel)
        if earlier is not None and self._deliver_earlier(site, job, claim, Path(earlier.output_path), earlier.id):
            return run_id
        logger.info("{}: queued as run {} ({} {})", shown(rel), run_id, spec.operation,
                    spec.mode if spec.operation == "cleanup" else spec.engine)
        self.inflight[run_id] = InFlight(job, site)
        self.submit(job)
        return run_id

    def _deliver_earlier(self, site: Site, job: Job, claim: Claim, earlier: Path, earlier_id: int) -> bool:
        """Same bytes and spec as a finished run: no second inference, but this name gets its output. The
        earlier output is read only inside the outbox, without following a link, and only if it still holds
        the bytes its owner record names; otherwise False, and the job is processed again."""
        data = outputs.earlier(site.custody.outputs, site.inbox.outbox, earlier)
        if data is None:
            logger.info("{}: the earlier output of run {} is not there as it was written; processing again",
                        shown(job.rel_path), earlier_id)
            return False
        self.inflight[job.run_id] = InFlight(job, site)
        own = earlier == site.inbox.outbox / job.output_rel  # its own output: not written again
        try:
            settled = site.custody.deliver(claim, job.run_id, site.inbox.outbox, job.output_rel,
                                           None if own else data, site.inbox.on_success,
                                           input_sha256=job.input_sha256)
        except (OSError, DeliveryBlocked) as exc:
            self._fail_now(site, claim, job.run_id, f"could not deliver the earlier output: {exc}")
            return True
        if settled is None:
            self.outcomes.put(runs.taken_back(job.run_id))
        elif settled.handed_over and not settled.finished:
            self.outcomes.put(runs.handed_over(job.run_id))
        else:
            self.outcomes.put(runs.skipped(job.run_id, settled.output, earlier_id, settled.parked))
        logger.info("{}: same image and spec as run {}, skipped", shown(job.rel_path), earlier_id)
        self.apply_outcomes()
        return True

    def _fail_now(self, site: Site, claim: Claim, run_id: int, reason: str) -> None:
        reason = on_share(reason, site.inbox.path)  # the note goes to the share: no server paths in it
        self.inflight.setdefault(run_id, InFlight(Job(run_id, site.inbox.name, claim.rel, claim.path, JobSpec(), "",
                                                      "", ticket=claim, root=claim.inbox), site))
        self.outcomes.put(runs.fail_filed(site.custody, claim, run_id, reason))
        self.apply_outcomes()

    # ------------------------------------------------------------------ where every run ends

    def apply_outcomes(self) -> None:
        """Record what the workers reported, in order. A locked database leaves the rest for the next tick."""
        while True:
            if not self._unapplied:
                try:
                    self._unapplied.append(self.outcomes.get_nowait())
                except queue.Empty:
                    break
            outcome = self._unapplied[0]
            try:
                self._apply(outcome)
            except sqlite3.Error as exc:
                if not self._db_trouble:
                    logger.warning("the database is busy ({}); results are kept and recorded when it is free",
                                   exc)
                    self._db_trouble = True
                return
            self._unapplied.popleft()
            if self._db_trouble:
                logger.info("the database is free again; recording the results kept meanwhile")
                self._db_trouble = False

    def _apply(self, outcome: Outcome) -> None:
        if isinstance(outcome, Started):
            self.ledger.start(outcome.run_id, outcome.at)
            return
        if isinstance(outcome, Blocked):
            self._blocked_delivery(outcome)
            return
        result = outcome
        self.ledger.finish(result)
        held = self.inflight.pop(result.run_id, None)
        if self.retries.clear(result.run_id) and result.state == JobState.DONE:
            logger.info("run {}: delivered after waiting for the outbox", result.run_id)
        rel = held.job.rel_path if held is not None else f"run {result.run_id}"
        if result.timings:
            logger.debug("{}: stages {} ; engines {} {}", shown(rel),
                         ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items()),
                         result.mask_engine or "-", result.bg_engine or "")
        if result.state == JobState.DONE:
            logger.info("{}: done -> {} ({:.2f} s)", shown(rel), shown(str(result.output_path)),
                        sum(result.timings.values()))
            if result.error and held is not None:  # delivered, but the original waits in delivering/
                logger.warning("{}: {}", shown(rel), shown(result.error))
                self.waiting_originals[(held.site.inbox.name, held.site.custody.token(result.run_id))] = result.error
        elif result.state == JobState.FAILED:
            logger.error("{}: failed: {}", shown(rel), shown(result.error))
            self.counters.failures += 1
        elif result.state == JobState.SUPERSEDED:
            logger.warning("{}: {}", shown(rel), shown(result.error))
        self.counters.results.append(result)
        if self.on_result is not None:
            self.on_result(result)

    def _blocked_delivery(self, blocked: Blocked) -> None:
        attempts, delay = self.retries.add(blocked.run_id, blocked.finished, blocked.cause, blocked.code,
                                           self.clock())
        note = f"waiting to be delivered: {blocked.cause}; tried {attempts} time(s), again in {delay:.0f} s"
        (logger.warning if attempts == 1 else logger.info)("{}: {}", shown(blocked.finished.job.rel_path),
                                                            shown(note))
        self.ledger.note(blocked.run_id, note)

    # ------------------------------------------------------------------ claims no job holds

    def _sweep(self) -> None:
        """Return to the inbox the claimed files no job holds (a run that could not be recorded, a claim
        left by a daemon of the same name). Seen unheld in two sweeps in a row, so never a claim in the
        making."""
        held: set[tuple[str, str]] = set()
        for item in self.inflight.values():
            claim = item.job.ticket
            if isinstance(claim, Claim):
                held.add((item.job.inbox, claim.name))
                if claim.sidecar:
                    held.add((item.job.inbox, claim.sidecar))
        seen: dict[tuple[str, str], int] = {}
        for name_of_inbox, site in list(self.sites.items()):
            if site.heartbeat.twin or site.waits:
                continue  # another daemon of this name may hold them; or its work folder cannot be opened
            try:
                self._settle_left_deliveries(name_of_inbox, site, seen)
                claimed = site.custody.own_claims()
            except OSError as exc:  # its work folder cannot be opened now (its rights changed): not a crash
                why = shown(str(exc))
                if self._sweep_trouble.get(name_of_inbox) != why:
                    logger.error("{}: cannot look through its work folder: {}", site.inbox.path, why)
                self._sweep_trouble[name_of_inbox] = why
                continue
            self._sweep_trouble.pop(name_of_inbox, None)
            for name in claimed:
                key = (name_of_inbox, name)
                if key in held or key in self.stuck:
                    continue
                seen[key] = self._unheld.get(key, 0) + 1
                if seen[key] >= 2:
                    try:
                        back = site.custody.return_claimed(name)
                    except OSError as exc:
                        logger.error("cannot return the claimed {} to {}: {}", shown(name), site.inbox.path,
                                     shown(str(exc)))
                        self.stuck.add(key)
                        continue
                    del seen[key]
                    if back is not None:
                        logger.warning("{}: claimed but held by no job; returned to the inbox", shown(back))
        self._unheld = seen

    def _settle_left_deliveries(self, name_of_inbox: str, site: Site, seen: dict[tuple[str, str], int]) -> None:
        """A delivery whose original could not be filed (its share went away just after the output was
        written) is finished here once the share is back, rather than at the next start."""
        for token in site.custody.own_deliveries():
            run = token.rsplit("-", 1)[-1]
            if run.isdigit() and int(run) in self.inflight:
                continue  # a worker is delivering it right now
            key = (name_of_inbox, f"delivering/{token}")
            seen[key] = self._unheld.get(key, 0) + 1
            if seen[key] < 2 or key in self.stuck:
                continue
            try:
                settled = site.custody.settle(site.custody.host, token)
            except OSError as exc:
                why = waiting_note(site.custody.host, token, exc)
                if self.waiting_originals.get((name_of_inbox, token)) != why:
                    logger.warning("{}: {}", site.inbox.path, shown(why))
                self.waiting_originals[(name_of_inbox, token)] = why
                continue
            del seen[key]
            self.waiting_originals.pop((name_of_inbox, token), None)
            logger.info("{}: delivery {} {}", site.inbox.path, shown(token),
                        f"finished (original in {shown(str(settled.parked))})" if settled.finished
                        else "undone: back in the inbox")
