"""The sdxl engine through the real diffusers path: a tiny random SDXL pipeline saved to a folder and
loaded back by the same code users run (StableDiffusionXLPipeline.from_pretrained, local_files_only)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from loguru import logger

from bgwatch.config import Config, SdxlSettings
from bgwatch.errors import EngineError
from bgwatch.jobs import JobSpec
from bgwatch.pipeline.backgrounds import BackgroundRequest, load_background_engine
from bgwatch.pipeline.sdxl import SDXL_BUCKETS, SdxlEngine, generation_size, nearest_bucket

CPU = Config(device="cpu")


def request_for(model: Path, width: int = 300, height: int = 200, **kw: object) -> BackgroundRequest:
    spec = JobSpec(
        operation="replace",
        engine="sdxl",
        model=str(model),
        prompt="a marble table in soft light",
        steps=2,
        seed=kw.pop("seed", 1),
    )  # type: ignore[arg-type]
    return replace(BackgroundRequest.from_spec(spec, width, height), **kw)  # type: ignore[arg-type]


@pytest.fixture
def engine() -> SdxlEngine:
    return load_background_engine("sdxl", CPU)  # type: ignore[return-value]


# ---------------------------------------------------------------- buckets (no model)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((1000, 1000), (1024, 1024)),
        ((3000, 2000), (1216, 832)),  # 3:2 landscape
        ((2000, 3000), (832, 1216)),  # 2:3 portrait
        ((1920, 1080), (1344, 768)),  # 16:9
        ((1080, 1920), (768, 1344)),
        ((4000, 1000), (1536, 640)),  # beyond the widest bucket: the widest
        ((1200, 1000), (1152, 896)),
    ],
)
def test_nearest_bucket(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert nearest_bucket(*size) == bucket


def test_buckets_are_about_one_megapixel_in_multiples_of_64() -> None:
    for w, h in SDXL_BUCKETS:
        assert w % 64 == 0 and h % 64 == 0 and 0.9e6 < w * h < 1.1e6


def test_generation_size_scales_buckets_to_the_models_native_size() -> None:
    assert generation_size(3000, 2000) == (1216, 832)
    assert generation_size(3000, 2000, scale=0.5, align=32) == (608, 416)  # a 512-native model (turbo)
    assert generation_size(3000, 2000, scale=1 / 8, align=8) == (152, 104)  # the tiny test model


# ---------------------------------------------------------------- the tiny pipeline


@pytest.mark.parametrize(
    ("size", "generated"), [((300, 200), (152, 104)), ((200, 300), (104, 152)), ((250, 250), (128, 128))]
)
def test_generates_at_the_bucket_and_fits_to_the_input(
    engine: SdxlEngine,
    tiny_sdxl: Path,
    size: tuple[int, int],
    generated: tuple[int, int],
) -> None:
    request = request_for(tiny_sdxl, *size)
    assert engine.generation_size(request) == generated
    out = engine.render(request)
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8 and out.std() > 1


def test_a_seed_reproduces_an_image_and_another_seed_differs(engine: SdxlEngine, tiny_sdxl: Path) -> None:
    first = engine.render(request_for(tiny_sdxl, seed=11))
    again = engine.render(request_for(tiny_sdxl, seed=11))
    other = engine.render(request_for(tiny_sdxl, seed=12))
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other).mean() > 2


def test_the_scheduler_switch(engine: SdxlEngine, tiny_sdxl: Path) -> None:
    own = engine.render(request_for(tiny_sdxl))
    assert engine.scheduler_class(str(tiny_sdxl)) == "EulerDiscreteScheduler"
    dpm = engine.render(request_for(tiny_sdxl, scheduler="dpmpp_2m_karras"))
    assert engine.scheduler_class(str(tiny_sdxl)) == "DPMSolverMultistepScheduler"
    assert engine._load(str(tiny_sdxl)).pipe.scheduler.config.use_karras_sigmas
    assert np.abs(own.astype(int) - dpm).mean() > 0.5
    back = engine.render(request_for(tiny_sdxl))  # "" restores the checkpoint's own scheduler
    assert engine.scheduler_class(str(tiny_sdxl)) == "EulerDiscreteScheduler" and np.array_equal(own, back)
    with pytest.raises(EngineError, match="unknown scheduler"):
        engine.render(request_for(tiny_sdxl, scheduler="heun"))


def test_turbo_style_one_step_without_guidance(engine: SdxlEngine, tiny_sdxl: Path) -> None:
    calls = engine.calls
    out = engine.render(request_for(tiny_sdxl, steps=1, guidance_scale=0.0, scheduler="euler_a"))
    assert out.shape == (200, 300, 3) and engine.calls == calls + 1


def test_memory_switches_apply_and_offload_is_skipped_on_cpu(tiny_sdxl: Path) -> None:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        config = Config(
            device="cpu",
            sdxl=SdxlSettings(attention_slicing=True, vae_slicing=True, vae_tiling=True, cpu_offload=True),
        )
        engine = SdxlEngine(config)
        out = engine.render(request_for(tiny_sdxl))
    finally:
        logger.remove(sink)
    assert out.shape == (200, 300, 3)
    pipe = engine._load(str(tiny_sdxl)).pipe
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert any("cpu_offload" in m and "ignored" in m for m in messages)


def test_out_of_memory_becomes_advice_and_the_engine_carries_on(engine: SdxlEngine, tiny_sdxl: Path) -> None:
    import torch

    unet = engine._load(str(tiny_sdxl)).pipe.unet

    def exhausted(*args: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = unet.register_forward_pre_hook(exhausted)
    try:
        with pytest.raises(EngineError) as err:
            engine.render(request_for(tiny_sdxl))
    finally:
        hook.remove()
    text = str(err.value)
    assert "out of GPU memory" in text and "cpu_offload" in text and "vae_tiling" in text
    assert engine.render(request_for(tiny_sdxl)).shape == (200, 300, 3)


def test_an_uncached_hub_id_is_never_downloaded_at_job_time(engine: SdxlEngine) -> None:
    with pytest.raises(EngineError) as err:
        engine.render(request_for(Path("bgwatch-tests/not-a-real-sdxl")))
    assert "bgwatch models pull" in str(err.value) and "not-a-real-sdxl" in str(err.value)
    assert "allow_downloads is off" in str(err.value)


def test_a_folder_that_is_not_a_pipeline(engine: SdxlEngine, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"model_index\.json"):
        engine.render(request_for(tmp_path))


@pytest.mark.slow
def test_the_gpu_benchmark_builds_and_runs_its_sdxl_architecture_on_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_sdxl.py"
    spec = importlib.util.spec_from_file_location("gpu_sdxl", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    full = bench.sdxl_base_configs()
    assert full["unet"]["block_out_channels"] == [320, 640, 1280]
    assert full["unet"]["projection_class_embeddings_input_dim"] == 6 * 256 + 1280
    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--size", "128", "--repeats", "1", "--no-daemon"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "128x128" in out and "bgwatch start()/result() back to back" in out
