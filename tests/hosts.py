"""Workstations for the multi-host fault suite: real `bgwatch run` processes, each with its own local state
folder and config, each reaching the share through its own bind mount, and the faults done to them.

    cluster = Cluster(tmp_path, hosts=3)     # share/ + h1/ h2/ h3/, each with mnt/ state/ config.yaml
    cluster.start()
    cluster.share.drop_images(20)
    cluster.hosts[1].kill(); cluster.hosts[1].start()
    report = cluster.finish("SIGKILL", rounds=1)   # SIGTERM all, wait, check the share and databases
    cluster.close()                                 # always: kill what is left, unmount
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from share import Report, Share, StoreRun, check_share, listing, move_aside

LEASE_SECONDS = 3.0
STOP_TIMEOUT = 10.0  # pipeline.stop_timeout: the bound on a SIGTERM drain
# Environment variables that would change what the daemons do behind the config's back.
_SCRUBBED_ENV = ("BG_ENGINE", "DEVICE", "MODEL_ID", "OUTPUT_DIR", "BG_REQS_PER_MIN", "ALLOW_4K", "DEBUG",
                 "BGWATCH_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC")
FAULTD = Path(__file__).resolve().parent / "faultd.py"  # the daemon with crash points (the tests' seam)


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.25,
               between: Callable[[], None] | None = None) -> bool:
    """Poll `condition` until true or the deadline; the deadline only decides when to stop waiting."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        if between is not None:
            between()
        time.sleep(interval)


class Host:
    """One workstation: a local folder with mnt/ (its bind mount of the share), state/ and config.yaml."""

    def __init__(self, share: Share, root: Path, name: str, violations: list[str]) -> None:
        self.share = share
        self.name = name
        self.root = root
        self.mnt = root / "mnt"
        self.state_dir = root / "state"
        self.config_path = root / "config.yaml"
        self.violations = violations  # shared with the cluster: what the harness saw go wrong
        self.proc: subprocess.Popen[bytes] | None = None
        self.expect_exit = False  # set while a fault (or a failpoint) is meant to end the process
        self.starts = 0
        self.kills = 0
        self._remounts = 0
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(exist_ok=True)

    def __repr__(self) -> str:
        return f"Host({self.name})"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "bgwatch.db"  # config.Config.db_path

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def write_config(self, *, on_success: str = "move", rules: Mapping[str, Any] | None = None,
                     watch: Mapping[str, Any] | None = None, pipeline: Mapping[str, Any] | None = None) -> None:
        pipe: dict[str, Any] = {"stop_timeout": STOP_TIMEOUT, **(pipeline or {})}
        data: dict[str, Any] = {
            "host": self.name,
            "state_dir": str(self.state_dir),
            "device": "cpu",
            "watch": {"settle_seconds": 0.3, "rescan_seconds": 2, "lease_seconds": LEASE_SECONDS, **(watch or {})},
            "pipeline": pipe,
            "defaults": {"mask": {"engine": "classical"}},
            "inboxes": [{
                "path": str(self.mnt / "inbox"),
                "outbox": str(self.mnt / "outbox"),
                "poll": True,
                "on_success": on_success,
                "rules": dict(rules or {"operation": "cleanup", "mode": "color", "background_color": "#ffffff"}),
            }],
        }
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))

    # ------------------------------------------------------------------ the process

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "bgwatch", "run", "-c", str(self.config_path), *extra]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def start(self, env: Mapping[str, str] | None = None, *, crash_at: str = "", stop_at: str = "",
              expect_exit: bool = False) -> None:
        """Start the daemon (again: same host name, same state folder). `crash_at` (STEP[:N]) starts it through
        tests/faultd.py, which kills it at that delivery step; with `expect_exit` its ending is not reported."""
        assert not self.alive, f"{self.name} is already running"
        self.starts += 1
        self.expect_exit = expect_exit
        command = ([sys.executable, str(FAULTD), str(self.config_path), "--crash-at", crash_at] if crash_at
                   else [sys.executable, str(FAULTD), str(self.config_path), "--stop-at", stop_at] if stop_at
                   else self.command())
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts} crash_at={crash_at} env={dict(env or {})} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                         env=self.env(env), start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Until this start's daemon says it is watching (systemd's READY), or it ended; False on timeout."""
        deadline = time.monotonic() + timeout
        marker = f"=== start {self.starts} "
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "bgwatch watching" in text[text.rfind(marker):] or not self.alive:
                return True
            time.sleep(0.1)
        return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited_unexpectedly(self) -> int | None:
        """The exit code of a daemon that ended without the harness asking (None: running or expected)."""
        if self.proc is None or self.expect_exit:
            return None
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            self.expect_exit = True
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    @property
    def stopped(self) -> bool:
        """Whether the process is stopped (SIGSTOP, state T in /proc)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return Path(f"/proc/{self.proc.pid}/stat").read_text().split(") ", 1)[1][:1] in ("T", "t")
        except (OSError, IndexError):
            return False

    def suspend(self) -> None:
        """SIGSTOP: a laptop lid, a paused VM, a hung network call."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.expect_exit = True
            self.proc.send_signal(signal.SIGCONT)  # a stopped process would not see the TERM
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float) -> bool:
        """After terminate(): True if it exited in time; otherwise it is killed and False returned."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            return False
        return True

    def stop(self, timeout: float = STOP_TIMEOUT + 15) -> bool:
        """SIGTERM and wait for the drain; False (and a SIGKILL) if it did not exit within `timeout`."""
        self.terminate()
        return self.wait_stopped(timeout)

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the daemon to end by itself (a failpoint); its exit code, None if still running."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            return None

    def run_once(self, timeout: float) -> int | None:
        """`bgwatch run --once --no-progress`; its exit code, or None if it did not exit within `timeout`."""
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(b"\n=== run --once ===\n")
            log.flush()
            proc = subprocess.Popen(self.command("--once", "--no-progress"), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.root, env=self.env(), start_new_session=True)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ faults on its surroundings

    def hold_db_lock(self, seconds: float) -> threading.Event:
        """Hold this host's database with BEGIN EXCLUSIVE for `seconds`, from a thread (returned event is
        set once the lock is held; a violation is recorded if it could never be taken)."""
        held = threading.Event()

        def hold() -> None:
            try:
                conn = sqlite3.connect(str(self.db_path), timeout=30, isolation_level=None)
                try:
                    conn.execute("BEGIN EXCLUSIVE")
                    held.set()
                    time.sleep(seconds)
                    conn.execute("ROLLBACK")
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                self.violations.append(f"harness: could not lock {self.name}'s database: {exc}")

        threading.Thread(target=hold, name=f"lock-{self.name}", daemon=True).start()
        return held

    def mount(self) -> None:
        self.share.mount(self.mnt)

    def unmount(self) -> None:
        if not self.share.unmount(self.mnt):
            self.violations.append(f"harness: could not unmount {self.mnt}")

    def remount(self) -> None:
        """Mount the share again. Whatever the daemon created in the empty mount point meanwhile is a
        violation (a real share could not be mounted over it); it is moved aside so the mount succeeds."""
        self._remounts += 1
        strays = listing(self.mnt)
        if strays:
            aside = self.root / f"strays-{self._remounts}"
            self.violations.append(f"{self.name}: wrote into its empty mount point while the share was away "
                                   f"(moved to {aside.name}/): {', '.join(strays[:12])}")
            move_aside(self.mnt, aside)
        self.mount()


class Cluster:
    """A share and its hosts. Use as a context manager, or call close() in a finally."""

    def __init__(self, root: Path, hosts: int = 3, *, on_success: str = "move",
                 rules: Mapping[str, Any] | None = None, watch: Mapping[str, Any] | None = None,
                 pipeline: Mapping[str, Any] | None = None, fs: str = "bindfs") -> None:
        self.root = root
        self.share = Share(root, fs)
        self.on_success = on_success
        self.violations: list[str] = []
        self.notes: list[str] = []
        # The runs of a studio store the hosts share (tests/test_multihost_studio.py), checked with their own
        self.store_runs: Callable[[], list[StoreRun]] | None = None
        self.hosts = [Host(self.share, root / f"h{i}", f"h{i}", self.violations) for i in range(1, hosts + 1)]
        try:
            for host in self.hosts:
                host.write_config(on_success=on_success, rules=rules, watch=watch, pipeline=pipeline)
                host.mount()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        for host in self.hosts:
            if not host.alive:
                host.start()

    def supervise(self) -> None:
        """A daemon that died without being asked is a violation (with its log's last lines); it is
        started again so the scenario can go on."""
        for host in self.hosts:
            code = host.exited_unexpectedly()
            if code is not None:
                self.violations.append(f"{host.name} exited by itself (code {code}); log:\n{host.log_tail()}")
                host.start()

    def wait_finished(self, timeout: float = 90.0) -> bool:
        """Until every dropped image is parked (move) or has its output (keep); notes what is missing."""
        keep = self.on_success == "keep"
        done = wait_until(self.share.all_output if keep else self.share.all_parked, timeout,
                          between=self.supervise)
        if not done:
            parked = self.share.parked()
            missing = [d.name for d in self.share.images if not parked.get(d.sha256)]
            self.notes.append(f"not finished within {timeout:g} s: {len(missing)} image(s) not parked "
                              f"({', '.join(missing[:8])}), {len(self.share.inbox_images())} in the inbox, "
                              f"{len(self.share.claimed_files())} claimed")
        return done

    def stop(self) -> None:
        """SIGTERM every daemon at once, then wait for each drain."""
        live = [h for h in self.hosts if h.alive]
        for host in live:  # as systemctl stop after a start: the daemon is up (Type=notify READY) first
            if not host.wait_ready():
                self.violations.append(f"{host.name} did not get ready within 30 s; log:\n{host.log_tail()}")
        for host in live:
            host.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT + 15
        for host in live:
            if not host.wait_stopped(deadline - time.monotonic()):
                self.violations.append(f"{host.name} did not exit within {STOP_TIMEOUT + 15:g} s of SIGTERM "
                                       f"(killed); log:\n{host.log_tail()}")

    def finish(self, fault: str, rounds: int, *, suffix: str = "") -> Report:
        """Stop every daemon, then check the share and all databases; harness violations come first."""
        self.stop()
        for host in self.hosts:
            if not os.path.ismount(host.mnt):
                self.violations.append(f"{host.name}: its share is not mounted at the end")
        report = check_share(self.share, [h.db_path for h in self.hosts], fault=fault, rounds=rounds,
                             keep=self.on_success == "keep", suffix=suffix,
                             store_runs=self.store_runs() if self.store_runs is not None else ())
        report.violations[:0] = self.violations
        report.notes[:0] = self.notes
        return report

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.kill()
        self.share.close()
