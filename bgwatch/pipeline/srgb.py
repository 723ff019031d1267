"""A decoded photo's pixels as sRGB: any Pillow mode (palette, CMYK, 16-bit, grey, with transparency) to
HxWx3 uint8 plus an optional alpha, an embedded profile converted (an sRGB one recognised and left alone),
copied out of Pillow strip by strip so that a big photo is never held twice beside the result.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from loguru import logger
from PIL import Image, ImageCms

from bgwatch.pipeline.encoding import srgb_profile
from bgwatch.text import shown

# Descriptions of the standard sRGB profiles (cameras, Adobe, HP/Microsoft, LittleCMS's built-in one).
_SRGB_NAMES = frozenset({"srgb", "srgb iec61966-2.1", "srgb iec61966-2-1 black scaled", "srgb built-in",
                         "srgb iec61966-2-1 no black scaling", "srgb2014", "srgb profile"})
_STRIP_PIXELS = 1 << 22  # pixels copied out of Pillow per strip: the copy never doubles a big image


def to_srgb(im: Image.Image, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Any Pillow mode -> (HxWx3 uint8 sRGB, HxW uint8 alpha or None), never holding two full copies
    of the pixels in Pillow beside the result."""
    icc = im.info.get("icc_profile")
    alpha: np.ndarray | None = None
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _high_bit_to_l(im)
        mode = im.mode
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("RGBa", "La"):
        im = im.convert("RGBA")
    elif mode == "L" and "transparency" in im.info:
        im = im.convert("LA")
    if im.mode in ("RGBA", "LA"):
        alpha = _pixels(im.getchannel("A"))
        im = im.convert("RGB") if im.mode == "RGBA" else im.convert("L")
        if bool((alpha == 255).all()):
            alpha = None  # an alpha channel with nothing transparent in it
    if icc:
        converted = _icc_to_srgb(im, icc, path)
        if converted is not None:
            im = converted
    if im.mode == "L":
        grey = _pixels(im)
        im.close()
        rgb = np.empty((*grey.shape, 3), np.uint8)
        rgb[...] = grey[..., None]
        return rgb, alpha
    if im.mode != "RGB":
        im = im.convert("RGB")  # CMYK (Adobe inversion already handled by Pillow), YCbCr, LAB, HSV
    return _pixels(im), alpha


def _pixels(im: Image.Image) -> np.ndarray:
    """A writeable numpy copy of an RGB or L image, made strip by strip (np.asarray of a whole image
    would hold a second full copy as bytes, then a third to make it writeable)."""
    width, height = im.size
    out = np.empty((height, width, 3) if im.mode == "RGB" else (height, width), np.uint8)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for y in range(0, height, rows):
        with im.crop((0, y, width, min(height, y + rows))) as strip:
            out[y : y + rows] = np.asarray(strip)
    return out


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    data = np.asarray(im)
    scaled: np.ndarray
    if im.mode == "F":
        top = 1.0 if float(np.nanmax(data, initial=0.0)) <= 1.0 else 255.0
        scaled = np.round(np.nan_to_num(data / top * 255.0))
    elif int(data.max(initial=0)) <= 255:
        scaled = data  # an "I" image that only holds 8-bit values
    else:
        # 16-bit range to 8-bit in integers: (v + 128) // 257 rounds like v / 257, with no float copies
        scaled = np.asarray((data.astype(np.uint32) + 128) // 257)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")


def srgb_or_none(icc: bytes | None) -> bool:
    """Whether pixels with this embedded profile are sRGB as they stand (no profile, or one of the sRGB
    profiles by its description); False for any other profile and for one that cannot be read."""
    if not icc:
        return True
    try:
        return _srgb_described(icc)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return False


def _srgb_described(icc: bytes) -> bool:
    """Whether a profile says it is sRGB (LittleCMS reads one in a few microseconds)."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return (ImageCms.getProfileDescription(source) or "").strip().lower() in _SRGB_NAMES


def _icc_to_srgb(im: Image.Image, icc: bytes, path: Path) -> Image.Image | None:
    try:
        if im.mode == "RGB" and _srgb_described(icc):
            return None  # already sRGB: skip the transform (and its rounding)
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if im.mode == "RGB":  # converted in place: no second full copy of a big photo
            ImageCms.profileToProfile(im, source, srgb_profile(), outputMode="RGB",
                                      renderingIntent=ImageCms.Intent.PERCEPTUAL, inPlace=True)
            return im
        return ImageCms.profileToProfile(im, source, srgb_profile(), outputMode="RGB",
                                         renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        # A damaged or mismatched profile: the pixels are still usable, the colours only approximate.
        logger.warning("{}: embedded colour profile ignored ({}); colours may be slightly off",
                       shown(path.name), shown(str(exc)))
        return None
