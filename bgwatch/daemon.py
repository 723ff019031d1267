"""The daemon: wires watcher -> intake -> prepare -> device -> finish -> outbox, and keeps going.

Threads: the main thread runs intake (claims stable files while this host has room in its window,
resolves specs, records runs) and the signal flags; a pool prepares, one worker per device infers with
its models loaded, a pool finishes and writes. Stages are joined by bounded queues, so memory stays
flat however many files arrive. SQLite is the truth for every claimed job; queues hold ids and
in-flight images only. Signal handlers only set flags: TERM drains, HUP reloads config.yaml.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from loguru import logger

from bgwatch import outbox
from bgwatch.config import Config, InboxConfig, load_config
from bgwatch.errors import BgwatchError
from bgwatch.jobs import Job, JobSpec, JobState, RunResult
from bgwatch.pipeline import stages
from bgwatch.ratelimit import TokenBucket
from bgwatch.store import Store

_STOP = object()
STATUS_FILE = "status.json"
STATUS_SECONDS = 2.0
RECENT_RESULTS = 1000


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.debug("sd_notify failed: {}", exc)


class InstanceLock:
    """One daemon per state folder: its 'running' rows are then orphans after a crash, by definition."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "bgwatch.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise BgwatchError(
                f"another bgwatch is already running with state folder {state_dir} (lock {self.path})"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        os.close(self._fd)

    @staticmethod
    def held(state_dir: Path) -> bool:
        path = state_dir / "bgwatch.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


class Daemon:
    """One bgwatch process. `run()` blocks until stopped (or, with once=True, until the inboxes are empty)."""

    def __init__(self, config: Config, *, once: bool = False,
                 on_result: Callable[[RunResult], None] | None = None) -> None:
        self.config = config
        self.once = once
        self.on_result = on_result
        self.stop_event = threading.Event()  # stop taking work; drain
        self.abort_event = threading.Event()  # workers exit now
        self._reload_requested = threading.Event()
        self.store = Store(config.db_path)
        self.outbox = outbox.Outbox(self._owner_of)
        self.job_bucket = TokenBucket(config.limits.jobs_per_minute)
        self.generation_bucket = TokenBucket(config.limits.generations_per_minute)
        self.engines = stages.Engines(config, self.store, self.generation_bucket, self.abort_event)
        self.inflight: set[int] = set()
        self._inflight_lock = threading.Lock()
        # --once keeps every result for its summary table; a long-running daemon keeps the recent ones
        # (SQLite has them all), so its memory does not grow with the files it has seen.
        self.results: deque[RunResult] = deque(maxlen=None if once else RECENT_RESULTS)
        self.failures = 0
        self.prepare_q: queue.Queue[Any] = queue.Queue()  # run ids: cheap, so unbounded
        self.device_q: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.finish_q: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.threads: list[threading.Thread] = []
        self._config_mtime = self._mtime(config.source)
        from bgwatch.intake import Intake

        self.intake = Intake(self)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _mtime(path: Path | None) -> float | None:
        try:
            return path.stat().st_mtime if path is not None else None
        except OSError:
            return None

    def _owner_of(self, output: Path) -> str | None:
        return self.store.output_owner(str(output))

    def inbox_named(self, name: str) -> InboxConfig | None:
        return next((ib for ib in self.config.inboxes if ib.name == name), None)

    @property
    def window(self) -> int:
        return self.config.pipeline.window_per_worker

    def room(self) -> int:
        with self._inflight_lock:
            return self.window - len(self.inflight)

    def busy(self) -> bool:
        with self._inflight_lock:
            return bool(self.inflight)

    def enqueue(self, run_id: int) -> None:
        with self._inflight_lock:
            self.inflight.add(run_id)
        self.prepare_q.put(run_id)

    def job_for(self, run_id: int) -> Job:
        """The job of a recorded run: its spec comes back from spec_json exactly as it was resolved."""
        row = self.store.get_run(run_id)
        if row is None:
            raise BgwatchError(f"run {run_id} is not in the database")
        return Job(run_id=run_id, inbox=row["inbox"], rel_path=row["rel_path"], source=Path(row["source_path"]),
                   spec=JobSpec.from_dict(json.loads(row["spec_json"])), input_sha256=row["input_sha256"],
                   key=row["key"])

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        self.stop_event.set()

    def request_reload(self) -> None:
        self._reload_requested.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def _start_threads(self) -> None:
        specs = [("prepare", self._prepare_loop, self.config.pipeline.prepare_threads),
                 ("device", self._device_loop, 1),
                 ("finish", self._finish_loop, self.config.pipeline.finish_threads),
                 ("heartbeat", self._heartbeat_loop, 1)]
        for name, target, count in specs:
            for i in range(count):
                thread = threading.Thread(target=target, name=f"bgwatch-{name}-{i}", daemon=True)
                thread.start()
                self.threads.append(thread)

    def run(self) -> int:
        lock = InstanceLock(self.config.state_dir)
        try:
            self.intake.heartbeat()  # before anything: a host back from a long stop must not look dead
            self.intake.recover()
            self._start_threads()
            self.intake.start()
            sd_notify("READY=1")
            logger.info("bgwatch watching {} inbox(es) as host {}", len(self.config.inboxes), self.config.host)
            next_status = 0.0
            while not self.stop_event.is_set():
                self._maybe_reload()
                self.intake.tick()
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + STATUS_SECONDS
                    self._publish_status()
                if self.once and self.intake.idle() and not self.busy():
                    break
                self.stop_event.wait(0.1)
            sd_notify("STOPPING=1")
            self._drain()
        finally:
            self.intake.stop()
            self.abort_event.set()
            for _ in self.threads:
                self.prepare_q.put(_STOP)
            for thread in self.threads:
                thread.join(timeout=5)
            self.store.close()
            lock.release()
        return 1 if self.failures else 0

    def _publish_status(self) -> None:
        """state_dir/status.json for `bgwatch status`, and systemd's STATUS line."""
        watcher = self.intake.watcher
        inboxes = [] if watcher is None else [
            {"path": str(s.inbox.path), "healthy": s.healthy, "observer": s.observer, "problem": s.problem,
             "restarts": s.restarts, "settling": s.tracked} for s in watcher.status()]
        with self._inflight_lock:
            inflight = len(self.inflight)
        status = {"pid": os.getpid(), "host": self.config.host, "updated_at": time.time(), "in_flight": inflight,
                  "waiting": len(self.intake.pending), "inboxes": inboxes}
        try:
            outbox.atomic_write(self.config.state_dir / STATUS_FILE, json.dumps(status, indent=1).encode())
        except OSError as exc:
            logger.warning("cannot write {}: {}", STATUS_FILE, exc)
        unhealthy = [i["path"] for i in inboxes if not i["healthy"]]
        sd_notify(f"STATUS={inflight} in flight, {len(self.intake.pending)} waiting"
                  + (f"; not watching: {', '.join(unhealthy)}" if unhealthy else ""))

    def _drain(self) -> None:
        """Finish what is claimed (TERM: a systemd stop waits for in-flight work, then exits)."""
        if self.busy():
            logger.info("draining {} job(s) in flight", len(self.inflight))
        while self.busy():
            time.sleep(0.05)

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
        old = self.config
        self.engines.reconfigure(new)
        self.config = new
        self.job_bucket.set_rate(new.limits.jobs_per_minute)
        self.generation_bucket.set_rate(new.limits.generations_per_minute)
        if [(ib.path, ib.poll) for ib in old.inboxes] != [(ib.path, ib.poll) for ib in new.inboxes] or (
                old.watch != new.watch):
            self.intake.restart_watcher()
        logger.info("config reloaded from {}", new.source)

    # ------------------------------------------------------------------ stage workers

    def _prepare_loop(self) -> None:
        while True:
            run_id = self.prepare_q.get()
            if run_id is _STOP or self.abort_event.is_set():
                return
            try:
                job = self.job_for(run_id)
            except (BgwatchError, OSError, ValueError, TypeError) as exc:
                logger.error("run {}: cannot load its job (left claimed for the next start): {}", run_id, exc)
                self._done_with(run_id)
                continue
            if not self.job_bucket.acquire(self.abort_event):
                return
            self.store.start_run(run_id, self.config.host, self.config.watch.lease_seconds)
            self._guard(job, lambda job=job: self.device_q.put(stages.prepare(job, self.config)))

    def _device_loop(self) -> None:
        while not self.abort_event.is_set():
            self.engines.between_jobs()
            try:
                prepared = self.device_q.get(timeout=0.2)
            except queue.Empty:
                continue
            self._guard(prepared.job, lambda p=prepared: self.finish_q.put(stages.infer(p, self.engines)))

    def _finish_loop(self) -> None:
        while not self.abort_event.is_set():
            try:
                inferred = self.finish_q.get(timeout=0.2)
            except queue.Empty:
                continue
            job = inferred.prepared.job
            self._guard(job, lambda i=inferred: self.intake.complete(stages.finish(i)))

    def _guard(self, job: Job, work: Callable[[], None]) -> None:
        """Run one stage of a job; whatever goes wrong fails that job only, and the daemon carries on."""
        try:
            work()
        except BgwatchError as exc:
            if self.abort_event.is_set():  # stopping: the row stays open and the next start takes it again
                logger.warning("run {}: interrupted by shutdown; it will be taken again at the next start",
                               job.run_id)
                self._done_with(job.run_id)
                return
            self._fail(job, str(exc))
        except MemoryError:
            self._fail(job, "out of memory while processing this image; try a smaller image")
        except OSError as exc:
            self._fail(job, f"file system error: {exc}")
        except Exception as exc:  # a bug must cost one job, not the daemon: logged with its traceback
            logger.exception("run {}: unexpected error", job.run_id)
            self._fail(job, f"internal error ({type(exc).__name__}: {exc}); see logs/error.log")

    def _fail(self, job: Job, reason: str) -> None:
        """Record a failure; if even that fails (database locked, share gone), the worker still lives."""
        try:
            self.intake.fail(job, reason)
        except Exception:  # the worker thread must survive; the row is retaken at the next start
            logger.exception("run {}: could not record its failure ({})", job.run_id, reason)
        finally:
            self._done_with(job.run_id)

    def _done_with(self, run_id: int) -> None:
        with self._inflight_lock:
            self.inflight.discard(run_id)

    def record(self, result: RunResult) -> None:
        self.results.append(result)
        if result.state == JobState.FAILED:
            self.failures += 1
        if self.on_result is not None:
            self.on_result(result)
        self._done_with(result.run_id)

    def _heartbeat_loop(self) -> None:
        interval = max(0.5, min(10.0, self.config.watch.lease_seconds / 3))
        while not self.abort_event.wait(interval):
            try:
                self.intake.heartbeat()
                with self._inflight_lock:
                    running = list(self.inflight)
                for run_id in running:
                    self.store.renew_lease(run_id, self.config.watch.lease_seconds)
                sd_notify("WATCHDOG=1")
            except (OSError, BgwatchError) as exc:
                logger.warning("heartbeat: {}", exc)
