"""Do small images wait behind a big one? One big photo dropped, then ten small ones right after.

Starts a real daemon (classical masks, transparent cleanup), drops one `--big-mp` photo and then
`--small` 1 MP photos, and reports how long each took from its drop to its output. Prints a table; not
a timed test.

    python bench/bench_lanes.py [--big-mp 49] [--small 10]
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mp", type=float, default=49.0)
    parser.add_argument("--small", type=int, default=10)
    args = parser.parse_args()

    from bgwatch.samples import write_samples

    work = Path(tempfile.mkdtemp(prefix="bgwatch-lanes-"))
    inbox, outbox = work / "inbox", work / "outbox"
    inbox.mkdir()
    (work / "config.yaml").write_text(
        f"state_dir: {work / 'state'}\nhost: bench\nwatch: {{settle_seconds: 0.3}}\n"
        "defaults: {mask: {engine: classical}}\n"
        f"inboxes:\n  - path: {inbox}\n    outbox: {outbox}\n    rules: {{operation: cleanup}}\n")
    side = int(math.sqrt(args.big_mp * 1e6))
    [big] = write_samples(work / "staging-big", 1, size=(side, side), seed=1)
    smalls = write_samples(work / "staging-small", args.small, size=(1200, 800), seed=2)
    daemon = subprocess.Popen([sys.executable, "-m", "bgwatch", "run", "-c", str(work / "config.yaml")], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    dropped: dict[str, float] = {}
    big.rename(inbox / f"big-{big.name}")
    dropped[f"big-{big.stem}.png"] = time.monotonic()
    time.sleep(0.1)
    for shot in smalls:
        shot.rename(inbox / shot.name)
        dropped[f"{shot.stem}.png"] = time.monotonic()
    finished: dict[str, float] = {}
    deadline = time.monotonic() + 1800
    while len(finished) < len(dropped) and time.monotonic() < deadline:
        for out in outbox.glob("*.png"):
            finished.setdefault(out.name, time.monotonic())
        time.sleep(0.05)
    daemon.terminate()
    daemon.wait(timeout=120)
    waits = [finished[n] - dropped[n] for n in dropped if not n.startswith("big-") and n in finished]
    big_name = next(n for n in dropped if n.startswith("big-"))
    print(f"1 x {side}x{side} ({args.big_mp:g} MP) then {args.small} x 1200x800, cleanup transparent, classical")
    print("| big: drop to output | small: median | small: slowest |")
    print("|---|---|---|")
    print(f"| {finished.get(big_name, math.nan) - dropped[big_name]:.1f} s | {statistics.median(waits):.1f} s "
          f"| {max(waits):.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
