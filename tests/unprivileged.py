"""Acting as another user of the share: a short Python snippet run as `nobody` (a real setuid in a child
process), against folders that user can reach. The tests run as root here; elsewhere they are skipped
with the reason, since only root can become another user."""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def nobody() -> tuple[int, int]:
    if os.geteuid() != 0:
        pytest.skip("acting as another share user needs root (os.setuid); run the suite as root to include it")
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine to act as another share user")
    return entry.pw_uid, entry.pw_gid


def _python_for_anyone() -> str:
    """A Python interpreter another user may run (this venv may sit in root's private home)."""
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        resolved = Path(candidate).resolve() if candidate else None
        if resolved is not None and all(os.stat(p).st_mode & 0o001 for p in (*resolved.parents, resolved)):
            return str(candidate)
    pytest.skip("no Python interpreter that the user 'nobody' may run")


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` (Python, standard library only; its arguments in sys.argv[1:]) as the unprivileged user
    `nobody`."""
    uid, gid = nobody()
    return subprocess.run([_python_for_anyone(), "-I", "-S", "-c", code, *args], user=uid, group=gid,
                          extra_groups=[], capture_output=True, text=True, timeout=60, cwd="/")


@contextmanager
def shared_root() -> Iterator[Path]:
    """A folder every user can reach (pytest's tmp_path is private to root), removed afterwards."""
    nobody()
    root = Path(tempfile.mkdtemp(prefix="bgwatch-share-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def open_to_all(*folders: Path) -> None:
    """Make folders writable by every share user, as a share mounted for a team is."""
    for folder in folders:
        folder.chmod(0o777)


PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def without_file_rights() -> None:
    """A `preexec_fn`: the child (root here) loses root's override of file permissions before it runs its
    program (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH leave its bounding set, so the program starts without
    them), and so opens files as its uid may, like an unprivileged service user: for a bgwatch daemon, whose
    interpreter and venv `nobody` may not reach."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
