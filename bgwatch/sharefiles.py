"""Opening a file that anyone on the share may have replaced: never through a link.

A claimed image, a backdrop named by a sidecar, a thumbnail of a file in done/, failed/ or an outbox: each
is opened from a trusted root (a folder the operator configured: links in *its* path are the operator's)
one name at a time, every folder below it and the file itself with O_NOFOLLOW, so a link swapped in
anywhere below the root is refused (`RefusedFile`), never followed. Only a regular file is handed back;
a FIFO is opened non-blocking and refused, so it cannot hang a worker.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

# O_PATH: a folder a daemon may search but not list (mode 711) can still be walked through.
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class RefusedFile(OSError):
    """A link, or something other than a regular file, where a user's file was expected."""

    def __init__(self, what: str, where: str) -> None:
        super().__init__(errno.ELOOP, what, where)
        self.what = what  # e.g. "the folder 'sub' is a symbolic link"


def open_below(root: Path, rel: str | PurePosixPath | Sequence[str]) -> int:
    """A read-only descriptor of the regular file `rel` below the folder `root`, no link followed below
    `root`. RefusedFile: a link or not a regular file on the way; FileNotFoundError: it is not there.
    The caller closes the descriptor."""
    parts = tuple(PurePosixPath(rel).parts) if isinstance(rel, str | PurePosixPath) else tuple(rel)
    if not parts or any(p in ("", ".", "..") or "/" in p for p in parts):
        raise ValueError(f"{'/'.join(parts)!r} is not a path below a folder")
    here = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            below = _step(here, name, _DIR_FLAGS, stat.S_ISDIR, "folder", parts)
            os.close(here)
            here = below
        return _step(here, parts[-1], _FILE_FLAGS, stat.S_ISREG, "file", parts)
    finally:
        os.close(here)


def open_no_links(path: Path) -> int:
    """A descriptor of the regular file at the absolute `path`, with no link anywhere in it: for a path
    resolved with realpath when it was checked, so a link put in its way since is refused."""
    return open_below(Path("/"), Path(os.path.abspath(path)).parts[1:])


def open_under(path: Path, roots: Iterable[Path]) -> int:
    """A descriptor of the file at `path`, no link followed below the deepest of `roots` holding it (or
    below / when none does)."""
    path = Path(os.path.abspath(path))
    holders = [Path(os.path.abspath(r)) for r in roots if path.is_relative_to(os.path.abspath(r))]
    root = max(holders, key=lambda r: len(r.parts), default=Path("/"))
    if root == path:
        raise RefusedFile("a configured folder, not a file", str(path))
    return open_below(root, path.relative_to(root).parts)


def snapshot(fd: int) -> tuple[int, str]:
    """A private copy of an open file's bytes, read once from its start, and their sha256: a descriptor of
    an anonymous in-memory file nobody else can write. A writer that held the file open from before its
    claim (a rename does not take a descriptor away) could otherwise change it between the check and the
    decode: what is checked is what is decoded. The caller closes the copy."""
    copy = os.memfd_create("bgwatch-input", os.MFD_CLOEXEC)
    try:
        digest = hashlib.sha256()
        os.lseek(fd, 0, os.SEEK_SET)
        while block := os.read(fd, 1 << 20):
            digest.update(block)
            view = memoryview(block)
            while view:
                view = view[os.write(copy, view):]
        os.lseek(copy, 0, os.SEEK_SET)
    except BaseException:
        os.close(copy)
        raise
    return copy, digest.hexdigest()


def _step(here: int, name: str, flags: int, kind: Callable[[int], bool], label: str, parts: tuple[str, ...]) -> int:
    """Open `name` in the folder `here`; it must be a `label` of the right kind."""
    where = "/".join(parts)
    try:
        fd = os.open(name, flags, dir_fd=here)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise RefusedFile(_what(here, name, label, parts), where) from None
        raise
    mode = os.fstat(fd).st_mode
    if not kind(mode):
        os.close(fd)
        raise RefusedFile(_what(None, name, label, parts, mode), where)
    return fd


def _what(folder: int | None, name: str, label: str, parts: tuple[str, ...], mode: int | None = None) -> str:
    from bgwatch.text import shown

    if mode is None and folder is not None:
        try:
            mode = os.lstat(name, dir_fd=folder).st_mode
        except OSError:
            mode = None
    whose = f"the folder {shown(name)!r}" if label == "folder" and len(parts) > 1 else "the file"
    if mode is not None and stat.S_ISLNK(mode):
        return f"{whose} is a symbolic link (bgwatch never reads through a link)"
    if label == "folder":
        return f"{whose} is not a folder"
    return "not a regular file (a folder, pipe, device or link); bgwatch reads only files"
