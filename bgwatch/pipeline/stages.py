"""The stages a job passes through, and the engines they share.

prepare (CPU): decode, orientation, colour, limits; a mask that needs no model (classical); a backdrop that
needs no generation (colour, gradient, image, or a cached generation).
mask (CPU, or the device when ONNX Runtime runs there): the model's mask.
generate (the device for sdxl, a small pool for Runway; a generation token taken before): the backdrop.
finish (CPU): refine, enhance, composite, encode; a new generation is stored in the cache here.
Each stage takes a frozen `Prepared` and returns a new one, so the daemon can run them on different threads
(workers.py routes a job to the next stage it needs), and `bgwatch process` can run them in a row (run_all).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from bgwatch.errors import BgwatchError, EngineError, InputError
from bgwatch.jobs import Job, JobSpec
from bgwatch.pipeline import jobmemory
from bgwatch.text import shown

if TYPE_CHECKING:
    import numpy as np

    from bgwatch.config import Config
    from bgwatch.pipeline.backgrounds import BackgroundRequest
    from bgwatch.pipeline.imageio import DecodedImage
    from bgwatch.pipeline.metadata import Carried
    from bgwatch.ratelimit import TokenBucket
    from bgwatch.storebase import RunStore


@dataclass(frozen=True, slots=True)
class Prepared:
    """A job on its way: its decoded image and what the stages so far have made for it."""

    job: Job
    image: DecodedImage
    timings: dict[str, float] = field(default_factory=dict)
    alpha: np.ndarray | None = None  # uint8 HxW (a quarter of float32's memory); None until masked
    mask_engine: str = ""
    request: BackgroundRequest | None = None  # replace: the backdrop it asks for
    backdrop: np.ndarray | None = None  # HxWx3 uint8: None until rendered, generated or read from the cache
    bg_engine: str = ""
    cache_hit: bool = False
    to_cache: bool = False  # generated for this job and cacheable: finish() stores it
    kept: Carried | None = None  # the input's metadata the output carries, read with its pixels (prepare)

    @property
    def seed(self) -> int | None:
        """The seed a generated backdrop used (recorded on the run); None for other backdrops."""
        return self.request.seed if self.request is not None and self.request.generative else None

    @property
    def needs_mask(self) -> bool:
        return self.alpha is None

    @property
    def needs_generation(self) -> bool:
        return self.request is not None and self.backdrop is None


@dataclass(frozen=True, slots=True)
class Finished:
    job: Job
    data: bytes
    extension: str
    mask_engine: str
    bg_engine: str
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def open_input(job: Job) -> Iterator[int]:
    """The job's input file, re-opened through descriptors: a claimed file from its inbox down, every
    folder below the inbox and the file itself without following a link, so a file swapped for a link
    since its claim is refused; its bytes are checked (another file linked in its place) by checked_copy,
    which everything decoded is read from. InputError names the file as dropped and says why."""
    from bgwatch import sharefiles

    try:
        if job.root is not None:
            fd = sharefiles.open_below(job.root, job.source.relative_to(job.root).parts)
        else:  # an HTTP upload in the daemon's own folder, or a file named on `bgwatch process`
            fd = sharefiles.open_below(job.source.parent, (job.source.name,))
    except sharefiles.RefusedFile as exc:
        raise InputError(job.rel_path, f"{exc.what}; the claimed file was replaced after it was claimed, "
                         "so it is refused unread") from None
    except FileNotFoundError:
        raise InputError(job.rel_path, "the file is gone (moved or deleted before it could be read)") from None
    except OSError as exc:
        raise InputError(job.rel_path, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def checked_copy(job: Job, fd: int) -> Iterator[int]:
    """The open input's bytes, read once into a private copy (sharefiles.snapshot) that no writer on the
    share can change, checked against the sha256 recorded when it was claimed: InputError unless they are
    the bytes claimed. Everything decoded or carried from the input is read from the copy."""
    from bgwatch import sharefiles

    try:
        copy, sha256 = sharefiles.snapshot(fd)
    except OSError as exc:
        raise InputError(job.rel_path, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        if job.input_sha256 and sha256 != job.input_sha256:
            raise InputError(job.rel_path, "the file changed after it was claimed (its bytes are not the "
                             "ones claimed); refused unread, drop it again")
        yield copy
    finally:
        os.close(copy)


def input_size(job: Job, fd: int | None = None) -> tuple[int, int]:
    """(width, height) of the job's input from its header, read as prepare() reads it (admission). The
    header alone decides nothing that is published, so the bytes are not hashed here: prepare() checks
    them before a pixel is decoded (hashing twice cost a full read of every input). `fd`: the input as
    open_input(job) opened it; None: opened here."""
    from bgwatch.pipeline.imageio import probe_size

    if fd is not None:
        return probe_size(Path(job.rel_path), fd=fd)
    with open_input(job) as opened:
        return probe_size(Path(job.rel_path), fd=opened)


def _timed(timings: dict[str, float], name: str, start: float) -> None:
    timings[name] = round(time.perf_counter() - start, 4)


def prepare(job: Job, config: Config, engines: Engines | None = None, *,
            max_memory: int = jobmemory.DEFAULT_MAX_MEMORY, fd: int | None = None) -> Prepared:
    """Decode the job's image (pixel limit from config; `max_memory` is limits.max_memory in bytes): an
    input whose job could never fit in that memory fails here, before a pixel is decoded. A classical mask
    and a backdrop that needs no generation (`engines` given) are made here too, in the CPU pool, so a big
    image never holds up the device worker and a cache hit never reaches it. The metadata the output
    keeps is read here too, from the same descriptor. `fd`: the input as open_input(job)
    opened it for admission (its bytes are checked here); None: opened here."""
    from bgwatch.pipeline import imageio, masking, metadata

    timings: dict[str, float] = {}
    start = time.perf_counter()
    name = Path(job.rel_path)  # messages name the file as dropped, never a path on the server
    with contextlib.nullcontext(fd) if fd is not None else open_input(job) as given, \
            checked_copy(job, given) as fd:
        width, height = imageio.probe_size(name, fd=fd)
        if job.spec.operation == "replace":
            from bgwatch.pipeline import backgrounds  # a cleanup never imports the backdrop engines

            backgrounds.check_input_size(job.spec, width, height, config.limits.allow_4k, source=job.rel_path)
        jobmemory.check_job_memory(width, height, job.spec, max_memory=max_memory, source=job.rel_path,
                                   encoded=os.fstat(fd).st_size)
        image = imageio.decode(name, max_pixels=config.limits.max_pixels, fd=fd)
        kept = metadata.carried(fd, job.spec.metadata, name=job.rel_path)
    _timed(timings, "prepare", start)
    prepared = Prepared(job=job, image=image, timings=timings, kept=kept)
    if masking.resolve_mask_engine_name(job.spec.mask) == "classical":
        prepared = mask(prepared, config)
    if job.spec.operation == "replace":
        from bgwatch.pipeline import backgrounds

        seed = job.spec.seed
        if seed is None and job.spec.is_generative():
            seed = backgrounds.draw_seed()
        # made at the output's frame (the canvas's size when the spec gives one): backgrounds.backdrop_size
        request = backgrounds.BackgroundRequest.from_spec(job.spec, image.width, image.height, seed, config=config)
        prepared = replace(prepared, request=request)
        if engines is not None:
            prepared = engines.backdrop_without_generation(prepared)
    return prepared


def mask(prepared: Prepared, config: Config, *, threads: int | None = None) -> Prepared:
    """The mask stage: the configured engine's mask of the image, as uint8. `threads`: ONNX Runtime threads
    a CPU mask may use (the cores shared among the masks run at once; None: all of them)."""
    from bgwatch.pipeline import masking

    timings = dict(prepared.timings)
    start = time.perf_counter()
    engine = masking.load_mask_engine(prepared.job.spec.mask, config.device, threads=threads)
    alpha = engine.predict8(prepared.image.rgb)
    _timed(timings, "mask", start)
    return replace(prepared, alpha=alpha, mask_engine=mask_label(engine), timings=timings)


def mask_label(engine: Any) -> str:
    """The mask engine as recorded on the run (history, report, the API): `rembg:u2net:int8` — the engine,
    its model and the precision its net actually ran at (precision.mask_precision's choice: fp32, or the int8
    variant) — or `classical`, which has neither."""
    if not engine.model:
        return str(engine.name)
    precision = getattr(engine, "precision", "")
    return f"{engine.name}:{engine.model}" + (f":{precision}" if precision else "")


def mask_on_device(spec: JobSpec, config: Config) -> bool:
    """Whether this job's mask runs on the accelerator (ONNX Runtime with CUDA); otherwise it is CPU work."""
    from bgwatch.pipeline import masking

    if masking.resolve_mask_engine_name(spec.mask) == "classical":
        return False
    return masking.resolve_onnx_device(config.device) == "cuda"


class Engines:
    """The models a daemon keeps loaded, the background cache and the generation token bucket."""

    def __init__(self, config: Config, store: RunStore | None,
                 generation_bucket: TokenBucket | None = None,
                 stop: threading.Event | None = None) -> None:
        self.config = config
        self.store = store
        self.generation_bucket = generation_bucket
        self.stop = stop
        self._cache: Any = None
        self._unload_pending = False
        from bgwatch.studio import studio_generations

        self._studio = studio_generations(store, config)  # a studio store: one generation per key for every host

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

    def warm(self) -> str | None:
        """At start, on the device worker: load the SDXL model the configuration's rules name (the engine
        keeps one loaded; folder rules and sidecars may name others, which load with their first job), so
        the first generation does not wait behind a model load; on a GPU also one 1-step generation, which
        initialises its kernels (and compiles, with sdxl.compile). A model that cannot load is reported by
        its jobs; here it is a warning. Returns the model loaded."""
        import importlib.util

        from bgwatch.models import configured_models

        if not any(kind == "sdxl" for kind, _, _ in configured_models(self.config)):
            return None  # nothing to load: the SDXL modules are not even imported
        from bgwatch.pipeline import backgrounds
        from bgwatch.pipeline.sdxl import SdxlEngine
        from bgwatch.pipeline.sdxl_load import torch_device

        engine = backgrounds.load_background_engine("sdxl", self.config)
        assert isinstance(engine, SdxlEngine)
        model = engine.default_model()
        if model is None or importlib.util.find_spec("torch") is None:  # without torch, each job says so
            return None
        try:
            return engine.warm(model, generate=torch_device(self.config.device) == "cuda")
        except BgwatchError as exc:
            logger.warning("sdxl: {} not loaded at start ({}); its jobs will say why if it still fails", model, exc)
            return None

    def studio_backdrop(self, prepared: Prepared) -> np.ndarray | None:
        """A cacheable backdrop another host of the studio made, waited for while it makes it; None: this host
        generates it (and calls studio_generated once it is kept, or failed). None at once without a studio."""
        request = prepared.request
        if self._studio is None or request is None or not request.cacheable or self.cache is None:
            return None
        cache = self.cache
        found: np.ndarray | None = self._studio.lead_or_wait(request.cache_key(), lambda: cache.lookup(request),
                                                              self.stop)
        return found

    def studio_generated(self, request: BackgroundRequest | None) -> None:
        if self._studio is not None and request is not None and request.cacheable:
            self._studio.done(request.cache_key())

    def take_generation_token(self) -> None:
        """Wait for the generation rate limit (limits.generations_per_minute); before the device stage."""
        if self.generation_bucket is not None and not self.generation_bucket.acquire(self.stop):
            raise EngineError("rate limit", "bgwatch is stopping; the job will be taken again at the next start")

    def backdrop_without_generation(self, prepared: Prepared) -> Prepared:
        """A colour, gradient or image backdrop rendered now, or a generation read from the cache; a
        generation that is not cached is left for generate()."""
        from bgwatch.pipeline import backgrounds

        request = prepared.request
        assert request is not None
        timings = dict(prepared.timings)
        start = time.perf_counter()
        if not request.generative:
            backdrop = backgrounds.load_background_engine(request.engine, self.config).render(request)
        elif request.cacheable and self.cache is not None:
            backdrop = self.cache.lookup(request)
            if backdrop is None:
                return prepared
        else:
            return prepared
        _timed(timings, "background", start)
        return replace(prepared, backdrop=backdrop, bg_engine=background_label(request),
                       cache_hit=request.generative, timings=timings)

    def generate(self, prepared: Prepared) -> Prepared:
        """The generation stage (its token already taken): the backdrop from sdxl or runway."""
        from bgwatch.pipeline import backgrounds

        request = prepared.request
        assert request is not None
        timings = dict(prepared.timings)
        start = time.perf_counter()
        engine = backgrounds.load_background_engine(request.engine, self.config)
        # A remote task is given up (cancelled) once the daemon stops for good, not left running unseen.
        backdrop = (engine.render_until(request, self.stop) if isinstance(engine, backgrounds.StoppableEngine)
                    else engine.render(request))
        _timed(timings, "background", start)
        return generated(prepared, backdrop, timings)

    def start_generation(self, prepared: Prepared) -> Callable[[], Prepared]:
        """Start a device generation (sdxl; its token already taken) and return what waits for its pixels:
        the work is queued on the accelerator and this returns at once, so the device worker can start the
        next job while another thread waits on the result."""
        from bgwatch.pipeline import backgrounds
        from bgwatch.pipeline.sdxl import SdxlEngine

        request = prepared.request
        assert request is not None
        engine = backgrounds.load_background_engine(request.engine, self.config)
        assert isinstance(engine, SdxlEngine), f"{request.engine} does not generate on the device"
        began = time.perf_counter()
        pending = engine.start(request)

        def result() -> Prepared:
            backdrop = pending.result()
            timings = dict(prepared.timings)
            _timed(timings, "background", began)
            return generated(prepared, backdrop, timings)

        return result


def background_label(request: BackgroundRequest) -> str:
    """The engine as recorded on the run: `sdxl:<model>`, `runway:<model>`, `gradient`..."""
    return f"{request.engine}:{request.model}" if request.model else request.engine


def generated(prepared: Prepared, backdrop: np.ndarray, timings: dict[str, float] | None = None, *,
              shared: bool = False) -> Prepared:
    """`prepared` with its generated backdrop; `shared`: another job with the same request generated it."""
    request = prepared.request
    assert request is not None
    backdrop.flags.writeable = False  # one generation may serve several jobs: nobody paints on it
    return replace(prepared, backdrop=backdrop, bg_engine=background_label(request), cache_hit=shared,
                   to_cache=request.cacheable and not shared,
                   timings=prepared.timings if timings is None else timings)


def finish(prepared: Prepared, engines: Engines | None = None) -> Finished:
    """Store a new generation in the cache (`engines` given), then refine, place on the canvas (canvas.py),
    composite and encode with the metadata the job keeps (metadata.py)."""
    from bgwatch.pipeline import canvas, cleanup, imageio, metadata, refine

    job = prepared.job
    spec = job.spec
    image = prepared.image
    timings = dict(prepared.timings)
    assert prepared.alpha is not None
    if prepared.to_cache and engines is not None and engines.cache is not None:
        assert prepared.request is not None and prepared.backdrop is not None
        engines.cache.keep(prepared.request, prepared.backdrop)
    start = time.perf_counter()
    alpha = refine.refine_mask(prepared.alpha, post_process=spec.mask.post_process)
    if image.alpha is not None:
        # A cut-out dropped in keeps its own transparency: the subject is at most what it already was.
        if not alpha.flags.writeable or alpha is prepared.alpha:
            alpha = alpha.copy()
        alpha *= image.alpha
        alpha *= 1 / 255
    rgb = image.rgb
    if canvas.active(spec.canvas):  # the subject placed on its canvas first: composited and shadowed there
        layout = canvas.plan(alpha, spec, source=job.rel_path)
        rgb, alpha = canvas.place(rgb, alpha, layout)
    if spec.operation == "replace":
        from bgwatch.pipeline import composite

        assert prepared.backdrop is not None
        result = composite.composite(rgb, alpha, prepared.backdrop, spec)
    else:
        result = cleanup.cleanup(rgb, alpha, spec)
    del alpha, rgb  # freed before the encoder makes its own copy
    _timed(timings, "composite", start)
    start = time.perf_counter()
    from bgwatch.presets import PRESETS

    preset = PRESETS.get(spec.preset)
    kept = prepared.kept if prepared.kept is not None else metadata.NOTHING
    data = imageio.encode(result, spec.output, kept,
                          pure_background=preset is not None and preset.background is not None)
    _timed(timings, "encode", start)
    return Finished(job=job, data=data, extension=imageio.output_extension(spec.output),
                    mask_engine=prepared.mask_engine, bg_engine=prepared.bg_engine, seed=prepared.seed,
                    timings=timings)


def run_all(job: Job, config: Config, engines: Engines,
            before_device: Callable[[], None] | None = None, *,
            max_memory: int = jobmemory.DEFAULT_MAX_MEMORY) -> Finished:
    """The stages in a row (for `bgwatch process` and tests)."""
    prepared = prepare(job, config, engines, max_memory=max_memory)
    if before_device is not None:
        before_device()
    if prepared.needs_mask:
        prepared = mask(prepared, config)
    if prepared.needs_generation:
        engines.take_generation_token()
        try:
            prepared = engines.generate(prepared)
        except Exception as exc:  # as the daemon's workers do: the spec's fallback_engine, if it names one
            moved = fall_back(prepared, config, exc)
            if moved is None:
                raise
            prepared = engines.backdrop_without_generation(moved)
            if prepared.needs_generation:
                engines.take_generation_token()
                prepared = engines.generate(prepared)
    return finish(prepared, engines)


def fall_back(prepared: Prepared, config: Config, exc: BaseException) -> Prepared | None:
    """A failed generation whose spec names a fallback_engine: the job with its request moved to that engine
    (its configured model; the run records it as bg_engine), to be rendered, read from the cache or
    generated as any request is. None: no fallback (none named, or the one that failed), the job fails.
    The daemon's workers and `bgwatch process` (run_all) both go through here."""
    from bgwatch.models import configured_models
    from bgwatch.pipeline.backgrounds import BackgroundRequest

    spec, request = prepared.job.spec, prepared.request
    if request is None or spec.fallback_engine in ("", request.engine):
        return None
    model = next((name for kind, name, _ in configured_models(config) if kind == spec.fallback_engine), "")
    if not model and spec.fallback_engine == "sdxl" and "/" in spec.model:
        model = spec.model  # a hub id or a folder is an SDXL checkpoint (MODEL_ID), whatever the engine
    moved = BackgroundRequest.from_spec(replace(spec, engine=spec.fallback_engine, model=model),
                                        prepared.image.width, prepared.image.height, request.seed, config=config)
    logger.warning("run {}: the {} generation failed ({}); the background comes from the fallback engine {}",
                   prepared.job.run_id, request.engine, shown(str(exc)[:300]), spec.fallback_engine)
    return replace(prepared, request=moved, backdrop=None, to_cache=False, cache_hit=False)
