"""Loading an SDXL pipeline for the `sdxl` engine and making it fast: the choices made once per model.

- Weights: a local folder written by save_pretrained (its fp16 variant on a GPU where it has one), or a
  hub id from the Hugging Face cache. On a GPU without cpu_offload the safetensors are read straight onto
  the device (`device_map="cuda"`): no copy in host memory first, no `pipe.to()` afterwards.
- Speed-ups from config.sdxl: fused attention projections and the channels-last layout in the UNet and
  the VAE, and a VAE that decodes without the fp32 upcast (`vae_decode_dtype`).
- Optional torch.compile of the UNet (its transformer blocks, or the whole UNet) with dynamic=False:
  one graph a generation size, compiled on first use. Compiled artefacts go to
  `<state_dir>/torch-compile` (TORCHINDUCTOR_CACHE_DIR, unless the operator set it), so a restart
  finds them there instead of in /tmp, which a systemd unit's PrivateTmp empties at every start.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from bgwatch.errors import EngineError

if TYPE_CHECKING:
    from bgwatch.config import Config, SdxlSettings

COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# dynamic=False compiles one graph a shape: 9 buckets x (with, without guidance) x the UNet's block
# widths is beyond dynamo's default of 8 graphs a code object, after which it silently runs eagerly.
COMPILED_GRAPHS_LIMIT = 256


def torch_device(requested: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; EngineError for cuda without one."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EngineError(
            "sdxl", f"device is cuda but torch {torch.__version__} sees no GPU (set device: cpu)"
        )
    return requested


def vae_decode_dtype(
    setting: str, device: str, model_dtype: str, *, force_upcast: bool, bf16_supported: bool
) -> str:
    """The dtype the VAE decodes in (a torch dtype's name).

    diffusers upcasts a force_upcast VAE to float32 for every decode (and back: the weights are converted
    twice an image). bfloat16 has float32's range, so the real SDXL VAE does not overflow to NaN in it as
    it does in fp16; a VAE whose config says force_upcast false decodes in fp16. On cpu: the model's dtype.
    """
    if setting != "auto":
        return setting
    if device != "cuda" or model_dtype == "float32":
        return model_dtype
    if not force_upcast:
        return "float16"
    return "bfloat16" if bf16_supported else "float32"


def compile_cache_dir(config: Config) -> Path:
    """Where torch.compile's artefacts are kept between starts: local disk, beside the state database."""
    return config.state_dir / "torch-compile"


def use_compile_cache(
    folder: Path, torch_default: str, environ: dict[str, str] | os._Environ[str] = os.environ
) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels) at `folder`, unless the
    operator chose a folder with TORCHINDUCTOR_CACHE_DIR. torch itself writes its default (`torch_default`,
    under /tmp) into that variable the first time it asks, so that value does not count as a choice.
    Returns the folder in use."""
    current = environ.get(COMPILE_CACHE_ENV)
    if current and os.path.abspath(current) != os.path.abspath(torch_default):
        return Path(current)
    folder.mkdir(parents=True, exist_ok=True)
    environ[COMPILE_CACHE_ENV] = str(folder.resolve())
    return folder


def _use_compile_cache_in_torch(folder: Path) -> Path:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    from torch._inductor.utils import clear_caches

    in_use = use_compile_cache(folder, default_cache_dir())
    clear_caches()  # inductor memoises some paths under the cache folder
    return in_use


def load_kwargs(device: str, *, cpu_offload: bool, accelerate: bool) -> dict[str, Any]:
    """Extra from_pretrained arguments: weights straight onto the GPU where nothing moves them later."""
    if device == "cuda" and not cpu_offload and accelerate:
        return {"device_map": "cuda"}
    return {}


def prepare_pipeline(pipe: Any, settings: SdxlSettings, device: str, cache_dir: Path) -> dict[str, str]:
    """Apply config.sdxl's memory savers and speed-ups to a freshly loaded pipeline and place it on the
    device. Returns what was applied (logged, and read by tests and the benchmark)."""
    import torch

    applied: dict[str, str] = {}
    s = settings
    if s.attention_slicing:
        pipe.enable_attention_slicing()
        applied["attention"] = "sliced"
    elif s.fuse_qkv:
        # Fusing replaces the attention processors, so it cannot be combined with slicing's.
        pipe.unet.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
        applied["attention"] = "fused qkv"
    if s.vae_slicing:
        pipe.vae.enable_slicing()
    if s.vae_tiling:
        pipe.vae.enable_tiling()
    model_dtype = str(pipe.unet.dtype).removeprefix("torch.")
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    decode = vae_decode_dtype(
        s.vae_dtype, device, model_dtype, force_upcast=bool(pipe.vae.config.force_upcast), bf16_supported=bf16
    )
    if pipe.vae.dtype != getattr(torch, decode):
        # nn.Module.to, not diffusers' override: that warns about fp32 modules on every cast, even when the
        # model has none to keep (AutoencoderKL's list is empty).
        torch.nn.Module.to(pipe.vae, dtype=getattr(torch, decode))
    applied["vae"] = decode
    if s.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied["layout"] = "channels_last"
    if s.cpu_offload and device == "cuda":
        pipe.enable_model_cpu_offload()
        applied["offload"] = "model"
    else:
        if s.cpu_offload:
            logger.warning("sdxl: cpu_offload needs a GPU; ignored on {}", device)
        pipe.to(device)  # a no-op where the weights were loaded onto the device
    if s.compile != "none":
        applied["compile"] = f"{s.compile} (cache {_use_compile_cache_in_torch(cache_dir)})"
        dynamo_config = torch._dynamo.config
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, COMPILED_GRAPHS_LIMIT)
        if s.compile == "blocks":
            pipe.unet.compile_repeated_blocks(dynamic=False)
        else:
            pipe.unet.compile(dynamic=False)
    return applied


def has_fp16_variant(folder: Path) -> bool:
    return any(folder.glob("unet/*.fp16.safetensors")) or any(folder.glob("unet/*.fp16.bin"))


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def no_progress_bars() -> None:
    """No tqdm bars while loading: diffusers' "Loading pipeline components" and transformers' "Loading
    weights" would reach the daemon's console and the journal as lines of carriage returns and blocks.
    (The denoising loop's bar is switched off per pipeline: set_progress_bar_config.)"""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def from_pretrained(
    model: str, dtype: Any, *, fp16_variant: bool, downloads: bool = False, extra: dict[str, Any] | None = None
) -> Any:
    """StableDiffusionXLPipeline.from_pretrained for a local folder or a hub id, errors as EngineError."""
    try:
        from diffusers import StableDiffusionXLPipeline
    except ImportError:
        raise EngineError("sdxl", "diffusers is not installed (pip install 'bgwatch[sdxl]')") from None

    no_progress_bars()
    extra = extra or {}
    if _looks_like_path(model):
        folder = Path(model).expanduser()
        if not (folder / "model_index.json").is_file():
            raise EngineError(
                "sdxl", f"model folder {folder} has no model_index.json (save_pretrained output)"
            )
        variant = "fp16" if fp16_variant and has_fp16_variant(folder) else None
        try:
            return StableDiffusionXLPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                str(folder), dtype=dtype, variant=variant, local_files_only=True, **extra
            )
        except (OSError, ValueError) as exc:
            raise EngineError("sdxl", f"cannot load model folder {folder}: {first_line(exc)}") from None

    # A hub id: the Hugging Face cache only, unless allow_downloads (then a download where the hub answers;
    # with no network that fails within milliseconds, never a hang).
    attempts = [{"variant": "fp16"}, {}] if fp16_variant else [{}]
    last: BaseException | None = None
    for variant_kw in attempts:
        try:
            return StableDiffusionXLPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                model, dtype=dtype, local_files_only=not downloads, **variant_kw, **extra
            )
        except (OSError, ValueError) as exc:  # huggingface_hub's errors are OSError/ValueError subclasses
            last = exc
    raise EngineError(
        "sdxl",
        f"model {model!r} is not in the local Hugging Face cache"
        + (" and could not be downloaded" if downloads else " (allow_downloads is off: no download at job time)")
        + f" ({first_line(last)}); run `bgwatch models pull` where the hub is reachable, or set model to a "
        "local folder",
    ) from None


def first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else type(exc).__name__
    return text[:300]
