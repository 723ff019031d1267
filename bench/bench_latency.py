"""From a completed copy into a watched inbox to the run's row 'queued': how long does a file wait?

Starts a real daemon on default watch settings (inotify, settle_seconds 2), copies `--files` JPEGs into
its inbox one at a time (a local writer: open, write, close), and reads each run's created_at from the
state database; the latency is created_at minus the moment the copy's close returned. With `--against
REV` the same measurement runs first on that git revision of bgwatch (a temporary worktree), so the two
are side by side in one run. Prints a table; not a timed test.

    python bench/bench_latency.py [--files 30] [--against bedf3a8]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(code_root: Path, work: Path, sample: bytes, files: int) -> list[float]:
    """Latencies (seconds) of `files` drops into a daemon running bgwatch from `code_root`."""
    inbox, state = work / "inbox", work / "state"
    inbox.mkdir(parents=True)
    config = work / "config.yaml"
    config.write_text(f"state_dir: {state}\nhost: bench\ndefaults: {{mask: {{engine: classical}}}}\n"
                      f"inboxes:\n  - path: {inbox}\n    outbox: {work / 'outbox'}\n"
                      "    rules: {operation: cleanup}\n")
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    daemon = subprocess.Popen([sys.executable, "-m", "bgwatch", "run", "--no-progress", "-c", str(config)],
                              cwd=code_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while not (state / "status.json").exists():  # published once the daemon is watching
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"the daemon from {code_root} did not start")
            time.sleep(0.05)
        db = sqlite3.connect(state / "bgwatch.db", timeout=10)
        for i in range(files):
            name = f"shot-{i:03d}.jpg"
            with open(inbox / name, "wb") as out:
                out.write(sample)
            closed = time.time()
            row = None
            deadline = time.monotonic() + 30
            while row is None and time.monotonic() < deadline:
                row = db.execute("SELECT created_at FROM runs WHERE rel_path = ?", (name,)).fetchone()
                if row is None:
                    time.sleep(0.002)
            if row is not None:
                latencies.append(row[0] - closed)
            time.sleep(0.3)  # each file meets an idle daemon
        db.close()
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=30)
    parser.add_argument("--against", default="", help="a git revision of bgwatch to measure first, as reference")
    args = parser.parse_args()

    from bgwatch.samples import write_samples

    work = Path(tempfile.mkdtemp(prefix="bgwatch-latency-"))
    [sample_path] = write_samples(work / "staging", 1, size=(640, 480), seed=4)
    sample = sample_path.read_bytes()
    runs: list[tuple[str, list[float]]] = []
    if args.against:
        old = work / "reference-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            runs.append((f"bgwatch {args.against}", measure(old, work / "reference", sample, args.files)))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    runs.append(("bgwatch (this tree)", measure(ROOT, work / "current", sample, args.files)))

    print(f"\n{args.files} JPEGs copied one at a time into an inotify inbox (default settings): close -> 'queued'\n")
    print("| bgwatch | files | p50 ms | p90 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, lat in runs:
        ms = sorted(x * 1000 for x in lat)
        print(f"| {name} | {len(ms)} | {statistics.median(ms):.0f} | {ms[int(0.9 * (len(ms) - 1))]:.0f} "
              f"| {ms[-1]:.0f} |")
    if len(runs) == 2:
        print(f"\np50 ratio (this tree / {args.against}): "
              f"{statistics.median(runs[1][1]) / statistics.median(runs[0][1]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
