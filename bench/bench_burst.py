"""Memory of a running daemon through a burst of big photos, and after it: is memory handed back?

Starts `bgwatch run` (a real daemon, classical masks, transparent cleanup) on a temporary config, drops
`--count` product shots of `--mp` megapixels at once, samples the daemon's RSS every 0.2 s until every
file is done, then for `--after` seconds more. Prints a table; not a timed test.

    python bench/bench_burst.py [--count 6] [--mp 25] [--after 20] [--no-trim]

--no-trim runs the same daemon with its idle malloc_trim switched off (the A/B for that choice).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--mp", type=float, default=25.0)
    parser.add_argument("--after", type=float, default=20.0)
    parser.add_argument("--no-trim", action="store_true", help="switch off the daemon's idle malloc_trim")
    args = parser.parse_args()

    import psutil

    from bgwatch.samples import write_samples

    work = Path(tempfile.mkdtemp(prefix="bgwatch-burst-"))
    inbox, outbox = work / "inbox", work / "outbox"
    inbox.mkdir()
    config = work / "config.yaml"
    config.write_text(f"state_dir: {work / 'state'}\nhost: bench\nwatch: {{settle_seconds: 0.5}}\n"
                      "defaults: {mask: {engine: classical}}\n"
                      f"inboxes:\n  - path: {inbox}\n    outbox: {outbox}\n    rules: {{operation: cleanup}}\n")
    width = int(math.sqrt(args.mp * 1e6 * 3 / 2))
    staging = work / "staging"
    shots = write_samples(staging, args.count, size=(width, width * 2 // 3), seed=1)
    launch = ("import sys; import bgwatch.daemon as d; d.trim_memory = (lambda: None) if sys.argv[1] == 'off' "
              "else d.trim_memory; from bgwatch.cli import main; sys.exit(main(sys.argv[2:]))")
    daemon = subprocess.Popen([sys.executable, "-c", launch, "off" if args.no_trim else "on", "run", "-c", str(config)],
                              cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(daemon.pid)
    time.sleep(3)
    idle_before = proc.memory_info().rss
    for shot in shots:
        shot.rename(inbox / shot.name)
    started = time.monotonic()
    peak = 0
    while len(list(outbox.glob("*.png"))) < args.count and time.monotonic() - started < 1800:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.2)
    burst = time.monotonic() - started
    after: list[int] = []
    end = time.monotonic() + args.after
    while time.monotonic() < end:
        after.append(proc.memory_info().rss)
        time.sleep(0.5)
    daemon.terminate()
    daemon.wait(timeout=60)
    mb = 1024 * 1024
    print(f"{args.count} x {width}x{width * 2 // 3} ({args.mp:g} MP) JPEGs, cleanup transparent, classical masks, "
          f"idle malloc_trim {'off' if args.no_trim else 'on'}")
    print("| idle before | peak in burst | burst s | 5 s after | " + f"{args.after:g} s after |")
    print("|---|---|---|---|---|")
    five = after[min(9, len(after) - 1)]
    print(f"| {idle_before / mb:.0f} MB | {peak / mb:.0f} MB | {burst:.1f} | {five / mb:.0f} MB "
          f"| {after[-1] / mb:.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
