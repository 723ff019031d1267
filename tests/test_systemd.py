"""The shipped systemd files, checked by systemd's own tools, and the exit codes the unit relies on.

Needs Debian's `systemd` package (systemd-analyze, systemd-sysusers, systemd-tmpfiles): installed here with
apt-get when running as root and missing; otherwise these tests are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "bgwatch.service"
SYSUSERS = ROOT / "systemd" / "bgwatch.sysusers.conf"
TMPFILES = ROOT / "systemd" / "bgwatch.tmpfiles.conf"
README = ROOT / "README.md"
EXPOSURE_LIMIT = 3.0


def _ensure_systemd_tools() -> None:
    if shutil.which("systemd-analyze"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("systemd-analyze is missing and this is not root with apt-get: `apt-get install systemd`")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if proc.returncode != 0 or not shutil.which("systemd-analyze"):
        pytest.skip(f"could not install Debian's systemd package: {proc.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def systemd_tools() -> None:
    _ensure_systemd_tools()


def bgwatch(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bgwatch", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def unit_lines() -> list[tuple[str, str]]:
    """(key, value) for every setting of the unit, in order (systemd allows a key more than once)."""
    pairs = []
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def values(key: str) -> list[str]:
    return [v for k, v in unit_lines() if k == key]


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart/ExecReload pointing at this checkout's bgwatch (verify checks that the
    binaries exist)."""
    script = tmp_path / "bin" / "bgwatch"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m bgwatch \"$@\"\n")
    script.chmod(0o755)
    unit = tmp_path / "bgwatch.service"
    unit.write_text(UNIT.read_text().replace("/opt/bgwatch/bin/bgwatch", str(script)))
    return unit


def test_unit_passes_systemd_analyze_verify(systemd_tools: None, tmp_path: Path) -> None:
    unit = unit_for_this_machine(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "bgwatch.service" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_unit_exposure_is_at_most_3(systemd_tools: None) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for bgwatch\.service: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    score = float(found.group(1))
    print(f"systemd-analyze security: exposure {score}")
    assert score <= EXPOSURE_LIMIT, proc.stdout
    # What the operator reads must be what systemd says: the unit's own comment and the README.
    [in_unit] = re.findall(r"rates this unit (\d+\.\d+)", UNIT.read_text())
    [in_readme] = re.findall(r"`systemd-analyze security bgwatch` rates it (\d+\.\d+)", README.read_text())
    assert float(in_unit) == score and float(in_readme) == score, (
        f"systemd-analyze says {score}; the unit's comment says {in_unit}, the README {in_readme}")


def test_unit_semantics() -> None:
    assert values("Type") == ["notify"]
    assert values("RestartPreventExitStatus") == ["2"], "a config error (exit 2) must not be restarted forever"
    assert values("Restart") == ["on-failure"]
    reload = values("ExecReload")
    assert len(reload) == 2 and " validate " in reload[0] and reload[1].endswith("kill -HUP $MAINPID"), (
        "reload validates the config first; a failing ExecReload line stops the signal and fails the reload")
    assert values("ProtectSystem") == ["strict"] and values("ReadWritePaths")
    assert values("ProtectHome") == ["yes"] and values("PrivateDevices") == ["no"]
    assert any("nvidia" in v for v in values("DeviceAllow")) and values("DevicePolicy") == ["closed"]
    assert values("CapabilityBoundingSet") == [""]
    assert "@system-service" in values("SystemCallFilter")
    assert not values("LogsDirectory"), "no LogsDirectory: logs go to the journal and state_dir/logs"
    assert values("StateDirectory") == ["bgwatch"]
    timeout = float(values("TimeoutStopSec")[0])
    assert timeout > 120, "the stop timeout must leave pipeline.stop_timeout (120 s) to drain"


def test_reload_command_refuses_a_broken_config(tmp_path: Path) -> None:
    """The unit's first ExecReload line, run for real: a broken config fails (so no SIGHUP is sent)."""
    command = values("ExecReload")[0].split()
    assert command[0] == "/opt/bgwatch/bin/bgwatch"
    config = tmp_path / "config.yaml"
    args = [a.replace("${BGWATCH_CONFIG}", str(config)) for a in command[1:]]
    config.write_text(f"state_dir: {tmp_path / 'state'}\ninboxes: [{{path: {tmp_path / 'in'}, outbox: "
                      f"{tmp_path / 'out'}}}]\n")
    good = bgwatch(*args)
    assert good.returncode == 0, good.stdout + good.stderr
    config.write_text("device: gpu\n")
    bad = bgwatch(*args)
    assert bad.returncode == 2 and "device" in bad.stdout and "gpu" in bad.stdout


def test_sysusers_and_tmpfiles_apply_into_a_root(systemd_tools: None, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to chown into a --root tree")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    users = subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSUSERS)], capture_output=True, text=True,
                           timeout=60)
    assert users.returncode == 0, users.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert passwd["bgwatch"][5] == "/var/lib/bgwatch", "the service user's home is its state folder"
    uid = int(passwd["bgwatch"][2])
    files = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(TMPFILES)], capture_output=True,
                           text=True, timeout=60)
    assert files.returncode == 0, files.stderr
    env = dict(v.split("=", 1) for v in values("Environment"))
    for folder in (env["U2NET_HOME"], env["HF_HOME"], env["NUMBA_CACHE_DIR"]):
        assert (root / folder.lstrip("/")).stat().st_uid == uid, folder
    # The unit's fallbacks are the folders `bgwatch init`'s models_dir names (models.use_model_locations).
    assert env["U2NET_HOME"] == "/var/lib/bgwatch/models/rembg"
    assert env["HF_HOME"] == "/var/lib/bgwatch/models/huggingface"
    assert env["NUMBA_CACHE_DIR"] == "/var/cache/bgwatch/numba"


def test_init_writes_a_service_ready_config(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "config.yaml"
    proc = bgwatch("init", str(target), "--inbox-root", str(tmp_path / "srv" / "inbox"))
    assert proc.returncode == 0, proc.stderr
    from bgwatch.config import load_config

    config = load_config(target, env={})
    state = "/var/lib/" + values("StateDirectory")[0]
    assert config.state_dir == Path(state), "state_dir is the unit's StateDirectory, not relative to /etc"
    assert all(ib.path.is_absolute() and ib.outbox.is_absolute() for ib in config.inboxes)
    assert all(str(ib.path).startswith(str(tmp_path / "srv" / "inbox")) for ib in config.inboxes)
    # models_dir: `sudo bgwatch doctor` / `models pull` use the service's weights, not root's home.
    env = dict(v.split("=", 1) for v in values("Environment"))
    assert config.models_dir == Path(state) / "models"
    assert Path(env["U2NET_HOME"]) == config.models_dir / "rembg"
    assert Path(env["HF_HOME"]) == config.models_dir / "huggingface"
    again = bgwatch("init", str(target))
    assert again.returncode == 2 and "--force" in again.stderr, "never overwrites a config silently"
    assert bgwatch("validate", str(target)).returncode == 0


def _config(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nhost: testhost\n"
                      "defaults: {mask: {engine: classical}}\n"
                      f"inboxes: [{{path: {tmp_path / 'in'}, outbox: {tmp_path / 'out'}}}]\n")
    return config


def test_run_exits_2_on_a_config_error_and_on_a_second_daemon(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("device: gpu\n")
    proc = bgwatch("run", "-c", str(broken))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr

    config = _config(tmp_path)
    from bgwatch.service import InstanceLock

    lock = InstanceLock(tmp_path / "state")  # another daemon holds this state folder
    try:
        proc = bgwatch("run", "-c", str(config))
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stderr
    assert "already running" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_daemon_under_a_notify_socket_stops_with_exit_0(tmp_path: Path) -> None:
    """READY=1, then SIGTERM -> STOPPING=1 and exit 0, even though a job failed during its life."""
    config = _config(tmp_path)
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")  # fails: the daemon carries on
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def read() -> None:  # like systemd, always reading: a full socket queue would block the sender
        while not done.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": address}
    proc = subprocess.Popen([sys.executable, "-m", "bgwatch", "run", "-c", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert condition(), f"{what}; notifications: {sorted(set(messages))}"

    try:
        wait_until(lambda: "READY=1" in messages, "READY=1 was sent")
        wait_until((tmp_path / "in" / "failed" / "empty.jpg").exists, "the empty file was processed and failed")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "STOPPING=1" in messages, "STOPPING=1 was sent")
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        done.set()
        reader.join()
        sock.close()
    assert proc.returncode == 0, err
