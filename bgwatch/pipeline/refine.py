"""A raw mask made fit to cut with: specks removed, small holes filled, soft edges kept (never grown), and
the compact uint8 form masks travel in between the stages."""

from __future__ import annotations

import numpy as np

from bgwatch.pipeline.tiles import nonzero_box, strips

_ONE = np.ones(1, np.float64)  # OpenCV's scalar 1 (a 1-element array reads as a scalar)


def refine_mask(alpha: np.ndarray, *, post_process: bool) -> np.ndarray:
    """Clean a raw alpha (float in [0, 1], or uint8 0..255) into float32 HxW in [0, 1]: specks removed,
    small holes filled, edges kept soft (never grown: no halo). Full-size work is in uint8 planes and one
    int32 label plane at a time; the soft edge is blurred in strips of rows."""
    import cv2

    if alpha.dtype == np.uint8:
        solid = (alpha > 127).astype(np.uint8)
    else:
        alpha = np.clip(np.nan_to_num(alpha.astype(np.float32, copy=False)), 0.0, 1.0)
        solid = (alpha > 0.5).astype(np.uint8)
    if not post_process or alpha.size == 0:
        return _as_float(alpha)
    h, w = alpha.shape
    box = nonzero_box(solid)
    if box is None:  # nothing over one half: no subject
        return np.zeros((h, w), np.float32)
    # Components, specks and holes are found in the box around everything solid (often half the frame):
    # the same components as in the whole frame, in less time.
    top, bottom, left, right = box
    inside = solid[top:bottom, left:right]
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inside, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, bool)
    # A speck is small both for the frame and next to the subject; a second product is not a speck.
    keep[1:] = (areas >= 0.002 * h * w) | (areas >= 0.05 * areas.max())
    kept = np.zeros((h, w), bool)
    kept[top:bottom, left:right] = inside.view(bool) if keep[1:].all() else keep[labels]
    del labels, solid, inside
    kept |= _small_holes(kept, max_area=0.0002 * h * w, box=box)
    radius = max(2, round(min(h, w) / 400))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    k8 = kept.view(np.uint8)
    band = cv2.dilate(k8, kernel)
    np.subtract(band, cv2.erode(k8, kernel), out=band)  # 1 on the outline's band, 0 elsewhere
    out = kept.astype(np.float32)
    del kept, k8
    # Near the outline keep the engine's own soft values, smoothed only of single-pixel jaggies: both
    # engines now make their edges at full resolution (the nets' masks are upsampled along the photo's
    # edges, edges.py), and a blur growing with the image (min(h, w) / 1600 before) doubled the edge-band
    # error of a 24 MP cut (bench/bench_edges.py).
    sigma = 0.6
    pad = int(4 * sigma) + 2
    # The band lies within the solid box grown by the kernel: only those columns are blurred (each read with
    # `pad` more either side, or the frame's edge, so every value is the one a whole-row blur gives).
    x0, x1 = max(left - radius - 1, 0), min(right + radius + 1, w)
    q0, q1 = max(x0 - pad, 0), min(x1 + pad, w)
    for y0, y1 in strips(h, x1 - x0):
        rows = band[y0:y1, x0:x1].view(bool)
        if not rows.any():
            continue
        p0, p1 = max(y0 - pad, 0), min(y1 + pad, h)
        soft = cv2.GaussianBlur(_as_float(alpha[p0:p1, q0:q1]), (0, 0), sigma)
        np.copyto(out[y0:y1, x0:x1], soft[y0 - p0 : y1 - p0, x0 - q0 : x1 - q0], where=rows)
    return np.asarray(out)


def _as_float(alpha: np.ndarray) -> np.ndarray:
    if alpha.dtype == np.uint8:
        return np.asarray(alpha.astype(np.float32) * np.float32(1 / 255))
    return np.asarray(alpha, np.float32)


def to_alpha8(alpha: np.ndarray) -> np.ndarray:
    """A float alpha in [0, 1] (NaN as 0, above 1 as 1) as uint8 0..255, rounded; converted in strips of
    rows by OpenCV, which scales, rounds and saturates in one pass (numpy took four)."""
    import cv2

    if alpha.dtype == np.uint8:
        return alpha
    h, w = alpha.shape
    out = np.empty((h, w), np.uint8)
    for y0, y1 in strips(h, w):
        # NaN stays NaN here (OpenCV turns it into 0); +inf becomes 1 (OpenCV would make it 0 too). Scaled in
        # float32, then rounded half to even and saturated by OpenCV's conversion, as np.round and np.clip.
        rows = np.minimum(alpha[y0:y1], np.float32(1), dtype=np.float32)
        rows *= np.float32(255)
        cv2.multiply(rows, _ONE, dst=out[y0:y1], dtype=cv2.CV_8U)
    return out




def _small_holes(solid: np.ndarray, max_area: float, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The background's 4-connected pieces of at most max_area pixels that do not reach the frame's edge.

    With `box` (holding every solid pixel) they are found in it, grown by one pixel a side: that ring is
    all background, so a piece reaching the grown box's edge reaches the frame's edge too (everything
    outside the box is background and runs to the frame's edge), and a piece that does not is the same
    piece it is in the whole frame."""
    import cv2

    h, w = solid.shape
    top, bottom, left, right = (0, h, 0, w) if box is None else box
    top, bottom, left, right = max(top - 1, 0), min(bottom + 1, h), max(left - 1, 0), min(right + 1, w)
    inside = solid[top:bottom, left:right]
    bh, bw = inside.shape
    _, labels, stats, _ = cv2.connectedComponentsWithStats((~inside).astype(np.uint8), connectivity=4)
    x, y, ww, hh, area = (stats[:, i] for i in range(5))
    inner = (x > 0) & (y > 0) & (x + ww < bw) & (y + hh < bh) & (area <= max_area)
    inner[0] = False
    holes = np.zeros((h, w), bool)
    if inner.any():
        holes[top:bottom, left:right] = inner[labels]
    return holes
