"""Throughput and peak memory of `bgwatch run --once` against `rembg p`, side by side in one run.

Both cut the same generated 1024x1024 product JPEGs with the same tiny ONNX segmentation net (built by
tests/tinymodels.py, loaded by rembg's u2net_custom session in both), both on the CPU, both writing
transparent PNGs. `rembg p` needs `rembg[cli]`, whose watchdog<7 pin cannot share bgwatch's venv, so it
gets its own venv under the work folder (created on first use; registries only).

    python bench/bench_cleanup.py [--count 200] [--size 1024] [--workdir bench/out]

Prints a table; not a timed test. bgwatch's run includes its settle wait (0.2 s here), start-up, the
claim/record/move of every file and its mask refinement and edge clean-up, which rembg p does not do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--window", type=int, default=4, help="pipeline.window_per_worker for bgwatch")
    parser.add_argument("--threads", type=int, default=2, help="pipeline.prepare_threads and finish_threads")
    parser.add_argument("--skip-rembg", action="store_true", help="measure bgwatch only")
    args = parser.parse_args()

    from tinymodels import build_tiny_onnx

    from bgwatch.samples import write_samples

    work = args.workdir.resolve()
    images = work / f"images-{args.count}-{args.size}"
    if not images.exists():
        write_samples(images, args.count, size=(args.size, args.size), seed=0)
    home = work / "u2net"
    model = build_tiny_onnx(home)
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
                     "finish_threads": args.threads},
        "inboxes": [{"path": str(run / "inbox"), "outbox": str(run / "outbox"),
                     "rules": {"operation": "cleanup", "mode": "transparent",
                               "mask": {"engine": "rembg", "model": model.name}}}],
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
        rb_wall, rb_rss, rb_code = measure(
            [str(exe), "p", "-m", "u2net_custom", "-x", json.dumps({"model_path": str(model)}), str(images),
             str(out)], env)
    rb_done = len(list(out.glob("*.png")))

    print(f"\n{args.count} images {args.size}x{args.size}, tiny ONNX mask, CPU, transparent PNG out\n")
    print(f"{'tool':26} {'ok':>5} {'seconds':>9} {'images/s':>9} {'peak RSS MB':>12} {'exit':>5}")
    for name, wall, rss, done, code in (("bgwatch run --once", bg_wall, bg_rss, bg_done, bg_code),
                                        ("rembg p (rembg[cpu,cli])", rb_wall, rb_rss, rb_done, rb_code)):
        print(f"{name:26} {done:>5} {wall:>9.1f} {done / wall:>9.2f} {rss:>12.0f} {code:>5}")
    print(f"\nbgwatch / rembg p: throughput x{(bg_done / bg_wall) / max(rb_done / rb_wall, 1e-9):.2f}, "
          f"peak RSS x{bg_rss / max(rb_rss, 1e-9):.2f}")
    return 0 if bg_code == 0 and rb_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
