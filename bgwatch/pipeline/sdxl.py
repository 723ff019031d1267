"""The `sdxl` background engine: diffusers' StableDiffusionXLPipeline, loaded once and kept.

`model` is a hub id (loaded from the Hugging Face cache, downloaded if the hub is reachable) or a local
folder written by save_pretrained (loaded with local_files_only). fp16 on CUDA (the fp16 weight variant
where the checkpoint has one), float32 on CPU. The memory savers in config.sdxl are applied where the
device supports them.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from loguru import logger

from bgwatch.errors import EngineError
from bgwatch.pipeline.backgrounds import BackgroundRequest, fit_cover

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


def _torch_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EngineError(
            "sdxl", f"device is cuda but torch {torch.__version__} sees no GPU (set device: cpu)"
        )
    return requested


@dataclass
class _Loaded:
    pipe: Any
    device: str  # where generation runs (cuda also with cpu offload)
    original_scheduler: Any
    scheduler_name: str = ""
    scale: float = 1.0
    align: int = 64


class SdxlEngine:
    """Stable Diffusion XL through diffusers; one model kept loaded (a new model replaces it)."""

    name = "sdxl"
    max_loaded_models = 1  # an SDXL pipeline in fp16 takes ~7 GB of GPU memory

    def __init__(self, config: Config, *, bucket_scale: float | None = None) -> None:
        self.settings = config.sdxl
        self.requested_device = config.device
        self.allow_downloads = config.allow_downloads
        self.bucket_scale = bucket_scale  # None: derived from the model's native size
        self.calls = 0  # pipeline invocations: generations actually run
        self._pipes: OrderedDict[str, _Loaded] = OrderedDict()
        self._lock = threading.Lock()  # a pipeline is not re-entrant

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

        device = _torch_device(self.requested_device)
        dtype = torch.float16 if device == "cuda" else torch.float32
        started = time.monotonic()
        pipe = _from_pretrained(model, dtype, fp16_variant=device == "cuda", downloads=self.allow_downloads)
        pipe.set_progress_bar_config(disable=True)
        s = self.settings
        if s.attention_slicing:
            pipe.enable_attention_slicing()
        if s.vae_slicing:
            pipe.vae.enable_slicing()
        if s.vae_tiling:
            pipe.vae.enable_tiling()
        if s.cpu_offload and device == "cuda":
            pipe.enable_model_cpu_offload()
        else:
            if s.cpu_offload:
                logger.warning("sdxl: cpu_offload needs a GPU; ignored on {}", device)
            pipe.to(device)
        vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        native = int(pipe.unet.config.sample_size) * vae_scale
        levels = len(pipe.unet.config.block_out_channels)
        # Each UNet level halves the latent; the pipeline itself wants multiples of 8 pixels.
        align = max(8, vae_scale * 2 ** (levels - 1))
        scale = self.bucket_scale if self.bucket_scale is not None else native / NATIVE_SIDE
        loaded = _Loaded(
            pipe=pipe, device=device, original_scheduler=pipe.scheduler, scale=scale, align=align
        )
        self._pipes[model] = loaded
        logger.info(
            "sdxl: loaded {} on {} ({}) in {:.1f}s; native {}px",
            model,
            device,
            str(dtype).removeprefix("torch."),
            time.monotonic() - started,
            native,
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

    # ------------------------------------------------------------ rendering

    def render(self, request: BackgroundRequest) -> np.ndarray:
        import torch

        if request.seed is None:
            raise EngineError("sdxl", "a request without a seed (BackgroundRequest.from_spec draws one)")
        with self._lock:
            loaded = self._load(request.model)
            self._use_scheduler(loaded, request.scheduler)
            gw, gh = generation_size(request.width, request.height, scale=loaded.scale, align=loaded.align)
            generator = torch.Generator(device=loaded.device).manual_seed(int(request.seed))
            started = time.monotonic()
            out_of_memory = False
            try:
                with torch.inference_mode():
                    result = loaded.pipe(
                        prompt=request.prompt,
                        negative_prompt=request.negative_prompt or None,
                        num_inference_steps=request.steps,
                        guidance_scale=request.guidance_scale,
                        width=gw,
                        height=gh,
                        generator=generator,
                        output_type="np",
                    )
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
                out_of_memory = True
            if out_of_memory:
                # Outside the except block: the exception's traceback (and the tensors its frames hold)
                # is gone, so the memory can really be freed before the daemon takes the next job.
                _free_memory()
                raise EngineError(
                    "sdxl", f"out of GPU memory generating {gw}x{gh} with {request.model}; {OOM_ADVICE}"
                )
            self.calls += 1
        images = result.images
        if not np.isfinite(images).all():
            raise EngineError(
                "sdxl",
                f"{request.model} produced NaN pixels (an fp16 VAE overflow); use a VAE with the fp16 fix "
                "or run on cpu",
            )
        image = np.clip(np.rint(images[0] * 255.0), 0, 255).astype(np.uint8)
        logger.debug(
            "sdxl: {}x{} in {} steps took {:.2f}s", gw, gh, request.steps, time.monotonic() - started
        )
        return fit_cover(image, request.width, request.height)


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


def _has_fp16_variant(folder: Path) -> bool:
    return any(folder.glob("unet/*.fp16.safetensors")) or any(folder.glob("unet/*.fp16.bin"))


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def _from_pretrained(model: str, dtype: Any, *, fp16_variant: bool, downloads: bool = False) -> Any:
    try:
        from diffusers import StableDiffusionXLPipeline
    except ImportError:
        raise EngineError("sdxl", "diffusers is not installed (pip install 'bgwatch[sdxl]')") from None

    if _looks_like_path(model):
        folder = Path(model).expanduser()
        if not (folder / "model_index.json").is_file():
            raise EngineError(
                "sdxl", f"model folder {folder} has no model_index.json (save_pretrained output)"
            )
        variant = "fp16" if fp16_variant and _has_fp16_variant(folder) else None
        try:
            return StableDiffusionXLPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                str(folder), dtype=dtype, variant=variant, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise EngineError("sdxl", f"cannot load model folder {folder}: {_first_line(exc)}") from None

    # A hub id: the Hugging Face cache only, unless allow_downloads (then a download where the hub answers;
    # with no network that fails within milliseconds, never a hang).
    attempts = [{"variant": "fp16"}, {}] if fp16_variant else [{}]
    last: BaseException | None = None
    for extra in attempts:
        try:
            return StableDiffusionXLPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                model, dtype=dtype, local_files_only=not downloads, **extra
            )
        except (OSError, ValueError) as exc:  # huggingface_hub's errors are OSError/ValueError subclasses
            last = exc
    raise EngineError(
        "sdxl",
        f"model {model!r} is not in the local Hugging Face cache"
        + (" and could not be downloaded" if downloads else " (allow_downloads is off: no download at job time)")
        + f" ({_first_line(last)}); run `bgwatch models pull` where the hub is reachable, or set model to a "
        "local folder",
    ) from None


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else type(exc).__name__
    return text[:300]
