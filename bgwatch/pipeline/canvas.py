"""The canvas: where the subject lands in the output — its frame, margins, placement, scale and checks.

    layout = plan(alpha, spec, source=...)      # the geometry, or InputError (too small, too full, clipped)
    rgb, alpha = place(rgb, alpha, layout)      # the photo and its mask moved onto the canvas

It runs in the finish stage before the composite, so the subject is composited (and its contact shadow
cast) on the canvas itself, folder and HTTP jobs alike. Only the window of the photo that lands on the
canvas is read, resized straight into canvas-sized planes (area averaging down, cubic up): the canvas is
the one new full-size allocation, whatever the input's size.

Geometry: the content is the subject's box (`trim`, the box of alpha > 0.5) or the whole frame. It is
scaled to fit the canvas inside the margins (never above MAX_UPSCALE, and not at all above 1 without
`upscale`) and centred, or stood on the bottom margin (`position: bottom`, with room for its contact
shadow below it when the job draws one). Fill is the subject's box's share of the canvas in the direction
it fills most: on a square canvas, its long side over the canvas's side.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loguru import logger

from bgwatch.errors import InputError, SpecError
from bgwatch.jobs import CanvasSpec, JobSpec
from bgwatch.pipeline.tiles import runs, strips

MAX_UPSCALE = 4.0  # `upscale: true` enlarges a subject at most this much: more only shows blur
# position bottom with a shadow: room below the subject for its contact shadow (composite.py), a share of its
# widest footprint: the penumbra (centred 0.05 footprints below the base, 0.16 tall, blurred by 0.13) has
# faded to about 1/255 there, so the shadow is never cut by the canvas's edge.
SHADOW_ROOM = 0.5
FOOT_BAND = 0.05  # the footprint: the columns the subject covers in the lowest 5% of its height
KEEP_PAD = 0.02  # trim: the mask is kept this share of the box's long side (+2 px) around the box
MAX_SIDE = 20_000  # px, the largest canvas side a size may ask for
_PIXELS = re.compile(r"\s*(\d+)\s*[x×]\s*(\d+)\s*")
_ASPECT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*")
_LENGTH = re.compile(r"(\d+(?:\.\d+)?)(%|px)?")

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass(frozen=True, slots=True)
class Length:
    """One side's margin: pixels, or a share of the canvas along that side's axis."""

    value: float
    percent: bool

    def pixels(self, along: float) -> float:
        return self.value / 100.0 * along if self.percent else self.value


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the input's pixels land: canvas pixel (X, Y) shows input pixel ((X - ox) / s, (Y - oy) / s)."""

    width: int
    height: int
    scale: float
    offset: tuple[float, float]
    subject: Box | None  # the subject's box in the input
    placed: Box | None  # ... and on the canvas
    keep: Box | None  # trim: the canvas window outside which the mask is cleared
    fill: float  # the subject's box's share of the canvas (see the module's doc)


def active(canvas: CanvasSpec) -> bool:
    """Whether a job needs the canvas step at all (today's frame kept as it is otherwise)."""
    return bool(canvas.size or canvas.trim or canvas.max_side or canvas.min_subject or canvas.min_fill > 0
                or canvas.max_fill < 1)


def frame_size(spec: JobSpec, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) of the output for a width x height input, as plan() will make it, known before the
    mask: the input's own frame without a canvas, canvas.size when set, the frame with its margins (scaled
    to canvas.max_side) when nothing is trimmed. None when it depends on the subject's box (canvas.trim
    without a size). A backdrop is made at this size, so it is never fitted twice (stages.prepare)."""
    canvas = spec.canvas
    if not active(canvas):
        return width, height
    size = parse_size(canvas.size, canvas.long_side)
    if size is not None:
        return size
    if canvas.trim:
        return None
    framed_width, framed_height, _, _, _ = _around(canvas, width, height)
    return framed_width, framed_height


def _around(canvas: CanvasSpec, cw: int, ch: int, source: str = "spec") -> tuple[int, int, float, float, float]:
    """Without a canvas size: the content (cw x ch) with its margins around it, a percent of the content's
    long side, scaled down to canvas.max_side: (width, height, scale, left margin, top margin)."""
    top, right, bottom, left = parse_margin(canvas.margin, source=source)
    along = max(cw, ch)
    mt, mb, ml, mr = (m.pixels(along) for m in (top, bottom, left, right))
    width, height = round(cw + ml + mr), round(ch + mt + mb)
    scale = 1.0
    if canvas.max_side and max(width, height) > canvas.max_side:
        scale = canvas.max_side / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    return width, height, scale, ml, mt


def canvas_pixels(canvas: CanvasSpec) -> int:
    """The pixels of a job's canvas when its size is set (0 otherwise: the canvas is at most the input)."""
    size = parse_size(canvas.size, canvas.long_side) if canvas.size else None
    return 0 if size is None else size[0] * size[1]


# ---------------------------------------------------------------- parsing (rules.py validates with these)


def parse_size(text: str, long_side: int, *, source: str = "spec") -> tuple[int, int] | None:
    """'2000x2000' -> (2000, 2000); '4:5' with long_side 2000 -> (1600, 2000); '' -> None."""
    text = text.strip().lower()
    if text in ("", "none", "original"):
        return None
    allowed = f'"WIDTHxHEIGHT" in pixels (16 to {MAX_SIDE}) like "2000x2000", or an aspect ratio like "4:5" ' \
              "(with canvas.long_side), or empty for the input's own frame"
    pixels = _PIXELS.fullmatch(text)
    if pixels:
        width, height = int(pixels.group(1)), int(pixels.group(2))
        if not (16 <= width <= MAX_SIDE and 16 <= height <= MAX_SIDE):
            raise SpecError(source, "canvas.size", f"{text!r} is out of range", allowed)
        return width, height
    aspect = _ASPECT.fullmatch(text)
    if aspect:
        a, b = float(aspect.group(1)), float(aspect.group(2))
        if a <= 0 or b <= 0 or not 0.1 <= a / b <= 10:
            raise SpecError(source, "canvas.size", f"{text!r} is not an aspect ratio between 1:10 and 10:1", allowed)
        scale = long_side / max(a, b)
        return max(16, round(a * scale)), max(16, round(b * scale))
    raise SpecError(source, "canvas.size", f"{text!r} is not a canvas size", allowed)


def parse_margin(text: str, *, source: str = "spec") -> tuple[Length, Length, Length, Length]:
    """'7.5%' | '40' | '40px' | '5% 8%' | '5% 5% 10% 5%' -> (top, right, bottom, left), as in CSS."""
    parts = text.replace(",", " ").split()
    allowed = 'pixels or percent, for all sides or per side like CSS (top right bottom left): "7.5%", "40", ' \
              '"40px", "5% 8%", "5% 5% 10% 5%"; a percent is of the canvas\'s width (left, right) or height ' \
              "(top, bottom), at most 45%"
    lengths = []
    for part in parts:
        found = _LENGTH.fullmatch(part.lower())
        if not found:
            raise SpecError(source, "canvas.margin", f"{text!r} is not a margin", allowed)
        length = Length(float(found.group(1)), found.group(2) == "%")
        if length.value > (45 if length.percent else MAX_SIDE):
            raise SpecError(source, "canvas.margin", f"{part!r} is too large", allowed)
        lengths.append(length)
    if len(lengths) == 1:
        return lengths[0], lengths[0], lengths[0], lengths[0]
    if len(lengths) == 2:
        return lengths[0], lengths[1], lengths[0], lengths[1]
    if len(lengths) == 4:
        return lengths[0], lengths[1], lengths[2], lengths[3]
    raise SpecError(source, "canvas.margin", f"{text!r} has {len(lengths)} values", allowed)


# ---------------------------------------------------------------- planning


def subject_box(alpha: np.ndarray) -> Box | None:
    """The box of the pixels more subject than background (alpha > 0.5; float [0, 1] or uint8), found
    strip by strip; None when there is none."""
    h, w = alpha.shape[:2]
    half = 127 if alpha.dtype == np.uint8 else 0.5
    box: Box | None = None
    for y0, y1 in strips(h, w):
        solid = alpha[y0:y1] > half
        rows = np.flatnonzero(solid.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(solid.any(axis=0))
        part = (int(cols[0]), y0 + int(rows[0]), int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
        box = part if box is None else (min(box[0], part[0]), min(box[1], part[1]),
                                        max(box[2], part[2]), max(box[3], part[3]))
    return box


def plan(alpha: np.ndarray, spec: JobSpec, *, source: str | Path = "input image") -> Layout:
    """The canvas for this job's subject (mask `alpha`, input-sized). InputError, naming the key and
    what is allowed, when the subject is smaller than canvas.min_subject, or its fill on the canvas is
    outside canvas.min_fill..max_fill, or trim finds no subject."""
    canvas = spec.canvas
    h0, w0 = alpha.shape[:2]
    box = subject_box(alpha)
    named = f" (preset {spec.preset})" if spec.preset != "none" else ""
    if box is None and (canvas.trim or canvas.min_subject or canvas.min_fill > 0):
        raise InputError(source, f"no subject found in the mask, so there is nothing to place on the canvas{named}; "
                         "canvas.trim and the size checks need a subject (check the mask engine on this shot)")
    if box is not None and canvas.min_subject:
        side = max(box[2] - box[0], box[3] - box[1])
        if side < canvas.min_subject:
            raise InputError(source, f"canvas.min_subject: the product is {side} px on its long side, under the "
                             f"{canvas.min_subject} px allowed{named}; photograph it larger (closer, or a higher "
                             "resolution) instead of blowing it up")
    content = box if canvas.trim and box is not None else (0, 0, w0, h0)
    cw, ch = content[2] - content[0], content[3] - content[1]
    # Standing on the bottom with a contact shadow: the shadow needs this much room below the subject's box
    # (in input pixels); the bottom margin gives it, and the subject is lifted where the margin is smaller.
    room = SHADOW_ROOM * footprint(alpha, box) if box is not None and canvas.position == "bottom" \
        and _casts_shadow(spec) else 0.0
    top, right, bottom, left = parse_margin(canvas.margin, source=str(source))
    size = parse_size(canvas.size, canvas.long_side, source=str(source))
    if size is not None:
        width, height = size
        mt, mb = top.pixels(height), bottom.pixels(height)
        ml, mr = left.pixels(width), right.pixels(width)
        area_w, area_h = width - ml - mr, height - mt - mb
        if area_w < 1 or area_h < 1:
            raise InputError(source, f"canvas.margin {canvas.margin!r} leaves no room on a {width}x{height} canvas")
        scale = min(area_w / cw, area_h / ch)
        if room * scale > mb:  # ch s + room s - mb <= area_h
            scale = min(area_w / cw, (area_h + mb) / (ch + room))
        limit = MAX_UPSCALE if canvas.upscale else 1.0
        if scale > limit:
            logger.info("{}: the product is too small for the {}x{} canvas: it needs x{:.2f}, enlarged x{:.2f} "
                        "({}){}", Path(source).name, width, height, scale, limit,
                        f"canvas.upscale limit {MAX_UPSCALE:g}" if canvas.upscale else "canvas.upscale is false",
                        named)
            scale = limit
        ox = ml + (area_w - cw * scale) / 2 - content[0] * scale
        if canvas.position == "bottom":
            oy = height - max(mb, room * scale) - ch * scale - content[1] * scale
        else:
            oy = mt + (area_h - ch * scale) / 2 - content[1] * scale
    else:
        width, height, scale, ml, mt = _around(canvas, cw, ch, str(source))
        ox, oy = (ml - content[0]) * scale, (mt - content[1]) * scale
    placed = keep = None
    fill = 0.0
    if box is not None:
        placed = (math.floor(ox + box[0] * scale), math.floor(oy + box[1] * scale),
                  math.ceil(ox + box[2] * scale), math.ceil(oy + box[3] * scale))
        fill = max((box[2] - box[0]) * scale / width, (box[3] - box[1]) * scale / height)
        if canvas.trim:
            pad = math.ceil(KEEP_PAD * max(placed[2] - placed[0], placed[3] - placed[1])) + 2
            keep = (max(0, placed[0] - pad), max(0, placed[1] - pad), min(width, placed[2] + pad),
                    min(height, placed[3] + pad * 4))  # more below: the soft edge where it stands
    # Clipped: the photo's own edge cuts the subject (the fit above keeps it whole on the canvas).
    clipped = box is not None and (box[0] == 0 or box[1] == 0 or box[2] == w0 or box[3] == h0)
    if canvas.min_fill > 0 and fill < canvas.min_fill - 1e-6:
        raise InputError(source, f"canvas.min_fill: the product would fill {fill:.0%} of the canvas, less than "
                         f"the {canvas.min_fill:.0%} allowed{named}"
                         + ("" if canvas.upscale else "; canvas.upscale: true lets it be enlarged"))
    if clipped and canvas.max_fill < 1:
        raise InputError(source, f"canvas.max_fill: the product is cut off by the photo's edge, and a "
                         f"canvas.max_fill below 100% ({canvas.max_fill:.0%}{named}) allows only whole products; "
                         "photograph it with space around it")
    if fill > canvas.max_fill + 1e-6:
        raise InputError(source, f"canvas.max_fill: the product would fill {fill:.0%} of the canvas, more than "
                         f"the {canvas.max_fill:.0%} allowed{named}; widen canvas.margin or set canvas.trim: true")
    logger.debug("{}: on a {}x{} canvas at x{:.3f}, the product's box {} filling {:.1%}", Path(source).name, width,
                 height, scale, placed, fill)
    return Layout(width, height, scale, (ox, oy), box, placed, keep, fill)


def footprint(alpha: np.ndarray, box: Box) -> int:
    """The widest run of columns the subject covers in the lowest FOOT_BAND of its box (gaps under 3% of
    the box's width bridged): the width of the widest contact shadow composite.py casts."""
    x0, y0, x1, y1 = box
    band_top = max(y0, y1 - max(2, int(FOOT_BAND * (y1 - y0))))
    half = 127 if alpha.dtype == np.uint8 else 0.5
    covered = (alpha[band_top:y1, x0:x1] > half).any(axis=0)
    columns = np.flatnonzero(covered)
    if columns.size == 0:
        return 0
    gap = max(1, int(0.03 * (x1 - x0)))
    starts, ends = runs(columns, gap)
    return int((ends - starts + 1).max())


def _casts_shadow(spec: JobSpec) -> bool:
    return spec.operation == "replace" and spec.shadow


# ---------------------------------------------------------------- placing


def place(rgb: np.ndarray, alpha: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """The photo (HxWx3 uint8) and its mask (HxW float [0, 1] or uint8) on the canvas: (rgb, alpha float32).
    Canvas pixels that show no input pixel have the mean colour of the window's edge and alpha 0."""
    import cv2

    h0, w0 = rgb.shape[:2]
    width, height, s = layout.width, layout.height, layout.scale
    ox, oy = layout.offset
    out_rgb = np.empty((height, width, 3), np.uint8)
    out_alpha = np.zeros((height, width), np.float32)
    # The canvas window the input covers, and the input window it needs (a pixel more for the filter).
    cx0, cy0 = max(0, math.floor(ox)), max(0, math.floor(oy))
    cx1, cy1 = min(width, math.ceil(ox + w0 * s)), min(height, math.ceil(oy + h0 * s))
    if cx1 <= cx0 or cy1 <= cy0:
        out_rgb[...] = rgb[h0 // 2, w0 // 2]
        return out_rgb, out_alpha
    sx0, sy0 = max(0, math.floor((cx0 - ox) / s) - 2), max(0, math.floor((cy0 - oy) / s) - 2)
    sx1, sy1 = min(w0, math.ceil((cx1 - ox) / s) + 2), min(h0, math.ceil((cy1 - oy) / s) + 2)
    tw, th = max(1, round((sx1 - sx0) * s)), max(1, round((sy1 - sy0) * s))
    interpolation = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC if s > 1 else cv2.INTER_NEAREST
    window_rgb = rgb[sy0:sy1, sx0:sx1]
    window_alpha = alpha[sy0:sy1, sx0:sx1]
    if alpha.dtype != np.float32:
        window_alpha = window_alpha.astype(np.float32) * np.float32(1 / 255 if alpha.dtype == np.uint8 else 1)
    if (tw, th) == (sx1 - sx0, sy1 - sy0):
        moved_rgb, moved_alpha = window_rgb, window_alpha
    else:
        moved_rgb = cv2.resize(window_rgb, (tw, th), interpolation=interpolation)
        moved_alpha = cv2.resize(window_alpha, (tw, th), interpolation=interpolation)  # views: no copy
    edge = np.concatenate([window_rgb[0], window_rgb[-1], window_rgb[:, 0], window_rgb[:, -1]])
    out_rgb[...] = edge.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    # Where the resized window's top-left lands; its parts off the canvas are left out.
    px, py = round(ox + sx0 * s), round(oy + sy0 * s)
    ax0, ay0 = max(0, px), max(0, py)
    ax1, ay1 = min(width, px + tw), min(height, py + th)
    out_rgb[ay0:ay1, ax0:ax1] = moved_rgb[ay0 - py : ay1 - py, ax0 - px : ax1 - px]
    np.clip(moved_alpha[ay0 - py : ay1 - py, ax0 - px : ax1 - px], 0.0, 1.0, out=out_alpha[ay0:ay1, ax0:ax1])
    del moved_rgb, moved_alpha
    if layout.keep is not None:  # trim: whatever the mask holds away from the subject is background
        kx0, ky0, kx1, ky1 = layout.keep
        out_alpha[:ky0] = 0
        out_alpha[ky1:] = 0
        out_alpha[:, :kx0] = 0
        out_alpha[:, kx1:] = 0
    return out_rgb, out_alpha
