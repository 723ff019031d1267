"""Prometheus metrics and a health check, served on a local port (config `metrics.listen`).

`Metrics` is told about finished runs (`run_finished`), queue depths (`queue_depth`) and liveness
(`heartbeat`); at scrape time it also reads the daemon's published status (jobs in flight, waiting, which
inboxes are watched) and, when the process has already imported torch, the GPU memory in use. It never
imports torch itself.

GET /metrics  the Prometheus text format
GET /healthz  200 {"status": "ok", ...} while the daemon makes progress (a heartbeat within stale_seconds),
              else 503 with the reason: for a load balancer, a monitoring check or `curl -f`.

Beyond loopback /metrics wants the HTTP API's keys (`Authorization: Bearer <key>`): what it shows (inboxes,
engines, rates) is for the operator. A listen address beyond loopback without keys is refused.
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bgwatch import __version__

STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Status = Callable[[], "Mapping[str, Any] | None"]


class _LiveCollector(Collector):
    """Values read when Prometheus scrapes: the daemon's published status, and GPU memory."""

    def __init__(self, status: Status | None) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        live = self.status() if self.status is not None else None
        if live is not None:
            yield GaugeMetricFamily("bgwatch_jobs_in_flight", "Jobs claimed by this host and not finished",
                                    value=float(live.get("in_flight", 0)))
            yield GaugeMetricFamily("bgwatch_files_waiting", "Stable files waiting for room in this host's window",
                                    value=float(live.get("waiting", 0)))
            stages = live.get("stages") or {}
            handled = CounterMetricFamily("bgwatch_stage_jobs", "Jobs each pipeline stage took in hand since the start",
                                          labels=["stage"])
            for stage, n in (stages.get("handled") or {}).items():
                handled.add_metric([str(stage)], float(n))
            yield handled
            watched = GaugeMetricFamily("bgwatch_inbox_watched", "1 while the inbox is present and watched",
                                        labels=["inbox"])
            for inbox in live.get("inboxes", []):
                watched.add_metric([str(inbox.get("path", ""))], 1.0 if inbox.get("healthy") else 0.0)
            yield watched
            storage = CounterMetricFamily("bgwatch_storage_errors", "Deliveries refused by the storage (ENOSPC, "
                                          "EDQUOT, EROFS, EIO) since the start, by error", labels=["error"])
            for error, n in (live.get("storage_errors") or {}).items():
                storage.add_metric([str(error)], float(n))
            yield storage
        torch = sys.modules.get("torch")  # only if an engine loaded it: a scrape must not import torch
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            memory = GaugeMetricFamily("bgwatch_gpu_memory_bytes", "GPU memory held by PyTorch in this process",
                                       labels=["device", "kind"])
            for index in range(torch.cuda.device_count()):
                memory.add_metric([str(index), "allocated"], float(torch.cuda.memory_allocated(index)))
                memory.add_metric([str(index), "reserved"], float(torch.cuda.memory_reserved(index)))
            yield memory


class _DoorCollector(Collector):
    """The HTTP door's line and connections, read from its health answer when Prometheus scrapes."""

    def __init__(self, health: Status) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        door = self.health() or {}
        yield GaugeMetricFamily("bgwatch_http_in_flight", "HTTP jobs in the pipeline (at most http.window)",
                                value=float(door.get("http_in_flight", 0)))
        yield GaugeMetricFamily("bgwatch_http_waiting", "HTTP requests waiting for the window (at most http.queue)",
                                value=float(door.get("http_waiting", 0)))
        connections = door.get("connections") or {}
        yield GaugeMetricFamily("bgwatch_http_connections", "Open HTTP connections",
                                value=float(connections.get("open", 0)))
        closed = CounterMetricFamily("bgwatch_http_connections_closed", "HTTP connections the daemon closed to "
                                     "stay within http.max_connections or for sending no headers in time",
                                     labels=["reason"])
        for reason in ("evicted", "refused", "header_timeouts"):
            closed.add_metric([reason], float(connections.get(reason, 0)))
        yield closed


class Metrics:
    """The daemon's metrics, in their own registry (several daemons in one test process do not collide)."""

    def __init__(self, *, status: Status | None = None, stale_seconds: float = 120.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self.clock = clock
        self.stale_seconds = stale_seconds
        self.started_at = clock()
        self._last_heartbeat: float | None = None
        self._status = status
        info = Gauge("bgwatch_info", "bgwatch version", ["version"], registry=self.registry)
        info.labels(__version__).set(1)
        self.runs = Counter("bgwatch_runs", "Runs finished, by status, inbox and engine",
                            ["status", "inbox", "engine"], registry=self.registry)
        self.stage_seconds = Histogram("bgwatch_stage_seconds", "Time spent in each stage of a run", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.run_seconds = Histogram("bgwatch_run_seconds", "Time of a whole run (sum of its stages)", ["inbox"],
                                     buckets=STAGE_BUCKETS, registry=self.registry)
        self.queue = Gauge("bgwatch_queue_depth", "Jobs waiting in front of each stage", ["stage"],
                           registry=self.registry)
        self.last_success = Gauge("bgwatch_last_success_timestamp_seconds", "When a run last succeeded",
                                  ["inbox"], registry=self.registry)
        self.registry.register(_LiveCollector(status))

    # ---- what the daemon reports

    def run_finished(self, status: str, inbox: str, engine: str, timings: Mapping[str, float]) -> None:
        self.runs.labels(status, inbox, engine).inc()
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
        if timings:
            self.run_seconds.labels(inbox).observe(sum(timings.values()))
        if status == "done":
            self.last_success.labels(inbox).set(self.clock())

    def watch_http(self, health: Status) -> None:
        """Scrapes also show the HTTP door's line and connections (`health`: the door's /health answer)."""
        self.registry.register(_DoorCollector(health))

    def queue_depth(self, stage: str, n: int) -> None:
        self.queue.labels(stage).set(n)

    def heartbeat(self) -> None:
        """The daemon made progress (where it pings the systemd watchdog)."""
        self._last_heartbeat = self.clock()

    # ---- what a scrape or a health check sees

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def health(self) -> tuple[bool, dict[str, Any]]:
        now = self.clock()
        # A daemon that reports heartbeats (from its watchdog, which knows about stalled workers) is judged
        # by them alone; otherwise by the status it publishes from its main loop.
        last = self._last_heartbeat if self._last_heartbeat is not None else self._published_at()
        body: dict[str, Any] = {"version": __version__, "uptime_seconds": round(now - self.started_at, 1),
                                "last_heartbeat_age_seconds": None if last is None else round(now - last, 1)}
        if last is None:
            ok = now - self.started_at < self.stale_seconds  # starting up
            body["reason"] = "starting" if ok else "no heartbeat since start"
        else:
            ok = now - last < self.stale_seconds
            if not ok:
                body["reason"] = f"no progress for {now - last:.0f} s"
        body["status"] = "ok" if ok else "stalled"
        return ok, body

    def _published_at(self) -> float | None:
        live = self._status() if self._status is not None else None
        value = live.get("updated_at") if live else None
        return float(value) if isinstance(value, (int, float)) else None

    def serve(self, address: str, keys: frozenset[str] = frozenset()) -> MetricsServer:
        """Serve /metrics and /healthz on host:port (port 0: any free port) from a daemon thread. Beyond
        loopback /metrics needs one of `keys` (the API's); ConfigError when there are none."""
        from bgwatch.config import is_loopback

        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not keys and not is_loopback(host):
            from bgwatch.errors import ConfigError

            raise ConfigError("metrics.listen", "metrics.listen", f"{address!r} is reachable from other machines, "
                              "which needs the API's keys (http.api_keys_file)", "a loopback address, or keys")
        return MetricsServer(self, host, int(port), keys)


class MetricsServer:
    def __init__(self, metrics: Metrics, host: str, port: int, keys: frozenset[str] = frozenset()) -> None:
        handler = _handler(metrics, keys)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="bgwatch-metrics", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _handler(metrics: Metrics, keys: frozenset[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"bgwatch/{__version__}"
        timeout = 10  # seconds a connection may stall (slow-loris)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                if not self._authorised():
                    self._send(401, b"a valid API key is required (Authorization: Bearer <key>)\n", "text/plain")
                    return
                self._send(200, metrics.render(), CONTENT_TYPE)
            elif path == "/healthz":
                ok, body = metrics.health()
                self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
            else:
                self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

        def _authorised(self) -> bool:
            if not keys:
                return True
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            given = token.strip().encode()
            return scheme.lower() == "bearer" and any(hmac.compare_digest(given, k.encode()) for k in keys)

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every 15 s is not news

    return Handler
