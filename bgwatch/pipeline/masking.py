"""Mask engines: which pixels are the subject. One protocol, a registry by name, models kept loaded.

- `rembg`: any rembg model (u2net, isnet-general-use, birefnet-general, ...) or a custom `.onnx` under
  rembg's model home, run by ONNX Runtime with explicitly chosen providers.
- `classical`: OpenCV, no weights; built for product shots on plain and studio backdrops (studio_mask).
- `auto`: rembg when the model's weights are on disk, else classical (said once in the log).

Engines return the raw alpha (float32 HxW in [0, 1]); `refine_mask` cleans it up in the finish stage.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from loguru import logger

from bgwatch.errors import EngineError
from bgwatch.jobs import MaskSpec
from bgwatch.pipeline.maskweights import is_custom_model, rembg_home, rembg_weights_path, rembg_weights_target
from bgwatch.pipeline.onnxnets import OnnxNet, mask8, recipe_for

# rembg session names that are not a model one can name (they need a path, or prompts).
_REMBG_NON_MODELS = frozenset({"u2net_custom", "dis_custom", "ben_custom", "sam"})
# rembg models work at 320-1024 px; they are given the image at most this size (and alpha matting runs
# at it), and their mask is scaled up once: memory follows the output, not the model's pre-processing.
REMBG_WORK_SIDE = 2048


class MaskEngine(Protocol):
    name: str  # registered name: "rembg" | "classical"
    model: str  # the model used ("" for classical)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 sRGB -> HxW float32 alpha in [0, 1]."""
        ...

    def predict8(self, rgb: np.ndarray) -> np.ndarray:
        """The same alpha as HxW uint8, rounded as refine.to_alpha8 rounds predict's (what the pipeline
        keeps)."""
        ...


# ---------------------------------------------------------------- device


def onnx_providers(device: str) -> list[str]:
    """ONNX Runtime providers for a configured device (auto | cuda | cpu), chosen explicitly."""
    resolved = resolve_onnx_device(device)
    if resolved == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def resolve_onnx_device(device: str) -> str:
    """auto -> cuda when ONNX Runtime has the CUDA provider and a GPU is present, else cpu."""
    if device not in ("auto", "cuda", "cpu"):
        raise EngineError("rembg", f"unknown device {device!r} (allowed: auto, cuda, cpu)")
    if device == "cpu":
        return "cpu"
    has_provider = "CUDAExecutionProvider" in _available_providers()
    if device == "cuda":
        if not has_provider:
            raise EngineError(
                "rembg", "device is cuda but ONNX Runtime has no CUDA provider; install rembg[gpu] "
                "(onnxruntime-gpu) with a matching CUDA, or set device: cpu"
            )
        return "cuda"
    return "cuda" if has_provider and _gpu_present() else "cpu"


def _available_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def _gpu_present() -> bool:
    import sys

    torch = sys.modules.get("torch")  # only ask torch if something already paid for importing it
    if torch is not None:
        try:
            return bool(torch.cuda.is_available())
        except Exception:
            return False
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and b"GPU" in done.stdout


# ---------------------------------------------------------------- engines


class RembgMaskEngine:
    """A mask net, loaded for the life of the engine: for the u2net, isnet and birefnet families and custom
    .onnx files an ONNX Runtime session of bgwatch's own (onnxnets.py; rembg is never imported), for the
    models only rembg knows a rembg session.

    `predict` is thread-safe (ONNX Runtime runs one session from several threads at once). On the CPU
    the session runs `threads` intra-op threads, never spinning while idle, so that the pool threads
    decoding and finishing other images get the cores between its operators. `parallel_runs` is how
    many predicts a caller should run at once to keep every core busy: cores // threads. `precision`:
    fp32, or int8 when the engine runs the net's quantized variant (quantize.py).
    """

    name = "rembg"

    def __init__(self, model: str, device: str, *, alpha_matting: bool = False, session: Any = None,
                 threads: int | None = None, precision: str = "fp32") -> None:
        self.model = model
        self.device = resolve_onnx_device(device)
        self.alpha_matting = alpha_matting
        self.precision = precision
        cores = cpu_cores()
        self.threads = max(1, min(threads or cores, cores))
        self.parallel_runs = 1 if self.device == "cuda" else max(1, cores // self.threads)
        self._session = (session if session is not None
                         else _new_session(model, self.device, threads=self.threads, precision=precision))

    def with_alpha_matting(self, alpha_matting: bool) -> RembgMaskEngine:
        """The same loaded session with another matting setting (no second copy of the model)."""
        return RembgMaskEngine(self.model, self.device, alpha_matting=alpha_matting, session=self._session,
                               threads=self.threads, precision=self.precision)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """The model sees the image at most REMBG_WORK_SIDE pixels on its long side (it works at 320 to
        1024 px itself); its mask is brought to full resolution once, guided by the photo (edges.py)."""
        if not isinstance(self._session, OnnxNet):
            return self._predict_with_remove(rgb)
        small = self._net_mask(rgb)
        if self.alpha_matting:
            return self._matte(rgb, small)
        return self.upscale(small, rgb)

    def predict8(self, rgb: np.ndarray) -> np.ndarray:
        """predict's alpha as uint8, to the bit; the net's own path rounds the band's pixels as the guided
        upsampling makes them (no HxW float32 plane: 4 bytes a pixel less to write, and no second pass)."""
        from bgwatch.pipeline.refine import to_alpha8

        if not isinstance(self._session, OnnxNet) or self.alpha_matting:
            return to_alpha8(self.predict(rgb))
        from bgwatch.pipeline.edges import guided_upsample8

        return guided_upsample8(self._net_mask(rgb), rgb)

    def _net_mask(self, rgb: np.ndarray) -> np.ndarray:
        """The net's own mask of the image, uint8 at the net's size."""
        try:
            return mask8(self.run(self.preprocess(rgb)))
        except Exception as exc:
            raise EngineError("rembg", f"model {self.model} failed on this image: {exc}") from exc

    # The net is run here step by step, as rembg's session.predict does, without rembg.remove: no PIL image
    # of the input beyond the net's square one, no PIL mask at full size, no float64 copies. The model's input
    # is built exactly as rembg builds it (onnxnets.net_input), so the net's output is the same.

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> the net's 1x3xSxS float32 input, as rembg's BaseSession.normalize makes it."""
        assert isinstance(self._session, OnnxNet)
        return self._session.preprocess(_work_image(rgb))

    def run(self, feed: np.ndarray) -> np.ndarray:
        """The net on one preprocessed input -> its mask plane (SxS float32, a probability)."""
        assert isinstance(self._session, OnnxNet)
        return self._session.run(feed)

    def upscale(self, small: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """The net's uint8 mask -> HxW float32 in [0, 1] at the photo's size, its outline following the
        photo's edges (a fast guided filter, edges.py)."""
        from bgwatch.pipeline.edges import guided_upsample

        return guided_upsample(small, rgb)

    def _matte(self, rgb: np.ndarray, small: np.ndarray) -> np.ndarray:
        """Alpha matting (rembg's, with remove's default thresholds) on the image at most REMBG_WORK_SIDE
        pixels, from the net's mask scaled with Pillow's Lanczos as rembg does; scaled up once."""
        import cv2
        from PIL import Image

        _import_rembg()
        from rembg.bg import alpha_matting_cutout

        height, width = rgb.shape[:2]
        image = Image.fromarray(_work_image(rgb))
        mask = Image.fromarray(small).resize(image.size, Image.Resampling.LANCZOS)
        try:
            cutout = alpha_matting_cutout(image, mask, 240, 10, 10)
        except Exception as exc:
            raise EngineError("rembg", f"model {self.model} failed on this image: {exc}") from exc
        alpha = np.asarray(cutout)[..., 3]
        if alpha.shape != (height, width):
            alpha = cv2.resize(np.ascontiguousarray(alpha), (width, height), interpolation=cv2.INTER_LINEAR)
        out = alpha.astype(np.float32)
        out *= np.float32(1 / 255)
        return out

    def _predict_with_remove(self, rgb: np.ndarray) -> np.ndarray:
        """A model only rembg knows: through rembg.remove with a PIL image."""
        import cv2
        from PIL import Image
        from rembg import remove

        height, width = rgb.shape[:2]
        image = Image.fromarray(_work_image(rgb))
        try:
            if self.alpha_matting:
                cutout = remove(image, session=self._session, alpha_matting=True)
                alpha = np.asarray(cutout)[..., 3]
            else:
                alpha = np.asarray(remove(image, session=self._session, only_mask=True))
        except Exception as exc:
            raise EngineError("rembg", f"model {self.model} failed on this image: {exc}") from exc
        if alpha.shape != (image.height, image.width):
            raise EngineError("rembg", f"model {self.model} returned a {alpha.shape} mask for an image of "
                              f"{(image.height, image.width)}")
        if alpha.shape != (height, width):
            alpha = cv2.resize(np.ascontiguousarray(alpha), (width, height), interpolation=cv2.INTER_LINEAR)
        out = alpha.astype(np.float32)
        out *= np.float32(1 / 255)
        return out


def _work_image(rgb: np.ndarray) -> np.ndarray:
    """The image at most REMBG_WORK_SIDE pixels on its long side, area-averaged (Lanczos from 25 MP is
    slow, and the nets work at 320 to 1024 px)."""
    import cv2

    height, width = rgb.shape[:2]
    small = np.ascontiguousarray(rgb[..., :3])
    scale = min(1.0, REMBG_WORK_SIDE / max(height, width, 1))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(small, size, interpolation=cv2.INTER_AREA)
    return np.asarray(small)


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def rembg_session_options(threads: int) -> Any:
    """ONNX Runtime options for a mask session that shares the CPU with bgwatch's other threads.

    - `threads` intra-op threads, one inter-op thread and sequential execution: the nets are chains of
      convolutions with nothing to run side by side, and a second pool would only compete for the cores.
    - No spinning: by default ORT's idle pool threads spin for a while after each operator, burning the
      cores that the decode and finish threads need; with a busy neighbour a spinning pool is slower too,
      as every operator waits for its slowest thread.
    - The CPU memory arena without the memory pattern: with the pattern, each run takes one planned
      block for all its activations and the arena keeps it (u2net: 968 MB peak RSS for load + run); without
      it the arena reuses freed tensors' chunks (767 MB) at the same speed. No arena at all is as small but
      12-20% slower (every run maps and faults its buffers in afresh). Measured on u2net, 2 threads.
    - Full graph optimisation (the default, set so that it stays so).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _rembg_model_names() -> list[str]:
    from rembg.sessions import sessions_class

    names = []
    for cls in sessions_class:
        name = cls.name()
        if name in _REMBG_NON_MODELS or not cls.is_local() or cls.requires_credentials():
            continue
        names.append(name)
    return sorted(names)


def _import_rembg() -> None:
    try:
        import rembg  # noqa: F401
    except (ImportError, SystemExit) as exc:  # plain `rembg` without a runtime calls sys.exit on import
        raise EngineError("rembg", f"rembg cannot be imported ({exc}); install rembg[gpu]") from None


def _weights(model: str, known: bool) -> Path:
    """The model's weights file, or an EngineError saying what to do. `known`: the name is a model bgwatch
    runs itself (else it is looked up in rembg's list)."""
    weights = rembg_weights_path(model)
    if is_custom_model(model):
        target = rembg_weights_target(model)
        home = rembg_home().resolve()
        if home not in target.resolve().parents:
            raise EngineError("rembg", f"custom model {target} must be inside rembg's model home {home} "
                              "(set U2NET_HOME to the folder that holds it)")
        if weights is None:
            raise EngineError("rembg", f"custom model file {target} does not exist")
        return weights
    if not known:
        names = _rembg_model_names()
        if model not in names:
            raise EngineError("rembg", f"unknown model {model!r} (known: {', '.join(names)}, "
                              "or a custom .onnx file in the model home)")
    if weights is None:
        # Never let rembg download here: without network it fails after leaving an empty folder
        # behind, and a daemon must not stall a job on a multi-hundred-MB download.
        raise EngineError("rembg", f"weights for {model} are not on this machine; run `bgwatch models pull "
                          f"{model}`, or copy {model}.onnx to {rembg_weights_target(model)} (model home: "
                          f"{rembg_home()}; set U2NET_HOME to use another folder)")
    return weights


def _new_session(model: str, device: str, *, threads: int, precision: str) -> Any:
    """bgwatch's own ONNX Runtime session for the families it knows (the int8 variant for precision
    int8), else rembg's."""
    recipe = recipe_for(model)
    if recipe is None:
        return _new_rembg_session(model, device, threads=threads)
    path = _weights(model, known=True)
    if precision == "int8":
        from bgwatch.pipeline.quantize import passed_variant

        variant = passed_variant(path)
        if variant is None:
            raise EngineError("rembg", f"no int8 variant of {path} passed its quality gate; run `bgwatch models "
                              f"quantize {model}` or set mask.precision: fp32")
        path = variant
    providers = onnx_providers(device)
    try:
        net = OnnxNet(path, recipe, providers=providers, options=rembg_session_options(threads))
    except Exception as exc:
        raise EngineError("rembg", f"cannot load {path}: {exc}") from exc
    _check_providers(model, device, net.providers())
    logger.info("mask engine rembg: loaded {} ({}, {}) on {} (ONNX Runtime providers in use: {})", model,
                precision, path.name, device, ", ".join(net.providers()))
    return net


def _check_providers(model: str, device: str, in_use: list[str]) -> None:
    if device == "cuda" and "CUDAExecutionProvider" not in in_use:
        raise EngineError("rembg", f"device is cuda but ONNX Runtime runs {model} on {', '.join(in_use)}: its CUDA "
                          "libraries are missing (bgwatch doctor says which); set device: cpu to run on the CPU")


def _new_rembg_session(model: str, device: str, *, threads: int) -> Any:
    """A rembg session, for the models only rembg knows."""
    weights = _weights(model, known=False)
    _import_rembg()
    from rembg import new_session

    providers = onnx_providers(device)
    try:
        session = new_session(model, providers=providers, sess_opts=rembg_session_options(threads))
    except Exception as exc:
        raise EngineError("rembg", f"cannot load {weights}: {exc}") from exc
    inner = getattr(session, "inner_session", None)
    in_use = list(inner.get_providers()) if inner is not None else providers
    _check_providers(model, device, in_use)
    logger.info("mask engine rembg: loaded {} through rembg on {} (ONNX Runtime providers in use: {})", model,
                device, ", ".join(in_use))
    return session


class ClassicalMaskEngine:
    """OpenCV backdrop subtraction for studio product shots (see studio_mask); no weights."""

    name = "classical"

    def __init__(self, model: str = "", device: str = "cpu") -> None:
        self.model = ""
        self.device = "cpu"

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        alpha = studio_mask(rgb)
        if float(alpha.mean()) < 2e-4:
            raise EngineError(
                "classical", "found no subject that stands out from the backdrop (it is built for products "
                "on plain or studio backdrops); use mask engine rembg for busy scenes"
            )
        return alpha

    def predict8(self, rgb: np.ndarray) -> np.ndarray:
        from bgwatch.pipeline.refine import to_alpha8

        return to_alpha8(self.predict(rgb))


MASK_ENGINES: dict[str, type] = {"rembg": RembgMaskEngine, "classical": ClassicalMaskEngine}


def mask_engine_names() -> list[str]:
    """The names a spec may use for mask.engine: 'auto' and every registered engine."""
    return ["auto", *sorted(MASK_ENGINES)]


_announced: set[tuple[str, str]] = set()
_announce_lock = threading.Lock()


def resolve_mask_engine_name(spec: MaskSpec) -> str:
    """auto -> "rembg" when the model's weights are on disk (rembg's model home), else "classical"."""
    if spec.engine != "auto":
        if spec.engine not in MASK_ENGINES:
            raise EngineError(spec.engine, f"unknown mask engine (known: {', '.join(mask_engine_names())})")
        return spec.engine
    weights = rembg_weights_path(spec.model)
    chosen = "rembg" if weights is not None else "classical"
    with _announce_lock:
        if (spec.model, chosen) not in _announced:
            _announced.add((spec.model, chosen))
            if weights is not None:
                logger.info("mask engine auto: rembg with {} ({})", spec.model, weights)
            else:
                logger.info("mask engine auto: classical (no weights for {} at {}; `bgwatch models pull {}` "
                            "enables rembg)", spec.model, rembg_weights_target(spec.model), spec.model)
    return chosen


def _announce_precision(model: str, precision: str, why: str) -> None:
    with _announce_lock:
        if (model, f"precision {precision}") not in _announced:
            _announced.add((model, f"precision {precision}"))
            logger.info("mask precision for {}: {} ({})", model, precision, why)


_engines: dict[tuple[str, str, str, str, int, str], Any] = {}
_engines_lock = threading.Lock()


def load_mask_engine(spec: MaskSpec, device: str, *, threads: int | None = None) -> MaskEngine:
    """The engine for a spec, loaded once per (engine, model, device, threads, precision) and kept loaded. EngineError
    when the engine is unknown or its model cannot be loaded (the message says how to fix it).

    `threads`: ONNX Runtime intra-op threads of a rembg engine's session (default: all the cores, for one
    mask at a time). A caller that runs N masks at once on the CPU asks for cores // N, and gets an engine
    whose `parallel_runs` says so; the classical engine ignores it."""
    name = resolve_mask_engine_name(spec)
    model = spec.model if name == "rembg" else ""
    threads = threads if name == "rembg" and threads else 0
    # The weights' location is part of the key: another model home (U2NET_HOME) is another model.
    precision = "fp32"
    if name == "rembg":
        from bgwatch.pipeline.precision import mask_precision

        precision, why = mask_precision(spec, device)
        _announce_precision(model, precision, why)
    key = (name, model, device, str(rembg_weights_path(model)) if name == "rembg" else "", threads, precision)
    with _engines_lock:  # one load at a time: two workers asking together must not load a model twice
        engine = _engines.get(key)
        if engine is None:
            engine = (RembgMaskEngine(model, device, threads=threads or None, precision=precision)
                      if name == "rembg" else MASK_ENGINES[name](model, device))
            _engines[key] = engine
    if isinstance(engine, RembgMaskEngine) and engine.alpha_matting != spec.alpha_matting:
        return engine.with_alpha_matting(spec.alpha_matting)
    loaded: MaskEngine = engine
    return loaded


def studio_mask(rgb: np.ndarray) -> np.ndarray:
    """The classical engine's cut (see pipeline/classical.py)."""
    from bgwatch.pipeline.classical import studio_mask as cut

    return cut(rgb)
