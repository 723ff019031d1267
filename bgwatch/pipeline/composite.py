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

Heavy work runs on the subject's bounding box (padded for the blurs); the rest of the frame is the
backdrop untouched.
"""

from __future__ import annotations

import numpy as np

from bgwatch.jobs import JobSpec
from bgwatch.pipeline.tiles import strips

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
    `rgb`. Float work is limited to the subject's box, one channel at a time where it can be; outside the
    box the result is the (shaded) backdrop, written in strips."""
    import cv2

    h, w = rgb.shape[:2]
    a_full = _as_alpha(alpha)
    if backdrop.shape[:2] != (h, w):
        from bgwatch.pipeline.backgrounds import fit_cover

        backdrop = fit_cover(backdrop, w, h)
    side = max(h, w)
    feather_sigma = max(0.6, side / 1024.0) if spec.feather_edges else 0.0
    shade = contact_shadow(a_full) if spec.shadow else None
    out = _shaded(backdrop, shade, (slice(0, h), slice(0, w)))

    box = _box(a_full > ALPHA_EPS)
    if box is None:
        return out
    coarse, fine = max(3, round(0.09 * side)), max(1, round(0.006 * side))
    wrap_sigma = max(1.5, 0.006 * side)
    pad = coarse + int(3 * max(wrap_sigma, feather_sigma)) + 2
    y0, y1 = max(0, box[0] - pad), min(h, box[1] + 1 + pad)
    x0, x1 = max(0, box[2] - pad), min(w, box[3] + 1 + pad)
    region = (slice(y0, y1), slice(x0, x1))

    src = rgb[region]
    a = a_full[region]
    if spec.enhance_fg:
        src = _enhance(src, a)
    fg, old_bg = estimate_foreground(src, a, radii=(coarse, fine))
    bd = _shaded_float(backdrop, shade, region)
    if spec.match_colors:
        whole = _shaded_float(backdrop[::4, ::4], None if shade is None else shade[::4, ::4],
                              (slice(None), slice(None)))
        fg = match_colors(fg, a, old_bg, whole, sampled=True)
    del old_bg
    if feather_sigma:
        a = cv2.GaussianBlur(a, (0, 0), feather_sigma, borderType=cv2.BORDER_REPLICATE)
    if spec.match_colors:
        fg = light_wrap(fg, a, bd, wrap_sigma)
    fg -= bd  # fg * a + bd * (1 - a), in place
    fg *= a[..., None]
    fg += bd
    out[region] = _to_uint8(fg)
    return out


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the set pixels, inclusive; None when there are none."""
    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size == 0:
        return None
    cols = np.nonzero(mask.any(axis=0))[0]
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _shaded_float(backdrop: np.ndarray, shade: np.ndarray | None,
                  region: tuple[slice, slice]) -> np.ndarray:
    bd = backdrop[region].astype(np.float32) / 255.0
    if shade is not None:
        bd *= (1.0 - shade[region])[..., None]
    return np.asarray(bd)


def _shaded(backdrop: np.ndarray, shade: np.ndarray | None, region: tuple[slice, slice]) -> np.ndarray:
    """The backdrop as uint8, darkened by the contact shadow where there is one (strip by strip)."""
    if shade is None:
        return np.array(backdrop[region], np.uint8)
    h = backdrop[region].shape[0]
    out = np.empty(backdrop[region].shape, np.uint8)
    for s0, s1 in strips(h, backdrop[region].shape[1]):
        rows = (slice(region[0].start + s0, region[0].start + s1), region[1])
        out[s0:s1] = _to_uint8(_shaded_float(backdrop, shade, rows))
    return out


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
    import cv2

    # Means only: every 4th pixel each way reads them as well as all of them, at a sixteenth of the cost.
    a = alpha[::4, ::4]
    inside = float((a * a).sum())
    if inside < 1.0:
        return fg
    outside = 1.0 - a
    if float(outside.sum()) >= 1.0:
        old_mean = (_lab(old_bg[::4, ::4]) * outside[..., None]).reshape(-1, 3).sum(0) / float(outside.sum())
    else:  # the subject fills the frame: no old background to read, assume a neutral one
        old_mean = _lab(fg[::4, ::4]).reshape(-1, 3).mean(0)
        old_mean[1:] = 0.0
    new_mean = _lab(backdrop if sampled else backdrop[::4, ::4]).reshape(-1, 3).mean(0)
    delta_l = float(np.clip(L_GAIN * (new_mean[0] - old_mean[0]), -MAX_DELTA_L, MAX_DELTA_L))
    delta_ab = AB_GAIN * (new_mean[1:] - old_mean[1:])
    norm = float(np.hypot(*delta_ab))
    if norm > MAX_DELTA_AB:
        delta_ab *= MAX_DELTA_AB / norm
    lab = _lab(fg)
    lab[..., 0] += delta_l
    lab[..., 1:] += delta_ab.astype(np.float32)
    return np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), 0.0, 1.0)


def light_wrap(fg: np.ndarray, alpha: np.ndarray, backdrop: np.ndarray, sigma: float) -> np.ndarray:
    """Let the blurred backdrop bleed onto the subject's rim (strongest at the edge, gone a few px in)."""
    import cv2

    soft = cv2.GaussianBlur(alpha, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    rim = np.clip(alpha * (1.0 - soft) * 2.0, 0.0, 1.0)[..., None] * WRAP_STRENGTH
    # The glow is a wide blur of the backdrop: computed at a quarter size, it is the same light.
    h, w = alpha.shape
    k = 4 if min(h, w) >= 64 and sigma >= 4 else 1
    small = cv2.resize(backdrop, (max(1, w // k), max(1, h // k)), interpolation=cv2.INTER_AREA)
    glow = cv2.GaussianBlur(small, (0, 0), sigma / k, borderType=cv2.BORDER_REPLICATE)
    glow = cv2.resize(glow, (w, h), interpolation=cv2.INTER_LINEAR)
    glow -= fg  # fg + rim * (glow - fg), in place
    glow *= rim
    glow += fg
    return np.asarray(glow)


# ---------------------------------------------------------------- 5. contact shadow


def contact_shadow(alpha: np.ndarray) -> np.ndarray:
    """HxW float32 darkening in [0, 1): a soft elliptical shadow at the base of each object."""
    import cv2

    h, w = alpha.shape
    shadow = np.zeros((h, w), np.float32)
    hard = (alpha > 0.5).astype(np.uint8)
    # Parts of one object (a mug and its handle) are grouped by closing small gaps first; each group
    # casts one shadow from its lowest part, so a handle or a lid never gets a floating shadow of its own.
    reach = max(3, round(0.03 * max(h, w))) | 1
    grouped = cv2.dilate(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (reach, reach)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(grouped, connectivity=8)
    if count <= 1:
        return shadow
    labels = np.where(hard > 0, labels, 0)
    areas = np.bincount(labels.ravel(), minlength=count)[1:]
    for index in np.nonzero(areas >= max(16, 0.02 * areas.max()))[0] + 1:
        rows = np.nonzero((labels == index).any(axis=1))[0]
        x = int(stats[index, cv2.CC_STAT_LEFT])
        bw = int(stats[index, cv2.CC_STAT_WIDTH])
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
    return np.clip(shadow, 0.0, 0.75)


def _stamp_shadow(
    shadow: np.ndarray, cx: float, base: float, foot_w: float, core_ry: float, pen_ry: float
) -> None:
    """Draw one object's shadow into `shadow` (max), computed in a window around it at a scale where the
    core is ~4 px tall: shadows are smooth, so a small canvas blurred and scaled up looks the same and
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
    window = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    # Only below the base: the shadow must not creep up the object's sides.
    rows = np.arange(y0, y1, dtype=np.float32)[:, None]
    window *= np.clip((rows - (base - core_ry)) / core_ry, 0.0, 1.0)
    np.maximum(shadow[y0:y1, x0:x1], window, out=shadow[y0:y1, x0:x1])
