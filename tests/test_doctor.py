"""`bgwatch doctor`: real folders, real FUSE mounts (bindfs), the real ONNX Runtime and torch of this venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgwatch import accelerator, doctor, mounts, writeprobe
from bgwatch.accelerator import OrtProbe, TorchProbe
from bgwatch.config import load_config
from bgwatch.doctor import Level

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, *, poll: bool = False, state: Path | None = None, outbox: Path | None = None,
                 extra: str = "") -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"state_dir: {state or tmp_path / 'state'}\nhost: testhost\n{extra}"
        f"inboxes:\n  - {{path: {tmp_path / 'share' / 'inbox'}, outbox: {outbox or tmp_path / 'out'}, "
        f"poll: {'true' if poll else 'false'}}}\n")
    return config


def bgwatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bgwatch", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def by_area(checks: list[doctor.Check], area: str) -> list[doctor.Check]:
    return [c for c in checks if c.area == area]


@pytest.fixture
def fuse_mount(tmp_path: Path) -> Iterator[object]:
    """mount(source, target, read_only=False): a real FUSE mount (bindfs), unmounted afterwards."""
    if not shutil.which("bindfs") or not shutil.which("fusermount") or not os.path.exists("/dev/fuse"):
        pytest.skip("needs bindfs, fusermount and /dev/fuse (Debian: apt-get install bindfs fuse)")
    mounted: list[Path] = []

    def mount(source: Path, target: Path, read_only: bool = False) -> None:
        source.mkdir(parents=True, exist_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["bindfs", *(["-r"] if read_only else []), str(source), str(target)],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount FUSE here: {proc.stderr.strip()}")
        mounted.append(target)

    yield mount
    for target in reversed(mounted):
        subprocess.run(["fusermount", "-u", str(target)], capture_output=True, timeout=30)


def test_mountinfo_parsing_unescapes_and_finds_the_innermost_mount() -> None:
    text = ("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
            "40 22 0:40 / /mnt/studio\\040share rw,relatime shared:7 - cifs //nas/studio rw,vers=3.0\n"
            "41 40 0:41 / /mnt/studio\\040share/raw rw - fuse.sshfs user@host:/raw rw\n")
    found = mounts.parse_mountinfo(text)
    assert [m.fstype for m in found] == ["ext4", "cifs", "fuse.sshfs"]
    assert mounts.mount_of(Path("/mnt/studio share/inbox"), found).source == "//nas/studio"
    assert mounts.mount_of(Path("/mnt/studio share/raw/x"), found).fstype == "fuse.sshfs"
    assert mounts.mount_of(Path("/home/u"), found).fstype == "ext4"
    assert mounts.is_remote("cifs") and mounts.is_remote("fuse.sshfs") and mounts.is_remote("nfs4")
    assert not mounts.is_remote("ext4") and not mounts.is_remote("xfs")


def test_a_missing_inbox_is_a_warning_and_doctor_exits_1(tmp_path: Path) -> None:
    """The share is not mounted: its folder does not exist. bgwatch waits for it; doctor says so."""
    config = write_config(tmp_path)
    proc = bgwatch("doctor", "--json", "-c", str(config), env={"U2NET_HOME": str(tmp_path / "models")})
    report = json.loads(proc.stdout)
    [inbox] = [c for c in report["checks"] if c["area"] == "inbox"]
    assert inbox["level"] == "warning" and "missing" in inbox["message"] and inbox["detail"]["exists"] is False
    levels = {c["level"] for c in report["checks"]}
    expected = 2 if "error" in levels else 1
    assert proc.returncode == expected and report["status"] == {2: "error", 1: "warning"}[expected]
    assert not (tmp_path / "share" / "inbox").exists(), "doctor never creates an inbox"
    text = bgwatch("doctor", "-c", str(config), env={"U2NET_HOME": str(tmp_path / "models")})
    assert text.returncode == proc.returncode
    assert f"WARN  inbox        {tmp_path / 'share' / 'inbox'}: missing" in text.stdout


def test_an_inbox_on_fuse_needs_poll_and_an_unmounted_share_is_an_error(tmp_path: Path, fuse_mount) -> None:
    inbox = tmp_path / "share" / "inbox"
    fuse_mount(tmp_path / "nas", tmp_path / "share")
    inbox.mkdir()
    config = load_config(write_config(tmp_path), env={})
    [check] = by_area(doctor.folder_checks(config), "inbox")
    assert check.level is Level.WARNING and check.detail["fstype"] == "fuse" and "poll: true" in check.message
    polled = load_config(write_config(tmp_path, poll=True), env={})
    [check] = by_area(doctor.folder_checks(polled), "inbox")
    assert check.level is Level.OK and "fuse" in check.message

    subprocess.run(["fusermount", "-u", str(tmp_path / "share")], check=True, timeout=30)
    inbox.mkdir(parents=True)  # the empty mount point's own folder, on local disk: looks fine ...
    fstab = f"//nas/studio {tmp_path / 'share'} cifs credentials=/etc/nas.cred 0 0\n"
    [check] = by_area(doctor.folder_checks(polled, fstab=fstab), "inbox")
    assert check.level is Level.ERROR and "not mounted" in check.message and "cifs" in check.message


def test_read_only_outbox_and_a_state_folder_on_fuse_are_errors(tmp_path: Path, fuse_mount) -> None:
    fuse_mount(tmp_path / "ro_src", tmp_path / "ro", read_only=True)
    fuse_mount(tmp_path / "nas_state", tmp_path / "state_on_share")
    (tmp_path / "share" / "inbox").mkdir(parents=True)
    config = load_config(write_config(tmp_path, state=tmp_path / "state_on_share", outbox=tmp_path / "ro"), env={})
    checks = doctor.folder_checks(config)
    [outbox] = by_area(checks, "outbox")
    assert outbox.level is Level.ERROR and "not writable" in outbox.message and "Read-only" in outbox.message
    [state] = by_area(checks, "state")
    assert state.level is Level.ERROR and "local disk" in state.message
    proc = bgwatch("run", "--once", "-c", str(config.source))
    assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_writable_outbox_reports_free_space(tmp_path: Path) -> None:
    (tmp_path / "share" / "inbox").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    config = load_config(write_config(tmp_path), env={})
    checks = doctor.folder_checks(config)
    [outbox] = by_area(checks, "outbox")
    free = shutil.disk_usage(tmp_path / "out").free
    assert outbox.level is (Level.OK if free > doctor.FREE_SPACE_WARNING else Level.WARNING)
    assert abs(int(outbox.detail["free_bytes"]) - free) < 64 * 1024**2
    assert not list((tmp_path / "out").iterdir()), "the write probe leaves nothing behind"
    [state] = by_area(checks, "state")
    assert state.level is not Level.ERROR and "will be created" in state.message


def test_a_write_probe_left_by_a_killed_start_is_removed_by_the_next(tmp_path: Path) -> None:
    (tmp_path / "share" / "inbox").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    old = tmp_path / "out" / f"{writeprobe.PROBE_PREFIX}k1ll3d"
    old.write_bytes(b"")
    os.utime(old, (1, time.time() - writeprobe.STALE_PROBE_SECONDS - 60))
    fresh = tmp_path / "out" / f"{writeprobe.PROBE_PREFIX}n0w"  # another host's, probing at this moment
    fresh.write_bytes(b"")
    mine = tmp_path / "out" / f"{writeprobe.PROBE_PREFIX}photo.jpg"  # not empty: never a probe
    mine.write_bytes(b"a user's file")
    os.utime(mine, (1, 1))
    config = load_config(write_config(tmp_path), env={})
    own = tmp_path / "out" / f"{writeprobe.PROBE_PREFIX}{config.host}"  # this host's, its start killed a moment ago
    own.write_bytes(b"")
    doctor.folder_checks(config)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([fresh.name, mine.name])
    assert not list((tmp_path / "share" / "inbox").glob(".bgwatch-doctor-*")), "the inbox's probe is gone too"


def test_inotify_limit_against_the_folders_to_watch(tmp_path: Path) -> None:
    inbox = tmp_path / "share" / "inbox"
    for i in range(6):
        (inbox / f"client{i}").mkdir(parents=True)
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "max_user_watches").write_text("4\n")
    config = load_config(write_config(tmp_path), env={})
    [check] = doctor.check_inotify(config.inboxes, proc)
    assert check.level is Level.ERROR and check.detail["folders_watched"] > 4
    (proc / "max_user_watches").write_text("1000000\n")
    [check] = doctor.check_inotify(config.inboxes, proc)
    assert check.level is Level.OK and check.detail["folders_watched"] == 7
    polled = load_config(write_config(tmp_path, poll=True), env={})
    (proc / "max_user_watches").write_text("4\n")
    [check] = doctor.check_inotify(polled.inboxes, proc)
    assert check.level is Level.OK and check.detail["folders_watched"] == 0, "polled inboxes use no watches"


def test_the_probe_model_is_valid_onnx_and_runs() -> None:
    """The one-node model written without the onnx package: onnx's checker accepts it, ONNX Runtime runs it."""
    import numpy as np
    import onnx
    import onnxruntime

    onnx.checker.check_model(onnx.load_from_string(accelerator.identity_model()))
    session = onnxruntime.InferenceSession(accelerator.identity_model(), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32)
    assert session.run(None, {"x": x})[0].tolist() == x.tolist()


def test_onnxruntime_providers_that_really_load() -> None:
    """onnxruntime-gpu lists CUDA even with no GPU; the probe says what a real session got, and why not CUDA."""
    import onnxruntime

    probe = accelerator.probe_onnxruntime()
    listed = onnxruntime.get_available_providers()
    assert probe.listed == tuple(listed)
    session = onnxruntime.InferenceSession(accelerator.identity_model(), providers=[
        p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in listed])
    assert probe.in_use == tuple(session.get_providers()), "the child's session got what one here gets"
    if probe.cuda_listed and not probe.cuda_loads:
        assert probe.problem and "ONNXRuntimeError" not in probe.problem, probe.problem
    [check] = doctor.check_onnxruntime("cuda", probe, accelerator.nvidia_driver())
    if probe.cuda_loads:
        assert check.level is Level.OK and "CUDA provider loads" in check.message
    else:
        assert check.level is Level.ERROR and "device is cuda" in check.message
    for device in ("auto", "cpu"):
        [check] = doctor.check_onnxruntime(device, probe, accelerator.nvidia_driver())
        if not probe.cuda_loads:
            assert "CUDA provider loads" not in check.message, "never call CUDA usable when no session gets it"


# What onnxruntime-gpu 1.31 printed here (no CUDA 13 libraries), colour codes and all.
ORT_STDERR = (
    "\x1b[1;31m2026-12-07 10:41:10.994189394 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library /venv/lib/"
    "python3.11/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: "
    "cannot open shared object file: No such file or directory\n\x1b[m\n\x1b[0;93m2026-12-07 10:41:10.994239039 "
    "[W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 CreateExecutionProviderFactoryInstance] Failed to "
    "create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*. Please install all dependencies as mentioned "
    "in the GPU requirements page\x1b[m\n")


def test_why_cuda_did_not_load_is_one_line() -> None:
    assert accelerator.cuda_problem(ORT_STDERR) == "libcublasLt.so.13 missing; needs CUDA 13.* and cuDNN 9.*"
    assert accelerator.cuda_problem("") == "the CUDA provider did not start (no message)"
    assert accelerator.cuda_problem("\x1b[1;31msome new failure\x1b[m\n") == "some new failure"


GPU_ORT = OrtProbe({"onnxruntime-gpu": "1.31.1"}, ("CUDAExecutionProvider", "CPUExecutionProvider"),
                   ("CPUExecutionProvider",), "libcublasLt.so.13 missing")
CUDA_ORT = OrtProbe({"onnxruntime-gpu": "1.31.1"}, ("CUDAExecutionProvider", "CPUExecutionProvider"),
                    ("CUDAExecutionProvider", "CPUExecutionProvider"))
CPU_TORCH = TorchProbe(True, "2.13.0+cpu", None)
GPU_TORCH = TorchProbe(True, "2.13.0+cu130", "13.0", True, "NVIDIA H100", 70 * 10**9, 80 * 10**9)


def test_the_device_and_why_follow_the_engines_rules() -> None:
    cpu = accelerator.choose("auto", None, CPU_TORCH, GPU_ORT)
    assert (cpu.masks, cpu.sdxl) == ("cpu", "cpu")
    device, why = cpu.summary(uses_masks=True, uses_sdxl=True)
    assert device == "cpu" and "no NVIDIA driver" in why and "libcublasLt.so.13 missing" in why and "CPU-only" in why
    # A driver, but ONNX Runtime's CUDA libraries missing: torch generates on the GPU, masks stay on the CPU.
    mixed = accelerator.choose("auto", "580.65.06", GPU_TORCH, GPU_ORT)
    assert (mixed.masks, mixed.sdxl) == ("cpu", "cuda")
    device, why = mixed.summary(uses_masks=True, uses_sdxl=True)
    assert device == "cuda" and "masks on cpu" in why and "SDXL on cuda: torch 2.13.0+cu130 sees NVIDIA H100" in why
    assert mixed.summary(uses_masks=True, uses_sdxl=False)[0] == "cpu"
    gpu = accelerator.choose("auto", "580.65.06", GPU_TORCH, CUDA_ORT)
    both = "ONNX Runtime's CUDA provider loads (onnxruntime-gpu 1.31.1); torch 2.13.0+cu130 sees NVIDIA H100"
    assert gpu.summary(uses_masks=True, uses_sdxl=True) == ("cuda", both)
    old_driver = accelerator.choose("auto", "535.104.05", TorchProbe(True, "2.13.0+cu130", "13.0"), CUDA_ORT)
    assert old_driver.sdxl == "cpu" and "driver 535.104.05" in old_driver.sdxl_why and "R580" in old_driver.sdxl_why
    said = TorchProbe(True, "2.13.0+cu130", "13.0", problem="The NVIDIA driver on your system is too old")
    assert "too old" in accelerator.choose("auto", "535.104.05", said, CUDA_ORT).sdxl_why
    forced = accelerator.choose("cpu", "580.65.06", GPU_TORCH, CUDA_ORT)
    assert (forced.masks, forced.sdxl) == ("cpu", "cpu")


def test_device_cuda_that_cannot_be_had_is_an_error_naming_why() -> None:
    use = doctor.Usage(masks=True, sdxl=True)
    [check] = doctor.check_device("cuda", accelerator.choose("cuda", None, CPU_TORCH, GPU_ORT), use)
    assert check.level is Level.ERROR and check.detail["device"] is None
    assert "libcublasLt.so.13 missing" in check.message and "CPU-only" in check.message
    [check] = doctor.check_device("auto", accelerator.choose("auto", None, CPU_TORCH, GPU_ORT), use)
    assert check.level is Level.OK and check.detail["device"] == "cpu"
    [check] = doctor.check_onnxruntime("auto", GPU_ORT, "580.65.06")
    assert check.level is Level.WARNING and "masks run on the CPU although this machine has a GPU" in check.message
    [check] = doctor.check_onnxruntime("auto", GPU_ORT, None)
    assert check.level is Level.OK and "cannot load" in check.message


def test_torch_device_check() -> None:
    pytest.importorskip("torch")
    import torch

    probe = accelerator.probe_torch()
    assert probe.version == torch.__version__ and probe.available == torch.cuda.is_available()
    [cuda] = doctor.check_torch("cuda", probe, needs_sdxl=True)
    [auto] = doctor.check_torch("auto", probe, needs_sdxl=True)
    if torch.cuda.is_available():
        assert cuda.level is Level.OK and auto.level is Level.OK and "free of" in cuda.message
    else:
        assert cuda.level is Level.ERROR and "device is cuda" in cuda.message
        assert auto.level is Level.WARNING and "CPU" in auto.message


def test_doctor_names_the_device_first_and_prints_no_library_output(tmp_path: Path, u2net_home: Path) -> None:
    """The first line says the device and why; --json names it; ONNX Runtime's C++ lines never show."""
    (tmp_path / "share" / "inbox").mkdir(parents=True)
    config = write_config(tmp_path, extra="defaults: {mask: {engine: rembg, model: tiny.onnx}}\n")
    env = {"U2NET_HOME": str(u2net_home)}
    text = bgwatch("doctor", "-c", str(config), env=env)
    first = text.stdout.splitlines()[0]
    assert first.startswith(("device: cpu (device: auto; ", "device: cuda (device: auto; ")), text.stdout
    report = json.loads(bgwatch("doctor", "--json", "-c", str(config), env=env).stdout)
    assert report["device"] in ("cpu", "cuda") and report["device_reason"] in first
    for output in (text.stdout + text.stderr, json.dumps(report)):
        assert "onnxruntime:Default" not in output and "provider_bridge" not in output and "\x1b[" not in output
    if accelerator.nvidia_driver() is None:
        assert report["device"] == "cpu"
        assert "CUDA provider loads" not in text.stdout, "no GPU here: CUDA is never called usable"


def test_python_below_3_11_is_an_error() -> None:
    [old] = doctor.check_python((3, 10, 12))
    assert old.level is Level.ERROR and "3.11" in old.message
    [now] = doctor.check_python()
    assert now.level is Level.OK


def test_doctor_reads_weights_where_the_service_does(tmp_path: Path, tiny_onnx_bytes: bytes) -> None:
    """`bgwatch init` writes models_dir; `sudo bgwatch doctor` then looks there, not in root's home."""
    config = tmp_path / "etc" / "config.yaml"
    proc = bgwatch("init", str(config), "--state-dir", str(tmp_path / "var"), "--inbox-root", str(tmp_path / "in"))
    assert proc.returncode == 0, proc.stderr
    weights = tmp_path / "var" / "models" / "rembg" / "models" / "u2net" / "u2net.onnx"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(tiny_onnx_bytes)
    env = {k: v for k, v in os.environ.items() if k not in ("U2NET_HOME", "HF_HOME", "REMBG_HOME")}
    report = json.loads(subprocess.run([sys.executable, "-m", "bgwatch", "doctor", "--json", "-c", str(config)],
                                       capture_output=True, text=True, timeout=180,
                                       env={**env, "PYTHONPATH": str(ROOT)}).stdout)
    [home] = [c for c in report["checks"] if c["subject"] == "model home"]
    assert home["level"] == "ok" and "models_dir" in home["message"]
    assert home["detail"]["rembg"] == str(tmp_path / "var" / "models" / "rembg")
    [u2net] = [c for c in report["checks"] if c["subject"] == "rembg u2net"]
    assert u2net["level"] == "ok" and u2net["detail"]["path"] == str(weights)


def test_the_default_model_home_of_root_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("U2NET_HOME", "REMBG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(write_config(tmp_path), env={})
    [root] = doctor.check_model_home(config, uid=0)
    assert root.level is Level.WARNING and "models_dir" in root.message
    [user] = doctor.check_model_home(config, uid=os.getuid() or 65534)
    assert user.level is Level.OK


def test_weights_present_with_their_size(tmp_path: Path, u2net_home: Path) -> None:
    (tmp_path / "share" / "inbox").mkdir(parents=True)
    config = load_config(write_config(tmp_path, extra="defaults: {mask: {engine: rembg, model: tiny.onnx}}\n"),
                         env={})
    [check] = doctor.check_weights(config)
    assert check.level is Level.OK and check.detail["bytes"] == (u2net_home / "tiny.onnx").stat().st_size
    missing = load_config(write_config(tmp_path, extra="defaults: {mask: {engine: rembg, model: u2net}}\n"), env={})
    [check] = doctor.check_weights(missing)
    assert check.level is Level.WARNING and "models pull" in check.message


def test_two_onnx_runtimes_are_an_error_message_not_a_crash() -> None:
    both = OrtProbe({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    [check] = doctor.check_onnxruntime("auto", both)
    assert check.level is Level.ERROR and "breaks both" in check.message
    assert "are both installed" in accelerator.choose("auto", None, CPU_TORCH, both).masks_why


def test_version_lists_the_stack() -> None:
    proc = bgwatch("--version")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("bgwatch ")
    keys = {line.split(":")[0].strip() for line in lines[1:]}
    assert {"python", "torch", "onnxruntime"} <= keys
    import importlib.metadata

    runtime = next(d for d in ("onnxruntime-gpu", "onnxruntime") if _installed(d))
    assert f"{runtime} {importlib.metadata.version(runtime)}" in proc.stdout


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_run_with_device_cuda_refuses_to_start_without_a_working_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a working GPU")
    (tmp_path / "share" / "inbox").mkdir(parents=True)
    config = write_config(tmp_path, extra="defaults: {operation: replace, engine: sdxl, prompt: oak table}\n")
    proc = bgwatch("run", "--once", "-c", str(config), env={"DEVICE": "cuda"})
    assert proc.returncode == 2, proc.stderr
    assert "device is cuda but the GPU cannot be used" in proc.stderr and "torch" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state" / "bgwatch.db").exists(), "refused before anything started"


def test_numba_cache_cold_where_the_service_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With NUMBA_CACHE_DIR set (as the unit does), a cache warmed elsewhere does not count."""
    pytest.importorskip("pymatting")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    [check] = doctor.check_numba()
    assert check.level is Level.WARNING and "about a minute" in check.message
    assert check.detail["searched"] == str(tmp_path / "numba")


def test_doctor_says_which_precision_each_mask_net_runs_at(tmp_path: Path, u2net_home: Path) -> None:
    """mask.precision (issue 18): doctor shows fp32 or int8 for each configured net, and why."""
    (tmp_path / "share" / "inbox").mkdir(parents=True)
    config = load_config(write_config(tmp_path, extra="defaults: {mask: {engine: rembg, model: u2net}}\n"), env={})
    [check] = doctor.check_precision(config)
    assert check.subject == "mask u2net" and check.detail["precision"] in ("fp32", "int8")
    assert "(" in check.message, "the reason comes with the choice"
    cpu = load_config(write_config(tmp_path, extra="device: cpu\ndefaults: {mask: {engine: rembg, model: u2net, "
                                   "precision: fp32}}\n"), env={})
    [check] = doctor.check_precision(cpu)
    assert check.detail["precision"] == "fp32" and "mask.precision is fp32" in check.message


def test_run_with_device_cuda_checks_only_the_runtimes_in_use(tmp_path: Path) -> None:
    """Classical masks and no sdxl: a CPU-only ONNX Runtime is no reason for `run` to refuse device: cuda."""
    (tmp_path / "share" / "inbox").mkdir(parents=True)
    config = load_config(write_config(tmp_path, extra="device: cuda\ndefaults: {mask: {engine: classical}}\n"),
                         env={})
    cpu_only = doctor.Machine(None, CPU_TORCH, OrtProbe({"onnxruntime": "1.32.0"}, ("CPUExecutionProvider",),
                                                        ("CPUExecutionProvider",)))
    checks = doctor.device_checks(config, cpu_only)
    assert [c.area for c in checks] == ["device"] and checks[0].level is Level.OK
    everything = doctor.device_checks(config, cpu_only, used_only=False)
    assert {c.area for c in everything} == {"device", "onnxruntime", "torch"}
    [ort] = by_area(everything, "onnxruntime")
    assert ort.level is Level.WARNING and "CPU-only build" in ort.message, "nothing in use would run on it"
