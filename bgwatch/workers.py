"""The daemon's workers: which thread runs which stage of a job, and how a job moves between them.

    prepare (pool) ─┬─> mask (CPU pool) ─┐
                    ├─> device (ONNX Runtime on CUDA) ─┐
                    ├─> gate (one thread) ─> device (sdxl) ─> collect (one thread) ─┐
                    │                     └─> remote (small pool: Runway) ──────────┤
                    └───────────────────────────────────────────────────────────────┴─> finish (pool)

A job visits only the stages it still needs (`route`). The device worker does nothing but the accelerator's
work: the generation rate limit is waited for at the gate, before a job reaches it; cache hits, colour,
gradient and image backdrops and classical masks are made in the prepare pool; Runway tasks (HTTP polling
for minutes) run on their own pool; the device starts the next generation while the collector waits for
the last one's pixels. Jobs in flight that ask for the same cacheable backdrop share one generation.

Queues between stages are unbounded: the intake's window (pipeline.window_per_worker) and the memory
budget (limits.max_memory) bound what is in flight, so a thread never blocks on a full queue and a big
image never holds a small one behind it. The device queue puts masks before generations.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loguru import logger

from bgwatch.errors import BgwatchError
from bgwatch.pipeline import jobmemory, stages

if TYPE_CHECKING:
    import numpy as np

    from bgwatch.budget import MemoryBudget
    from bgwatch.config import Config
    from bgwatch.jobs import Job
    from bgwatch.ratelimit import TokenBucket
    from bgwatch.service import Progress

GENERATED_ON_DEVICE = frozenset({"sdxl"})  # the other generative engines (runway) are remote
_POLL = 0.2  # seconds a worker waits on its queue before looking at the abort flag again


class Aborted(Exception):
    """The daemon is leaving while a stage waited (memory, the rate limit)."""


@dataclass(slots=True)
class _Shared:
    followers: list[stages.Prepared] = field(default_factory=list)
    backdrop: np.ndarray | None = None  # generated, not yet in the cache
    served: int = 0  # jobs given the leader's image


class SharedGenerations:
    """Jobs in flight that ask for the same cacheable backdrop share one generation (single flight).

    The first job leads (it is generated); the others follow and get the leader's image when it is made.
    The image stays here until the leader has stored it in the cache, so a job arriving in between is
    served too: a request is generated once, and costs one rate-limit token.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Shared] = {}

    def join(self, key: str, prepared: stages.Prepared) -> tuple[bool, np.ndarray | None]:
        """(leads, backdrop): lead and generate it; or take this backdrop; or (False, None): wait, handed
        back by generated() or failed()."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Shared()
                return True, None
            if entry.backdrop is not None:
                entry.served += 1
                return False, entry.backdrop
            entry.followers.append(prepared)
            return False, None

    def generated(self, key: str, backdrop: np.ndarray) -> list[stages.Prepared]:
        """The leader's image is made: the jobs waiting for it."""
        with self._lock:
            entry = self._entries.setdefault(key, _Shared())
            entry.backdrop = backdrop
            followers, entry.followers = entry.followers, []
            entry.served += len(followers)
            return followers

    def failed(self, key: str) -> list[stages.Prepared]:
        """The leader's generation failed: the jobs waiting for it go to the gate again (one leads)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            return entry.followers if entry is not None else []

    def stored(self, key: str) -> int:
        """The leader's job is over (its image in the cache, or it failed after the generation): how many
        other jobs its generation served."""
        with self._lock:
            entry = self._entries.pop(key, None)
            return entry.served if entry is not None else 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class Workers:
    """The stage threads and the queues between them. The daemon submits jobs and gets back finished
    results (`deliver`) and failures (`fail`); a failure in one stage costs that job only."""

    def __init__(self, config: Config, engines: stages.Engines, *, budget: MemoryBudget, job_bucket: TokenBucket,
                 progress: Progress, abort: threading.Event, started: Callable[[Job], None],
                 deliver: Callable[[stages.Finished], None], fail: Callable[[Job, str], None]) -> None:
        self.config = config
        self.engines = engines
        self.budget = budget
        self.job_bucket = job_bucket
        self.progress = progress
        self.abort = abort
        self._started = started
        self._deliver = deliver
        self._fail = fail
        self.shared = SharedGenerations()
        # None on a queue: look at the abort flag now (stop() wakes every worker so, rather than letting each
        # notice it within _POLL: a `run --once` would wait that long to exit).
        self.prepare_q: queue.Queue[Job | None] = queue.Queue()
        self.mask_q: queue.Queue[stages.Prepared | None] = queue.Queue()
        self.gate_q: queue.Queue[stages.Prepared | None] = queue.Queue()
        self.device_q: queue.PriorityQueue[tuple[int, int, stages.Prepared | None]] = queue.PriorityQueue()
        self.collect_q: queue.Queue[tuple[stages.Prepared, Callable[[], stages.Prepared]] | None] = queue.Queue(
            maxsize=1)
        self.remote_q: queue.Queue[stages.Prepared | None] = queue.Queue()
        self.finish_q: queue.Queue[stages.Prepared | None] = queue.Queue()
        self._order = itertools.count()  # FIFO among the device's jobs of one priority
        self._mask_lanes = config.pipeline.mask_threads  # as started: thread counts change at a restart
        self._handled: Counter[str] = Counter()  # jobs each stage took in hand (bgwatch status shows them)
        self._handled_lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def reconfigure(self, config: Config) -> None:
        """A reloaded config; the thread counts keep their values until a restart."""
        self.config = config

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        pipeline = self.config.pipeline
        self._mask_lanes = pipeline.mask_threads
        loops: list[tuple[str, Callable[[], None], int]] = [
            ("prepare", self._prepare_loop, pipeline.prepare_threads),
            ("mask", functools.partial(self._serve, "mask", self.mask_q, self._mask), pipeline.mask_threads),
            ("gate", functools.partial(self._serve, "gate", self.gate_q, self._gate), 1),
            ("device", self._device_loop, 1),
            ("collect", self._collect_loop, 1),
            ("remote", functools.partial(self._serve, "remote", self.remote_q, self._remote), pipeline.remote_threads),
            ("finish", functools.partial(self._serve, "finish", self.finish_q, self._finish), pipeline.finish_threads)]
        for name, target, count in loops:
            for i in range(count):
                thread = threading.Thread(target=target, name=f"bgwatch-{name}-{i}", daemon=True)
                thread.start()
                self.threads.append(thread)

    def stop(self, timeout: float) -> list[str]:
        """After abort is set: wake and join the workers; the names of those still in a job."""
        for _ in self.threads:
            for q in (self.prepare_q, self.mask_q, self.gate_q, self.remote_q, self.finish_q):
                q.put(None)
            self.device_q.put((-1, next(self._order), None))
        with contextlib.suppress(queue.Full):  # full: the collector has work, and looks at the flag after it
            self.collect_q.put_nowait(None)
        for thread in self.threads:
            thread.join(timeout=timeout / max(1, len(self.threads)))
        return [t.name for t in self.threads if t.is_alive()]

    def submit(self, job: Job) -> None:
        self.prepare_q.put(job)

    def handled(self) -> dict[str, int]:
        """How many jobs each stage has taken in hand since the start (device: masks and generations)."""
        with self._handled_lock:
            return dict(self._handled)

    def depths(self) -> dict[str, int]:
        """Jobs waiting before each stage (for metrics and the HTTP door's queue depth)."""
        return {"prepare": self.prepare_q.qsize(), "mask": self.mask_q.qsize(), "gate": self.gate_q.qsize(),
                "device": self.device_q.qsize(), "remote": self.remote_q.qsize(), "finish": self.finish_q.qsize()}

    # ------------------------------------------------------------------ routing

    def route(self, prepared: stages.Prepared) -> None:
        """Send a job to the next stage it needs."""
        if prepared.needs_mask:
            if stages.mask_on_device(prepared.job.spec, self.config):
                self.device_q.put((0, next(self._order), prepared))
            else:
                self.mask_q.put(prepared)
        elif prepared.needs_generation:
            self.gate_q.put(prepared)
        else:
            self.finish_q.put(prepared)

    # ------------------------------------------------------------------ the stages

    def _prepare_loop(self) -> None:
        while not self.abort.is_set():
            self.progress.idle()
            job = self.prepare_q.get()
            if job is None or self.abort.is_set():
                return
            if not self.job_bucket.acquire(self.abort):
                return
            self.progress.busy()
            self._started(job)
            self._guard("prepare", job, functools.partial(self._prepare, job))

    def _prepare(self, job: Job) -> None:
        max_memory = self.config.limits.max_memory
        with stages.open_input(job) as fd:  # opened once, for admission and for the pixels
            width, height = stages.input_size(job, fd)  # the header only: admission before a pixel is decoded
            encoded = os.fstat(fd).st_size
            jobmemory.check_job_memory(width, height, job.spec, max_memory=max_memory, source=job.rel_path,
                                       encoded=encoded)
            if not self.budget.acquire(job.run_id, jobmemory.job_memory(width, height, job.spec, encoded), self.abort):
                raise Aborted
            prepared = stages.prepare(job, self.config, self.engines, max_memory=max_memory, fd=fd)
        self.route(prepared)

    def _lane_threads(self) -> int:
        from bgwatch.pipeline.masking import cpu_cores

        # The mask lane's threads share the cores: two single-threaded runs at once beat one on two threads
        # (bench/bench_mask_layout.py), as ONNX Runtime's operators do not keep two cores busy.
        return max(1, cpu_cores() // self._mask_lanes)

    def _mask(self, prepared: stages.Prepared) -> None:
        self.route(stages.mask(prepared, self.config, threads=self._lane_threads()))

    def warm_masks(self) -> None:
        """Load the mask nets the inboxes' rules name (at their roots), as the lanes that will run them ask
        for them (on the device or with the lane's threads), so that the first jobs do not wait for ONNX
        Runtime and the weights. One that cannot load is left to its first job, which says why."""
        from bgwatch import rules
        from bgwatch.pipeline import masking

        for inbox in self.config.inboxes:
            try:
                spec = rules.resolve(inbox.path / "warm.jpg", inbox, self.config, sidecar=None).spec
                if masking.resolve_mask_engine_name(spec.mask) == "classical" or self.abort.is_set():
                    continue
                threads = None if stages.mask_on_device(spec, self.config) else self._lane_threads()
                masking.load_mask_engine(spec.mask, self.config.device, threads=threads)
            except Exception as exc:  # a warm-up only: the job that needs the net loads it and reports
                logger.debug("inbox {}: its mask net not loaded ahead ({})", inbox.path, exc)

    def _gate(self, prepared: stages.Prepared) -> None:
        """The generation rate limit, and one generation per request in flight; then the device or Runway."""
        request = prepared.request
        assert request is not None
        if request.cacheable:
            leads, backdrop = self.shared.join(request.cache_key(), prepared)
            if backdrop is not None:
                self.route(stages.generated(prepared, backdrop, shared=True))
            if not leads:
                return
            made = self.engines.studio_backdrop(prepared)
            if made is not None:  # another host of the studio made it: a hit here, for the followers too
                for follower in self.shared.generated(request.cache_key(), made):
                    self.route(stages.generated(follower, made, shared=True))
                self.route(stages.generated(prepared, made, shared=True))
                served = self.shared.stored(request.cache_key())
                if served and self.engines.cache is not None:
                    self.engines.cache.count_hits(request, served)
                return
        self.progress.idle()  # waiting for a token is not a stall
        try:
            self.engines.take_generation_token()
        except BgwatchError:
            self._generation_failed(prepared)
            raise
        self.progress.busy()
        if request.engine in GENERATED_ON_DEVICE:
            self.device_q.put((1, next(self._order), prepared))
        else:
            self.remote_q.put(prepared)

    def _device_loop(self) -> None:
        """The accelerator's work only: masks on CUDA, then generations, started one after another. First,
        the models the configuration names are loaded, while the first jobs are claimed and prepared."""
        self.progress.busy()
        try:
            self.engines.warm()
        except Exception:  # a model that cannot load fails its jobs with the reason; the daemon runs on
            logger.exception("loading the configured models at start failed; they load with their first job")
        while not self.abort.is_set():
            self.progress.idle()
            self.engines.between_jobs()
            try:
                _, _, prepared = self.device_q.get(timeout=_POLL)
            except queue.Empty:
                continue
            if prepared is None:
                continue
            self.progress.busy()
            self._guard("device", prepared.job, functools.partial(self._device, prepared))

    def _device(self, prepared: stages.Prepared) -> None:
        if prepared.needs_mask:
            self.route(stages.mask(prepared, self.config))
            return
        try:
            pending = self.engines.start_generation(prepared)
        except Exception as exc:
            self._generation_failed(prepared)
            if self._fall_back(prepared, exc):
                return
            raise
        _put(self.collect_q, (prepared, pending), self.abort)

    def _collect_loop(self) -> None:
        while not self.abort.is_set():
            self.progress.idle()
            try:
                item = self.collect_q.get(timeout=_POLL)
            except queue.Empty:
                continue
            if item is None:
                continue
            prepared, pending = item
            self.progress.busy()
            self._guard("collect", prepared.job, functools.partial(self._generated, prepared, pending))

    def _remote(self, prepared: stages.Prepared) -> None:
        self._generated(prepared, functools.partial(self.engines.generate, prepared))

    def _generated(self, prepared: stages.Prepared, result: Callable[[], stages.Prepared]) -> None:
        try:
            done = result()
        except Exception as exc:
            self._generation_failed(prepared)
            if self._fall_back(prepared, exc):
                return
            raise
        request = done.request
        assert request is not None and done.backdrop is not None
        if request.cacheable:
            for follower in self.shared.generated(request.cache_key(), done.backdrop):
                self.route(stages.generated(follower, done.backdrop, shared=True))
        self.route(done)

    def _generation_failed(self, prepared: stages.Prepared) -> None:
        """The jobs that waited for this generation try again at the gate (one of them leads)."""
        request = prepared.request
        self.engines.studio_generated(request)
        if request is not None and request.cacheable:
            for follower in self.shared.failed(request.cache_key()):
                self.gate_q.put(follower)

    def _fall_back(self, prepared: stages.Prepared, exc: BaseException) -> bool:
        """A failed generation whose spec names a fallback_engine: the backdrop comes from that engine instead
        (its own default model; the run records it as bg_engine). False: no fallback, the job fails."""
        if self.abort.is_set():
            return False
        moved = stages.fall_back(prepared, self.config, exc)
        if moved is None:
            return False
        assert moved.request is not None
        if moved.request.generative:
            self.gate_q.put(moved)
        else:
            self.route(self.engines.backdrop_without_generation(moved))
        return True

    def _finish(self, prepared: stages.Prepared) -> None:
        try:
            self._deliver(stages.finish(prepared, self.engines))
        finally:
            if prepared.to_cache and prepared.request is not None:
                self.engines.studio_generated(prepared.request)  # kept (or not): other hosts read or go on
                served = self.shared.stored(prepared.request.cache_key())
                if self.engines.cache is not None:
                    self.engines.cache.count_hits(prepared.request, served)
            self.budget.release(prepared.job.run_id)

    # ------------------------------------------------------------------ plumbing

    def _serve(self, stage: str, source: queue.Queue[stages.Prepared | None],
               work: Callable[[stages.Prepared], None]) -> None:
        while not self.abort.is_set():
            self.progress.idle()
            try:
                prepared = source.get(timeout=_POLL)
            except queue.Empty:
                continue
            if prepared is None:
                continue
            self.progress.busy()
            self._guard(stage, prepared.job, functools.partial(work, prepared))

    def _guard(self, stage: str, job: Job, work: Callable[[], None]) -> None:
        """Run one stage of a job; whatever goes wrong fails that job only, and the daemon carries on."""
        with self._handled_lock:
            self._handled[stage] += 1
        try:
            work()
        except Aborted:
            return  # stopping: the run stays open and the next start takes it again
        except BgwatchError as exc:
            if self.abort.is_set():
                logger.warning("run {}: interrupted by shutdown; it will be taken again at the next start",
                               job.run_id)
                return
            self._fail(job, str(exc))
        except MemoryError:
            self._fail(job, "out of memory while processing this image; try a smaller image")
        except OSError as exc:
            # the file by name only: the reason becomes a note on the share, never a path on the server
            where = f" ({os.path.basename(exc.filename)})" if isinstance(exc.filename, str) else ""
            self._fail(job, f"file system error{where}: {exc.strerror or exc}")
        except Exception as exc:  # a bug must cost one job, not the daemon: logged with its traceback
            logger.exception("run {}: unexpected error", job.run_id)
            self._fail(job, f"internal error ({type(exc).__name__}: {exc}); see logs/error.log")


def _put(q: queue.Queue[tuple[stages.Prepared, Callable[[], stages.Prepared]] | None],
         item: tuple[stages.Prepared, Callable[[], stages.Prepared]], abort: threading.Event) -> None:
    """Hand a started generation to the collector; bounded, so the device starts at most one ahead."""
    while not abort.is_set():
        try:
            q.put(item, timeout=_POLL)
            return
        except queue.Full:
            continue
    raise Aborted
