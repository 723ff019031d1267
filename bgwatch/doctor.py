"""`bgwatch doctor`: a pre-flight check of this workstation against the configuration.

Every check returns a `Check` (ok, warning or error, with a one-line message a studio's IT admin can act
on). `bgwatch doctor` prints them (or JSON) and exits 0 (all ok), 1 (warnings) or 2 (errors); `bgwatch run`
runs the folder checks before it starts and refuses to start on an error.

Nothing here changes the system: write permission is probed with a file that is removed at once (and
probes left by a process killed mid-probe with it: writeprobe.py), and heavy libraries (torch,
onnxruntime) are imported only by the checks that report on them.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bgwatch.mounts import Mount, is_remote, mount_of, parse_fstab, parse_mountinfo, read_text
from bgwatch.writeprobe import probe_write

if TYPE_CHECKING:
    from bgwatch.accelerator import DeviceChoice, OrtProbe, TorchProbe
    from bgwatch.config import Config, InboxConfig

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

    area: str  # device, onnxruntime, torch, python, weights, precision, numba, inbox, outbox, state, inotify
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


def _space(folder: Path, area: str, subject: str) -> Check:
    free = shutil.disk_usage(folder).free
    detail: Detail = {"free_bytes": free}
    if free < FREE_SPACE_ERROR:
        return Check(area, subject, Level.ERROR, f"only {human(free)} free", detail)
    if free < FREE_SPACE_WARNING:
        return Check(area, subject, Level.WARNING, f"only {human(free)} free", detail)
    return Check(area, subject, Level.OK, f"writable, {human(free)} free", detail)


def check_inbox(inbox: InboxConfig, mounts: Sequence[Mount], fstab: Sequence[Mount], host: str = "") -> list[Check]:
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
    problem = probe_write(path, host)
    if problem:
        checks.append(Check("inbox", subject, Level.ERROR,
                            f"cannot write ({problem}): files are claimed by renaming them inside the inbox",
                            detail))
    if not checks:
        checks.append(Check("inbox", subject, Level.OK, f"present on {fstype}"
                            + (", polled" if inbox.poll else ", inotify"), detail))
    return checks


def check_outbox(outbox: Path, inboxes: Sequence[InboxConfig], host: str = "") -> list[Check]:
    subject = str(outbox)
    here = Path(os.path.abspath(outbox))
    for inbox in inboxes:
        root = Path(os.path.abspath(inbox.path))
        if here == root or root in here.parents:
            return [Check("outbox", subject, Level.ERROR,
                          f"inside the inbox {inbox.path}: outputs would be taken as inputs, without end")]
    if not here.is_dir():
        parent = _existing_ancestor(here)
        problem = probe_write(parent, host) if parent.is_dir() else "not a folder"
        if problem:
            return [Check("outbox", subject, Level.ERROR, f"missing, and {parent} is not writable ({problem})")]
        return [Check("outbox", subject, Level.OK, f"will be created in {parent}", {"exists": False})]
    problem = probe_write(here, host)
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
    problem = probe_write(target) if target.is_dir() else "not a folder"
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


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> list[Check]:
    text = ".".join(str(v) for v in version)
    detail: Detail = {"version": text, "executable": sys.executable}
    if version < (3, 11):
        return [Check("python", sys.executable, Level.ERROR,
                      f"Python {text}: bgwatch needs 3.11 or newer (rembg 2.0.86 does)", detail)]
    return [Check("python", sys.executable, Level.OK, text, detail)]


@dataclass(frozen=True, slots=True)
class Machine:
    """What this machine offers, probed once for every device check: the NVIDIA driver, torch, ONNX Runtime."""

    driver: str | None
    torch: TorchProbe
    ort: OrtProbe


def probe_machine() -> Machine:
    from bgwatch import accelerator

    return Machine(accelerator.nvidia_driver(), accelerator.probe_torch(), accelerator.probe_onnxruntime())


@dataclass(frozen=True, slots=True)
class Usage:
    """Which device-bound engines the configuration uses."""

    masks: bool  # a rembg model whose weights are present (auto uses classical without them)
    sdxl: bool


def usage(config: Config) -> Usage:
    from bgwatch import models

    statuses = models.list_models(config)
    return Usage(any(s.kind == "rembg" and s.present for s in statuses), any(s.kind == "sdxl" for s in statuses))


def choice_for(config: Config, machine: Machine) -> DeviceChoice:
    from bgwatch import accelerator

    return accelerator.choose(config.device, machine.driver, machine.torch, machine.ort)


def check_device(configured: str, choice: DeviceChoice, use: Usage) -> list[Check]:
    """The device bgwatch will use, and why: the first line of `bgwatch doctor`."""
    device, why = choice.summary(uses_masks=use.masks, uses_sdxl=use.sdxl)
    detail: Detail = {"device": device, "configured": configured, "masks": choice.masks, "sdxl": choice.sdxl,
                      "masks_why": choice.masks_why, "sdxl_why": choice.sdxl_why}
    if configured == "cuda":
        wrong = [f"{name}: {engine_why}" for name, engine, engine_why, used in (
            ("masks", choice.masks, choice.masks_why, use.masks), ("SDXL", choice.sdxl, choice.sdxl_why, use.sdxl))
            if used and engine != "cuda"]
        if wrong:
            detail["device"] = None
            return [Check("device", configured, Level.ERROR, "device is cuda but the GPU cannot be used ("
                          + "; ".join(wrong) + "): `bgwatch run` refuses to start; fix it or set device: auto",
                          detail)]
    return [Check("device", configured, Level.OK, why, detail)]


def check_onnxruntime(device: str, ort: OrtProbe, driver: str | None = None, *, needed: bool = True) -> list[Check]:
    """The runtime installed, the providers it lists and the ones a real session gets (a CUDA build without
    its CUDA libraries, or with no GPU, lists CUDA and runs on the CPU). needed: rembg masks are in use (else
    device: cuda without CUDA here is only a warning: nothing would run on it)."""
    refused = Level.ERROR if needed else Level.WARNING
    if len(ort.packages) > 1:
        return [Check("onnxruntime", "+".join(ort.packages), Level.ERROR,
                      "both onnxruntime and onnxruntime-gpu are installed, which breaks both; pip uninstall both "
                      "and install one: bgwatch[gpu] or bgwatch[cpu]", dict(ort.packages))]
    if not ort.packages:
        return [Check("onnxruntime", "onnxruntime", Level.ERROR,
                      "no ONNX Runtime installed (rembg cannot run); install bgwatch[gpu] or bgwatch[cpu]")]
    dist, version = ort.package, ort.version
    detail: Detail = {"package": dist, "version": version, "providers": ",".join(ort.listed),
                      "in_use": ",".join(ort.in_use), "problem": ort.problem or None}
    if not ort.listed:
        return [Check("onnxruntime", dist, Level.ERROR, f"{version} does not work: {ort.problem}", detail)]
    if not ort.cuda_listed:
        if device == "cuda":
            return [Check("onnxruntime", dist, refused, f"device is cuda but {dist} {version} has no CUDA "
                          "provider (a CPU-only build); install bgwatch[gpu] instead of bgwatch[cpu]", detail)]
        return [Check("onnxruntime", dist, Level.OK, f"{version}, CPU provider (a CPU-only build)", detail)]
    if ort.cuda_loads:
        where = "CPU provider (device: cpu), CUDA provider loads" if device == "cpu" else "CUDA provider loads"
        return [Check("onnxruntime", dist, Level.OK, f"{version}, {where}", detail)]
    cannot = f"its CUDA provider cannot load: {ort.problem}"
    if device == "cuda":
        return [Check("onnxruntime", dist, refused, f"device is cuda but {dist} {version} runs on the CPU, "
                      f"{cannot} (pip install '{dist}[cuda,cudnn]', or a torch built for the same CUDA)", detail)]
    if device == "auto" and driver is not None:
        return [Check("onnxruntime", dist, Level.WARNING,
                      f"{version}: masks run on the CPU although this machine has a GPU (driver {driver}): {cannot} "
                      f"(pip install '{dist}[cuda,cudnn]', or a torch built for the same CUDA)", detail)]
    return [Check("onnxruntime", dist, Level.OK, f"{version}, CPU provider (no GPU here; {cannot})", detail)]


def check_torch(device: str, torch: TorchProbe, needs_sdxl: bool) -> list[Check]:
    if not torch.installed:
        if needs_sdxl:
            return [Check("torch", "torch", Level.ERROR,
                          "an inbox uses the sdxl engine but torch is not installed; pip install 'bgwatch[sdxl]'")]
        return [Check("torch", "torch", Level.OK, "not installed (no inbox uses sdxl)")]
    detail: Detail = {"version": torch.version, "cuda_build": torch.cuda_build}
    if torch.available:
        detail.update({"gpu": torch.gpu, "gpu_memory_free": torch.memory_free, "gpu_memory_total": torch.memory_total})
        return [Check("torch", "torch", Level.OK, f"{torch.version}, CUDA {torch.cuda_build}: {torch.gpu}, "
                      f"{human(torch.memory_free)} free of {human(torch.memory_total)}", detail)]
    why = "a CPU-only build" if not torch.cuda_build else f"built for CUDA {torch.cuda_build} but sees no usable GPU"
    if device == "cuda" and needs_sdxl:
        return [Check("torch", "torch", Level.ERROR, f"device is cuda but torch {torch.version} is {why}", detail)]
    if needs_sdxl and device != "cpu":
        return [Check("torch", "torch", Level.WARNING,
                      f"torch {torch.version} is {why}: sdxl will run on the CPU (minutes per image)", detail)]
    return [Check("torch", "torch", Level.OK, f"{torch.version} ({why}"
                  + ("; device: cpu)" if needs_sdxl else "; no inbox uses sdxl)"), detail)]


def check_model_home(config: Config, uid: int | None = None) -> list[Check]:
    """Where rembg and Hugging Face weights are looked for, and why there: `sudo bgwatch doctor` must look
    where the service looks (models_dir), not in root's home."""
    from bgwatch.pipeline.maskweights import rembg_home

    home = rembg_home()
    hub = os.path.expanduser(os.environ.get("HF_HOME")
                             or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"))
    detail: Detail = {"rembg": str(home), "huggingface": hub,
                      "models_dir": str(config.models_dir) if config.models_dir else None}
    if config.models_dir is not None:
        return [Check("weights", "model home", Level.OK,
                      f"{home} and {hub} (models_dir in {config.source or 'the configuration'})", detail)]
    if os.environ.get("U2NET_HOME"):
        return [Check("weights", "model home", Level.OK, f"{home} (U2NET_HOME) and {hub}", detail)]
    user = _user_name(os.geteuid() if uid is None else uid)
    if (os.geteuid() if uid is None else uid) == 0:
        return [Check("weights", "model home", Level.WARNING,
                      f"{home}: rembg's default for {user}, not where a service looks for weights; set models_dir "
                      "in config.yaml (`bgwatch init` writes models_dir: /var/lib/bgwatch/models)", detail)]
    return [Check("weights", "model home", Level.OK, f"{home} and {hub} (the defaults for user {user}; set "
                  "models_dir in config.yaml so that every user, and the service, use one place)", detail)]


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


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


def check_precision(config: Config) -> list[Check]:
    """The precision each configured mask net runs at here (fp32 or its int8 variant), and why."""
    from bgwatch import models
    from bgwatch.errors import BgwatchError

    try:
        lines = models.precision_report(config)
    except BgwatchError as exc:  # device: cuda with no CUDA provider: the device checks say so already
        return [Check("precision", "mask", Level.WARNING, f"cannot tell: {exc}")]
    checks = []
    for line in lines:
        subject, _, message = line.partition(": ")
        checks.append(Check("precision", subject, Level.OK, message, {"precision": message.split(" ", 1)[0]}))
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


def device_checks(config: Config, machine: Machine | None = None, *, used_only: bool = True) -> list[Check]:
    """The device bgwatch will use and the runtimes its engines need there: with `device: cuda`, `bgwatch run`
    refuses to start (with the reason) rather than fall back to the CPU behind the operator's back.
    used_only: the runtimes of the engines in use only (`bgwatch run`); doctor reports both."""
    machine = probe_machine() if machine is None else machine
    use = usage(config)
    checks = check_device(config.device, choice_for(config, machine), use)
    if use.masks or not used_only:
        checks += check_onnxruntime(config.device, machine.ort, machine.driver, needed=use.masks)
    if use.sdxl or not used_only:
        checks += check_torch(config.device, machine.torch, needs_sdxl=use.sdxl)
    return checks


def folder_checks(config: Config, mountinfo: str | None = None, fstab: str | None = None) -> list[Check]:
    """Inboxes, outboxes, state folder, inotify: cheap, run by `bgwatch run` before it starts."""
    mounts = parse_mountinfo(read_text("/proc/self/mountinfo") if mountinfo is None else mountinfo)
    declared = parse_fstab(read_text("/etc/fstab") if fstab is None else fstab)
    checks: list[Check] = []
    for inbox in config.inboxes:
        checks += check_inbox(inbox, mounts, declared, config.host)
    for outbox in dict.fromkeys(ib.outbox for ib in config.inboxes):
        checks += check_outbox(outbox, config.inboxes, config.host)
    checks += check_state(config.state_dir, mounts)
    checks += check_inotify(config.inboxes)
    return checks


def run_checks(config: Config, mountinfo: str | None = None, fstab: str | None = None) -> list[Check]:
    """Everything `bgwatch doctor` reports."""
    checks = device_checks(config, used_only=False)
    checks += check_python()
    checks += check_model_home(config)
    checks += check_weights(config)
    checks += check_precision(config)
    checks += check_numba()
    checks += folder_checks(config, mountinfo, fstab)
    from bgwatch.studio import store_checks

    checks += store_checks(config)  # a studio's PostgreSQL: connection, server version, migrations
    return checks


def format_checks(checks: Sequence[Check]) -> str:
    """One line a check; the device check first, as "device: cpu (why)"."""
    marks = {Level.OK: "ok  ", Level.WARNING: "WARN", Level.ERROR: "FAIL"}
    lines: list[str] = []
    for c in checks:
        if c.area == "device":
            configured = "" if c.subject == "cpu" else f"device: {c.subject}; "
            lines.insert(0, f"device: {c.detail['device']} ({configured}{c.message})" if c.level is Level.OK
                         else f"{marks[c.level]}  device: {c.message}")
        else:
            lines.append(f"{marks[c.level]}  {c.area:11}  {c.subject}: {c.message}")
    errors = sum(1 for c in checks if c.level is Level.ERROR)
    warnings = sum(1 for c in checks if c.level is Level.WARNING)
    lines.append(f"{len(checks)} check(s): {errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)
