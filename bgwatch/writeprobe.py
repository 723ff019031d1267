"""Whether a folder can really be written (ACLs and read-only mounts fool access()): a file is created there
and removed at once. A probe left by a process killed between the two is removed by a later probe: a host's
own under its fixed name at once, any other once it is old.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

PROBE_PREFIX = ".bgwatch-doctor-"
STALE_PROBE_SECONDS = 600  # a probe lives for microseconds; one this old was left by a process killed meanwhile


def probe_write(folder: Path, host: str = "") -> str | None:
    """None if a file can be created in folder (really created: ACLs and read-only mounts fool access()).
    With `host`, the probe has this host's fixed name: one left by a start killed between creating and
    removing it is removed by this host's next probe; older probes of any name are removed too."""
    try:
        fd, name = _create_probe(folder, host)
    except OSError as exc:
        return exc.strerror or str(exc)
    made = os.fstat(fd).st_mtime  # the folder's own clock (a share's server may differ from this host's)
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
    _drop_stale_probes(folder, made)
    return None


def _create_probe(folder: Path, host: str) -> tuple[int, str]:
    if host:
        path = folder / f"{PROBE_PREFIX}{host}"
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:  # this host's own, left by a killed start
                path.unlink()
        # Taken: this host's other process probing at this moment (or a file not ours): a name of its own.
        with contextlib.suppress(FileExistsError):
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), str(path)
    return tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)


def _drop_stale_probes(folder: Path, now: float) -> None:
    """Remove the empty write probes in `folder` older than STALE_PROBE_SECONDS at `now` (by the folder's
    own clock: when the probe just made there was written). Only regular empty files named as probes."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(PROBE_PREFIX) or not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_size == 0 and now - st.st_mtime > STALE_PROBE_SECONDS:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
    except OSError:
        return  # a folder that cannot be listed: its probe said what matters
