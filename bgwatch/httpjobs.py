"""The HTTP door: jobs that arrive over the API (api.py) instead of through a folder.

They share the daemon's queue, loaded models, rate limits, background cache and run history; they have
their own window (`http.window` jobs in the pipeline at once), so a flood of uploads never takes the
folders' room, and a line in front of it (`http.queue` requests, their uploads on disk) where the rest wait
their turn. A request goes through these hands:

  API thread   `reserve()` a place (window + queue; none free, or stopping: 503 with Retry-After); with
               http.limit requests, `book_request()` a rate-limit slot (429 at once when it is further away
               than http.max_wait); the upload is streamed to state_dir/http/uploads/<token>/; `admit()`
               checks it exactly as a folder job is checked (the JobSpec through rules.py, the image header,
               max_pixels, the 4K rule) and, for a generation, whether a token comes within http.max_wait.
               Refusals are `Refused` (the HTTP status and the one-line reason).
  main thread  `tick()` records admitted jobs in the runs table (inbox "http") and hands them to the workers
               while the window has room; the others wait, in order. The daemon's main thread owns that
               table, as for folder jobs.
  workers      prepare -> device -> finish as any job; `deliver()` writes the output to the results folder
               (state_dir/http/results, or OUTPUT_DIR as the original service's).
  main thread  `recorded()` hears of each recorded result, wakes the request waiting for it and lets the
               next waiting job in.

Results are kept `http.keep_hours`, then removed; uploads are removed when their run ends.
"""

from __future__ import annotations

import math
import os
import queue
import secrets
import shutil
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from bgwatch import fileid, rules, runs
from bgwatch.config import Config, InboxConfig, is_loopback, split_listen
from bgwatch.errors import BgwatchError, ConfigError, InputError, SpecError
from bgwatch.httpforms import FORMS, REQUEST, FormField, form_fragment, safe_upload_name
from bgwatch.httpresults import MEDIA_TYPES, ResultsFolder, log_pruned
from bgwatch.jobs import Job, JobSpec, RunResult, job_key
from bgwatch.ratelimit import RequestSchedule, TokenBucket
from bgwatch.storebase import RunStore
from bgwatch.text import shown

if TYPE_CHECKING:
    from bgwatch.metrics import Metrics
    from bgwatch.pipeline.stages import Finished

__all__ = ["FORMS", "HTTP_INBOX", "MEDIA_TYPES", "FormField", "HttpDoor", "Refused", "Ticket", "Upload",
           "form_fragment", "safe_upload_name"]

HTTP_INBOX = "http"  # the runs table's inbox for jobs that came over HTTP
PRUNE_SECONDS = 60.0
MAX_REASON = 600  # characters of a refusal's reason: a 60 KB form value is not echoed whole


class Refused(BgwatchError):
    """The door does not take this request: `status` is the HTTP answer, with a Retry-After when it may
    succeed later. The reason is one line, its length capped (it may quote what a client sent)."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        reason = shown(reason)
        if len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 1] + "…"
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


# ---------------------------------------------------------------- the door


@dataclass(frozen=True, slots=True)
class Upload:
    path: Path  # state_dir/http/uploads/<token>/<name>
    name: str  # the client's file name, made safe


@dataclass(slots=True)
class Ticket:
    """What a request waits on: its run id once recorded, then its result once recorded."""

    recorded: Future[int] = field(default_factory=Future)
    done: Future[RunResult] = field(default_factory=Future)


@dataclass(slots=True)
class _Admitted:
    ticket: Ticket
    upload: Upload
    spec: JobSpec
    sha: str
    output_name: str
    generative: bool
    at: float
    job: Job | None = None  # once recorded
    submitted: bool = False  # handed to the workers (it holds a place in the window)


class HttpDoor:
    """The HTTP door of one daemon (see the module's docstring for which thread calls what)."""

    def __init__(self, config: Config, store: RunStore, generation_bucket: TokenBucket, submit: Callable[[Job], None],
                 outcomes: queue.SimpleQueue[Any], *, depth: Callable[[], int] = lambda: 0,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 wake: threading.Event | None = None) -> None:
        self.config = config
        self.settings = config.http
        self.store = store
        self.ledger = runs.Ledger(store, config.host)  # the runs table is written through it, as for folder jobs
        self.generation_bucket = generation_bucket
        self.submit = submit
        self.outcomes = outcomes
        self.depth = depth
        self.metrics = metrics
        self.clock = clock
        self.wake = wake  # the main thread's: an admitted request is recorded at once, not at the next tick
        root = Path(os.path.abspath(config.state_dir)) / "http"
        self.uploads_dir = root / "uploads"
        self.results = ResultsFolder(self.settings.results_dir or root / "results",
                                     private=self.settings.results_dir is None)
        self.results_dir = self.results.path
        per_minute = config.limits.generations_per_minute
        self.requests = RequestSchedule(per_minute if self.settings.counts_requests else 0.0,
                                        burst=max(1, int(per_minute)))
        self.keys: frozenset[str] = frozenset()
        self.device = config.device  # resolved at open()
        self.server: Any = None  # api.ApiServer once open
        self._lock = threading.Lock()
        self._places = 0  # requests between reserve() and their end: receiving, waiting or in the window
        self._in_window = 0  # jobs handed to the workers and not finished
        self._generating = 0  # admitted generations not finished (each will need a token)
        self._closing = False
        self._submissions: queue.SimpleQueue[_Admitted] = queue.SimpleQueue()
        self._waiting: deque[_Admitted] = deque()  # recorded, waiting for room in the window (main thread)
        self._open: dict[int, _Admitted] = {}
        self._durations: deque[float] = deque(maxlen=20)
        self._engines_seen: set[str] = set()
        self._next_prune = 0.0

    # ------------------------------------------------------------------ lifecycle (main thread)

    def open(self) -> None:
        """Make the folders, settle what a previous process left, then listen."""
        host, port = split_listen(self.config.source or "(built-in config)", "http.listen", self.settings.listen)
        self.keys = self.settings.api_keys()
        if not self.keys and (self.settings.api_keys_file is not None or not is_loopback(host)):
            raise ConfigError(self.settings.api_keys_file or "(none)", "http.api_keys_file",
                              "holds no API key (one bearer token a line)")
        self.uploads_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.results.make()
        for leftover in os.scandir(self.uploads_dir):
            shutil.rmtree(leftover.path, ignore_errors=True)
        for row in self.ledger.open_runs():
            if row.inbox == HTTP_INBOX:
                self.ledger.finish(runs.failed(row.id, "bgwatch stopped before this HTTP request finished; "
                                               "send it again"))
        self.prune_results()
        self.device = resolved_device(self.config.device)  # the open-file limit was raised at start (share_cores)
        from bgwatch.api import ApiServer

        try:
            self.server = ApiServer(self, host, port)
        except OSError as exc:
            raise ConfigError(self.config.source or "(built-in config)", "http.listen",
                              f"cannot listen on {self.settings.listen}: {exc.strerror or exc}") from None
        if self.metrics is not None:
            self.metrics.watch_http(self.health)
        logger.info("HTTP API on {} (docs at /docs){}; results in {}", self.server.url,
                    "; API keys required" if self.keys else "", self.results_dir)

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: new defaults and limits apply to the next requests; the http: section itself
        (address, keys, window, queue) keeps its values until the next start."""
        if config.http != self.settings:
            logger.warning("http: settings change at the next start; keeping {}", self.settings.listen)
        self.config = config

    def stop_accepting(self) -> None:
        """Stopping: new requests are answered 503; those not yet in the window are refused now."""
        with self._lock:
            self._closing = True
        self._refuse_submissions()
        while self._waiting:
            item = self._waiting.popleft()
            assert item.job is not None
            with self._lock:
                self._open.pop(item.job.run_id, None)
            self._finish_unrun(item.job.run_id)
            self._abandon(item, Refused(503, "bgwatch is stopping; send it again in a moment", retry_after=10))

    def close(self) -> None:
        """Stop listening; requests still waiting are answered 503 (their runs are settled at the next start)."""
        self.stop_accepting()
        with self._lock:
            left, self._open = list(self._open.values()), {}
        for item in left:
            self._abandon(item, Refused(503, "bgwatch stopped before this request finished; send it again",
                                        retry_after=10))
        if self.server is not None:
            self.server.stop()
            self.server = None

    def busy(self) -> bool:
        """HTTP jobs recorded and not finished (the daemon drains them on TERM)."""
        with self._lock:
            return bool(self._open)

    @property
    def url(self) -> str:
        return str(self.server.url) if self.server is not None else ""

    # ------------------------------------------------------------------ admission (API threads)

    def reserve(self) -> None:
        """Take a place (the window and the queue behind it), or refuse (503) when every place is taken or
        bgwatch is stopping. The window itself is taken only once the upload has arrived and been checked."""
        with self._lock:
            if self._closing:
                raise Refused(503, "bgwatch is stopping; send it again in a moment", retry_after=10)
            places = self.settings.window + self.settings.queue
            if self._places >= places:
                raise Refused(503, f"the HTTP queue is full ({self.settings.window} jobs in flight, http.window, "
                              f"and {self.settings.queue} waiting, http.queue); send it again later",
                              retry_after=self._retry_after())
            self._places += 1

    def release(self) -> None:
        """Give back a place taken by reserve() for a request that was not admitted."""
        with self._lock:
            self._places = max(0, self._places - 1)

    def book_request(self) -> float:
        """http.limit requests: seconds until this request's rate-limit slot (booked now), or Refused 429
        at once when that is longer than http.max_wait. 0 with http.limit generations."""
        wait = self.requests.book(self.settings.max_wait)
        if wait is None:
            delay = self.requests.delay()
            raise Refused(429, f"the request rate limit (BG_REQS_PER_MIN, limits.generations_per_minute "
                          f"{self.config.limits.generations_per_minute:g}, http.limit requests) has no slot for "
                          f"about {delay:.0f} s, longer than http.max_wait ({self.settings.max_wait:g} s); "
                          "send it again later", retry_after=max(1, math.ceil(delay)))
        return wait

    def new_upload(self, name: str | None) -> Upload:
        folder = self.uploads_dir / secrets.token_hex(8)
        folder.mkdir(mode=0o700)
        safe = safe_upload_name(name)
        return Upload(folder / safe, safe)

    def discard(self, upload: Upload) -> None:
        shutil.rmtree(upload.path.parent, ignore_errors=True)

    def admit(self, operation: str, upload: Upload, fields: Mapping[str, str]) -> Ticket:
        """Check an uploaded image and its parameters as a folder job is checked; queue it for recording.
        Refused: 422 a bad parameter or not an image, 413 over max_pixels or the 4K rule, 429 no generation
        token within http.max_wait."""
        from bgwatch.pipeline import backgrounds, imageio, jobmemory

        try:
            spec = self._resolve(upload, form_fragment(operation, fields))
        except SpecError as exc:
            raise Refused(422, str(exc)) from None
        try:
            width, height = imageio.probe_size(upload.path)
        except InputError as exc:
            # Pillow refuses a header past its own bomb limit before we see the size: too large, not broken
            raise Refused(413 if "pixels" in str(exc) else 422, str(exc)) from None
        try:
            if width * height > self.config.limits.max_pixels:  # decode refuses it from the header, in its words
                imageio.decode(upload.path, max_pixels=self.config.limits.max_pixels)
            backgrounds.check_input_size(spec, width, height, self.config.limits.allow_4k, source=upload.name)
            jobmemory.check_job_memory(width, height, spec, max_memory=self.config.limits.max_memory,
                                       source=upload.name, encoded=os.stat(upload.path).st_size)
        except InputError as exc:
            raise Refused(413, str(exc)) from None
        sha = fileid.sha256_file(upload.path)
        generative = spec.is_generative() and not self._cached(spec, width, height)
        output_name = self.results.name_for(upload.name, spec.output)
        item = _Admitted(Ticket(), upload, spec, sha, output_name, generative, self.clock())
        with self._lock:
            if self._closing:
                raise Refused(503, "bgwatch is stopping; send it again in a moment", retry_after=10)
            if generative:
                wait = self._generation_wait()
                if wait > self.settings.max_wait:
                    raise Refused(429, f"the generation rate limit (limits.generations_per_minute "
                                  f"{self.generation_bucket.per_minute:g}) has no token for about {wait:.0f} s, "
                                  f"longer than http.max_wait ({self.settings.max_wait:g} s); send it again later",
                                  retry_after=max(1, math.ceil(wait)))
                self._generating += 1
        self._submissions.put(item)
        if self.wake is not None:
            self.wake.set()
        return item.ticket

    def _resolve(self, upload: Upload, fragment: rules.Fragment) -> JobSpec:
        """The JobSpec as a folder job's: built-in defaults < config defaults < the endpoint and the request."""
        inbox = InboxConfig(path=self.uploads_dir, outbox=self.results_dir, rules={})
        try:
            return rules.resolve(upload.path, inbox, self.config, sidecar=None, overrides=fragment).spec
        except SpecError as exc:
            if exc.source == rules.OVERRIDES:
                raise SpecError(REQUEST, exc.key, exc.problem, exc.allowed) from None
            raise

    def _cached(self, spec: JobSpec, width: int, height: int) -> bool:
        """A generation whose background is in the cache needs no token."""
        from bgwatch.pipeline.backgrounds import BackgroundRequest

        request = BackgroundRequest.from_spec(spec, width, height, config=self.config)
        return request.cacheable and self.store.get_background(request.cache_key()) is not None

    def _generation_wait(self) -> float:
        """Seconds until a generation admitted now gets its token: the bucket's wait, plus a token for each
        admitted generation not finished yet (an upper bound: some may have taken theirs already)."""
        bucket = self.generation_bucket
        if bucket.unlimited:
            return 0.0
        return bucket.delay() + self._generating * 60.0 / bucket.per_minute

    def _retry_after(self) -> int:
        """About when a place frees: a recent job's time for each window's worth of requests ahead."""
        recent = list(self._durations)
        each = sum(recent) / len(recent) if recent else 2.0
        rounds = max(1, math.ceil(self._places / max(1, self.settings.window)))
        return max(1, math.ceil(each * rounds))

    # ------------------------------------------------------------------ recording (main thread)

    def tick(self) -> None:
        """Record the admitted jobs and let them into the window in turn; remove results past keep_hours."""
        while True:
            try:
                item = self._submissions.get_nowait()
            except queue.Empty:
                break
            self._record(item)
        self._let_in()
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_SECONDS
            self.prune_results()

    def _record(self, item: _Admitted) -> None:
        key = job_key(item.sha, item.spec)
        output = self.results_dir / item.output_name
        try:
            run_id = self.ledger.add(key=key, inbox=HTTP_INBOX, rel_path=item.upload.name,
                                     source_path=str(item.upload.path), input_sha256=item.sha,
                                     spec_json=item.spec.to_json(), output_path=str(output))
        except sqlite3.Error as exc:
            logger.warning("{}: could not record an HTTP job ({}); the client is told to send it again",
                           item.upload.name, exc)
            self._abandon(item, Refused(503, "the database is busy; send it again", retry_after=2))
            return
        item.job = Job(run_id=run_id, inbox=HTTP_INBOX, rel_path=item.upload.name, source=item.upload.path,
                       spec=item.spec, input_sha256=item.sha, key=key, output_rel=item.output_name)
        with self._lock:
            self._open[run_id] = item
        logger.info("{}: queued as run {} (HTTP, {} {})", item.upload.name, run_id, item.spec.operation,
                    item.spec.mode if item.spec.operation == "cleanup" else item.spec.engine)
        item.ticket.recorded.set_result(run_id)
        self._waiting.append(item)

    def _let_in(self) -> None:
        """Hand waiting jobs to the workers while the window has room, oldest first."""
        while self._waiting:
            with self._lock:
                if self._in_window >= self.settings.window:
                    return
                self._in_window += 1
                item = self._waiting.popleft()
                item.submitted = True
            assert item.job is not None
            self.submit(item.job)

    def recorded(self, result: RunResult) -> None:
        """A run's end was recorded (Intake's on_result): wake its request, free its place, let the next in."""
        for label in (result.mask_engine, result.bg_engine):
            if label:
                self._engines_seen.add(label)
        with self._lock:
            item = self._open.pop(result.run_id, None)
            if item is None:
                return
            self._release(item)
            self._durations.append(max(0.0, self.clock() - item.at))
        self.discard(item.upload)
        if not item.ticket.done.done():
            item.ticket.done.set_result(result)
        if not self._closing:
            self._let_in()

    def knows(self, run_id: int) -> bool:
        with self._lock:
            return run_id in self._open

    def _release(self, item: _Admitted) -> None:
        """Under the lock: the item's place, its window slot and its generation count are given back."""
        self._places = max(0, self._places - 1)
        if item.submitted:
            item.submitted = False
            self._in_window = max(0, self._in_window - 1)
        if item.generative:
            item.generative = False
            self._generating = max(0, self._generating - 1)

    def _finish_unrun(self, run_id: int) -> None:
        try:
            self.ledger.finish(runs.failed(run_id, "bgwatch stopped before this HTTP request was processed; "
                                           "send it again"))
        except sqlite3.Error as exc:
            logger.warning("run {}: could not be marked failed ({}); the next start settles it", run_id, exc)

    def _refuse_submissions(self) -> None:
        while True:
            try:
                item = self._submissions.get_nowait()
            except queue.Empty:
                return
            self._abandon(item, Refused(503, "bgwatch is stopping; send it again in a moment", retry_after=10))

    def _abandon(self, item: _Admitted, why: Refused) -> None:
        with self._lock:
            self._release(item)
        self.discard(item.upload)
        for future in (item.ticket.recorded, item.ticket.done):
            if not future.done():
                future.set_exception(why)

    # ------------------------------------------------------------------ delivery (finish workers)

    def deliver(self, finished: Finished) -> None:
        """Write a finished HTTP job's output and report it (the main thread records it)."""
        job = finished.job
        target = self.results.write(job.output_rel, finished.data)
        self.outcomes.put(runs.done(job.run_id, target, finished))

    # ------------------------------------------------------------------ results

    def prune_results(self, now: float | None = None) -> int:
        """Remove this door's results older than http.keep_hours; returns how many."""
        removed = self.results.prune((self.clock() if now is None else now) - self.settings.keep_hours * 3600)
        log_pruned(removed, self.settings.keep_hours)
        return removed

    def result_bytes(self, name: str) -> tuple[bytes, str] | None:
        """A result this door wrote, by its bare name, with its media type (httpresults.ResultsFolder.read)."""
        return self.results.read(name)

    def run_record(self, run_id: int) -> dict[str, Any] | None:
        """An HTTP run as GET /runs/{id} shows it; None for a run that did not come over HTTP."""
        return self.results.run_record(self.store, run_id, HTTP_INBOX)

    def health(self) -> dict[str, Any]:
        """The original service's answer (status healthy, engine, device) beside bgwatch's own fields."""
        from bgwatch import __version__

        torch = sys.modules.get("torch")  # only if an engine loaded it
        gpu = None
        if torch is not None:
            try:
                gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            except Exception:
                gpu = None
        engine = str(self.config.defaults.get("engine") or JobSpec().engine)
        with self._lock:
            places, in_window = self._places, self._in_window
        return {"status": "stopping" if self._closing else "healthy", "engine": engine.upper(),
                "device": self.device, "version": __version__, "configured_device": self.config.device, "gpu": gpu,
                "engines_loaded": sorted(self._engines_seen), "queue_depth": self.depth(),
                "http_in_flight": in_window, "http_waiting": max(0, places - in_window),
                "http_window": self.settings.window, "http_queue": self.settings.queue,
                "rate_limit": self.settings.limit or "generations",
                "connections": self.server.guard.stats() if self.server is not None else {}}


def resolved_device(device: str) -> str:
    """What `auto` comes to on this machine (cuda or cpu), as the masks' ONNX Runtime resolves it."""
    if device != "auto":
        return device
    try:
        from bgwatch.pipeline.masking import resolve_onnx_device

        return resolve_onnx_device(device)
    except (BgwatchError, ImportError, OSError):
        return "cpu"
