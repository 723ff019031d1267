"""SDXL generation speed on an NVIDIA GPU with no network, in one run: plain diffusers, its best settings,
bgwatch's engine and the bgwatch daemon, on the full-size SDXL-base architecture built from its published
configs with random weights (the same FLOPs and memory as the real model), fp16.

    bench/gpu_setup.sh download                  # here, once: the wheels the GPU machine lacks (~9 MB)
    bench/gpu_setup.sh install && PYTHONPATH=$PWD/bench/.site:$PWD python3 bench/gpu_sdxl.py --compile blocks
    python bench/gpu_sdxl.py --tiny --device cpu  # every section end to end on cpu (toy widths, 256 px, 2 steps)

Sections, each timed as seconds per image (median) with the ratio to plain eager diffusers:
1. build the pipeline on the device and save_pretrained it (the fp16 variant) to a local folder;
2. plain eager diffusers (output_type="np": its fp32 VAE upcast included, as users run it);
3. diffusers' best plain settings: fused QKV projections and channels_last in the UNet and the VAE;
4. bgwatch's SdxlEngine loading that folder: warm() (load + a 1-step warm-up), render(), and
   start()/result() back to back with the results collected on another thread (the daemon's pattern),
   with the GPU's idle time between generations from CUDA events;
5. --compile MODE: the engine with sdxl.compile in two fresh processes, the first compiling into an empty
   cache, the second from the cache (what a restart costs);
6. the daemon: `python -m bgwatch run --once` on --jobs replace jobs (classical masks, drawn seeds so the
   background cache never serves one), with GPU utilisation sampled every 100 ms (nvidia-smi), the time
   from its start to the first busy sample, and the largest GPU idle gap between generations (the
   engine's debug log).
Random weights make noise, not pictures: the timings are what matter. --tiny keeps the structure (three
UNet levels, 8x VAE, two text encoders, text_time conditioning) at toy widths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from datetime import datetime
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



PROMPT = "a marble table in soft window light"
NEGATIVE = "people, text, watermark"


def count_params(module: Any) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_images(pipe: Any, device: str, size: int, steps: int, repeats: int) -> list[float]:
    """Plain diffusers, as its users call it: one image a call, numpy out."""
    import torch

    times = []
    for i in range(repeats):
        generator = torch.Generator(device=device).manual_seed(i)
        started = time.perf_counter()
        pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=7.5,
            width=size,
            height=size,
            generator=generator,
            output_type="np",
        )
        sync(device)
        times.append(time.perf_counter() - started)
    return times


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float | None, str]] = []
        self.eager: float | None = None

    def add(self, name: str, per_image: float | None, note: str = "") -> None:
        self.rows.append((name, per_image, note))
        print(f"  {name}: {'-' if per_image is None else f'{per_image:.3f} s/image'} {note}", flush=True)

    def print(self) -> None:
        print(f"\n{'':44} {'s/image':>8} {'x eager':>8}  notes")
        for name, value, note in self.rows:
            ratio = f"{value / self.eager:8.2f}" if value is not None and self.eager else f"{'':8}"
            shown = f"{value:8.3f}" if value is not None else f"{'-':>8}"
            print(f"{name:44} {shown} {ratio}  {note}")


def request_for(folder: Path, size: int, steps: int, seed: int) -> Any:
    from bgwatch.pipeline.backgrounds import BackgroundRequest

    return BackgroundRequest(
        engine="sdxl", width=size, height=size, model=str(folder), prompt=PROMPT, negative_prompt=NEGATIVE,
        seed=seed, steps=steps, guidance_scale=7.5,
    )


def engine_section(folder: Path, work: Path, args: argparse.Namespace, table: Table) -> None:
    from bgwatch.config import Config
    from bgwatch.pipeline.sdxl import SdxlEngine

    device = "cuda" if args.device.startswith("cuda") else "cpu"
    engine = SdxlEngine(Config(device=device, state_dir=work / "engine-state"))
    started = time.perf_counter()
    engine.warm(str(folder))
    warm_s = time.perf_counter() - started
    applied = engine._load(str(folder)).applied
    table.add("bgwatch warm() (load + 1-step warm-up)", None, f"{warm_s:.1f} s; {', '.join(applied.values())}")
    times = []
    for i in range(args.repeats):
        started = time.perf_counter()
        engine.render(request_for(folder, args.size, args.steps, i))
        times.append(time.perf_counter() - started)
    table.add("bgwatch render()", statistics.median(times), f"min {min(times):.3f}")

    count = args.repeats + 2
    pending: list[Any] = []
    ready = threading.Semaphore(0)
    images: list[Any] = []

    def collect() -> None:  # the daemon's other thread: waits on job N while job N+1 is started
        for _ in range(count):
            ready.acquire()
            images.append(pending[len(images)].result())

    collector = threading.Thread(target=collect)
    started = time.perf_counter()
    collector.start()
    for i in range(count):
        pending.append(engine.start(request_for(folder, args.size, args.steps, 100 + i)))
        ready.release()
    collector.join()
    wall = time.perf_counter() - started
    idle = [p.idle_before for p in pending[1:] if p.idle_before is not None]
    gpu = [p.gpu_seconds for p in pending if p.gpu_seconds is not None]
    note = f"{count} images in {wall:.2f} s"
    if idle:
        note += (f"; GPU idle between generations max {max(idle) * 1000:.1f} ms, "
                 f"median {statistics.median(idle) * 1000:.1f} ms")
    if gpu:
        note += f"; GPU {statistics.median(gpu):.3f} s/image"
    table.add("bgwatch start()/result() back to back", wall / count, note)


def compile_child(args: argparse.Namespace) -> int:
    """One fresh process: the engine with sdxl.compile; prints a JSON line (warm-up and s/image)."""
    from bgwatch.config import Config, SdxlSettings
    from bgwatch.pipeline.sdxl import SdxlEngine

    device = "cuda" if args.device.startswith("cuda") else "cpu"
    engine = SdxlEngine(
        Config(device=device, state_dir=Path(args.state), sdxl=SdxlSettings(compile=args.compile_child))
    )
    started = time.perf_counter()
    engine.warm(args.model)  # compiles the native square with guidance, or loads it from the cache
    warm_s = time.perf_counter() - started
    times = []
    for i in range(args.repeats):
        started = time.perf_counter()
        engine.render(request_for(Path(args.model), args.size, args.steps, i))
        times.append(time.perf_counter() - started)
    print(json.dumps({"warm_s": warm_s, "per_image": statistics.median(times)}), flush=True)
    return 0


def compile_section(folder: Path, work: Path, args: argparse.Namespace, table: Table) -> None:
    state = work / "compile-state"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the engine's own cache folder, under state
    for label, timeout in (("cold cache", args.compile_timeout), ("from the cache", args.compile_timeout)):
        command = [
            sys.executable, str(Path(__file__).resolve()), "--compile-child", args.compile, "--model", str(folder),
            "--state", str(state), "--device", args.device, "--size", str(args.size), "--steps", str(args.steps),
            "--repeats", str(args.repeats),
        ]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            table.add(f"bgwatch compile={args.compile}, {label}", None, f"not done within {timeout} s")
            return
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            table.add(f"bgwatch compile={args.compile}, {label}", None, f"failed: {done.stderr.strip()[-300:]}")
            return
        result = json.loads(lines[-1])
        table.add(
            f"bgwatch compile={args.compile}, {label}",
            result["per_image"],
            f"warm() {result['warm_s']:.1f} s; process {time.perf_counter() - started:.1f} s",
        )


# ---------------------------------------------------------------- the daemon


class GpuSampler:
    """GPU utilisation every 100 ms from nvidia-smi, with its own timestamps (read after it stops)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            with open(self.out, "wb") as sink:
                self.process = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits",
                     "-i", "0", "-lms", "100"],
                    stdout=sink, stderr=subprocess.DEVNULL,
                )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(5)

    def samples(self) -> list[tuple[float, float]]:
        found = []
        if not self.out.exists():
            return found
        for line in self.out.read_text().splitlines():
            stamp, _, busy = line.rpartition(",")
            try:
                when = datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                found.append((when, float(busy)))
            except ValueError:
                continue
        return found


def log_times(log: Path, needle: str) -> list[tuple[float, str]]:
    """(time, message) of the app.log lines holding `needle`."""
    found = []
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if needle in line:
                try:
                    when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
                except ValueError:
                    continue
                found.append((when, line.rsplit(" | ", 1)[-1]))
    return found


def daemon_section(folder: Path, work: Path, args: argparse.Namespace, table: Table) -> None:
    import yaml

    from bgwatch.samples import write_samples

    root = work / "daemon"
    inbox = root / "inbox" / "replace"
    inbox.mkdir(parents=True)
    write_samples(inbox, args.jobs, size=(args.size, args.size), seed=3)
    config = {
        "state_dir": str(root / "state"),
        "device": "cuda" if args.device.startswith("cuda") else "cpu",
        "debug": True,  # the engine's per-generation line (GPU time, idle before it) is a DEBUG line
        "limits": {"generations_per_minute": 100000},
        "watch": {"settle_seconds": 0.2},
        "defaults": {"mask": {"engine": "classical"}},
        "inboxes": [{
            "path": str(inbox),
            "outbox": str(root / "outbox" / "replace"),
            "rules": {"operation": "replace", "engine": "sdxl", "model": str(folder), "prompt": PROMPT,
                      "steps": args.steps, "guidance_scale": 7.5, "seed": None, "output": {"format": "jpg"}},
        }],
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "bgwatch", "run", "--once", "--no-progress", "-c", str(root / "config.yaml")]
    with GpuSampler(root / "gpu.csv") as sampler:
        started = time.time()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.daemon_timeout)
        ended = time.time()
    wall = ended - started
    outputs = list((root / "outbox" / "replace").rglob("*.jpg"))
    if done.returncode != 0 or len(outputs) != args.jobs:
        print(done.stderr[-3000:], file=sys.stderr)
        table.add("bgwatch daemon run --once", None, f"exit {done.returncode}, {len(outputs)}/{args.jobs} outputs")
        return
    log = root / "state" / "logs" / "app.log"
    generations = log_times(log, "from start()")
    loaded = log_times(log, "sdxl: loaded")
    notes = [f"{args.jobs} jobs in {wall:.1f} s"]
    per_image = None
    if len(generations) >= 2:
        first, last = generations[0][0], generations[-1][0]
        per_image = (last - first) / (len(generations) - 1)
        notes.append(f"start to 1st image done {first - started:.1f} s")
    if loaded:
        notes.append(f"start to model loaded {loaded[0][0] - started:.1f} s")
    idle = []
    for _, message in generations[1:]:
        if "idle before it" in message:
            idle.append(float(message.rsplit("idle before it ", 1)[1].split()[0]))
    if idle:
        notes.append(f"GPU idle between generations max {max(idle):.0f} ms, median {statistics.median(idle):.0f} ms")
    samples = [(t, u) for t, u in sampler.samples() if started <= t <= ended]
    busy = [t for t, u in samples if u > 0]
    if busy:
        span = [u for t, u in samples if busy[0] <= t <= busy[-1]]
        notes.append(f"start to first GPU busy {busy[0] - started:.1f} s")
        notes.append(f"GPU busy {sum(1 for u in span if u > 0) / len(span):.0%} of samples after that "
                     f"(mean util {statistics.mean(span):.0f}%)")
    elif args.device.startswith("cuda"):
        notes.append("no GPU samples (nvidia-smi missing?)")
    table.add("bgwatch daemon run --once (steady s/image)", per_image, "; ".join(notes))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, help="image side (default 1024; --tiny 256)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30; --tiny 2)")
    parser.add_argument("--repeats", type=int, default=4, help="images timed per section")
    parser.add_argument("--jobs", type=int, help="replace jobs through the daemon (default 12; --tiny 4)")
    parser.add_argument("--tiny", action="store_true", help="toy widths (checks every section on cpu)")
    parser.add_argument("--fp32", action="store_true", help="float32 instead of fp16")
    parser.add_argument("--compile", default="none", choices=("none", "blocks", "unet"),
                        help="also time the engine with sdxl.compile (cold, then from the cache)")
    parser.add_argument("--compile-timeout", type=int, default=200, help="seconds for each compile process")
    parser.add_argument("--daemon-timeout", type=int, default=240)
    parser.add_argument("--no-daemon", action="store_true", help="skip the daemon section")
    parser.add_argument("--work", type=Path, help="keep the model and the daemon's files here")
    parser.add_argument("--write-configs", type=Path, help="write the component configs as JSON here")
    parser.add_argument("--compile-child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or (256 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 30)
    args.jobs = args.jobs or (4 if args.tiny else 12)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # random fp16 weights may overflow to NaN
    if args.compile_child:
        return compile_child(args)

    import diffusers
    import torch

    configs = sdxl_base_configs(tiny=args.tiny)
    # The engine generates at the model's native size (its nearest bucket): make that --size (1024: SDXL's own).
    configs["unet"]["sample_size"] = args.size // 8
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
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {gpu}, {str(dtype)[6:]}, "
        f"{args.size}x{args.size}, {args.steps} steps, guidance 7.5{', TINY configs' if args.tiny else ''}",
        flush=True,
    )
    run_started = time.perf_counter()
    table = Table()
    with tempfile.TemporaryDirectory(prefix="gpu-sdxl-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        pipe = build_pipeline(configs, args.device, dtype, work)
        sync(args.device)
        built = time.perf_counter() - started
        folder = work / "sdxl-random"
        started = time.perf_counter()
        pipe.save_pretrained(str(folder), variant="fp16" if dtype == torch.float16 else None)
        print(
            f"built in {built:.1f} s (unet {count_params(pipe.unet):.2f} B params, text encoders "
            f"{count_params(pipe.text_encoder) + count_params(pipe.text_encoder_2):.2f} B, vae "
            f"{count_params(pipe.vae):.3f} B), saved in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        time_images(pipe, args.device, args.size, 1, 1)  # warm-up: kernels, allocator
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = time_images(pipe, args.device, args.size, args.steps, args.repeats)
        table.eager = statistics.median(times)
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if args.device.startswith("cuda") else ""
        table.add("diffusers eager", table.eager, f"min {min(times):.3f}{peak}")

        pipe.unet.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        time_images(pipe, args.device, args.size, 1, 1)
        times = time_images(pipe, args.device, args.size, args.steps, args.repeats)
        table.add("diffusers fused QKV + channels_last", statistics.median(times), f"min {min(times):.3f}")
        del pipe
        import gc

        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

        engine_section(folder, work, args, table)
        if not args.no_daemon:
            daemon_section(folder, work, args, table)
        if args.compile != "none":
            compile_section(folder, work, args, table)
    table.print()
    print(f"\nwhole run {time.perf_counter() - run_started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
