"""The HTTP API in tests: a real daemon with its HTTP door in a thread, driven over loopback by httpx."""

from __future__ import annotations

import io
import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bgwatch.daemon import Daemon
from bgwatch.metrics import Metrics
from bgwatch.samples import write_samples
from tests.helpers import make_config, wait_for


class ApiDaemon:
    """A real daemon with its HTTP door, in a thread; `client` talks to it over loopback."""

    def __init__(self, config: Any, *, metrics: Metrics | None = None, key: str | None = None) -> None:
        self.daemon = Daemon(config, http=True, metrics=metrics)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.key = key

    def _run(self) -> None:
        try:
            self.daemon.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> ApiDaemon:
        self.thread.start()
        assert self.daemon.http is not None
        wait_for(lambda: self.daemon.http.url or self.error)  # type: ignore[union-attr]
        if self.error is not None:
            raise self.error
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.client = httpx.Client(base_url=self.daemon.http.url, timeout=60, headers=headers)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.daemon.request_stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "daemon did not stop"


def api_config(root: Path, inboxes: dict[str, dict[str, Any]] | None = None, http: dict[str, Any] | None = None,
               **top: Any) -> Any:
    return make_config(root, inboxes if inboxes is not None else {}, http={"listen": "127.0.0.1:0", **(http or {})},
                       **top)


def post(client: httpx.Client, operation: str, image: bytes, name: str = "photo.jpg", wait: bool = True,
         headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    return client.post(f"/background/{operation}", params={} if wait else {"wait": "false"},
                       files={"file": (name, image, "image/jpeg")}, data={k: str(v) for k, v in fields.items()},
                       headers=headers)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def sample_bytes(tmp: Path, seed: int, size: tuple[int, int] = (256, 192)) -> bytes:
    [path] = write_samples(tmp / f"samples-{seed}", 1, size=size, seed=seed)
    return path.read_bytes()


def rows(config: Any, inbox: str | None = None) -> list[dict[str, Any]]:
    db = sqlite3.connect(config.db_path)
    db.row_factory = sqlite3.Row
    sql, args = ("SELECT * FROM runs WHERE inbox = ? ORDER BY id", [inbox]) if inbox else ("SELECT * FROM runs", [])
    found = [dict(r) for r in db.execute(sql, args)]
    db.close()
    return found


def folder_output(config: Any, inbox_index: int = 0) -> bytes:
    inbox = config.inboxes[inbox_index]
    [row] = wait_for(lambda: [r for r in rows(config, str(inbox.path)) if r["status"] == "done"])
    return Path(row["output_path"]).read_bytes()
