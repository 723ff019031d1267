"""Where results go: atomic writes into the outbox, output naming, and the inbox's done/ and failed/.

A reader on the share never sees half a file: bytes go to a dot-named temp file in the target folder,
are fsynced, then renamed over the final name. Names never clash across inputs: photo.jpg and photo.png
dropped together get photo.png and photo-2.png, and a reprocessed input replaces only its own output.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from bgwatch.claim import refuse_links
from bgwatch.errors import InputError

DONE_DIR = "done"
FAILED_DIR = "failed"
WORK_DIR = ".bgwatch"


TEMP_SUFFIX = ".bgwatch-tmp"


def atomic_write(path: Path, data: bytes, *, owner: str = "") -> None:
    """Write bytes to path so that readers see the old file or the whole new one, never a part.

    The temp file is a dot file named after its owner (this host), so that after a crash the owner can
    remove its own leftovers without touching another host's write in progress on a shared outbox."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{owner}." if owner else f".{path.name}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_own_temp_files(folder: Path, owner: str) -> int:
    """Delete the temp files a crashed run of this owner left under folder; returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.rglob(f".*.{owner}.*{TEMP_SUFFIX}"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some network filesystems refuse to open folders; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass  # fsync on a directory is unsupported on some filesystems; nothing more can be done
    finally:
        os.close(fd)


def free_name(folder: Path, name: str) -> Path:
    """`name` in folder, or `stem-2.ext`, `stem-3.ext`... if taken."""
    candidate = folder / name
    stem, ext = os.path.splitext(name)
    n = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = folder / f"{stem}-{n}{ext}"
        n += 1
    return candidate


class Outbox:
    """Chooses output names for one daemon, so that two inputs never write the same file."""

    def __init__(self, owner_of: Callable[[Path], str | None]) -> None:
        # owner_of(path) -> rel_path of the input whose finished run wrote that output, if known
        self._owner_of = owner_of
        self._lock = threading.Lock()
        self._reserved: dict[Path, str] = {}

    def reserve(self, outbox: Path, rel_path: str, suffix: str, extension: str) -> Path:
        """The output path for the input at rel_path (relative to its inbox), reserved until release()."""
        rel = PurePosixPath(rel_path)
        folder = outbox.joinpath(*rel.parent.parts)
        if folder.exists():
            refuse_links(outbox, folder)
        stem = rel.stem + suffix
        with self._lock:
            n = 1
            while True:
                name = f"{stem}{extension}" if n == 1 else f"{stem}-{n}{extension}"
                candidate = folder / name
                holder = self._reserved.get(candidate)
                if holder is None and candidate.exists():
                    holder = self._owner_of(candidate) or "?"
                if holder is None or holder == rel_path:
                    self._reserved[candidate] = rel_path
                    return candidate
                n += 1

    def release(self, path: Path) -> None:
        with self._lock:
            self._reserved.pop(path, None)


def work_root(inbox_root: Path) -> Path:
    return inbox_root / WORK_DIR


def park(inbox_root: Path, current: Path, rel_path: str, where: str) -> Path:
    """Move an original (or its sidecar) to <inbox>/<where>/<rel dir>/, never overwriting another."""
    rel = PurePosixPath(rel_path)
    folder = inbox_root.joinpath(where, *rel.parent.parts)
    folder.mkdir(parents=True, exist_ok=True)
    refuse_links(inbox_root, folder)
    target = free_name(folder, rel.name)
    os.replace(current, target)
    return target


def move_to_done(inbox_root: Path, current: Path, rel_path: str) -> Path:
    return park(inbox_root, current, rel_path, DONE_DIR)


def move_to_failed(inbox_root: Path, current: Path, rel_path: str, reason: str) -> Path:
    """The original goes to failed/ with NAME.error.txt beside it saying what went wrong."""
    target = park(inbox_root, current, rel_path, FAILED_DIR)
    write_error_note(target, reason)
    return target


def write_error_note(failed_file: Path, reason: str) -> Path:
    note = failed_file.with_name(failed_file.name + ".error.txt")
    text = (
        f"bgwatch could not process {failed_file.name}\n\n{reason.strip()}\n\n"
        "To try again: fix the cause, then move the file (and its sidecar) back into the inbox,\n"
        "or run `bgwatch retry --failed`.\n"
    )
    atomic_write(note, text.encode("utf-8"))
    return note


def sha256_file(path: Path) -> str:
    """The file's sha256; refuses links, pipes and devices (a FIFO would block the intake forever)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_source(path: Path) -> None:
    """Raise InputError if the claimed original vanished (a share went away, someone deleted it)."""
    if not path.exists():
        raise InputError(path, "the file vanished before it could be processed (share unmounted or deleted?)")
