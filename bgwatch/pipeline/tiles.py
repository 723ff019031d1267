"""Full-resolution work in pieces: memory bounded by the pixels, never by a second full-size float copy.

Smooth things (a backdrop fit, a colour field, a blurred background) are computed small and read at full
resolution only where they are needed: a window of rows and columns (`upsample_window`), exactly where
cv2.resize (INTER_LINEAR) would have put it, without cv2.remap, whose maps and images must stay under
32767 pixels a side (a list of pixels is sampled by `edges.sample_at`, which lays it out in rows).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

STRIP_PIXELS = 1 << 20  # pixels per strip of full-resolution float work (~1 MP: 12 MB as float32 RGB)
POINT_CHUNK = 1 << 18  # pixels per chunk when values are computed for a list of pixels
# Pixels per strip of work whose temporaries are made and dropped strip after strip: small enough to stay in
# the CPU's cache and be handed back by the allocator strip after strip (fresh pages of a 4 MB temporary cost
# more than the arithmetic on them).
CACHE_PIXELS = 1 << 16


def strips(height: int, width: int, pixels: int = STRIP_PIXELS, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """(y0, y1) row ranges covering 0..height, each about `pixels` pixels, starting on a `multiple`."""
    rows = max(multiple, (pixels // max(width, 1)) // multiple * multiple)
    for y0 in range(0, height, rows):
        yield y0, min(y0 + rows, height)


def _taps(index: np.ndarray, step: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    position = np.clip((index + 0.5) * step - 0.5, 0.0, size - 1)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    return low, high, (position - low).astype(np.float32)


def upsample_window(field: np.ndarray, full: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """Rows y0:y1, columns x0:x1 of `field` (HxW or HxWxC) scaled bilinearly to full = (height, width),
    as float32, without making the whole full-size image."""
    h, w = field.shape[:2]
    y0, y1, x0, x1 = window
    iy0, iy1, wy = _taps(np.arange(y0, y1), h / full[0], h)
    ix0, ix1, wx = _taps(np.arange(x0, x1), w / full[1], w)
    if field.ndim == 3:
        wy, wx = wy[:, None, None], wx[None, :, None]
    else:
        wy, wx = wy[:, None], wx[None, :]
    rows_a = field[iy0].astype(np.float32, copy=False)
    rows = rows_a + (field[iy1] - rows_a) * wy
    left = rows[:, ix0]
    left += (rows[:, ix1] - left) * wx
    return np.asarray(left, np.float32)


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (the edge rows and columns repeated to fill the last block), as
    float32: cv2.resize's INTER_AREA for an exact integer factor, which is what runs it (several times
    faster than a numpy mean over reshaped axes); numpy for more channels than cv2 takes."""
    if factor == 1:
        return image.astype(np.float32)
    h, w = image.shape[:2]
    ph, pw = -h % factor, -w % factor
    out_h, out_w = (h + ph) // factor, (w + pw) // factor
    if image.ndim == 2 or image.shape[2] <= 4:
        import cv2

        image = np.ascontiguousarray(image, np.float32)
        if ph or pw:
            image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_REPLICATE)
        small = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return np.asarray(small.reshape(out_h, out_w, *image.shape[2:]), np.float32)
    if ph or pw:
        spec = ((0, ph), (0, pw)) + ((0, 0),) * (image.ndim - 2)
        image = np.pad(image, spec, mode="edge")
    shape = (out_h, factor, out_w, factor, *image.shape[2:])
    return np.asarray(image.reshape(shape).mean(axis=(1, 3), dtype=np.float32))


def nonzero_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), bottom and right exclusive, of a mask's nonzero pixels; None if none: the
    window the full-resolution work needs."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def runs(columns: np.ndarray, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """(firsts, lasts) of the runs of sorted indices `columns`: a new run starts wherever the next index lies
    more than `gap` beyond the last. Empty arrays for no columns."""
    if columns.size == 0:
        return columns[:0], columns[:0]
    breaks = np.flatnonzero(np.diff(columns) > gap)
    return np.concatenate(([columns[0]], columns[breaks + 1])), np.concatenate((columns[breaks], [columns[-1]]))
