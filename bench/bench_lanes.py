"""Do small images wait behind a big one? One big photo dropped, then ten small ones right after.

Starts a real daemon (classical masks, transparent cleanup) and drops `--small` 1 MP photos alone; then a
fresh daemon gets one `--big-mp` photo and the same small photos right after it. Reports how long the
small ones took from their drop to their output in both runs, side by side. Prints a table; not a timed
test.

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


def phase(work: Path, big: Path | None, smalls: list[Path]) -> tuple[float, list[float]]:
    """A fresh daemon; drop `big` (if any) then the small photos; (big's wait, the small ones' waits)."""
    inbox, outbox = work / "inbox", work / "outbox"
    inbox.mkdir(parents=True)
    (work / "config.yaml").write_text(
        f"state_dir: {work / 'state'}\nhost: bench\nwatch: {{settle_seconds: 0.3}}\n"
        "defaults: {mask: {engine: classical}}\n"
        f"inboxes:\n  - path: {inbox}\n    outbox: {outbox}\n    rules: {{operation: cleanup}}\n")
    daemon = subprocess.Popen([sys.executable, "-m", "bgwatch", "run", "-c", str(work / "config.yaml")], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (work / "state" / "status.json").exists():
        time.sleep(0.05)
    dropped: dict[str, float] = {}
    if big is not None:
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
    big_wait = next((finished.get(n, math.nan) - dropped[n] for n in dropped if n.startswith("big-")), math.nan)
    return big_wait, waits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mp", type=float, default=49.0)
    parser.add_argument("--small", type=int, default=10)
    args = parser.parse_args()

    from bgwatch.samples import write_samples

    work = Path(tempfile.mkdtemp(prefix="bgwatch-lanes-"))
    side = int(math.sqrt(args.big_mp * 1e6))
    [big] = write_samples(work / "staging-big", 1, size=(side, side), seed=1)
    alone = write_samples(work / "staging-alone", args.small, size=(1200, 800), seed=2)
    behind = write_samples(work / "staging-behind", args.small, size=(1200, 800), seed=2)
    _, alone_waits = phase(work / "alone", None, alone)
    big_wait, waits = phase(work / "behind", big, behind)
    print(f"\n{args.small} x 1200x800 alone, then the same right after 1 x {side}x{side} ({args.big_mp:g} MP); "
          "cleanup transparent, classical masks\n")
    print("| small photos | small: median | small: slowest | big: drop to output |")
    print("|---|---|---|---|")
    print(f"| alone | {statistics.median(alone_waits):.1f} s | {max(alone_waits):.1f} s | — |")
    print(f"| behind the big one | {statistics.median(waits):.1f} s | {max(waits):.1f} s | {big_wait:.1f} s |")
    print(f"\nmedian small wait, behind / alone: x{statistics.median(waits) / statistics.median(alone_waits):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
