"""Cleanup: the subject on transparency, on a softened version of its own background, or on a colour.

Edges are composited from a decontaminated foreground colour: where alpha is partial the old backdrop
shows through the pixel, so the subject's true colour is solved from the mix (I = aF + (1-a)B) with the
backdrop colour B estimated from nearby pure-background pixels. Without that, a cut-out from a white
sweep keeps a pale fringe that shows on every dark page it is placed on.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bgwatch.errors import SpecError
from bgwatch.jobs import JobSpec
from bgwatch.pipeline.edges import sample_at
from bgwatch.pipeline.tiles import CACHE_PIXELS, POINT_CHUNK, block_mean, nonzero_box, strips, upsample_window

CLEANUP_MODES = ("transparent", "soften", "color")
SOFTEN_SIDE = 2048  # the softened background is made at most this many pixels on its long side

# A few CSS names people write in rules; anything else is given as #rgb or #rrggbb.
NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128),
    "lightgray": (211, 211, 211), "lightgrey": (211, 211, 211), "darkgray": (169, 169, 169),
    "darkgrey": (169, 169, 169), "silver": (192, 192, 192), "gainsboro": (220, 220, 220),
    "whitesmoke": (245, 245, 245), "ivory": (255, 255, 240), "beige": (245, 245, 220),
    "red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "orange": (255, 165, 0), "navy": (0, 0, 128), "skyblue": (135, 206, 235), "pink": (255, 192, 203),
}


def parse_color(text: str, *, source: str = "spec", key: str = "background_color") -> tuple[int, int, int]:
    """'#rgb', '#rrggbb' or a CSS name from NAMED_COLORS -> (r, g, b). SpecError names the key."""
    value = str(text).strip().lower()
    if value in NAMED_COLORS:
        return NAMED_COLORS[value]
    digits = value[1:] if value.startswith("#") else ""
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    if len(digits) == 6 and all(c in "0123456789abcdef" for c in digits):
        return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)
    raise SpecError(source, key, f"{text!r} is not a colour",
                    f"#rgb, #rrggbb or a name ({', '.join(sorted(NAMED_COLORS))})")


def cleanup(rgb: np.ndarray, alpha: np.ndarray, spec: JobSpec) -> np.ndarray:
    """transparent -> HxWx4 uint8; soften and color -> HxWx3 uint8. `alpha` is the refined mask (float in
    [0, 1], or uint8 0..255).

    Memory: the result, one working copy of the image when denoise or enhance_fg change it, and pieces
    (strips of rows, the pixels along the outline, fields at a fraction of the size): never a full-size
    float copy of the image."""
    if spec.mode not in CLEANUP_MODES:
        raise SpecError("spec", "mode", f"{spec.mode!r} is not a cleanup mode", ", ".join(CLEANUP_MODES))
    if alpha.shape != rgb.shape[:2]:
        raise ValueError(f"mask {alpha.shape} does not match image {rgb.shape[:2]}")
    rgb = rgb[..., :3]
    if spec.denoise:
        rgb = denoise(rgb)
    if spec.enhance_fg:
        rgb = enhance_foreground(rgb, alpha)
    h, w = alpha.shape
    if spec.mode == "transparent":
        return _transparent(rgb, alpha)
    ys, xs, colours = foreground_points(rgb, alpha, None)
    soft: tuple[np.ndarray, float, float] | None = None
    colour = np.zeros(3, np.float32)
    if spec.mode == "color":
        colour = np.array(parse_color(spec.background_color), np.float32)
    else:
        soft = soften_field(rgb, alpha, blur_radius=spec.blur_radius, desaturate_pct=spec.desaturate_pct)
    out = np.empty((h, w, 3), np.uint8)
    for y0, y1 in strips(h, w):
        fg = rgb[y0:y1].astype(np.float32)  # blended in place: fg * a + backdrop * (1 - a)
        lo, hi = np.searchsorted(ys, (y0, y1))
        fg[ys[lo:hi] - y0, xs[lo:hi]] = colours[lo:hi]
        backdrop = colour if soft is None else _soft_rows(soft, (h, w), y0, y1)
        fg -= backdrop
        fg *= _alpha_rows(alpha, y0, y1)[..., None]
        fg += backdrop
        np.round(fg, out=fg)
        out[y0:y1] = np.clip(fg, 0, 255)
    return out


def _alpha_rows(alpha: np.ndarray, y0: int, y1: int) -> np.ndarray:
    """Rows y0:y1 of a float [0, 1] or uint8 alpha as a fresh float32 array in [0, 1]."""
    rows = alpha[y0:y1]
    if rows.dtype == np.uint8:
        return np.asarray(rows.astype(np.float32) * np.float32(1 / 255))
    out = rows.astype(np.float32)  # a copy: callers scale it in place
    return np.clip(out, 0.0, 1.0, out=out)


def _transparent(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """HxWx4 uint8: the photo with `alpha` (rounded to uint8), the subject's own colour on its outline and in
    the fully transparent pixels near it (premultiplication-safe for viewers that filter before blending),
    black further out, which compresses well. Only the window around the subject is worked on and written:
    the rest stays np.zeros' untouched pages."""
    import cv2

    from bgwatch.pipeline.refine import to_alpha8

    h, w = alpha.shape
    out = np.zeros((h, w, 4), np.uint8)
    present = _present_box(alpha)
    if present is None:
        return out
    # Rounded alpha above 0 lies in the box of alpha above 0, and near reaches `reach` past it: the alpha is
    # rounded in that window only (outside it, it rounds to 0).
    reach = max(2, max(h, w) // 256)
    top, bottom, left, right = present
    wy, wx = max(top - reach, 0), max(left - reach, 0)
    a8 = to_alpha8(alpha[wy : min(bottom + reach, h), wx : min(right + reach, w)])
    near = _near_subject(a8, reach, (wy, wx))
    if near is None:
        return out
    y0, x0 = near.top, near.left
    y1, x1 = y0 + near.plane.shape[0], x0 + near.plane.shape[1]
    for s0, s1 in strips(y1 - y0, x1 - x0, CACHE_PIXELS):
        # RGBA rows by cv2, then each pixel (one uint32) times near's 0 or 1: numpy's uint8 multiply
        # broadcast over three channels costs several times more.
        rgba = cv2.cvtColor(np.ascontiguousarray(rgb[y0 + s0 : y0 + s1, x0:x1]), cv2.COLOR_RGB2RGBA)
        pixels = rgba.view(np.uint32)
        np.multiply(pixels, near.plane[s0:s1, :, None], out=pixels)
        rgba[..., 3] = a8[y0 - wy + s0 : y0 - wy + s1, x0 - wx : x1 - wx]
        out[y0 + s0 : y0 + s1, x0:x1] = rgba
    del a8
    ys, xs, colours = _foreground_points(rgb, alpha, near, present)
    out[ys, xs, :3] = colours
    return out


class Near(NamedTuple):
    """Where a transparent cut-out keeps colour: `plane` (uint8, 1 within a few pixels of any pixel whose
    rounded alpha is above 0, else 0) is the frame's window whose top left corner is (top, left); the frame
    outside it is all 0."""

    top: int
    left: int
    plane: np.ndarray


def foreground_points(rgb: np.ndarray, alpha: np.ndarray,
                      near: Near | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The subject's own colour where the image's pixel is not it: (ys, xs, colours uint8 Nx3), sorted by
    row. Without `near`: every pixel whose alpha is partial. With `near` (transparent output): the pixels
    near the subject that are not opaque: partial ones, their colour solved, and fully transparent ones,
    the subject's colour spread outwards. Full-resolution work is in the box around the subject (and
    near's window); memory stays near the size of the outline."""
    return _foreground_points(rgb, alpha, near, _present_box(alpha))


def _foreground_points(rgb: np.ndarray, alpha: np.ndarray, near: Near | None,
                       present: tuple[int, int, int, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """foreground_points, given the box of the pixels whose alpha is above 0 (None: there are none)."""
    h, w = alpha.shape
    empty = (np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros((0, 3), np.uint8))
    if present is None:
        return empty
    top, bottom, left, right = present
    if near is None:
        ys, xs = _partial_pixels(alpha, present)
    else:
        ys, xs = _near_pixels(alpha, near)
    if ys.size == 0:
        return empty
    radius = max(4.0, max(h, w) / 150)
    # Only the outline and what is near it matter: the fields are made in the box around the subject (it
    # holds near's window: near reaches max(h, w) // 256 pixels, far less than m).
    m = int(6 * radius)
    box = (max(top - m, 0), min(bottom + m, h), max(left - m, 0), min(right + m, w))
    inside = (ys >= box[0]) & (ys < box[1]) & (xs >= box[2]) & (xs < box[3])
    if not inside.all():
        ys, xs = ys[inside], xs[inside]
    fields, step = _colour_fields(rgb, alpha, box, radius)
    colours = np.empty((ys.size, 3), np.uint8)
    for start in range(0, ys.size, POINT_CHUNK):
        part = slice(start, start + POINT_CHUNK)
        py, px = ys[part], xs[part]
        # a field pixel covers step x step full pixels (the mapping cv2.resize uses)
        both = sample_at(fields, (py - box[0] + 0.5) / step - 0.5, (px - box[2] + 0.5) / step - 0.5)
        # A channel at a time, each a 1-D run over the points: numpy's broadcasts of (N, 3) by (N, 1) cost
        # several times more (the same values).
        bg, spread_fg = np.ascontiguousarray(both[:, :3].T), np.ascontiguousarray(both[:, 3:].T)
        img = np.ascontiguousarray(rgb[py, px].T).astype(np.float32)
        a = _alpha_points(alpha, py, px)
        through = 1.0 - a  # the old backdrop's share
        subject = np.maximum(a, 1e-3)
        # Trust the solved colour where enough of the subject is in the pixel; below that, borrow the
        # colour of the subject next to it. Fully transparent pixels get the subject's colour spread out.
        trust = np.clip((a - 0.15) / 0.35, 0.0, 1.0)
        borrowed = 1.0 - trust
        seen = a > 0.0
        for c in range(3):
            solved = np.clip((img[c] - through * bg[c]) / subject, 0.0, 255.0)
            estimate = trust * solved + borrowed * spread_fg[c]
            values = np.where(seen, estimate, spread_fg[c])
            colours[part, c] = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return ys, xs, colours


def _alpha_window(alpha: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """alpha[y0:y1, x0:x1] as float32 in [0, 1]: float32 as it is (clipping changes no comparison with 0
    or 1 made on it: no copy), anything else converted."""
    if alpha.dtype == np.float32:
        return np.asarray(alpha[y0:y1, x0:x1])
    return _alpha_rows(alpha[:, x0:x1], y0, y1)


def _present_box(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), bottom and right exclusive, of the pixels whose alpha is above 0."""
    h, w = alpha.shape
    rows = np.zeros(h, bool)
    cols = np.zeros(w, bool)
    for y0, y1 in strips(h, w, CACHE_PIXELS):
        present = np.greater(_alpha_window(alpha, y0, y1, 0, w), 0.0)
        rows[y0:y1] = present.any(axis=1)
        if rows[y0:y1].any():
            cols |= present.any(axis=0)
    found = np.flatnonzero(rows)
    if found.size == 0:
        return None
    across = np.flatnonzero(cols)
    return int(found[0]), int(found[-1]) + 1, int(across[0]), int(across[-1]) + 1


def _partial_pixels(alpha: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the pixels whose alpha is above 0 and below 1, in the box holding every pixel above 0."""
    top, bottom, left, right = box
    found = []
    for y0, y1 in strips(bottom - top, right - left, CACHE_PIXELS):
        a = _alpha_window(alpha, top + y0, top + y1, left, right)
        ys, xs = np.nonzero((a > 0.0) & (a < 1.0))
        found.append((ys + (top + y0), xs + left))
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _near_pixels(alpha: np.ndarray, near: Near) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the pixels in near's window that are near the subject and not opaque (not alpha >= 1: a
    NaN counts as transparent)."""
    y0, x0 = near.top, near.left
    height, width = near.plane.shape
    found = []
    for s0, s1 in strips(height, width, CACHE_PIXELS):
        opaque = np.greater_equal(_alpha_window(alpha, y0 + s0, y0 + s1, x0, x0 + width), 1.0)
        ys, xs = np.nonzero(np.greater(near.plane[s0:s1].view(bool), opaque))  # near and not opaque
        found.append((ys + (y0 + s0), xs + x0))
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _alpha_points(alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    values = alpha[ys, xs]
    if values.dtype == np.uint8:
        return np.asarray(values.astype(np.float32) * np.float32(1 / 255))
    return np.asarray(np.clip(values.astype(np.float32), 0.0, 1.0))


def _colour_fields(rgb: np.ndarray, alpha: np.ndarray, box: tuple[int, int, int, int],
                   radius: float) -> tuple[np.ndarray, int]:
    """The backdrop's and the subject's colours spread over the box (see _spread), computed at 1/step of
    the full resolution: the fields are smooth (radius >= 4 px), so they are made where the radius is
    still 2-8 field pixels and sampled bilinearly. One hxwx6 float32 field (backdrop RGB, subject RGB) and
    step. Weighted colours are averaged down premultiplied, strip by strip, so no colour leaks across the
    mask's edge and no full-size float copy is made."""
    y0, y1, x0, x1 = box
    bh, bw = y1 - y0, x1 - x0
    step = 1
    if radius >= 4.0 and min(bh, bw) >= 64:
        step = 2
        while radius / (step * 2) >= 4.0:  # a thin frame may end up one field pixel tall: still right
            step *= 2
    sh, sw = -(-bh // step), -(-bw // step)
    # Each side's block means: RGB and, fourth, 255 times the share of the block's pixels on that side.
    means = (np.empty((sh, sw, 4), np.float32), np.empty((sh, sw, 4), np.float32))
    import cv2

    for s0, s1 in strips(bh, bw, CACHE_PIXELS, multiple=step):
        a = _alpha_window(alpha, y0 + s0, y0 + s1, x0, x1)
        # RGBA rows whose fourth channel (255) counts the pixels: each side's pixels kept whole (one uint32
        # each, times 0 or 1) and averaged over the blocks in one 4-channel pass, in uint8 until then.
        rgbw = cv2.cvtColor(np.ascontiguousarray(rgb[y0 + s0 : y0 + s1, x0:x1]), cv2.COLOR_RGB2RGBA)
        rows = slice(s0 // step, -(-s1 // step))
        # A box that is not a whole number of blocks is filled out here, as block_mean would (edge rows and
        # columns repeated), in uint8 rather than in its float32 copy.
        pad_y, pad_x = -(s1 - s0) % step, -bw % step
        for side, sums in ((np.less(a, 0.02), means[0]), (np.greater(a, 0.98), means[1])):
            kept = np.multiply(rgbw.view(np.uint32), side.view(np.uint8)[..., None], dtype=np.uint32)
            kept = kept.view(np.uint8).reshape(rgbw.shape)
            if pad_y or pad_x:
                kept = cv2.copyMakeBorder(kept, 0, pad_y, 0, pad_x, cv2.BORDER_REPLICATE)
            sums[rows] = _block_means(kept, step)
    fields = np.empty((sh, sw, 6), np.float32)
    for c, sums in enumerate(means):
        total = sums[..., 3] * np.float32(1 / 255)
        colour = _by_plane(np.divide, sums[..., :3], np.maximum(total, 1e-6), np.empty((sh, sw, 3), np.float32))
        _spread(colour, total, radius / step, out=fields[..., 3 * c : 3 * c + 3])
    return fields, step


def _by_plane(op: np.ufunc, image: np.ndarray, plane: np.ndarray, out: np.ndarray) -> np.ndarray:
    """op(image, plane[..., None]) into `out`, a colour plane at a time: numpy broadcasts over a last axis
    of 3 several times slower (the same values)."""
    for c in range(image.shape[2]):
        op(image[..., c], plane, out=out[..., c])
    return out


def _block_means(image: np.ndarray, step: int) -> np.ndarray:
    """block_mean of an hxwx4 uint8 image whose sides are multiples of step, to the bit: the values
    scaled by step² in uint16 (exact up to step 16), so that OpenCV's area mean of each block is its exact
    sum; scaled back in float32 (a power of two: exact)."""
    import cv2

    h, w = image.shape[:2]
    if step == 1 or step > 16:
        return block_mean(image, step)
    sums = cv2.resize(np.left_shift(image, 2 * step.bit_length() - 2, dtype=np.uint16), (w // step, h // step),
                      interpolation=cv2.INTER_AREA)
    out: np.ndarray = sums.astype(np.float32)
    out *= np.float32(1 / (step * step))
    return out


def soften_field(rgb: np.ndarray, alpha: np.ndarray, *, blur_radius: int = 0,
                 desaturate_pct: float = 45) -> tuple[np.ndarray, float, float]:
    """The image's own background, blurred and muted, the subject's colour kept out: a small float32
    HxWx3 field (read at full size with _soft_rows) and its scale.

    blur_radius: the blur in pixels of the input, as the original service's (a Gaussian over a 2r+1
    kernel, sigma 0.3(r-1)+0.8 as OpenCV derives it); 0: 0.6 % of the image's diagonal. The field is
    made at half size (or SOFTEN_SIDE pixels on the long side for big images), finer when a small radius
    asks for it. desaturate_pct: how much colour the background loses (0 keeps it, 100 leaves grey)."""
    import cv2

    h, w = alpha.shape
    sigma_full = 0.3 * (blur_radius - 1) + 0.8 if blur_radius > 0 else 0.0
    # A field at half size is itself a blur of about a pixel: a small radius is made at full size.
    scale = min(1.0 if 0 < sigma_full < 2.0 else 0.5, SOFTEN_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA).astype(np.float32)
    # Resized first, scaled after: no full-size float copy of the mask.
    a = cv2.resize(np.ascontiguousarray(alpha), size, interpolation=cv2.INTER_AREA).astype(np.float32)
    if alpha.dtype == np.uint8:
        a *= np.float32(1 / 255)
    a = np.clip(a, 0.0, 1.0)
    # Fill the subject's area from the background around it first, so the blur does not smear the
    # subject into a halo around itself.
    filled = _spread(img, (a < 0.05).astype(np.float32), max(size) / 40)
    keep = (np.clip(1.0 - a, 0.0, 1.0) ** 2)[..., None]
    plate = img * keep + filled * (1.0 - keep)
    sigma = sigma_full * scale if sigma_full else max(1.0, 0.006 * float(np.hypot(h, w)) * scale * 2)
    blurred = cv2.GaussianBlur(plate, (0, 0), sigma)
    luma = blurred @ np.array([0.299, 0.587, 0.114], np.float32)
    grey = float(np.clip(desaturate_pct, 0, 100)) / 100
    muted = blurred * (1.0 - grey) + luma[..., None] * grey  # less saturated
    mean = float(luma.mean())
    flatter = (muted - mean) * 0.8 + mean  # less contrast
    lighter = flatter * 0.92 + 255.0 * 0.08  # and a touch lighter, so the subject leads
    return lighter.astype(np.float32), size[0] / w, size[1] / h


def _soft_rows(soft: tuple[np.ndarray, float, float], full: tuple[int, int], y0: int, y1: int) -> np.ndarray:
    return upsample_window(soft[0], full, (y0, y1, 0, full[1]))


def enhance_foreground(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """CLAHE on the subject's lightness (LAB L), blended in by alpha (float [0, 1] or uint8); the
    background is left untouched. Returns a new image; the blend runs in strips (no float copies)."""
    import cv2

    h, w = alpha.shape
    top, bottom, left, right = h, -1, w, -1
    for s0, s1 in strips(h, w):
        present = alpha[s0:s1] > 0
        rows = np.nonzero(present.any(axis=1))[0]
        if rows.size:
            cols = np.nonzero(present.any(axis=0))[0]
            top, bottom = min(top, s0 + int(rows[0])), s0 + int(rows[-1])
            left, right = min(left, int(cols[0])), max(right, int(cols[-1]))
    if bottom < 0:
        return rgb
    margin = 16
    y0, y1 = max(top - margin, 0), min(bottom + margin + 1, h)
    x0, x1 = max(left - margin, 0), min(right + margin + 1, w)
    lightness = np.empty((y1 - y0, x1 - x0), np.uint8)
    for s0, s1 in strips(y1 - y0, x1 - x0):
        lab = cv2.cvtColor(np.ascontiguousarray(rgb[y0 + s0 : y0 + s1, x0:x1]), cv2.COLOR_RGB2LAB)
        lightness[s0:s1] = lab[..., 0]
    tiles = max(2, min(8, round(max(y1 - y0, x1 - x0) / 128)))
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(tiles, tiles))
    lightness = clahe.apply(lightness)
    out = rgb.copy()
    for s0, s1 in strips(y1 - y0, x1 - x0):
        crop = np.ascontiguousarray(rgb[y0 + s0 : y0 + s1, x0:x1])
        lab = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB)
        lab[..., 0] = lightness[s0:s1]
        enhanced = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).astype(np.float32)
        base = crop.astype(np.float32)
        enhanced -= base
        enhanced *= _alpha_rows(alpha[y0:y1, x0:x1], s0, s1)[..., None]
        enhanced += base
        np.round(enhanced, out=enhanced)
        out[y0 + s0 : y0 + s1, x0:x1] = np.clip(enhanced, 0, 255)
    return np.asarray(out)


def denoise(rgb: np.ndarray) -> np.ndarray:
    """Non-local means on lightness (strength from the measured noise), a light blur on chroma."""
    import cv2

    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)
    sigma = estimate_noise(lab[..., 0])
    if sigma < 0.8:  # already clean: leave it alone rather than smear detail
        return rgb
    strength = float(np.clip(1.3 * sigma, 2.0, 15.0))
    lab[..., 0] = cv2.fastNlMeansDenoising(lab[..., 0], None, strength, 5, 11)
    lab[..., 1:] = cv2.GaussianBlur(lab[..., 1:], (0, 0), 1.0)
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def estimate_noise(grey: np.ndarray) -> float:
    """Gaussian noise sigma of a greyscale image (Immerkaer 1996: one Laplacian-difference pass)."""
    import cv2

    h, w = grey.shape
    if h < 3 or w < 3:
        return 0.0
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    total = 0.0
    for y0, y1 in strips(h - 2, w):  # interior rows 1..h-2, each strip read with one row either side
        rows = grey[y0 : y1 + 2].astype(np.float32)
        response = cv2.filter2D(rows, -1, kernel)[1:-1, 1:-1]
        total += float(np.abs(response).sum(dtype=np.float64))
    return float(np.sqrt(np.pi / 2) * total / (6.0 * (w - 2) * (h - 2)))


def _spread(img: np.ndarray, weight: np.ndarray, radius: float, out: np.ndarray | None = None) -> np.ndarray:
    """Normalised convolution: each pixel gets the weighted mean colour of where `weight` is set nearby.
    Coarser levels (each a quarter the size) reach further; each level fills in under the finer one,
    blended by how much support the finer one had, so no seam shows. `out`: where the result goes (an
    hxwx3 view of a wider field)."""
    import cv2

    sigma = max(radius, 1.0)
    levels = []
    wi, ii = weight, _by_plane(np.multiply, img, weight, np.empty_like(img))
    while True:
        num, den = cv2.GaussianBlur(ii, (0, 0), sigma), cv2.GaussianBlur(wi, (0, 0), sigma)
        levels.append((num, den))
        h, w = wi.shape
        if float(den.min()) > 1e-4 or max(h, w) <= 8:
            break
        size = (max(1, w // 4), max(1, h // 4))
        wi = cv2.resize(wi, size, interpolation=cv2.INTER_AREA)
        ii = cv2.resize(ii, size, interpolation=cv2.INTER_AREA)
    del wi, ii
    support = (weight > 0.5).view(np.uint8)
    # cv2.mean over the mask: numpy's boolean index and mean over (N, 3) cost several times more
    fallback = (np.array(cv2.mean(np.ascontiguousarray(img), mask=support)[:3], np.float32) if support.any()
                else np.full(3, 128.0, np.float32))
    below: np.ndarray | None = None
    for i in range(len(levels) - 1, -1, -1):
        num, den = levels.pop()
        h, w = den.shape
        # below + trust (colour - below), in colour's array: the same arithmetic, no temporaries
        colour = _by_plane(np.divide, num, np.maximum(den, 1e-6), num)
        under = (np.broadcast_to(fallback.astype(np.float32), colour.shape) if below is None
                 else cv2.resize(below, (w, h), interpolation=cv2.INTER_LINEAR))
        colour -= under
        _by_plane(np.multiply, colour, np.clip(den * 20.0, 0.0, 1.0), colour)
        if i == 0 and out is not None:
            np.add(colour, under, out=out)
            return out
        colour += under
        below = colour
    assert below is not None
    return below


def _near_subject(a8: np.ndarray, reach: int, at: tuple[int, int]) -> Near | None:
    """Near: 1 within `reach` pixels (a square's) of any pixel with a8 > 0, else 0; None if there is none.
    `a8` is the frame's window whose top left corner is `at`, holding every pixel above 0 and `reach` more
    around them (or the frame's edge). A square, because OpenCV dilates by a rectangle in a time that does
    not grow with its size (a disc's does). Made in the box of a8 > 0 grown by the reach: outside it there is
    nothing to dilate (the dilation's border adds nothing)."""
    import cv2

    h, w = a8.shape
    box = nonzero_box(a8)
    if box is None:
        return None
    top, bottom, left, right = box
    y0, y1, x0, x1 = max(top - reach, 0), min(bottom + reach, h), max(left - reach, 0), min(right + reach, w)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * reach + 1, 2 * reach + 1))
    present = np.greater(a8[y0:y1, x0:x1], 0).view(np.uint8)
    return Near(at[0] + y0, at[1] + x0, cv2.dilate(present, kernel, dst=present))
