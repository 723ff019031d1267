"""Where the mask nets' weights live on disk: rembg's model home, resolved exactly as rembg 2.0.86 does
(sessions/base.py), so that `auto`, `models` and `doctor` can look for weights without importing rembg
or ONNX Runtime; a test holds the two together.
"""

from __future__ import annotations

import os
from pathlib import Path


def rembg_home() -> Path:
    """rembg's model home: U2NET_HOME if set, else REMBG_HOME, else $XDG_DATA_HOME/rembg or ~/.rembg."""
    if os.environ.get("U2NET_HOME"):
        return Path(os.path.expanduser(os.environ["U2NET_HOME"]))
    xdg = os.environ.get("XDG_DATA_HOME")
    default = os.path.join(xdg, "rembg") if xdg else os.path.join("~", ".rembg")
    return Path(os.path.expanduser(os.environ.get("REMBG_HOME", default)))


def _legacy_home() -> Path:
    default = os.path.join(os.environ.get("XDG_DATA_HOME", "~"), ".u2net")
    return Path(os.path.expanduser(os.environ.get("U2NET_HOME", default)))


def is_custom_model(model: str) -> bool:
    """A model given as an .onnx file (relative to the model home, or an absolute path inside it)."""
    return model.lower().endswith(".onnx")


def rembg_weights_target(model: str) -> Path:
    """Where `bgwatch models pull` (or a person copying files) puts a model's weights."""
    if is_custom_model(model):
        path = Path(os.path.expanduser(model))
        return path if path.is_absolute() else rembg_home() / path
    return rembg_home() / "models" / model / f"{model}.onnx"


def rembg_weights_path(model: str) -> Path | None:
    """The weights file rembg would load for `model`, or None when it is not on disk."""
    if is_custom_model(model):
        target = rembg_weights_target(model)
        return target if target.is_file() else None
    for candidate in (rembg_weights_target(model), _legacy_home() / f"{model}.onnx"):
        if candidate.is_file() and candidate.stat().st_size > 0:
            return candidate
    return None
