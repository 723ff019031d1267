"""Cleanup: the subject on transparency, on a softened version of its own background, or on a colour.

Edges are composited from a decontaminated foreground colour: where alpha is partial the old backdrop
shows through the pixel, so the subject's true colour is solved from the mix (I = aF + (1-a)B) with the
backdrop colour B estimated from nearby pure-background pixels. Without that, a cut-out from a white
sweep keeps a pale fringe that shows on every dark page it is placed on.
"""

from __future__ import annotations

import numpy as np

from bgwatch.errors import SpecError
from bgwatch.jobs import JobSpec

CLEANUP_MODES = ("transparent", "soften", "color")

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
    """transparent -> HxWx4 uint8; soften and color -> HxWx3 uint8. `alpha` is the refined mask."""
    if spec.mode not in CLEANUP_MODES:
        raise SpecError("spec", "mode", f"{spec.mode!r} is not a cleanup mode", ", ".join(CLEANUP_MODES))
    alpha = np.clip(alpha.astype(np.float32, copy=False), 0.0, 1.0)
    if alpha.shape != rgb.shape[:2]:
        raise ValueError(f"mask {alpha.shape} does not match image {rgb.shape[:2]}")
    rgb = np.ascontiguousarray(rgb[..., :3])
    if spec.denoise:
        rgb = denoise(rgb)
    if spec.enhance_fg:
        rgb = enhance_foreground(rgb, alpha)
    fg = foreground_colours(rgb, alpha)
    if spec.mode == "transparent":
        a8 = np.round(alpha * 255).astype(np.uint8)
        # Fully transparent pixels keep the subject's colour near the edge (premultiplication-safe for
        # viewers that filter before blending) and are black further out, which compresses well.
        near = _near_subject(a8)
        colour = np.where(near[..., None], fg, np.uint8(0))
        return np.dstack([colour, a8])
    if spec.mode == "color":
        backdrop = np.array(parse_color(spec.background_color), np.float32)
    else:
        backdrop = soften_background(rgb, alpha)
    out = fg.astype(np.float32)  # blended in place: fg * a + backdrop * (1 - a)
    out -= backdrop
    out *= alpha[..., None]
    out += backdrop
    return np.clip(np.round(out, out=out), 0, 255).astype(np.uint8)


def foreground_colours(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The subject's own colour (uint8 HxWx3): solved where alpha is partial, spread outwards into the
    transparent pixels around the subject; elsewhere the image itself."""
    out = rgb.copy()
    if not (alpha > 0.0).any() or bool((alpha >= 1.0).all()):
        return out
    radius = max(4.0, max(alpha.shape) / 150)
    # Only the outline and what is near it matter: work in the box around the subject.
    ys, xs = np.nonzero(alpha > 0.0)
    m = int(6 * radius)
    box = (slice(max(int(ys.min()) - m, 0), int(ys.max()) + m + 1),
           slice(max(int(xs.min()) - m, 0), int(xs.max()) + m + 1))
    out[box] = _foreground_in(rgb[box], alpha[box], radius)
    return out


def _foreground_in(rgb: np.ndarray, alpha: np.ndarray, radius: float) -> np.ndarray:
    """Only the pixels that are not plainly subject are computed (as 1-D arrays): memory stays near the
    size of the outline, not of the image."""
    partial = (alpha > 0.0) & (alpha < 1.0)
    ys, xs = np.nonzero(partial | (alpha == 0.0))
    out = rgb.copy()
    if ys.size == 0:
        return out
    background = _spread_at(rgb, (alpha < 0.02).astype(np.float32), radius, ys, xs)
    spread_fg = _spread_at(rgb, (alpha > 0.98).astype(np.float32), radius, ys, xs)
    a = alpha[ys, xs][:, None]
    img = rgb[ys, xs].astype(np.float32)
    solved = np.clip((img - (1.0 - a) * background) / np.maximum(a, 1e-3), 0.0, 255.0)
    # Trust the solved colour where enough of the subject is in the pixel; below that, borrow the colour
    # of the subject next to it. Fully transparent pixels get the subject's colour spread outwards.
    trust = np.clip((a - 0.15) / 0.35, 0.0, 1.0)
    estimate = trust * solved + (1.0 - trust) * spread_fg
    values = np.where(partial[ys, xs][:, None], estimate, spread_fg)
    out[ys, xs] = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return out


def soften_background(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The image's own background, blurred and muted (float32 HxWx3), the subject's colour kept out."""
    import cv2

    h, w = alpha.shape
    # All of it is smooth: work at half size.
    size = (max(1, w // 2), max(1, h // 2))
    img = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    a = cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
    # Fill the subject's area from the background around it first, so the blur does not smear the
    # subject into a halo around itself.
    filled = _spread(img, (a < 0.05).astype(np.float32), max(size) / 40)
    keep = (np.clip(1.0 - a, 0.0, 1.0) ** 2)[..., None]
    plate = img * keep + filled * (1.0 - keep)
    blurred = cv2.GaussianBlur(plate, (0, 0), max(1.0, 0.006 * float(np.hypot(h, w))))
    luma = blurred @ np.array([0.299, 0.587, 0.114], np.float32)
    muted = blurred * 0.55 + luma[..., None] * 0.45  # less saturated
    mean = float(luma.mean())
    flatter = (muted - mean) * 0.8 + mean  # less contrast
    lighter = flatter * 0.92 + 255.0 * 0.08  # and a touch lighter, so the subject leads
    return cv2.resize(lighter, (w, h), interpolation=cv2.INTER_LINEAR)


def enhance_foreground(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """CLAHE on the subject's lightness (LAB L), blended in by alpha; the background is left untouched."""
    import cv2

    ys, xs = np.nonzero(alpha > 0.0)
    if len(ys) == 0:
        return rgb
    h, w = alpha.shape
    margin = 16
    y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, h)
    x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, w)
    crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    lab = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB)
    tiles = max(2, min(8, round(max(y1 - y0, x1 - x0) / 128)))
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(tiles, tiles))
    lab[..., 0] = clahe.apply(lab[..., 0])
    enhanced = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).astype(np.float32)
    a = alpha[y0:y1, x0:x1, None]
    out = rgb.copy()
    mixed = crop.astype(np.float32) + (enhanced - crop) * a
    out[y0:y1, x0:x1] = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    return out


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
    response = cv2.filter2D(grey.astype(np.float32), -1, kernel)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(response).sum() / (6.0 * (w - 2) * (h - 2)))


def _spread_at(rgb: np.ndarray, weight: np.ndarray, radius: float, ys: np.ndarray,
               xs: np.ndarray) -> np.ndarray:
    """_spread's colour field at the pixels (ys, xs), as (N, 3) float32. The field is smooth (radius >= 4
    px), so it is computed at half resolution and sampled bilinearly; the weighted colours are averaged
    down premultiplied, so no colour leaks across the mask's edge."""
    import cv2

    h, w = weight.shape
    if radius < 4.0 or min(h, w) < 64:
        return _spread(rgb.astype(np.float32), weight, radius)[ys, xs]
    size = ((w + 1) // 2, (h + 1) // 2)
    small_w = cv2.resize(weight, size, interpolation=cv2.INTER_AREA)
    premultiplied = rgb.astype(np.float32)
    premultiplied *= weight[..., None]
    small_i = cv2.resize(premultiplied, size, interpolation=cv2.INTER_AREA)
    del premultiplied
    small_i /= np.maximum(small_w, 1e-6)[..., None]
    field = _spread(small_i, small_w, radius / 2)
    return _sample(field, ys, xs, size[0] / w, size[1] / h)


def _sample(field: np.ndarray, ys: np.ndarray, xs: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Bilinear samples of a coarse HxWx3 field at full-resolution pixels, exactly where cv2.resize
    (INTER_LINEAR) would have put them."""
    import cv2

    n, cols = ys.size, 1024  # remap takes 2-D maps: lay the points out in rows
    rows = -(-n // cols)
    map_x = np.zeros(rows * cols, np.float32)
    map_y = np.zeros(rows * cols, np.float32)
    map_x[:n] = (xs + 0.5) * sx - 0.5
    map_y[:n] = (ys + 0.5) * sy - 0.5
    sampled = cv2.remap(field, map_x.reshape(rows, cols), map_y.reshape(rows, cols), cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
    return sampled.reshape(-1, field.shape[2])[:n]


def _spread(img: np.ndarray, weight: np.ndarray, radius: float) -> np.ndarray:
    """Normalised convolution: each pixel gets the weighted mean colour of where `weight` is set nearby.
    Coarser levels (each a quarter the size) reach further; each level fills in under the finer one,
    blended by how much support the finer one had, so no seam shows."""
    import cv2

    sigma = max(radius, 1.0)
    levels = []
    wi, ii = weight, img * weight[..., None]
    while True:
        num, den = cv2.GaussianBlur(ii, (0, 0), sigma), cv2.GaussianBlur(wi, (0, 0), sigma)
        levels.append((num, den))
        h, w = wi.shape
        if float(den.min()) > 1e-4 or max(h, w) <= 8:
            break
        size = (max(1, w // 4), max(1, h // 4))
        wi = cv2.resize(wi, size, interpolation=cv2.INTER_AREA)
        ii = cv2.resize(ii, size, interpolation=cv2.INTER_AREA)
    support = weight > 0.5
    fallback = img[support].mean(axis=0) if support.any() else np.full(3, 128.0, np.float32)
    out: np.ndarray | None = None
    for num, den in reversed(levels):
        h, w = den.shape
        colour = num / np.maximum(den, 1e-6)[..., None]
        below = (np.broadcast_to(fallback.astype(np.float32), colour.shape) if out is None
                 else cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR))
        trust = np.clip(den * 20.0, 0.0, 1.0)[..., None]
        out = below + trust * (colour - below)
    assert out is not None
    return out


def _near_subject(a8: np.ndarray) -> np.ndarray:
    import cv2

    radius = max(2, max(a8.shape) // 256)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate((a8 > 0).astype(np.uint8), kernel) > 0
