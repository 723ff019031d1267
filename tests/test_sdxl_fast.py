"""The sdxl engine's GPU-minded parts, checked on cpu with the tiny pipeline: the split start()/result()
API, the VAE decode dtype policy, fused projections and channels_last, the compile cache folder, warm()
and the loading policy. (A GPU's timings are bench/gpu_sdxl.py's business.)"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bgwatch.config import Config, SdxlSettings
from bgwatch.errors import EngineError
from bgwatch.pipeline.sdxl import SdxlEngine
from bgwatch.pipeline.sdxl_load import (
    COMPILE_CACHE_ENV,
    compile_cache_dir,
    load_kwargs,
    use_compile_cache,
    vae_decode_dtype,
)
from tests.helpers import make_config
from tests.test_sdxl import request_for


def engine_with(tmp_path: Path, **sdxl: object) -> SdxlEngine:
    return SdxlEngine(Config(device="cpu", state_dir=tmp_path / "state", sdxl=SdxlSettings(**sdxl)))  # type: ignore[arg-type]


# ---------------------------------------------------------------- start() / result()


def test_start_then_result_is_render_and_diffusers_own_decode(tmp_path: Path, tiny_sdxl: Path) -> None:
    import torch

    engine = engine_with(tmp_path)
    request = request_for(tiny_sdxl, 128, 128, seed=5)
    pending = engine.start(request)
    assert pending.size == (128, 128)
    image = pending.result()
    assert pending.result() is image, "a second result() returns the same array without waiting again"
    assert np.array_equal(image, engine.render(request))
    # The same generation through diffusers' own decode and postprocess (output_type="np"): our decode and
    # uint8 conversion on the device give exactly the pixels the old path made from its float image.
    pipe = engine._load(str(tiny_sdxl)).pipe
    with torch.inference_mode():
        theirs = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=128,
            height=128,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
        ).images[0]
    assert np.array_equal(image, np.clip(np.rint(theirs * 255.0), 0, 255).astype(np.uint8))
    other = engine.start(replace(request, seed=6)).result()
    assert np.abs(other.astype(int) - image).mean() > 2


def test_results_are_collected_on_another_thread_in_order(tmp_path: Path, tiny_sdxl: Path) -> None:
    """The device worker's pattern: start() job N+1 while another thread waits on job N's result()."""
    engine = engine_with(tmp_path)
    requests = [request_for(tiny_sdxl, 300, 200, seed=s) for s in (1, 2, 3)]
    expected = [engine.render(r) for r in requests]
    pending = [engine.start(r) for r in requests]
    got: list[np.ndarray] = []
    waiter = threading.Thread(target=lambda: got.extend(p.result() for p in pending))
    waiter.start()
    waiter.join(60)
    assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert all(g.shape == (200, 300, 3) for g in got)


def test_nan_pixels_fail_in_result(tmp_path: Path, tiny_sdxl: Path) -> None:
    engine = engine_with(tmp_path)
    vae = engine._load(str(tiny_sdxl)).pipe.vae
    hook = vae.post_quant_conv.register_forward_hook(lambda _m, _i, out: out * float("nan"))
    try:
        pending = engine.start(request_for(tiny_sdxl))
        with pytest.raises(EngineError, match="NaN pixels"):
            pending.result()
    finally:
        hook.remove()
    assert engine.render(request_for(tiny_sdxl)).shape == (200, 300, 3)


# ---------------------------------------------------------------- the VAE's dtype


@pytest.mark.parametrize(
    ("setting", "device", "model", "force_upcast", "bf16", "decode"),
    [
        ("auto", "cuda", "float16", True, True, "bfloat16"),  # SDXL-base's VAE: no fp32 upcast
        ("auto", "cuda", "float16", True, False, "float32"),  # a GPU without bfloat16: the safe upcast
        ("auto", "cuda", "float16", False, True, "float16"),  # an fp16-fixed VAE says force_upcast false
        ("auto", "cuda", "float32", True, True, "float32"),
        ("auto", "cpu", "float32", True, False, "float32"),
        ("float32", "cuda", "float16", False, True, "float32"),  # the operator's choice wins
        ("bfloat16", "cpu", "float32", True, False, "bfloat16"),
    ],
)
def test_vae_decode_dtype_policy(
    setting: str, device: str, model: str, force_upcast: bool, bf16: bool, decode: str
) -> None:
    assert vae_decode_dtype(setting, device, model, force_upcast=force_upcast, bf16_supported=bf16) == decode


def test_the_vae_decodes_in_the_chosen_dtype(tmp_path: Path, tiny_sdxl: Path) -> None:
    import torch

    request = request_for(tiny_sdxl, 128, 128)
    full = engine_with(tmp_path)
    half = engine_with(tmp_path, vae_dtype="bfloat16")
    assert full._load(str(tiny_sdxl)).pipe.vae.dtype == torch.float32
    loaded = half._load(str(tiny_sdxl))
    assert loaded.pipe.vae.dtype == torch.bfloat16 and loaded.pipe.unet.dtype == torch.float32
    assert loaded.applied["vae"] == "bfloat16"
    reference, bf16 = full.render(request), half.render(request)
    assert not np.array_equal(reference, bf16), "decoded in bfloat16, not upcast"
    assert np.abs(reference.astype(int) - bf16).mean() < 3


# ---------------------------------------------------------------- fused projections, layout


def test_fused_projections_and_channels_last_when_enabled(tmp_path: Path, tiny_sdxl: Path) -> None:
    import torch
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    fast = engine_with(tmp_path)._load(str(tiny_sdxl))
    for model in (fast.pipe.unet, fast.pipe.vae):
        assert all(isinstance(p, FusedAttnProcessor2_0) for p in model.attn_processors.values())
    assert fast.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.applied["attention"] == "fused qkv" and fast.applied["layout"] == "channels_last"

    plain = engine_with(tmp_path, fuse_qkv=False, channels_last=False)._load(str(tiny_sdxl))
    assert not any(isinstance(p, FusedAttnProcessor2_0) for p in plain.pipe.unet.attn_processors.values())
    assert not plain.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert "attention" not in plain.applied and "layout" not in plain.applied

    sliced = engine_with(tmp_path, attention_slicing=True)._load(str(tiny_sdxl))
    assert sliced.applied["attention"] == "sliced", "slicing's processors are not replaced by fused ones"


# ---------------------------------------------------------------- compile


def test_the_compile_cache_folder_is_under_the_state_dir_unless_the_operator_chose_one(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path / "state")
    assert compile_cache_dir(config) == tmp_path / "state" / "torch-compile"
    default = "/tmp/torchinductor_bgwatch"
    for environ in ({}, {COMPILE_CACHE_ENV: default}):  # unset, or torch's own default written back
        assert use_compile_cache(compile_cache_dir(config), default, environ) == compile_cache_dir(config)
        assert environ[COMPILE_CACHE_ENV] == str((tmp_path / "state" / "torch-compile").resolve())
    assert (tmp_path / "state" / "torch-compile").is_dir()
    chosen = {COMPILE_CACHE_ENV: "/var/cache/inductor"}
    assert use_compile_cache(tmp_path / "other", default, chosen) == Path("/var/cache/inductor")
    assert chosen[COMPILE_CACHE_ENV] == "/var/cache/inductor" and not (tmp_path / "other").exists()


@pytest.mark.parametrize("mode", ["blocks", "unet"])
def test_compile_wraps_the_unet_and_points_inductor_at_the_cache(
    tmp_path: Path, tiny_sdxl: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Only the set-up: torch.compile is lazy and nothing is generated here, so nothing compiles."""
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    engine = engine_with(tmp_path, compile=mode)
    unet = engine._load(str(tiny_sdxl)).pipe.unet
    assert os.environ[COMPILE_CACHE_ENV] == str((tmp_path / "state" / "torch-compile").resolve())
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks
    if mode == "blocks":
        assert all(b._compiled_call_impl is not None for b in blocks)
        assert unet._compiled_call_impl is None
    else:
        assert unet._compiled_call_impl is not None
    assert engine._load(str(tiny_sdxl)).applied["compile"].startswith(mode)


def test_no_compile_by_default(tmp_path: Path, tiny_sdxl: Path) -> None:
    unet = engine_with(tmp_path)._load(str(tiny_sdxl)).pipe.unet
    assert unet._compiled_call_impl is None
    assert not (tmp_path / "state" / "torch-compile").exists()


# ---------------------------------------------------------------- loading and warm()


def test_weights_load_straight_onto_the_gpu_only_where_nothing_moves_them_later() -> None:
    assert load_kwargs("cuda", cpu_offload=False, accelerate=True) == {"device_map": "cuda"}
    assert load_kwargs("cuda", cpu_offload=True, accelerate=True) == {}
    assert load_kwargs("cuda", cpu_offload=False, accelerate=False) == {}
    assert load_kwargs("cpu", cpu_offload=False, accelerate=True) == {}


def test_warm_loads_the_model_once_and_generates_once(tmp_path: Path, tiny_sdxl: Path) -> None:
    engine = engine_with(tmp_path)
    assert engine.warm(str(tiny_sdxl)) == str(tiny_sdxl)
    assert (engine.loads, engine.calls) == (1, 1)
    assert engine.warm(str(tiny_sdxl), generate=False) == str(tiny_sdxl)
    engine.render(request_for(tiny_sdxl))
    assert (engine.loads, engine.calls) == (1, 2), "the warmed model serves the job: no second load"


def test_warm_picks_the_configured_sdxl_model(tmp_path: Path, tiny_sdxl: Path) -> None:
    rules = {"operation": "replace", "engine": "sdxl", "model": str(tiny_sdxl), "prompt": "oak table"}
    config = make_config(tmp_path, {"clean": {"rules": {"operation": "cleanup"}}, "gen": {"rules": rules}},
                         device="cpu")
    engine = SdxlEngine(config)
    assert engine.default_model() == str(tiny_sdxl)
    assert engine.warm(generate=False) == str(tiny_sdxl) and engine.loads == 1 and engine.calls == 0

    (tmp_path / "c").mkdir()
    cleanup_only = SdxlEngine(make_config(tmp_path / "c", device="cpu"))
    assert cleanup_only.warm() is None and cleanup_only.loads == 0
