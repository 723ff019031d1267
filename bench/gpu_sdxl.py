"""SDXL generation speed on an NVIDIA GPU with no network: the full-size SDXL-base architecture built from
its published configs with random weights (the same FLOPs and memory as the real model), fp16.

    python bench/gpu_sdxl.py                          # 1024x1024, 30 and 4 steps, 3 images each
    python bench/gpu_sdxl.py --via-engine             # also save_pretrained + load through bgwatch's engine
    python bench/gpu_sdxl.py --tiny --device cpu --steps 1 --size 256   # check the construction path on CPU

Prints seconds per image and peak GPU memory for each step count. Random weights make noise, not
pictures (fp16 may even overflow to NaN): the timings are what matter, and they equal the real model's
because the architecture, the resolution and the number of steps are the same. --tiny keeps the
structure (three UNet levels, 8x VAE, two text encoders, text_time conditioning) at toy widths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

VOCAB_SIZE = 49408  # CLIP's; the hand-written byte-level tokenizer uses ids below 514 of it
BOS_ID, EOS_ID = 512, 513  # the offline tokenizer's <|startoftext|> and <|endoftext|>


def sdxl_base_configs(tiny: bool = False) -> dict[str, dict[str, Any]]:
    """stabilityai/stable-diffusion-xl-base-1.0's component configs (tiny: same structure, toy widths)."""
    te1 = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    )  # CLIP ViT-L/14 text tower
    te2 = dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=20,
        num_hidden_layers=32,
        projection_dim=1280,
        hidden_act="gelu",
    )  # OpenCLIP ViT-bigG/14 text tower
    unet: dict[str, Any] = dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=[5, 10, 20],  # diffusers' name for the number of heads (64 channels each)
        transformer_layers_per_block=[1, 2, 10],
        cross_attention_dim=2048,  # 768 + 1280: both encoders' hidden states, concatenated
        use_linear_projection=True,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled text
    )
    vae: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
        act_fn="silu",
    )
    if tiny:
        te1.update(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
        )
        te2.update(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
        )
        unet.update(
            block_out_channels=[32, 64, 128],
            attention_head_dim=[1, 2, 4],
            transformer_layers_per_block=[1, 1, 2],
            cross_attention_dim=64,
            norm_num_groups=8,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
        vae.update(block_out_channels=[32, 32, 64, 64], norm_num_groups=8)
    common = dict(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        layer_norm_eps=1e-5,
    )
    scheduler = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": {**common, **te1},
        "text_encoder_2": {**common, **te2},
        "scheduler": scheduler,
    }


def build_pipeline(configs: dict[str, dict[str, Any]], device: str, dtype: Any, work: Path) -> Any:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from tinysdxl import write_tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tiny_tokenizer(work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(work / "tokenizer"))
    torch.manual_seed(0)
    # Parameters are created on the target device (a full-size UNet initialised on CPU takes minutes).
    with torch.device(device):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**configs["scheduler"]),
    )
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_params(module: Any) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def time_images(pipe: Any, device: str, size: int, steps: int, repeats: int) -> tuple[list[float], float]:
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats):
        generator = torch.Generator(device=device).manual_seed(i)
        started = time.perf_counter()
        pipe(
            prompt="a marble table in soft window light",
            negative_prompt="people, text, watermark",
            num_inference_steps=steps,
            guidance_scale=7.5 if steps > 8 else 0.0,
            width=size,
            height=size,
            generator=generator,
            output_type="np",
        )
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return times, peak


def via_engine(pipe: Any, work: Path, device: str, size: int, steps: int) -> float:
    """save_pretrained (fp16 variant) and generate once through bgwatch's own sdxl engine."""
    from bgwatch.config import Config
    from bgwatch.jobs import JobSpec
    from bgwatch.pipeline.backgrounds import BackgroundRequest
    from bgwatch.pipeline.sdxl import SdxlEngine

    folder = work / "sdxl-random"
    pipe.save_pretrained(str(folder), variant="fp16" if device.startswith("cuda") else None)
    engine = SdxlEngine(Config(device="cuda" if device.startswith("cuda") else "cpu"))
    spec = JobSpec(
        operation="replace", engine="sdxl", model=str(folder), prompt="a studio", steps=steps, seed=1
    )
    request = BackgroundRequest.from_spec(spec, size, size)
    engine.render(request)  # load + warm-up
    started = time.perf_counter()
    out = engine.render(request)
    took = time.perf_counter() - started
    assert out.shape == (size, size, 3)
    print(f"through bgwatch's SdxlEngine ({engine.generation_size(request)} generated): {took:.2f} s/image")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", default="30,4", help="comma-separated step counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="toy widths (checks the construction path)")
    parser.add_argument("--fp32", action="store_true", help="float32 instead of fp16")
    parser.add_argument("--via-engine", action="store_true", help="also time bgwatch's SdxlEngine")
    parser.add_argument("--write-configs", type=Path, help="write the component configs as JSON here")
    args = parser.parse_args(argv)

    import diffusers
    import torch

    configs = sdxl_base_configs(tiny=args.tiny)
    if args.write_configs:
        args.write_configs.mkdir(parents=True, exist_ok=True)
        for name, cfg in configs.items():
            (args.write_configs / f"{name}.json").write_text(json.dumps(cfg, indent=2))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --device cpu --tiny to check the script", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.fp32 or args.device == "cpu" else torch.float16
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {gpu}, {str(dtype)[6:]}"
        f"{', TINY configs' if args.tiny else ''}"
    )
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # random fp16 weights may overflow to NaN
    with tempfile.TemporaryDirectory(prefix="gpu-sdxl-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        pipe = build_pipeline(configs, args.device, dtype, work)
        print(
            f"built in {time.perf_counter() - started:.1f} s: unet {count_params(pipe.unet):.2f} B params, "
            f"text encoders {count_params(pipe.text_encoder) + count_params(pipe.text_encoder_2):.2f} B, "
            f"vae {count_params(pipe.vae):.3f} B"
        )
        time_images(pipe, args.device, args.size, 1, 1)  # warm-up: kernels, allocator
        print(f"{'steps':>5}  {'size':>9}  {'s/image (median)':>16}  {'min':>6}  {'peak GPU GiB':>12}")
        for steps in (int(s) for s in args.steps.split(",")):
            times, peak = time_images(pipe, args.device, args.size, steps, args.repeats)
            print(
                f"{steps:5d}  {args.size}x{args.size:<4}  {statistics.median(times):16.2f}  "
                f"{min(times):6.2f}  {peak:12.1f}"
            )
        if args.via_engine:
            via_engine(pipe, work, args.device, args.size, int(args.steps.split(",")[-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
