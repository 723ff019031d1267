"""The subject's own colours: blur fusion (Forte & Pitié, "Approximate fast foreground colour estimation",
ICIP 2021), in bands of rows.

An edge pixel of a photo is a mix I = aF + (1-a)B of the subject and the old background. B and F are local
alpha-weighted means (box filters), and F = F_mean + a(I - a F_mean - (1-a) B), run at a coarse then a fine
radius. Where a = 1, F is I.

`BandedFusion` gives the values the whole-image filters give, band by band, for the composite, whose
subject can fill a 100 MP frame: the coarse box means (radius ~9% of the image's side) are running sums
down the rows, so no band re-reads the rows above it, and the fine pass (radius ~0.6%) runs on each band
grown by its radius. Float memory is a few bands, never a plane of the whole box.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np

EPS = 1e-5  # keeps the alpha-weighted means finite where there is no subject (or no background) around
# Pixels a band of rows: its float work holds ~100 bytes a pixel (seven planes, each made, filtered across and
# summed down), so a quarter megapixel keeps that under 30 MB while numpy's calls stay long.
BAND_PIXELS = 1 << 18


def as_alpha(alpha: np.ndarray) -> np.ndarray:
    """A fresh float32 copy of `alpha` (float [0, 1] or uint8 0..255; HxW or HxWx1), clipped to [0, 1]."""
    if alpha.ndim == 3:
        alpha = alpha[..., 0]
    a = alpha.astype(np.float32)
    if alpha.dtype == np.uint8:
        a /= 255.0
    return np.clip(a, 0.0, 1.0, out=a)


def as_float_rgb(image: np.ndarray) -> np.ndarray:
    """A fresh float32 copy of an RGB image (uint8 read as /255)."""
    if image.dtype == np.uint8:
        return np.asarray(image.astype(np.float32) / 255.0)
    return np.array(image, np.float32)


class _RunningBox:
    """Rows of cv2.blur(plane, (2r+1, 2r+1), BORDER_REPLICATE) for each of a few planes that are never made
    whole, asked for top to bottom: `rows_of(y0, y1)` makes their rows y0:y1 (float32, HxW or HxWxC, up to
    4 channels: OpenCV's fastest). Box filters are separable: each row is box-filtered across (cv2, exact
    borders), and the sum down the rows is kept running, adding the row that enters the window and
    subtracting the one that leaves it (made again: cheaper than keeping 2r+1 rows). Rows outside the
    planes repeat their edge rows, as the replicated border does."""

    def __init__(self, rows_of: Callable[[int, int], tuple[np.ndarray, ...]], shape: tuple[int, int],
                 radius: int) -> None:
        self.rows_of, self.radius = rows_of, radius
        self.height, self.width = shape
        self.next_row = -1  # the first row asked for starts the running sums
        self.totals: list[np.ndarray] = []  # each window's sum for row next_row - 1

    def _across(self, index: np.ndarray) -> list[np.ndarray]:
        """Rows `index` (ascending, consecutive but for repeats of an edge row), box-filtered across."""
        import cv2

        lo, hi = int(index[0]), int(index[-1]) + 1
        blocks = [cv2.blur(plane, (2 * self.radius + 1, 1), borderType=cv2.BORDER_REPLICATE)
                  for plane in self.rows_of(lo, hi)]
        return blocks if hi - lo == index.size else [block[index - lo] for block in blocks]

    def _clamped(self, y0: int, y1: int) -> np.ndarray:
        return np.clip(np.arange(y0, y1), 0, self.height - 1)

    def _start(self, y: int) -> list[np.ndarray]:
        """The windows' sums for row y - 1, in float64, made in chunks of rows."""
        r = self.radius
        rows = self._clamped(y - r - 1, y + r)
        lo = int(rows[0])
        counts = np.bincount(rows - lo).astype(np.float64)
        totals: list[np.ndarray] = []
        step = max(1, BAND_PIXELS // max(1, self.width))
        for k0 in range(0, counts.size, step):
            k1 = min(k0 + step, counts.size)
            blocks = self._across(np.arange(lo + k0, lo + k1))
            parts = [np.tensordot(counts[k0:k1], block, axes=(0, 0)) for block in blocks]
            totals = parts if not totals else [t + p for t, p in zip(totals, parts, strict=True)]
        return totals

    def rows(self, y0: int, y1: int) -> list[np.ndarray]:
        """Rows y0:y1 of each plane's box means, float32; y0 is where the previous call ended (any row at
        first). The running sums are float32 (a 100 MP plane's drift stays under 1e-5)."""
        if not self.totals:
            self.totals, self.next_row = self._start(y0), y0
        assert y0 == self.next_row and y1 > y0, (y0, y1, self.next_row)
        r = self.radius
        means, totals = [], []
        leaving = self._across(self._clamped(y0 - r - 1, y1 - r - 1))
        for sums, gone, total in zip(self._across(self._clamped(y0 + r, y1 + r)), leaving, self.totals, strict=True):
            sums -= gone
            sums[0] += total
            for i in range(1, sums.shape[0]):  # running down the rows (np.cumsum on axis 0 is ~10x slower)
                np.add(sums[i], sums[i - 1], out=sums[i])
            totals.append(sums[-1].astype(np.float64))
            sums *= np.float32(1 / (2 * r + 1))
            means.append(sums)
        self.totals, self.next_row = totals, y1
        return means


class _Kept:
    """Rows of a plane, made in pieces top to bottom and kept while the bands below still need them."""

    def __init__(self) -> None:
        self.pieces: list[tuple[int, np.ndarray]] = []  # (first row, rows), in order, without gaps

    def add(self, start: int, rows: np.ndarray) -> None:
        assert not self.pieces or start == self.pieces[-1][0] + self.pieces[-1][1].shape[0]
        self.pieces.append((start, rows))

    def get(self, y0: int, y1: int) -> np.ndarray:
        """Rows y0:y1 as one contiguous array."""
        parts = [rows[max(0, y0 - top) : y1 - top] for top, rows in self.pieces if top < y1 and y0 < top + len(rows)]
        assert sum(len(part) for part in parts) == y1 - y0, (y0, y1)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def drop_before(self, y: int) -> None:
        self.pieces = [(top, rows) for top, rows in self.pieces if top + len(rows) > y]


class BandedFusion:
    """Blur fusion of a region (`src` HxWx3 uint8 or float, `alpha` HxW float [0, 1] or uint8) at (coarse,
    fine) radii, band by band: `bands()` yields F on the rows and columns of `inner` = (e0, e1, f0, f1), and
    with `with_bg` fills `old_bg` with B_old on every 4th pixel each way of the whole region — the values
    estimate_foreground gives on the region (to float rounding).

    F is made only where it is used (inner, and the fine radius around it for the fine pass); B_old's
    fine pass covers the whole region, where the old background is."""

    def __init__(self, src: np.ndarray, alpha: np.ndarray, radii: tuple[int, int],
                 inner: tuple[int, int, int, int], with_bg: bool) -> None:
        self.src, self.alpha, self.inner, self.with_bg = src, alpha, inner, with_bg
        self.coarse, self.fine = radii
        rh, rw = alpha.shape[:2]
        e0, e1, f0, f1 = inner
        self.shape = (rh, rw)
        self.crop_rows = (max(0, e0 - self.fine), min(rh, e1 + self.fine))
        self.crop_cols = (max(0, f0 - self.fine), min(rw, f1 + self.fine))
        # B_old's planes cover the region's width where it is wanted, else only the columns F needs.
        self.bg_cols = (0, rw) if with_bg else self.crop_cols
        self.old_bg = np.empty(((rh + 3) // 4, (rw + 3) // 4, 3), np.float32) if with_bg else None
        # The coarse box means of a, I a and I (1 - a), made a band at a time.
        self._coarse = _RunningBox(self._coarse_inputs, self.shape, self.coarse)
        self._a, self._fg_a, self._bg_a = _Kept(), _Kept(), _Kept()  # a, F_coarse a and (1-a) B_coarse
        self._made = -1  # coarse rows made so far end here

    def _alpha_rows(self, y0: int, y1: int) -> np.ndarray:
        return as_alpha(self.alpha[y0:y1])

    def _image_rows(self, y0: int, y1: int, cols: tuple[int, int] | None = None) -> np.ndarray:
        rows = self.src[y0:y1] if cols is None else self.src[y0:y1, cols[0] : cols[1]]
        return as_float_rgb(rows)

    def _coarse_inputs(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows y0:y1 of (a, I a) as one 4-channel plane, and of I (1 - a)."""
        a = self._alpha_rows(y0, y1)[..., None]
        image = self._image_rows(y0, y1)
        with_fg = np.empty((*image.shape[:2], 4), np.float32)
        with_fg[..., :1] = a
        np.multiply(image, a, out=with_fg[..., 1:])
        image *= 1.0 - a
        return with_fg, image

    def _make_coarse(self, y0: int, y1: int) -> None:
        """The coarse pass on rows y0:y1 (the previous call's end, or any row at first): the planes the
        fine pass blurs, kept. Made a sixteenth of a band at a time (at least 8 rows, so that a wide
        image is not made row by row): each row's running sums take a hundred bytes a pixel meanwhile."""
        step = max(8, BAND_PIXELS // 16 // max(1, self.shape[1]))
        for c0 in range(y0, y1, step):
            self._make_coarse_rows(c0, min(c0 + step, y1))

    def _make_coarse_rows(self, y0: int, y1: int) -> None:
        a = self._alpha_rows(y0, y1)
        means, with_bg = self._coarse.rows(y0, y1)
        b0, b1 = self.bg_cols
        old_bg = with_bg[:, b0:b1] / (1.0 - means[:, b0:b1, :1] + EPS)  # blur(I (1-a)) / blur(1-a)
        old_bg *= (1.0 - a[:, b0:b1])[..., None]
        self._bg_a.add(y0, old_bg)
        self._a.add(y0, a)
        c0, c1 = max(y0, self.crop_rows[0]), min(y1, self.crop_rows[1])
        if c1 <= c0:
            return
        d0, d1 = self.crop_cols
        part = means[c0 - y0 : c1 - y0, d0:d1]
        mean_fg = part[..., 1:4] / (part[..., :1] + EPS)
        bg_part = old_bg[c0 - y0 : c1 - y0, d0 - b0 : d1 - b0]
        a_c = a[c0 - y0 : c1 - y0, d0:d1, None]
        self._fg_a.add(c0, _solve(self._image_rows(c0, c1, self.crop_cols), a_c, mean_fg, bg_part) * a_c)

    def bands(self, band_rows: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """(t0, t1, F): F (float32, t1-t0 x f1-f0 x 3) for rows e0+t0:e0+t1 and columns f0:f1 of the region,
        top to bottom; once they are all given, old_bg is complete. `band_rows`: rows a band (default:
        about BAND_PIXELS pixels, at least twice the fine radius, so a band's margins cost at most itself)."""
        rh, rw = self.shape
        e0, e1, f0, f1 = self.inner
        r = self.fine
        if band_rows is None:
            band_rows = max(BAND_PIXELS // max(rw, 1), 2 * r, 1)
        lo, hi = (0, rh) if self.with_bg else (e0, e1)
        edges = sorted({lo, hi, *(y for y in (e0, e1) if lo < y < hi)})  # a band is all in F's rows, or none
        b0, b1 = self.bg_cols
        d0, d1 = self.crop_cols
        for part0, part1 in itertools.pairwise(edges):
            for s0 in range(part0, part1, band_rows):
                s1 = min(s0 + band_rows, part1)
                q0, q1 = max(0, s0 - r), min(rh, s1 + r)  # the band grown by the fine radius
                if self._made < 0:
                    self._made = q0
                if q1 > self._made:
                    self._make_coarse(self._made, q1)
                    self._made = q1
                mean_a = self._fine_box(self._a, (s0, s1), (q0, q1))
                mean_bg = self._fine_box(self._bg_a, (s0, s1), (q0, q1))
                mean_bg /= (1.0 - mean_a[:, b0:b1] + EPS)[..., None]  # the fine B_old
                if self.old_bg is not None:
                    first = -(-s0 // 4) * 4
                    self.old_bg[first // 4 : -(-s1 // 4)] = np.clip(mean_bg[first - s0 :: 4, ::4], 0.0, 1.0)
                if e0 <= s0 and s1 <= e1:
                    mean_fg = self._fine_box(self._fg_a, (s0, s1), (q0, q1))
                    mean_fg /= (mean_a[:, d0:d1] + EPS)[..., None]
                    a = self._a.get(s0, s1)[:, d0:d1, None]
                    bg_part = mean_bg[:, d0 - b0 : d1 - b0]
                    bg_part *= 1.0 - a
                    fg = _solve(self._image_rows(s0, s1, self.crop_cols), a, mean_fg, bg_part)
                    yield s0 - e0, s1 - e0, fg[:, f0 - d0 : f1 - d0]
                keep = max(0, s1 - r)  # the next band's top margin
                self._a.drop_before(keep)
                self._bg_a.drop_before(keep)
                self._fg_a.drop_before(keep)

    def _fine_box(self, kept: _Kept, band: tuple[int, int], grown: tuple[int, int]) -> np.ndarray:
        """Rows band[0]:band[1] of the fine box means of a kept plane, filtered over its rows `grown`: the
        band and the fine radius around it (or the region's edge, replicated as the whole region's is)."""
        import cv2

        size = (2 * self.fine + 1,) * 2
        blurred = np.asarray(cv2.blur(kept.get(*grown), size, borderType=cv2.BORDER_REPLICATE), np.float32)
        return blurred[band[0] - grown[0] : band[1] - grown[0]]


def _solve(image: np.ndarray, a: np.ndarray, mean_fg: np.ndarray, bg_part: np.ndarray) -> np.ndarray:
    """clip(mean_fg + a (I - a mean_fg - bg_part)), bg_part = (1 - a) B, in `image`'s array."""
    out = image
    out -= a * mean_fg
    out -= bg_part
    out *= a
    out += mean_fg
    return np.asarray(np.clip(out, 0.0, 1.0, out=out))
