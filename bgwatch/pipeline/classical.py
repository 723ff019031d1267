"""The classical mask engine's algorithm: backdrop subtraction for studio product shots, no weights.

A studio backdrop is a smooth surface: white or grey sweep, paper, a gradient, a light vignette. So:
fit that surface with a low-order polynomial (robustly: the product and its shadow are outliers),
measure how far each pixel is from it in LAB (chroma weighted up; "darker with the backdrop's own
chroma" discounted as shadow), threshold with hysteresis around Otsu's level, repair the subject's
parts that happen to match the backdrop, let grabCut settle the outline, and put the edge back at
full resolution with a guided filter. Everything but the last step runs at WORK_SIZE pixels.
"""

from __future__ import annotations

import numpy as np

from bgwatch.errors import EngineError
from bgwatch.pipeline.tiles import upsample_window

WORK_SIZE = 512
TILE_SIDE = 1024  # full-resolution work on the outline runs in tiles of about this side (padding included)
MAX_EDGE_SHARE = 0.4  # a product may be cropped along one side of the frame, not more
MAX_BACKDROP_NOISE = 5.0  # median LAB residual of the border around a smooth fit; busy scenes are 8-25


def studio_mask(rgb: np.ndarray) -> np.ndarray:
    """Subject alpha (float32 HxW in [0, 1]) of a product shot on a plain or studio backdrop."""
    import cv2

    height, width = rgb.shape[:2]
    if min(height, width) < 8:
        return np.zeros((height, width), np.float32)
    scale = min(1.0, WORK_SIZE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    small = cv2.GaussianBlur(small, (0, 0), 0.8)
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    h, w = lab.shape[:2]

    ring = np.zeros((h, w), bool)
    b = max(2, int(0.06 * min(h, w)))
    ring[:b], ring[-b:], ring[:, :b], ring[:, -b:] = True, True, True, True
    backdrop, noise = _fit_backdrop(lab, ring, degree=2)
    if noise > MAX_BACKDROP_NOISE:
        raise _not_a_studio_shot(f"the edges of the frame are not a plain backdrop (they vary by {noise:.0f} "
                                 f"LAB units, a studio backdrop by under {MAX_BACKDROP_NOISE:.0f})")
    diff, _, _ = _difference(lab, backdrop)
    rough = cv2.dilate((diff > max(6.0, 4 * noise)).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    if rough.mean() < 0.9:  # refit on every pixel that is surely backdrop: the centre matters most
        backdrop, noise = _fit_backdrop(lab, ~rough, degree=3)
    diff, shadow, raw = _difference(lab, backdrop)

    low = max(6.0, 4.0 * noise)
    scaled = np.clip(diff * 4, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    high = float(np.clip(otsu / 4.0, 1.5 * low, 30.0))
    subject = _hysteresis(diff, low, high)
    subject = _close_small_gaps(subject, diff, low)
    subject = _fill_between(subject, raw, low)
    subject = _keep_subjects(subject)
    subject = _fill_holes(subject, diff, low)
    subject = _grabcut(small, subject, shadow)
    if not subject.any():
        return np.zeros((height, width), np.float32)
    edge = np.concatenate([subject[0], subject[-1], subject[:, 0], subject[:, -1]])
    if edge.mean() > MAX_EDGE_SHARE:
        raise _not_a_studio_shot(f"what stands out from the backdrop covers {edge.mean():.0%} of the frame's "
                                 "edges")

    # Full resolution: a mixed edge pixel differs from the backdrop in proportion to its coverage, so
    # alpha = difference / (the subject's own difference nearby), re-estimated only along the outline.
    return _full_resolution(rgb, subject, backdrop, (diff, raw) if scale == 1.0 else None, scale, low, high)


def _full_resolution(rgb: np.ndarray, subject: np.ndarray, backdrop: np.ndarray,
                     small_diff: tuple[np.ndarray, np.ndarray] | None, scale: float, low: float,
                     high: float) -> np.ndarray:
    """The subject's alpha at full resolution (float32 HxW): 1 inside, 0 outside, and along the outline
    the coverage read from the full-resolution difference to the backdrop.

    Computed in tiles: only tiles the outline crosses pay for LAB and the difference (a few float32
    planes of one padded tile), so memory is the output plane plus a tile, whatever the image size.
    Each tile is padded by what its pixels depend on (4 radii + the blur), so the seams are exact."""
    import cv2

    height, width = rgb.shape[:2]
    radius = max(2, round(1.5 / scale))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    pad = 4 * radius + 8
    tile = max(256, TILE_SIDE - 2 * pad)
    coverage = subject.astype(np.float32)
    out = np.empty((height, width), np.float32)
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            py0, py1, px0, px1 = max(y0 - pad, 0), min(y1 + pad, height), max(x0 - pad, 0), min(x1 + pad, width)
            core = (slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0))
            solid = (upsample_window(coverage, (height, width), (py0, py1, px0, px1)) > 0.5).astype(np.uint8)
            if not solid.any() or bool(solid.all()):
                out[y0:y1, x0:x1] = solid[core]
                continue
            if small_diff is not None:
                fine, fine_raw = small_diff[0][py0:py1, px0:px1], small_diff[1][py0:py1, px0:px1]
            else:
                lab = cv2.cvtColor(rgb[py0:py1, px0:px1].astype(np.float32) * np.float32(1 / 255),
                                   cv2.COLOR_RGB2LAB)
                lab = cv2.GaussianBlur(lab, (0, 0), 0.7)
                window_backdrop = upsample_window(backdrop, (height, width), (py0, py1, px0, px1))
                fine, _, fine_raw = _difference(lab, window_backdrop)
                del lab, window_backdrop
            out[y0:y1, x0:x1] = _edge_alpha(solid, fine, fine_raw, kernel, radius, low, high)[core]
    return out


def _edge_alpha(solid: np.ndarray, fine: np.ndarray, fine_raw: np.ndarray, kernel: np.ndarray, radius: int,
                low: float, high: float) -> np.ndarray:
    """One (padded) tile of the full-resolution alpha: solid, with the band along its outline re-read."""
    import cv2

    # Inside the outline a dark, neutral part of the product is not a shadow: only outside it is one.
    fine = np.where(solid > 0, fine_raw, fine)
    inner = cv2.erode(solid, kernel)
    band = (cv2.dilate(solid, kernel) > 0) & (inner == 0)
    # The subject's own difference is read just inside the band: shading often darkens a product
    # towards its outline, so its middle would overstate it.
    rim = (inner - cv2.erode(inner, kernel)).astype(np.float32)
    reach = (4 * radius + 1, 4 * radius + 1)
    support = cv2.boxFilter(rim, -1, reach)
    level = cv2.boxFilter(fine * rim, -1, reach) / np.maximum(support, 1e-3)
    level = np.maximum(np.where(support > 1e-3, level, high), 1.5 * low)
    floor = 0.5 * low
    alpha = np.clip((fine - floor) / (level - floor), 0.0, 1.0)
    out = solid.astype(np.float32)
    out[band] = alpha[band]
    return out


def _not_a_studio_shot(why: str) -> EngineError:
    return EngineError("classical", f"{why}; this engine is built for products standing clear of the frame "
                       "on a plain or studio backdrop, use mask engine rembg for this image")


def _poly_terms(x: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    return np.stack([x**i * y**j for i in range(degree + 1) for j in range(degree + 1 - i)], axis=-1)


def _fit_backdrop(lab: np.ndarray, where: np.ndarray, degree: int) -> tuple[np.ndarray, float]:
    """Least-squares polynomial surface per LAB channel through `where`, outliers dropped; + noise level."""
    h, w = lab.shape[:2]
    step = max(1, round(max(h, w) / 128))
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    pick = where[ys, xs]
    if pick.sum() < 32:  # nothing to fit on: the frame is all subject; fall back to the border ring
        pick = np.ones_like(pick)
    values = lab[ys[pick], xs[pick]].astype(np.float64)
    terms = _poly_terms(xs[pick] / max(w - 1, 1) * 2 - 1, ys[pick] / max(h - 1, 1) * 2 - 1, degree)
    inlier = np.ones(len(values), bool)
    coef = np.zeros((terms.shape[1], 3))
    residual = np.zeros(len(values))
    for _ in range(3):
        if inlier.sum() < terms.shape[1] * 4:
            break
        a = terms[inlier]
        # Normal equations: a 10x10 solve, far cheaper than an SVD over thousands of samples.
        coef = np.linalg.solve(a.T @ a + 1e-9 * np.eye(a.shape[1]), a.T @ values[inlier])
        residual = np.linalg.norm(values - terms @ coef, axis=1)
        med = float(np.median(residual[inlier]))
        mad = float(np.median(np.abs(residual[inlier] - med)))
        inlier = residual < med + 4 * 1.4826 * mad + 1.0
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    grid = _poly_terms(gx / max(w - 1, 1) * 2 - 1, gy / max(h - 1, 1) * 2 - 1, degree)
    full = grid @ coef.astype(np.float32)
    noise = float(np.median(residual[inlier])) if inlier.any() else 1.0
    return full.astype(np.float32), noise


def _difference(lab: np.ndarray, backdrop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(difference with shadows discounted, shadow likelihood, plain difference), all HxW float32."""
    lum, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    lum_bg = backdrop[..., 0]
    # A shadow scales the backdrop's colour: compare chroma against the backdrop's, scaled the same way.
    s = np.clip(lum / np.maximum(lum_bg, 1.0), 0.0, 1.2)
    chroma = np.sqrt((a - backdrop[..., 1] * s) ** 2 + (b - backdrop[..., 2] * s) ** 2)
    d_lum = lum - lum_bg
    # Brightness ratio on the gamma-encoded scale (as a photographer reads it): studio shadows stay above
    # ~40% of the backdrop, while black and dark products sit well below 30%.
    # Luminance Y = ((L + 16) / 116) ** 3, so the encoded ratio (Y / Y_bg) ** (1 / 2.2) is this:
    ratio = np.power((lum + 16) / np.maximum(lum_bg + 16, 1.0), 3 / 2.2)
    shadow = np.clip((ratio - 0.3) / 0.08, 0, 1) * np.clip(1 - chroma / 8.0, 0, 1) * (d_lum < 0)
    weighted_chroma = 1.5 * chroma
    diff = np.sqrt(weighted_chroma**2 + (d_lum * (1 - shadow)) ** 2)
    raw = np.sqrt(weighted_chroma**2 + d_lum**2)
    return diff.astype(np.float32), shadow.astype(np.float32), raw.astype(np.float32)


def _hysteresis(diff: np.ndarray, low: float, high: float) -> np.ndarray:
    import cv2

    n, labels = cv2.connectedComponents((diff > low).astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[np.unique(labels[diff > high])] = True
    keep[0] = False
    return np.asarray(keep[labels])


def _close_small_gaps(subject: np.ndarray, diff: np.ndarray, low: float) -> np.ndarray:
    """Bridge narrow gaps (a highlight splitting a glossy product): enclosed and not plain backdrop."""
    import cv2

    h, w = subject.shape
    k = max(3, int(0.03 * max(h, w)) | 1)
    closed = cv2.morphologyEx(subject.astype(np.uint8), cv2.MORPH_CLOSE,
                              cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    added = (closed > 0) & ~subject
    n, labels, stats, _ = cv2.connectedComponentsWithStats(added.astype(np.uint8), connectivity=8)
    out = subject.copy()
    for i in range(1, n):
        x, y, ww, hh, _ = stats[i]
        y0, y1, x0, x1 = max(y - 2, 0), min(y + hh + 2, h), max(x - 2, 0), min(x + ww + 2, w)
        part = labels[y0:y1, x0:x1] == i
        ring = (cv2.dilate(part.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0) & ~part
        enclosed = float(subject[y0:y1, x0:x1][ring].mean()) if ring.any() else 0.0
        if enclosed > 0.6 and float(diff[y0:y1, x0:x1][part].mean()) > 0.5 * low:
            out[y0:y1, x0:x1] |= part
    return np.asarray(out)


def _fill_between(subject: np.ndarray, raw: np.ndarray, low: float) -> np.ndarray:
    """A label or band in the backdrop's own tone leaves a notch with the product above and below it;
    fill such notches when they are not plain backdrop (a mug handle's opening is)."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(subject.astype(np.uint8), connectivity=8)
    out = subject.copy()
    for i in range(1, n):
        x, y, ww, hh, _ = stats[i]
        part = labels[y : y + hh, x : x + ww] == i
        between = np.maximum.accumulate(part, axis=0) & np.maximum.accumulate(part[::-1], axis=0)[::-1]
        between &= ~subject[y : y + hh, x : x + ww]
        if not between.any():
            continue
        m, gaps = cv2.connectedComponents(between.astype(np.uint8), connectivity=4)
        sums = np.bincount(gaps.ravel(), weights=raw[y : y + hh, x : x + ww].ravel(), minlength=m)
        counts = np.bincount(gaps.ravel(), minlength=m)
        fill = sums / np.maximum(counts, 1) > low
        fill[0] = False
        out[y : y + hh, x : x + ww] |= fill[gaps]
    return np.asarray(out)


def _keep_subjects(subject: np.ndarray) -> np.ndarray:
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(subject.astype(np.uint8), connectivity=8)
    if n <= 1:
        return subject
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, bool)
    keep[1:] = (areas >= 0.08 * areas.max()) & (areas >= 0.0005 * subject.size)
    return np.asarray(keep[labels])


def _fill_holes(subject: np.ndarray, diff: np.ndarray, low: float) -> np.ndarray:
    """Fill enclosed holes unless they show the backdrop or its shadow (the opening of a mug's handle)."""
    import cv2

    h, w = subject.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~subject).astype(np.uint8), connectivity=4)
    sums = np.bincount(labels.ravel(), weights=diff.ravel(), minlength=n)
    x, y, ww, hh, area = (stats[:, i] for i in range(5))
    enclosed = (x > 0) & (y > 0) & (x + ww < w) & (y + hh < h)
    fill = enclosed & ((area < 0.0002 * subject.size) | (sums / np.maximum(area, 1) > 0.5 * low))
    fill[0] = False
    return np.asarray(subject | fill[labels])


GRABCUT_SEED = 0x6267  # any fixed value: outputs depend on the photo alone


def _grabcut(small: np.ndarray, subject: np.ndarray, shadow: np.ndarray) -> np.ndarray:
    """Let grabCut settle the outline inside a narrow band; shadows next to the subject are backdrop."""
    import cv2

    h, w = subject.shape
    r = max(2, int(0.01 * max(h, w)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    s8 = subject.astype(np.uint8)
    inner, outer = cv2.erode(s8, kernel) > 0, cv2.dilate(s8, kernel) > 0
    if not inner.any():
        return subject
    mask = np.full((h, w), cv2.GC_BGD, np.uint8)
    mask[outer] = cv2.GC_PR_BGD
    mask[subject] = cv2.GC_PR_FGD
    mask[inner] = cv2.GC_FGD
    mask[outer & ~subject & (shadow > 0.5)] = cv2.GC_BGD
    ys, xs = np.nonzero(outer)
    m = 3 * r
    y0, y1 = max(int(ys.min()) - m, 0), min(int(ys.max()) + m + 1, h)
    x0, x1 = max(int(xs.min()) - m, 0), min(int(xs.max()) + m + 1, w)
    crop = mask[y0:y1, x0:x1].copy()
    if not (crop == cv2.GC_BGD).any():
        return subject
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    # grabCut seeds its colour models with k-means from OpenCV's per-thread RNG: without a fixed seed the
    # same photo gets another outline depending on what ran on this thread before (up to 0.5 of alpha on
    # edge pixels between two runs of one file in one process).
    cv2.setRNGSeed(GRABCUT_SEED)
    try:
        cv2.grabCut(np.ascontiguousarray(small[y0:y1, x0:x1, ::-1]), crop, (0, 0, 0, 0), bgd, fgd, 2,
                    cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # degenerate colour models (a flat crop): keep the threshold's answer
        return subject
    out = np.zeros_like(subject)
    out[y0:y1, x0:x1] = (crop == cv2.GC_FGD) | (crop == cv2.GC_PR_FGD)
    return out
