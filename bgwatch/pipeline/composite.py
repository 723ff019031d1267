"""Putting the cut-out subject on its new backdrop so it looks photographed there, not pasted.

    composite(rgb, alpha, backdrop, spec) -> HxWx3 uint8

In order:
1. Foreground colours. An edge pixel of the photo is a mix I = aF + (1-a)B_old of the subject and the
   old background; pasting I as it is drags a rim of the old background (a halo) onto the new one. The
   subject's own colour F is estimated everywhere by blur fusion (Forte & Pitié, "Approximate fast
   foreground colour estimation", ICIP 2021): B_old and F are local alpha-weighted means, and
   F = F_mean + a(I - a F_mean - (1-a) B_old), run at a coarse then a fine radius. Where a = 1 F is I.
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

Heavy work runs on the subject's bounding box (padded for the blurs), one float plane of it at a time, and
the colours are blended in strips of rows into the uint8 result only where the subject's alpha reaches;
the rest of the frame is the backdrop, darkened by the shadow, which is kept as small canvases and read at
full size strip by strip. Peak memory stays near 24 bytes a pixel of the input for the whole job.
"""

from __future__ import annotations

import numpy as np

from bgwatch.jobs import JobSpec
from bgwatch.pipeline.tiles import strips, upsample_window

ALPHA_EPS = 1.0 / 512
MAX_DELTA_L = 5.0  # CIELAB lightness units
MAX_DELTA_AB = 4.0  # CIELAB chroma units
L_GAIN = 0.08  # share of the old-vs-new ambient lightness difference applied to the subject
AB_GAIN = 0.25  # share of the old-vs-new colour cast applied
WRAP_STRENGTH = 0.3
SHADOW_CORE = 0.45
SHADOW_PENUMBRA = 0.3


def composite(rgb: np.ndarray, alpha: np.ndarray, backdrop: np.ndarray, spec: JobSpec) -> np.ndarray:
    """The subject of `rgb` (coverage `alpha`, float [0,1] or uint8 HxW) over `backdrop`, same size as
    `rgb`. The result is the (shaded) backdrop written strip by strip into a uint8 image; float work is
    limited to the subject's box (padded for the blurs), a few single planes of it at a time, and colours
    are blended in strips of rows straight into the result, only where the subject's alpha reaches. The
    shadow is kept as small canvases, read at full size one strip at a time."""
    import cv2

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
        box = _union(box, _box(_as_alpha(alpha[s0:s1]) > ALPHA_EPS), s0)
    if box is None:
        return out
    coarse, fine = max(3, round(0.09 * side)), max(1, round(0.006 * side))
    wrap_sigma = max(1.5, 0.006 * side)
    pad = coarse + int(3 * max(wrap_sigma, feather_sigma)) + 2
    y0, y1 = max(0, box[0] - pad), min(h, box[1] + 1 + pad)
    x0, x1 = max(0, box[2] - pad), min(w, box[3] + 1 + pad)
    rh, rw = y1 - y0, x1 - x0
    a = _as_alpha(alpha[y0:y1, x0:x1])
    # Where the result can differ from the backdrop: where the (feathered) alpha is above zero. OpenCV's
    # Gaussian kernels for float images reach 4 sigma: the box grown by that and a margin.
    reach = int(np.ceil(4 * feather_sigma)) + 2 if feather_sigma else 1
    inner = (max(0, box[0] - y0 - reach), min(rh, box[1] + 1 - y0 + reach),
             max(0, box[2] - x0 - reach), min(rw, box[3] + 1 - x0 + reach))
    e0, e1, f0, f1 = inner
    src = rgb[y0:y1, x0:x1]
    if spec.enhance_fg:
        src = _enhance(src, a)
    fg, old_bg = _blur_fusion(src, a, (coarse, fine), inner, spec.match_colors)
    shift: tuple[float, np.ndarray] | None = None
    if spec.match_colors:
        assert old_bg is not None
        fg_sampled = None
        if float((1.0 - a[::4, ::4]).sum()) < 1.0:  # the subject fills the frame: its own colours are read
            fg_sampled = _as_float_rgb(src[::4, ::4])
            i0, j0 = -(-e0 // 4), -(-f0 // 4)
            part = fg[4 * i0 - e0 :: 4, 4 * j0 - f0 :: 4]
            fg_sampled[i0 : i0 + part.shape[0], j0 : j0 + part.shape[1]] = part
        shift = _color_shift(a, old_bg, _sampled_backdrop(backdrop, shade, 4), fg_sampled)
        del old_bg, fg_sampled
    del src
    if feather_sigma:
        a = cv2.GaussianBlur(a, (0, 0), feather_sigma, borderType=cv2.BORDER_REPLICATE)
    soft = glow = None
    if spec.match_colors:
        soft = cv2.GaussianBlur(a, (0, 0), wrap_sigma, borderType=cv2.BORDER_REPLICATE)[e0:e1, f0:f1].copy()
        glow = _glow_field(backdrop, shade, (y0, y1, x0, x1), wrap_sigma)
    a = a[e0:e1, f0:f1].copy()
    for s0, s1 in strips(e1 - e0, f1 - f0):
        f = fg[s0:s1]
        if shift is not None:
            f = _apply_shift(f, shift)
        window = (y0 + e0 + s0, y0 + e0 + s1, x0 + f0, x0 + f1)
        bd = _backdrop_float(backdrop, shade, window)
        a_s = a[s0:s1]
        if soft is not None and glow is not None:  # light wrap: fg + rim * (glow - fg)
            k, small = glow
            rows = (e0 + s0, e0 + s1, f0, f1)
            g = upsample_window(small, (rh, rw), rows) if k > 1 else small[e0 + s0 : e0 + s1, f0:f1].copy()
            rim = np.clip(a_s * (1.0 - soft[s0:s1]) * 2.0, 0.0, 1.0)[..., None] * WRAP_STRENGTH
            g -= f
            g *= rim
            g += f
            f = g
        elif shift is None:  # a view of fg: blended in a copy
            f = f.copy()
        f -= bd  # fg * a + bd * (1 - a), in place
        f *= a_s[..., None]
        f += bd
        out[window[0] : window[1], window[2] : window[3]] = _to_uint8(f)
    return out


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


def _as_float_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return np.asarray(image.astype(np.float32) / 255.0)
    return np.array(image, np.float32)


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
    same light) one channel at a time; (k, field) with the field 1/k of the region's size."""
    import cv2

    y0, y1, x0, x1 = region
    h, w = y1 - y0, x1 - x0
    k = 4 if min(h, w) >= 64 and sigma >= 4 else 1
    keep = None
    if shade is not None:
        keep = np.empty((h, w), np.float32)
        for s0, s1 in strips(h, w):
            keep[s0:s1] = 1.0 - shade.rows((y0 + s0, y0 + s1, x0, x1))
    planes = []
    for c in range(3):
        plane = backdrop[y0:y1, x0:x1, c].astype(np.float32) / 255.0
        if keep is not None:
            plane *= keep
        planes.append(cv2.resize(plane, (max(1, w // k), max(1, h // k)), interpolation=cv2.INTER_AREA))
        del plane
    small = np.dstack(planes)
    return k, np.asarray(cv2.GaussianBlur(small, (0, 0), sigma / k, borderType=cv2.BORDER_REPLICATE))


def _as_alpha(alpha: np.ndarray) -> np.ndarray:
    if alpha.ndim == 3:
        alpha = alpha[..., 0]
    a = alpha.astype(np.float32)  # a fresh copy, scaled and clipped in place
    if alpha.dtype == np.uint8:
        a /= 255.0
    return np.clip(a, 0.0, 1.0, out=a)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    image = image * 255.0
    np.rint(image, out=image)
    return np.asarray(np.clip(image, 0, 255, out=image), np.uint8)


def _blur_fusion(src: np.ndarray, a: np.ndarray, radii: tuple[int, int], inner: tuple[int, int, int, int],
                 with_bg: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """estimate_foreground at (coarse, fine) radii, for the pixels that matter: F on `inner` (rows e0:e1,
    columns f0:f1 of the region) and, with `with_bg`, B_old on every 4th pixel each way of the region.

    The coarse blurs run over the whole region, one plane at a time, and are cropped at once to `inner`
    grown by the fine radius; the fine pass runs on that crop (a box blur of it equals the region's one
    more than a radius from its cut edges)."""
    import cv2

    rh, rw = a.shape
    e0, e1, f0, f1 = inner
    coarse, fine = radii
    c0, c1, d0, d1 = max(0, e0 - fine), min(rh, e1 + fine), max(0, f0 - fine), min(rw, f1 + fine)
    crop = (slice(c0, c1), slice(d0, d1))
    keep = (slice(e0 - c0, e1 - c0), slice(f0 - d0, f1 - d0))
    size_c, size_f = (2 * coarse + 1,) * 2, (2 * fine + 1,) * 2
    rep = cv2.BORDER_REPLICATE

    def box_blur(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        cv2.blur(plane, size, dst=plane, borderType=rep)  # in place: no second plane
        return plane

    def solve(i: np.ndarray, mean_fg: np.ndarray, bg_part: np.ndarray) -> np.ndarray:
        """clip(mean_fg + a (i - a mean_fg - bg_part)), bg_part = (1 - a) mean_bg, in a new plane."""
        out = a_c * mean_fg
        np.subtract(i, out, out=out)
        out -= bg_part
        out *= a_c
        out += mean_fg
        return np.asarray(np.clip(out, 0.0, 1.0, out=out))

    def times_image(plane: np.ndarray, c: int) -> np.ndarray:
        """plane * I_c in place, I_c read from src strip by strip (no float copy of the channel)."""
        for s0, s1 in strips(rh, rw):
            rows = src[s0:s1, :, c]
            plane[s0:s1] *= rows.astype(np.float32) / 255.0 if rows.dtype == np.uint8 else rows.astype(np.float32)
        return plane

    def times_inverse(plane: np.ndarray) -> np.ndarray:
        """plane * (1 - a) in place, strip by strip."""
        for s0, s1 in strips(rh, rw):
            plane[s0:s1] *= 1.0 - a[s0:s1]
        return plane

    mean_a = box_blur(a.copy(), size_c)
    fg_norm_c = mean_a[crop] + 1e-5
    bg_norm_c = np.subtract(1.0, mean_a, out=mean_a)
    bg_norm_c += 1e-5  # 1 - mean_a + 1e-5, in the same plane
    mean_a = box_blur(a.copy(), size_f)
    fg_norm_f = mean_a[crop] + 1e-5
    bg_norm_f = 1.0 - mean_a[crop] + 1e-5
    bg_norm_s = 1.0 - mean_a[::4, ::4] + 1e-5
    del mean_a
    a_c = a[crop]
    inv_c = 1.0 - a_c
    fg_out = np.empty((e1 - e0, f1 - f0, 3), np.float32)
    bg_out = np.empty((*bg_norm_s.shape, 3), np.float32) if with_bg else None
    for c in range(3):
        plane = src[crop][..., c]
        i_crop = plane.astype(np.float32) / 255.0 if plane.dtype == np.uint8 else plane.astype(np.float32)
        t = box_blur(times_image(a.copy(), c), size_c)  # blur(I a)
        mean_fg = t[crop] / fg_norm_c
        t = box_blur(times_image(np.subtract(1.0, a, out=t), c), size_c)  # blur(I (1 - a))
        np.divide(t, bg_norm_c, out=t)  # the coarse B_old
        bg_part = np.multiply(t[crop], inv_c)  # (1 - a) B_old
        if bg_out is not None:  # the fine pass of B_old, read where it is used (every 4th pixel)
            box_blur(times_inverse(t), size_f)
            bg_out[..., c] = np.clip(t[::4, ::4] / bg_norm_s, 0.0, 1.0)
        del t
        fg = solve(i_crop, mean_fg, bg_part)
        np.multiply(fg, a_c, out=fg)
        mean_fg = box_blur(fg, size_f)
        mean_fg /= fg_norm_f
        mean_bg = box_blur(bg_part, size_f)
        mean_bg /= bg_norm_f
        fg_out[..., c] = solve(i_crop, mean_fg, np.multiply(mean_bg, inv_c, out=mean_bg))[keep]
        del mean_fg, mean_bg, bg_part, i_crop
    return fg_out, bg_out


# ---------------------------------------------------------------- 1. foreground colours


def estimate_foreground(
    image: np.ndarray, alpha: np.ndarray, radii: tuple[int, ...] = (90, 6)
) -> tuple[np.ndarray, np.ndarray]:
    """(F, B_old): the subject's own colours and the old background's, from I = aF + (1-a)B.

    image HxWx3 float32 [0,1] (or uint8, read as /255); alpha HxW float32. Blur fusion at each radius in
    turn (box filters, so the cost does not grow with the radius), one colour channel at a time: the
    temporaries are single planes."""
    import cv2

    a = alpha
    inverse = 1.0 - a
    means = []
    for r in radii:
        size = (2 * r + 1, 2 * r + 1)
        mean_a = cv2.blur(alpha, size, borderType=cv2.BORDER_REPLICATE)
        means.append((size, mean_a + 1e-5, 1.0 - mean_a + 1e-5))
    fg_out = np.empty((*alpha.shape, 3), np.float32)
    bg_out = np.empty((*alpha.shape, 3), np.float32)
    for c in range(3):
        plane = image[..., c]
        i_c = plane.astype(np.float32) / 255.0 if plane.dtype == np.uint8 else plane.astype(np.float32)
        fg, bg = i_c, i_c
        for size, fg_norm, bg_norm in means:
            mean_fg = cv2.blur(fg * a, size, borderType=cv2.BORDER_REPLICATE) / fg_norm
            mean_bg = cv2.blur(bg * inverse, size, borderType=cv2.BORDER_REPLICATE) / bg_norm
            fg = mean_fg + a * (i_c - a * mean_fg - inverse * mean_bg)
            fg = np.clip(fg, 0.0, 1.0)
            bg = mean_bg
        fg_out[..., c] = fg
        bg_out[..., c] = np.clip(bg, 0.0, 1.0)
    return fg_out, bg_out


# ---------------------------------------------------------------- 2. enhancement


def _enhance(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    from bgwatch.pipeline.cleanup import enhance_foreground

    return enhance_foreground(rgb, alpha)


# ---------------------------------------------------------------- 3. harmonisation


def _lab(rgb01: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb01, dtype=np.float32), cv2.COLOR_RGB2LAB)


def match_colors(fg: np.ndarray, alpha: np.ndarray, old_bg: np.ndarray, backdrop: np.ndarray, *,
                 sampled: bool = False) -> np.ndarray:
    """Shift the subject's CIELAB means by a bounded share of the change in ambient light.

    Lightness follows the backdrop's mean lightness a little (old scene -> new scene); chroma follows the
    change of colour cast. The subject's own colours are never pulled toward the backdrop's: a red
    product on a grey backdrop stays red. Bounded to MAX_DELTA_L / MAX_DELTA_AB."""
    shift = _color_shift(alpha, old_bg[::4, ::4], backdrop if sampled else backdrop[::4, ::4], fg[::4, ::4])
    return fg if shift is None else _apply_shift(fg, shift)


def _color_shift(alpha: np.ndarray, old_bg: np.ndarray, backdrop: np.ndarray,
                 fg: np.ndarray | None) -> tuple[float, np.ndarray] | None:
    """(delta L, delta ab) for match_colors, from alpha (full) and the old background, the new backdrop and
    the subject's colours each read at every 4th pixel each way (fg only needed when the subject fills the
    frame); None when there is no subject to shift."""
    # Means only: every 4th pixel each way reads them as well as all of them, at a sixteenth of the cost.
    a = alpha[::4, ::4]
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
        hard[s0:s1] = _as_alpha(alpha[s0:s1]) > 0.5
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
