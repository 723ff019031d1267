"""`bgwatch doctor`: a pre-flight check of this workstation against the configuration.

Every check returns a `Check` (ok, warning or error, with a one-line message a studio's IT admin can act
on). `bgwatch doctor` prints them (or JSON) and exits 0 (all ok), 1 (warnings) or 2 (errors); `bgwatch run`
runs the folder checks before it starts and refuses to start on an error.

Nothing here changes the system: write permission is probed with a temporary file that is removed at once,
and heavy libraries (torch, onnxruntime) are imported only by the checks that report on them.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bgwatch.config import Config, InboxConfig

# Filesystems where inotify does not see other hosts' writes (network) or may see nothing at all (FUSE).
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
                        "gpfs", "ocfs2", "davfs", "ncpfs", "beegfs", "virtiofs"})
FREE_SPACE_WARNING = 1024**3  # bytes; below this a batch of large PNGs may not fit
FREE_SPACE_ERROR = 100 * 1024**2
INOTIFY_WATCHES_LOW = 8192
Detail = dict[str, "str | int | float | bool | None"]


class Level(str, enum.Enum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: what was checked (`area`, `subject`), how it went and what to do about it."""

    area: str  # python | onnxruntime | torch | weights | inbox | outbox | state | inotify | numba
    subject: str  # the path, model or package checked
    level: Level
    message: str
    detail: Detail = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"area": self.area, "subject": self.subject, "level": self.level.value, "message": self.message,
                "detail": dict(self.detail)}


def exit_code(checks: Iterable[Check]) -> int:
    levels = {c.level for c in checks}
    return 2 if Level.ERROR in levels else 1 if Level.WARNING in levels else 0


# ---------------------------------------------------------------- mounts


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


def _read(path: str) -> str:
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


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # vanished meanwhile; stat follows HF cache symlinks to blobs
                total += os.stat(os.path.join(root, name)).st_size
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------- folders


def _probe_write(folder: Path) -> str | None:
    """None if a file can be created in folder (really created: ACLs and read-only mounts fool access())."""
    try:
        fd, name = tempfile.mkstemp(prefix=".bgwatch-doctor-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def _space(folder: Path, area: str, subject: str) -> Check:
    free = shutil.disk_usage(folder).free
    detail: Detail = {"free_bytes": free}
    if free < FREE_SPACE_ERROR:
        return Check(area, subject, Level.ERROR, f"only {human(free)} free", detail)
    if free < FREE_SPACE_WARNING:
        return Check(area, subject, Level.WARNING, f"only {human(free)} free", detail)
    return Check(area, subject, Level.OK, f"writable, {human(free)} free", detail)


def check_inbox(inbox: InboxConfig, mounts: Sequence[Mount], fstab: Sequence[Mount]) -> list[Check]:
    path = Path(os.path.abspath(inbox.path))
    subject = str(inbox.path)
    declared = mount_of(path, fstab)
    mounted = mount_of(path, mounts)
    if declared is not None and declared.point != Path("/") and (
        mounted is None or len(mounted.point.parts) < len(declared.point.parts)
    ):
        return [Check("inbox", subject, Level.ERROR,
                      f"{declared.point} ({declared.fstype} from {declared.source}) is in /etc/fstab but not "
                      f"mounted; mount it (bgwatch waits for the inbox, it never creates it)",
                      {"mount_point": str(declared.point), "fstype": declared.fstype, "mounted": False})]
    if not path.is_dir():
        return [Check("inbox", subject, Level.WARNING,
                      "missing (a share not mounted?); bgwatch waits for it and never creates it",
                      {"exists": False, "fstype": mounted.fstype if mounted else None})]
    fstype = mounted.fstype if mounted else "unknown"
    detail: Detail = {"exists": True, "fstype": fstype, "mount_point": str(mounted.point) if mounted else None,
                      "poll": inbox.poll}
    checks = []
    if is_remote(fstype) and not inbox.poll:
        checks.append(Check("inbox", subject, Level.WARNING,
                            f"on {fstype}: inotify does not see writes from other hosts; set poll: true", detail))
    problem = _probe_write(path)
    if problem:
        checks.append(Check("inbox", subject, Level.ERROR,
                            f"cannot write ({problem}): files are claimed by renaming them inside the inbox",
                            detail))
    if not checks:
        checks.append(Check("inbox", subject, Level.OK, f"present on {fstype}"
                            + (", polled" if inbox.poll else ", inotify"), detail))
    return checks


def check_outbox(outbox: Path, inboxes: Sequence[InboxConfig]) -> list[Check]:
    subject = str(outbox)
    here = Path(os.path.abspath(outbox))
    for inbox in inboxes:
        root = Path(os.path.abspath(inbox.path))
        if here == root or root in here.parents:
            return [Check("outbox", subject, Level.ERROR,
                          f"inside the inbox {inbox.path}: outputs would be taken as inputs, without end")]
    if not here.is_dir():
        parent = _existing_ancestor(here)
        problem = _probe_write(parent) if parent.is_dir() else "not a folder"
        if problem:
            return [Check("outbox", subject, Level.ERROR, f"missing, and {parent} is not writable ({problem})")]
        return [Check("outbox", subject, Level.OK, f"will be created in {parent}", {"exists": False})]
    problem = _probe_write(here)
    if problem:
        return [Check("outbox", subject, Level.ERROR, f"not writable ({problem})")]
    return [_space(here, "outbox", subject)]


def check_state(state_dir: Path, mounts: Sequence[Mount]) -> list[Check]:
    subject = str(state_dir)
    here = Path(os.path.abspath(state_dir))
    target = here if here.is_dir() else _existing_ancestor(here)
    mount = mount_of(target.resolve(), mounts)
    fstype = mount.fstype if mount else "unknown"
    if is_remote(fstype):
        return [Check("state", subject, Level.ERROR,
                      f"on {fstype}: SQLite's WAL needs local disk; give each workstation a local state_dir",
                      {"fstype": fstype})]
    problem = _probe_write(target) if target.is_dir() else "not a folder"
    if problem:
        what = "" if target == here else f"missing, and {target} "
        return [Check("state", subject, Level.ERROR, f"{what}not writable ({problem})", {"fstype": fstype})]
    check = _space(target, "state", subject)
    where = f"on {fstype}" if target == here else f"will be created in {target}, on {fstype}"
    return [Check("state", subject, check.level, f"{check.message}, {where}", {**check.detail, "fstype": fstype})]


def check_inotify(inboxes: Sequence[InboxConfig], proc: Path = Path("/proc/sys/fs/inotify")) -> list[Check]:
    watched = [ib for ib in inboxes if not ib.poll and Path(ib.path).is_dir()]
    try:
        limit = int((proc / "max_user_watches").read_text())
    except (OSError, ValueError):
        return [Check("inotify", str(proc), Level.WARNING, "cannot read the inotify limits")]
    folders = 0
    for inbox in watched:
        for _ in os.walk(inbox.path):
            folders += 1
            if folders > limit:
                break
    detail: Detail = {"max_user_watches": limit, "folders_watched": folders}
    if folders > limit // 2:
        return [Check("inotify", "max_user_watches", Level.ERROR if folders > limit else Level.WARNING,
                      f"{folders} folders to watch against a limit of {limit} for all of this user's programs; "
                      "raise fs.inotify.max_user_watches (sysctl.d) or set poll: true", detail)]
    if limit < INOTIFY_WATCHES_LOW and watched:
        return [Check("inotify", "max_user_watches", Level.WARNING,
                      f"limit {limit} is low; raise fs.inotify.max_user_watches", detail)]
    return [Check("inotify", "max_user_watches", Level.OK, f"{folders} folder(s) watched, limit {limit}", detail)]


# ---------------------------------------------------------------- python stack


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_onnxruntime(device: str, model: Path | None = None) -> list[Check]:
    """The runtime installed and its providers; with `model` (an .onnx file), the providers a session
    really gets: a CUDA build without its CUDA libraries lists CUDA but falls back to the CPU."""
    runtimes = {d: v for d in ("onnxruntime", "onnxruntime-gpu") if (v := _version(d))}
    if len(runtimes) > 1:
        return [Check("onnxruntime", "+".join(runtimes), Level.ERROR,
                      "both onnxruntime and onnxruntime-gpu are installed, which breaks both; pip uninstall both "
                      "and install one: bgwatch[gpu] or bgwatch[cpu]", dict(runtimes))]
    if not runtimes:
        return [Check("onnxruntime", "onnxruntime", Level.ERROR,
                      "no ONNX Runtime installed (rembg cannot run); install bgwatch[gpu] or bgwatch[cpu]")]
    onnxruntime = importlib.import_module("onnxruntime")  # untyped: no stubs to import

    providers = list(onnxruntime.get_available_providers())
    dist, version = next(iter(runtimes.items()))
    detail: Detail = {"package": dist, "version": version, "providers": ",".join(providers)}
    cuda = "CUDAExecutionProvider" in providers
    if device == "cuda" and not cuda:
        return [Check("onnxruntime", dist, Level.ERROR,
                      f"device is cuda but {dist} {version} offers only {', '.join(providers)}; install bgwatch[gpu]",
                      detail)]
    if cuda and device != "cpu" and model is not None:
        session = onnxruntime.InferenceSession(str(model), providers=["CUDAExecutionProvider",
                                                                      "CPUExecutionProvider"])
        in_use = list(session.get_providers())
        detail["in_use"] = ",".join(in_use)
        if "CUDAExecutionProvider" not in in_use:
            return [Check("onnxruntime", dist, Level.ERROR if device == "cuda" else Level.WARNING,
                          f"{dist} {version} lists CUDA but a session on {model.name} got only "
                          f"{', '.join(in_use)}: no GPU driver, or CUDA/cuDNN libraries missing (pip install "
                          f"'{dist}[cuda,cudnn]', or a torch built for the same CUDA)", detail)]
        return [Check("onnxruntime", dist, Level.OK, f"{version}, a session on {model.name} runs on CUDA", detail)]
    return [Check("onnxruntime", dist, Level.OK, f"{version}, providers {', '.join(providers)}", detail)]


def check_torch(device: str, needs_sdxl: bool) -> list[Check]:
    if importlib.util.find_spec("torch") is None:
        if needs_sdxl:
            return [Check("torch", "torch", Level.ERROR,
                          "an inbox uses the sdxl engine but torch is not installed; pip install 'bgwatch[sdxl]'")]
        return [Check("torch", "torch", Level.OK, "not installed (no inbox uses sdxl)")]
    import torch

    cuda_build = torch.version.cuda
    detail: Detail = {"version": torch.__version__, "cuda_build": cuda_build}
    available = bool(torch.cuda.is_available())
    if available:
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        detail.update({"gpu": name, "gpu_memory_free": int(free), "gpu_memory_total": int(total)})
        return [Check("torch", "torch", Level.OK,
                      f"{torch.__version__}, CUDA {cuda_build}: {name}, {human(free)} free of {human(total)}", detail)]
    why = "a CPU-only build" if not cuda_build else f"built for CUDA {cuda_build} but no usable GPU or driver"
    if device == "cuda":
        return [Check("torch", "torch", Level.ERROR, f"device is cuda but torch {torch.__version__} is {why}", detail)]
    if needs_sdxl:
        return [Check("torch", "torch", Level.WARNING,
                      f"torch {torch.__version__} is {why}: sdxl will run on the CPU (minutes per image)", detail)]
    return [Check("torch", "torch", Level.OK, f"{torch.__version__} ({why}; no inbox uses sdxl)", detail)]


def check_weights(config: Config) -> list[Check]:
    from bgwatch import models

    checks = []
    for status in models.list_models(config):
        subject = f"{status.kind} {status.name}"
        if status.present:
            size = disk_size(Path(status.path))
            checks.append(Check("weights", subject, Level.OK, f"{human(size)} in {status.path}",
                                {"path": status.path, "bytes": size, "used_by": status.detail}))
        elif status.kind == "rembg":
            checks.append(Check("weights", subject, Level.WARNING,
                                f"missing ({status.path}): mask engine auto uses classical instead, engine rembg "
                                "fails its jobs; `bgwatch models pull` where there is internet",
                                {"path": status.path, "used_by": status.detail}))
        else:
            checks.append(Check("weights", subject, Level.ERROR,
                                f"missing ({status.path}): replace jobs in {status.detail} would fail; "
                                "`bgwatch models pull` where there is internet",
                                {"path": status.path, "used_by": status.detail}))
    return checks


def _numba_cache_files(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.nbi")) if folder.is_dir() else 0


def check_numba() -> list[Check]:
    spec = importlib.util.find_spec("pymatting")
    if spec is None or not spec.submodule_search_locations:
        return [Check("numba", "pymatting", Level.OK, "pymatting not installed (nothing to compile)")]
    # numba uses NUMBA_CACHE_DIR alone when it is set (the unit sets it); else the package's __pycache__.
    if os.environ.get("NUMBA_CACHE_DIR"):
        places = [Path(os.environ["NUMBA_CACHE_DIR"])]
    else:
        places = [Path(p) for p in spec.submodule_search_locations]
    found = sum(_numba_cache_files(p) for p in places)
    detail: Detail = {"cache_files": found, "searched": os.pathsep.join(str(p) for p in places)}
    if not found:
        return [Check("numba", "pymatting", Level.WARNING,
                      "numba cache cold: the first rembg job will spend about a minute compiling; warm it with "
                      "`python -c 'import rembg'` as the service user (same NUMBA_CACHE_DIR)", detail)]
    return [Check("numba", "pymatting", Level.OK, f"numba cache warm ({found} compiled functions)", detail)]


# ---------------------------------------------------------------- entry points


def _uses_sdxl(config: Config) -> bool:
    from bgwatch import models

    return any(kind == "sdxl" for kind, _name, _used in models.configured_models(config))


def device_checks(config: Config) -> list[Check]:
    """The runtimes the configured engines need on the configured device: with `device: cuda`, `bgwatch run`
    refuses to start (with the reason) rather than fall back to the CPU behind the operator's back."""
    from bgwatch import models

    used = models.configured_models(config)
    checks: list[Check] = []
    if any(kind == "rembg" for kind, _name, _used in used):
        weights = [Path(s.path) for s in models.list_models(config) if s.kind == "rembg" and s.present]
        checks += check_onnxruntime(config.device, weights[0] if weights else None)
    if any(kind == "sdxl" for kind, _name, _used in used):
        checks += check_torch(config.device, needs_sdxl=True)
    return checks


def folder_checks(config: Config, mountinfo: str | None = None, fstab: str | None = None) -> list[Check]:
    """Inboxes, outboxes, state folder, inotify: cheap, run by `bgwatch run` before it starts."""
    mounts = parse_mountinfo(_read("/proc/self/mountinfo") if mountinfo is None else mountinfo)
    declared = parse_fstab(_read("/etc/fstab") if fstab is None else fstab)
    checks: list[Check] = []
    for inbox in config.inboxes:
        checks += check_inbox(inbox, mounts, declared)
    for outbox in dict.fromkeys(ib.outbox for ib in config.inboxes):
        checks += check_outbox(outbox, config.inboxes)
    checks += check_state(config.state_dir, mounts)
    checks += check_inotify(config.inboxes)
    return checks


def run_checks(config: Config, mountinfo: str | None = None, fstab: str | None = None) -> list[Check]:
    """Everything `bgwatch doctor` reports."""
    from bgwatch import models

    weights = [Path(s.path) for s in models.list_models(config) if s.kind == "rembg" and s.present]
    checks = check_onnxruntime(config.device, weights[0] if weights else None)
    checks += check_torch(config.device, _uses_sdxl(config))
    checks += check_weights(config)
    checks += check_numba()
    checks += folder_checks(config, mountinfo, fstab)
    return checks


def format_checks(checks: Sequence[Check]) -> str:
    marks = {Level.OK: "ok  ", Level.WARNING: "WARN", Level.ERROR: "FAIL"}
    lines = [f"{marks[c.level]}  {c.area:11}  {c.subject}: {c.message}" for c in checks]
    errors = sum(1 for c in checks if c.level is Level.ERROR)
    warnings = sum(1 for c in checks if c.level is Level.WARNING)
    lines.append(f"{len(checks)} check(s): {errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)


def stack_versions() -> dict[str, str]:
    """bgwatch, Python, torch (and its CUDA), ONNX Runtime (and its providers): for `bgwatch --version`."""
    import platform

    from bgwatch import __version__

    out = {"bgwatch": __version__, "python": platform.python_version()}
    if importlib.util.find_spec("torch") is not None:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = (f"{torch.version.cuda} (GPU available)" if torch.cuda.is_available()
                       else f"{torch.version.cuda} (no GPU available)") if torch.version.cuda else "none (CPU build)"
    else:
        out["torch"] = "not installed (pip install 'bgwatch[sdxl]')"
    runtimes = [f"{d} {v}" for d in ("onnxruntime", "onnxruntime-gpu") if (v := _version(d))]
    if runtimes:
        try:
            providers = ", ".join(importlib.import_module("onnxruntime").get_available_providers())
        except Exception as exc:  # two runtimes or a broken install raise anything; say so, do not crash
            providers = f"unusable: {type(exc).__name__}"
        out["onnxruntime"] = f"{' + '.join(runtimes)} ({providers})"
    else:
        out["onnxruntime"] = "not installed (pip install 'bgwatch[gpu]' or 'bgwatch[cpu]')"
    return out
