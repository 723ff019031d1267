"""onnxnets: the nets' input built as rembg builds it, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bgwatch.pipeline.onnxnets import RECIPES, net_input


def _images() -> list[np.ndarray]:
    """A real photo, a studio shot, a dark one (its max below 255: rembg divides by the max), an
    all-black one (rembg divides by 1e-6) and noise at an odd size."""
    from skimage import data as photos

    from bgwatch.samples import studio_shot

    shot = studio_shot(7, (640, 480)).rgb
    noise = np.random.default_rng(8).integers(0, 256, (333, 517, 3), dtype=np.uint8)
    return [photos.coffee(), shot, (shot // 3).astype(np.uint8), np.zeros((50, 70, 3), np.uint8), noise]


@pytest.mark.parametrize("model", ["u2net", "isnet-general-use", "isnet-anime", "birefnet-general"])
def test_net_input_is_rembgs_normalize_bit_for_bit(u2net_home: Path, model: str) -> None:
    """bgwatch's float32 tensor equals the one rembg's own BaseSession.normalize computes from the same
    image, for every family's size, mean and std (the session only names the input)."""
    from PIL import Image
    from rembg import new_session

    recipe = RECIPES[model]
    session = new_session("u2net_custom", model_path=str(u2net_home / "tiny.onnx"),
                          providers=["CPUExecutionProvider"])
    for rgb in _images()[: 5 if recipe.side == 320 else 3]:
        ours = net_input(rgb, recipe)
        (theirs,) = session.normalize(Image.fromarray(rgb), recipe.mean, recipe.std,
                                      (recipe.side, recipe.side)).values()
        assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
        assert ours.flags.c_contiguous
        assert np.array_equal(ours, theirs), f"{model}: {np.abs(ours - theirs).max()}"
