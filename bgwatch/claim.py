"""Claim-by-rename, so that several workstations can serve one inbox (the Maildir delivery pattern).

A host takes a stable file by renaming it into `<inbox>/.bgwatch/claimed/<host>/<rel path>`. A rename
within one filesystem is atomic: when two hosts race for the same file, exactly one rename finds the
source, and the other gets FileNotFoundError (`claim` returns None). Files are only ever renamed, never
copied, so a claim costs nothing however large the image, and a crash leaves every file in one piece in
one place.

While it works, each host refreshes `<inbox>/.bgwatch/heartbeats/<host>`. Whoever notices that another
host's heartbeat is older than the lease returns that host's claims to the inbox (`reclaim_stale`).

Nothing here ever replaces an existing file: a name already taken gets ` (2)`, ` (3)`... before its
suffix. Where the kernel offers it (Linux renameat2 with RENAME_NOREPLACE, on local filesystems) that
check is atomic; elsewhere (most network filesystems) it is a check just before the rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

WORK_DIR = ".bgwatch"  # at the inbox root; the watcher ignores it
CLAIMED = "claimed"
HEARTBEATS = "heartbeats"

_MAX_NAME_TRIES = 1000
_local_lock = threading.Lock()  # this process's threads pick unique names one at a time


def _check_host(host: str) -> str:
    if not host or host in (".", "..") or host.startswith(".") or "/" in host or "\\" in host or "\0" in host:
        raise ValueError(f"host name {host!r} cannot name a folder (no '/', '\\', or leading '.')")
    return host


def work_dir(inbox_root: Path) -> Path:
    """`<inbox>/.bgwatch`: claims and heartbeats of every host serving this inbox."""
    return Path(inbox_root) / WORK_DIR


def refuse_links(root: Path, folder: Path) -> None:
    """bgwatch's work folders must be real folders inside the inbox: anyone can write to a share, and a
    symlinked .bgwatch/ or done/ would send files (or heartbeats) anywhere the daemon may write."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(folder)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise OSError(errno.ELOOP, f"{folder} leads outside {root} through a symbolic link; refusing to write")


def claimed_dir(inbox_root: Path, host: str) -> Path:
    """`<inbox>/.bgwatch/claimed/<host>`: the files `host` has taken from this inbox."""
    return work_dir(inbox_root) / CLAIMED / _check_host(host)


def heartbeat_path(inbox_root: Path, host: str) -> Path:
    return work_dir(inbox_root) / HEARTBEATS / _check_host(host)


def _relative(root: Path, path: Path) -> Path:
    """`path` relative to `root`, both made absolute without resolving symlinks; ValueError if outside."""
    root_abs = Path(os.path.abspath(root))
    rel = Path(os.path.abspath(path)).relative_to(root_abs)
    if not rel.parts or rel.parts[0] == "..":
        raise ValueError(f"{path} is not a file inside {root}")
    return rel


# ------------------------------------------------------------------ rename without replacing


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
    return fn  # type: ignore[no-any-return]


_renameat2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# The filesystem (or the kernel) cannot rename without replacing: fall back to check-then-rename.
_NOREPLACE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; FileExistsError if `dst` exists, FileNotFoundError if `src` is gone."""
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in _NOREPLACE_UNSUPPORTED:
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def numbered_name(path: Path, n: int) -> Path:
    """`photo.jpg` -> `photo (n).jpg` (n >= 2); n == 1 is the name itself."""
    if n <= 1:
        return path
    return path.with_name(f"{path.stem} ({n}){path.suffix}")


def _move_to_free_name(src: Path, target: Path, *, own_destination: bool = False) -> Path | None:
    """Rename src to target, or to the first free `target (n)` name. None if src vanished.

    own_destination: only this process renames into target's folder (a host's own claimed folder).
    """
    for n in range(1, _MAX_NAME_TRIES + 1):
        candidate = numbered_name(target, n)
        for _ in range(3):  # a parent folder removed under us by a concurrent clean-up: make it again
            if not os.path.lexists(src):
                return None  # gone already: make no folders (the share may have gone with it)
            candidate.parent.mkdir(parents=True, exist_ok=True)
            try:
                rename_noreplace(src, candidate)
                return candidate
            except FileExistsError:
                break
            except FileNotFoundError:
                if os.path.lexists(src):
                    continue  # the destination folder went away, not the source
                # NFS may answer a retransmitted rename that already succeeded with ENOENT: if the
                # file is now at our candidate (only we write there, and it was free), we did win.
                if own_destination and os.path.lexists(candidate):
                    return candidate
                return None
        else:
            return None
    raise FileExistsError(errno.EEXIST, f"no free name after {_MAX_NAME_TRIES} tries", str(target))


def _prune_empty_dirs(start: Path, stop: Path) -> None:
    """Remove empty folders from `start` up to, not including, `stop`."""
    here = start
    stop = Path(os.path.abspath(stop))
    while Path(os.path.abspath(here)) != stop and stop in Path(os.path.abspath(here)).parents:
        try:
            here.rmdir()
        except OSError:
            return  # not empty (or already gone, or not ours to remove)
        here = here.parent


# ------------------------------------------------------------------ claims


def claim(inbox_root: Path, path: Path, host: str) -> Path | None:
    """Take `path` (an image or a sidecar in the inbox) for `host` by renaming it into its claimed folder.

    Returns where the file now is, `claimed_dir(inbox_root, host) / <rel path>` (or `<name> (2).<ext>`
    if this host still holds a claim of that name), or None if the file was gone: another host won it.
    """
    rel = _relative(inbox_root, path)
    if rel.parts[0] == WORK_DIR:
        raise ValueError(f"{path} is in bgwatch's work folder, not a file to claim")
    target = claimed_dir(inbox_root, host) / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    refuse_links(inbox_root, target.parent)
    with _local_lock:
        claimed = _move_to_free_name(Path(path), target, own_destination=True)
    if claimed is None:
        logger.debug("{} was taken by another host (or removed) before this one could claim it", path)
    return claimed


def unclaim(inbox_root: Path, claimed: Path, host: str) -> Path:
    """Return a claimed file to its place in the inbox; a name taken since gets ` (2)`. Returns the new path.

    FileNotFoundError if the claimed file is gone (another host took it back after this host's lease ran out).
    """
    base = claimed_dir(inbox_root, host)
    rel = _relative(base, claimed)
    with _local_lock:
        back = _move_to_free_name(Path(claimed), Path(inbox_root) / rel)
        if back is not None:
            _prune_empty_dirs(Path(claimed).parent, base)
    if back is None:
        raise FileNotFoundError(errno.ENOENT, "claimed file is gone", str(claimed))
    return back


def list_claims(inbox_root: Path, host: str) -> list[Path]:
    """The files `host` holds claimed in this inbox (sorted), e.g. to recover them after a crash."""
    return _files_under(claimed_dir(inbox_root, host))


def _files_under(folder: Path) -> list[Path]:
    found: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                found.extend(_files_under(Path(entry.path)))
            elif entry.is_file(follow_symlinks=False):
                found.append(Path(entry.path))
        except OSError:
            continue
    return sorted(found)


# ------------------------------------------------------------------ heartbeats and leases


class Heartbeat:
    """`<inbox>/.bgwatch/heartbeats/<host>`: holds the time of this host's last beat (and as its mtime).

    Call `beat()` before the first claim and then well within the lease, for as long as claims are held.
    """

    def __init__(self, inbox_root: Path, host: str, clock: Callable[[], float] = time.time) -> None:
        self.inbox_root = Path(inbox_root)
        self.host = _check_host(host)
        self.clock = clock
        self.path = heartbeat_path(self.inbox_root, host)

    def beat(self) -> bool:
        """Refresh the heartbeat. False (and a warning) if it cannot be written, e.g. the share is away."""
        now = self.clock()
        tmp: Path | None = None
        try:
            if not self.inbox_root.is_dir():  # an unmounted share: do not beat into its mount point
                raise FileNotFoundError(errno.ENOENT, "inbox folder missing", str(self.inbox_root))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            refuse_links(self.inbox_root, self.path.parent)
            # mkstemp: a fresh, unpredictable name opened O_EXCL, so a planted symlink cannot redirect it
            fd, name = tempfile.mkstemp(prefix=f".{self.host}.", suffix=".tmp", dir=self.path.parent)
            tmp = Path(name)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(f"{now!r}\n")
            os.utime(tmp, (now, now))
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("cannot write heartbeat {}: {}", self.path, exc.strerror or exc)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            return False
        return True

    def remove(self) -> None:
        """Delete this host's heartbeat (on a clean stop, after its claims went back or were finished)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def age(self, host: str) -> float | None:
        """Seconds since `host` last beat in this inbox, or None if it never did."""
        stamp = last_beat(self.inbox_root, host)
        return None if stamp is None else self.clock() - stamp


def last_beat(inbox_root: Path, host: str) -> float | None:
    """The time `host` last beat (the file's content; its mtime if unreadable), None if no heartbeat."""
    path = heartbeat_path(inbox_root, host)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError):
        text = ""
    try:
        return float(text)
    except ValueError:
        try:
            return path.stat().st_mtime
        except OSError:
            return None


class Liveness:
    """Judges other hosts by whether their heartbeat *changes*, timed on this host's own monotonic clock:
    clock skew between workstations, or a timestamp forged by anyone who can write to the share, cannot
    make a live host look dead. A host is first seen as fresh, so a starting daemon waits a whole lease
    before it returns anyone's claims."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[str, float]] = {}

    def silent_for(self, inbox_root: Path, host: str) -> float:
        path = heartbeat_path(Path(inbox_root), host)
        try:
            st = path.stat()
            content = f"{path.read_text(encoding='utf-8', errors='replace')[:64]}|{st.st_mtime_ns}"
        except OSError:
            content = ""
        key, now = (str(inbox_root), host), self.clock()
        previous = self._seen.get(key)
        if previous is None or previous[0] != content:
            self._seen[key] = (content, now)
            return 0.0
        return now - previous[1]


def reclaim_stale(inbox_root: Path, lease_seconds: float, my_host: str, now: float,
                  liveness: Liveness | None = None) -> list[Path]:
    """Return to the inbox the claims of other hosts whose heartbeat is older than `lease_seconds`.

    `now` is on the heartbeats' clock (time.time). A host with claims but no heartbeat at all counts as
    stale only when its claimed folder has also been left alone for the lease. Live hosts' claims are
    never touched. Returns the files' new paths in the inbox.
    """
    _check_host(my_host)
    base = work_dir(inbox_root) / CLAIMED
    try:
        hosts = sorted(entry.name for entry in os.scandir(base) if entry.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
    returned: list[Path] = []
    for host in hosts:
        if host == my_host:
            continue
        try:
            _check_host(host)
        except ValueError:
            continue
        folder = base / host
        if liveness is not None:
            silent = liveness.silent_for(inbox_root, host)
            if silent <= lease_seconds:
                continue
            stamp = now - silent
        else:
            stamp = last_beat(inbox_root, host)
            if stamp is None:
                try:
                    stamp = folder.stat().st_mtime
                except OSError:
                    continue
            if now - stamp <= lease_seconds:
                continue
        files = _files_under(folder)
        if not files:
            continue
        logger.warning(
            "host {} has not beaten in {:.0f} s (lease {:g} s): returning its {} claimed file(s) to {}",
            host, now - stamp, lease_seconds, len(files), inbox_root,
        )
        for claimed in files:
            rel = claimed.relative_to(folder)
            with _local_lock:
                try:
                    back = _move_to_free_name(claimed, Path(inbox_root) / rel)
                except OSError as exc:
                    logger.error("cannot return {} to the inbox: {}", claimed, exc)
                    continue
            if back is not None:  # None: another host returned it first
                returned.append(back)
            _prune_empty_dirs(claimed.parent, folder)
    return returned


