"""Which file a name on the share is: the sha256 of its bytes, read through a descriptor that follows no
link, and whether two names are one file (a move by link + unlink cut between the two)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bgwatch.safefs import Folder


def same_file(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def same_file_at(a_dir: Folder, a: str, b_dir: Folder, b: str) -> bool:
    """Whether two names are one file (a move by link + unlink cut between the two). Inode numbers first;
    where a FUSE or SMB mount (noserverino) makes them up, two names of one file may differ there, so two
    regular files that both have several links, the same size and mtime and the same bytes count as one."""
    sa, sb = a_dir.lstat(a), b_dir.lstat(b)
    if same_file(sa, sb):
        return True
    if sa is None or sb is None or not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)):
        return False
    if sa.st_nlink < 2 or sb.st_nlink < 2 or (sa.st_size, sa.st_mtime_ns) != (sb.st_size, sb.st_mtime_ns):
        return False
    try:
        return sha256_at(a_dir, a) == sha256_at(b_dir, b)
    except OSError:
        return False


def sha256_at(folder: Folder, name: str, limit: int | None = None) -> str:
    """sha256 of a regular file; refuses links, pipes and devices (a FIFO would block forever), and files
    over `limit` bytes (EFBIG) where a name on the share is not trusted to be small."""
    digest = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder.fd)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a link, pipe or device)", str(folder.path / name))
        if limit is not None and st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(folder.path / name))
        seen = 0
        for block in iter(lambda: handle.read(1 << 20), b""):
            seen += len(block)
            if limit is not None and seen > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(folder.path / name))
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of the regular file at `path` (its last component is never followed)."""
    from bgwatch.safefs import Folder

    with Folder.open_root(path.parent) as folder:
        return sha256_at(folder, path.name)
