"""A FUSE passthrough that answers like a network share, for the multi-host fault suite.

    python tests/fusefs.py BACKING MOUNTPOINT --mode posix|nfs|smb [--latency 10:20]

Every call that a network share would send to its server waits 10-20 ms (drawn per call), and the mode
decides what the share can do:

    posix   rename flags honoured (RENAME_NOREPLACE works), hard links work
    nfs     no RENAME_NOREPLACE (EINVAL, as NFSv3 answers), hard links work
    smb     neither (EINVAL, EPERM), and inode numbers that change: each mount makes up its own number for a
            name (two hosts never see the same one) and a new one when a file is renamed (as an SMB mount
            with noserverino)

Runs in the foreground (the harness starts it as a process and unmounts it with `fusermount -u`). Needs
libfuse 3 and mfusepy (`ensure()` installs both when root).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MODES = ("posix", "nfs", "smb")
_RENAME_NOREPLACE = 1


def ensure() -> str | None:
    """Why this passthrough cannot run here (None: it can). Installs libfuse 3 (apt) and mfusepy (pip)
    when root and missing."""
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _has_libfuse3():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return "libfuse 3 is not installed (apt-get install libfuse3-3, as root)"
        install = ["apt-get", "install", "-y", "-q", "libfuse3-3"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            subprocess.run(install, env=env, capture_output=True, check=False)
        if not _has_libfuse3():
            return "libfuse 3 could not be installed (apt-get install libfuse3-3 failed)"
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        if os.geteuid() != 0:
            return "mfusepy is not installed (pip install mfusepy)"
        pip = [sys.executable, "-m", "pip", "install", "-q", "mfusepy"]
        if subprocess.run(pip, capture_output=True, check=False).returncode != 0:
            return "mfusepy could not be installed (pip install mfusepy failed)"
    return None


def _has_libfuse3() -> bool:
    try:
        ctypes.CDLL("libfuse3.so.3")
    except OSError:
        return False
    return True


def mount(backing: Path, mount_point: Path, mode: str, latency: tuple[float, float] = (0.010, 0.020),
          timeout: float = 15.0) -> subprocess.Popen[bytes]:
    """Start the passthrough on mount_point and wait until it is mounted; the process is returned."""
    mount_point.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FUSE_LIBRARY_PATH": _libfuse3_path()}
    log = mount_point.parent / f"{mount_point.name}-fusefs.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, __file__, str(backing), str(mount_point), "--mode", mode,
                                 "--latency", f"{latency[0] * 1000:g}:{latency[1] * 1000:g}"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(mount_point):
            return proc
        if proc.poll() is not None:
            raise OSError(f"fusefs {mode} {mount_point} failed: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise OSError(f"fusefs {mode} {mount_point}: not mounted within {timeout:g} s")


def _libfuse3_path() -> str:
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        path = Path(folder) / "libfuse3.so.3"
        if path.exists():
            return str(path)
    return "libfuse3.so.3"


def _operations(backing: Path, mode: str, latency: tuple[float, float]) -> Any:
    import mfusepy
    from mfusepy import FuseOSError, Operations

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    root = os.path.realpath(backing)
    lock = threading.Lock()
    made_up: dict[str, int] = {}

    def wait() -> None:
        time.sleep(random.uniform(*latency))

    def real(path: str) -> str:
        return os.path.join(root, path.lstrip("/"))

    def call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            raise FuseOSError(exc.errno or errno.EIO) from None

    class Share(Operations):  # type: ignore[misc]
        use_ns = True

        def _ino(self, path: str, st: os.stat_result) -> int:
            if mode != "smb":
                return st.st_ino
            with lock:  # a number per name, made up by this mount; a rename makes up a new one
                return made_up.setdefault(path, random.getrandbits(48) + 2)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            wait()
            st = call(os.lstat, real(path))
            attrs = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                                                 "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
            attrs = {k.replace("_ns", ""): v for k, v in attrs.items()}
            attrs["st_ino"] = self._ino(path, st)
            return attrs

        def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
            wait()
            entries = [(".", {"st_mode": 0o40755, "st_ino": 1}, 0), ("..", {"st_mode": 0o40755, "st_ino": 1}, 0)]
            for name in call(os.listdir, real(path)):
                child = f"{path.rstrip('/')}/{name}"
                try:
                    st = os.lstat(real(child))
                except OSError:
                    continue
                entries.append((name, {"st_mode": st.st_mode, "st_ino": self._ino(child, st)}, 0))
            return entries

        def readlink(self, path: str) -> str:
            wait()
            return str(call(os.readlink, real(path)))

        def mkdir(self, path: str, mode_: int) -> None:
            wait()
            call(os.mkdir, real(path), mode_)

        def rmdir(self, path: str) -> None:
            wait()
            call(os.rmdir, real(path))

        def unlink(self, path: str) -> None:
            wait()
            call(os.unlink, real(path))

        def symlink(self, target: str, source: str) -> None:
            wait()
            call(os.symlink, source, real(target))

        def link(self, target: str, source: str) -> None:
            wait()
            if mode == "smb":
                raise FuseOSError(errno.EPERM)
            call(os.link, real(source), real(target))

        def rename(self, old: str, new: str) -> None:
            self.rename2(old, new, 0)

        def rename2(self, old: str, new: str, flags: int) -> None:
            wait()
            if flags and mode != "posix":
                raise FuseOSError(errno.EINVAL)
            if renameat2(-100, os.fsencode(real(old)), -100, os.fsencode(real(new)), flags) != 0:
                raise FuseOSError(ctypes.get_errno())
            with lock:
                for key in [k for k in made_up if k in (old, new) or k.startswith((old + "/", new + "/"))]:
                    del made_up[key]

        def chmod(self, path: str, mode_: int) -> None:
            wait()
            call(os.chmod, real(path), mode_)

        def chown(self, path: str, uid: int, gid: int) -> None:
            wait()
            call(os.lchown, real(path), uid, gid)

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
            wait()
            if times is None:
                call(lambda: os.utime(real(path), follow_symlinks=False))
            else:
                call(lambda: os.utime(real(path), ns=times, follow_symlinks=False))

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            wait()
            call(os.truncate, real(path), length)

        def open(self, path: str, flags: int) -> int:
            wait()
            return int(call(os.open, real(path), flags | os.O_NOFOLLOW))

        def create(self, path: str, mode_: int, fi: Any = None) -> int:
            wait()
            return int(call(os.open, real(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode_))

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return bytes(call(os.pread, fh, size, offset))

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return int(call(os.pwrite, fh, data, offset))

        def flush(self, path: str, fh: int) -> None:
            return None

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        def fsync(self, path: str, datasync: bool, fh: int) -> None:
            wait()
            call(os.fsync, fh)

        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(real(path))
            return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                 "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    class Fuse(mfusepy.FUSE):  # type: ignore[misc]
        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:  # mfusepy drops the flags
            return self.operations.rename2(old.decode(self.encoding, self.errors),  # type: ignore[no-any-return]
                                           new.decode(self.encoding, self.errors), flags)

    return Share(), Fuse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mount_point", type=Path)
    parser.add_argument("--mode", choices=MODES, default="posix")
    parser.add_argument("--latency", default="10:20", help="milliseconds, LOW:HIGH per call")
    args = parser.parse_args(argv)
    low, _, high = args.latency.partition(":")
    operations, fuse = _operations(args.backing, args.mode, (float(low) / 1000, float(high or low) / 1000))
    # attr_timeout=0: every stat reaches this process (the changing inode numbers are seen); use_ino: ours
    fuse(operations, str(args.mount_point), foreground=True, nothreads=False, use_ino=True, attr_timeout=0,
         entry_timeout=0, negative_timeout=0, fsname=f"bgwatch-{args.mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
