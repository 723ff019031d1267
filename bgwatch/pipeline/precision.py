"""Which precision a mask net runs at: fp32, or its int8 variant (quantize.py) where that pays.

Asked for every job, so the answer is kept while the net's files stay as they are: a stat of the weights,
the variant and its record each time, not /proc/cpuinfo and the record read again (~0.6 ms a job).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

from bgwatch.jobs import MaskSpec
from bgwatch.pipeline.maskweights import rembg_weights_path
from bgwatch.pipeline.onnxnets import recipe_for


def mask_precision(spec: MaskSpec, device: str, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(fp32 | int8, why) for a spec's net on `device` (auto | cuda | cpu). `flags`: the CPU's feature
    flags (default: this machine's /proc/cpuinfo). Only the nets bgwatch runs itself have variants."""
    from bgwatch.pipeline import quantize

    if recipe_for(spec.model) is None:
        return "fp32", f"{spec.model} runs through rembg (bgwatch has no int8 variant of it)"
    from bgwatch.pipeline.masking import resolve_onnx_device

    weights = rembg_weights_path(spec.model)
    key = (spec.model, str(weights), spec.precision, device, flags, _versions(weights, quantize))
    with _precision_lock:
        known = _precisions.get(key)
    if known is not None:
        return known
    variant = quantize.passed_variant(weights) if weights is not None else None
    gain = quantize.speedup(weights) if weights is not None and variant is not None else None
    chosen = quantize.choose_precision(spec.precision, resolve_onnx_device(device),
                                       _cpu_flags() if flags is None else flags, variant, gain)
    with _precision_lock:
        _precisions[key] = chosen
    return chosen


_precisions: dict[tuple[object, ...], tuple[str, str]] = {}
_precision_lock = threading.Lock()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    from bgwatch.pipeline import quantize

    return quantize.read_cpu_flags()


def _versions(weights: Path | None, quantize: Any) -> tuple[tuple[int, int] | None, ...]:
    """(size, mtime) of the fp32 weights, their int8 variant and its record (None: absent)."""
    if weights is None:
        return ()
    out: list[tuple[int, int] | None] = []
    for path in (weights, quantize.variant_path(weights), quantize.record_path(weights)):
        try:
            stat = path.stat()
            out.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)
