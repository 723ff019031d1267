"""Workstations of a studio on one machine: real `bgwatch run` processes, each with its own folder (config.yaml,
state/, daemon.log), all watching one plain shared folder and naming one store. For the studio's "done when"
checks (tests/test_studio_done_when.py, bench/studio_done_when.py); the fault suite's hosts (tests/hosts.py)
mount the share through FUSE instead.

    hosts = [StudioHost(tmp / f"h{i}", f"h{i}", share, store=url, rules=..., extra={...}) for i in (1, 2, 3)]
    start_all(hosts)          # started together, returns once each says it is watching
    drop(share / "inbox", "a.png", data)
    stop_all(hosts)           # SIGTERM, wait for the drains (always, in a finally)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Environment variables that would change what the daemons do behind the config's back.
_SCRUBBED_ENV = ("BG_ENGINE", "DEVICE", "MODEL_ID", "OUTPUT_DIR", "BG_REQS_PER_MIN", "ALLOW_4K", "DEBUG",
                 "BGWATCH_CONFIG", "BGWATCH_STORE", "RUNWAY_API_KEY", "NOTIFY_SOCKET", "WATCHDOG_USEC")


class StudioHost:
    """One workstation: `root`/config.yaml naming `share`/inbox and `share`/outbox, its state in `root`/state."""

    def __init__(self, root: Path, name: str, share: Path, *, store: str, rules: Mapping[str, Any],
                 extra: Mapping[str, Any] | None = None) -> None:
        self.root = root
        self.name = name
        self.config_path = root / "config.yaml"
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {
            "host": name,
            "state_dir": str(root / "state"),
            "device": "cpu",
            "store": store,
            "watch": {"settle_seconds": 0.3, "rescan_seconds": 1, "lease_seconds": 10},
            "pipeline": {"stop_timeout": 10},
            "defaults": {"mask": {"engine": "classical"}},
            "inboxes": [{"path": str(share / "inbox"), "outbox": str(share / "outbox"), "poll": True,
                         "on_success": "move", "rules": dict(rules)}],
        }
        for key, value in (extra or {}).items():
            data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))

    def bgwatch(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A `bgwatch` command with this workstation's config (`history --json`, `cache ls --json`...)."""
        return subprocess.run([sys.executable, "-m", "bgwatch", *args, "-c", str(self.config_path)],
                              capture_output=True, text=True, timeout=timeout, cwd=self.root, env=_env())

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bgwatch", "run", "--no-progress", "-c",
                                          str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.root, env=_env(), start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """Watching (the daemon said so), or ended (the caller sees it is not alive)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return "bgwatch watching" in text or not self.alive

    def terminate(self) -> None:
        """One SIGTERM: drain and exit (a second one would mean 'leave now')."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 25.0, *, terminated: bool = False) -> int | None:
        """SIGTERM (unless `terminated` already) and wait for the drain; SIGKILL past `timeout`. The exit code
        (None: it had to be killed)."""
        if self.proc is None:
            return None
        if not terminated:
            self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def start_all(hosts: Iterable[StudioHost], timeout: float = 60.0) -> None:
    """Start every host at once and wait until each is watching; AssertionError with its log if one is not."""
    hosts = list(hosts)
    for host in hosts:
        host.start()
    deadline = time.monotonic() + timeout
    while not all(host.ready() for host in hosts):
        assert time.monotonic() < deadline, "not watching within {:g} s:\n{}".format(
            timeout, "\n".join(f"{h.name}: {h.log_tail()}" for h in hosts if not h.ready()))
        time.sleep(0.1)
    dead = [h for h in hosts if not h.alive]
    assert not dead, "\n".join(f"{h.name} ended at start:\n{h.log_tail()}" for h in dead)


def stop_all(hosts: Iterable[StudioHost]) -> dict[str, int | None]:
    """SIGTERM every host at once, then wait for each: name -> exit code."""
    hosts = list(hosts)
    for host in hosts:
        host.terminate()
    return {host.name: host.stop(terminated=True) for host in hosts}


def drop(inbox: Path, name: str, data: bytes) -> Path:
    """Write inbox/name the way a copy tool should: a temporary file beside the inbox, then one rename."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox.parent / f".incoming-{name}"
    tmp.write_bytes(data)
    target = inbox / name
    os.rename(tmp, target)
    return target
