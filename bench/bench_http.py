"""The HTTP API on the CPU with the tiny ONNX model: throughput beside the folders, a burst of concurrent
clients, and a flood of idle connections and slow uploads.

One daemon (`bgwatch run`, its own process) with one inbox and `http.listen` on loopback.

    python bench/bench_http.py [--count 40] [--size 1024] [--clients 1,4,8] [--workdir bench/out/http]
    python bench/bench_http.py --burst 20,200 [--size 256]      # concurrent cleanups, default window/queue
    python bench/bench_http.py --flood 2000 --slow 20            # idle connections and slow uploads

Throughput (the default): first the images are dropped into the inbox at once; then the same images are
posted to POST /background/cleanup by 1, 4 and 8 concurrent clients (each waiting for its result, as the
original service's clients do). Latency: folder = from the drop to the run's recorded end (the settle
wait, 0.2 s here, included; all files queued at once); HTTP = the request's round trip (upload, checks,
queue, processing, the answer), with at most `clients` requests in flight.

Burst: N clients post at once (http.window 8 and http.queue 64, the defaults); each answer is 200 with an
image or 503 with a Retry-After; none is lost (the runs table holds exactly the 200s); the daemon's RSS
before, at its peak and after.

Flood: N idle TCP connections (never a byte) and M uploads that send their headers and a few bytes, then
stall; meanwhile /health and a normal upload are timed. The daemon must stay up with its connections
capped (http.max_connections) and its memory flat.

Prints tables; not a timed test.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
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


def start_daemon(work: Path, home: Path, http: dict[str, object]) -> tuple[subprocess.Popen[bytes], str]:
    """`bgwatch run` in its own process (clients cost it no GIL); returns (Popen, base URL) once healthy."""
    import os
    import socket

    import httpx
    import yaml

    with socket.socket() as probe:  # a free port for the daemon
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (work / "inbox").mkdir(exist_ok=True)
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump({
        "state_dir": str(work / "state"), "host": "bench", "device": "cpu",
        "watch": {"settle_seconds": 0.2, "rescan_seconds": 5},
        "defaults": {"mask": {"engine": "rembg", "model": "tiny.onnx"}},
        "http": {"listen": f"127.0.0.1:{port}", **http},
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
    with httpx.Client(base_url=url, timeout=300) as warm:  # load the model once, outside the timings
        from bgwatch.samples import write_samples

        [image] = write_samples(work / "warm", 1, size=(256, 256), seed=99)
        warm.post("/background/cleanup", files={"file": ("warm.jpg", image.read_bytes())}).raise_for_status()
    return daemon, url


class RssSampler:
    """The daemon's resident memory, sampled every 50 ms in a thread: baseline, peak, last."""

    def __init__(self, pid: int) -> None:
        import threading

        import psutil

        self.process = psutil.Process(pid)
        self.baseline = self.peak = self.last = self.process.memory_info().rss
        self.fds = self.process.num_fds()
        self.peak_fds = self.fds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.last = self.process.memory_info().rss
                self.fds = self.process.num_fds()
            except Exception:  # the process ended: the caller sees it
                return
            self.peak = max(self.peak, self.last)
            self.peak_fds = max(self.peak_fds, self.fds)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def mb(n: int) -> str:
    return f"{n / 2**20:.0f}"


def burst(work: Path, home: Path, sizes: list[int], size: int) -> None:
    """N concurrent cleanups against the default window (8) and queue (64)."""
    import httpx

    from bgwatch.samples import write_samples

    [image] = write_samples(work / "burst-images", 1, size=(size, size), seed=7)
    payload = image.read_bytes()
    daemon, url = start_daemon(work, home, {})
    table = []
    try:
        for n in sizes:
            sampler = RssSampler(daemon.pid)
            before = sqlite_count(work)

            def one(i: int) -> tuple[int, bool, float]:
                with httpx.Client(base_url=url, timeout=600) as client:
                    begun = time.perf_counter()
                    answer = client.post("/background/cleanup", files={"file": (f"b{i}.jpg", payload)})
                    took = time.perf_counter() - begun
                    if answer.status_code == 200:
                        got = client.get(answer.json()["download_url"])
                        return 200, got.content.startswith(b"\x89PNG"), took
                    return answer.status_code, "retry-after" in answer.headers, took

            begun = time.perf_counter()
            with ThreadPoolExecutor(max_workers=n) as pool:
                answers = list(pool.map(one, range(n)))
            wall = time.perf_counter() - begun
            time.sleep(1.0)
            sampler.stop()
            ok = [a for a in answers if a[0] == 200]
            busy = [a for a in answers if a[0] == 503]
            other = [a for a in answers if a[0] not in (200, 503)]
            recorded = sqlite_count(work) - before
            table.append((n, len(ok), sum(a[1] for a in ok), len(busy), sum(a[1] for a in busy), len(other),
                          recorded, wall, mb(sampler.baseline), mb(sampler.peak), mb(sampler.last)))
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)
    print(f"\nburst: concurrent cleanups of one {size}x{size} image, http.window 8, http.queue 64, tiny ONNX, CPU\n")
    print("| clients | 200 | with image | 503 | with Retry-After | other | runs recorded | wall s "
          "| RSS before MB | RSS peak MB | RSS after MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in table:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |")


def sqlite_count(work: Path) -> int:
    db = sqlite3.connect(work / "state" / "bgwatch.db")
    try:
        return int(db.execute("SELECT count(*) FROM runs WHERE inbox = 'http'").fetchone()[0])
    finally:
        db.close()


def flood(work: Path, home: Path, idle_count: int, slow_count: int, size: int) -> None:
    """Idle connections and slow uploads, then /health and a normal upload, timed."""
    import socket

    import httpx

    from bgwatch.samples import write_samples
    from bgwatch.service import raise_open_file_limit

    raise_open_file_limit()  # this client holds idle_count sockets
    [image] = write_samples(work / "flood-images", 1, size=(size, size), seed=8)
    payload = image.read_bytes()
    daemon, url = start_daemon(work, home, {})
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    sockets: list[socket.socket] = []
    rows = []
    try:
        sampler = RssSampler(daemon.pid)
        begun = time.perf_counter()
        refused = 0
        for _ in range(idle_count):
            try:
                sockets.append(socket.create_connection((host, port), timeout=5))
            except OSError:
                refused += 1
        body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.jpg\"\r\n\r\n" + payload
                + b"\r\n--B--\r\n")
        for _ in range(slow_count):
            sock = socket.create_connection((host, port), timeout=5)
            sock.sendall(b"POST /background/cleanup HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                         b"boundary=B\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:50])
            sockets.append(sock)
        opened = time.perf_counter() - begun
        with httpx.Client(base_url=url, timeout=60) as client:
            for what in ("/health", "upload", "/health", "upload"):
                started = time.perf_counter()
                if what == "/health":
                    code = client.get("/health").status_code
                else:
                    code = client.post("/background/cleanup", files={"file": ("n.jpg", payload)}).status_code
                rows.append((what, code, time.perf_counter() - started))
            health = client.get("/health").json()
        started = time.perf_counter()  # a folder job during the flood: dropped, then found in the outbox
        shutil.copy(image, work / "inbox" / "folder.jpg")
        while not list((work / "outbox").glob("folder*")) and time.perf_counter() - started < 60:
            time.sleep(0.02)
        rows.append(("folder job (drop -> outbox)", 200 if list((work / "outbox").glob("folder*")) else 0,
                     time.perf_counter() - started))
        sampler.stop()
        alive = daemon.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        daemon.terminate()
        daemon.wait(timeout=120)
    print(f"\nflood: {idle_count} idle connections ({refused} refused by the OS) and {slow_count} stalled uploads, "
          f"opened in {opened:.1f} s; daemon alive: {alive}; HTTP waiting {health['http_waiting']}, "
          f"in flight {health['http_in_flight']}; connections {health['connections']}\n")
    print("| request during the flood | status | seconds |")
    print("|---|---:|---:|")
    for what, code, took in rows:
        print(f"| {what} | {code} | {took:.2f} |")
    print(f"\ndaemon RSS: {mb(sampler.baseline)} MB before, {mb(sampler.peak)} MB peak, {mb(sampler.last)} MB after; "
          f"open files: {sampler.peak_fds} at the peak, {sampler.fds} during the requests (http.max_connections "
          f"1000; the guard closes the idle connections past it as they arrive)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--clients", default="1,4,8", help="concurrent HTTP clients, comma-separated")
    parser.add_argument("--burst", default="", help="burst sizes, comma-separated (e.g. 20,200)")
    parser.add_argument("--flood", type=int, default=0, help="idle connections to open")
    parser.add_argument("--slow", type=int, default=20, help="with --flood: stalled uploads")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "http")
    args = parser.parse_args()

    import os

    import httpx
    from tinymodels import build_tiny_onnx

    from bgwatch.samples import write_samples

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    home = work / "u2net"
    home.mkdir(parents=True)
    build_tiny_onnx(home)
    if args.burst:
        burst(work, home, [int(n) for n in args.burst.split(",") if n], args.size)
        return 0
    if args.flood:
        flood(work, home, args.flood, args.slow, args.size)
        return 0
    images = write_samples(work / "images", args.count, size=(args.size, args.size), seed=1)
    clients = [int(c) for c in args.clients.split(",") if c]
    daemon, url = start_daemon(work, home, {"window": max(clients) * 2})
    db_path = work / "state" / "bgwatch.db"
    rows: list[tuple[str, float, float, float, float]] = []
    try:
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
