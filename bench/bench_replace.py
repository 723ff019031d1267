"""Per-stage times of `operation: replace` on CPU with the tiny SDXL pipeline, and cache hit vs miss.

    .venv/bin/python bench/bench_replace.py [--count 8] [--size 1024] [--steps 4]

Each image is a generated studio shot (bgwatch.samples). Stages: mask (the classical engine, no weights),
generate (tiny SDXL through the background cache: a miss), hit (the same request again), composite
(match_colors + feather + shadow), encode (PNG). The tiny model's timings say what bgwatch itself costs
around a generation; bench/gpu_sdxl.py measures the real model on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bgwatch.config import Config  # noqa: E402
from bgwatch.jobs import JobSpec, MaskSpec, OutputSpec  # noqa: E402


def encode_png(image: np.ndarray) -> bytes:
    try:
        from bgwatch.pipeline import imageio

        return imageio.encode(image, OutputSpec(format="png"))
    except (ImportError, AttributeError):
        import io

        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG", compress_level=1)
        return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024, help="input side (images alternate 1:1, 3:2, 2:3)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from tinysdxl import build_tiny_sdxl

    from bgwatch.pipeline.backgrounds import BackgroundRequest, load_background_engine
    from bgwatch.pipeline.cache import BackgroundCache
    from bgwatch.pipeline.composite import composite
    from bgwatch.pipeline.masking import load_mask_engine
    from bgwatch.samples import studio_shot
    from bgwatch.store import Store

    work = Path(tempfile.mkdtemp(prefix="bench-replace-"))
    started = time.perf_counter()
    model = build_tiny_sdxl(work / "tiny-sdxl")
    build_s = time.perf_counter() - started
    config = Config(device="cpu", state_dir=work / "state")
    store = Store(config.db_path)
    cache = BackgroundCache(store, config.cache_dir, 10**10)
    sdxl = load_background_engine("sdxl", config)
    mask_engine = load_mask_engine(MaskSpec(engine="classical"), "cpu")
    spec = JobSpec(
        operation="replace",
        engine="sdxl",
        model=str(model),
        prompt="a marble table, soft window light",
        steps=args.steps,
        guidance_scale=5.0,
        seed=0,
        shadow=True,
    )

    shapes = [(args.size, args.size), (args.size * 3 // 2, args.size), (args.size, args.size * 3 // 2)]
    started = time.perf_counter()
    for w, h in shapes:  # load, and the first run of each generation size (torch plans its kernels)
        sdxl.render(BackgroundRequest.from_spec(spec, w, h, config=config))
    load_s = time.perf_counter() - started

    times: dict[str, list[float]] = {
        k: [] for k in ("mask", "generate (miss)", "cache hit", "composite", "encode")
    }
    sizes = []
    for i in range(args.count):
        w, h = shapes[i % len(shapes)]
        shot = studio_shot(100 + i, (w, h))
        job = JobSpec(**{**{f: getattr(spec, f) for f in spec.__slots__}, "seed": 1000 + i})  # type: ignore[arg-type]

        t = time.perf_counter()
        alpha = mask_engine.predict(shot.rgb)
        times["mask"].append(time.perf_counter() - t)

        request = BackgroundRequest.from_spec(job, w, h, config=config)
        t = time.perf_counter()
        backdrop, hit = cache.get_or_render(request, lambda r=request: sdxl.render(r))
        times["generate (miss)"].append(time.perf_counter() - t)
        assert not hit
        t = time.perf_counter()
        again, hit = cache.get_or_render(request, lambda r=request: sdxl.render(r))
        times["cache hit"].append(time.perf_counter() - t)
        assert hit and np.array_equal(again, backdrop)

        t = time.perf_counter()
        result = composite(shot.rgb, alpha, backdrop, job)
        times["composite"].append(time.perf_counter() - t)
        t = time.perf_counter()
        data = encode_png(result)
        times["encode"].append(time.perf_counter() - t)
        sizes.append(len(data))
    store.close()

    print(
        f"replace on CPU ({torch.get_num_threads()} torch threads), tiny SDXL, {args.count} images "
        f"of {args.size}px (1:1, 3:2, 2:3), {args.steps} steps"
    )
    print(f"tiny pipeline: build+save {build_s:.2f} s, load + one warm-up image per aspect {load_s:.2f} s")
    print(f"{'stage':18} {'median ms':>10} {'p90 ms':>8} {'max ms':>8}")
    for name, values in times.items():
        ms = sorted(v * 1000 for v in values)
        p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
        print(f"{name:18} {statistics.median(ms):10.1f} {p90:8.1f} {ms[-1]:8.1f}")
    miss, hit = statistics.median(times["generate (miss)"]), statistics.median(times["cache hit"])
    print(
        f"cache: a hit costs {hit * 1000:.1f} ms against {miss * 1000:.1f} ms for a miss "
        f"({miss / hit:.0f}x); mean PNG {statistics.mean(sizes) / 1e6:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
