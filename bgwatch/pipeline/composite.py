"""Putting the cut-out subject on its new backdrop so it looks photographed there, not pasted.

    composite(rgb, alpha, backdrop, spec) -> HxWx3 uint8

In order:
1. Foreground colours. An edge pixel of the photo is a mix I = aF + (1-a)B_old of the subject and the
   old background; pasting I as it is drags a rim of the old background (a halo) onto the new one. The
   subject's own colour F is estimated by blur fusion, band by band (foreground.py).
2. enhance_fg: CLAHE on the subject's lightness (cleanup.enhance_foreground).
3. match_colors: the subject is relit from the old scene's ambient light to the new one's — a bounded
   shift of means in CIELAB (lightness at most 5, chroma cast at most 4, so a product keeps its true
   colour: at most ~6.4 ΔE76) — plus a light wrap: the blurred backdrop bleeds a little onto the
   subject's rim, as light does around a real edge.
4. feather_edges: the alpha edge is softened by a Gaussian whose width follows the image size (sigma one
   pixel per 1024 px of the longer side, at least 0.6), hiding the stair-steps of hard masks without
   eating the subject (a Gaussian keeps a straight edge's half-coverage line where it was).
5. shadow: a soft contact shadow under each object — an ellipse at its base (the bottom of its mask),
   a tight dark core and a wide soft penumbra — multiplied onto the backdrop, below the base only.

Heavy work runs on the subject's bounding box (padded for the blurs) in bands of rows, each grown by the
reach of its blurs so that the result does not depend on where the bands fall (the coarse box means of the
colour estimate run down the rows instead: their reach is a tenth of the image). Colours are blended into
the uint8 result only where the subject's alpha reaches; with match_colors they wait for the colour shift
(which reads the whole old background) as 16-bit values, 6 bytes a pixel of the box. The rest of the frame
is the backdrop, darkened by the shadow, which is kept as small canvases and read at full size strip by
strip. A whole replace job peaks at about 25 bytes a pixel, even when the product fills the frame.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from bgwatch.jobs import JobSpec
from bgwatch.pipeline.foreground import BAND_PIXELS, BandedFusion, as_alpha, as_float_rgb
from bgwatch.pipeline.tiles import strips, upsample_window

ALPHA_EPS = 1.0 / 512
MAX_DELTA_L = 5.0  # CIELAB lightness units
MAX_DELTA_AB = 4.0  # CIELAB chroma units
L_GAIN = 0.08  # share of the old-vs-new ambient lightness difference applied to the subject
AB_GAIN = 0.25  # share of the old-vs-new colour cast applied
WRAP_STRENGTH = 0.3
SHADOW_CORE = 0.45
SHADOW_PENUMBRA = 0.3
BLEND_MARGINS = 4  # a blend band is at least this many times its blurs' reach: margins cost at most half


def composite(rgb: np.ndarray, alpha: np.ndarray, backdrop: np.ndarray, spec: JobSpec, *,
              band_rows: int | None = None) -> np.ndarray:
    """The subject of `rgb` (coverage `alpha`, float [0,1] or uint8 HxW) over `backdrop`, same size as
    `rgb`. The result is the (shaded) backdrop written strip by strip into a uint8 image; the subject's box
    (padded for the blurs) is then worked in bands of rows (`band_rows`, default: chosen from the blur
    radii) and blended into it only where the subject's alpha reaches. The result does not depend on the
    band size. The shadow is kept as small canvases, read at full size one strip at a time."""
    h, w = rgb.shape[:2]
    if alpha.ndim == 3:
        alpha = alpha[..., 0]
    if backdrop.shape[:2] != (h, w):
        from bgwatch.pipeline.backgrounds import fit_cover

        backdrop = fit_cover(backdrop, w, h)
    side = max(h, w)
    feather_sigma = max(0.6, side / 1024.0) if spec.feather_edges else 0.0
    shade = _shadow_stamps(alpha) if spec.shadow else None
    out = np.empty((h, w, 3), np.uint8)
    box = None
    for s0, s1 in strips(h, w):
        out[s0:s1] = _shaded_rows(backdrop, shade, (s0, s1, 0, w))
        box = _union(box, _box(as_alpha(alpha[s0:s1]) > ALPHA_EPS), s0)
    if box is None:
        return out
    coarse, fine = max(3, round(0.09 * side)), max(1, round(0.006 * side))
    wrap_sigma = max(1.5, 0.006 * side)
    pad = coarse + int(3 * max(wrap_sigma, feather_sigma)) + 2
    y0, y1 = max(0, box[0] - pad), min(h, box[1] + 1 + pad)
    x0, x1 = max(0, box[2] - pad), min(w, box[3] + 1 + pad)
    rh, rw = y1 - y0, x1 - x0
    region_alpha = alpha[y0:y1, x0:x1]
    # Where the result can differ from the backdrop: where the (feathered) alpha is above zero. OpenCV's
    # Gaussian kernels for float images reach 4 sigma: the box grown by that and a margin.
    reach = int(np.ceil(4 * feather_sigma)) + 2 if feather_sigma else 1
    inner = (max(0, box[0] - y0 - reach), min(rh, box[1] + 1 - y0 + reach),
             max(0, box[2] - x0 - reach), min(rw, box[3] + 1 - x0 + reach))
    e0, e1, f0, f1 = inner
    src = rgb[y0:y1, x0:x1]
    if spec.enhance_fg:
        src = _enhance(src, region_alpha)
    blend = _Blend(out, backdrop, shade, region_alpha, (y0, x0), inner, feather_sigma)
    fusion = BandedFusion(src, region_alpha, (coarse, fine), inner, spec.match_colors)
    if not spec.match_colors:  # each band of the subject's colours is blended as soon as it is made
        for t0, t1, fg in fusion.bands(band_rows):
            blend.rows(t0, t1, functools.partial(_rows_of, fg, t0))
        return out
    # Matching reads the whole old background first: the colours wait, 16-bit, in a box of their own.
    blend.glow = _glow_field(backdrop, shade, (y0, y1, x0, x1), wrap_sigma)
    blend.wrap_sigma = wrap_sigma
    a4 = as_alpha(region_alpha[::4, ::4])
    fg_sampled = None
    if float((1.0 - a4).sum()) < 1.0:  # the subject fills the frame: its own colours are read
        fg_sampled = as_float_rgb(src[::4, ::4])
    kept = np.empty((e1 - e0, f1 - f0, 3), np.uint16)
    for t0, t1, fg in fusion.bands(band_rows):
        if fg_sampled is not None:
            i0, j0 = -(-(e0 + t0) // 4), -(-f0 // 4)
            part = fg[4 * i0 - e0 - t0 :: 4, 4 * j0 - f0 :: 4]
            fg_sampled[i0 : i0 + part.shape[0], j0 : j0 + part.shape[1]] = part
        fg *= 65535.0
        kept[t0:t1] = np.rint(fg, out=fg)
    del src
    assert fusion.old_bg is not None
    blend.shift = _color_shift(a4, fusion.old_bg, _sampled_backdrop(backdrop, shade, 4), fg_sampled)
    del fusion, fg_sampled

    def kept_rows(s0: int, s1: int) -> np.ndarray:
        fg = kept[s0:s1].astype(np.float32)
        fg *= np.float32(1 / 65535)
        return fg

    ov = blend.overlap()
    rows = band_rows or max(BAND_PIXELS // max(rw, 1), BLEND_MARGINS * ov, 1)
    for t0 in range(0, e1 - e0, rows):
        blend.rows(t0, min(t0 + rows, e1 - e0), kept_rows)
    return out


class _Blend:
    """Blends the subject's colours into `out`, rows of the inner box at a time: F (after the colour shift
    and light wrap, when there are) times the feathered alpha over the shaded backdrop. The feathered
    alpha and the wrap's softer one are made for each band from the band grown by their blurs' reach."""

    def __init__(self, out: np.ndarray, backdrop: np.ndarray, shade: Shadow | None, region_alpha: np.ndarray,
                 origin: tuple[int, int], inner: tuple[int, int, int, int], feather_sigma: float) -> None:
        self.out, self.backdrop, self.shade, self.region_alpha = out, backdrop, shade, region_alpha
        self.origin, self.inner, self.feather_sigma = origin, inner, feather_sigma
        self.shift: tuple[float, np.ndarray] | None = None
        self.glow: tuple[int, np.ndarray] | None = None  # the light wrap's (k, field), with wrap_sigma
        self.wrap_sigma = 0.0

    def overlap(self) -> int:
        """Rows (and columns) beyond a band that its blurred alphas read."""
        reach = _gauss_reach(self.feather_sigma) if self.feather_sigma else 0
        return reach + (_gauss_reach(self.wrap_sigma) if self.glow is not None else 0) + 1

    def rows(self, t0: int, t1: int, fg_rows: Callable[[int, int], np.ndarray]) -> None:
        """Rows t0:t1 of the inner box; fg_rows(s0, s1) gives F's (float32, a fresh array or one the caller
        no longer needs) for its rows s0:s1."""
        import cv2

        rh, rw = self.region_alpha.shape[:2]
        e0, _, f0, f1 = self.inner
        ov = self.overlap()
        g0, g1 = max(0, e0 + t0 - ov), min(rh, e0 + t1 + ov)
        h0, h1 = max(0, f0 - ov), min(rw, f1 + ov)
        a = as_alpha(self.region_alpha[g0:g1, h0:h1])
        rep = cv2.BORDER_REPLICATE
        if self.feather_sigma:
            a = cv2.GaussianBlur(a, (0, 0), self.feather_sigma, borderType=rep)
        keep = (slice(e0 + t0 - g0, e0 + t1 - g0), slice(f0 - h0, f1 - h0))
        soft = cv2.GaussianBlur(a, (0, 0), self.wrap_sigma, borderType=rep)[keep] if self.glow else None
        a = a[keep]
        y0, x0 = self.origin
        for s0, s1 in strips(t1 - t0, f1 - f0, BAND_PIXELS):
            f = fg_rows(t0 + s0, t0 + s1)
            if self.shift is not None:
                f = _apply_shift(f, self.shift)
            window = (y0 + e0 + t0 + s0, y0 + e0 + t0 + s1, x0 + f0, x0 + f1)
            bd = _backdrop_float(self.backdrop, self.shade, window)
            a_s = a[s0:s1]
            if soft is not None and self.glow is not None:  # light wrap: fg + rim * (glow - fg)
                k, small = self.glow
                rows = (e0 + t0 + s0, e0 + t0 + s1, f0, f1)
                g = upsample_window(small, (rh, rw), rows) if k > 1 else small[rows[0] : rows[1], f0:f1].copy()
                rim = np.clip(a_s * (1.0 - soft[s0:s1]) * 2.0, 0.0, 1.0)[..., None] * WRAP_STRENGTH
                g -= f
                g *= rim
                g += f
                f = g
            f -= bd  # fg * a + bd * (1 - a), in place
            f *= a_s[..., None]
            f += bd
            self.out[window[0] : window[1], window[2] : window[3]] = _to_uint8(f)


def _rows_of(band: np.ndarray, top: int, s0: int, s1: int) -> np.ndarray:
    """Rows s0:s1 of the inner box from a band of it that starts at row `top`."""
    return band[s0 - top : s1 - top]


def _gauss_reach(sigma: float) -> int:
    """How far OpenCV's Gaussian kernel for a float image reaches: ksize = round(8 sigma + 1), odd."""
    return (round(sigma * 8 + 1) | 1) // 2


def _union(box: tuple[int, int, int, int] | None, part: tuple[int, int, int, int] | None,
           offset: int) -> tuple[int, int, int, int] | None:
    if part is None:
        return box
    part = (part[0] + offset, part[1] + offset, part[2], part[3])
    if box is None:
        return part
    return min(box[0], part[0]), max(box[1], part[1]), min(box[2], part[2]), max(box[3], part[3])


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the set pixels, inclusive; None when there are none."""
    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size == 0:
        return None
    cols = np.nonzero(mask.any(axis=0))[0]
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _backdrop_float(backdrop: np.ndarray, shade: Shadow | None, window: tuple[int, int, int, int]) -> np.ndarray:
    """Rows y0:y1, columns x0:x1 of the backdrop as float [0, 1], darkened by the shadow."""
    y0, y1, x0, x1 = window
    bd = backdrop[y0:y1, x0:x1].astype(np.float32) / 255.0
    if shade is not None:
        bd *= (1.0 - shade.rows(window))[..., None]
    return np.asarray(bd)


def _shaded_rows(backdrop: np.ndarray, shade: Shadow | None, window: tuple[int, int, int, int]) -> np.ndarray:
    """The backdrop's window as uint8, darkened by the contact shadow where there is one."""
    y0, y1, x0, x1 = window
    if shade is None or not shade.touches(window):
        return np.asarray(backdrop[y0:y1, x0:x1])
    return _to_uint8(_backdrop_float(backdrop, shade, window))


def _sampled_backdrop(backdrop: np.ndarray, shade: Shadow | None, step: int) -> np.ndarray:
    """backdrop[::step, ::step] as float [0, 1], shaded: the new scene's light, read at a fraction."""
    h, w = backdrop.shape[:2]
    parts = []
    for y0, y1 in strips(h, w, multiple=step):
        bd = backdrop[y0:y1:step, ::step].astype(np.float32) / 255.0
        if shade is not None:
            bd *= (1.0 - shade.rows((y0, y1, 0, w))[::step, ::step])[..., None]
        parts.append(bd)
    return np.concatenate(parts)


def _glow_field(backdrop: np.ndarray, shade: Shadow | None, region: tuple[int, int, int, int],
                sigma: float) -> tuple[int, np.ndarray]:
    """The light wrap's glow: the shaded backdrop of the region blurred wide, made at a quarter size (the
    same light) one channel at a time, each filled strip by strip; (k, field) with the field 1/k of the
    region's size."""
    import cv2

    y0, y1, x0, x1 = region
    h, w = y1 - y0, x1 - x0
    k = 4 if min(h, w) >= 64 and sigma >= 4 else 1
    planes = []
    for c in range(3):
        plane = np.empty((h, w), np.float32)
        for s0, s1 in strips(h, w):
            rows = backdrop[y0 + s0 : y0 + s1, x0:x1, c].astype(np.float32) / 255.0
            if shade is not None:
                rows *= 1.0 - shade.rows((y0 + s0, y0 + s1, x0, x1))
            plane[s0:s1] = rows
        planes.append(cv2.resize(plane, (max(1, w // k), max(1, h // k)), interpolation=cv2.INTER_AREA))
        del plane
    small = np.dstack(planes)
    return k, np.asarray(cv2.GaussianBlur(small, (0, 0), sigma / k, borderType=cv2.BORDER_REPLICATE))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    image = image * 255.0
    np.rint(image, out=image)
    return np.asarray(np.clip(image, 0, 255, out=image), np.uint8)


# ---------------------------------------------------------------- 2. enhancement


def _enhance(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    from bgwatch.pipeline.cleanup import enhance_foreground

    return enhance_foreground(rgb, alpha)


# ---------------------------------------------------------------- 3. harmonisation


def _lab(rgb01: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb01, dtype=np.float32), cv2.COLOR_RGB2LAB)


def _color_shift(a: np.ndarray, old_bg: np.ndarray, backdrop: np.ndarray,
                 fg: np.ndarray | None) -> tuple[float, np.ndarray] | None:
    """(delta L, delta ab) for match_colors: shift the subject's CIELAB means by a bounded share of the
    change in ambient light, from alpha, the old background, the new backdrop and the subject's colours,
    each read at every 4th pixel each way (fg only needed when the subject fills the frame); None when
    there is no subject to shift.

    Lightness follows the backdrop's mean lightness a little (old scene -> new scene); chroma follows the
    change of colour cast. The subject's own colours are never pulled toward the backdrop's: a red
    product on a grey backdrop stays red. Bounded to MAX_DELTA_L / MAX_DELTA_AB."""
    # Means only: every 4th pixel each way reads them as well as all of them, at a sixteenth of the cost.
    inside = float((a * a).sum())
    if inside < 1.0:
        return None
    outside = 1.0 - a
    if float(outside.sum()) >= 1.0:
        old_mean = (_lab(old_bg) * outside[..., None]).reshape(-1, 3).sum(0) / float(outside.sum())
    else:  # the subject fills the frame: no old background to read, assume a neutral one
        assert fg is not None
        old_mean = _lab(fg).reshape(-1, 3).mean(0)
        old_mean[1:] = 0.0
    new_mean = _lab(backdrop).reshape(-1, 3).mean(0)
    delta_l = float(np.clip(L_GAIN * (new_mean[0] - old_mean[0]), -MAX_DELTA_L, MAX_DELTA_L))
    delta_ab = AB_GAIN * (new_mean[1:] - old_mean[1:])
    norm = float(np.hypot(*delta_ab))
    if norm > MAX_DELTA_AB:
        delta_ab *= MAX_DELTA_AB / norm
    return delta_l, delta_ab.astype(np.float32)


def _apply_shift(fg: np.ndarray, shift: tuple[float, np.ndarray]) -> np.ndarray:
    """The subject's colours moved by (delta L, delta ab) in CIELAB, as a new array."""
    import cv2

    lab = _lab(fg)
    lab[..., 0] += shift[0]
    lab[..., 1:] += shift[1]
    return np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), 0.0, 1.0)


# ---------------------------------------------------------------- 5. contact shadow


class Shadow:
    """The contact shadow as small canvases, one per object (see contact_shadow), read at full size for
    any window of rows and columns: the darkening in [0, 0.75]."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.stamps: list[tuple[int, int, int, int, np.ndarray, float, float]] = []

    def touches(self, window: tuple[int, int, int, int]) -> bool:
        y0, y1, x0, x1 = window
        return any(s[0] < y1 and y0 < s[1] and s[2] < x1 and x0 < s[3] for s in self.stamps)

    def rows(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """Rows y0:y1, columns x0:x1 of the shadow, float32."""
        y0, y1, x0, x1 = window
        out = np.zeros((y1 - y0, x1 - x0), np.float32)
        for sy0, sy1, sx0, sx1, small, base, core_ry in self.stamps:
            ty0, ty1, tx0, tx1 = max(y0, sy0), min(y1, sy1), max(x0, sx0), min(x1, sx1)
            if ty1 <= ty0 or tx1 <= tx0:
                continue
            part = upsample_window(small, (sy1 - sy0, sx1 - sx0), (ty0 - sy0, ty1 - sy0, tx0 - sx0, tx1 - sx0))
            # Only below the base: the shadow must not creep up the object's sides.
            ramp = np.arange(ty0, ty1, dtype=np.float32)[:, None]
            part *= np.clip((ramp - (base - core_ry)) / core_ry, 0.0, 1.0)
            target = out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]
            np.maximum(target, part, out=target)
        return np.clip(out, 0.0, 0.75, out=out)


def contact_shadow(alpha: np.ndarray) -> np.ndarray:
    """HxW float32 darkening in [0, 1): a soft elliptical shadow at the base of each object."""
    shadow = _shadow_stamps(alpha)
    return shadow.rows((0, shadow.shape[0], 0, shadow.shape[1]))


def _shadow_stamps(alpha: np.ndarray) -> Shadow:
    """The contact shadow of `alpha` (float [0, 1] or uint8), as canvases: the full-size work is a uint8
    mask, its dilation and one label plane."""
    import cv2

    if alpha.ndim == 3:
        alpha = alpha[..., 0]
    h, w = alpha.shape
    shadow = Shadow((h, w))
    hard = np.empty((h, w), np.uint8)
    for s0, s1 in strips(h, w):
        hard[s0:s1] = as_alpha(alpha[s0:s1]) > 0.5
    # Parts of one object (a mug and its handle) are grouped by closing small gaps first; each group
    # casts one shadow from its lowest part, so a handle or a lid never gets a floating shadow of its own.
    reach = max(3, round(0.03 * max(h, w))) | 1
    grouped = cv2.dilate(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (reach, reach)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(grouped, connectivity=8)
    del grouped
    if count <= 1:
        return shadow
    areas = np.zeros(count, np.int64)
    for s0, s1 in strips(h, w):
        part = labels[s0:s1]
        np.multiply(part, hard[s0:s1], out=part)  # only the object's own pixels keep their group
        areas += np.bincount(part.ravel(), minlength=count)
    del hard
    areas = areas[1:]
    for index in np.nonzero(areas >= max(16, 0.02 * areas.max()))[0] + 1:
        gx, gy = int(stats[index, cv2.CC_STAT_LEFT]), int(stats[index, cv2.CC_STAT_TOP])
        gw, gh = int(stats[index, cv2.CC_STAT_WIDTH]), int(stats[index, cv2.CC_STAT_HEIGHT])
        rows = np.nonzero((labels[gy : gy + gh, gx : gx + gw] == index).any(axis=1))[0] + gy
        x, bw = gx, gw
        y, bottom = int(rows[0]), int(rows[-1])
        bh = bottom - y + 1
        # The footprint: the object's columns in the lowest few percent of its height.
        band_top = max(y, bottom - max(2, int(0.05 * bh)))
        band = labels[band_top : bottom + 1, x : x + bw] == index
        cols = np.nonzero(band.any(axis=0))[0]
        foot_w = float(cols[-1] - cols[0] + 1)
        cx = x + (cols[0] + cols[-1]) / 2.0
        core_ry = max(1.5, 0.05 * foot_w)
        pen_ry = max(3.0, 0.16 * foot_w)
        _stamp_shadow(shadow, cx, float(bottom), foot_w, core_ry, pen_ry)
    return shadow


def _stamp_shadow(
    shadow: Shadow, cx: float, base: float, foot_w: float, core_ry: float, pen_ry: float
) -> None:
    """Add one object's shadow to `shadow` (combined by max when read), computed in a window around it at
    a scale where the core is ~4 px tall: shadows are smooth, so a small canvas blurred and scaled up looks the same and
    costs a fraction of full-size blurs with wide kernels."""
    import cv2

    h, w = shadow.shape
    core_sigma, pen_sigma = 0.9 * core_ry, 0.8 * pen_ry
    x0 = max(0, int(cx - 0.62 * foot_w - 3 * pen_sigma))
    x1 = min(w, int(cx + 0.62 * foot_w + 3 * pen_sigma) + 1)
    y0 = max(0, int(base - 2 * core_ry))  # only below the base (the ramp below starts at base - core_ry)
    y1 = min(h, int(base + 1.3 * pen_ry + 3 * pen_sigma) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    scale = min(1.0, 4.0 / core_ry)
    sw, sh = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))

    def ellipse(ex: float, ey: float, rx: float, ry: float, sigma: float) -> np.ndarray:
        canvas = np.zeros((sh, sw), np.float32)
        shift = 4  # sub-pixel precision for the centre and axes
        k = float(1 << shift)
        centre = (round((ex - x0) * scale * k), round((ey - y0) * scale * k))
        axes = (max(1, round(rx * scale * k)), max(1, round(ry * scale * k)))
        cv2.ellipse(canvas, centre, axes, 0, 0, 360, 1.0, thickness=-1, lineType=cv2.LINE_AA, shift=shift)
        return cv2.GaussianBlur(canvas, (0, 0), max(0.5, sigma * scale))

    core = ellipse(cx, base, 0.5 * foot_w, core_ry, core_sigma)
    pen = ellipse(cx, base + 0.3 * pen_ry, 0.62 * foot_w, pen_ry, pen_sigma)
    small = SHADOW_CORE * core + SHADOW_PENUMBRA * pen
    shadow.stamps.append((y0, y1, x0, x1, np.asarray(small, np.float32), base, core_ry))
