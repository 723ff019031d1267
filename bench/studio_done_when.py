"""Issue 16's rate "done when", measured: with `generations_per_minute: 6` at most 10 generations finish in the
first 90 s across all hosts of a studio.

Three real `bgwatch run` processes (tests/studiohosts.py) watch one plain shared folder, each with its own
config and state folder; a fake Runway on loopback (tests/runway_server.py) answers at once, so the limit is
the only brake. 30 files asking a generated backdrop each (no seed: no two alike, nothing cached) are dropped
at t=0; after the window the runs are read from the store(s) and counted by their finish time. Run side by
side: the studio (one PostgreSQL, one bucket for every host) and the same three hosts each on its own SQLite
(each its own bucket: three times the rate). A throwaway PostgreSQL is started for the run (tests/pgserver.py).

    .venv/bin/python bench/studio_done_when.py [--stores postgresql sqlite] [--files 30] [--seconds 90]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _runs(store: str, hosts: list[Any]) -> list[dict[str, Any]]:
    """Every host's runs: from the studio store, or from each host's own SQLite."""
    if store.startswith("postgresql"):
        from bgwatch.pgstore import PgStore

        studio = PgStore(store)
        try:
            return studio.history(limit=100_000)
        finally:
            studio.close()
    rows: list[dict[str, Any]] = []
    for host in hosts:
        conn = sqlite3.connect(str(host.root / "state" / "bgwatch.db"))
        conn.row_factory = sqlite3.Row
        rows += [dict(r) for r in conn.execute("SELECT * FROM runs")]
        conn.close()
    return rows


def measure(kind: str, store: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from runway_server import FakeRunway
    from share import image_bytes
    from studiohosts import StudioHost, drop, start_all, stop_all

    posted: list[float] = []

    class TimedRunway(FakeRunway):  # when each generation was asked for
        def _create(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
            posted.append(time.time())
            return super()._create(body, headers)

    share = work / kind / "share"
    (share / "inbox").mkdir(parents=True)
    rules = {"operation": "replace", "engine": "runway", "prompt": "sunlit beach"}  # no seed: every one generated
    with TimedRunway(statuses=["SUCCEEDED"]) as server:
        extra = {"limits": {"generations_per_minute": args.rate},
                 "runway": {"base_url": server.url, "api_key": "k-bench", "poll_interval": 0.05}}
        hosts = [StudioHost(work / kind / f"h{i}", f"h{i}", share, store=store, rules=rules, extra=extra)
                 for i in range(1, args.hosts + 1)]
        try:
            start_all(hosts)
            t0 = time.time()
            for i in range(args.files):
                drop(share / "inbox", f"shot-{i:03}.png", image_bytes(1000 + i, size=96))
            time.sleep(max(0.0, t0 + args.seconds + 1 - time.time()))  # the window is the measurement
            alive = sum(h.alive for h in hosts)
            rows = _runs(store, hosts)
        finally:
            codes = stop_all(hosts)
    done = [r for r in rows if r["status"] == "done" and r.get("finished_at") and r["bg_engine"].startswith("runway")]
    within = [r for r in done if float(r["finished_at"]) - t0 <= args.seconds]
    finish = sorted(float(r["finished_at"]) - t0 for r in within)
    per_host = Counter(r["host"] for r in within)
    return {
        "store": kind, "hosts": args.hosts, "within": len(within),
        "posts": sum(1 for p in posted if p - t0 <= args.seconds),
        "per_host": " ".join(f"{h.name}:{per_host.get(h.name, 0)}" for h in hosts),
        "first": finish[0] if finish else float("nan"), "last": finish[-1] if finish else float("nan"),
        "alive": alive, "clean_stops": sum(code == 0 for code in codes.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", nargs="+", choices=["postgresql", "sqlite"], default=["postgresql", "sqlite"])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--files", type=int, default=30)
    parser.add_argument("--rate", type=float, default=6.0, help="limits.generations_per_minute (default 6)")
    parser.add_argument("--seconds", type=float, default=90.0, help="the window counted (default 90)")
    args = parser.parse_args()

    from tests.pgserver import start_cluster

    cluster = None
    if "postgresql" in args.stores:
        cluster, why = start_cluster()
        if cluster is None:
            print(f"no PostgreSQL: {why}")
            return 1
    work = Path(tempfile.mkdtemp(prefix="bench-studio-rate-"))
    results: list[dict[str, Any]] = []
    try:
        for kind in args.stores:
            store = cluster.new_database() if kind == "postgresql" and cluster is not None else "sqlite"
            results.append(measure(kind, store, work, args))
    finally:
        if cluster is not None:
            cluster.stop("immediate")
            shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    # One token to start with (burst 1), then one every 60/rate s: the studio's bound for the window.
    bound = 1 + int(args.seconds * args.rate / 60)
    print(f"{args.hosts} hosts, {args.files} generative files dropped at t=0, generations_per_minute: {args.rate:g}; "
          f"counted: runs done by t={args.seconds:g} s (the studio's bound: {bound})")
    print(f"{'store':<11} {'hosts':>5} {'done<=' + format(args.seconds, 'g') + 's':>10} {'POSTs':>6} "
          f"{'first s':>8} {'last s':>7} {'per host':<20} {'alive':>5} {'clean stop':>10}")
    for r in results:
        print(f"{r['store']:<11} {r['hosts']:>5} {r['within']:>10} {r['posts']:>6} {r['first']:>8.1f} "
              f"{r['last']:>7.1f} {r['per_host']:<20} {r['alive']:>5} {r['clean_stops']:>10}")
    studio = [r for r in results if r["store"] == "postgresql"]
    return 0 if all(r["within"] <= bound and r["alive"] == args.hosts for r in studio) else 1


if __name__ == "__main__":
    sys.exit(main())
