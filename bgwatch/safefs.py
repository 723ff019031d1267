"""Filesystem primitives that never follow a link out of a folder and never replace a file.

Everything here works on folder descriptors (`openat`-style): a folder is opened once with
O_DIRECTORY | O_NOFOLLOW, and names are resolved relative to it. A symlink planted in place of one of
bgwatch's work folders, or of a folder in an inbox, is therefore refused (`UnsafeFolder`) instead of being
followed to wherever it points.

Moves never replace: `move_noreplace` uses `renameat2(RENAME_NOREPLACE)` where the filesystem supports it,
else a hard link then an unlink (both fail with EEXIST atomically), and where neither works (some SMB
mounts) the caller's name is made unique by construction (`unique_tag`) instead of checked and then
renamed. The strategy is probed per filesystem (st_dev) and remembered.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from bgwatch import fileid

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NAME_MAX = 255  # bytes, on every filesystem bgwatch supports


class UnsafeFolder(OSError):
    """A folder bgwatch works in is a symbolic link, or not a folder: it is never followed or written."""


class NoReplaceUnsupported(OSError):
    """This filesystem can neither rename without replacing nor hard-link: only unique names are safe."""


class FolderMissing(FileNotFoundError):
    """A folder is not there (an unmounted share, a deleted inbox); nothing is created in its place."""


class FolderRemoved(FileNotFoundError):
    """The folder a file was being moved into was removed while it was open (an empty work folder pruned
    by another thread in between): nothing moved; open the folder again and move once more."""


def _reservation(tag: str) -> bytes:
    return f"bgwatch: this name is reserved for a file on its way ({tag})\n".encode("utf-8", "surrogateescape")


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already uses
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return,unused-ignore]  # ctypes function pointers are untyped (Python < 3.11)


_renameat2 = _load_renameat2()
_RENAME_NOREPLACE = 1
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}

RENAMEAT2 = "renameat2"
LINK = "link"
UNIQUE = "unique"
_strategy: dict[int, str] = {}  # st_dev -> how to move without replacing there
_strategy_lock = threading.Lock()


# ------------------------------------------------------------------ folders


class Folder:
    """An open folder. `path` is for messages only: every operation goes through the descriptor."""

    __slots__ = ("_closed", "fd", "path")

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        self._closed = False

    @classmethod
    def open_root(cls, path: Path) -> Folder:
        """Open a configured folder (the operator's path: links in it are theirs). Never creates it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FolderMissing(errno.ENOENT, "folder missing (share not mounted?)", str(path)) from None
        except NotADirectoryError:
            raise UnsafeFolder(errno.ENOTDIR, "not a folder", str(path)) from None
        return cls(fd, Path(path))

    def sub(self, *names: str, create: bool = False) -> Folder:
        """The folder `names` below this one, each a real folder (not a link); made if `create`."""
        here = self
        opened: list[Folder] = []
        try:
            for name in names:
                here = here._child(name, create)
                opened.append(here)
        except BaseException:
            for folder in opened:
                folder.close()
            raise
        for folder in opened[:-1]:
            folder.close()
        return here if opened else Folder(os.dup(self.fd), self.path)

    def _child(self, name: str, create: bool) -> Folder:
        _check_name(name)
        path = self.path / name
        for _ in range(2):
            try:
                return Folder(os.open(name, _DIR_FLAGS, dir_fd=self.fd), path)
            except FileNotFoundError:
                if not create:
                    raise FolderMissing(errno.ENOENT, "folder missing", str(path)) from None
                try:
                    os.mkdir(name, 0o775, dir_fd=self.fd)
                except FileExistsError:
                    pass
                except PermissionError as exc:
                    raise _no_access(exc, self.path) from None
            except PermissionError as exc:  # another user's folder (a `mkdir -m 700`), or a mode that keeps us out
                raise _no_access(exc, path) from None
            except (NotADirectoryError, OSError) as exc:
                if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:
                    raise UnsafeFolder(errno.ELOOP, "is a symbolic link or not a folder; bgwatch will not "
                                       "use it (remove or rename it)", str(path)) from None
                raise
        raise FolderMissing(errno.ENOENT, "folder vanished while it was being made", str(path))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def entries(self) -> list[tuple[str, os.stat_result]]:
        """(name, lstat) of each entry, names as the filesystem holds them (surrogate-escaped if not UTF-8)."""
        found: list[tuple[str, os.stat_result]] = []
        with os.scandir(self.fd) as it:
            for entry in it:
                try:
                    found.append((entry.name, entry.stat(follow_symlinks=False)))
                except OSError:
                    continue
        return sorted(found)

    def files(self, prefix: tuple[str, ...] = (), *, any_kind: bool = False
              ) -> Iterator[tuple[tuple[str, ...], os.stat_result]]:
        """Regular files below this folder, as name paths; links, pipes and linked folders are skipped
        (listed too, but never followed, with `any_kind`)."""
        for name, st in self.entries():
            if stat.S_ISREG(st.st_mode) or (any_kind and not stat.S_ISDIR(st.st_mode)):
                yield (*prefix, name), st
            elif stat.S_ISDIR(st.st_mode):
                try:
                    child = self._child(name, create=False)
                except OSError:
                    continue
                with child:
                    yield from child.files((*prefix, name), any_kind=any_kind)

    def prune(self, *names: str) -> None:
        """Remove the empty folders `names` (innermost first) below this one; non-empty ones stay."""
        for depth in range(len(names), 0, -1):
            *parents, last = names[:depth]
            try:
                with self.sub(*parents) as parent:
                    os.rmdir(last, dir_fd=parent.fd)
            except OSError:
                return

    def prune_tree(self) -> None:
        """Remove every empty folder below this one (innermost first); links are never followed."""
        for name, st in self.entries():
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                with self._child(name, create=False) as child:
                    child.prune_tree()
                os.rmdir(name, dir_fd=self.fd)
            except OSError:
                continue

    def open_exclusive(self, name: str) -> int | None:
        """A write descriptor of a new empty file `name`, made only if no entry has that name (O_EXCL, honoured
        by SMB and NFSv3+, never through a link); None if the name exists. The caller closes it."""
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                           dir_fd=self.fd)
        except FileExistsError:
            return None

    def reserve(self, name: str, tag: str) -> bool:
        """Reserve `name` where neither no-replace renames nor hard links exist: a small file made only if no
        entry has that name (O_EXCL, honoured by SMB and NFSv3+), holding `tag`, so that the move a kill cut
        between reserving and renaming can tell, when it is made again, that the name is its own
        (`holds_reservation`). False if the name exists."""
        fd = self.open_exclusive(name)
        if fd is None:
            return False
        try:
            # The tag is what lets a move made again find its own reservation; a write that fails (a full
            # share) leaves an empty reservation, still this move's alone to rename over now.
            with contextlib.suppress(OSError):
                os.write(fd, _reservation(tag))
        finally:
            os.close(fd)
        return True

    def holds_reservation(self, name: str, tag: str) -> bool:
        """Whether `name` is a reservation made with `tag` (a regular file with exactly its bytes)."""
        want = _reservation(tag)
        st = self.lstat(name)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != len(want):
            return False
        try:
            return self.read_bytes(name, len(want)) == want
        except OSError:
            return False

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def read_bytes(self, name: str, limit: int = 1 << 20) -> bytes:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(self.path / name))
            return handle.read(limit)

    def write_temp(self, name: str, data: bytes, *, owner: str = "", sync: bool = True) -> str:
        """Write `data` under a fresh temp name for `name` and fsync it (`sync`); returns the temp name
        (removed again if the write fails). The caller renames it into place."""
        tmp = temp_name(name, owner)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=self.fd)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if sync:
                    os.fsync(handle.fileno())
        except BaseException:
            self.unlink(tmp)
            raise
        return tmp

    def write_atomic(self, name: str, data: bytes, *, owner: str = "", sync: bool = True) -> None:
        """Readers see the old file or the whole new one: temp name, fsync, rename over `name`. `sync`
        False: not made durable (a file that means nothing once this process is gone, such as its status)."""
        tmp = self.write_temp(name, data, owner=owner, sync=sync)
        try:
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(tmp)
            raise
        if sync:
            self.fsync()

    def fsync(self) -> None:
        with contextlib.suppress(OSError):  # unsupported on some network filesystems; the rename stands
            os.fsync(self.fd)


def _no_access(exc: PermissionError, folder: Path) -> PermissionError:
    """A folder this user may not open or write (another user's `mkdir -m 700`, or its mode): the error names
    the folder and the fix."""
    return PermissionError(exc.errno, f"{exc.strerror}: bgwatch's user (uid {os.geteuid()}) may not open or write "
                           "this folder; give it read, write and search rights there (on a share: every host's "
                           "bgwatch user)", str(folder))


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a single file or folder name")


TEMP_SUFFIX = ".bgw-tmp"


def temp_name(name: str, owner: str = "") -> str:
    """A short dot name for a file being written: it never exceeds NAME_MAX whatever `name` is, and its
    owner (this host) can find and remove its own leftovers after a crash."""
    digest = hashlib.sha256(os.fsencode(name) + os.urandom(8)).hexdigest()[:12]
    return f".{owner}.{digest}{TEMP_SUFFIX}" if owner else f".{digest}{TEMP_SUFFIX}"


def is_own_temp(name: str, owner: str) -> bool:
    return name.startswith(f".{owner}.") and name.endswith(TEMP_SUFFIX)


# ------------------------------------------------------------------ names


def numbered(name: str, n: int) -> str:
    """The one naming scheme for clashes: `photo.jpg`, `photo-2.jpg`, `photo-3.jpg`... kept under NAME_MAX."""
    stem, ext = _split(name)
    tail = "" if n <= 1 else f"-{n}"
    return fit_name(stem, f"{tail}{ext}")


def fit_name(stem: str, tail: str) -> str:
    """stem + tail, the stem shortened (never inside a UTF-8 character) so the name fits NAME_MAX bytes."""
    room = max(NAME_MAX - len(os.fsencode(tail)), 1)
    encoded = os.fsencode(stem)
    if len(encoded) <= room:
        return stem + tail
    cut = encoded[:room]
    while len(cut) > 1 and (cut[-1] & 0xC0) == 0x80:  # continuation bytes of a character cut in two
        cut = cut[:-1]
    if len(cut) > 1 and cut[-1] >= 0xC0:  # its lead byte
        cut = cut[:-1]
    return os.fsdecode(cut) + tail


def _split(name: str) -> tuple[str, str]:
    stem, ext = os.path.splitext(name)
    return (stem, ext) if stem else (name, "")


# ------------------------------------------------------------------ moves


def _strategy_for(folder: Folder) -> str:
    dev = os.fstat(folder.fd).st_dev
    with _strategy_lock:
        return _strategy.get(dev, RENAMEAT2 if _renameat2 is not None else LINK)


def _demote(folder: Folder, to: str) -> None:
    dev = os.fstat(folder.fd).st_dev
    with _strategy_lock:
        _strategy[dev] = to


def move_noreplace(src: Folder, src_name: str, dst: Folder, dst_name: str, *, unique: bool = False) -> None:
    """Move src/src_name to dst/dst_name. FileExistsError if the target exists (nothing moved),
    FileNotFoundError if the source is gone. Never replaces, never follows a link.

    NoReplaceUnsupported where the filesystem offers no way to do that, unless the caller vouches that
    `dst_name` is unique by construction (`unique=True`)."""
    if unique:  # the caller vouches that nobody else creates this name: a plain rename is atomic and enough
        os.rename(src_name, dst_name, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return
    strategy = _strategy_for(dst)
    if strategy == RENAMEAT2 and _renameat2 is not None:
        rc = _renameat2(src.fd, os.fsencode(src_name), dst.fd, os.fsencode(dst_name), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), str(src.path / src_name), None, str(dst.path / dst_name))
        _demote(dst, LINK)
        strategy = LINK
    if strategy == LINK:
        try:
            os.link(src_name, dst_name, src_dir_fd=src.fd, dst_dir_fd=dst.fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_LINKS or isinstance(exc, (FileExistsError, FileNotFoundError)):
                raise
            _demote(dst, UNIQUE)
        else:
            # ENOENT here: the source name went (a concurrent mover of the same file, or an NFS retransmit
            # of an unlink that did happen). Our link is kept either way: removing it could leave the file
            # with no name at all. A second name for one file is resolved where it is met (same_file).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(src_name, dir_fd=src.fd)
            return
    raise NoReplaceUnsupported(errno.ENOTSUP, "no rename without replace and no hard links here", str(dst.path))


def move_to_free_name(src: Folder, src_name: str, dst: Folder, name: str, *, unique_tag: str,
                      reservation: str | None = None) -> str | None:
    """Move to `name` in dst, or the first free `name-N`. Returns the name used, None if src is gone.

    On a filesystem that can neither rename without replacing nor link, `name` is reserved first (a file
    holding `reservation`, or `unique_tag`) and the file renamed over it; where the name is really taken
    the target is made unique by construction: `stem-<unique_tag>.ext`, the tag naming this host and this
    move. `reservation`: what identifies this move when it is made again after a kill (its delivery, its
    claim), so that a reservation it left behind is used, not left as an empty stray beside a renamed file."""
    if _strategy_for(dst) != UNIQUE:
        for n in range(1, 10_000):
            candidate = numbered(name, n)
            try:
                move_noreplace(src, src_name, dst, candidate)
            except FileExistsError:
                if fileid.same_file_at(src, src_name, dst, candidate):
                    # A move by link + unlink that was killed between the two: finish it.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(src_name, dir_fd=src.fd)
                    return candidate
                continue
            except NoReplaceUnsupported:
                break
            except FileNotFoundError:
                # The source is gone: another host moved it first. (Not re-checked with lstat: a FUSE or
                # NFS client may still show the name from its attribute cache for a moment.)
                return None
            return candidate
        else:
            raise FileExistsError(errno.EEXIST, "no free name after 10000 tries", str(dst.path / name))
    if src.lstat(src_name) is None:
        return None
    # Neither no-replace renames nor links: the name is reserved by an exclusive create, then the file
    # renamed over that reservation (ours alone). Only when the name is really taken does the file get a
    # name unique by construction.
    tag = reservation or unique_tag
    if dst.reserve(name, tag) or (reservation is not None and dst.holds_reservation(name, tag)):
        try:
            os.rename(src_name, name, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        except FileNotFoundError:
            # The source went. A reservation named for this move is left for whoever moves it now (a host
            # that took the move over renames over it under the same tag: removing it could remove that
            # host's file, landed since the check); one made with this try's own unique tag is removed.
            if reservation is None and dst.holds_reservation(name, tag):
                dst.unlink(name)
            return None
        return name
    stem, ext = _split(name)
    candidate = fit_name(stem, f"-{unique_tag}{ext}")
    try:
        move_noreplace(src, src_name, dst, candidate, unique=True)
    except FileNotFoundError:
        return None
    return candidate


def move_into_own(src: Folder, src_name: str, dst: Folder, name: str) -> str | None:
    """Move into a folder only this process writes to (this host's claimed folder): `name`, or `name-N`
    while an older file holds it. A plain rename: when several hosts race for one source, exactly one
    rename finds it; the others get None. Returns the name used."""
    for n in range(1, 10_000):
        candidate = numbered(name, n)
        if dst.lstat(candidate) is not None:
            continue
        try:
            os.rename(src_name, candidate, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        except FileNotFoundError:
            # NFS may answer a retransmitted rename that did succeed with ENOENT: if the file is now at our
            # (free, ours alone) candidate, we won.
            if dst.lstat(candidate) is not None:
                return candidate
            if _removed(dst) and src.lstat(src_name) is not None:
                raise FolderRemoved(errno.ENOENT, "the folder was removed while a file moved into it",
                                    str(dst.path)) from None
            return None
        return candidate
    raise FileExistsError(errno.EEXIST, "no free name after 10000 tries", str(dst.path / name))


def _removed(folder: Folder) -> bool:
    """Whether an open folder was removed (no links left; on NFS or SMB a stale handle says so)."""
    try:
        return os.fstat(folder.fd).st_nlink == 0
    except OSError as exc:
        return exc.errno in (errno.ESTALE, errno.ENOENT)


def write_file_atomic(path: Path, data: bytes, *, owner: str = "", sync: bool = True) -> None:
    """Atomic write of a file bgwatch owns (state files, outputs): the folder must exist."""
    with Folder.open_root(path.parent) as folder:
        folder.write_atomic(path.name, data, owner=owner, sync=sync)
