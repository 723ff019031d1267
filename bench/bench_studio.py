"""Hosts claiming from one studio: N worker processes stand in for N workstations.

PostgreSQL (pgclaims: claim_next with FOR UPDATE SKIP LOCKED, then settle): each worker takes the next free
file, settles it, and goes on until none is left. The share-only coordinator beside it (custody's renames on
a local folder, the best case for a share): each worker lists the inbox and renames what it sees into its
claimed/ folder. Printed per N: claims a second (all hosts together), the p50/p95 of one claim's latency,
files claimed twice (must be 0), the tries each claim cost (a share's rename attempts that lost a race count), and
for the share how many folder listings each claim cost (its polling).

A throwaway PostgreSQL cluster is started for the run (tests/pgserver.py), on a Unix socket.

    .venv/bin/python bench/bench_studio.py [--hosts 3 10 30] [--files 3000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pg_worker(url: str, host: str, ready: Any, go: Any, out: Any) -> None:
    from bgwatch.pgclaims import PgClaims
    from bgwatch.pgstore import PgStore

    store = PgStore(url, host=host, max_connections=1)
    claims = PgClaims(store, host, 60)
    taken: list[str] = []
    latencies: list[float] = []
    ready.release()
    go.wait()
    while True:
        start = time.perf_counter()
        batch = claims.claim_next(1)
        latencies.append(time.perf_counter() - start)
        if not batch:
            break
        for row in batch:
            claims.settle(row)
            taken.append(row.rel)
    store.close()
    out.put((host, taken, latencies[:-1], 0))


def _share_worker(inbox: str, host: str, ready: Any, go: Any, out: Any) -> None:
    from bgwatch.delivery import Custody

    custody = Custody(Path(inbox), host, f"e-{host}")
    taken: list[str] = []
    latencies: list[float] = []
    listings = 0
    ready.release()
    go.wait()
    while True:
        listings += 1
        names = sorted(e.name for e in os.scandir(inbox) if e.is_file())
        if not names:
            break
        for name in names:
            start = time.perf_counter()
            claim = custody.claim(name)
            latencies.append(time.perf_counter() - start)
            if claim is not None:
                taken.append(name)
    out.put((host, taken, latencies, listings))


def _run(kind: str, target: Any, where: str, hosts: int, files: list[str]) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(where, f"h{i:02}", ready, go, out)) for i in range(hosts)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    start = time.perf_counter()
    go.set()
    results = [out.get() for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    taken = [rel for _h, rels, _l, _s in results for rel in rels]
    latencies = sorted(x for _h, _r, lat, _s in results for x in lat)
    listings = sum(s for *_rest, s in results)
    return {
        "kind": kind, "hosts": hosts, "claims": len(taken), "per_s": len(taken) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0.0,
        "doubles": len(taken) - len(set(taken)), "missed": len(set(files) - set(taken)),
        "listings_per_claim": listings / max(1, len(taken)),
        "tries_per_claim": (len(latencies) + (hosts if kind == "postgresql" else 0)) / max(1, len(taken)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--files", type=int, default=3000)
    args = parser.parse_args()

    from bgwatch.pgclaims import PgClaims
    from bgwatch.pgstore import PgStore
    from tests.pgserver import start_cluster

    cluster, why = start_cluster()
    if cluster is None:
        print(f"no PostgreSQL: {why}")
        return 1
    rows: list[dict[str, Any]] = []
    files = [f"{i:05}.jpg" for i in range(args.files)]
    work = Path(tempfile.mkdtemp(prefix="bench-studio-"))
    try:
        for hosts in args.hosts:
            url = cluster.new_database()
            store = PgStore(url, host="bench")
            PgClaims(store, "bench", 60).offer("inbox", files)
            store.close()
            rows.append(_run("postgresql", _pg_worker, url, hosts, files))
            inbox = work / f"inbox-{hosts}"
            inbox.mkdir()
            for name in files:
                (inbox / name).write_bytes(b"x")
            rows.append(_run("share", _share_worker, str(inbox), hosts, files))
    finally:
        cluster.stop("immediate")
        shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.files} files, {os.cpu_count()} cores; one claim = take + settle (PostgreSQL), one rename (share)")
    print(f"{'coordinator':<12} {'hosts':>5} {'claims/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'doubles':>7} "
          f"{'missed':>6} {'tries/claim':>11} {'listings/claim':>14}")
    for r in rows:
        print(f"{r['kind']:<12} {r['hosts']:>5} {r['per_s']:>9.0f} {r['p50_ms']:>7.2f} {r['p95_ms']:>7.2f} "
              f"{r['doubles']:>7} {r['missed']:>6} {r['tries_per_claim']:>11.2f} {r['listings_per_claim']:>14.3f}")
    return 0 if all(r["doubles"] == 0 and r["missed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
