"""Which device bgwatch will use, and why: the NVIDIA driver, torch and ONNX Runtime, each asked for real.

`onnxruntime-gpu` lists the CUDA provider on any machine, GPU or not, and a session that asks for it on a
machine without the CUDA libraries quietly runs on the CPU after printing C++ errors to stderr. So the ONNX
Runtime probe opens a real session (a one-node model written here, no weights needed) with the CUDA provider
in a child process: what the session got is the truth, and the child's stderr is read for the reason (the
library that failed to load), never shown raw. torch is asked in-process (`torch.cuda.is_available()` prints
nothing).

The choice follows the engines' own rules: masks use CUDA when `device` is cuda, or auto with the CUDA
provider listed and a GPU driver present (`masking.resolve_onnx_device`); SDXL uses CUDA when torch sees a
GPU (`sdxl_load.torch_device`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
PROBE_TIMEOUT = 120.0  # seconds: a first CUDA context on a big GPU takes a few


# ---------------------------------------------------------------- a model with no weights


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    """One protobuf field: an integer (varint) or bytes/text (length-delimited)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def identity_model() -> bytes:
    """A serialized ONNX model (onnx.proto: ModelProto) of one Identity node over a float tensor of 4 values:
    enough for ONNX Runtime to create a session on any provider, and no `onnx` package needed to write it."""

    def value_info(name: str) -> bytes:
        shape = _field(1, _field(1, 4))  # TensorShapeProto.dim { dim_value: 4 }
        tensor = _field(1, 1) + _field(2, shape)  # elem_type FLOAT, shape
        return _field(1, name) + _field(2, _field(1, tensor))  # name, type { tensor_type }

    node = _field(1, "x") + _field(2, "y") + _field(3, "probe") + _field(4, "Identity")
    graph = _field(1, node) + _field(2, "bgwatch-probe") + _field(11, value_info("x")) + _field(12, value_info("y"))
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(2, "bgwatch") + _field(7, graph) + _field(8, opset)  # ir_version 8, opset 13


# ---------------------------------------------------------------- the NVIDIA driver


def nvidia_driver(proc: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The loaded NVIDIA kernel driver's version ("580.65.06"), or None when no driver is loaded."""
    try:
        text = proc.read_text()
    except OSError:
        return _driver_from_smi()
    found = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else "unknown version"


def _driver_from_smi() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


# ---------------------------------------------------------------- torch


@dataclass(frozen=True, slots=True)
class TorchProbe:
    installed: bool
    version: str = ""
    cuda_build: str | None = None  # the CUDA torch was built for; None: a CPU-only build
    available: bool = False  # torch.cuda.is_available()
    gpu: str = ""
    memory_free: int = 0
    memory_total: int = 0
    bf16: bool = False
    problem: str = ""  # what torch warned while looking for a GPU ("The NVIDIA driver on your system is too old")


def probe_torch() -> TorchProbe:
    if importlib.util.find_spec("torch") is None:
        return TorchProbe(installed=False)
    import warnings

    import torch

    cuda_build = torch.version.cuda
    # A driver too old for torch's CUDA is a UserWarning printed once; it is the reason, not output to show.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        said = [" ".join(str(w.message).split()) for w in caught if "CUDA" in str(w.message)]
        return TorchProbe(True, torch.__version__, cuda_build, problem=said[0][:300] if said else "")
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return TorchProbe(True, torch.__version__, cuda_build, True, torch.cuda.get_device_name(index), int(free),
                      int(total), bool(torch.cuda.is_bf16_supported()))


# ---------------------------------------------------------------- ONNX Runtime


@dataclass(frozen=True, slots=True)
class OrtProbe:
    packages: dict[str, str] = field(default_factory=dict)  # installed distribution -> version
    listed: tuple[str, ...] = ()  # get_available_providers()
    in_use: tuple[str, ...] = ()  # what a session asking for CUDA (then CPU) really got
    problem: str = ""  # why CUDA did not load, in one line; or why the probe could not run

    @property
    def package(self) -> str:
        return next(iter(self.packages), "")

    @property
    def version(self) -> str:
        return next(iter(self.packages.values()), "")

    @property
    def cuda_listed(self) -> bool:
        return "CUDAExecutionProvider" in self.listed

    @property
    def cuda_loads(self) -> bool:
        return "CUDAExecutionProvider" in self.in_use


# Run in a child: ONNX Runtime's C++ logger writes to the process's stderr, which the parent reads.
_ORT_CHILD = """
import json, sys
import onnxruntime as ort
ort.set_default_logger_severity(2)  # errors and warnings (what CUDA needs): read by the parent, never shown raw
listed = list(ort.get_available_providers())
wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in listed]
options = ort.SessionOptions()
options.log_severity_level = 2
session = ort.InferenceSession(sys.stdin.buffer.read(), sess_options=options, providers=wanted)
print(json.dumps({"listed": listed, "in_use": list(session.get_providers())}))
"""


def installed_runtimes() -> dict[str, str]:
    found = {}
    for dist in ORT_PACKAGES:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def probe_onnxruntime(timeout: float = PROBE_TIMEOUT, python: str = sys.executable) -> OrtProbe:
    """The providers ONNX Runtime lists and those a real session gets, asked in a child process."""
    packages = installed_runtimes()
    if len(packages) != 1:
        return OrtProbe(packages)
    try:
        done = subprocess.run([python, "-c", _ORT_CHILD], input=identity_model(), capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return OrtProbe(packages, problem=f"a test session did not open within {timeout:.0f} s")
    except OSError as exc:
        return OrtProbe(packages, problem=f"cannot start {python}: {exc.strerror or exc}")
    stderr = done.stderr.decode(errors="replace")
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return OrtProbe(packages, problem=f"a test session failed: {last_error_line(stderr)}")
    listed, in_use = tuple(answer["listed"]), tuple(answer["in_use"])
    problem = cuda_problem(stderr) if "CUDAExecutionProvider" in listed and "CUDAExecutionProvider" not in in_use \
        else ""
    return OrtProbe(packages, listed, in_use, problem)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def last_error_line(stderr: str) -> str:
    lines = [_ANSI.sub("", line).strip() for line in stderr.splitlines() if line.strip()]
    return (lines[-1][:300] if lines else "no message") or "no message"


def cuda_problem(stderr: str) -> str:
    """ONNX Runtime's reasons for not creating the CUDA provider, as one line: the library that failed to load
    and what the provider requires ("libcublasLt.so.13 missing; needs CUDA 13.* and cuDNN 9.*")."""
    text = _ANSI.sub("", stderr)
    parts = []
    missing = re.search(r"error: (\S+\.so[.\d]*): cannot open shared object file", text)
    if missing:
        parts.append(f"{missing.group(1)} missing")
    needs = re.search(r"Require (cuDNN \d+(?:\.[\d*]+)*) and (CUDA \d+(?:\.[\d*]+)*)", text)
    if needs:
        parts.append(f"needs {needs.group(2)} and {needs.group(1)}")
    if re.search(r"no CUDA-capable device|CUDA driver version is insufficient|cudaErrorNoDevice", text):
        parts.append("no usable GPU or driver")
    if not parts:
        parts.append(last_error_line(stderr) if stderr.strip() else "the CUDA provider did not start (no message)")
    return "; ".join(parts)


# ---------------------------------------------------------------- the choice


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    """The device each engine will run on under `configured` (auto | cuda | cpu), and why, in words."""

    configured: str
    masks: str  # cuda | cpu
    sdxl: str  # cuda | cpu
    masks_why: str
    sdxl_why: str

    def summary(self, *, uses_masks: bool, uses_sdxl: bool) -> tuple[str, str]:
        """(device, why) about the engines the configuration uses: one word for scripts, a sentence for people."""
        if not uses_masks and not uses_sdxl:
            return "cpu", (f"no engine in use needs a GPU (classical masks: no rembg weights; no sdxl); masks with "
                           f"weights would run on {self.masks}: {self.masks_why}")
        engines = [(name, device, why) for name, device, why, used in (
            ("masks", self.masks, self.masks_why, uses_masks), ("SDXL", self.sdxl, self.sdxl_why, uses_sdxl)) if used]
        devices = {device for _name, device, _why in engines}
        if len(devices) == 1:
            return devices.pop(), "; ".join(dict.fromkeys(why for _name, _device, why in engines))
        return "cuda", "; ".join(f"{name} on {device}: {why}" for name, device, why in engines)


def choose(configured: str, driver: str | None, torch: TorchProbe, ort: OrtProbe) -> DeviceChoice:
    """What the engines will do with `device: configured` on this machine (their rules, the probes' facts)."""
    if configured == "cpu":
        return DeviceChoice("cpu", "cpu", "cpu", "device: cpu in the configuration", "device: cpu in the configuration")
    no_driver = "no NVIDIA driver loaded: no /proc/driver/nvidia/version, no nvidia-smi"

    # Masks (masking.resolve_onnx_device): cuda when asked, or auto with the provider listed and a driver;
    # a session that asks for CUDA and cannot have it runs on the CPU.
    if not ort.packages:
        masks_why = "no ONNX Runtime installed"
    elif len(ort.packages) > 1:
        masks_why = "onnxruntime and onnxruntime-gpu are both installed (this breaks both)"
    elif not ort.listed:
        masks_why = f"ONNX Runtime does not work: {ort.problem}"
    elif not ort.cuda_listed:
        masks_why = f"{ort.package} {ort.version} has no CUDA provider (a CPU-only build)"
    elif configured == "auto" and driver is None:
        masks_why = no_driver + ("" if ort.cuda_loads else f"; ONNX Runtime's CUDA provider cannot load: {ort.problem}")
    elif not ort.cuda_loads:
        masks_why = f"ONNX Runtime's CUDA provider cannot load: {ort.problem}"
    else:
        masks_why = f"ONNX Runtime's CUDA provider loads ({ort.package} {ort.version})"
    masks = "cuda" if ort.cuda_loads and (configured == "cuda" or driver is not None) else "cpu"

    # SDXL (sdxl_load.torch_device): cuda when torch sees a GPU.
    if not torch.installed:
        sdxl_why = "torch is not installed"
    elif torch.available:
        sdxl_why = f"torch {torch.version} sees {torch.gpu}"
    elif not torch.cuda_build:
        sdxl_why = f"torch {torch.version} is a CPU-only build"
    elif driver is None:
        sdxl_why = f"no CUDA device visible to torch {torch.version}: {no_driver}"
    else:
        hint = torch.problem or ("CUDA 13 builds need driver R580 or newer" if torch.cuda_build.startswith("13")
                                 else "is the driver too old for it?")
        sdxl_why = (f"no CUDA device visible to torch {torch.version} (built for CUDA {torch.cuda_build}, driver "
                    f"{driver}: {hint})")
    return DeviceChoice(configured, masks, "cuda" if torch.available else "cpu", masks_why, sdxl_why)


# ---------------------------------------------------------------- bgwatch --version


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
    runtimes = [f"{d} {v}" for d in ("onnxruntime", "onnxruntime-gpu") if (v := installed_runtimes().get(d))]
    if runtimes:
        try:
            providers = "providers listed: " + ", ".join(
                importlib.import_module("onnxruntime").get_available_providers())
        except Exception as exc:  # two runtimes or a broken install raise anything; say so, do not crash
            providers = f"unusable: {type(exc).__name__}"
        out["onnxruntime"] = f"{' + '.join(runtimes)} ({providers}; `bgwatch doctor` shows which load)"
    else:
        out["onnxruntime"] = "not installed (pip install 'bgwatch[gpu]' or 'bgwatch[cpu]')"
    return out
