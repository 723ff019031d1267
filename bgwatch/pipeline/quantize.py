"""INT8 variants of the mask nets, and which precision a mask runs at.

`quantize` writes a statically quantized copy of an fp32 net beside it (`u2net.onnx` -> `u2net.int8.onnx`:
QDQ, per-channel int8 weights, uint8 activations, calibrated on generated studio shots) and its record
(`u2net.int8.json`: the images used, the method, the agreement reached). The variant is measured against
fp32 on a validation set of other shots (IoU of the two masks); one that misses the gate is deleted and its
record says so: fp32 stays. Dynamic quantization is not offered: it is slower than fp32 on U²-Net here.

`choose_precision` decides per engine: int8 where the CPU has 8-bit dot-product instructions (VNNI, AMX)
and a passed variant matches the fp32 file; fp32 everywhere else and on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bgwatch.pipeline.onnxnets import NetRecipe, mask8, net_input

PRECISIONS = ("auto", "fp32", "int8")
MIN_GAIN = 1.2  # auto runs int8 only where its record measured it this much faster than fp32
#: /proc/cpuinfo flags of 8-bit dot-product instructions, where ONNX Runtime's int8 kernels beat fp32.
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Generated studio shots (bgwatch.samples seeds): the benchmarks use seeds from 0, so neither set is theirs.
CALIBRATION_SEEDS = tuple(range(1000, 1016))
VALIDATION_SEEDS = tuple(range(2000, 2016))
SHOT_SIZE = (1024, 1024)


@dataclass(frozen=True, slots=True)
class Gate:
    """What a variant's masks must reach against fp32's on the validation set (IoU of alpha > 0.5)."""

    mean_iou: float = 0.97
    min_iou: float = 0.85


@dataclass(frozen=True, slots=True)
class Method:
    """One way to calibrate: ONNX Runtime's calibration method, and nodes kept in fp32 (by role)."""

    name: str
    calibrate: str = "MinMax"  # MinMax | Entropy | Percentile
    keep_ends: bool = False  # the first convolution and the output heads stay fp32


#: Tried in order until one passes the gate.
METHODS = (Method("minmax"), Method("minmax-fp32-ends", keep_ends=True))


@dataclass(frozen=True, slots=True)
class QuantizeResult:
    passed: bool
    variant: Path | None  # the int8 file, None when refused
    record: Path
    method: str
    mean_iou: float
    min_iou: float
    attempts: list[dict[str, Any]] = field(default_factory=list)


def variant_path(fp32: Path) -> Path:
    return fp32.with_name(f"{fp32.stem}.int8.onnx")


def record_path(fp32: Path) -> Path:
    return fp32.with_name(f"{fp32.stem}.int8.json")


# ---------------------------------------------------------------- which precision


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of a /proc/cpuinfo text (those of its first processor)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        return cpu_flags(path.read_text(errors="replace"))
    except OSError:
        return frozenset()


def choose_precision(requested: str, device: str, flags: frozenset[str], variant: Path | None,
                     gain: float | None = None) -> tuple[str, str]:
    """(fp32 | int8, why) for a mask net. `device`: the resolved one (cuda | cpu); `variant`: a passed int8
    file or None; `gain`: fp32's CPU time over int8's from its record (auto keeps fp32 below MIN_GAIN: a
    net too small for int8 to pay). int8 asked for but impossible falls back to fp32, and says why."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r} (allowed: {', '.join(PRECISIONS)})")
    if requested == "fp32":
        return "fp32", "mask.precision is fp32"
    if device == "cuda":
        return "fp32", "the net runs on CUDA (the int8 variant is for the CPU)"
    if variant is None:
        return "fp32", "no int8 variant that passed its quality gate (`bgwatch models quantize` makes one)"
    have = sorted(set(INT8_CPU_FLAGS) & flags)
    if requested == "int8":
        return "int8", "mask.precision is int8" + ("" if have else " (this CPU has no VNNI/AMX: it may be slow)")
    if not have:
        return "fp32", f"this CPU has none of {', '.join(INT8_CPU_FLAGS)} (int8 would be slower)"
    if gain is not None and gain < MIN_GAIN:
        return "fp32", f"{variant.name} passed its quality gate but ran x{gain:.2f} fp32's speed when measured"
    faster = f", x{gain:.1f} fp32's speed" if gain is not None else ""
    return "int8", f"this CPU has {', '.join(have)} and {variant.name} passed its quality gate{faster}"


_checked: dict[tuple[str, int, int], Path | None] = {}
_checked_lock = threading.Lock()


def passed_variant(fp32: Path) -> Path | None:
    """The int8 variant of `fp32` when it exists, its record says it passed, and the record was made from
    this very fp32 file (size and sha256); else None. Checked once per fp32 file version a process."""
    variant, record = variant_path(fp32), record_path(fp32)
    if not (variant.is_file() and record.is_file() and fp32.is_file()):
        return None
    stat = fp32.stat()
    key = (str(fp32), stat.st_size, stat.st_mtime_ns)
    with _checked_lock:
        if key in _checked:
            return _checked[key]
    try:
        data = json.loads(record.read_text())
        ok = (bool(data.get("passed")) and data.get("source", {}).get("bytes") == stat.st_size
              and data.get("source", {}).get("sha256") == _sha256(fp32))
    except (OSError, ValueError, AttributeError):
        ok = False
    with _checked_lock:
        _checked[key] = variant if ok else None
    return variant if ok else None


def speedup(fp32: Path) -> float | None:
    """fp32's CPU time an image over int8's, as the variant's record measured it (None: not recorded)."""
    try:
        cpu = json.loads(record_path(fp32).read_text())["cpu_ms_an_image"]
        return float(cpu["fp32"]) / max(float(cpu["int8"]), 1e-6)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- making a variant


def studio_images(seeds: Sequence[int], size: tuple[int, int] = SHOT_SIZE) -> list[tuple[str, np.ndarray]]:
    """(name, rgb) of generated studio shots, cycling through the backdrops as the samples folder does."""
    from bgwatch.samples import BACKDROPS, studio_shot

    out = []
    for i, seed in enumerate(seeds):
        kind = BACKDROPS[i % len(BACKDROPS)]
        out.append((f"studio_{seed:04d}_{kind}", studio_shot(seed, size=size, backdrop=kind).rgb))
    return out


def quantize(fp32: Path, recipe: NetRecipe, *, gate: Gate = Gate(),
             calibration: Sequence[tuple[str, np.ndarray]] | None = None,
             validation: Sequence[tuple[str, np.ndarray]] | None = None,
             methods: Sequence[Method] = METHODS) -> QuantizeResult:
    """Quantize `fp32` statically, trying `methods` in order until one reaches `gate` against fp32 on
    `validation` (default: generated studio shots); write the variant (only if it passed) and the record.
    `calibration` / `validation`: (name, HxWx3 uint8) images."""
    import onnxruntime

    calibration = list(calibration) if calibration is not None else studio_images(CALIBRATION_SEEDS)
    validation = list(validation) if validation is not None else studio_images(VALIDATION_SEEDS)
    feeds = [net_input(rgb, recipe) for _, rgb in validation]
    reference, fp32_ms = _masks(fp32, feeds, recipe)
    started = time.perf_counter()
    attempts: list[dict[str, Any]] = []
    best: tuple[Path, dict[str, Any]] | None = None
    with tempfile.TemporaryDirectory(prefix=".bgwatch-quantize-", dir=fp32.parent) as tmp:
        source = _prepared(_opset13(fp32, Path(tmp)), Path(tmp))
        for method in methods:
            out = Path(tmp) / f"{method.name}.onnx"
            excluded = _quantize_static(source, out, recipe, calibration, method)
            masks, int8_ms = _masks(out, feeds, recipe)
            ious = [_iou(a, b) for a, b in zip(reference, masks, strict=True)]
            mean_iou, min_iou = round(float(np.mean(ious)), 4), round(float(np.min(ious)), 4)
            attempt = {"method": method.name, "calibrate": method.calibrate, "fp32_nodes": excluded,
                       "mean_iou": mean_iou, "min_iou": min_iou, "per_image": [round(v, 4) for v in ious],
                       "cpu_ms": {"fp32": round(fp32_ms, 1), "int8": round(int8_ms, 1)},
                       "passed": mean_iou >= gate.mean_iou and min_iou >= gate.min_iou}
            attempts.append(attempt)
            if best is None or attempt["mean_iou"] > best[1]["mean_iou"]:
                best = (out, attempt)
            if attempt["passed"]:
                best = (out, attempt)
                break
        assert best is not None, "no quantization method given"
        chosen, result = best
        variant = variant_path(fp32)
        if result["passed"]:
            shutil.move(str(chosen), str(variant))
        else:
            variant.unlink(missing_ok=True)  # a stale variant of an older attempt must not be used
    record = {
        "variant": variant.name if result["passed"] else None,
        "source": {"file": fp32.name, "bytes": fp32.stat().st_size, "sha256": _sha256(fp32)},
        "method": ("static QDQ, per-channel int8 weights, uint8 activations, "
                   f"{result['calibrate']} calibration ({result['method']})"),
        "calibration": {"images": [name for name, _ in calibration], "source": "bgwatch.samples studio shots"},
        "validation": {"images": [name for name, _ in validation], "metric": "IoU of alpha > 0.5 against fp32"},
        "agreement": {"mean_iou": result["mean_iou"], "min_iou": result["min_iou"]},
        "cpu_ms_an_image": result["cpu_ms"],  # one thread, the validation set: what auto weighs
        "gate": asdict(gate),
        "passed": result["passed"],
        "attempts": attempts,
        "seconds": round(time.perf_counter() - started, 1),
        "onnxruntime": onnxruntime.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = record_path(fp32)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(record, indent=2) + "\n")
    temp.replace(path)
    with _checked_lock:
        _checked.clear()
    return QuantizeResult(bool(result["passed"]), variant if result["passed"] else None, path,
                          str(result["method"]), float(result["mean_iou"]), float(result["min_iou"]), attempts)


def _opset13(fp32: Path, tmp: Path) -> Path:
    """The model at opset 13 or later (per-channel QDQ needs DequantizeLinear's axis, opset 13)."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(fp32))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset >= 13:
        return fp32
    converted = version_converter.convert_version(model, 13)
    out = tmp / "opset13.onnx"
    onnx.save(converted, str(out))
    return out


def _quantize_static(source: Path, out: Path, recipe: NetRecipe, images: Sequence[tuple[str, np.ndarray]],
                     method: Method) -> list[str]:
    """Write `out`; returns the nodes kept in fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(source), load_external_data=False)
    input_name = model.graph.input[0].name
    excluded = _end_nodes(model) if method.keep_ends else []
    del model
    quantize_static(
        str(source), str(out), _calibration_reader(input_name, images, recipe),
        quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8, calibrate_method=getattr(CalibrationMethod, method.calibrate),
        nodes_to_exclude=excluded,
        extra_options=_flush_every(len(images)),
    )
    return excluded


def _prepared(source: Path, tmp: Path) -> Path:
    """The model as ONNX Runtime's quantizer wants it (shapes inferred, graph optimised: its
    quant_pre_process); the model as it is when that fails (a graph its shape inference cannot follow)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "prepared.onnx"
    try:
        quant_pre_process(str(source), str(out))
    except Exception:  # the quantizer works without it, only less tidily
        return source
    return out


def _flush_every(count: int) -> dict[str, Any]:
    """Calibration keeps every image's activations until it flushes them every k images (bounded memory);
    ORT 1.2x fails when the last flush leaves nothing, so k must not divide the count."""
    k = next((k for k in range(4, count) if count % k), None)
    return {} if k is None else {"CalibMaxIntermediateOutputs": k}


def _calibration_reader(input_name: str, images: Sequence[tuple[str, np.ndarray]], recipe: NetRecipe) -> Any:
    """onnxruntime.quantization's CalibrationDataReader over the images, one net input at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._images: Iterator[tuple[str, np.ndarray]] = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._images, None)
            return None if item is None else {input_name: net_input(item[1], recipe)}

    return Feeds()


def _end_nodes(model: Any) -> list[str]:
    """The nodes reading the graph's input, and those writing its outputs with the ones that feed them:
    where the first features and the final mask are made, the most sensitive to rounding."""
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    producers = {out: node for node in model.graph.node for out in node.output}
    chosen: list[str] = []
    for node in model.graph.node:
        if inputs & set(node.input) or outputs & set(node.output):
            chosen.append(node.name)
            if outputs & set(node.output):
                chosen.extend(producers[i].name for i in node.input if i in producers)
    return sorted({n for n in chosen if n})


def _masks(path: Path, feeds: Sequence[np.ndarray], recipe: NetRecipe) -> tuple[list[np.ndarray], float]:
    """The net's uint8 masks (at its own side) for each input, and its CPU ms an input on one thread (the
    first run, which sets the session up, not counted), with a throwaway CPU session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    masks = []
    cpu = 0.0
    for i, feed in enumerate(feeds):
        start = time.process_time()
        plane = np.asarray(session.run(None, {name: feed})[0][0, 0], np.float32)
        cpu += (time.process_time() - start) if i else 0.0
        masks.append(mask8(np.asarray(1 / (1 + np.exp(-plane)), np.float32) if recipe.sigmoid else plane))
    return masks, 1000 * cpu / max(len(feeds) - 1, 1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a > 127, b > 127
    union = int((x | y).sum())
    return 1.0 if union == 0 else float((x & y).sum() / union)
