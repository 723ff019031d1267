"""The `sdxl` background engine: diffusers' StableDiffusionXLPipeline, loaded once and kept.

`model` is a hub id (loaded from the Hugging Face cache, downloaded if the hub is reachable) or a local
folder written by save_pretrained (loaded with local_files_only). fp16 on CUDA (the fp16 weight variant
where the checkpoint has one), float32 on CPU. Loading and the speed-ups and memory savers of config.sdxl
live in sdxl_load.py.

Two ways to generate, one result:

- `render(request)`: the image, waited for.
- `start(request) -> PendingImage`, then `pending.result()`: start() encodes the prompt, denoises and
  decodes on the device and queues the copy of the uint8 image into pinned host memory, then returns
  without waiting for the GPU; result() waits for that copy and fits the image to the request's size. A
  device worker calls start() for the next job while another thread waits on the previous result(), so
  the GPU never idles between queued generations. render(r) is start(r).result().

Threads: start(), render(), warm() and generation_size() may be called from several threads (a lock
serialises them: a pipeline is not re-entrant), but a single thread calling start() keeps the GPU's queue
in job order. result() may be called from any thread, any number of times (the first call waits; later
calls return the same array) and never takes the engine's lock, so it never blocks a start().

Resolution: SDXL is trained on a set of about-one-megapixel aspect-ratio buckets; generating off those
sizes gives repeated subjects and broken composition. The engine picks the bucket nearest the input's
aspect ratio and fits the result to the input by cover (centred crop). The bucket list is for a model
whose native size (unet.config.sample_size * vae_scale_factor) is 1024; a model with another native size
(SDXL-Turbo: 512, the tests' tiny model: 128) gets the same buckets scaled by native/1024, rounded to the
sizes the UNet can take. So the tiny test pipeline generates small images through the same code.
"""
from __future__ import annotations

import gc
import importlib.util
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from loguru import logger

from bgwatch.errors import EngineError
from bgwatch.pipeline.backgrounds import BackgroundRequest, fit_cover
from bgwatch.pipeline.sdxl_load import (
    compile_cache_dir,
    from_pretrained,
    load_kwargs,
    prepare_pipeline,
    torch_device,
)

if TYPE_CHECKING:
    from bgwatch.config import Config

SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)
NATIVE_SIDE = 1024

# config.sdxl.scheduler -> (diffusers class name, from_config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

OOM_ADVICE = (
    "set sdxl.cpu_offload: true, sdxl.vae_tiling: true or sdxl.attention_slicing: true in config.yaml, "
    "or use smaller inputs or a lighter model"
)


def nearest_bucket(width: int, height: int) -> tuple[int, int]:
    """The SDXL bucket (width, height) whose aspect ratio is nearest width/height (compared as logs)."""
    aspect = math.log(width / height)
    return min(SDXL_BUCKETS, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def generation_size(width: int, height: int, *, scale: float = 1.0, align: int = 64) -> tuple[int, int]:
    """The size to generate for an input of width x height: nearest bucket, scaled, rounded to `align`."""
    bw, bh = nearest_bucket(width, height)

    def side(v: int) -> int:
        return max(align, int(v * scale / align + 0.5) * align)

    return side(bw), side(bh)


@dataclass
class _Loaded:
    pipe: Any
    device: str  # where generation runs (cuda also with cpu offload)
    original_scheduler: Any
    scheduler_name: str = ""
    scale: float = 1.0
    align: int = 64
    applied: dict[str, str] = field(default_factory=dict)  # the speed-ups and savers in effect


class PendingImage:
    """A generation launched by SdxlEngine.start(); result() waits for it (see the module's docstring).

    On a GPU the uint8 pixels are being copied into pinned host memory when start() returns, `done` is the
    CUDA event recorded after that copy; on cpu everything was computed in start() and `done` is None.
    """

    def __init__(
        self,
        request: BackgroundRequest,
        size: tuple[int, int],
        pixels: Any,
        finite: Any,
        *,
        began: Any = None,
        done: Any = None,
        previous_done: Any = None,
    ) -> None:
        self.request = request
        self.size = size  # (width, height) generated, before fitting to the request
        self._pixels, self._finite = pixels, finite
        self._began, self._done, self._previous_done = began, done, previous_done
        self._started = time.monotonic()
        self._image: np.ndarray | None = None
        self._lock = threading.Lock()
        self.gpu_seconds: float | None = None  # device time of this generation (GPU only, after result())
        self.idle_before: float | None = None  # GPU idle between the previous generation and this one

    def result(self) -> np.ndarray:
        """The backdrop, HxWx3 uint8 at exactly request.width x request.height; waits for the device."""
        with self._lock:
            if self._image is None:
                self._image = self._finish()
            return self._image

    def _finish(self) -> np.ndarray:
        if self._done is not None:
            self._done.synchronize()  # waits without holding the GIL
            self.gpu_seconds = self._began.elapsed_time(self._done) / 1000
            if self._previous_done is not None:
                self.idle_before = self._previous_done.elapsed_time(self._began) / 1000
            self._previous_done = None  # do not keep the previous generation's event alive
        r = self.request
        if not bool(self._finite):
            raise EngineError(
                "sdxl",
                f"{r.model} produced NaN pixels (an fp16 VAE overflow); set sdxl.vae_dtype: bfloat16 or "
                "float32, use a VAE with the fp16 fix, or run on cpu",
            )
        image = self._pixels.numpy().copy()  # the pinned buffer goes back to torch's host cache
        self._pixels = None
        gw, gh = self.size
        logger.debug(
            "sdxl: {}x{} in {} steps: {:.2f}s from start(){}",
            gw,
            gh,
            r.steps,
            time.monotonic() - self._started,
            ""
            if self.gpu_seconds is None
            else f", GPU {self.gpu_seconds:.3f}s"
            + ("" if self.idle_before is None else f", GPU idle before it {self.idle_before * 1000:.1f} ms"),
        )
        return fit_cover(image, r.width, r.height)


class SdxlEngine:
    """Stable Diffusion XL through diffusers; one model kept loaded (a new model replaces it)."""

    name = "sdxl"
    max_loaded_models = 1  # an SDXL pipeline in fp16 takes ~7 GB of GPU memory

    def __init__(self, config: Config, *, bucket_scale: float | None = None) -> None:
        self.config = config
        self.settings = config.sdxl
        self.requested_device = config.device
        self.allow_downloads = config.allow_downloads
        self.bucket_scale = bucket_scale  # None: derived from the model's native size
        self.calls = 0  # pipeline invocations: generations actually run
        self.loads = 0  # models loaded from disk
        self._pipes: OrderedDict[str, _Loaded] = OrderedDict()
        self._lock = threading.Lock()  # a pipeline is not re-entrant
        self._previous_done: Any = None  # the CUDA event after the last generation's copy

    def __repr__(self) -> str:
        return f"SdxlEngine(device={self.requested_device!r}, loaded={list(self._pipes)})"

    # ------------------------------------------------------------ loading

    def _load(self, model: str) -> _Loaded:
        loaded = self._pipes.get(model)
        if loaded is not None:
            self._pipes.move_to_end(model)
            return loaded
        while len(self._pipes) >= self.max_loaded_models:
            self._pipes.popitem(last=False)
            _free_memory()
        missing = [m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise EngineError("sdxl", f"{', '.join(missing)} not installed: pip install 'bgwatch[sdxl]' "
                              "(or 'bgwatch[gpu]' on a GPU workstation)")
        import torch

        device = torch_device(self.requested_device)
        dtype = torch.float16 if device == "cuda" else torch.float32
        started = time.monotonic()
        extra = load_kwargs(
            device, cpu_offload=self.settings.cpu_offload, accelerate=importlib.util.find_spec("accelerate") is not None
        )
        pipe = from_pretrained(
            model, dtype, fp16_variant=device == "cuda", downloads=self.allow_downloads, extra=extra
        )
        pipe.set_progress_bar_config(disable=True)
        applied = prepare_pipeline(pipe, self.settings, device, compile_cache_dir(self.config))
        vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        native = int(pipe.unet.config.sample_size) * vae_scale
        levels = len(pipe.unet.config.block_out_channels)
        # Each UNet level halves the latent; the pipeline itself wants multiples of 8 pixels.
        align = max(8, vae_scale * 2 ** (levels - 1))
        scale = self.bucket_scale if self.bucket_scale is not None else native / NATIVE_SIDE
        loaded = _Loaded(
            pipe=pipe, device=device, original_scheduler=pipe.scheduler, scale=scale, align=align, applied=applied
        )
        self._pipes[model] = loaded
        self.loads += 1
        logger.info(
            "sdxl: loaded {} on {} ({}) in {:.1f}s; native {}px; {}",
            model,
            device,
            str(dtype).removeprefix("torch."),
            time.monotonic() - started,
            native,
            ", ".join(f"{k}: {v}" for k, v in applied.items()),
        )
        return loaded

    def _use_scheduler(self, loaded: _Loaded, name: str) -> None:
        if name == loaded.scheduler_name:
            return
        if not name:
            loaded.pipe.scheduler = loaded.original_scheduler
        else:
            if name not in SCHEDULERS:
                raise EngineError("sdxl", f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})")
            import diffusers

            class_name, overrides = SCHEDULERS[name]
            cls = getattr(diffusers, class_name)
            loaded.pipe.scheduler = cls.from_config(loaded.original_scheduler.config, **overrides)
        loaded.scheduler_name = name

    def generation_size(self, request: BackgroundRequest) -> tuple[int, int]:
        """The (width, height) the model generates for this request (loads the model if needed)."""
        with self._lock:
            loaded = self._load(request.model)
        return generation_size(request.width, request.height, scale=loaded.scale, align=loaded.align)

    def scheduler_class(self, model: str) -> str:
        """The class name of the scheduler currently set on `model`'s pipeline."""
        with self._lock:
            return type(self._load(model).pipe.scheduler).__name__

    def default_model(self) -> str | None:
        """The first SDXL model the configuration's defaults and inboxes name; None when none uses sdxl."""
        from bgwatch.models import configured_models

        return next((name for kind, name, _ in configured_models(self.config) if kind == "sdxl"), None)

    def warm(self, model: str | None = None, *, generate: bool = True) -> str | None:
        """Load `model` (None: default_model()) before the first job needs it; with `generate`, also run
        one 1-step generation with guidance at the model's native square size, which initialises the GPU's
        kernels and, with sdxl.compile, compiles (or loads from the compile cache) that size's graphs.
        Returns the model warmed, or None when the configuration uses no sdxl model. Loads at most once:
        a model already loaded is kept."""
        model = model or self.default_model()
        if model is None:
            return None
        with self._lock:
            loaded = self._load(model)
        if generate:
            side = generation_size(NATIVE_SIDE, NATIVE_SIDE, scale=loaded.scale, align=loaded.align)[0]
            started = time.monotonic()
            self.render(
                BackgroundRequest(
                    engine="sdxl", width=side, height=side, model=model, prompt="warm-up", seed=0, steps=1,
                    guidance_scale=5.0, scheduler=self.settings.scheduler,
                )
            )
            logger.info("sdxl: warm-up generation {}x{} took {:.1f}s", side, side, time.monotonic() - started)
        return model

    # ------------------------------------------------------------ rendering

    def render(self, request: BackgroundRequest) -> np.ndarray:
        """The backdrop for `request`, waited for: start(request).result()."""
        return self.start(request).result()

    def start(self, request: BackgroundRequest) -> PendingImage:
        """Launch the generation (prompt encoding, denoising, VAE decode, conversion to uint8 and the copy
        to host memory) and return without waiting for the GPU; PendingImage.result() waits."""
        import torch

        if request.seed is None:
            raise EngineError("sdxl", "a request without a seed (BackgroundRequest.from_spec draws one)")
        with self._lock:
            loaded = self._load(request.model)
            self._use_scheduler(loaded, request.scheduler)
            gw, gh = generation_size(request.width, request.height, scale=loaded.scale, align=loaded.align)
            generator = torch.Generator(device=loaded.device).manual_seed(int(request.seed))
            cuda = loaded.device == "cuda"
            began = _recorded_event() if cuda else None
            pending: PendingImage | None = None
            try:
                with torch.inference_mode():
                    latents = loaded.pipe(
                        prompt=request.prompt,
                        negative_prompt=request.negative_prompt or None,
                        num_inference_steps=request.steps,
                        guidance_scale=request.guidance_scale,
                        width=gw,
                        height=gh,
                        generator=generator,
                        output_type="latent",
                    ).images
                    pixels, finite = _decode_to_uint8(loaded.pipe, latents)
                    if cuda:
                        pixels, finite = _to_pinned(pixels), _to_pinned(finite)
                        done = _recorded_event()
                        pending = PendingImage(
                            request, (gw, gh), pixels, finite, began=began, done=done,
                            previous_done=self._previous_done,
                        )
                        self._previous_done = done
                    else:
                        pending = PendingImage(request, (gw, gh), pixels, finite)
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
            if pending is None:
                # Outside the except block: the exception's traceback (and the tensors its frames hold)
                # is gone, so the memory can really be freed before the daemon takes the next job.
                _free_memory()
                raise EngineError(
                    "sdxl", f"out of GPU memory generating {gw}x{gh} with {request.model}; {OOM_ADVICE}"
                )
            self.calls += 1
        return pending


def _recorded_event() -> Any:
    import torch

    event: Any = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    event.record()
    return event


def _to_pinned(tensor: Any) -> Any:
    """An asynchronous copy into page-locked host memory (ordered on the current stream)."""
    import torch

    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _decode_to_uint8(pipe: Any, latents: Any) -> tuple[Any, Any]:
    """VAE-decode one latent in the VAE's own dtype (sdxl_load chose it) and convert it on its device to
    HxWx3 uint8, as diffusers' postprocess and numpy would (x * 0.5 + 0.5, clamp, * 255, round half to
    even), in float32. Returns (pixels, all finite) as device tensors: nothing here waits for the GPU."""
    import torch
    from diffusers.utils.torch_utils import get_module_execution_device

    vae = pipe.vae
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    latents = latents.to(get_module_execution_device(vae), vae.dtype)
    image = vae.decode(latents, return_dict=False)[0]
    if getattr(pipe, "watermark", None) is not None:
        # diffusers' invisible watermark, where that package is installed: applied as the pipeline would
        # (it goes through numpy, so it waits for the GPU).
        image = pipe.watermark.apply_watermark(image).to(image.device)
    image = image[0].float()
    finite = torch.isfinite(image).all()
    pixels = ((image * 0.5 + 0.5).clamp(0, 1) * 255.0).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous(), finite


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
