"""Decode images: an allow-list of formats, EXIF orientation, pixel limits; colour to sRGB is srgb.py's job
and writing them encoding.py's.

Everything a photo can bring (palette, CMYK, 16-bit, greyscale, transparency, a camera or Adobe RGB
profile, a rotated-by-EXIF phone shot) comes out as one thing: HxWx3 uint8 sRGB plus an optional alpha.

Every decode in bgwatch (inbox images, backdrop files, downloaded results) goes through `_decode_from`:
- only JPEG, PNG, WebP and TIFF (and AVIF where Pillow itself reads it) are decoded, recognised by the
  file's first bytes, and a file's extension must name the same format: an EPS, ICO or PPM renamed
  .jpg is refused before any decoder sees it (Pillow is only ever asked for the one format found);
- the pixel limit (limits.max_pixels, passed in) is checked from the header, before a pixel is decoded;
  Pillow's own decompression-bomb guard stays on (about 179 MP, a hard ceiling above the setting);
- a JPEG with more than JPEG_MAX_SCANS scans is refused from its markers, before it is decoded (each scan
  is a pass over the whole image: one repeated 20,000 times would cost minutes of CPU);
- a path is opened without following a link (callers that walk from a trusted folder pass a descriptor);
- whatever goes wrong is an InputError with one line naming the file, what was found, what is allowed.
Pillow reads every header and decodes every pixel, except an sRGB colour JPEG at full size: libjpeg-turbo
(simplejpeg) decodes that straight into numpy, strictly, and hands Pillow any file it finds amiss.
Nothing is changed process-wide at import.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, features

from bgwatch.errors import InputError
from bgwatch.pipeline.encoding import OUTPUT_FORMATS as OUTPUT_FORMATS
from bgwatch.pipeline.encoding import PNG_COMPRESS_LEVEL as PNG_COMPRESS_LEVEL
from bgwatch.pipeline.encoding import encode as encode
from bgwatch.pipeline.encoding import output_extension as output_extension
from bgwatch.pipeline.srgb import srgb_or_none, to_srgb

if TYPE_CHECKING:
    pass

_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

# The decoders bgwatch uses: Pillow format name -> the extensions that may carry it.
_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",), "TIFF": (".tif", ".tiff"),
}
_OPTIONAL_FORMATS: dict[str, tuple[str, ...]] = {"AVIF": (".avif",)}  # only where Pillow was built with it
_LABELS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "TIFF": "TIFF", "AVIF": "AVIF"}
# A JPEG decodes each of its scans over the whole image: photos carry 1 (baseline) to about 10 (libjpeg's
# progressive script; mozjpeg and camera firmware stay within a few dozen).
JPEG_MAX_SCANS = 100
# In entropy-coded data 0xFF is followed by a stuffed 0x00 or a restart marker: anything else is a marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
# warnings.catch_warnings swaps a process-wide filter list: keep our (short) uses of it from overlapping.
_quiet_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class DecodedImage:
    rgb: np.ndarray  # HxWx3 uint8, sRGB, EXIF orientation applied
    alpha: np.ndarray | None  # HxW uint8 where the input had real transparency, else None
    source_format: str  # "JPEG", "PNG", ...
    width: int
    height: int


def allowed_formats() -> dict[str, tuple[str, ...]]:
    """The formats bgwatch decodes on this machine (Pillow name -> extensions)."""
    found = dict(_FORMATS)
    for name, extensions in _OPTIONAL_FORMATS.items():
        if features.check(name.lower()):
            found[name] = extensions
    return found


def allowed_text() -> str:
    """'JPEG (.jpg, .jpeg), PNG (.png), ...' for messages and docs."""
    return ", ".join(f"{_LABELS[n]} ({', '.join(ext)})" for n, ext in allowed_formats().items())


def probe_size(path: Path, *, fd: int | None = None) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation counted), from the header only. `fd`: the file already
    open (read from its start; `path` then names it in messages and by its extension)."""
    with _opened_file(path, fd) as (f, fmt), _open(f, fmt, path) as im:
        width, height = im.size
        if _orientation(im) in _ROTATED_ORIENTATIONS:
            width, height = height, width
        return width, height


def decode(path: Path, *, max_pixels: int, fd: int | None = None,
           at_least: tuple[int, int] | None = None) -> DecodedImage:
    """Decode an image file to sRGB. InputError: empty, not an allowed format (by content and by
    extension), truncated, damaged, too many pixels or JPEG scans, a link. `fd`: the file already open
    through descriptors (read from its start; `path` then names it in messages and by its extension).
    `at_least` (width, height as displayed): a JPEG at least twice that on both sides is decoded at a
    half, quarter or eighth of its size (its DCT scaled by Pillow's draft), never below it."""
    with _opened_file(path, fd) as (f, fmt):
        return _decode_from(f, fmt, path, max_pixels, at_least)


def decode_bytes(data: bytes, *, name: str, max_pixels: int) -> DecodedImage:
    """Decode image bytes that have no file name (a download): the content alone must be an allowed
    format. `name` says where they came from in messages."""
    if not data:
        raise InputError(name, "no data (0 bytes)")
    fmt = _content_format(data[:32])
    if fmt not in allowed_formats():
        raise InputError(name, f"the content is {_describe(data[:32])}, not an image bgwatch decodes "
                         f"(allowed: {allowed_text()})")
    return _decode_from(io.BytesIO(data), fmt, Path(name), max_pixels)


def _decode_from(f: IO[bytes], fmt: str, path: Path, max_pixels: int,
                 at_least: tuple[int, int] | None = None) -> DecodedImage:
    """The one decoder: `fmt` (from the content) is the only format Pillow is asked to read."""
    with _open(f, fmt, path) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise InputError(
                path, f"the image is {width}x{height} = {width * height / 1e6:.0f} megapixels, more than "
                f"limits.max_pixels ({max_pixels / 1e6:g} MP); scale it down, or raise limits.max_pixels in "
                "config.yaml if images this large are expected"
            )
        source_format = im.format or fmt
        orientation = _orientation(im)
        straight = False  # an sRGB colour JPEG at full size: decoded straight into numpy (_jpeg_rgb)
        if fmt == "JPEG":
            check_jpeg_scans(f, path)
            if at_least is not None:  # the decoder's own scaling: the full size is never held
                wanted = at_least[::-1] if orientation in _ROTATED_ORIENTATIONS else at_least
                im.draft(im.mode, (max(1, wanted[0]), max(1, wanted[1])))
            else:
                straight = im.mode == "RGB" and srgb_or_none(im.info.get("icc_profile"))
        try:
            fast = _jpeg_rgb(f, width, height) if straight else None
            if fast is not None:
                rgb, alpha = fast, None
            else:
                im.load()
                rgb, alpha = to_srgb(im, path)
        except InputError:
            raise
        except MemoryError:
            raise InputError(path, f"not enough memory to decode {width}x{height} pixels; scale it down, "
                             "or lower limits.max_pixels") from None
        except Exception as exc:  # a damaged file can make a decoder raise anything
            raise _broken(path, _LABELS.get(fmt, fmt), exc) from None
    rgb = _oriented(rgb, orientation)
    alpha = None if alpha is None else _oriented(alpha, orientation)
    height, width = rgb.shape[:2]
    return DecodedImage(rgb=rgb, alpha=alpha, source_format=source_format, width=width, height=height)


# ---------------------------------------------------------------- decoding helpers


@contextmanager
def _opened_file(path: Path, given: int | None = None) -> Iterator[tuple[IO[bytes], str]]:
    """The file, open for reading, and its format: found from its first bytes, allowed, and the one its
    extension names. Every refusal is an InputError naming the file, what was found and what is allowed.
    `given`: a descriptor already open (duplicated here: the caller keeps and closes its own)."""
    try:
        if given is not None:
            fd = os.dup(given)
            os.lseek(fd, 0, os.SEEK_SET)
        else:
            # Non-blocking: a FIFO put in place of the image must not hang the worker; it is refused below.
            # No link is followed: a file swapped for a link to someone else's picture is never read.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(path, "the file is gone (moved or deleted before it could be read)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(path, "the file is a symbolic link (bgwatch never reads through a link)") from None
        raise InputError(path, f"cannot read the file: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(path, "not a regular file (a folder, pipe or device); drop an image file")
    with os.fdopen(fd, "rb") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(32)
            f.seek(0)
        except OSError as exc:
            raise InputError(path, f"cannot read the file: {exc.strerror}") from None
        if size == 0 or not head:
            raise InputError(path, "the file is empty (0 bytes): the copy or upload did not finish; "
                             "drop it again")
        allowed = allowed_formats()
        fmt = _content_format(head)
        if fmt not in allowed:
            raise InputError(path, f"not an image bgwatch decodes: the content is {_describe(head)} "
                             f"(allowed: {allowed_text()}); drop a file of one of those formats")
        suffix = path.suffix.lower()
        if suffix not in allowed[fmt]:
            named = next((_LABELS[n] for n, ext in allowed.items() if suffix in ext), None)
            what = (f"the name says {named}" if named
                    else f"the extension {suffix or '(none)'} is not one bgwatch reads")
            raise InputError(path, f"the content is {_LABELS[fmt]} but {what}; rename it to "
                             f"{allowed[fmt][0]} (allowed: {allowed_text()})")
        yield f, fmt


def check_jpeg_scans(f: IO[bytes], path: Path, limit: int = JPEG_MAX_SCANS) -> None:
    """InputError when the JPEG in `f` has more than `limit` scans. libjpeg decodes every scan over the
    whole image and Pillow sets no cap: one scan repeated 20,000 times costs minutes of CPU for a 1 MB
    file. Counted from the markers (no pixel decoded); the file's offset is left where it was."""
    with _mapped(f) as data:
        scans = _count_scans(data, limit)
    if scans > limit:
        raise InputError(path, f"the JPEG has more than {limit} scans (progressive passes); photos have at "
                         "most a few dozen, so this is refused unread (decoding it would take minutes); "
                         "export the file again")


@contextmanager
def _mapped(f: IO[bytes]) -> Iterator[Any]:
    """The whole file's bytes without reading them into memory where it can be mapped."""
    try:
        data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, io.UnsupportedOperation):
        data = f.getbuffer() if isinstance(f, io.BytesIO) else memoryview(_read_all(f))
    try:
        yield data
    finally:
        if isinstance(data, memoryview):
            data.release()
        else:
            data.close()


def _jpeg_rgb(f: IO[bytes], width: int, height: int) -> np.ndarray | None:
    """A colour JPEG decoded by libjpeg-turbo (simplejpeg) straight into the HxWx3 array bgwatch works
    on, or None where that decoder meets anything amiss: it is strict (a warning is an error), so a cut
    or damaged file goes to Pillow's decoder, which decodes it or says why exactly as before. The same
    libjpeg-turbo decode as Pillow's, pixel for pixel (tests hold it), in 2.1 ms of CPU for 1 MP against
    Pillow's 2.2 plus 4.7 to copy its pixels out (its RGB is held as RGBX). The EXIF orientation is left to
    _oriented, as for every format. None too where simplejpeg does not import (a platform without its
    wheel): Pillow then decodes every JPEG."""
    try:
        import simplejpeg
    except ImportError:
        return None
    with _mapped(f) as data:
        try:
            pixels = simplejpeg.decode_jpeg(data, "RGB", strict=True)
        except ValueError:
            return None
    if pixels.shape != (height, width, 3) or pixels.dtype != np.uint8 or not pixels.flags.writeable:
        return None
    return np.asarray(pixels)


def _read_all(f: IO[bytes]) -> bytes:
    at = f.tell()
    f.seek(0)
    try:
        return f.read()
    finally:
        f.seek(at)


def _count_scans(data: Any, limit: int) -> int:
    """Start-of-scan markers in the first image of a JPEG, counted up to limit + 1."""
    scans = 0
    pos, end = 2, len(data)  # after SOI
    while pos + 4 <= end and scans <= limit:
        if data[pos] != 0xFF:  # not at a marker (a damaged file): find the next one; the decoder judges
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0xD9:  # end of image: later bytes (an MPO's other frames) are not decoded with it
            break
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
                scans += 1
                found = _JPEG_MARKER.search(data, pos)
                if found is None:
                    break
                pos = found.start()
    return scans


def _content_format(head: bytes) -> str:
    """The Pillow format name of an allowed format these first bytes start, or ''."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return ""


# What a refused file most likely is, by its first bytes (for the message only: nothing here is decoded).
_KNOWN_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"%!PS", 0, "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", 0, "EPS"), (b"%PDF", 0, "PDF"),
    (b"GIF8", 0, "GIF"), (b"BM", 0, "BMP"), (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"DDS ", 0, "DDS"), (b"8BPS", 0, "Photoshop PSD"), (b"\x01\xda", 0, "SGI"), (b"\x0a", 0, "PCX"),
    (b"Image type", 0, "IM"), (b"qoif", 0, "QOI"), (b"icns", 0, "ICNS"), (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"), (b"II+\x00", 0, "BigTIFF"), (b"MM\x00+", 0, "BigTIFF"),
    (b"\xd7\xcd\xc6\x9a", 0, "WMF"), (b"\x01\x00\x00\x00", 0, "EMF"), (b"<svg", 0, "SVG"), (b"<?xml", 0, "XML/SVG"),
    (b"PK\x03\x04", 0, "a ZIP archive"), (b"ftypheic", 4, "HEIC"), (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"), (b"ftypavif", 4, "AVIF (this Pillow has no AVIF decoder)"),
)


def _describe(head: bytes) -> str:
    for magic, at, name in _KNOWN_MAGIC:
        if head[at:].startswith(magic):
            return name
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456f":
        return "PPM/PGM/PBM (Netpbm)"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if head and printable == len(head):
        return f"a text file starting {head[:12].decode('ascii', 'replace')!r}"
    return "no format bgwatch knows (TGA and other headerless formats look like this too)"


@contextmanager
def _open(f: IO[bytes], fmt: str, path: Path) -> Iterator[Image.Image]:
    """Pillow's header for `fmt` only; every way a header can be unreadable becomes an InputError."""
    try:
        with _quiet_lock, warnings.catch_warnings():
            # Pillow warns about odd-but-readable files (bad EXIF, MPO quirks) and about images over its
            # bomb warning size; bgwatch's own limit is checked from the header right after.
            warnings.simplefilter("ignore")
            im = Image.open(f, formats=[fmt])
            _orientation(im)  # parses and caches EXIF now, while its warnings are silenced
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "too many pixels"
        guard = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise InputError(path, f"the image is {size}, more than Pillow's decompression-bomb guard ({guard:.0f} MP, "
                         "a ceiling above limits.max_pixels); scale it down") from None
    except MemoryError:
        raise InputError(path, "the image header asks for more memory than there is; export it again") from None
    except Exception as exc:  # UnidentifiedImageError, struct.error, ...: a broken header
        raise InputError(path, f"the {_LABELS.get(fmt, fmt)} header is broken ({_one_line(exc)}); export the "
                         "file again") from None
    try:
        yield im
    finally:
        im.close()


# A decoder's message may name the stream it read as Python shows an object ("cannot identify image file
# <_io.BytesIO object at 0x7f...>"): nothing a user can act on, and a new address every time.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def _one_line(exc: BaseException) -> str:
    text = " ".join(_OBJECT_REPR.sub("", str(exc)).split()) or type(exc).__name__
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:160] + ("..." if len(text) > 160 else "")


def _broken(path: Path, source_format: str, exc: BaseException) -> InputError:
    text = str(exc)
    if "truncated" in text or isinstance(exc, EOFError) or "broken data stream" in text:
        return InputError(path, f"the {source_format} data is truncated (the file ends early: an unfinished "
                          "copy or upload); drop the complete file again")
    return InputError(path, f"the {source_format} data is damaged ({_one_line(exc)}); export the file again")


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # damaged EXIF: the pixels are still usable, unrotated
        return 1
    return value if 1 <= value <= 8 else 1


def _oriented(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation applied in numpy (one contiguous copy at most), as ImageOps.exif_transpose does."""
    if orientation == 1:
        return pixels
    swapped = (1, 0, 2) if pixels.ndim == 3 else (1, 0)
    view = {
        2: pixels[:, ::-1],  # mirrored
        3: pixels[::-1, ::-1],  # rotated 180
        4: pixels[::-1],  # flipped
        5: pixels.transpose(swapped),  # transposed
        6: pixels.transpose(swapped)[:, ::-1],  # rotated 90 clockwise to display
        7: pixels.transpose(swapped)[::-1, ::-1],  # transversed
        8: pixels.transpose(swapped)[::-1],  # rotated 90 counter-clockwise to display
    }[orientation]
    return np.ascontiguousarray(view)
