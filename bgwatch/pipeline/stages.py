"""The three stages a job passes through, and the engines they share.

prepare (CPU pool): decode, orientation, colour, limits.  infer (one worker per GPU, models loaded):
mask, background (cache first).  finish (CPU pool): refine, enhance, composite, encode.
Each stage takes the previous stage's frozen result and returns its own, so the daemon can run them on
different threads joined by bounded queues, and `bgwatch process` can run them in a row.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bgwatch.errors import EngineError, InputError
from bgwatch.jobs import Job, JobSpec

if TYPE_CHECKING:
    import numpy as np

    from bgwatch.config import Config
    from bgwatch.pipeline.imageio import DecodedImage
    from bgwatch.ratelimit import TokenBucket
    from bgwatch.store import Store


@dataclass(frozen=True, slots=True)
class Prepared:
    job: Job
    image: DecodedImage
    timings: dict[str, float] = field(default_factory=dict)
    # A mask that needs no model (classical) is made here, in the CPU pool, not on the single device
    # worker: a big image's mask then never holds up the small images queued behind it.
    alpha: np.ndarray | None = None  # uint8 HxW
    mask_engine: str = ""


@dataclass(frozen=True, slots=True)
class Inferred:
    prepared: Prepared
    alpha: np.ndarray  # uint8 HxW (0..255), raw from the mask engine (a quarter of float32's memory)
    backdrop: np.ndarray | None  # HxWx3 uint8 for replace, None for cleanup
    mask_engine: str
    bg_engine: str
    seed: int | None
    cache_hit: bool
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Finished:
    job: Job
    data: bytes
    extension: str
    mask_engine: str
    bg_engine: str
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)


# Peak working set of one job above the process's own footprint, in bytes a pixel of the input, measured
# by bench/bench_memory.py (cleanup: 12-22 with the classical or a rembg engine; replace: ~24 at 25 MP and
# ~28 at 6 MP, gradient, colour or image backdrop with shadow, colour matching and feathered edges), rounded
# up. limits.max_memory is checked with it.
JOB_BYTES_PER_PIXEL = {"cleanup": 24, "replace": 30}
DENOISE_BYTES_PER_PIXEL = 8  # LAB copy, the denoised lightness and the result
MATTING_BYTES = 2 * 2**30  # rembg alpha matting runs at <= REMBG_WORK_SIDE px a side: a fixed cost
DEFAULT_MAX_MEMORY = 8 * 2**30  # the daemon passes limits.max_memory; 8 GiB admits a 100 MP replace


def job_memory(width: int, height: int, spec: JobSpec) -> int:
    """Estimated peak bytes one job on a width x height input needs, above the daemon's own memory."""
    per_pixel = JOB_BYTES_PER_PIXEL.get(spec.operation, max(JOB_BYTES_PER_PIXEL.values()))
    if spec.denoise:
        per_pixel += DENOISE_BYTES_PER_PIXEL
    fixed = MATTING_BYTES if spec.mask.alpha_matting else 0
    return per_pixel * width * height + fixed


def check_job_memory(width: int, height: int, spec: JobSpec, *, max_memory: int = DEFAULT_MAX_MEMORY,
                     source: str | Path = "input image") -> None:
    """InputError when one job on this input could never fit in `max_memory` bytes (limits.max_memory)."""
    need = job_memory(width, height, spec)
    if need > max_memory:
        raise InputError(
            source, f"{width}x{height} ({width * height / 1e6:.0f} MP) needs about {need / 2**30:.1f} GiB for "
            f"{spec.operation}, more than limits.max_memory ({max_memory / 2**30:.1f} GiB); scale it down, or "
            "raise limits.max_memory in config.yaml"
        )


def _timed(timings: dict[str, float], name: str, start: float) -> None:
    timings[name] = round(time.perf_counter() - start, 4)


def prepare(job: Job, config: Config, *, max_memory: int = DEFAULT_MAX_MEMORY) -> Prepared:
    """Decode the job's image (pixel limit from config; `max_memory` is limits.max_memory in bytes): an
    input whose job could never fit in that memory fails here, before a pixel is decoded."""
    from bgwatch.pipeline import backgrounds, imageio

    timings: dict[str, float] = {}
    start = time.perf_counter()
    width, height = imageio.probe_size(job.source)
    if job.spec.operation == "replace":
        backgrounds.check_input_size(job.spec, width, height, config.limits.allow_4k, source=job.rel_path)
    check_job_memory(width, height, job.spec, max_memory=max_memory, source=job.rel_path)
    image = imageio.decode(job.source, max_pixels=config.limits.max_pixels)
    _timed(timings, "prepare", start)
    from bgwatch.pipeline import masking

    if masking.resolve_mask_engine_name(job.spec.mask) != "classical":
        return Prepared(job=job, image=image, timings=timings)
    start = time.perf_counter()
    engine = masking.load_mask_engine(job.spec.mask, config.device)
    alpha = masking.to_alpha8(engine.predict(image.rgb))
    _timed(timings, "mask", start)
    return Prepared(job=job, image=image, timings=timings, alpha=alpha, mask_engine=engine.name)


class Engines:
    """The models a daemon keeps loaded, the background cache and the generation token bucket."""

    def __init__(self, config: Config, store: Store | None,
                 generation_bucket: TokenBucket | None = None,
                 stop: threading.Event | None = None) -> None:
        self.config = config
        self.store = store
        self.generation_bucket = generation_bucket
        self.stop = stop
        self._cache: Any = None
        self._unload_pending = False

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: models whose settings changed are dropped before the device's next job,
        never under a running one (loading the new beside the old could run the GPU out of memory)."""
        old, self.config = self.config, config
        if (old.sdxl, old.device, old.runway) != (config.sdxl, config.device, config.runway):
            self._unload_pending = True
        if (old.cache_dir, old.cache.max_bytes) != (config.cache_dir, config.cache.max_bytes):
            self._cache = None

    def between_jobs(self) -> None:
        """Called by the device worker with no job in hand."""
        if self._unload_pending:
            self._unload_pending = False
            import sys

            if "bgwatch.pipeline.backgrounds" in sys.modules:
                sys.modules["bgwatch.pipeline.backgrounds"].unload_background_engines()

    @property
    def cache(self) -> Any:
        if self._cache is None and self.store is not None:
            from bgwatch.pipeline.cache import BackgroundCache

            self._cache = BackgroundCache(self.store, self.config.cache_dir, self.config.cache.max_bytes)
        return self._cache

    def _acquire_generation(self) -> None:
        if self.generation_bucket is not None and not self.generation_bucket.acquire(self.stop):
            raise EngineError("rate limit", "bgwatch is stopping; the job will be taken again at the next start")

    def mask(self, rgb: np.ndarray, spec: JobSpec) -> tuple[np.ndarray, str]:
        from bgwatch.pipeline import masking

        engine = masking.load_mask_engine(spec.mask, self.config.device)
        label = f"{engine.name}:{engine.model}" if engine.model else engine.name
        return engine.predict(rgb), label

    def background(self, spec: JobSpec, width: int, height: int,
                   seed: int | None) -> tuple[np.ndarray, str, bool]:
        from bgwatch.pipeline import backgrounds

        request = backgrounds.BackgroundRequest.from_spec(spec, width, height, seed, config=self.config)
        engine = backgrounds.load_background_engine(spec.engine, self.config)
        label = f"{spec.engine}:{request.model}" if getattr(request, "model", "") else spec.engine

        def render() -> np.ndarray:
            return engine.render(request)

        if not request.generative:
            return render(), label, False
        if self.cache is None or not request.cacheable:
            self._acquire_generation()
            return render(), label, False
        image, hit = self.cache.get_or_render(request, render, before_generate=self._acquire_generation)
        return image, label, hit


def infer(prepared: Prepared, engines: Engines) -> Inferred:
    spec = prepared.job.spec
    timings = dict(prepared.timings)
    start = time.perf_counter()
    from bgwatch.pipeline.masking import to_alpha8

    if prepared.alpha is not None:
        alpha, mask_label = prepared.alpha, prepared.mask_engine
    else:
        raw, mask_label = engines.mask(prepared.image.rgb, spec)
        alpha = to_alpha8(raw)
        del raw
        _timed(timings, "mask", start)
    backdrop = None
    bg_label = ""
    seed = spec.seed
    hit = False
    if spec.operation == "replace":
        from bgwatch.pipeline import backgrounds

        if seed is None and spec.is_generative():
            seed = backgrounds.draw_seed()
        start = time.perf_counter()
        backdrop, bg_label, hit = engines.background(spec, prepared.image.width, prepared.image.height, seed)
        _timed(timings, "background", start)
    return Inferred(prepared=prepared, alpha=alpha, backdrop=backdrop, mask_engine=mask_label,
                    bg_engine=bg_label, seed=seed if spec.is_generative() else None, cache_hit=hit,
                    timings=timings)


def finish(inferred: Inferred) -> Finished:
    from bgwatch.pipeline import cleanup, composite, imageio, masking

    job = inferred.prepared.job
    spec = job.spec
    image = inferred.prepared.image
    timings = dict(inferred.timings)
    start = time.perf_counter()
    alpha = masking.refine_mask(inferred.alpha, post_process=spec.mask.post_process)
    if image.alpha is not None:
        # A cut-out dropped in keeps its own transparency: the subject is at most what it already was.
        if not alpha.flags.writeable or alpha is inferred.alpha:
            alpha = alpha.copy()
        alpha *= image.alpha
        alpha *= 1 / 255
    if spec.operation == "replace":
        assert inferred.backdrop is not None
        result = composite.composite(image.rgb, alpha, inferred.backdrop, spec)
    else:
        result = cleanup.cleanup(image.rgb, alpha, spec)
    del alpha  # freed before the encoder makes its own copy
    _timed(timings, "composite", start)
    start = time.perf_counter()
    data = imageio.encode(result, spec.output)
    _timed(timings, "encode", start)
    return Finished(job=job, data=data, extension=imageio.output_extension(spec.output),
                    mask_engine=inferred.mask_engine, bg_engine=inferred.bg_engine, seed=inferred.seed,
                    timings=timings)


def run_all(job: Job, config: Config, engines: Engines,
            before_device: Callable[[], None] | None = None, *,
            max_memory: int = DEFAULT_MAX_MEMORY) -> Finished:
    """The three stages in a row (for `bgwatch process` and tests)."""
    prepared = prepare(job, config, max_memory=max_memory)
    if before_device is not None:
        before_device()
    return finish(infer(prepared, engines))
