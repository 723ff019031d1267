"""A net's small mask brought to the photo's full resolution along the photo's own edges.

A mask net works at 320² (U²-Net) to 1024² (BiRefNet); scaled up plainly, its outline on a 24 MP photo is a
band many pixels wide, blurred and stair-stepped. `guided_upsample` fits the mask to the photo's colour in
windows at a working resolution and applies the fit to the full-resolution pixels of the outline's band:

- a fast guided filter (He and Sun, 2015): in every window the alpha is a linear function of the colour,
  fitted to the plainly upscaled mask. Each pixel takes the fits of the windows over it, weighted by how
  much of the mask's variation the colour explains there: where the subject and its backdrop differ in
  colour the edge follows the photo's edge to the pixel; where they do not, the plain mask comes back.
- a colour snap against halos: the upscaled mask's ramp leaves pure backdrop pixels near the edge a little
  opaque (and pure subject pixels a little transparent), which the linear fit keeps. Per window, the mean
  colours of the pixels the mask is sure are subject (F) and backdrop (B) place a pixel on the line from B
  to F, as a composite mixes them; where that says plainly "backdrop" or "subject" and F and B stand well
  apart against their own spread, it wins.

Memory: the fits are made at GUIDE_SCALE times the mask's size on the outline's box (a few MB), and
applied only to the band's pixels, in chunks; the full-size planes are the uint8 plain mask and the
float32 result.
"""

from __future__ import annotations

import numpy as np

from bgwatch.pipeline.refine import to_alpha8
from bgwatch.pipeline.tiles import CACHE_PIXELS, POINT_CHUNK, nonzero_box, runs, strips

# Chosen on bench/bench_edges.py's composites: a fit at about 1.6 times the net's side, over windows of
# 2.5 net pixels, beat finer working resolutions (whose windows see too little pure subject and backdrop).
GUIDE_SCALE = 1.6  # the fit's working resolution: this times the mask's long side (at most the photo's)
RADIUS = 2.5  # the fit's window radius, in the mask's pixels
EPS = 5e-5  # the guided fit's regularisation (colour in [0, 1]): smaller follows weaker colour edges
# The guided fit is trusted where the colour explains at least TRUST_FULL of the mask's variance in the
# window, not at all below TRUST_FROM (the plain mask there), and in between in proportion.
TRUST_FROM, TRUST_FULL = 0.7, 0.9
SURE = 0.75  # the colour snap's sure subject (mask above this) and sure backdrop (below 1 - this)
# F and B count as apart from gap / (gap + 4 * spread) = SEPARATE_FROM, fully from SEPARATE_FULL.
SEPARATE_FROM, SEPARATE_FULL = 0.4, 0.7
EXTREME = 0.35  # the snap acts where a pixel's place between B and F is this far from one half or more
FIELD_ROWS = 64  # rows of the fits made at a time (and 2 windows' reach more above and below)
# A block's fits are made in pieces where the band leaves more field columns than this out between them
# (each piece costs ~200 calls into numpy and OpenCV; measured best of 24 to 160 on the studio shots).
SPLIT_GAP = 64
SAMPLE_ROW = 4096  # positions per row of the maps cv2.remap samples the fits with (it takes < 32767 a side)


def plain_upsample(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 mask -> uint8 height x width, bicubic (what masks were before guided upsampling)."""
    import cv2

    if mask.shape == (height, width):
        return mask
    return np.asarray(cv2.resize(mask, (width, height), interpolation=cv2.INTER_CUBIC))


def guided_upsample(mask: np.ndarray, rgb: np.ndarray, *, eps: float = EPS) -> np.ndarray:
    """A uint8 mask (any size) -> float32 HxW alpha in [0, 1] at `rgb`'s size, its outline following the
    photo's edges (see the module's text)."""
    return _guided(mask, rgb, eps, rounded=False)


def guided_upsample8(mask: np.ndarray, rgb: np.ndarray, *, eps: float = EPS) -> np.ndarray:
    """guided_upsample's alpha rounded to uint8 HxW, as refine.to_alpha8 rounds it, to the bit, without its
    float32 plane: outside the band the plain mask is the result as it is, and the band's pixels are
    rounded as they are made (for a caller that keeps the mask as uint8 anyway: 4 bytes a pixel less to
    write and fault in, and no second pass)."""
    return _guided(mask, rgb, eps, rounded=True)


def _guided(mask: np.ndarray, rgb: np.ndarray, eps: float, *, rounded: bool) -> np.ndarray:
    import cv2

    height, width = rgb.shape[:2]
    plain = plain_upsample(mask, height, width)
    scale = min(1.0, GUIDE_SCALE * max(mask.shape) / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    guide = cv2.resize(np.ascontiguousarray(rgb[..., :3]), size, interpolation=cv2.INTER_AREA) if scale < 1 \
        else np.ascontiguousarray(rgb[..., :3])
    target = cv2.resize(mask, size, interpolation=cv2.INTER_CUBIC) if mask.shape != size[::-1] else mask
    # Window radius at the working resolution: the blur of one net pixel scaled up, and then some.
    radius = max(2, round(RADIUS * max(size) / max(mask.shape)))
    if rounded:
        out = plain.copy() if plain is mask else plain  # plain_upsample hands a mask at full size back
    else:
        out = np.empty((height, width), np.float32)
        for y0, y1 in strips(height, width):
            np.multiply(plain[y0:y1], np.float32(1 / 255), out=out[y0:y1], casting="unsafe")
    del plain
    # Only the outline's neighbourhood is fitted: where the mask is neither 0 nor 1, grown by the window.
    unsure = ((target > 2) & (target < 253)).astype(np.uint8)
    k = 2 * radius + 1
    band = cv2.dilate(unsure, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    box = nonzero_box(band)
    if box is None:
        return out
    top, bottom, left, right = box
    m = 2 * radius + 1  # the windows of the band's edge pixels reach this far
    t0, b0, l0, r0 = max(top - m, 0), min(bottom + m, size[1]), max(left - m, 0), min(right + m, size[0])
    # The photo's colour planes (numpy's arithmetic over a last axis of 3 costs several times more)
    g_crop = [guide[t0:b0, l0:r0, c].astype(np.float32) * np.float32(1 / 255) for c in range(3)]
    p_crop = target[t0:b0, l0:r0].astype(np.float32) * np.float32(1 / 255)
    # The guided fit (0:5) and the colour snap (5:12), a few dozen rows at a time: a field row reads the
    # windows within `radius` of it, each of which reads `radius` more rows, so each block is made with
    # 2 * radius rows more above and below. The box filters sum in float64, so a block's rows are the whole
    # crop's; the dozens of planes each fit makes stay small (fresh pages for them cost more than the
    # arithmetic). Only the field pixels the band's samples read matter (the band grown by one: a sample
    # reads the 2x2 around it, `weighted` below the 3x3): each block is made over the runs of columns those
    # span in its rows, with the same 2 * radius more on each side (a run's margin, not exact, must not reach
    # the next run's columns: hence runs more than 2 * radius apart); the rest of the field stays 0.
    crop_h, crop_w = p_crop.shape
    field = np.zeros((crop_h, crop_w, 12), np.float32)
    read = cv2.dilate(band[t0:b0, l0:r0], np.ones((3, 3), np.uint8))
    reach = 2 * radius
    for block in range(0, crop_h, FIELD_ROWS):
        block_read = read[block:block + FIELD_ROWS]
        firsts, lasts = runs(np.flatnonzero(block_read.any(axis=0)), max(SPLIT_GAP, reach))
        for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True):
            c0, c1 = max(first - reach, 0), min(last + 1 + reach, crop_w)
            # The piece's own rows: those of the block where its columns are read.
            own = np.flatnonzero(block_read[:, first:last + 1].any(axis=1))
            s0, s1 = block + int(own[0]), block + int(own[-1]) + 1
            q0, q1 = max(s0 - reach, 0), min(s1 + reach, crop_h)
            kept = slice(s0 - q0, s1 - q0)  # the rows that are the piece's own
            planes = [plane[q0:q1, c0:c1] for plane in g_crop]
            _fit(planes, p_crop[q0:q1, c0:c1], radius, eps, field[s0:s1, c0:c1, :5], kept)
            _fit_colours(planes, p_crop[q0:q1, c0:c1], radius, field[s0:s1, c0:c1, 5:], kept)
    del g_crop, p_crop
    del guide, target
    # Where neither fit has any weight the pixel keeps the plain mask (alpha + 0 * change, every value
    # finite): only the band's pixels whose samples read a weighted field pixel (the 3x3 around theirs) are
    # worked on at full resolution.
    weighted = np.greater(field[..., 4], 0) | np.greater(field[..., 11], 0)
    crop = band[t0:b0, l0:r0]
    np.bitwise_and(crop, cv2.dilate(weighted.view(np.uint8), np.ones((3, 3), np.uint8)), out=crop)
    # The band's full-resolution pixels: each working pixel in the band covers a block of them.
    sy, sx = size[1] / height, size[0] / width
    x_lo, x_hi = int(left / sx), min(width, int(np.ceil(right / sx)) + 1)
    y_lo, y_hi = int(top / sy), min(height, int(np.ceil(bottom / sy)) + 1)
    cols = np.arange(x_lo, x_hi)
    band_cols = np.minimum((cols * sx).astype(np.intp), size[0] - 1)
    # Each of the box's rows and columns placed in the field once (the float64 arithmetic sample_at's
    # float32 positions were made from pixel by pixel), looked up for each pixel.
    row_at = ((np.arange(y_lo, y_hi) + 0.5) * sy - 0.5 - t0).astype(np.float32)
    col_at = ((np.arange(x_lo, x_hi) + 0.5) * sx - 0.5 - l0).astype(np.float32)
    flat = out.reshape(-1)
    # The photo's pixels as one row each, to gather by flat index (a view; a strided photo is indexed as is).
    pixels = rgb.reshape(-1, 3) if rgb.shape[2] == 3 and rgb.flags.c_contiguous else None
    for y0, y1 in strips(y_hi - y_lo, x_hi - x_lo, CACHE_PIXELS):
        rows = np.arange(y_lo + y0, y_lo + y1)
        hit = band[np.minimum((rows * sy).astype(np.intp), size[1] - 1)][:, band_cols]
        # np.nonzero of a 2-D mask costs four times the flat indices split by the row length.
        ys, xs = np.divmod(np.flatnonzero(hit), x_hi - x_lo)
        ys += y0  # the pixels' rows and columns within the box
        for start in range(0, ys.size, POINT_CHUNK):
            by, bx = ys[start:start + POINT_CHUNK], xs[start:start + POINT_CHUNK]
            coeff = sample_at(field, np.take(row_at, by), np.take(col_at, bx))
            # One channel at a time (1-D runs over the points): numpy's reductions over a short last axis
            # and its broadcasts of (N, 3) arrays cost several times more.
            at = by * width
            at += bx
            at += y_lo * width + x_lo
            colour = [channel.astype(np.float32) * np.float32(1 / 255) for channel in
                      (np.take(pixels, at, axis=0) if pixels is not None else rgb[by + y_lo, bx + x_lo, :3]).T]
            fitted = coeff[:, 0] * colour[0]
            fitted += coeff[:, 1] * colour[1]
            fitted += coeff[:, 2] * colour[2]
            fitted += coeff[:, 3]
            np.clip(fitted, 0.0, 1.0, out=fitted)
            alpha = flat[at].astype(np.float32) * np.float32(1 / 255) if rounded else flat[at]
            fitted -= alpha
            fitted *= coeff[:, 4]
            alpha += fitted
            # The pixel's place on the line from the backdrop's colour (coeff 8:11) to the subject's (5:8).
            along = np.zeros(by.size, np.float32)
            length = np.full(by.size, np.float32(1e-4))
            for c in range(3):
                gap = coeff[:, 5 + c] - coeff[:, 8 + c]
                colour[c] -= coeff[:, 8 + c]
                colour[c] *= gap
                along += colour[c]
                gap *= gap
                length += gap
            place = np.clip(along / length, 0.0, 1.0, out=along)
            snap = np.abs(place - 0.5)
            snap -= EXTREME
            snap *= np.float32(1 / (0.5 - EXTREME))
            np.clip(snap, 0.0, 1.0, out=snap)
            snap *= coeff[:, 11]
            place -= alpha
            place *= snap
            alpha += place
            flat[at] = to_alpha8(alpha.reshape(1, -1)).reshape(-1) if rounded else alpha
    return out


def _inner(rows: slice, radius: int, height: int) -> tuple[slice, slice]:
    """A block's rows whose windows its own `rows` read (`rows` grown by `radius`, within the block), and
    `rows` counted within those. Only these rows of the windows' means are worked on: a block's first and
    last `radius` rows feed only rows that are not its own (the window sums at a row do not depend on
    the rows beyond the window, so the block's own rows come out as they would from the whole crop)."""
    inner = slice(max(rows.start - radius, 0), min(rows.stop + radius, height))
    return inner, slice(rows.start - inner.start, rows.stop - inner.start)



def _at_least(plane: np.ndarray, floor: float) -> np.ndarray:
    """np.maximum(plane, floor), the same values (NaN kept): numpy's maximum against a scalar runs a slow
    broadcast loop, 2.4 times the time of clip between two bounds."""
    return np.asarray(np.clip(plane, floor, np.inf))


def sample_at(field: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Bilinear samples (N, C) float32 of an hxwxC float32 field at fractional positions (field pixels,
    their centres at whole numbers), a position past an edge taking the edge's value. cv2.remap gathers
    them several times faster than numpy's indexing; it takes at most 32767 positions a side, so the list
    is laid out in rows of SAMPLE_ROW."""
    import cv2

    n = py.size
    if n == 0:
        return np.zeros((0, field.shape[2]), np.float32)
    width = min(n, SAMPLE_ROW)
    pad = -n % width
    maps = []
    for p in (px, py):
        laid = np.empty(n + pad, np.float32)  # the positions as float32, the last repeated (np.pad costs 6x)
        laid[:n] = p
        laid[n:] = laid[n - 1]
        maps.append(laid.reshape(-1, width))
    field = np.ascontiguousarray(field, np.float32)
    samples = cv2.remap(field, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.asarray(samples.reshape(-1, field.shape[2])[:n])


def _fit_colours(planes: list[np.ndarray], target: np.ndarray, radius: int, out: np.ndarray, rows: slice) -> None:
    """The colour snap's field: per window the mean colour of the pixels the mask is sure are subject (F)
    and backdrop (B), and how far apart they stand against the spread within each; each pixel takes the
    windows over it weighted by that: an hxwx7 field (F, B, trust), its `rows` written into `out`."""
    import cv2

    k = (2 * radius + 1, 2 * radius + 1)
    inner, rows = _inner(rows, radius, target.shape[0])

    def box(x: np.ndarray) -> np.ndarray:
        return np.asarray(cv2.boxFilter(x, -1, k, borderType=cv2.BORDER_REFLECT))

    def window(x: np.ndarray) -> np.ndarray:
        return box(x)[inner]

    sure_f = (target > SURE).astype(np.float32)
    sure_b = (target < 1 - SURE).astype(np.float32)
    n_f, n_b = window(sure_f), window(sure_b)
    inv_f, inv_b = 1 / _at_least(n_f, 1e-6), 1 / _at_least(n_b, 1e-6)
    # Plane by plane: numpy's sums over a last axis of 3 and its (h, w, 3) broadcasts cost several times more.
    fg = [window(plane * sure_f) * inv_f for plane in planes]
    bg = [window(plane * sure_b) * inv_b for plane in planes]
    sq = planes[0] * planes[0] + planes[1] * planes[1] + planes[2] * planes[2]
    spread_f = window(sq * sure_f) * inv_f - (fg[0] * fg[0] + fg[1] * fg[1] + fg[2] * fg[2])
    spread_b = window(sq * sure_b) * inv_b - (bg[0] * bg[0] + bg[1] * bg[1] + bg[2] * bg[2])
    apart = [f - b for f, b in zip(fg, bg, strict=True)]
    gap = apart[0] * apart[0] + apart[1] * apart[1] + apart[2] * apart[2]
    trust = gap / (gap + 4 * (_at_least(spread_f, 0) + _at_least(spread_b, 0)) + 1e-4)
    trust = np.clip((trust - SEPARATE_FROM) / (SEPARATE_FULL - SEPARATE_FROM), 0.0, 1.0)
    trust *= np.minimum(n_f, n_b) > 0.05  # both sides must be in the window
    weight = box(trust)[rows]
    norm = 1 / _at_least(weight, 1e-6)
    for c, plane in enumerate(fg + bg):
        np.multiply(box(plane * trust)[rows], norm, out=out[..., c])
    out[..., 6] = weight


def _fit(planes: list[np.ndarray], target: np.ndarray, radius: int, eps: float, out: np.ndarray, rows: slice) -> None:
    """The guided filter's field at the working resolution: hxwx5 (a_r, a_g, a_b, b, trust), each pixel's
    coefficients the trust-weighted mean of the windows over it, its `rows` written into `out`."""
    import cv2

    k = (2 * radius + 1, 2 * radius + 1)
    inner, rows = _inner(rows, radius, target.shape[0])

    def box(x: np.ndarray) -> np.ndarray:
        return np.asarray(cv2.boxFilter(x, -1, k, borderType=cv2.BORDER_REFLECT))

    def window(x: np.ndarray) -> np.ndarray:
        return box(x)[inner]

    r, g, b = planes
    mr, mg, mb = window(r), window(g), window(b)
    mean_p = window(target)
    cr, cg, cb = (window(r * target) - mr * mean_p, window(g * target) - mg * mean_p,
                  window(b * target) - mb * mean_p)
    var_rr = window(r * r) - mr * mr + eps
    var_rg = window(r * g) - mr * mg
    var_rb = window(r * b) - mr * mb
    var_gg = window(g * g) - mg * mg + eps
    var_gb = window(g * b) - mg * mb
    var_bb = window(b * b) - mb * mb + eps
    # The 3x3 symmetric system per pixel, solved by its adjugate.
    inv_rr = var_gg * var_bb - var_gb * var_gb
    inv_rg = var_gb * var_rb - var_rg * var_bb
    inv_rb = var_rg * var_gb - var_gg * var_rb
    inv_gg = var_rr * var_bb - var_rb * var_rb
    inv_gb = var_rb * var_rg - var_rr * var_gb
    inv_bb = var_rr * var_gg - var_rg * var_rg
    det = var_rr * inv_rr + var_rg * inv_rg + var_rb * inv_rb
    a_r = (inv_rr * cr + inv_rg * cg + inv_rb * cb) / det
    a_g = (inv_rg * cr + inv_gg * cg + inv_gb * cb) / det
    a_b = (inv_rb * cr + inv_gb * cg + inv_bb * cb) / det
    offset = mean_p - a_r * mr - a_g * mg - a_b * mb
    # How much of the mask's variation in the window the colour explains (R²): where little (subject and
    # backdrop alike in colour, texture across the edge), the plain mask is trusted instead.
    var_p = window(target * target) - mean_p * mean_p
    explained = (a_r * cr + a_g * cg + a_b * cb) / _at_least(var_p, 1e-6)
    trust = np.clip((explained - TRUST_FROM) / (TRUST_FULL - TRUST_FROM), 0.0, 1.0)
    trust[var_p < 1e-4] = 0.0  # no edge in the window at all
    # Each pixel takes the fits of the windows over it weighted by their trust: a window that sees the
    # colour edge speaks for the pixels near it, one that sees only backdrop (with the plain mask's ramp in
    # it) does not, so the ramp does not survive as a halo.
    weight = box(trust)[rows]
    norm = 1 / _at_least(weight, 1e-6)
    for c, plane in enumerate((a_r, a_g, a_b, offset)):
        np.multiply(box(plane * trust)[rows], norm, out=out[..., c])
    out[..., 4] = weight
