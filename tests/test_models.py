"""`bgwatch models ls | pull`: which weights the config needs and whether they are here (files only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bgwatch.config import Config, InboxConfig
from bgwatch.errors import BgwatchError
from bgwatch.jobs import DEFAULT_SDXL_MODEL
from bgwatch.models import configured_models, format_models, list_models, pull_models, rembg_weights


@pytest.fixture
def u2net_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "u2net"
    home.mkdir()
    monkeypatch.setenv("U2NET_HOME", str(home))
    return home


def config_with(
    tmp_path: Path, *rules: dict[str, object], defaults: dict[str, object] | None = None
) -> Config:
    inboxes = tuple(
        InboxConfig(path=tmp_path / f"in{i}", outbox=tmp_path / f"out{i}", rules=r)
        for i, r in enumerate(rules)
    )
    return Config(device="cpu", inboxes=inboxes, defaults=defaults or {})


def test_configured_models_follow_defaults_and_inbox_rules(tmp_path: Path, tiny_sdxl: Path) -> None:
    config = config_with(
        tmp_path,
        {"operation": "cleanup"},
        {"operation": "replace", "engine": "sdxl", "prompt": "p", "mask": {"model": "isnet-general-use"}},
        {"operation": "replace", "engine": "sdxl", "prompt": "p", "model": str(tiny_sdxl)},
        {"operation": "replace", "engine": "runway", "prompt": "p", "mask": {"engine": "classical"}},
    )
    found = {(kind, name) for kind, name, _ in configured_models(config)}
    assert found == {
        ("rembg", "u2net"),
        ("rembg", "isnet-general-use"),
        ("sdxl", DEFAULT_SDXL_MODEL),
        ("sdxl", str(tiny_sdxl)),
    }


def test_list_models_reports_present_and_missing(tmp_path: Path, u2net_home: Path, tiny_sdxl: Path) -> None:
    (u2net_home / "u2net.onnx").write_bytes(b"onnx")
    config = config_with(
        tmp_path,
        {"operation": "replace", "engine": "sdxl", "prompt": "p", "model": str(tiny_sdxl)},
        {
            "operation": "replace",
            "engine": "sdxl",
            "prompt": "p",
            "model": "bgwatch-tests/not-cached",
            "mask": {"model": "birefnet-general"},
        },
    )
    status = {(s.kind, s.name): s for s in list_models(config)}
    assert status[("rembg", "u2net")].present and status[("rembg", "u2net")].path == str(
        u2net_home / "u2net.onnx"
    )
    assert not status[("rembg", "birefnet-general")].present
    assert status[("sdxl", str(tiny_sdxl))].present
    assert not status[("sdxl", "bgwatch-tests/not-cached")].present
    text = format_models(list(status.values()))
    assert "missing" in text and "bgwatch models pull" in text


def test_rembg_weights_in_the_per_model_folder(u2net_home: Path) -> None:
    target = u2net_home / "models" / "isnet-general-use" / "isnet-general-use.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"onnx")
    assert rembg_weights("isnet-general-use")[0] == target


def test_pull_skips_what_is_present(tmp_path: Path, u2net_home: Path, tiny_sdxl: Path) -> None:
    (u2net_home / "u2net.onnx").write_bytes(b"onnx")
    config = config_with(
        tmp_path, {"operation": "replace", "engine": "sdxl", "prompt": "p", "model": str(tiny_sdxl)}
    )
    assert all(s.present for s in pull_models(config))


def test_pull_of_an_unknown_rembg_model_names_the_known_ones(tmp_path: Path, u2net_home: Path) -> None:
    with pytest.raises(BgwatchError) as err:
        pull_models(Config(device="cpu"), ["no-such-mask-model"])
    assert "no-such-mask-model" in str(err.value) and "u2net" in str(err.value)


def test_pull_of_an_unreachable_hub_model_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BgwatchError) as err:
        pull_models(Config(device="cpu"), ["bgwatch-tests/not-a-repo"])
    assert "bgwatch-tests/not-a-repo" in str(err.value) and "Hugging Face" in str(err.value)


def test_an_inbox_with_the_classical_mask_needs_no_rembg_weights(tmp_path: Path) -> None:
    config = config_with(tmp_path, {"operation": "cleanup", "mask": {"engine": "classical"}})
    assert configured_models(config) == []
    assert "no models needed" in format_models(list_models(config))


def test_models_dir_is_where_the_cli_and_the_daemon_look(tmp_path: Path) -> None:
    """`models_dir` in config.yaml: `models ls` (and pull, and the daemon) use it, whoever runs them."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "models" / "rembg").mkdir(parents=True)
    (tmp_path / "models" / "rembg" / "u2net.onnx").write_bytes(b"\0" * 2048)  # where rembg puts u2net
    (tmp_path / "config.yaml").write_text(
        "state_dir: ./state\nmodels_dir: ./models\ninboxes:\n  - path: ./in\n    outbox: ./out\n"
        "    rules: {operation: cleanup, mask: {engine: rembg, model: u2net}}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("U2NET_HOME", "HF_HOME", "HF_HUB_OFFLINE")}
    proc = subprocess.run([sys.executable, "-m", "bgwatch", "models", "ls", "--json", "-c", "config.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [u2net] = [m for m in json.loads(proc.stdout) if m["name"] == "u2net"]
    assert u2net["present"] and u2net["path"].startswith(str(tmp_path / "models" / "rembg"))
    assert u2net["bytes"] >= 2048


# ---------------------------------------------------------------- int8 variants


def test_quantize_makes_a_variant_and_doctor_can_say_which_precision_runs(tmp_path: Path, u2net_home: Path) -> None:
    import json

    from bgwatch.models import format_quantize, precision_report, quantize_models
    from bgwatch.pipeline.quantize import studio_images
    from tests.conftest import forget_mask_engines
    from tests.tinymodels import build_tiny_onnx

    build_tiny_onnx(u2net_home)
    config = config_with(tmp_path, {"mask": {"engine": "rembg", "model": "tiny.onnx"}})
    vnni = frozenset({"avx512_vnni"})
    assert precision_report(config, vnni) == [
        "mask tiny.onnx: fp32 (no int8 variant that passed its quality gate (`bgwatch models quantize` makes one))"]
    shots = {"calibration": studio_images(range(1000, 1004), (256, 256)),
             "validation": studio_images(range(2000, 2004), (256, 256))}
    statuses = quantize_models(config, **shots)
    assert [(s.name, s.passed) for s in statuses] == [("tiny.onnx", True)]
    assert statuses[0].path == str(u2net_home / "tiny.int8.onnx") and "IoU with fp32" in statuses[0].detail
    assert json.loads((u2net_home / "tiny.int8.json").read_text())["passed"] is True
    assert format_quantize(statuses).startswith("int8   tiny.onnx  ")
    record = json.loads((u2net_home / "tiny.int8.json").read_text())
    record["cpu_ms_an_image"] = {"fp32": 600.0, "int8": 200.0}  # as U2-Net measures (the tiny net: ~1x)
    (u2net_home / "tiny.int8.json").write_text(json.dumps(record))
    report = precision_report(config, vnni)
    assert report[0].startswith("mask tiny.onnx: int8 (this CPU has avx512_vnni")
    assert precision_report(config, frozenset({"avx2"}))[0].startswith("mask tiny.onnx: fp32 (this CPU has none")
    forget_mask_engines()


def test_quantize_says_why_a_model_has_no_variant(tmp_path: Path, u2net_home: Path) -> None:
    from bgwatch.models import quantize_models

    config = config_with(tmp_path)
    missing, rembg_only = quantize_models(config, ["u2net", "u2net_cloth_seg"])
    assert not missing.passed and "bgwatch models pull u2net" in missing.detail
    assert not rembg_only.passed and "runs through rembg" in rembg_only.detail
