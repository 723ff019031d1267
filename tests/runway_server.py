"""A fake Runway API on loopback: a real HTTP server (ThreadingHTTPServer in a thread) that plays a task's
life cycle from a script, serves the result PNG from a second "download host" path, and records every
request so tests can check headers, bodies and where the key went.

    with FakeRunway(statuses=["PENDING", "RUNNING", "SUCCEEDED"]) as server:
        config.runway.base_url = server.url
        ...
        server.requests  # [Recorded(method, path, headers, body), ...]

Scripted faults: `post_errors` / `poll_errors` are answers (status, headers) given before the real ones
(429 with Retry-After, 5xx); `hang=True` makes every poll block until the server stops; statuses ending
in FAILED / CANCELLED carry `failure` and `failureCode`; a script that never reaches a final status
repeats its last entry forever.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

RATIO_SIZES = {"1920:1080": (1920, 1080)}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class FakeRunway:
    statuses: list[str] = field(default_factory=lambda: ["PENDING", "RUNNING", "SUCCEEDED"])
    post_errors: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    poll_errors: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    hang: bool = False
    failure: str = "The prompt was flagged by the content moderation system"
    failure_code: str = "SAFETY.INPUT.TEXT"
    reject: tuple[int, dict[str, Any]] | None = None  # e.g. (401, {"error": "Invalid API key"})
    echo_key_in_error: bool = False  # a careless server that quotes the Authorization header back

    def __post_init__(self) -> None:
        self.requests: list[Recorded] = []
        self.tasks: dict[str, dict[str, Any]] = {}
        self.cancelled: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ life cycle

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeRunway:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake._record(Recorded(self.command, self.path, dict(self.headers.items()), body))
                status, headers, payload = fake._answer(self.command, self.path, body, dict(self.headers))
                if status == 0:  # hang: hold the connection until the test or the server gives up
                    fake._stop.wait(30)
                    self.close_connection = True  # else the handler waits for a next request, the client an answer
                    return
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-runway", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeRunway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ behaviour

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def _answer(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            if method == "POST" and path == "/v1/text_to_image":
                return self._create(body, headers)
            if method == "GET" and path.startswith("/v1/tasks/"):
                return self._poll(path.rsplit("/", 1)[-1])
            if method == "DELETE" and path.startswith("/v1/tasks/"):
                self.cancelled.append(path.rsplit("/", 1)[-1])
                return 204, {}, b""
            if method == "GET" and path.startswith("/files/"):
                task = self.tasks.get(path.rsplit("/", 1)[-1].removesuffix(".png"))
                if task is None:
                    return _json(404, {"error": "no such file"})
                return 200, {"Content-Type": "image/png"}, task["png"]
        return _json(404, {"error": f"no route {method} {path}"})

    def _create(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if self.post_errors:
            status, extra = self.post_errors.pop(0)
            return _json(status, {"error": "try again later"}, extra)
        if self.reject is not None:
            status, data = self.reject
            if self.echo_key_in_error:
                data = {**data, "error": f"{data.get('error')}: got {headers.get('Authorization')}"}
            return _json(status, data)
        request = json.loads(body)
        task_id = str(uuid.uuid4())
        w, h = (int(v) for v in str(request.get("ratio", "1024:1024")).split(":"))
        self.tasks[task_id] = {
            "request": request,
            "polls": 0,
            "png": _result_png(w, h, request.get("seed", 0)),
        }
        return _json(200, {"id": task_id})

    def _poll(self, task_id: str) -> tuple[int, dict[str, str], bytes]:
        if self.hang:
            return 0, {}, b""
        if self.poll_errors:
            status, extra = self.poll_errors.pop(0)
            return _json(status, {"error": "internal error"}, extra)
        task = self.tasks.get(task_id)
        if task is None:
            return _json(404, {"error": "Task not found"})
        status = self.statuses[min(task["polls"], len(self.statuses) - 1)]
        task["polls"] += 1
        data: dict[str, Any] = {"id": task_id, "status": status, "createdAt": "2026-11-24T00:00:00.000Z"}
        if status == "RUNNING":
            data["progress"] = 0.5
        if status == "SUCCEEDED":
            data["output"] = [f"{self.url}/files/{task_id}.png"]
        if status in ("FAILED", "CANCELLED"):
            data["failure"] = self.failure
            data["failureCode"] = self.failure_code
        return _json(200, data)


def _json(status: int, data: Any, extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(extra or {})}, json.dumps(data).encode()


def _result_png(width: int, height: int, seed: int) -> bytes:
    """A stand-in for Runway's image: a warm diagonal ramp at the ratio's size, different per seed."""
    from PIL import Image

    # Generated small and scaled up: the ratio's full size costs little to encode that way.
    sw, sh = max(1, width // 8), max(1, height // 8)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    t = (xx / max(sw - 1, 1) + yy / max(sh - 1, 1)) / 2
    tint = (int(seed) % 97) / 97.0
    rgb = np.stack([180 + 60 * t, 140 + 60 * t * tint + 20, 100 + 40 * (1 - t)], axis=-1)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((width, height))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()
