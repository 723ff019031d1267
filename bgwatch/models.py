"""`bgwatch models ls | pull | quantize`: which model weights the configuration needs, whether they are here,
fetching them into their usual caches (rembg's model home, the Hugging Face cache) where there is
network, and making the mask nets' INT8 variants (pipeline/quantize.py). The daemon itself never downloads
a mask model; it fails a job with a message pointing here.

Lookups are file-system only (no rembg, no torch import); pulling imports rembg / huggingface_hub lazily, and
a mask net pulled for a CPU gets its int8 variant at once (`models quantize` makes it for weights already
in place, custom .onnx files included).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from bgwatch.errors import BgwatchError
from bgwatch.jobs import DEFAULT_SDXL_MODEL, JobSpec, MaskSpec

if TYPE_CHECKING:
    from bgwatch.config import Config

# Files an SDXL pipeline needs, without the extras hub repos carry (single-file checkpoints, ONNX,
# OpenVINO, flax). fp16 weights for a GPU, full-precision ones otherwise.
_SDXL_COMMON = ["model_index.json", "*/*.json", "*/*.txt"]
_SDXL_FP16 = [*_SDXL_COMMON, "*/*.fp16.safetensors"]
_SDXL_FP32 = [*_SDXL_COMMON, "*/*.safetensors"]


_SPEC, _MASK = JobSpec(), MaskSpec()  # the built-in defaults (slots classes hold no class-level values)


@dataclass(frozen=True, slots=True)
class ModelStatus:
    kind: str  # "rembg" | "sdxl"
    name: str  # rembg model name, hub id or folder
    present: bool
    path: str  # where the weights are, or where they would go
    detail: str = ""  # where the name comes from, or what went wrong


# ---------------------------------------------------------------- where weights live


def use_model_locations(config: Config, *, downloads: bool | None = None) -> None:
    """Point rembg's model home and the Hugging Face cache at `models_dir` (when set), and keep the hub
    offline unless downloads are allowed. The CLI calls this before any engine is imported, for every
    command, so `bgwatch models pull` from an admin shell writes where the service reads."""
    if config.models_dir is not None:
        os.environ["U2NET_HOME"] = str(config.models_dir / "rembg")
        os.environ["HF_HOME"] = str(config.models_dir / "huggingface")
        os.environ.pop("HF_HUB_CACHE", None)  # derived from HF_HOME by huggingface_hub
    allowed = config.allow_downloads if downloads is None else downloads
    if allowed:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = "1"  # a job never starts a multi-GB download in the device worker


# ---------------------------------------------------------------- what the configuration needs


def configured_models(config: Config) -> list[tuple[str, str, str]]:
    """(kind, name, used by) for every rembg and SDXL model the defaults and the inboxes' rules name."""
    # Every job belongs to an inbox, so the defaults alone count only when there is none.
    layers: list[tuple[str, dict[str, Any]]] = [] if config.inboxes else [("defaults", dict(config.defaults))]
    for i, inbox in enumerate(config.inboxes):
        merged = {**config.defaults, **inbox.rules}
        merged["mask"] = {**dict(config.defaults.get("mask", {})), **dict(inbox.rules.get("mask", {}))}
        layers.append((f"inboxes[{i}]", merged))
    found: dict[tuple[str, str], list[str]] = {}
    for label, values in layers:
        mask = {"engine": _MASK.engine, "model": _MASK.model, **dict(values.get("mask", {}))}
        if mask["engine"] in ("auto", "rembg"):
            found.setdefault(("rembg", str(mask["model"])), []).append(label)
        operation = values.get("operation", _SPEC.operation)
        engine = values.get("engine", _SPEC.engine)
        if operation == "replace" and engine == "sdxl":
            found.setdefault(("sdxl", str(values.get("model") or DEFAULT_SDXL_MODEL)), []).append(label)
    return [(kind, name, ", ".join(users)) for (kind, name), users in found.items()]


def _kind_of(name: str) -> str:
    """An explicit name on the command line: a hub id (owner/name) or a folder is SDXL, else rembg."""
    return "sdxl" if "/" in name or name.startswith(("~", ".")) else "rembg"


def _wanted(config: Config, names: Iterable[str]) -> list[tuple[str, str, str]]:
    names = list(names)
    if names:
        return [(_kind_of(n), n, "command line") for n in names]
    return configured_models(config)


# ---------------------------------------------------------------- rembg


def rembg_weights(name: str) -> tuple[Path | None, Path]:
    """(the weights file if present, where they belong) — the mask engine's own lookup, so `models ls`
    and the daemon never disagree."""
    from bgwatch.pipeline.maskweights import rembg_weights_path, rembg_weights_target

    return rembg_weights_path(name), rembg_weights_target(name)


def _rembg_status(name: str, used_by: str) -> ModelStatus:
    found, target = rembg_weights(name)
    return ModelStatus("rembg", name, found is not None, str(found or target), used_by)


def _pull_rembg(name: str, used_by: str) -> ModelStatus:
    status = _rembg_status(name, used_by)
    if status.present:
        return status
    if name.lower().endswith(".onnx"):
        raise BgwatchError(f"{name} is a custom model: bgwatch cannot download it; copy it to {status.path}")
    try:
        from rembg.sessions import sessions
    except ImportError as exc:
        raise BgwatchError(f"rembg is not installed ({exc}); pip install 'rembg[gpu]'") from None
    if name not in sessions:
        raise BgwatchError(f"unknown rembg model {name!r} (known: {', '.join(sorted(sessions))})")
    _, target = rembg_weights(name)
    logger.info("models: downloading rembg model {} into {}", name, target.parent)
    try:
        sessions[name].download_models()
    except Exception as exc:  # pooch/requests raise many kinds; all mean the same here
        _remove_if_empty(target.parent)
        _remove_if_empty(target.parent.parent)
        raise BgwatchError(
            f"cannot download rembg model {name!r} ({_short(exc)}); no network? copy {name}.onnx into "
            f"{target.parent} by hand"
        ) from None
    return _rembg_status(name, used_by)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:100]}" if text else type(exc).__name__


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or not there: leave it
        folder.rmdir()


# ---------------------------------------------------------------- INT8 variants


@dataclass(frozen=True, slots=True)
class QuantizeStatus:
    name: str
    passed: bool
    path: str  # the variant when it passed, else its record (or where the weights would be)
    detail: str  # the agreement reached, or why there is none


Shots = Sequence[tuple[str, Any]]  # (name, HxWx3 uint8 image)


def _quantize_rembg(name: str, calibration: Shots | None = None, validation: Shots | None = None) -> QuantizeStatus:
    from bgwatch.pipeline import quantize
    from bgwatch.pipeline.onnxnets import recipe_for

    found, target = rembg_weights(name)
    recipe = recipe_for(name)
    if recipe is None:
        return QuantizeStatus(name, False, str(found or target), "runs through rembg: bgwatch makes no int8 "
                              "variant of it")
    if found is None:
        return QuantizeStatus(name, False, str(target), f"weights missing: run `bgwatch models pull {name}`")
    logger.info("models: quantizing {} to int8 (calibration and the quality gate take a minute or more)", name)
    try:
        result = quantize.quantize(found, recipe, calibration=calibration, validation=validation)
    except ImportError as exc:
        raise BgwatchError(f"quantizing needs the onnx package ({exc}); pip install 'bgwatch[cpu]'") from None
    except Exception as exc:  # ONNX Runtime's quantizer raises many kinds (a model it cannot convert, ...)
        return QuantizeStatus(name, False, str(found), f"cannot quantize: {_short(exc)}; fp32 stays")
    agreement = f"IoU with fp32: mean {result.mean_iou:.3f}, lowest {result.min_iou:.3f} ({result.method})"
    if result.passed:
        gain = quantize.speedup(found)
        if gain is not None:
            agreement += f"; x{gain:.2f} fp32's speed" + (" (auto keeps fp32)" if gain < quantize.MIN_GAIN else "")
        return QuantizeStatus(name, True, str(result.variant), agreement)
    return QuantizeStatus(name, False, str(result.record), f"refused, below the gate: {agreement}; fp32 stays")


def _quantize_on_pull(config: Config, name: str) -> bool:
    """A net just downloaded gets its int8 variant where it would run on the CPU."""
    from bgwatch.pipeline.masking import resolve_onnx_device
    from bgwatch.pipeline.onnxnets import recipe_for

    return recipe_for(name) is not None and resolve_onnx_device(config.device) == "cpu"


def quantize_models(config: Config, names: Sequence[str] = (), *, calibration: Shots | None = None,
                    validation: Shots | None = None) -> list[QuantizeStatus]:
    """An int8 variant, beside the fp32 file, of each configured mask net (or `names`), with its record;
    one that misses the quality gate is refused (fp32 stays). `calibration`, `validation`: other images
    than the generated studio shots (quantize.py)."""
    return [_quantize_rembg(name, calibration, validation)
            for kind, name, _ in _wanted(config, names) if kind == "rembg"]


def format_quantize(statuses: Sequence[QuantizeStatus]) -> str:
    if not statuses:
        return "nothing to quantize: the configuration uses no mask net"
    return "\n".join(f"{'int8' if s.passed else 'fp32':5}  {s.name}  {s.path}  ({s.detail})" for s in statuses)


def precision_report(config: Config, flags: frozenset[str] | None = None) -> list[str]:
    """One line per configured mask net: the precision it runs at on this machine, and why (for doctor).
    `flags`: the CPU's feature flags (default: this machine's)."""
    from bgwatch.pipeline.precision import mask_precision

    precision = str(dict(config.defaults.get("mask", {})).get("precision", _MASK.precision))
    lines = []
    for kind, name, _ in configured_models(config):
        if kind == "rembg":
            chosen, why = mask_precision(MaskSpec(model=name, precision=precision), config.device, flags)
            lines.append(f"mask {name}: {chosen} ({why})")
    return lines


# ---------------------------------------------------------------- SDXL


def _is_folder_name(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub repo if it holds a complete-looking pipeline, else None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached: LocalEntryNotFoundError, or a malformed id
        return None
    if (folder / "model_index.json").is_file() and any(folder.glob("unet/*.safetensors")):
        return folder
    return None


def _sdxl_status(name: str, used_by: str) -> ModelStatus:
    if _is_folder_name(name):
        folder = Path(name).expanduser().resolve()
        ok = (folder / "model_index.json").is_file()
        return ModelStatus(
            "sdxl", name, ok, str(folder), used_by if ok else f"{used_by}; no model_index.json"
        )
    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        return ModelStatus("sdxl", name, True, str(snapshot), used_by)
    return ModelStatus("sdxl", name, False, _hub_cache_dir(), used_by)


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.expanduser("~/.cache/huggingface/hub")


def _wants_fp16(config: Config) -> bool:
    if config.device == "cpu":
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return config.device == "cuda"


def _pull_sdxl(name: str, used_by: str, fp16: bool) -> ModelStatus:
    status = _sdxl_status(name, used_by)
    if status.present or _is_folder_name(name):
        return status  # a local folder is the operator's to fill
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise BgwatchError("huggingface_hub is not installed; pip install 'bgwatch[sdxl]'") from None
    logger.info("models: downloading {} ({}) into {}", name, "fp16" if fp16 else "fp32", _hub_cache_dir())
    try:
        if fp16:
            folder = Path(snapshot_download(name, allow_patterns=_SDXL_FP16))
            if any(folder.glob("unet/*.safetensors")):
                return _sdxl_status(name, used_by)
            # No fp16 variant in this repo: the full-precision weights then.
        snapshot_download(name, allow_patterns=_SDXL_FP32, ignore_patterns=["*.fp16.safetensors"])
    except Exception as exc:  # connection, not found, gated, disk full: one message for the CLI
        raise BgwatchError(
            f"cannot download {name!r} from the Hugging Face hub ({_short(exc)}); no network? download it "
            "elsewhere and set model to the folder, or copy the hub cache"
        ) from None
    return _sdxl_status(name, used_by)


# ---------------------------------------------------------------- public entry points


def list_models(config: Config, names: Sequence[str] = ()) -> list[ModelStatus]:
    """The configured models (or `names`) and whether their weights are here."""
    out = []
    for kind, name, used_by in _wanted(config, names):
        out.append(_rembg_status(name, used_by) if kind == "rembg" else _sdxl_status(name, used_by))
    return out


def pull_models(config: Config, names: Sequence[str] = (), *, fp16: bool | None = None) -> list[ModelStatus]:
    """Download what is missing into rembg's model home and the Hugging Face cache.

    fp16: the half-precision SDXL weights (what a GPU runs; half the download); None: fp16 when this
    machine has CUDA. Every model is tried; if any could not be fetched, one BgwatchError (one line, for
    the CLI) says which and why, after the others were pulled.
    """
    fp16 = _wants_fp16(config) if fp16 is None else fp16
    out = []
    failures: list[str] = []
    for kind, name, used_by in _wanted(config, names):
        try:
            if kind == "rembg":
                fresh = not _rembg_status(name, used_by).present
                status = _pull_rembg(name, used_by)
                if fresh and status.present and _quantize_on_pull(config, name):
                    int8 = _quantize_rembg(name)
                    status = replace(status, detail=f"{status.detail}; {'int8' if int8.passed else 'no int8'}: "
                                     f"{int8.detail}")
                out.append(status)
            else:
                out.append(_pull_sdxl(name, used_by, fp16))
        except BgwatchError as exc:
            failures.append(str(exc))
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        pulled = f"; pulled or present: {', '.join(s.name for s in out)}" if out else ""
        raise BgwatchError(f"{failures[0]}{more}{pulled}")
    return out


def format_models(statuses: Sequence[ModelStatus]) -> str:
    if not statuses:
        return "no models needed: the configuration uses only weight-free engines"
    lines = [f"{'kind':6}  {'state':8}  {'model':40}  path"]
    for s in statuses:
        state = "present" if s.present else "missing"
        lines.append(
            f"{s.kind:6}  {state:8}  {s.name:40}  {s.path}" + (f"  ({s.detail})" if s.detail else "")
        )
    missing = [s for s in statuses if not s.present]
    if missing:
        lines.append(f"{len(missing)} missing: run `bgwatch models pull` where the internet is reachable")
    return "\n".join(lines)


def format_pull(statuses: Sequence[ModelStatus]) -> str:
    if not statuses:
        return "nothing to pull: the configuration uses only weight-free engines"
    return "\n".join(
        f"{'ok' if s.present else 'missing':7}  {s.kind:6}  {s.name}  {s.path}" for s in statuses
    )
