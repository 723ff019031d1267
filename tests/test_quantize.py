"""INT8 variants of the mask nets: static quantization of the tiny net, its record and quality gate, and
which precision an engine runs at (from given CPU flags, never the machine's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bgwatch.jobs import MaskSpec
from bgwatch.pipeline import masking, quantize
from bgwatch.pipeline.onnxnets import U2NET
from bgwatch.pipeline.precision import mask_precision

VNNI = frozenset({"sse4_2", "avx2", "avx512f", "avx512_vnni"})
PLAIN = frozenset({"sse4_2", "avx2"})


@pytest.fixture(scope="module")
def shots() -> dict[str, list[tuple[str, np.ndarray]]]:
    return {"calibration": quantize.studio_images(range(1000, 1004), size=(256, 256)),
            "validation": quantize.studio_images(range(2000, 2006), size=(256, 256))}


def test_quantize_writes_a_variant_and_its_record(u2net_home: Path, shots: dict) -> None:
    fp32 = u2net_home / "tiny.onnx"
    result = quantize.quantize(fp32, U2NET, **shots)
    assert result.passed and result.variant == u2net_home / "tiny.int8.onnx" and result.variant.is_file()
    record = json.loads(result.record.read_text())
    assert record["passed"] is True and record["variant"] == "tiny.int8.onnx"
    assert record["calibration"]["images"] == [name for name, _ in shots["calibration"]]
    assert record["validation"]["images"] == [name for name, _ in shots["validation"]]
    assert "QDQ" in record["method"] and "MinMax" in record["method"]
    assert record["agreement"]["mean_iou"] >= 0.97 and record["agreement"]["min_iou"] >= 0.85
    assert record["gate"] == {"mean_iou": 0.97, "min_iou": 0.85}
    assert record["source"]["bytes"] == fp32.stat().st_size
    assert quantize.passed_variant(fp32) == result.variant
    # The variant holds int8 weights: QDQ nodes around its convolutions.
    import onnx

    ops = {node.op_type for node in onnx.load(str(result.variant)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops

    # An engine asked for int8 runs it, and its mask is fp32's.
    spec = MaskSpec(engine="rembg", model="tiny.onnx", precision="int8")
    engine = masking.load_mask_engine(spec, "cpu")
    assert isinstance(engine, masking.RembgMaskEngine) and engine.precision == "int8"
    assert engine._session.path == result.variant
    fp32_engine = masking.load_mask_engine(MaskSpec(engine="rembg", model="tiny.onnx", precision="fp32"), "cpu")
    assert fp32_engine is not engine and fp32_engine.precision == "fp32"
    rgb = shots["validation"][0][1]
    a, b = engine.predict(rgb) > 0.5, fp32_engine.predict(rgb) > 0.5
    assert (a & b).sum() / (a | b).sum() > 0.97


def test_a_variant_below_the_gate_is_refused_and_fp32_stays(u2net_home: Path, shots: dict) -> None:
    fp32 = u2net_home / "tiny.onnx"
    grey = [("grey", np.full((64, 64, 3), 240, np.uint8))]  # a degenerate calibration: no subject at all
    result = quantize.quantize(fp32, U2NET, calibration=grey, validation=shots["validation"])
    assert not result.passed and result.variant is None
    assert not (u2net_home / "tiny.int8.onnx").exists()
    record = json.loads(result.record.read_text())
    assert record["passed"] is False and record["variant"] is None
    assert [a["method"] for a in record["attempts"]] == [m.name for m in quantize.METHODS]  # every method tried
    assert record["agreement"]["mean_iou"] < 0.97
    assert quantize.passed_variant(fp32) is None
    assert mask_precision(MaskSpec(model="tiny.onnx"), "cpu", flags=VNNI)[0] == "fp32"


def test_a_stricter_gate_refuses_what_the_default_passes(u2net_home: Path, shots: dict) -> None:
    fp32 = u2net_home / "tiny.onnx"
    passed = quantize.quantize(fp32, U2NET, **shots)
    assert passed.passed and passed.mean_iou < 1.0
    strict = quantize.quantize(fp32, U2NET, gate=quantize.Gate(mean_iou=1.0, min_iou=1.0), **shots)
    assert not strict.passed and not (u2net_home / "tiny.int8.onnx").exists()  # the older variant is gone too


def test_a_record_of_other_weights_is_not_trusted(u2net_home: Path, shots: dict) -> None:
    fp32 = u2net_home / "tiny.onnx"
    assert quantize.quantize(fp32, U2NET, **shots).passed
    fp32.write_bytes(fp32.read_bytes() + b"\0")  # the fp32 file was replaced after quantizing
    assert quantize.passed_variant(fp32) is None


def _measured(fp32: Path, fp32_ms: float, int8_ms: float) -> None:
    """The record's speed figures set to known values (timing the tiny net says nothing stable)."""
    record = quantize.record_path(fp32)
    data = json.loads(record.read_text())
    data["cpu_ms_an_image"] = {"fp32": fp32_ms, "int8": int8_ms}
    record.write_text(json.dumps(data))


def test_auto_precision_follows_the_cpu_flags(u2net_home: Path, shots: dict) -> None:
    spec = MaskSpec(engine="rembg", model="tiny.onnx")
    assert mask_precision(spec, "cpu", flags=VNNI)[0] == "fp32"  # no variant yet
    record = json.loads(quantize.quantize(u2net_home / "tiny.onnx", U2NET, **shots).record.read_text())
    assert set(record["cpu_ms_an_image"]) == {"fp32", "int8"} and record["cpu_ms_an_image"]["int8"] > 0
    _measured(u2net_home / "tiny.onnx", 600.0, 200.0)
    precision, why = mask_precision(spec, "cpu", flags=VNNI)
    assert precision == "int8" and "avx512_vnni" in why and "x3.0 fp32's speed" in why
    assert mask_precision(spec, "cpu", flags=PLAIN)[0] == "fp32"
    amx = frozenset({"amx_int8", "amx_tile"})
    assert mask_precision(spec, "cpu", flags=amx)[0] == "int8"
    assert mask_precision(MaskSpec(model="tiny.onnx", precision="fp32"), "cpu", flags=VNNI)[0] == "fp32"
    forced, why = mask_precision(MaskSpec(model="tiny.onnx", precision="int8"), "cpu", flags=PLAIN)
    assert forced == "int8" and "no VNNI" in why
    _measured(u2net_home / "tiny.onnx", 20.0, 19.0)  # a net too small for int8 to pay: auto keeps fp32
    precision, why = mask_precision(spec, "cpu", flags=VNNI)
    assert precision == "fp32" and "x1.05 fp32's speed" in why
    assert mask_precision(MaskSpec(model="tiny.onnx", precision="int8"), "cpu", flags=VNNI)[0] == "int8"


def test_the_precision_is_worked_out_again_only_when_its_files_change(
        u2net_home: Path, shots: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for every job, answered from what was worked out while the weights, the variant and its record
    stay as they were; a new record is read at once."""
    spec = MaskSpec(engine="rembg", model="tiny.onnx")
    quantize.quantize(u2net_home / "tiny.onnx", U2NET, **shots)
    _measured(u2net_home / "tiny.onnx", 600.0, 200.0)
    reads: list[Path] = []
    real = quantize.speedup
    monkeypatch.setattr(quantize, "speedup", lambda fp32: reads.append(fp32) or real(fp32))
    assert mask_precision(spec, "cpu", flags=VNNI)[0] == "int8"
    assert mask_precision(spec, "cpu", flags=VNNI)[0] == "int8"
    assert len(reads) == 1
    _measured(u2net_home / "tiny.onnx", 20.0, 19.0)
    assert mask_precision(spec, "cpu", flags=VNNI)[0] == "fp32"
    assert len(reads) == 2


def test_choose_precision() -> None:
    variant = Path("u2net.int8.onnx")
    assert quantize.choose_precision("auto", "cuda", VNNI, variant)[0] == "fp32"
    assert quantize.choose_precision("int8", "cuda", VNNI, variant)[0] == "fp32"
    assert quantize.choose_precision("auto", "cpu", VNNI, None) == (
        "fp32", "no int8 variant that passed its quality gate (`bgwatch models quantize` makes one)")
    assert quantize.choose_precision("auto", "cpu", frozenset({"avx_vnni"}), variant)[0] == "int8"
    assert quantize.choose_precision("auto", "cpu", VNNI, variant, gain=3.0)[0] == "int8"
    assert quantize.choose_precision("auto", "cpu", VNNI, variant, gain=1.1)[0] == "fp32"
    with pytest.raises(ValueError, match="allowed: auto, fp32, int8"):
        quantize.choose_precision("fp16", "cpu", VNNI, variant)


def test_cpu_flags_are_read_from_cpuinfo_text() -> None:
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx512f avx512_vnni\n\nprocessor\t: 1\n"
    assert quantize.cpu_flags(text) == {"fpu", "sse", "avx512f", "avx512_vnni"}
    assert quantize.cpu_flags("processor: 0\n") == frozenset()


def test_the_precision_is_said_once_in_the_log(u2net_home: Path) -> None:
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="INFO")
    try:
        for _ in range(3):
            masking.load_mask_engine(MaskSpec(engine="rembg", model="tiny.onnx"), "cpu")
    finally:
        logger.remove(sink)
    said = [m for m in messages if "mask precision" in m]
    assert len(said) == 1 and "fp32" in said[0] and "no int8 variant" in said[0]
