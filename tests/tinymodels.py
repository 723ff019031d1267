"""Tiny real models the tests and benchmarks build themselves (no network, no torch needed).

Each builder is self-contained: it writes its model files and returns where they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# rembg's u2net-style sessions feed the net (x / max(x) - mean) / std per channel at 320x320.
_REMBG_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_REMBG_STD = np.array([0.229, 0.224, 0.225], np.float32)


def build_tiny_onnx(u2net_home: Path, name: str = "tiny.onnx", *, side: int = 320,
                    mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                    logits: bool = False) -> Path:
    """A conv -> relu -> conv -> sigmoid segmentation net (1x3x320x320 -> 1x1x320x320) in
    `u2net_home/name`, for rembg's `u2net_custom` session. `side`, `mean`, `std`: another family's input
    (isnet, birefnet: 1024, their normalisation); `logits`: no final sigmoid (BiRefNet's output is a logit).

    The weights are chosen, not trained: the first layer measures darkness and the six pairwise channel
    differences (saturation), the second smooths and sums them, so anything darker or more colourful
    than a light studio backdrop comes out as subject and the backdrop (and a grey shadow on it, mostly)
    as background.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # First layer, written for the un-normalised pixel x in [0, 1] and then folded through rembg's
    # normalisation: x = n * std + mean.
    pairs = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    per_x = np.zeros((7, 3), np.float32)
    bias_x = np.zeros(7, np.float32)
    per_x[0] = -1.0 / 3.0  # darkness: 0.55 - mean(x)
    bias_x[0] = 0.55
    for k, (i, j) in enumerate(pairs, start=1):  # saturation: x_i - x_j beyond a small tolerance
        per_x[k, i], per_x[k, j] = 1.0, -1.0
        bias_x[k] = -0.06
    w1 = np.zeros((7, 3, 3, 3), np.float32)
    in_mean = _REMBG_MEAN if mean is None else np.array(mean, np.float32)
    in_std = _REMBG_STD if std is None else np.array(std, np.float32)
    w1[:] = (per_x * in_std[None, :])[:, :, None, None] / 9.0  # 3x3 average of the per-pixel feature
    b1 = bias_x + per_x @ in_mean

    gains = np.array([14.0] + [9.0] * 6, np.float32)
    w2 = np.zeros((1, 7, 5, 5), np.float32)
    w2[0] = gains[:, None, None] / 25.0
    b2 = np.array([-2.5], np.float32)

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("Conv", ["h2", "w2", "b2"], ["h3" if not logits else "output"], pads=[2, 2, 2, 2],
                             kernel_shape=[5, 5]),
            *([] if logits else [helper.make_node("Sigmoid", ["h3"], ["output"])]),
        ],
        "tiny_mask",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, side, side])],
        initializer=[
            numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1.astype(np.float32), "b1"),
            numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bgwatch")
    model.ir_version = 8  # readable by every onnxruntime that rembg 2.x supports
    onnx.checker.check_model(model)
    u2net_home.mkdir(parents=True, exist_ok=True)
    path = u2net_home / name
    path.write_bytes(model.SerializeToString())
    return path
