"""What the HTTP door spends, bounded: requests wait in line behind the window instead of being refused,
the rate limit counts what the seed says, and before any key is checked a flood of idle connections, slow
uploads, long boundaries and oversized forms cost the daemon a bounded amount and never stop it."""

from __future__ import annotations

import io
import queue
import resource
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bgwatch.httpjobs import HttpDoor, Refused
from bgwatch.jobs import Job, JobState, RunResult
from bgwatch.ratelimit import RequestSchedule, TokenBucket
from bgwatch.service import raise_open_file_limit
from bgwatch.store import Store
from tests.apihelpers import ApiDaemon, api_config, post, rows, sample_bytes
from tests.helpers import wait_for

BOUNDARY = "bgwatch-test-boundary"


def _form_head(name: str = "photo.jpg", boundary: str = BOUNDARY) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()


def _form(image: bytes, boundary: str = BOUNDARY) -> bytes:
    return _form_head(boundary=boundary) + image + f"\r\n--{boundary}--\r\n".encode()


def _slow_upload(url: str, image: bytes, sent: int) -> socket.socket:
    """A client that sends the headers and `sent` bytes of its form, then stalls."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = _form(image)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall((f"POST /background/cleanup HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
                  f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode() + body[:sent])
    return sock


def _answer_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


# ---------------------------------------------------------------- the window and the line behind it


def test_requests_wait_in_line_behind_the_window_and_stopping_refuses_the_line(tmp_path: Path) -> None:
    config = api_config(tmp_path, http={"window": 2, "queue": 3})
    store = Store(config.db_path)
    submitted: list[Job] = []
    door = HttpDoor(config, store, TokenBucket(0), submitted.append, queue.SimpleQueue())
    door.uploads_dir.mkdir(parents=True)
    image = sample_bytes(tmp_path, 31)
    for _ in range(5):
        door.reserve()
    with pytest.raises(Refused) as full:
        door.reserve()
    assert full.value.status == 503 and full.value.retry_after is not None and "http.queue" in full.value.reason
    tickets = []
    for i in range(5):
        upload = door.new_upload(f"p{i}.jpg")
        upload.path.write_bytes(image)
        tickets.append(door.admit("cleanup", upload, {}))
    door.tick()
    assert [job.rel_path for job in submitted] == ["p0.jpg", "p1.jpg"], "the window: two in the pipeline"
    health = door.health()
    assert (health["http_in_flight"], health["http_waiting"]) == (2, 3)
    run_ids = [t.recorded.result(timeout=1) for t in tickets]
    assert [store.get_run(r).status for r in run_ids] == ["queued"] * 5  # type: ignore[union-attr]

    door.recorded(RunResult(run_ids[0], JobState.DONE, door.results_dir / "p0.png"))
    assert tickets[0].done.result(timeout=1).state == JobState.DONE
    assert [job.rel_path for job in submitted] == ["p0.jpg", "p1.jpg", "p2.jpg"], "the next one let in, in order"

    door.stop_accepting()
    for ticket in tickets[3:]:
        with pytest.raises(Refused) as stopping:
            ticket.done.result(timeout=1)
        assert stopping.value.status == 503 and stopping.value.retry_after == 10
    assert [store.get_run(r).status for r in run_ids[3:]] == ["failed", "failed"]  # type: ignore[union-attr]
    assert door.busy(), "the two in the pipeline still drain"
    assert len(list(door.uploads_dir.iterdir())) == 2, "the refused uploads are removed"
    store.close()


def test_twenty_concurrent_cleanups_are_all_answered_with_an_image(tmp_path: Path) -> None:
    config = api_config(tmp_path, http={"window": 2})
    image = sample_bytes(tmp_path, 40, size=(96, 72))
    with ApiDaemon(config) as api, ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda i: post(api.client, "cleanup", image, name=f"u{i}.jpg"), range(20)))
        assert [a.status_code for a in answers] == [200] * 20
        for answer in answers:
            got = api.client.get(answer.json()["download_url"])
            assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
    assert sorted(r["rel_path"] for r in rows(config, "http")) == sorted(f"u{i}.jpg" for i in range(20))


def test_past_the_queue_503_with_retry_after_and_the_slow_upload_still_finishes(tmp_path: Path) -> None:
    config = api_config(tmp_path, http={"window": 1, "queue": 0})
    image = sample_bytes(tmp_path, 33)
    with ApiDaemon(config) as api:
        assert api.daemon.http is not None
        slow = _slow_upload(api.daemon.http.url, image, 100)
        wait_for(lambda: api.client.get("/health").json()["http_waiting"] == 1)
        full = post(api.client, "cleanup", image)
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert full.json() == {"success": False, "detail": full.json()["detail"]} and "http.queue" in full.text
        slow.sendall(_form(image)[100:])
        assert _answer_line(slow).startswith(b"HTTP/1.1 200")
        slow.close()
        assert post(api.client, "cleanup", image).status_code == 200
    assert [r["status"] for r in rows(config, "http")] == ["done", "done"]


def test_the_request_limit_counts_every_request_and_answers_429_at_once(tmp_path: Path) -> None:
    clock = [100.0]
    schedule = RequestSchedule(2, burst=2, clock=lambda: clock[0])
    assert [schedule.book(10), schedule.book(10)] == [0.0, 0.0], "the original's bucket starts full"
    assert schedule.book(10) is None and schedule.delay() == pytest.approx(30.0), "nothing booked past max_wait"
    assert schedule.book(60) == pytest.approx(30.0)
    clock[0] += 90
    assert schedule.book(0) == 0.0

    config = api_config(tmp_path, limits={"generations_per_minute": 1}, http={"limit": "requests", "max_wait": 1})
    image = sample_bytes(tmp_path, 35)
    with ApiDaemon(config) as api:
        assert post(api.client, "cleanup", image).status_code == 200
        started = time.monotonic()
        limited = post(api.client, "cleanup", image)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 1
        assert "BG_REQS_PER_MIN" in limited.json()["detail"] and limited.json()["success"] is False
        assert time.monotonic() - started < 30, "not held until the wait is over"
        assert api.client.get("/health").json()["rate_limit"] == "requests"
    assert len(rows(config, "http")) == 1


# ---------------------------------------------------------------- before authentication (issue 20)


def test_idle_connections_past_the_cap_do_not_keep_health_or_uploads_out(tmp_path: Path) -> None:
    config = api_config(tmp_path, http={"max_connections": 16})
    image = sample_bytes(tmp_path, 37)
    with ApiDaemon(config) as api:
        assert api.daemon.http is not None and api.daemon.http.server is not None
        guard = api.daemon.http.server.guard
        host, port = api.daemon.http.url.removeprefix("http://").rsplit(":", 1)
        idle = [socket.create_connection((host, int(port))) for _ in range(60)]
        try:
            wait_for(lambda: guard.stats()["evicted"] >= 60 - 16)
            assert len(guard) <= 16
            fresh = httpx.Client(base_url=api.daemon.http.url, timeout=10)
            assert fresh.get("/health").json()["status"] == "healthy"
            assert post(fresh, "cleanup", image).status_code == 200
            fresh.close()
        finally:
            for sock in idle:
                sock.close()
        assert api.error is None


def test_a_connection_that_trickles_its_headers_is_closed(tmp_path: Path) -> None:
    config = api_config(tmp_path, http={"header_timeout": 0.3})
    with ApiDaemon(config) as api:
        assert api.daemon.http is not None
        host, port = api.daemon.http.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            assert sock.recv(100) == b"", "closed by the server"
        assert api.daemon.http.server.guard.stats()["header_timeouts"] == 1


def test_slow_uploads_do_not_hold_the_window_and_time_out(tmp_path: Path) -> None:
    config = api_config(tmp_path, http={"window": 1, "queue": 8, "body_timeout": 0.5})
    image = sample_bytes(tmp_path, 39)
    with ApiDaemon(config) as api:
        assert api.daemon.http is not None
        slow = [_slow_upload(api.daemon.http.url, image, 200) for _ in range(4)]
        wait_for(lambda: api.client.get("/health").json()["http_waiting"] == 4)
        assert post(api.client, "cleanup", image).status_code == 200, "the window was free for a whole upload"
        for sock in slow:
            assert _answer_line(sock).startswith(b"HTTP/1.1 408")
            sock.close()
        wait_for(lambda: api.client.get("/health").json()["http_waiting"] == 0)
    assert len(rows(config, "http")) == 1


def _chunks(*parts: bytes) -> Iterator[bytes]:
    yield from parts


def test_malformed_and_oversized_forms_are_clean_refusals(tmp_path: Path) -> None:
    config = api_config(tmp_path, limits={"max_memory": 64 << 20})
    image = sample_bytes(tmp_path, 41)
    with ApiDaemon(config) as api:
        boundary = "b" * 8000
        long = api.client.post("/background/cleanup", content=_form(image, boundary),
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert long.status_code == 400 and long.json()["success"] is False and len(long.json()["detail"]) < 200
        epilogue = api.client.post("/background/cleanup", content=_chunks(_form(image), b"x" * 300_000),
                                   headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert epilogue.status_code == 413 and "256 KB" in epilogue.json()["detail"], "chunked: same budget"
        repeated = api.client.post("/background/cleanup", files={"file": ("a.jpg", image)},
                                   data={"mode": ["color"] * 40})
        assert repeated.status_code == 422 and "more than 32 form fields" in repeated.json()["detail"]
        echoed = post(api.client, "cleanup", image, mode="x" * 60_000)
        assert echoed.status_code == 422 and len(echoed.json()["detail"]) <= 600
        assert post(api.client, "cleanup", _png_header(20_000, 20_000), name="bomb.png").status_code == 413
        big = io.BytesIO()
        Image.new("RGB", (2000, 1500), (90, 90, 90)).save(big, "JPEG")
        over_memory = post(api.client, "cleanup", big.getvalue(), name="big.jpg")
        assert over_memory.status_code == 413 and "limits.max_memory" in over_memory.json()["detail"]
        assert api.client.get("/health").json()["http_waiting"] == 0
    assert rows(config, "http") == []
    assert not any((config.state_dir / "http" / "uploads").iterdir())


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft = raise_open_file_limit()
    now, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == now and (hard == resource.RLIM_INFINITY or now == hard)
