"""Shared fixtures: real files in tmp dirs, tiny real models, generated studio shots."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tinymodels.py, shared with bench/

from tinymodels import build_tiny_onnx
from tinysdxl import tiny_sdxl_fixture  # noqa: F401  (the session fixture `tiny_sdxl`)


def forget_mask_engines() -> None:
    """Between tests with different model homes: the mask engines the process loaded are forgotten (the
    product keeps them for its life; only tests change the models under a running process)."""
    from bgwatch.pipeline import masking, precision

    with masking._engines_lock:
        masking._engines.clear()
    with masking._announce_lock:
        masking._announced.clear()
    with precision._precision_lock:
        precision._precisions.clear()


@pytest.fixture(scope="session")
def tiny_onnx_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The tiny segmentation net, built once per session."""
    return build_tiny_onnx(tmp_path_factory.mktemp("tiny_onnx")).read_bytes()


@pytest.fixture
def u2net_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_onnx_bytes: bytes) -> Iterator[Path]:
    """A rembg model home (U2NET_HOME) holding tiny.onnx; loaded mask engines are forgotten afterwards."""

    home = tmp_path / "u2net"
    home.mkdir()
    (home / "tiny.onnx").write_bytes(tiny_onnx_bytes)
    monkeypatch.setenv("U2NET_HOME", str(home))
    forget_mask_engines()
    yield home
    forget_mask_engines()


@pytest.fixture
def empty_model_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A rembg model home with no weights in it (the offline first-run case)."""

    home = tmp_path / "empty_u2net"
    home.mkdir()
    monkeypatch.setenv("U2NET_HOME", str(home))
    forget_mask_engines()
    yield home
    forget_mask_engines()


@pytest.fixture(scope="session")
def studio_shots() -> list:
    """Twelve 1024x1024 product shots, three on each backdrop kind, all with soft shadows."""
    from bgwatch.samples import BACKDROPS, studio_shot

    return [studio_shot(100 + i, backdrop=BACKDROPS[i % len(BACKDROPS)]) for i in range(12)]
