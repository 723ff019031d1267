"""Decode and encode images: EXIF orientation, colour modes and ICC profiles to sRGB, pixel limits.

Everything a photo can bring (palette, CMYK, 16-bit, greyscale, transparency, a camera or Adobe RGB
profile, a rotated-by-EXIF phone shot) comes out as one thing: HxWx3 uint8 sRGB plus an optional alpha.
Files that cannot be used fail with an InputError that says what is wrong and what to do; the pixel limit
is checked from the header, before a single pixel is decoded.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from bgwatch.errors import InputError, SpecError
from bgwatch.jobs import OutputSpec

# bgwatch enforces its own limit (limits.max_pixels) from the header, before decoding. Pillow's global
# guess (a warning at 89 MP, an error at 179 MP) would otherwise override the operator's setting and, as a
# warning, escape into logs and tests. So it is switched off here and the check below is the only one.
Image.MAX_IMAGE_PIXELS = None

OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp"}
PNG_COMPRESS_LEVEL = 1  # level 6 (Pillow's default) costs ~4x the time for ~10% smaller files
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# Descriptions of the standard sRGB profiles (cameras, Adobe, HP/Microsoft, LittleCMS's built-in one).
_SRGB_NAMES = frozenset({"srgb", "srgb iec61966-2.1", "srgb iec61966-2-1 black scaled", "srgb built-in",
                         "srgb iec61966-2-1 no black scaling", "srgb2014", "srgb profile"})
_SRGB_PROFILE: Any = None
_SRGB_BYTES: bytes | None = None

_SUPPORTED = "JPEG, PNG, WebP, TIFF or BMP"
# warnings.catch_warnings swaps a process-wide filter list: keep our (short) uses of it from overlapping.
_quiet_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class DecodedImage:
    rgb: np.ndarray  # HxWx3 uint8, sRGB, EXIF orientation applied
    alpha: np.ndarray | None  # HxW uint8 where the input had real transparency, else None
    source_format: str  # "JPEG", "PNG", ...
    width: int
    height: int


def probe_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation counted), from the header only."""
    with _open(path) as im:
        width, height = im.size
        if _orientation(im) in _ROTATED_ORIENTATIONS:
            width, height = height, width
        return width, height


def decode(path: Path, *, max_pixels: int) -> DecodedImage:
    """Decode an image file to sRGB. InputError: empty, not an image, truncated, too many pixels."""
    with _open(path) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise InputError(
                path, f"the image is {width}x{height} = {width * height / 1e6:.0f} megapixels, more than "
                f"limits.max_pixels ({max_pixels / 1e6:g} MP); scale it down, or raise limits.max_pixels in "
                "config.yaml if images this large are expected"
            )
        source_format = im.format or path.suffix.lstrip(".").upper()
        try:
            im.load()
            oriented = _apply_orientation(im, path)
            rgb, alpha = _to_srgb(oriented, path)
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _broken(path, source_format, exc) from None
        except MemoryError:
            raise InputError(path, f"not enough memory to decode {width}x{height} pixels; scale it down, "
                             "or lower limits.max_pixels") from None
    height, width = rgb.shape[:2]
    # Pillow hands out read-only views; the pipeline owns its pixels.
    rgb = rgb if rgb.flags.writeable else rgb.copy()
    alpha = alpha if alpha is None or alpha.flags.writeable else alpha.copy()
    return DecodedImage(rgb=rgb, alpha=alpha, source_format=source_format, width=width, height=height)


def encode(image: np.ndarray, output: OutputSpec) -> bytes:
    """HxWx3 or HxWx4 uint8 -> file bytes in output.format (sRGB profile embedded)."""
    fmt = output.format.lower()
    if fmt not in OUTPUT_FORMATS:
        raise SpecError("spec", "output.format", f"{output.format!r} is not an output format",
                        "png, jpg, webp")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"encode needs HxWx3 or HxWx4 uint8, got {image.shape} {image.dtype}")
    image = np.ascontiguousarray(image)
    if image.shape[2] == 4 and bool((image[..., 3] == 255).all()):
        image = np.ascontiguousarray(image[..., :3])  # opaque after all: no alpha channel to store
    has_alpha = image.shape[2] == 4
    if fmt in ("jpg", "jpeg") and has_alpha:
        raise SpecError(
            "spec", "output.format", "jpg cannot store transparency and this result has transparent pixels",
            "png or webp for a transparent result, or jpg with mode soften or color (an opaque result)",
        )
    pil = Image.fromarray(image, "RGBA" if has_alpha else "RGB")
    buffer = io.BytesIO()
    icc = _srgb_bytes()
    if fmt == "png":
        pil.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL, icc_profile=icc)
    elif fmt == "webp":
        # quality 100 means "keep every pixel": lossless WebP; otherwise lossy with exact alpha.
        lossless = output.quality >= 100
        pil.save(buffer, "WEBP", quality=int(output.quality), lossless=lossless, method=4, icc_profile=icc,
                 exact=has_alpha)
    else:
        subsampling = 0 if output.quality >= 90 else 2  # 4:4:4 keeps product edges crisp at high quality
        pil.save(buffer, "JPEG", quality=int(output.quality), subsampling=subsampling, icc_profile=icc)
    return buffer.getvalue()


def output_extension(output: OutputSpec) -> str:
    """".png" | ".jpg" | ".webp" for output.format."""
    try:
        return OUTPUT_FORMATS[output.format.lower()]
    except KeyError:
        raise SpecError("spec", "output.format", f"{output.format!r} is not an output format",
                        "png, jpg, webp") from None


# ---------------------------------------------------------------- decoding helpers


def _open(path: Path) -> Image.Image:
    """Open the header, turning every way a file can be unreadable into an InputError."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(path, "the file is gone (moved or deleted before it could be read)") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the file: {exc.strerror}") from None
    if size == 0:
        raise InputError(path, "the file is empty (0 bytes): the copy or upload did not finish; "
                         "drop it again")
    try:
        with _quiet_lock, warnings.catch_warnings():
            # Pillow warns about odd-but-readable files (bad EXIF, MPO quirks); those are not errors.
            warnings.simplefilter("ignore")
            im = Image.open(path)
            _orientation(im)  # parses and caches EXIF now, while its warnings are silenced
            return im
    except UnidentifiedImageError:
        raise InputError(path, f"not an image ({_sniff(path)}); drop a {_SUPPORTED} file") from None
    except Image.DecompressionBombError as exc:  # only if someone turned Pillow's own limit back on
        raise InputError(path, f"too many pixels ({exc}); scale it down") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"the image header is broken ({exc}); export the file again") from None


def _sniff(path: Path) -> str:
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return "unreadable"
    if head.startswith((b"%PDF",)):
        return "it is a PDF"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if printable == len(head):
        return f"it is a text file starting {head[:12].decode('ascii', 'replace')!r}"
    return f"the {path.suffix or 'file'} contents are not a format Pillow can read"


def _broken(path: Path, source_format: str, exc: BaseException) -> InputError:
    text = str(exc)
    if "truncated" in text or isinstance(exc, EOFError) or "broken data stream" in text:
        return InputError(path, f"the {source_format} data is truncated (the file ends early: an unfinished "
                          "copy or upload); drop the complete file again")
    return InputError(path, f"the {source_format} data is damaged ({text}); export the file again")


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _apply_orientation(im: Image.Image, path: Path) -> Image.Image:
    if _orientation(im) == 1:
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:
        logger.warning("{}: EXIF orientation ignored ({})", path.name, exc)
        return im


def _to_srgb(im: Image.Image, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Any Pillow mode -> (HxWx3 uint8 sRGB, HxW uint8 alpha or None)."""
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
        alpha = np.asarray(im.getchannel("A"))
        im = im.convert("RGB") if im.mode == "RGBA" else im.convert("L")
        if bool((alpha == 255).all()):
            alpha = None  # an alpha channel with nothing transparent in it
    if icc:
        converted = _icc_to_srgb(im, icc, path)
        if converted is not None:
            return np.asarray(converted), alpha
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, CMYK (Adobe inversion already handled by Pillow), YCbCr, LAB, HSV
    return np.asarray(im), alpha


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    data = np.asarray(im)
    if im.mode == "F":
        top = 1.0 if float(np.nanmax(data, initial=0.0)) <= 1.0 else 255.0
        scaled = np.round(np.nan_to_num(data / top * 255.0))
    elif int(data.max(initial=0)) <= 255:
        scaled = data  # an "I" image that only holds 8-bit values
    else:
        # 16-bit range to 8-bit in integers: (v + 128) // 257 rounds like v / 257, with no float copies
        scaled = (data.astype(np.uint32) + 128) // 257
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")


def _icc_to_srgb(im: Image.Image, icc: bytes, path: Path) -> Image.Image | None:
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = (ImageCms.getProfileDescription(source) or "").strip().lower()
        if description in _SRGB_NAMES and im.mode == "RGB":
            return None  # already sRGB: skip the transform (and its rounding)
        return ImageCms.profileToProfile(im, source, _srgb_profile(), outputMode="RGB",
                                         renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        # A damaged or mismatched profile: the pixels are still usable, the colours only approximate.
        logger.warning("{}: embedded colour profile ignored ({}); colours may be slightly off",
                       path.name, exc)
        return None


def _srgb_profile() -> Any:
    global _SRGB_PROFILE
    if _SRGB_PROFILE is None:
        _SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB_PROFILE


def _srgb_bytes() -> bytes:
    global _SRGB_BYTES
    if _SRGB_BYTES is None:
        _SRGB_BYTES = _srgb_profile().tobytes()
    return _SRGB_BYTES

