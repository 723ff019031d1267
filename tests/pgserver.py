"""A throwaway PostgreSQL cluster for the tests: initdb and pg_ctl on a Unix socket in a temporary folder,
one per test session (however many modules use it), gone when the session ends.

PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user (a real setuid in
the child processes) and the folder is handed to it. Debian's `postgresql` is installed when the server is
missing and we are root (apt, a package registry); otherwise the tests that need it are skipped with the
reason. Each test gets an empty database of its own (a CREATE DATABASE: fast).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PORT = 5432  # on a private socket folder: no clash with any other server
_names = itertools.count(1)


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _install() -> str:
    """Install Debian's server when we may; '' on success, else why not."""
    if os.geteuid() != 0:
        return "PostgreSQL is not installed (apt-get install postgresql) and only root may install it"
    if shutil.which("apt-get") is None:
        return "PostgreSQL is not installed and this machine has no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"installing PostgreSQL failed: {' '.join(cmd)}: {done.stderr.strip()[-300:]}"
    return ""


@dataclass
class Cluster:
    bin_dir: Path
    root: Path
    user: str | None  # the OS user the server runs as (None: ourselves)
    options: str = ""

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def url(self, database: str = "postgres", password: str = "") -> str:
        secret = f":{password}" if password else ""
        return f"postgresql://bgwatch{secret}@/{database}?host={self.socket_dir}&port={PORT}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120, user=self.user, cwd=self.root)

    def start(self) -> None:
        data = self.root / "data"
        init = self._run("initdb", "-D", str(data), "-U", "bgwatch", "-A", "trust", "--no-sync", "-E", "UTF8",
                         "--locale=C")
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-500:]}")
        self.options = (f"-k {self.socket_dir} -p {PORT} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
        started = self._run("pg_ctl", "-D", str(data), "-l", str(self.root / "server.log"), "-o", self.options, "-w",
                            "start")
        if started.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()} {log}")

    def away_for(self, seconds: float) -> threading.Thread:
        """Stop the server now (every connection cut, every new one refused) and start it again after
        `seconds`, from a thread; join it before the test ends so the next test has a server."""
        self.stop("fast")

        def back() -> None:
            time.sleep(seconds)  # the outage's length is the point here, not a condition to poll
            self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-o",
                      self.options, "-w", "start")

        thread = threading.Thread(target=back, name="pg-back")
        thread.start()
        return thread

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Every connection is cut and the server comes back (a studio's database restarting)."""
        # -l again: without it the new server writes to our pipe and run() waits for it forever.
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-o", self.options,
                  "-m", "fast", "-w", "restart")

    def new_database(self) -> str:
        """An empty database of its own, and its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)


def start_cluster() -> tuple[Cluster | None, str]:
    """A started cluster, or None and why not."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[studio]')"
    bin_dir = _bin_dir()
    if bin_dir is None:
        why = _install()
        bin_dir = _bin_dir()
        if bin_dir is None:
            return None, why or "PostgreSQL's initdb was not found under /usr/lib/postgresql"
    user: str | None = None
    root = Path(tempfile.mkdtemp(prefix="bgpg-"))
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            return None, "running as root and there is no `postgres` user to run the server as"
        user = entry.pw_name
        os.chown(root, entry.pw_uid, entry.pw_gid)
    (root / "sock").mkdir()
    if user is not None:
        os.chown(root / "sock", pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    cluster = Cluster(bin_dir, root, user)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        return None, f"cannot start a throwaway PostgreSQL: {exc}"
    return cluster, ""


_session: tuple[Cluster | None, str] | None = None


def _discard(cluster: Cluster) -> None:
    cluster.stop("immediate")
    shutil.rmtree(cluster.root, ignore_errors=True)


def session_cluster() -> tuple[Cluster | None, str]:
    """One cluster for the whole test session, whichever module asks first (each module that imports the
    fixture gets its own copy of it, so the cluster itself is kept here); gone when the process exits."""
    global _session
    if _session is None:
        _session = start_cluster()
        if _session[0] is not None:
            atexit.register(_discard, _session[0])
    return _session


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    cluster, why = session_cluster()
    if cluster is None:
        print(f"\nPostgreSQL tests skipped: {why}")
        pytest.skip(why)
    yield cluster


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    """The URL of an empty database for this test."""
    return pg_cluster.new_database()
