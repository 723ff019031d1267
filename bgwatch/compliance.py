"""An output marked against its preset, for `bgwatch report` and `bgwatch history`: size, format, sRGB,
fill, position and — for presets that ask for a pure background — background purity.

The checks read the delivered file itself (what the marketplace will get), not what the pipeline meant to
write. The subject is what differs from the background by more than PURITY_TOLERANCE in some channel;
its box gives the fill and the position. Pure means exactly the preset's colour, every pixel outside the
subject's 8x8 blocks and one block around them (a JPEG codes colour in those blocks: its ringing stays
inside the blocks an edge crosses when the colour is not subsampled, which bgwatch ensures for these
presets).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bgwatch.presets import PRESETS, Preset

PURITY_TOLERANCE = 8  # levels: a pixel further from the background than this is part of the subject
BLOCK = 8  # JPEG's block
CENTRE_TOLERANCE = 0.015  # share of the canvas's side the subject's box centre may be off
_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass(frozen=True, slots=True)
class Check:
    name: str  # size | format | profile | fill | position | background
    ok: bool
    found: str
    wanted: str

    def __str__(self) -> str:
        return f"{self.name} {self.found}" + ("" if self.ok else f" (wanted {self.wanted})")


@dataclass(frozen=True, slots=True)
class Compliance:
    preset: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def summary(self) -> str:
        """'amazon: ok' or 'amazon: NOT fill 78% (wanted 85% ± 3%), background ...'."""
        if self.ok:
            return f"{self.preset}: ok"
        return f"{self.preset}: NOT " + ", ".join(str(c) for c in self.checks if not c.ok)


def for_run(row: dict[str, Any], roots: Sequence[Path]) -> Compliance | None:
    """A done run's output marked against the preset its spec names; None for runs without a preset or
    output. An output that is gone, unreadable or reached through a link fails its checks with that as the
    reason (`roots`: the configured folders, htmlreport.trusted_folders, below which no link is followed;
    none: no link anywhere on the output's path). Every caller passes them: `report`, `history` (table and
    JSON)."""
    if row.get("status") not in ("done", "skipped") or not row.get("output_path"):
        return None
    try:
        preset_name = json.loads(row.get("spec_json") or "{}").get("preset", "none")
    except ValueError:
        return None
    preset = PRESETS.get(str(preset_name))
    if preset is None:
        return None
    return check_file(Path(row["output_path"]), preset, roots)


def tally(marks: Sequence[Compliance | None]) -> str:
    """'3 of 4 output(s) meet their preset' over the runs marked (None: a run without a preset or output);
    '' when none was. The report's page and its console line say it alike."""
    marked = [m for m in marks if m is not None]
    return f"{sum(m.ok for m in marked)} of {len(marked)} output(s) meet their preset" if marked else ""


def check_file(path: Path, preset: Preset, roots: Sequence[Path] | None = None) -> Compliance:
    """`path` (an output file) against `preset`, read through descriptors (sharefiles: anyone on the share
    may have put a link or a scan bomb in the outbox)."""
    from PIL import Image, ImageCms

    from bgwatch import sharefiles
    from bgwatch.errors import InputError
    from bgwatch.pipeline.imageio import allowed_formats, check_jpeg_scans

    try:
        fd = (sharefiles.open_below(path.parent, (path.name,)) if roots is None
              else sharefiles.open_under(path, roots))
        with os.fdopen(fd, "rb") as handle, Image.open(handle, formats=list(allowed_formats())) as im:
            if im.format == "JPEG":
                check_jpeg_scans(handle, path)
            fmt, size = im.format or "", im.size
            icc = im.info.get("icc_profile")
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError, InputError) as exc:
        why = exc.what if isinstance(exc, sharefiles.RefusedFile) else exc.reason if isinstance(exc, InputError) \
            else " ".join(str(exc).split())
        gone = Check("output", False, f"unreadable ({why[:80]})", "the delivered file")
        return Compliance(preset.name, (gone,))
    profile = "none"
    if icc:
        try:
            profile = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()
        except (ImageCms.PyCMSError, OSError, ValueError):
            profile = "unreadable"
    checks = [
        Check("size", size == preset.size, f"{size[0]}x{size[1]}", f"{preset.size[0]}x{preset.size[1]}"),
        Check("format", fmt == _FORMATS[preset.format], fmt or "?", _FORMATS[preset.format]),
        Check("profile", "srgb" in profile.lower(), profile, "sRGB"),
    ]
    return Compliance(preset.name, tuple(checks + image_checks(rgb, preset)))


def image_checks(rgb: np.ndarray, preset: Preset) -> list[Check]:
    """Fill, position and (where the preset asks for it) background purity of decoded HxWx3 uint8 pixels."""
    background = preset.background or _corner_colour(rgb)
    subject, blocks = _subject(rgb, background)
    h, w = rgb.shape[:2]
    wanted_fill = f"{preset.fill:.0%} ± {preset.fill_tolerance:.0%}"
    if subject is None:
        return [Check("fill", False, "no subject", wanted_fill)]
    x0, y0, x1, y1 = subject
    fill = max((x1 - x0) / w, (y1 - y0) / h)
    checks = [Check("fill", abs(fill - preset.fill) <= preset.fill_tolerance + 1e-9, f"{fill:.1%}", wanted_fill)]
    off_x = ((x0 + x1) / 2 - w / 2) / w
    off_y = ((y0 + y1) / 2 - h / 2) / h
    if preset.position == "bottom":
        base = h - _bottom_margin(preset, h)
        ok = abs(off_x) <= CENTRE_TOLERANCE and abs(y1 - base) <= CENTRE_TOLERANCE * h
        found = "on the bottom margin" if ok else f"centre off by {off_x:+.1%} across, standing at {y1} px " \
            f"(the bottom margin is at {base:.0f} px)"
    else:
        ok = abs(off_x) <= CENTRE_TOLERANCE and abs(off_y) <= CENTRE_TOLERANCE
        found = "centred" if ok else f"centre off by {off_x:+.1%} across, {off_y:+.1%} down"
    checks.append(Check("position", ok, found, preset.position))
    if preset.background is not None:
        impure = _impure_outside(rgb, background, blocks)
        checks.append(Check("background", impure == 0,
                            "pure" if impure == 0 else f"{impure} px not {_rgb_text(background)}",
                            f"exactly {_rgb_text(background)} outside the subject"))
    return checks


def _bottom_margin(preset: Preset, height: int) -> float:
    from bgwatch.pipeline.canvas import parse_margin

    canvas = preset.keys.get("canvas")
    margin = canvas.get("margin", "0") if isinstance(canvas, dict) else "0"
    return parse_margin(str(margin))[2].pixels(height)


def _rgb_text(colour: tuple[int, int, int]) -> str:
    return f"({colour[0]}, {colour[1]}, {colour[2]})"


def _corner_colour(rgb: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rgb[0, 0])
    return r, g, b


def _subject(rgb: np.ndarray, background: tuple[int, int, int]) -> tuple[tuple[int, int, int, int] | None, np.ndarray]:
    """The box of the pixels further than PURITY_TOLERANCE from `background`, and the map of 8x8 blocks
    that hold any of them."""
    h, w = rgb.shape[:2]
    blocks = np.zeros((-(-h // BLOCK), -(-w // BLOCK)), bool)
    colour = np.array(background, np.int16)
    box: tuple[int, int, int, int] | None = None
    step = 32 * BLOCK
    for y in range(0, h, step):
        rows = rgb[y : y + step].astype(np.int16)
        far = (np.abs(rows - colour) > PURITY_TOLERANCE).any(axis=2)
        ys, xs = np.nonzero(far)
        if ys.size == 0:
            continue
        blocks[(ys + y) // BLOCK, xs // BLOCK] = True
        part = (int(xs.min()), y + int(ys.min()), int(xs.max()) + 1, y + int(ys.max()) + 1)
        box = part if box is None else (min(box[0], part[0]), min(box[1], part[1]),
                                        max(box[2], part[2]), max(box[3], part[3]))
    return box, blocks


def _impure_outside(rgb: np.ndarray, background: tuple[int, int, int], blocks: np.ndarray) -> int:
    """Pixels not exactly `background` outside the subject's blocks grown by one block."""
    import cv2

    zone = cv2.dilate(blocks.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    h, w = rgb.shape[:2]
    colour = np.array(background, np.uint8)
    impure = 0
    step = 32 * BLOCK
    for y in range(0, h, step):
        rows = rgb[y : y + step]
        off = (rows != colour).any(axis=2)
        inside = np.repeat(np.repeat(zone[y // BLOCK : (y + rows.shape[0] + BLOCK - 1) // BLOCK], BLOCK, 0), BLOCK, 1)
        impure += int((off & ~inside[: rows.shape[0], :w]).sum())
    return impure
