"""The daemon: wires watcher -> intake -> workers (prepare, mask, gate, device, finish) -> custody.

Threads: the main thread runs the intake (claims, records runs, records outcomes) and the signal flags;
the stage workers (workers.py) prepare, mask, generate and finish; the finish pool writes the output and
files the original (fenced, through custody). Workers hand outcomes back on the intake's queue and
never touch the runs table. A heartbeat thread beats and returns silent hosts' claims; it never touches
SQLite and never dies of an exception. systemd's watchdog is pinged by the main loop only while every
busy worker has made progress within `pipeline.stall_seconds`.

Signals only set flags: TERM drains (at most `pipeline.stop_timeout`; a second TERM or INT exits at once,
leaving the open jobs for the next start), HUP reloads config.yaml.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from bgwatch import safefs
from bgwatch.budget import MemoryBudget
from bgwatch.config import Config, load_config
from bgwatch.coordination.share import ShareCoordinator
from bgwatch.custody import Custody, Step
from bgwatch.errors import BgwatchError
from bgwatch.intake import Intake, Site
from bgwatch.jobs import Job, RunResult
from bgwatch.liveness import Heartbeat, Liveness, new_epoch
from bgwatch.outcomes import Started
from bgwatch.pipeline import stages
from bgwatch.ratelimit import TokenBucket
from bgwatch.service import STATUS_FILE, InstanceLock, Progress, sd_notify, share_cores, trim_memory
from bgwatch.sources import JobSource
from bgwatch.sources.folder import FolderSource
from bgwatch.storebase import StudioStore, open_store
from bgwatch.studio import generation_bucket, watch_studio
from bgwatch.text import shown
from bgwatch.workers import Workers

if TYPE_CHECKING:
    from bgwatch.httpjobs import HttpDoor
    from bgwatch.metrics import Metrics

STATUS_SECONDS = 2.0


class Daemon:
    """One bgwatch process. `run()` blocks until stopped (or, with once=True, until the inboxes are empty)."""

    def __init__(self, config: Config, *, once: bool = False,
                 on_result: Callable[[RunResult], None] | None = None, metrics: Metrics | None = None,
                 http: bool = False, step: Step | None = None) -> None:
        self.config = config
        self.step = step  # named moments of a delivery (custody.Step): the fault suite's seam, None in production
        self.metrics = metrics
        self.once = once
        self.epoch = new_epoch()
        self.stop_event = threading.Event()  # stop taking work; drain
        self.force_event = threading.Event()  # a second signal: leave now
        self.abort_event = threading.Event()  # workers exit now
        self._reload_requested = threading.Event()
        self._signals: deque[int] = deque()  # noted by the signal handlers, acted on by the main loop
        self.store = open_store(config.store, sqlite_path=config.db_path, host=config.host)
        self.job_bucket = TokenBucket(config.limits.jobs_per_minute)
        self.budget = MemoryBudget(config.limits.max_memory)
        self.generation_bucket = generation_bucket(self.store, config.limits.generations_per_minute)
        if metrics is not None:
            watch_studio(metrics, self.store, config.watch.lease_seconds)  # every host, on a studio store
        self.engines = stages.Engines(config, self.store, self.generation_bucket, self.abort_event)
        self.liveness = Liveness()
        self.sites = self._sites(config, {})
        self._on_result = on_result
        self.intake = Intake(config, self.store, self.sites, self._submit, once=once,
                             on_result=self._result_recorded)
        self.progress = Progress()
        self.workers = Workers(config, self.engines, budget=self.budget, job_bucket=self.job_bucket,
                               progress=self.progress, abort=self.abort_event, started=self._started,
                               deliver=self._deliver, fail=self._fail)
        self.heartbeat_thread: threading.Thread | None = None
        self._retry_thread: threading.Thread | None = None
        self._retry_q: queue.SimpleQueue[tuple[stages.Finished, bool] | None] = queue.SimpleQueue()
        # Where jobs come from: the inboxes, and the HTTP door when it listens. Each job is handed back to the
        # source whose ticket it carries; the daemon never asks where a job came from.
        self.sources: list[JobSource] = [FolderSource(self.intake, config.host, self.epoch, self._sites)]
        self.http: HttpDoor | None = None
        if http:  # the HTTP door (http.listen): its own window in the same queue; its runs recorded here
            from bgwatch.httpjobs import HttpDoor
            from bgwatch.sources.http import HttpSource

            self.http = HttpDoor(config, self.store, self.generation_bucket, self._submit, self.intake.outcomes,
                                 depth=lambda: sum(self.workers.depths().values()), metrics=metrics,
                                 wake=self.intake.wake)
            self.sources.append(HttpSource(self.http, self.intake.outcomes))
        self._config_mtime = self._mtime(config.source)
        self._status_trouble = False
        self._last_heartbeat = time.monotonic()
        self._next_watchdog = 0.0
        usec = os.environ.get("WATCHDOG_USEC", "")
        self._watchdog_every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else 5.0

    @property
    def results(self) -> deque[RunResult]:
        return self.intake.counters.results

    @property
    def failures(self) -> int:
        return self.intake.counters.failures

    def _sites(self, config: Config, old: dict[str, Site]) -> dict[str, Site]:
        sites: dict[str, Site] = {}
        for inbox in config.inboxes:
            before = old.get(inbox.name)
            heartbeat = before.heartbeat if before is not None else Heartbeat(
                inbox.path, config.host, self.epoch, config.watch.lease_seconds)
            heartbeat.lease_seconds = config.watch.lease_seconds
            custody = Custody(inbox.path, config.host, self.epoch, inbox.outbox, step=self.step)
            # A studio store coordinates through its rows; otherwise the share does, with renames and heartbeat files.
            coordinator = None
            if isinstance(self.store, StudioStore):
                from bgwatch.coordination.postgres import studio_coordinator

                coordinator = studio_coordinator(self.store, custody, config.watch.lease_seconds,
                                                 in_flight=lambda: len(self.intake.inflight))
            sites[inbox.name] = Site(inbox, custody, heartbeat,
                                     coordinator or ShareCoordinator(custody, heartbeat, self.liveness),
                                     waits=before.waits if before is not None else "")
        return sites

    @staticmethod
    def _mtime(path: Path | None) -> float | None:
        try:
            return path.stat().st_mtime if path is not None else None
        except OSError:
            return None

    def _submit(self, job: Job) -> None:
        self.workers.submit(job)

    def _started(self, job: Job) -> None:
        self.intake.outcomes.put(Started(job.run_id, time.time()))

    def _result_recorded(self, result: RunResult) -> None:
        """The caller's on_result, then each source (the HTTP door wakes the request waiting for it)."""
        if self._on_result is not None:
            self._on_result(result)
        for source in self.sources:
            source.recorded(result)

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        if self.stop_event.is_set():
            self.force_event.set()
        self.stop_event.set()
        self.intake.wake.set()

    def request_reload(self) -> None:
        self._reload_requested.set()
        self.intake.wake.set()

    def install_signal_handlers(self) -> None:
        """Handlers only note the signal (a deque append takes no lock: a handler that set an Event could
        deadlock on the lock the interrupted main thread holds); the main loop acts on it within 0.1 s."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda number, _frame: self._signals.append(number))

    def _take_signals(self) -> None:
        while self._signals:
            if self._signals.popleft() == signal.SIGHUP:
                self.request_reload()
            else:
                self.request_stop()

    def _start_threads(self) -> None:
        self.workers.start()
        self.heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="bgwatch-heartbeat-0",
                                                 daemon=True)
        self.heartbeat_thread.start()
        self._retry_thread = threading.Thread(target=self._retry_loop, name="bgwatch-redeliver-0", daemon=True)
        self._retry_thread.start()

    def run(self) -> int:
        lock = InstanceLock(self.config.state_dir)
        clean = False
        if not self.once or any(_has_image(inbox.path) for inbox in self.config.inboxes):
            # The mask nets load while the rest starts (store, recovery, watches): not for a --once run
            # over empty inboxes, which would only wait for them.
            threading.Thread(target=self.workers.warm_masks, name="bgwatch-warm-0", daemon=True).start()
        try:
            self.store.check()
            self._make_outboxes()
            from bgwatch.pipeline.masking import cpu_cores

            pipeline = self.config.pipeline
            share_cores(cpu_cores(), pipeline.prepare_threads + pipeline.finish_threads)
            self._beat()  # before anything: a host back from a long stop must not look dead
            self.intake.ledger.replay()  # endings the store could not take before a kill, before recovery reads runs
            for source in reversed(self.sources):  # the door first: it fails its own leftovers, then listens
                for job in source.recover():
                    self._submit(job)
            self._start_threads()
            self.intake.start()
            sd_notify("READY=1")
            logger.info("bgwatch watching {} inbox(es) as host {}", len(self.config.inboxes), self.config.host)
            next_status = 0.0
            was_busy = False
            while True:
                self.intake.wake.clear()  # before the tick: a wake during it is not lost
                self._take_signals()
                if self.stop_event.is_set():
                    break
                self._maybe_reload()
                for source in self.sources:
                    source.poll()
                    source.sweep()
                for item in self.intake.retries.due(time.monotonic()):
                    self._retry_q.put(item)
                busy = self.intake.busy()
                if was_busy and not busy:
                    trim_memory()  # a burst is over: memory goes back to the machine
                was_busy = busy
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + STATUS_SECONDS
                    self._publish_status()
                self._watchdog()
                if self.once and self.intake.idle() and not self.intake.busy():
                    break
                # A close-after-write, an outcome or a signal wakes the loop at once; rescans, settle
                # waits and the status tick need no more than a tenth of a second.
                self.intake.wake.wait(0.1)
            sd_notify("STOPPING=1")
            for source in self.sources:
                source.stop_accepting()
            self._drain()
            clean = True
        finally:
            for source in self.sources:
                source.close()
            self.abort_event.set()
            self._retry_q.put(None)
            alive = self.workers.stop(timeout=5)
            if self.heartbeat_thread is not None:
                self.heartbeat_thread.join(timeout=1)
                if self.heartbeat_thread.is_alive():
                    alive.append(self.heartbeat_thread.name)
            self.intake.apply_outcomes()
            if alive:  # stuck in a job (a hung GPU call): the store stays open for it; the process ends anyway
                logger.warning("leaving with {} still busy; their jobs are taken again at the next start",
                               ", ".join(alive))
            else:
                self.store.close()
            if clean and not self.intake.inflight:
                for site in self.sites.values():
                    site.heartbeat.remove()
            lock.release()
        return 1 if self.once and (self.failures or self.left_behind()) else 0

    def left_behind(self) -> int:
        """Inputs `--once` leaves in the inboxes (not files bgwatch reads, or waiting for a share): said once
        each in the log; a script sees exit 1."""
        left = len(self.intake.watcher.left()) if self.intake.watcher is not None else 0
        left += len(self.intake.pending)
        if left:
            logger.warning("{} file(s) left in the inboxes, not processed (see the warnings above)", left)
        return left

    def _make_outboxes(self) -> None:
        """Outboxes are the operator's folders, made at start when missing (inboxes never are). One that
        cannot be made is reported; its inbox is not claimed from until it exists."""
        for inbox in self.config.inboxes:
            try:
                inbox.outbox.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                logger.error("cannot make the outbox {}: {}", inbox.outbox, exc)

    def _drain(self) -> None:
        """Finish what is in flight, for at most stop_timeout; a second signal leaves at once."""
        deadline = time.monotonic() + self.config.pipeline.stop_timeout
        if self.intake.busy():
            logger.info("draining {} job(s) in flight (at most {:g} s; signal again to leave now)",
                        len(self.intake.inflight), self.config.pipeline.stop_timeout)
        while any(source.busy() for source in self.sources) and (
                not self.force_event.is_set() and time.monotonic() < deadline):
            self.intake.apply_outcomes()
            self._watchdog()
            time.sleep(0.05)
            self._take_signals()
        if self.intake.inflight:
            logger.warning("stopping with {} job(s) unfinished; they are taken again at the next start",
                           len(self.intake.inflight))

    def _watchdog(self) -> None:
        """WATCHDOG=1 only when the main loop (we are in it), the heartbeat and every busy worker progress."""
        stalled = self.progress.stalled(self.config.pipeline.stall_seconds)
        heartbeat_age = time.monotonic() - self._last_heartbeat
        if stalled:
            return
        if heartbeat_age > max(3 * self._heartbeat_interval(), 30.0):
            return
        if self.metrics is not None:
            self.metrics.heartbeat()
        now = time.monotonic()
        if now >= self._next_watchdog:  # at half systemd's WatchdogSec, as sd_watchdog_enabled(3) advises
            self._next_watchdog = now + self._watchdog_every
            sd_notify("WATCHDOG=1")

    def _publish_status(self) -> None:
        """state_dir/status.json for `bgwatch status`, and systemd's STATUS line."""
        watcher = self.intake.watcher
        inboxes = [] if watcher is None else [
            {"path": str(s.inbox.path), "healthy": s.healthy, "observer": s.observer, "problem": s.problem,
             "restarts": s.restarts, "settling": s.tracked,
             "claiming": self.sites[s.inbox.name].coordinator.may_claim() if s.inbox.name in self.sites else False}
            for s in watcher.status()]
        inflight = len(self.intake.inflight)
        status = {"pid": os.getpid(), "host": self.config.host, "epoch": self.epoch, "updated_at": time.time(),
                  "in_flight": inflight, "waiting": len(self.intake.pending),
                  "stages": {"handled": self.workers.handled(), "waiting": self.workers.depths()},
                  "left": len(watcher.left()) if watcher is not None else 0, "inboxes": inboxes,
                  "problems": self._problems(), "storage_errors": dict(self.intake.retries.errors)}
        if self.metrics is not None:
            for stage, depth in self.workers.depths().items():
                self.metrics.queue_depth(stage, depth)
        try:
            # Atomic (a reader sees a whole file) but not fsynced: it is rewritten every STATUS_SECONDS, and once
            # this process is gone it says nothing true, whether a power cut kept it or not (live_status reads
            # a damaged one as none). Two fsyncs every 2 s held up the main loop, and with it the claims.
            safefs.write_file_atomic(self.config.state_dir / STATUS_FILE, json.dumps(status, indent=1).encode(),
                                     sync=False)
        except OSError as exc:  # a full state disk: said once, not every STATUS_SECONDS
            if not self._status_trouble:
                logger.warning("cannot write {}: {} (said once until it works again)", STATUS_FILE,
                               exc.strerror or exc)
            self._status_trouble = True
        else:
            if self._status_trouble:
                logger.info("{} written again", STATUS_FILE)
            self._status_trouble = False
        unhealthy = [i["path"] for i in inboxes if not i["healthy"]]
        sd_notify(f"STATUS={inflight} in flight, {len(self.intake.pending)} waiting"
                  + (f"; not watching: {', '.join(str(u) for u in unhealthy)}" if unhealthy else ""))

    def _problems(self) -> list[str]:
        """What keeps work from ending as it should, one line each, for `bgwatch status`."""
        lines = [f"not delivered yet, {p}" for p in self.intake.retries.problems()]
        lines += [f"original waiting in {name}'s delivering/{token}: {why}"
                  for (name, token), why in sorted(self.intake.waiting_originals.items())]
        for source in self.sources:
            lines += source.problems()
        for site in self.sites.values():
            why = site.coordinator.why_not_claiming()
            if why:
                lines.append(f"not claiming in {site.inbox.path}: {why}")
        return lines

    def _maybe_reload(self) -> None:
        mtime = self._mtime(self.config.source)
        if not self._reload_requested.is_set() and mtime == self._config_mtime:
            return
        self._reload_requested.clear()
        self._config_mtime = mtime
        if self.config.source is None:
            return
        try:
            new = load_config(self.config.source)
        except BgwatchError as exc:
            logger.error("config reload refused, keeping the running config: {}", exc)
            return
        if new.state_dir.resolve() != self.config.state_dir.resolve():
            logger.warning("state_dir changes need a restart; keeping {}", self.config.state_dir)
            new = replace(new, state_dir=self.config.state_dir)
        if new.host != self.config.host:
            logger.warning("host changes need a restart; keeping {}", self.config.host)
            new = replace(new, host=self.config.host)
        self.engines.reconfigure(new)
        self.workers.reconfigure(new)
        self.config = new
        self.job_bucket.set_rate(new.limits.jobs_per_minute)
        self.budget.set_total(new.limits.max_memory)
        self.generation_bucket.set_rate(new.limits.generations_per_minute)
        for source in self.sources:
            source.reconfigure(new)
        self.sites = self.intake.sites  # the folder source's, rebuilt for the new inboxes
        self._make_outboxes()
        logger.info("config reloaded from {}", new.source)

    # ------------------------------------------------------------------ results from the workers

    def _source(self, job: Job) -> JobSource:
        return next((source for source in self.sources if source.owns(job)), self.sources[0])

    def _deliver(self, finished: stages.Finished, last_try: bool = False) -> None:
        """A finish worker (or the redelivery thread): the job's source delivers it and says how it ended."""
        self._source(finished.job).deliver(finished, last_try)

    def _retry_loop(self) -> None:
        """Deliveries that waited for storage, tried again one at a time, off the main thread."""
        while True:
            item = self._retry_q.get()
            if item is None or self.abort_event.is_set():
                return
            finished, last_try = item
            try:
                self._deliver(finished, last_try)
            except Exception as exc:  # this thread must survive; the run is failed with the reason
                logger.exception("run {}: redelivery failed", finished.job.run_id)
                self._fail(finished.job, f"internal error while delivering ({type(exc).__name__}: {exc})")

    def _fail(self, job: Job, reason: str) -> None:
        """The job's source files its failure and reports it; the worker survives whatever happens here."""
        self.budget.release(job.run_id)
        try:
            self._source(job).fail(job, reason)
        except Exception:  # the worker thread must survive; the run is taken again at the next start
            logger.exception("run {}: could not file its failure ({})", job.run_id, shown(reason))

    # ------------------------------------------------------------------ heartbeat

    def _heartbeat_interval(self) -> float:
        return max(0.5, min(10.0, self.config.watch.lease_seconds / 4))

    def _beat(self) -> None:
        """Beat in every inbox and note the hosts silent longer than the lease. No SQLite here, and nothing
        read that another host wrote but heartbeats (markers are read by the main thread, in reclaim)."""
        for source in self.sources:
            source.beat()
        self._last_heartbeat = time.monotonic()

    def _heartbeat_loop(self) -> None:
        while not self.abort_event.wait(self._heartbeat_interval()):
            try:
                self._beat()
            except Exception:  # the heartbeat must never die: a dead heartbeat gets this host's claims taken
                logger.exception("heartbeat: unexpected error; beating again in {:g} s", self._heartbeat_interval())


def _has_image(folder: Path) -> bool:
    """Whether an image waits anywhere below an inbox; stops at the first, and never looks into the work
    folders (done/ may hold years of originals) or anything else the watcher ignores."""
    from bgwatch.sidecars import IMAGE_SUFFIXES, is_ignored

    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    path = Path(entry.path)
                    if is_ignored(path.relative_to(folder)):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(path)
                    elif path.suffix.lower() in IMAGE_SUFFIXES and entry.is_file(follow_symlinks=False):
                        return True
        except OSError:
            continue
    return False
