"""`bgwatch doctor`: real folders, real FUSE mounts (bindfs), the real ONNX Runtime and torch of this venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgwatch import doctor
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
    mounts = doctor.parse_mountinfo(text)
    assert [m.fstype for m in mounts] == ["ext4", "cifs", "fuse.sshfs"]
    assert doctor.mount_of(Path("/mnt/studio share/inbox"), mounts).source == "//nas/studio"
    assert doctor.mount_of(Path("/mnt/studio share/raw/x"), mounts).fstype == "fuse.sshfs"
    assert doctor.mount_of(Path("/home/u"), mounts).fstype == "ext4"
    assert doctor.is_remote("cifs") and doctor.is_remote("fuse.sshfs") and doctor.is_remote("nfs4")
    assert not doctor.is_remote("ext4") and not doctor.is_remote("xfs")


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


def test_onnxruntime_providers_really_in_use(u2net_home: Path) -> None:
    """onnxruntime-gpu lists CUDA even with no GPU; a real session shows what it actually got."""
    model = u2net_home / "tiny.onnx"
    import onnxruntime

    listed = onnxruntime.get_available_providers()
    [check] = doctor.check_onnxruntime("cuda", model)
    session = onnxruntime.InferenceSession(str(model), providers=[p for p in ("CUDAExecutionProvider",
                                                                              "CPUExecutionProvider") if p in listed])
    on_cuda = "CUDAExecutionProvider" in session.get_providers()
    if on_cuda:
        assert check.level is Level.OK and "runs on CUDA" in check.message
    elif "CUDAExecutionProvider" in listed:
        assert check.level is Level.ERROR and "got only CPUExecutionProvider" in check.message
    else:
        assert check.level is Level.ERROR and "install bgwatch[gpu]" in check.message
    [auto] = doctor.check_onnxruntime("auto", model)
    assert auto.level is (Level.OK if on_cuda else Level.WARNING if "CUDAExecutionProvider" in listed else Level.OK)
    [cpu] = doctor.check_onnxruntime("cpu", model)
    assert cpu.level is Level.OK


def test_torch_device_check() -> None:
    pytest.importorskip("torch")
    import torch

    [cuda] = doctor.check_torch("cuda", needs_sdxl=True)
    [auto] = doctor.check_torch("auto", needs_sdxl=True)
    assert cuda.detail["version"] == torch.__version__
    if torch.cuda.is_available():
        assert cuda.level is Level.OK and auto.level is Level.OK and "free of" in cuda.message
    else:
        assert cuda.level is Level.ERROR and "device is cuda" in cuda.message
        assert auto.level is Level.WARNING and "CPU" in auto.message


def test_weights_present_with_their_size(tmp_path: Path, u2net_home: Path) -> None:
    (tmp_path / "share" / "inbox").mkdir(parents=True)
    config = load_config(write_config(tmp_path, extra="defaults: {mask: {engine: rembg, model: tiny.onnx}}\n"),
                         env={})
    [check] = doctor.check_weights(config)
    assert check.level is Level.OK and check.detail["bytes"] == (u2net_home / "tiny.onnx").stat().st_size
    missing = load_config(write_config(tmp_path, extra="defaults: {mask: {engine: rembg, model: u2net}}\n"), env={})
    [check] = doctor.check_weights(missing)
    assert check.level is Level.WARNING and "models pull" in check.message


def test_two_onnx_runtimes_are_an_error_message_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda d: "1.0" if d in ("onnxruntime", "onnxruntime-gpu") else real(d))
    [check] = doctor.check_onnxruntime("auto")
    assert check.level is Level.ERROR and "breaks both" in check.message


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
    assert "device is cuda but torch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "state" / "bgwatch.db").exists(), "refused before anything started"


def test_numba_cache_cold_where_the_service_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With NUMBA_CACHE_DIR set (as the unit does), a cache warmed elsewhere does not count."""
    pytest.importorskip("pymatting")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    [check] = doctor.check_numba()
    assert check.level is Level.WARNING and "about a minute" in check.message
    assert check.detail["searched"] == str(tmp_path / "numba")
