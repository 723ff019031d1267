"""imageio: every kind of input a studio drops, the files that must fail cleanly, and the encoders."""

from __future__ import annotations

import io
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from bgwatch.errors import InputError, SpecError
from bgwatch.jobs import OutputSpec
from bgwatch.pipeline.imageio import decode, encode, output_extension, probe_size

MAX = 100_000_000


def _save(path: Path, image: Image.Image, fmt: str, **params) -> Path:
    image.save(path, fmt, **params)
    return path


# ---------------------------------------------------------------- ICC profiles built by hand

_D50 = (0.9642, 1.0, 0.8249)
_SRGB_PRIMARIES = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz_tag(xyz) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15(v) for v in xyz)


def rgb_matrix_profile(primaries, gamma: float, name: str) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix + gamma curves), enough for LittleCMS."""
    desc_text = name.encode("ascii") + b"\0"
    desc = (b"desc" + b"\0" * 4 + struct.pack(">I", len(desc_text)) + desc_text
            + b"\0" * 8 + b"\0" * 3 + b"\0" * 67)
    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", round(gamma * 256)) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", _xyz_tag(_D50)), (b"rXYZ", _xyz_tag(primaries[0])),
            (b"gXYZ", _xyz_tag(primaries[1])), (b"bXYZ", _xyz_tag(primaries[2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve), (b"cprt", b"text" + b"\0" * 4 + b"none\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, blob = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(blob), len(data))
        blob += data
    size = offset + len(blob)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 4 + b"\0" * 4 + b"\0" * 8
              + b"\0" * 8 + struct.pack(">I", 0) + b"".join(_s15(v) for v in _D50) + b"\0" * 4 + b"\0" * 16
              + b"\0" * 28)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + blob


# ---------------------------------------------------------------- decoding


def test_jpeg_decodes_to_srgb_uint8(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.jpg", Image.new("RGB", (64, 48), (200, 100, 50)), "JPEG", quality=95)
    img = decode(path, max_pixels=MAX)
    assert img.rgb.shape == (48, 64, 3) and img.rgb.dtype == np.uint8
    assert (img.width, img.height, img.source_format, img.alpha) == (64, 48, "JPEG", None)
    assert img.rgb.flags.writeable and img.rgb.flags.c_contiguous
    assert np.abs(img.rgb.astype(int) - (200, 100, 50)).max() <= 3


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, red on the left half; orientation 6 = "rotate 90 degrees clockwise to view".
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    path = _save(tmp_path / "phone.jpg", image, "JPEG", exif=exif.tobytes(), quality=95)
    img = decode(path, max_pixels=MAX)
    assert img.rgb.shape == (40, 20, 3)
    assert (img.width, img.height) == (20, 40)
    assert img.rgb[5, 10, 0] > 200 and img.rgb[35, 10, 0] < 60  # the left half is now on top
    assert probe_size(path) == (20, 40)


def _pillow_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every JPEG decoded by Pillow (as before simplejpeg): the straight path declines."""
    from bgwatch.pipeline import imageio

    monkeypatch.setattr(imageio, "_jpeg_rgb", lambda *args: None)


def _studio_jpegs(tmp_path: Path) -> list[Path]:
    """A studio shot and a real photo as cameras and exporters write them: 4:2:0, 4:2:2 and 4:4:4,
    baseline and progressive, an sRGB profile embedded, a phone's EXIF rotation, an odd size."""
    from skimage import data as photos

    from bgwatch.samples import studio_shot

    shot = Image.fromarray(studio_shot(3, (96, 64)).rgb)
    photo = Image.fromarray(photos.coffee()).resize((75, 50))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rotated = shot.getexif()
    rotated[0x0112] = 6
    variants = [{"subsampling": 2}, {"subsampling": 1}, {"subsampling": 0, "quality": 97},
                {"progressive": True}, {"icc_profile": srgb}, {"exif": rotated.tobytes()}]
    paths = []
    for i, params in enumerate(variants):
        for name, image in (("shot", shot), ("photo", photo)):
            paths.append(_save(tmp_path / f"{name}{i}.jpg", image, "JPEG", **params))
    return paths


def test_jpegs_decode_straight_into_numpy_exactly_as_pillow_decodes_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An sRGB colour JPEG goes straight from libjpeg-turbo into numpy (simplejpeg; Pillow holds RGB as
    RGBX and its copy out costs twice the decode): the very same pixels, orientation and profile handling."""
    from bgwatch.pipeline import imageio

    paths = _studio_jpegs(tmp_path)
    for path in paths:
        with open(path, "rb") as f, Image.open(f) as im:
            assert imageio._jpeg_rgb(f, *im.size) is not None, f"{path.name} took Pillow's path"
    straight = [decode(path, max_pixels=MAX) for path in paths]
    _pillow_only(monkeypatch)
    for path, ours in zip(paths, straight, strict=True):
        theirs = decode(path, max_pixels=MAX)
        assert np.array_equal(ours.rgb, theirs.rgb), path.name
        assert ours.rgb.flags.writeable and ours.rgb.flags.c_contiguous
        assert (ours.width, ours.height, ours.source_format, ours.alpha) == (
            theirs.width, theirs.height, "JPEG", None)
    assert [d.rgb.shape for d in straight[-2:]] == [(96, 64, 3), (75, 50, 3)]  # EXIF rotation applied here too


def test_jpegs_decode_through_pillow_when_simplejpeg_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _studio_jpegs(tmp_path)[:2]
    before = [decode(path, max_pixels=MAX).rgb for path in paths]
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # `import simplejpeg` now fails
    from bgwatch.pipeline import imageio

    with open(paths[0], "rb") as f:
        assert imageio._jpeg_rgb(f, 96, 64) is None
    for path, rgb in zip(paths, before, strict=True):
        assert np.array_equal(decode(path, max_pixels=MAX).rgb, rgb)


def test_a_jpeg_with_another_profile_is_still_converted_by_pillow(tmp_path: Path) -> None:
    swapped = rgb_matrix_profile(_SRGB_PRIMARIES[::-1], 2.2, "swapped primaries")
    path = _save(tmp_path / "swap.jpg", Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG", icc_profile=swapped,
                 quality=95)
    r, g, b = decode(path, max_pixels=MAX).rgb[8, 8].astype(int)
    assert b > 170 and r < 60 and g < 60


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = _save(tmp_path / "print.jpg", Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    img = decode(path, max_pixels=MAX)
    assert img.rgb.shape == (16, 16, 3)
    assert np.abs(img.rgb[8, 8].astype(int) - (0, 255, 255)).max() <= 4  # pure cyan


def test_16_bit_png_rgb_and_grey(tmp_path: Path) -> None:
    import cv2

    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[...] = (65535, 32768, 0)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])
    grey16 = np.full((8, 8), 40000, np.uint16)
    cv2.imwrite(str(tmp_path / "grey16.png"), grey16)
    rgb = decode(tmp_path / "rgb16.png", max_pixels=MAX).rgb
    assert rgb.dtype == np.uint8 and np.abs(rgb[0, 0].astype(int) - (255, 128, 0)).max() <= 1
    grey = decode(tmp_path / "grey16.png", max_pixels=MAX).rgb
    assert grey.shape == (8, 8, 3) and np.abs(grey[0, 0].astype(int) - round(40000 / 257)).max() <= 1


def test_greyscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    path = _save(tmp_path / "g.png", Image.new("L", (5, 5), 77), "PNG")
    img = decode(path, max_pixels=MAX)
    assert img.rgb.shape == (5, 5, 3) and (img.rgb == 77).all() and img.alpha is None


def test_palette_with_transparency_gives_alpha(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    path = _save(tmp_path / "pal.png", pal, "PNG", transparency=1)
    img = decode(path, max_pixels=MAX)
    assert img.alpha is not None
    assert img.alpha[0, 0] == 0 and img.alpha[2, 2] == 255
    assert tuple(img.rgb[2, 2]) == (255, 0, 0)


def test_la_and_rgba_alpha_and_opaque_alpha_dropped(tmp_path: Path) -> None:
    la = decode(_save(tmp_path / "la.png", Image.new("LA", (4, 4), (100, 50)), "PNG"), max_pixels=MAX)
    assert la.alpha is not None and la.alpha[0, 0] == 50 and tuple(la.rgb[0, 0]) == (100, 100, 100)
    opaque_png = _save(tmp_path / "o.png", Image.new("RGBA", (4, 4), (1, 2, 3, 255)), "PNG")
    opaque = decode(opaque_png, max_pixels=MAX)
    assert opaque.alpha is None  # an alpha channel with nothing transparent is no transparency
    webp = decode(_save(tmp_path / "t.webp", Image.new("RGBA", (8, 8), (9, 8, 7, 0)), "WEBP", lossless=True),
                  max_pixels=MAX)
    assert webp.alpha is not None and int(webp.alpha.max()) == 0


def test_icc_profile_is_converted_to_srgb(tmp_path: Path) -> None:
    # A profile whose red and blue primaries are sRGB's blue and red: stored red must come out blue.
    swapped = rgb_matrix_profile(_SRGB_PRIMARIES[::-1], 2.2, "swapped primaries")
    path = _save(tmp_path / "swap.png", Image.new("RGB", (4, 4), (200, 30, 30)), "PNG", icc_profile=swapped)
    r, g, b = decode(path, max_pixels=MAX).rgb[0, 0].astype(int)
    assert b > 170 and r < 60 and g < 60
    # A linear-light profile: stored 128 is half the light, which sRGB encodes as about 188.
    linear = rgb_matrix_profile(_SRGB_PRIMARIES, 1.0, "linear sRGB")
    path = _save(tmp_path / "lin.png", Image.new("RGB", (4, 4), (128, 128, 128)), "PNG", icc_profile=linear)
    assert 180 <= int(decode(path, max_pixels=MAX).rgb[0, 0, 1]) <= 196


def test_srgb_profile_leaves_pixels_alone(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = _save(tmp_path / "s.png", Image.fromarray(pixels), "PNG", icc_profile=srgb)
    assert np.array_equal(decode(path, max_pixels=MAX).rgb, pixels)


def test_lab_profile_on_rgb_image_is_ignored_not_fatal(tmp_path: Path) -> None:
    # A profile that does not match the pixels (LAB profile on RGB data) must not lose the image.
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    path = _save(tmp_path / "lab.png", Image.new("RGB", (4, 4), (10, 20, 30)), "PNG", icc_profile=lab)
    assert tuple(decode(path, max_pixels=MAX).rgb[0, 0]) == (10, 20, 30)


# ---------------------------------------------------------------- files that must fail cleanly


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def test_decompression_bomb_fails_fast_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(30000, 30000))
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as caught:
            decode(path, max_pixels=MAX)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Pillow's own guard (kept on) refuses it while reading the header, before bgwatch's limit is asked.
    assert "900 megapixels" in str(caught.value) and "limits.max_pixels" in str(caught.value)
    assert peak < 5 * 1024 * 1024  # 900 MP of RGB would be 2.7 GB
    with pytest.raises(InputError, match="900 megapixels"):
        probe_size(path)


def test_bgwatch_limit_applies_under_pillows_guard(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_png_claiming(12000, 10000))  # 120 MP: over limits.max_pixels, under Pillow's guard
    with pytest.raises(InputError) as caught:
        decode(path, max_pixels=MAX)
    assert "12000x10000" in str(caught.value) and "limits.max_pixels" in str(caught.value)
    assert probe_size(path) == (12000, 10000)  # the header alone is fine to read


def test_limit_counts_pixels(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(InputError, match="max_pixels"):
        decode(path, max_pixels=9_999)
    assert decode(path, max_pixels=10_000).width == 100


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.png", b"", "empty"),
        ("notes.png", b"hello, this is a text file\n", "not an image"),
        ("noise.jpg", bytes(range(256)) * 4, "not an image"),
    ],
)
def test_unusable_files_fail_with_reason(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        decode(path, max_pixels=MAX)
    message = str(caught.value)
    assert name in message and expected in message
    assert "drop" in message  # says what to do


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_fails_with_reason(tmp_path: Path, fmt: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match="truncated"):
        decode(path, max_pixels=MAX)


def test_missing_file_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="gone"):
        decode(tmp_path / "nope.jpg", max_pixels=MAX)
    with pytest.raises(InputError):
        probe_size(tmp_path / "nope.jpg")


# ---------------------------------------------------------------- encoding


def _rgba(transparent: bool) -> np.ndarray:
    image = np.zeros((32, 48, 4), np.uint8)
    image[..., :3] = (30, 140, 200)
    image[..., 3] = 255
    if transparent:
        image[:, :10, 3] = 0
        image[:, 10:12, 3] = 128
    return image


def test_png_round_trip_keeps_alpha_and_srgb_profile() -> None:
    data = encode(_rgba(True), OutputSpec(format="png"))
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG" and back.mode == "RGBA"
    assert np.array_equal(np.asarray(back), _rgba(True))
    profile = ImageCms.ImageCmsProfile(io.BytesIO(back.info["icc_profile"]))
    assert "sRGB" in ImageCms.getProfileDescription(profile)


def test_webp_keeps_alpha_and_honours_quality() -> None:
    rng = np.random.default_rng(2)
    image = _rgba(True)
    image[..., :3] = rng.integers(0, 256, image[..., :3].shape, dtype=np.uint8)
    low = encode(image, OutputSpec(format="webp", quality=20))
    high = encode(image, OutputSpec(format="webp", quality=95))
    assert len(low) < len(high)
    back = np.asarray(Image.open(io.BytesIO(high)))
    assert back.shape == (32, 48, 4) and np.array_equal(back[..., 3], image[..., 3])


def test_jpg_of_opaque_result_and_quality() -> None:
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    small = encode(image, OutputSpec(format="jpg", quality=30))
    big = encode(image, OutputSpec(format="jpg", quality=95))
    assert len(small) < len(big) and Image.open(io.BytesIO(big)).format == "JPEG"
    opaque_rgba = encode(_rgba(False), OutputSpec(format="jpg"))  # an alpha channel that is all 255 is fine
    assert Image.open(io.BytesIO(opaque_rgba)).mode == "RGB"


def test_jpg_with_transparency_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as caught:
        encode(_rgba(True), OutputSpec(format="jpg"))
    assert caught.value.key == "output.format"
    assert "png" in str(caught.value) and "webp" in str(caught.value) and "soften" in str(caught.value)


def test_output_extension_and_unknown_format() -> None:
    extensions = [output_extension(OutputSpec(format=f)) for f in ("png", "jpg", "webp")]
    assert extensions == [".png", ".jpg", ".webp"]
    with pytest.raises(SpecError, match="gif"):
        output_extension(OutputSpec(format="gif"))
    with pytest.raises(SpecError):
        encode(_rgba(False), OutputSpec(format="gif"))


def test_png_encode_uses_the_fast_compression_level() -> None:
    """compress_level 6 (Pillow's default) takes ~4x longer than level 1 for ~10% smaller files; a CPU
    cleanup run is bound by PNG encoding. zlib records the level class in its header: FLEVEL 0 (zlib's
    level 1) or 1 (ISA-L's level 1), never the default (2) or the slowest (3)."""
    image = np.dstack([np.random.default_rng(4).integers(0, 256, (256, 256, 3), dtype=np.uint8),
                       np.full((256, 256), 255, np.uint8)])
    image[:100, :, 3] = 0
    data = encode(image, OutputSpec(format="png"))
    idat = data.index(b"IDAT") + 4
    assert data[idat] & 0x0F == 8 and data[idat + 1] >> 6 <= 1  # deflate, a fast level class


def test_png_is_deflated_by_isal_where_it_imports_and_by_zlib_where_it_does_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """isal is a dependency (ISA-L deflates a cut-out in a fifth of zlib's time, its file within 1%); a
    platform without its wheel still writes the same valid PNG through the standard zlib."""
    from isal import isal_zlib

    from bgwatch.pipeline import encoding

    image = _rgba(True)
    encoding.png_deflate.cache_clear()
    try:
        assert encoding.png_deflate() is isal_zlib
        fast = encode(image, OutputSpec(format="png"))
        encoding.png_deflate.cache_clear()
        monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import ...` now fails
        assert encoding.png_deflate() is zlib
        plain = encode(image, OutputSpec(format="png"))
    finally:
        monkeypatch.undo()
        encoding.png_deflate.cache_clear()
    assert fast != plain  # two deflates, two streams ...
    for data in (fast, plain):  # ... of the very same pixels
        with Image.open(io.BytesIO(data)) as back:
            assert np.array_equal(np.asarray(back), image)
    assert encoding.png_deflate() is isal_zlib


def test_one_transparent_pixel_in_the_last_row_keeps_the_alpha_channel() -> None:
    """Opacity is judged in small strips from the top (a cut-out's first strip decides): one that is
    transparent only at its very end still keeps its alpha."""
    image = np.full((700, 300, 4), 255, np.uint8)
    image[-1, -1, 3] = 7
    with Image.open(io.BytesIO(encode(image, OutputSpec(format="png")))) as back:
        assert back.mode == "RGBA" and np.array_equal(np.asarray(back), image)
    image[-1, -1, 3] = 255
    with Image.open(io.BytesIO(encode(image, OutputSpec(format="png")))) as back:
        assert back.mode == "RGB"


@pytest.mark.parametrize("deflate", ["png_deflate", "zlib"])
def test_png_encoder_round_trips_exactly_and_writes_the_chunks_pillow_writes(
        deflate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bgwatch writes its PNGs itself (rows 'up'-filtered, deflated strip by strip; faster than Pillow's
    encoder): the pixels must read back exactly (RGBA, RGB, an all-opaque RGBA stored as RGB, and an image
    of several strips) and the metadata chunks must be the ones Pillow writes for the same image: the sRGB
    profile, the DPI and the EXIF, each with a valid CRC. With ISA-L's deflate and with zlib's (its
    fallback)."""
    from bgwatch.pipeline import encoding
    from bgwatch.pipeline.metadata import Carried

    if deflate == "zlib":
        monkeypatch.setattr(encoding, "png_deflate", lambda: zlib)

    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x013B] = "A. Photographer"  # Artist
    carried = Carried(exif=exif.tobytes(), dpi=(300.0, 72.0))
    # 4096 x 1100 is more than one strip of rows (encoding._STRIP_PIXELS): the filter runs on across their seams
    tall = np.empty((1100, 4096, 4), np.uint8)
    tall[...] = np.arange(4096 * 4, dtype=np.uint32).reshape(1, 4096, 4).astype(np.uint8)
    tall[:, :, 1] += np.arange(1100, dtype=np.uint32).astype(np.uint8)[:, None]
    for image in (rgba, rgba[..., :3].copy(), np.dstack([rgba[..., :3], np.full((37, 53), 255, np.uint8)]), tall):
        data = encode(image, OutputSpec(format="png"), carried)
        expected = image if image.shape[2] == 3 or (image[..., 3] < 255).any() else image[..., :3]
        with Image.open(io.BytesIO(data)) as back:
            back.load()  # Pillow checks every chunk's CRC while reading
            assert back.mode == ("RGBA" if expected.shape[2] == 4 else "RGB")
            assert np.array_equal(np.asarray(back), expected)
            reference = io.BytesIO()
            Image.fromarray(expected[:2]).save(reference, "PNG", icc_profile=back.info["icc_profile"],
                                           exif=carried.exif, dpi=carried.dpi)
            with Image.open(reference) as pillow:
                assert back.info["dpi"] == pillow.info["dpi"] and back.info["exif"] == pillow.info["exif"]
                assert back.getexif()[0x013B] == "A. Photographer"
        # the chunks in Pillow's order: header, profile, density, EXIF, then the pixels
        kinds, at = [], 8
        while at < len(data):
            (length,) = struct.unpack(">I", data[at : at + 4])
            kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
            assert struct.unpack(">I", data[at + 8 + length : at + 12 + length])[0] == zlib.crc32(kind + body)
            kinds.append(kind)
            at += 12 + length
        assert kinds[:4] == [b"IHDR", b"iCCP", b"pHYs", b"eXIf"] and kinds[-1] == b"IEND"
        assert set(kinds[4:-1]) == {b"IDAT"}
