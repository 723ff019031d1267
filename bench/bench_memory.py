"""Peak memory of one job, per input pixel, for 6, 25 and 100 MP studio shots.

Each case runs in a fresh child process (the three pipeline stages in a row, as `bgwatch process` runs
them: decode, mask, refine, cleanup, PNG encode) and reports the child's own peak RSS: its high-water mark is
reset after the imports (/proc/self/clear_refs) and read at the end (VmHWM), since ru_maxrss would count the
parent's size at the fork.
"base" is the child's RSS after its imports, before the image is read; "per px" is the whole peak
divided by the pixels, "net/px" the peak above that base. The issue's goal: peak <= 25 bytes a pixel
(100 MP <= 2.5 GB, 25 MP <= 700 MB); the code before the change measured ~86 bytes a pixel (8.6 GB for
10000x9999).

    python bench/bench_memory.py [--sizes 6,25,100] [--modes transparent,color,soften,replace:gradient,replace:image]
                                 [--engine classical|rembg-tiny] [--workdir bench/out/memory] [--stages] [--tight]
                                 [--against REV]

replace:image composites onto a 24 MP backdrop photo (synthesised like the inputs). --stages adds, per case,
the peak RSS above the base in each step (decode, mask, backdrop, refine, composite, encode), sampled every
10 ms by a thread in the child: where a job's peak is.

--tight crops the inputs to the product, so that it fills the frame (the composite's worst case). --against REV
runs each case first on that git revision of bgwatch (its bgwatch/ taken with `git archive` into a temporary
folder; this bench's own child code runs against it), so before and after are side by side in one run, with
the ratio of their peaks; each tree's output image is kept (out_..._REV.png beside out_....png) to compare.

Inputs are synthesised once (a product on a studio backdrop, bgwatch.samples, drawn at ~2 MP and scaled
up, JPEG quality 90) and kept in the work folder. Prints a table; not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {6: (3000, 2000), 25: (6124, 4082), 49: (7000, 7000), 100: (10000, 10000)}


def synthesise(path: Path, width: int, height: int, seed: int = 3, tight: bool = False) -> None:
    """A studio product shot at width x height, written as JPEG (drawn small, scaled up: cheap). `tight`:
    cropped to the product with a 4% margin before scaling, so the subject fills the frame as marketplaces
    ask (the composite's float work covers the subject's box: this is its worst case)."""
    import cv2
    import numpy as np

    from bgwatch.samples import studio_shot

    scale = min(1.0, 1600 / max(width, height))
    small = studio_shot(seed, (max(64, round(width * scale)), max(64, round(height * scale))), "white_sweep")
    rgb = small.rgb
    if tight:
        ys, xs = np.nonzero(small.mask > 0.05)
        my, mx = int(0.04 * rgb.shape[0]), int(0.04 * rgb.shape[1])
        rgb = rgb[max(0, ys.min() - my) : ys.max() + my, max(0, xs.min() - mx) : xs.max() + mx]
    big = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)
    del small
    # Grain at full size, strip by strip, so the upscaled edges look photographed, not drawn.
    rng = np.random.default_rng(seed)
    for y in range(0, height, 512):
        strip = big[y : y + 512].astype(np.int16)
        strip += rng.normal(0, 1.5, (*strip.shape[:2], 1)).astype(np.int16)
        big[y : y + 512] = np.clip(strip, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), big[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])


def child(path: Path, mode: str, engine: str, out: Path) -> None:
    """One job, in this (fresh) process; prints a JSON line with its peak RSS."""
    import cv2  # noqa: F401
    import numpy as np  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401

    from bgwatch.config import Config
    from bgwatch.jobs import Job, JobSpec, MaskSpec
    from bgwatch.pipeline import classical, cleanup, composite, imageio, masking, stages  # noqa: F401

    mask = MaskSpec(engine=engine)
    if engine == "rembg-tiny":  # rembg's real session code with the tests' tiny ONNX net (no download)
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodels import build_tiny_onnx

        home = out.parent / "u2net_home"
        os.environ["U2NET_HOME"] = str(home)
        build_tiny_onnx(home)
        mask = MaskSpec(engine="rembg", model="tiny.onnx")
        masking.load_mask_engine(mask, "cpu")  # the model's own memory belongs to the base, not the job
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on: not the parent's at the fork
        f.write("5")
    base = _rss_now()
    if mode.startswith("replace"):  # replace:ENGINE, e.g. replace:gradient (engines that need no model)
        engine_name = mode.partition(":")[2] or "gradient"
        backdrop = ""
        if engine_name == "image":
            backdrop = str(out.parent / "backdrop_6000x4000.jpg")
            if not Path(backdrop).exists():
                synthesise(Path(backdrop), 6000, 4000, seed=5)
        spec = JobSpec(operation="replace", engine=engine_name, mask=mask, shadow=True, background_image=backdrop)
    else:
        spec = JobSpec(operation="cleanup", mode=mode, mask=mask)
    job = Job(run_id=1, inbox="bench", rel_path=path.name, source=path, spec=spec, input_sha256="", key="")
    config = Config(device="cpu")
    sampler = _StageSampler(base) if os.environ.get("BENCH_STAGES") else None
    start = time.perf_counter()
    finished = stages.run_all(job, config, stages.Engines(config, None))
    seconds = time.perf_counter() - start
    out.write_bytes(finished.data)
    peak = _high_water()
    steps = sampler.stop() if sampler is not None else {}
    print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "bytes": len(finished.data), "steps": steps}))


class _StageSampler:
    """The peak RSS above `base` in each step of one job: the step functions are wrapped (in this bench
    process only) to name the step running, and a thread samples /proc/self/statm every 10 ms."""

    STEPS = (("imageio", "decode"), ("jobmemory", "check_job_memory"), ("masking", "load_mask_engine"),
             ("backgrounds", "load_backdrop"), ("backgrounds", "fit_cover"), ("refine", "refine_mask"),
             ("composite", "composite"), ("cleanup", "cleanup"), ("imageio", "encode"))

    def __init__(self, base: int) -> None:
        import functools
        import importlib
        import threading

        self.base = base
        self.step = "other"
        self.peaks: dict[str, int] = {}
        for module_name, name in self.STEPS:
            module = importlib.import_module(f"bgwatch.pipeline.{module_name}")
            original = getattr(module, name)

            def wrapped(*args: object, _original: object = original, _name: str = name, **kwargs: object) -> object:
                outer, self.step = self.step, _name
                try:
                    return _original(*args, **kwargs)  # type: ignore[operator]
                finally:
                    self._sample()
                    self.step = outer

            setattr(module, name, functools.wraps(original)(wrapped))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rss = _rss_now() - self.base
        self.peaks[self.step] = max(self.peaks.get(self.step, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def _high_water() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(path: Path, mode: str, engine: str, out: Path, stages: bool = False,
             tree: Path = ROOT) -> dict[str, float]:
    """One job in a fresh child that imports bgwatch from `tree`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--modes", mode, "--engine",
           engine, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree), **({"BENCH_STAGES": "1"} if stages else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": 1.0, "reason": tail[0]}  # type: ignore[dict-item]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def reference_tree(revision: str, folder: Path) -> Path:
    """bgwatch/ as it is at `revision`, unpacked under `folder` (git archive: the checkout is not touched)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "bgwatch"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="6,25,100", help="megapixels, from: " + ", ".join(map(str, SIZES)))
    parser.add_argument("--modes", default="transparent",
                        help="comma-separated: transparent, color, soften, or replace:gradient / replace:color")
    parser.add_argument("--engine", default="classical",
                        help="mask engine: classical, rembg-tiny (the tests' tiny ONNX net through rembg)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "memory")
    parser.add_argument("--stages", action="store_true", help="peak above the base in each step of the job")
    parser.add_argument("--tight", action="store_true",
                        help="inputs cropped to the product (it fills the frame): the composite's worst case")
    parser.add_argument("--against", default="", help="a git revision of bgwatch to measure first, side by side")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.modes, args.engine, args.out)
        return 0

    trees = [("this tree", ROOT, "")]
    if args.against:
        import shutil
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="bgwatch-memory-"))
        trees.insert(0, (args.against, reference_tree(args.against, folder), f"_{args.against}"))
        try:
            return table(args, trees)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return table(args, trees)


def table(args: argparse.Namespace, trees: list[tuple[str, Path, str]]) -> int:
    """The table: each size and mode, on each tree in turn."""
    print(f"{'input':>18} {'mode':>16} {'engine':>9} {'bgwatch':>10} {'base MB':>8} {'peak MB':>8} {'per px':>7} "
          f"{'net/px':>7} {'seconds':>8}  (net/px: the peak above the child's base, a pixel)")
    for mp in (int(s) for s in args.sizes.split(",")):
        width, height = SIZES[mp]
        source = args.workdir / f"studio_{width}x{height}{'_tight' if args.tight else ''}.jpg"
        if not source.exists():
            synthesise(source, width, height, tight=args.tight)
        for mode in args.modes.split(","):
            label = f"{width}x{height}"
            pixels = width * height
            nets = []
            for name, tree, suffix in trees:
                out = args.workdir / f"out_{width}x{height}{'_tight' if args.tight else ''}_{mode}{suffix}.png"
                r = run_case(source, mode, args.engine, out, args.stages, tree)
                if "error" in r:
                    print(f"{label:>18} {mode:>16} {args.engine:>9} {name:>10}  FAILED: {r['reason']}")
                    continue
                nets.append(r["peak"] - r["base"])
                print(f"{label:>18} {mode:>16} {args.engine:>9} {name:>10} {r['base'] / 2**20:8.0f} "
                      f"{r['peak'] / 2**20:8.0f} {r['peak'] / pixels:7.1f} {(r['peak'] - r['base']) / pixels:7.1f} "
                      f"{r['seconds']:8.1f}", flush=True)
                if args.stages:
                    steps = r.get("steps") or {}
                    print(" " * 19 + "peak above base, B/px:  " + "  ".join(
                        f"{step} {peak / pixels:.1f}" for step, peak in sorted(steps.items(), key=lambda kv: -kv[1])),
                        flush=True)
            if len(nets) == 2:
                print(f"{'':>18} {'':>16} {'':>9} {'ratio':>10} {'':>8} {'':>8} {'':>7} x{nets[1] / nets[0]:6.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
