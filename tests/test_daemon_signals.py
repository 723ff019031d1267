"""The daemon as systemd runs it: sd_notify, TERM drains and exits, config edits apply without restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from bgwatch.daemon import Daemon
from bgwatch.errors import BgwatchError
from bgwatch.samples import write_samples
from bgwatch.service import InstanceLock
from tests.helpers import DaemonThread, files_under, make_config, wait_for

ROOT = Path(__file__).resolve().parents[1]


def test_sd_notify_ready_and_stopping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    config = make_config(tmp_path)
    assert Daemon(config, once=True).run() == 0
    messages = []
    while not messages or messages[-1] != "STOPPING=1":
        messages.append(server.recv(1024).decode())
    assert messages[0] == "READY=1"
    assert any(m.startswith("STATUS=") and "in flight" in m for m in messages)
    server.close()


def test_one_daemon_per_state_folder(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with DaemonThread(config):
        wait_for(lambda: InstanceLock.held(config.state_dir))
        with pytest.raises(BgwatchError, match="already running"):
            Daemon(config).run()
    assert not InstanceLock.held(config.state_dir)


def test_a_daemon_starting_while_status_looks_at_its_lock_still_starts(tmp_path: Path) -> None:
    """`held` (bgwatch status, report) takes a shared lock on the lock file for a moment to look; a daemon
    starting in that moment waits it out instead of calling its own folder taken. One that stays held is
    refused after the same patience."""
    import fcntl
    import os

    state = tmp_path / "state"
    InstanceLock(state).release()
    looking = os.open(state / "bgwatch.lock", os.O_RDONLY)
    fcntl.flock(looking, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what held() does while it looks
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the look ends during the daemon's first wait
        waits.append(seconds)
        if len(waits) == 1:
            os.close(looking)

    lock = InstanceLock(state, sleep=sleep)
    assert InstanceLock.held(state) and len(waits) == 1
    waits.clear()
    with pytest.raises(BgwatchError, match="already running"):
        InstanceLock(state, sleep=waits.append)
    assert sum(waits) == pytest.approx(InstanceLock.PATIENCE)
    lock.release()
    assert not InstanceLock.held(state)


def test_editing_config_rules_applies_to_files_arriving_afterwards(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    with DaemonThread(config) as daemon:
        first = write_samples(inbox, 1, size=(160, 120), seed=50)[0]
        wait_for(lambda: len(daemon.results) == 1)
        data = yaml.safe_load(config.source.read_text())
        data["inboxes"][0]["rules"] = {"operation": "cleanup", "mode": "color", "background_color": "#ff00ff"}
        config.source.write_text(yaml.safe_dump(data))
        wait_for(lambda: daemon.config.inboxes[0].rules.get("mode") == "color")
        second = write_samples(inbox, 1, size=(160, 120), seed=51)[0]
        wait_for(lambda: len(daemon.results) == 2)
    with Image.open(outbox / f"{first.stem}.png") as img:
        assert img.mode == "RGBA"
    with Image.open(outbox / f"{second.stem}.png") as img:
        assert img.convert("RGB").getpixel((1, 1)) == (255, 0, 255)


def test_a_broken_config_edit_keeps_the_running_rules(tmp_path: Path) -> None:
    """A config.yaml edited into something invalid is refused with the reason (the daemon noticed it and
    said so), and the running config goes on: its inbox is still served with its rules."""
    from loguru import logger

    config = make_config(tmp_path, {"cleanup": {"rules": {"operation": "cleanup", "mode": "color",
                                                           "background_color": "#00ff00"}}})
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="ERROR", format="{message}")
    try:
        with DaemonThread(config) as daemon:
            wait_for(lambda: InstanceLock.held(config.state_dir))
            config.source.write_text("device: quantum\n")
            wait_for(lambda: any("config reload refused" in line and "quantum" in line for line in lines))
            assert daemon.config.inboxes[0].rules.get("background_color") == "#00ff00"
            [shot] = write_samples(config.inboxes[0].path, 1, size=(120, 90), seed=52)
            wait_for(lambda: len(daemon.results) == 1)
    finally:
        logger.remove(sink)
    assert daemon.results[0].state.value == "done"
    with Image.open(config.inboxes[0].outbox / f"{shot.stem}.png") as img:
        assert img.convert("RGB").getpixel((1, 1)) == (0, 255, 0)


@pytest.mark.slow
def test_term_finishes_in_flight_work_and_exits_cleanly(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bgwatch", "run", "-c", str(config.source)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: InstanceLock.held(config.state_dir), timeout=60)
        write_samples(inbox, 2, size=(320, 240), seed=53)
        wait_for(lambda: files_under(inbox / ".bgwatch" / "claimed") or files_under(outbox), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    import sqlite3

    db = sqlite3.connect(config.db_path)
    assert db.execute("SELECT COUNT(*) FROM runs WHERE status IN ('running')").fetchone()[0] == 0
    assert not files_under(inbox / ".bgwatch" / "claimed") or db.execute(
        "SELECT COUNT(*) FROM runs WHERE status = 'queued'").fetchone()[0] > 0


def test_status_shows_a_running_daemons_watchers(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with DaemonThread(config):
        wait_for(lambda: (config.state_dir / "status.json").exists())
        proc = subprocess.run([sys.executable, "-m", "bgwatch", "status", "-c", str(config.source)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "daemon:   running" in proc.stdout
    assert f"watch:    {config.inboxes[0].path}  watching (inotify)" in proc.stdout
