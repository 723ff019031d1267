"""A raw mask made fit to cut with: specks removed, small holes filled, soft edges kept (never grown), and
the compact uint8 form masks travel in between the stages."""

from __future__ import annotations

import numpy as np

from bgwatch.pipeline.tiles import CACHE_PIXELS, nonzero_box, runs, strips

_ONE = np.ones(1, np.float64)  # OpenCV's scalar 1 (a 1-element array reads as a scalar)


def refine_mask(alpha: np.ndarray, *, post_process: bool) -> np.ndarray:
    """Clean a raw alpha (float in [0, 1], or uint8 0..255) into float32 HxW in [0, 1]: specks removed,
    small holes filled, edges kept soft (never grown: no halo). The work is done in the box around the
    solid pixels, in uint8; the soft edge is blurred only in pieces of rows and columns that hold the
    outline's band. The rest of the frame is 0, never written (np.zeros' untouched pages)."""
    import cv2

    if alpha.dtype == np.uint8:
        solid = np.greater(alpha, 127).view(np.uint8)
    else:
        alpha = np.clip(np.nan_to_num(alpha.astype(np.float32, copy=False)), 0.0, 1.0)
        solid = np.greater(alpha, 0.5).view(np.uint8)
    if not post_process or alpha.size == 0:
        return _as_float(alpha)
    h, w = alpha.shape
    box = nonzero_box(solid)
    if box is None:  # nothing over one half: no subject
        return np.zeros((h, w), np.float32)
    # Components, specks and holes are found in the box around everything solid (often half the frame):
    # the same components as in the whole frame, in less time.
    top, bottom, left, right = box
    radius = max(2, round(min(h, w) / 400))
    # The window: the box grown by the band's reach (and a pixel, so the erosion sees the 0s around it).
    y0, y1, x0, x1 = max(top - radius - 1, 0), min(bottom + radius + 1, h), max(left - radius - 1, 0), \
        min(right + radius + 1, w)
    kept = np.zeros((y1 - y0, x1 - x0), np.uint8)
    inner = kept[top - y0 : bottom - y0, left - x0 : right - x0]
    np.copyto(inner, solid[top:bottom, left:right])
    del solid
    _drop_specks(inner, min_area=0.002 * h * w)
    _fill_small_holes(kept, (top - y0, bottom - y0, left - x0, right - x0), max_area=0.0002 * h * w)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    band = cv2.dilate(kept, kernel)
    np.subtract(band, cv2.erode(kept, kernel), out=band)  # 1 on the outline's band, 0 elsewhere
    out = np.zeros((h, w), np.float32)
    out[y0:y1, x0:x1] = kept
    del kept
    # Near the outline keep the engine's own soft values, smoothed only of single-pixel jaggies: both
    # engines now make their edges at full resolution (the nets' masks are upsampled along the photo's
    # edges, edges.py), and a blur growing with the image (min(h, w) / 1600 before) doubled the edge-band
    # error of a 24 MP cut (bench/bench_edges.py).
    sigma = 0.6
    pad = int(4 * sigma) + 2
    row_start, row_end = max(x0 - pad, 0), min(x1 + pad, w)
    for s0, s1, c0, c1 in _band_pieces(band, pad):
        rows = band[s0:s1, c0:c1].view(bool)
        # each piece read with `pad` more on every side (or the frame's edge): every value is the one a
        # blur of the whole frame gives
        p0, p1 = max(y0 + s0 - pad, 0), min(y0 + s1 + pad, h)
        # OpenCV filters a row's last (width % its SIMD width) pixels in scalar code, which rounds a little
        # differently. Each piece is cut from the columns a blur of the window's whole rows reads (from
        # row_start to row_end), on its SIMD blocks, and runs to that row's end where it reaches its scalar
        # tail: every value is that blur's, to the bit.
        q0 = row_start + (max(x0 + c0 - pad, row_start) - row_start) // SIMD_FLOATS * SIMD_FLOATS
        q1 = q0 + -(-(x0 + c1 + pad - q0) // SIMD_FLOATS) * SIMD_FLOATS
        if q1 > row_end - (row_end - row_start) % SIMD_FLOATS:
            q1 = row_end
        soft = cv2.GaussianBlur(_as_float(alpha[p0:p1, q0:q1]), (0, 0), sigma)
        top_in, left_in = y0 + s0 - p0, x0 + c0 - q0
        np.copyto(out[y0 + s0 : y0 + s1, x0 + c0 : x0 + c1],
                  soft[top_in : top_in + s1 - s0, left_in : left_in + c1 - c0], where=rows)
    return out


SIMD_FLOATS = 16  # floats in the widest SIMD register OpenCV uses here (AVX-512); a multiple of narrower ones
BAND_ROWS = 32  # rows of the band blurred at a time: its columns are cut into the runs the band covers


def _band_pieces(band: np.ndarray, gap: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) pieces covering every nonzero pixel of `band`: strips of BAND_ROWS rows, each cut
    into the runs of columns the band covers there (runs closer than 2 * gap + 1 joined: each piece is read
    with `gap` more around it)."""
    pieces = []
    for y0 in range(0, band.shape[0], BAND_ROWS):
        y1 = min(y0 + BAND_ROWS, band.shape[0])
        cols = np.flatnonzero(band[y0:y1].any(axis=0))
        if cols.size == 0:
            continue
        starts, lasts = runs(cols, 2 * gap + 1)
        pieces += [(y0, y1, int(a), int(b) + 1) for a, b in zip(starts, lasts, strict=True)]
    return pieces


def _drop_specks(solid: np.ndarray, min_area: float) -> None:
    """Clear, in place, the 8-connected pieces of a uint8 0/1 plane that are specks: small for the frame
    (below min_area pixels) and next to the largest piece (below 5 % of it). A second product is not a
    speck. cv2.findContours counts the pieces (one outer border each, those inside another's holes too:
    the top level of RETR_CCOMP) in a fraction of the labelling's time: one piece, the usual, is kept
    without labelling."""
    import cv2

    _, hierarchy = cv2.findContours(solid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None or (hierarchy[0, :, 3] < 0).sum() <= 1:
        return
    # cv2's labelling without its statistics, the areas counted by numpy: several times faster
    n, labels = cv2.connectedComponents(solid, connectivity=8, ltype=cv2.CV_32S)
    areas = np.bincount(labels.ravel(), minlength=n)[1:]
    keep = np.zeros(n, bool)
    keep[1:] = (areas >= min_area) | (areas >= 0.05 * areas.max())
    if not keep[1:].all():
        np.copyto(solid, keep[labels].view(np.uint8))


def _fill_small_holes(solid: np.ndarray, box: tuple[int, int, int, int], max_area: float) -> None:
    """Fill, in place, the background's 4-connected pieces of at most max_area pixels that do not reach
    the frame's edge. `solid` is the frame, or a window of it that holds `box` (every solid pixel) and
    ends a pixel past it where the frame does not end: that ring is all background, so a piece reaching the
    window's edge reaches the frame's edge too (everything outside is background and runs to the frame's
    edge), and a piece that does not is the same piece it is in the whole frame. cv2.findContours says
    whether there is a hole at all (a hole's border, one level down) before any labelling."""
    import cv2

    top, bottom, left, right = box
    h, w = solid.shape
    top, bottom, left, right = max(top - 1, 0), min(bottom + 1, h), max(left - 1, 0), min(right + 1, w)
    inside = solid[top:bottom, left:right]
    _, hierarchy = cv2.findContours(inside, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None or (hierarchy[0, :, 3] < 0).all():
        return
    # A hole's border may also be a notch open to the window's edge only through the frame's own edge
    # (findContours pads the window with background); the labelling below decides.
    n, labels = cv2.connectedComponents(np.equal(inside, 0).view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    areas = np.bincount(labels.ravel(), minlength=n)
    fill = areas <= max_area
    fill[0] = False  # label 0: the solid pixels
    fill[labels[0]] = fill[labels[-1]] = fill[labels[:, 0]] = fill[labels[:, -1]] = False
    if fill.any():
        inside |= fill[labels].view(np.uint8)


def _as_float(alpha: np.ndarray) -> np.ndarray:
    if alpha.dtype == np.uint8:
        return np.asarray(alpha.astype(np.float32) * np.float32(1 / 255))
    return np.asarray(alpha, np.float32)


def to_alpha8(alpha: np.ndarray) -> np.ndarray:
    """A float alpha in [0, 1] (NaN as 0, above 1 as 1) as uint8 0..255, rounded; converted in strips of
    rows (small: their float temporary stays in the cache) by OpenCV, which scales, rounds and saturates in
    one pass (numpy took four)."""
    import cv2

    if alpha.dtype == np.uint8:
        return alpha
    h, w = alpha.shape
    out = np.empty((h, w), np.uint8)
    for y0, y1 in strips(h, w, CACHE_PIXELS):
        # NaN stays NaN here (OpenCV turns it into 0); +inf becomes 1 (OpenCV would make it 0 too). Scaled in
        # float32, then rounded half to even and saturated by OpenCV's conversion, as np.round and np.clip.
        # (np.clip between two bounds: numpy's minimum against a scalar runs a slow broadcast loop.)
        rows = np.clip(alpha[y0:y1], -np.inf, np.float32(1), dtype=np.float32)
        rows *= np.float32(255)
        cv2.multiply(rows, _ONE, dst=out[y0:y1], dtype=cv2.CV_8U)
    return out
