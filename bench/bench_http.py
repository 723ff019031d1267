"""Cleanup over the HTTP API against the same images through a folder, on the CPU with the tiny ONNX model.

One daemon (`bgwatch run`, its own process) with one inbox and `http.listen` on loopback. First the images are dropped
into the inbox at once; then the same images are posted to POST /background/cleanup by 1, 4 and 8
concurrent clients (each waiting for its result, as the original service's clients do).

    python bench/bench_http.py [--count 40] [--size 1024] [--clients 1,4,8] [--workdir bench/out/http]

Prints a table; not a timed test. Latency: folder = from the drop to the run's recorded end (the settle
wait, 0.2 s here, included; all files queued at once); HTTP = the request's round trip (upload, checks,
queue, processing, the answer), with at most `clients` requests in flight.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--clients", default="1,4,8", help="concurrent HTTP clients, comma-separated")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "http")
    args = parser.parse_args()

    import os
    import socket
    import subprocess

    import httpx
    import yaml
    from tinymodels import build_tiny_onnx

    from bgwatch.samples import write_samples

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    home = work / "u2net"
    home.mkdir(parents=True)
    build_tiny_onnx(home)
    images = write_samples(work / "images", args.count, size=(args.size, args.size), seed=1)
    clients = [int(c) for c in args.clients.split(",") if c]
    with socket.socket() as probe:  # a free port for the daemon (a separate process: clients cost it no GIL)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (work / "inbox").mkdir()
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump({
        "state_dir": str(work / "state"), "host": "bench", "device": "cpu",
        "watch": {"settle_seconds": 0.2, "rescan_seconds": 5},
        "defaults": {"mask": {"engine": "rembg", "model": "tiny.onnx"}},
        "http": {"listen": f"127.0.0.1:{port}", "window": max(clients) * 2},
        "inboxes": [{"path": str(work / "inbox"), "outbox": str(work / "outbox"),
                     "rules": {"operation": "cleanup", "mode": "transparent"}}],
    }))
    env = {**os.environ, "U2NET_HOME": str(home)}
    daemon = subprocess.Popen([sys.executable, "-m", "bgwatch", "-c", str(config_file), "run"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise SystemExit("the daemon did not start")
        time.sleep(0.1)
    db_path = work / "state" / "bgwatch.db"
    rows: list[tuple[str, float, float, float, float]] = []
    try:
        with httpx.Client(base_url=url, timeout=300) as warm:  # load the model once, outside the timings
            warm.post("/background/cleanup", files={"file": ("warm.jpg", images[0].read_bytes())})

        dropped: dict[str, float] = {}
        start = time.time()
        for image in images:
            shutil.copy(image, work / "inbox" / image.name)
            dropped[image.name] = time.time()
        db = sqlite3.connect(db_path)
        while True:
            done = db.execute("SELECT rel_path, finished_at FROM runs WHERE inbox != 'http' AND status = 'done'"
                              ).fetchall()
            if len(done) >= len(images):
                break
            time.sleep(0.05)
        db.close()
        latencies = [finished - dropped[name] for name, finished in done]
        wall = max(finished for _, finished in done) - start
        rows.append(("folder (all dropped at once)", len(images) / wall, wall,
                     percentile(latencies, 0.5), percentile(latencies, 0.95)))

        payloads = [(image.name, image.read_bytes()) for image in images]
        for concurrency in clients:
            with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
                def one(item: tuple[str, bytes], client: httpx.Client = client) -> float:
                    begun = time.perf_counter()
                    answer = client.post("/background/cleanup", files={"file": item})
                    answer.raise_for_status()
                    return time.perf_counter() - begun

                begun = time.perf_counter()
                with ThreadPoolExecutor(max_workers=concurrency) as pool:
                    latencies = list(pool.map(one, payloads))
                wall = time.perf_counter() - begun
            rows.append((f"HTTP, {concurrency} client(s)", len(images) / wall, wall,
                         percentile(latencies, 0.5), percentile(latencies, 0.95)))
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)

    print(f"\n{args.count} images {args.size}x{args.size}, cleanup transparent, tiny ONNX mask, CPU "
          f"({os.cpu_count()} cores), pipeline threads 2+1+2\n")
    print(f"| {'door':30} | {'images/s':>8} | {'wall s':>7} | {'p50 s':>6} | {'p95 s':>6} |")
    print("|---|---:|---:|---:|---:|")
    for name, rate, wall, p50, p95 in rows:
        print(f"| {name:30} | {rate:8.2f} | {wall:7.1f} | {p50:6.2f} | {p95:6.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
