"""Mounts: which filesystem holds a path, and which shares the administrator declared (/etc/fstab).

Read from /proc/self/mountinfo and /etc/fstab as text, so tests hand in their own. A network or FUSE
filesystem is "remote": inotify does not see other hosts' writes there, and SQLite's WAL does not work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Filesystems where inotify does not see other hosts' writes (network) or may see nothing at all (FUSE).
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
                        "gpfs", "ocfs2", "davfs", "ncpfs", "beegfs", "virtiofs"})


@dataclass(frozen=True, slots=True)
class Mount:
    point: Path
    fstype: str
    source: str


def _unescape(text: str) -> str:
    # /proc/self/mountinfo and fstab write space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of /proc/self/mountinfo (`man 5 proc`): fields up to ' - ', then type and source."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(Path(_unescape(fields[4])), tail[0], _unescape(tail[1])))
    return mounts


def parse_fstab(text: str) -> list[Mount]:
    """Mounts the administrator declared (/etc/fstab): a declared one that is not mounted is a share gone."""
    mounts = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 3 and parts[1].startswith("/"):
            mounts.append(Mount(Path(_unescape(parts[1])), parts[2], _unescape(parts[0])))
    return mounts


def read_text(path: str) -> str:
    """The file's text, or "" where it cannot be read (no /etc/fstab in a container)."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def mount_of(path: Path, mounts: Sequence[Mount]) -> Mount | None:
    """The mount holding `path` (the last, innermost one listed: later mounts hide earlier ones)."""
    best: Mount | None = None
    for mount in mounts:
        if (mount.point == path or mount.point in path.parents) and (
            best is None or len(mount.point.parts) >= len(best.point.parts)
        ):
            best = mount
    return best


def is_remote(fstype: str) -> bool:
    base = fstype.split(".", 1)[0]
    return fstype in NETWORK_FS or base in NETWORK_FS or base in ("fuse", "fuseblk")
