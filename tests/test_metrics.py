"""Prometheus metrics and /healthz over real HTTP on loopback: a Metrics object, then a real daemon's batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bgwatch.metrics import Metrics, MetricsServer
from bgwatch.samples import write_samples

ROOT = Path(__file__).resolve().parents[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from the Prometheus text format, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer, Clock, dict]]:
    clock = Clock()
    live: dict = {}
    metrics = Metrics(status=lambda: live or None, stale_seconds=60, clock=clock)
    server = metrics.serve("127.0.0.1:0")
    yield metrics, server, clock, live
    server.close()


def test_runs_stages_queues_and_last_success_over_http(served) -> None:
    metrics, server, clock, live = served
    metrics.run_finished("done", "/in/a", "classical", {"prepare": 0.02, "mask": 0.3, "finish": 0.1})
    metrics.run_finished("done", "/in/a", "classical", {"prepare": 0.03, "mask": 0.2, "finish": 0.1})
    clock.now += 5
    metrics.run_finished("failed", "/in/b", "rembg+sdxl", {"prepare": 0.01})
    metrics.queue_depth("device", 3)
    live.update({"in_flight": 2, "waiting": 7, "updated_at": clock.now,
                 "inboxes": [{"path": "/in/a", "healthy": True}, {"path": "/in/b", "healthy": False}]})
    status, text = get(server.url + "/metrics")
    assert status == 200
    values = samples(text)
    assert values[("bgwatch_runs_total", (("engine", "classical"), ("inbox", "/in/a"), ("status", "done")))] == 2
    assert values[("bgwatch_runs_total", (("engine", "rembg+sdxl"), ("inbox", "/in/b"), ("status", "failed")))] == 1
    assert values[("bgwatch_stage_seconds_count", (("stage", "mask"),))] == 2
    assert values[("bgwatch_stage_seconds_sum", (("stage", "mask"),))] == pytest.approx(0.5)
    assert values[("bgwatch_run_seconds_count", (("inbox", "/in/a"),))] == 2
    assert values[("bgwatch_last_success_timestamp_seconds", (("inbox", "/in/a"),))] == clock.now - 5
    assert ("bgwatch_last_success_timestamp_seconds", (("inbox", "/in/b"),)) not in values
    assert values[("bgwatch_queue_depth", (("stage", "device"),))] == 3
    assert values[("bgwatch_jobs_in_flight", ())] == 2 and values[("bgwatch_files_waiting", ())] == 7
    assert values[("bgwatch_inbox_watched", (("inbox", "/in/b"),))] == 0
    assert get(server.url + "/nothing")[0] == 404


def test_healthz_follows_progress(served) -> None:
    metrics, server, clock, live = served
    status, body = get(server.url + "/healthz")
    assert status == 200 and json.loads(body)["reason"] == "starting"
    clock.now += 61
    status, body = get(server.url + "/healthz")
    assert status == 503 and json.loads(body)["reason"] == "no heartbeat since start"
    live["updated_at"] = clock.now  # the status the daemon's main loop publishes counts as progress ...
    assert get(server.url + "/healthz")[0] == 200
    clock.now += 61
    assert get(server.url + "/healthz")[0] == 503
    metrics.heartbeat()  # ... until the daemon reports heartbeats (its watchdog knows about stalled workers)
    assert get(server.url + "/healthz")[0] == 200
    clock.now += 59
    live["updated_at"] = clock.now
    assert get(server.url + "/healthz")[0] == 200
    clock.now += 2
    status, body = get(server.url + "/healthz")
    assert status == 503 and json.loads(body)["status"] == "stalled" and "no progress for 61 s" in body, (
        "a main loop still publishing does not hide stalled workers")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_metrics_scraped_from_a_running_daemon_during_a_batch(tmp_path: Path) -> None:
    port = free_port()
    inbox = tmp_path / "in"
    inbox.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nhost: testhost\nwatch: {{settle_seconds: 0.3}}\n"
                      f"metrics: {{listen: '127.0.0.1:{port}'}}\ndefaults: {{mask: {{engine: classical}}}}\n"
                      f"inboxes: [{{path: {inbox}, outbox: {tmp_path / 'out'}}}]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bgwatch", "run", "-c", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def scrape() -> dict:
        try:
            return samples(get(url + "/metrics")[1])
        except OSError:  # not listening yet
            return {}

    def runs(status: str) -> float:
        return sum(v for (name, labels), v in scrape().items()
                   if name == "bgwatch_runs_total" and ("status", status) in labels)

    try:
        deadline = time.monotonic() + 60
        while not scrape() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert get(url + "/healthz")[0] == 200
        write_samples(inbox, 3, size=(160, 120), seed=50)
        (inbox / "empty.jpg").write_bytes(b"")
        while (runs("done") < 3 or runs("failed") < 1) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        values = scrape()
        assert runs("done") == 3 and runs("failed") == 1, values
        assert values[("bgwatch_runs_total", (("engine", "classical"), ("inbox", str(inbox)), ("status", "done")))] == 3
        assert values[("bgwatch_last_success_timestamp_seconds", (("inbox", str(inbox)),))] > time.time() - 120
        assert any(name == "bgwatch_stage_seconds_count" for name, _ in values)
        assert values[("bgwatch_inbox_watched", (("inbox", str(inbox)),))] == 1
        status, body = get(url + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with pytest.raises(OSError):
        get(url + "/metrics")  # closed with the daemon


def test_beyond_loopback_the_metrics_want_the_apis_keys(tmp_path: Path) -> None:
    from bgwatch.config import parse_config
    from bgwatch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"metrics\.listen.*api_keys_file"):
        parse_config({"metrics": {"listen": "0.0.0.0:9464"}}, env={})
    keys = tmp_path / "keys"
    keys.write_text("k-metrics-0123\n")
    assert parse_config({"metrics": {"listen": "0.0.0.0:9464"}, "http": {"api_keys_file": str(keys)}}, env={})
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        Metrics().serve("0.0.0.0:0")
    server = Metrics().serve("0.0.0.0:0", keys=frozenset({"k-metrics-0123"}))
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert get(f"{url}/metrics")[0] == 401
        assert get(f"{url}/healthz")[0] == 200, "a load balancer's check needs no key"
        request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": "Bearer k-metrics-0123"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200 and b"bgwatch_info" in response.read()
    finally:
        server.close()
