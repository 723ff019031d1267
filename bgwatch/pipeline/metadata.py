"""What an output keeps of its input's metadata: the `metadata` policy (keep | strip | web).

- web (the default): the credits and the print size — EXIF Artist, Copyright, ImageDescription and the
  resolution (DPI) — and nothing else: no GPS position, no camera or lens serial numbers, no maker notes.
- keep: all of the input's EXIF (GPS included), less what no longer describes the output: the orientation
  (the pixels are already upright), the pixel dimensions and the embedded thumbnail.
- strip: none.

Every policy writes the sRGB profile that describes the pixels (decoding converted them to sRGB). Only the
input's header is read here, through a descriptor opened without following a link; a header that cannot
be read carries nothing (the pixels were decoded already, so the output is still made).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

POLICIES = ("web", "keep", "strip")
# EXIF IFD0 tags the web policy keeps (PIL.ExifTags.Base values).
ARTIST, COPYRIGHT, DESCRIPTION = 0x013B, 0x8298, 0x010E
X_RESOLUTION, Y_RESOLUTION, RESOLUTION_UNIT = 0x011A, 0x011B, 0x0128
WEB_TAGS = (DESCRIPTION, ARTIST, COPYRIGHT, X_RESOLUTION, Y_RESOLUTION, RESOLUTION_UNIT)
ORIENTATION = 0x0112
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
PIXEL_X, PIXEL_Y = 0xA002, 0xA003  # the Exif IFD's image size: the output's differs
_INCH, _CENTIMETRE = 2, 3


@dataclass(frozen=True, slots=True)
class Carried:
    """What goes into the output's file besides its pixels."""

    exif: bytes = b""  # an EXIF block (Pillow's `exif=`), empty for none
    dpi: tuple[float, float] | None = None  # JPEG's JFIF density and PNG's pHYs


NOTHING = Carried()


def carried(source: Path | int, policy: str, *, name: str = "") -> Carried:
    """The metadata of an image file that `policy` keeps: `source` is its path, or a descriptor open on it
    (read from its start, left open); `name` names it in the log. NOTHING for strip, or when the header
    cannot be read (a warning, not a failure: the pixels were decoded already)."""
    if policy == "strip":
        return NOTHING
    if policy not in POLICIES:
        raise ValueError(f"metadata policy {policy!r} is not one of {', '.join(POLICIES)}")
    from PIL import Image

    from bgwatch.pipeline.imageio import allowed_formats

    name = name or (source.name if isinstance(source, Path) else "input")
    try:
        if isinstance(source, Path):
            fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        else:
            fd = os.dup(source)
            os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return NOTHING
            with Image.open(f, formats=list(allowed_formats())) as im:
                return from_exif(im.getexif(), policy, im.info.get("dpi"))
    except Exception as exc:  # a damaged header: the pixels were decoded, the output goes out without it
        logger.warning("{}: its metadata could not be read ({}); the output carries none", Path(name).name,
                       " ".join(str(exc).split())[:120] or type(exc).__name__)
        return NOTHING


def from_exif(exif: object, policy: str, dpi: object = None) -> Carried:
    """The Carried for a Pillow Exif (`Image.getexif()`) under `policy`; `dpi`: Pillow's info['dpi']."""
    from PIL import Image

    assert isinstance(exif, Image.Exif)
    if policy == "strip":
        return NOTHING
    out = Image.Exif()
    if policy == "keep":
        for tag, value in exif.items():
            if tag not in (ORIENTATION, EXIF_IFD, GPS_IFD):
                out[tag] = value
        for ifd in (EXIF_IFD, GPS_IFD):
            values = {k: v for k, v in exif.get_ifd(ifd).items() if k not in (PIXEL_X, PIXEL_Y)}
            if values:
                out.get_ifd(ifd).update(values)
    else:
        for tag in WEB_TAGS:
            if tag in exif:
                out[tag] = exif[tag]
    return Carried(out.tobytes() if len(out) else b"", _dpi(exif, dpi))


def _dpi(exif: object, dpi: object) -> tuple[float, float] | None:
    """The print resolution in dots per inch: the container's (JFIF, pHYs), else EXIF's."""
    if isinstance(dpi, tuple) and len(dpi) == 2:
        try:
            x, y = float(dpi[0]), float(dpi[1])
        except (TypeError, ValueError):
            return None
        return (x, y) if x > 0 and y > 0 else None
    from PIL import Image

    assert isinstance(exif, Image.Exif)
    try:
        x, y = float(exif[X_RESOLUTION]), float(exif[Y_RESOLUTION])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    per_cm = exif.get(RESOLUTION_UNIT, _INCH) == _CENTIMETRE
    x, y = (x * 2.54, y * 2.54) if per_cm else (x, y)
    return (x, y) if x > 0 and y > 0 else None
