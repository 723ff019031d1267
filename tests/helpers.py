"""Shared test helpers: configs on tmp folders, waiting with a deadline, a daemon in a thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bgwatch.config import Config, parse_config
from bgwatch.daemon import Daemon


def make_config(root: Path, inboxes: dict[str, dict[str, Any]] | None = None, **top: Any) -> Config:
    """A config rooted at `root`: inboxes given as name -> extra inbox keys (rules, poll, on_success)."""
    inboxes = inboxes if inboxes is not None else {"cleanup": {"rules": {"operation": "cleanup"}}}
    data: dict[str, Any] = {
        "state_dir": "state",
        "host": "testhost",
        "watch": {"settle_seconds": 0.3, "rescan_seconds": 1.0, "sidecar_seconds": 2.0,
                  "orphan_sidecar_seconds": 3.0, "lease_seconds": 30},
        "defaults": {"mask": {"engine": "classical"}},
        "inboxes": [{"path": f"inbox/{name}", "outbox": f"outbox/{name}", **extra}
                    for name, extra in inboxes.items()],
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    config_file = root / "config.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(data))
    config = parse_config(data, config_file, env={})
    for inbox in config.inboxes:
        inbox.path.mkdir(parents=True, exist_ok=True)
    return config


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s: {condition}")


class DaemonThread:
    """A real Daemon running in a thread (signals are the CLI's business, not the tests')."""

    def __init__(self, config: Config) -> None:
        self.daemon = Daemon(config)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.daemon.run()

    def __enter__(self) -> Daemon:
        self.thread.start()
        return self.daemon

    def __exit__(self, *exc: object) -> None:
        self.daemon.request_stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "daemon did not stop"


def files_under(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def chromium() -> str:
    """Debian's chromium for the browser checks: installed with apt-get when missing and running as root,
    otherwise the calling test is skipped with the reason."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is missing and this is not root with apt-get: `apt-get install chromium`")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        pytest.skip(f"could not install Debian's chromium package: {proc.stderr.strip()[-300:]}")
    return found
