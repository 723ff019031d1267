"""The decoder against hostile and broken files: an allow-list by content and extension, one-line
InputErrors for everything else, and a fuzzed corpus of mutated JPEG/PNG/WebP/TIFF files."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bgwatch.errors import InputError
from bgwatch.pipeline.imageio import decode, decode_bytes, probe_size

MAX = 100_000_000
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif"}


def _encoded(fmt: str, size: tuple[int, int] = (24, 16), mode: str = "RGB", **params: object) -> bytes:
    rng = np.random.default_rng(len(fmt) + size[0])
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _corpus() -> list[tuple[str, bytes]]:
    """Small valid files of each allowed format, in the variants a studio meets."""
    return [
        ("JPEG", _encoded("JPEG", quality=80)),
        ("JPEG", _encoded("JPEG", progressive=True)),
        ("JPEG", _encoded("JPEG", mode="L")),
        ("PNG", _encoded("PNG")),
        ("PNG", _encoded("PNG", mode="RGBA")),
        ("PNG", _encoded("PNG", mode="L")),
        ("WEBP", _encoded("WEBP", quality=70)),
        ("WEBP", _encoded("WEBP", mode="RGBA", lossless=True)),
        ("TIFF", _encoded("TIFF")),
        ("TIFF", _encoded("TIFF", compression="tiff_deflate")),
        ("TIFF", _encoded("TIFF", mode="RGBA", compression="tiff_lzw")),
    ]


CORPUS = _corpus()


def _assert_one_line_input_error(call: object, path: Path) -> None:
    try:
        call()  # type: ignore[operator]
    except InputError as exc:
        text = str(exc)
        assert "\n" not in text and "\r" not in text, text
        assert text.startswith(path.name), text
    # Any other exception fails the test by propagating: it would have been a dead worker.


def test_a_decoders_message_names_no_python_object() -> None:
    """Pillow names a stream it cannot identify by its repr, with a memory address: the user's message
    keeps the words and drops the address (the same file gives the same message every time)."""
    from PIL import UnidentifiedImageError

    from bgwatch.pipeline import imageio

    with pytest.raises(UnidentifiedImageError) as raised:
        Image.open(io.BytesIO(b"\xff\xd8 not really a JPEG"))
    assert " at 0x" in str(raised.value)
    assert imageio._one_line(raised.value) == "cannot identify image file"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    index=st.integers(0, len(CORPUS) - 1),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 7)), max_size=8),
    splice=st.one_of(st.none(), st.tuples(st.floats(0.0, 1.0), st.binary(min_size=1, max_size=16))),
    header_from=st.one_of(st.none(), st.integers(0, len(CORPUS) - 1)),
)
def test_mutated_files_fail_only_with_one_line_input_errors(
    tmp_path: Path, index: int, cut: float | None, flips: list[tuple[float, int]],
    splice: tuple[float, bytes] | None, header_from: int | None,
) -> None:
    fmt, original = CORPUS[index]
    data = bytearray(original)
    if header_from is not None:  # another format's (or variant's) header on this body
        other = CORPUS[header_from][1]
        data[:16] = other[:16]
    for where, bit in flips:
        data[min(int(where * len(data)), len(data) - 1)] ^= 1 << bit
    if splice is not None:
        at = int(splice[0] * len(data))
        data[at : at + len(splice[1])] = splice[1]
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path / f"fuzz{EXTENSIONS[fmt]}"
    path.write_bytes(bytes(data))
    _assert_one_line_input_error(lambda: decode(path, max_pixels=MAX), path)
    _assert_one_line_input_error(lambda: probe_size(path), path)
    _assert_one_line_input_error(lambda: decode_bytes(bytes(data), name="download", max_pixels=MAX),
                                 Path("download"))


@pytest.mark.parametrize(("fmt", "data"), CORPUS)
def test_every_allowed_format_decodes(tmp_path: Path, fmt: str, data: bytes) -> None:
    path = tmp_path / f"ok{EXTENSIONS[fmt]}"
    path.write_bytes(data)
    image = decode(path, max_pixels=MAX)
    assert image.rgb.shape == (16, 24, 3) and image.rgb.dtype == np.uint8 and image.rgb.flags.writeable
    assert image.source_format == fmt


def _eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
            b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


def _pillow(fmt: str, size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, fmt)
    return buffer.getvalue()


REFUSED = [
    ("eps.jpg", _eps(), "PostScript"),
    ("eps.png", _eps(), "PostScript"),
    ("icon.png", _pillow("ICO"), "ICO"),
    ("icon.jpg", _pillow("ICO"), "ICO"),
    ("texture.png", _pillow("DDS", mode="RGBA"), "DDS"),
    ("paint.jpg", _pillow("PCX"), "PCX"),
    ("frame.png", _pillow("IM"), "IM"),
    ("pixmap.png", _pillow("PPM"), "Netpbm"),
    ("targa.png", _pillow("TGA"), "no format"),
    ("silicon.jpg", _pillow("SGI"), "SGI"),
    ("old.jpg", _pillow("BMP"), "BMP"),
    ("anim.png", _pillow("GIF"), "GIF"),
    ("doc.jpg", b"%PDF-1.7\n1 0 obj\n", "PDF"),
]


@pytest.mark.parametrize(("name", "data", "found"), REFUSED)
def test_other_formats_are_refused_by_content(tmp_path: Path, name: str, data: bytes, found: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    for call in (lambda: decode(path, max_pixels=MAX), lambda: probe_size(path)):
        with pytest.raises(InputError) as caught:
            call()
        text = str(caught.value)
        assert text.startswith(name) and found in text and "allowed: JPEG" in text and "\n" not in text


def test_ghostscript_is_never_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from PIL import EpsImagePlugin

    started: list[object] = []
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: started.append(a))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs", raising=False)
    path = tmp_path / "vector.jpg"
    path.write_bytes(_eps())
    with pytest.raises(InputError, match="PostScript"):
        decode(path, max_pixels=MAX)
    assert started == []


@pytest.mark.parametrize(
    ("name", "fmt", "says"),
    [("photo.jpg", "PNG", "the name says JPEG"), ("photo.png", "JPEG", "the name says PNG"),
     ("photo.webp", "TIFF", "the name says WebP"), ("photo.tiff", "WEBP", "the name says TIFF"),
     ("photo.bmp", "PNG", "the extension .bmp is not one bgwatch reads"),
     ("photo", "JPEG", "the extension (none)")],
)
def test_extension_must_match_the_content(tmp_path: Path, name: str, fmt: str, says: str) -> None:
    path = tmp_path / name
    path.write_bytes(_pillow(fmt))
    with pytest.raises(InputError) as caught:
        decode(path, max_pixels=MAX)
    text = str(caught.value)
    assert says in text and "rename it to" in text and "\n" not in text


def test_upper_case_and_long_extensions_are_the_same_format(tmp_path: Path) -> None:
    for name, fmt in (("A.JPG", "JPEG"), ("b.jpeg", "JPEG"), ("c.TIF", "TIFF"), ("d.tiff", "TIFF")):
        path = tmp_path / name
        path.write_bytes(_pillow(fmt))
        assert decode(path, max_pixels=MAX).width == 16


def test_downloads_are_checked_by_content_and_pixel_limit() -> None:
    with pytest.raises(InputError, match="PostScript"):
        decode_bytes(_eps(), name="download", max_pixels=MAX)
    with pytest.raises(InputError, match="max_pixels"):
        decode_bytes(_pillow("PNG", (100, 100)), name="download", max_pixels=9_999)
    with pytest.raises(InputError, match="no data"):
        decode_bytes(b"", name="download", max_pixels=MAX)
    assert decode_bytes(_pillow("WEBP"), name="download", max_pixels=MAX).rgb.shape == (16, 16, 3)


def test_no_process_wide_pillow_setting_at_import() -> None:
    import subprocess
    import sys

    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; "
            "import bgwatch.pipeline.imageio, bgwatch.pipeline.stages, bgwatch.pipeline.backgrounds; "
            "print(before is not None and Image.MAX_IMAGE_PIXELS == before)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"  # Pillow's bomb guard stays on


def test_a_pipe_or_folder_in_place_of_an_image_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    for path in (fifo, folder):
        with pytest.raises(InputError, match="not a regular file"):
            decode(path, max_pixels=MAX)


# ---------------------------------------------------------------- scan bombs (issue 20, item 10)

_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each SOS segment with its entropy-coded data, parsed by hand."""
    spans, pos = [], 2
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] == 0xDA:
            found = _MARKER.search(data, end)
            assert found is not None
            end = found.start()
            spans.append((pos, end))
        pos = end
    return spans


def scan_bomb(repeats: int, size: tuple[int, int] = (256, 256)) -> bytes:
    """A real progressive JPEG with one of its scans repeated `repeats` times before EOI: each repeat is a
    pass over the whole image for libjpeg (the issue's file: 20,000 repeats, 16 MP, 41 s of CPU)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 130, 140)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    spans = _scans(data)
    start, end = min(spans, key=lambda s: s[1] - s[0])
    last = spans[-1][1]
    return data[:last] + data[start:end] * repeats + data[last:]


def test_a_progressive_jpeg_repeating_one_scan_is_refused_by_its_scan_count(tmp_path: Path) -> None:
    bomb = scan_bomb(20_000)
    assert len(_scans(bomb)) > 20_000
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bomb)
    for decoded in (lambda: decode(path, max_pixels=MAX), lambda: decode_bytes(bomb, name="x.jpg", max_pixels=MAX)):
        with pytest.raises(InputError, match=r"more than 100 scans \(progressive passes\)") as caught:
            decoded()
        assert "\n" not in str(caught.value)
    assert probe_size(path) == (256, 256), "the header alone is still read (admission, report)"


def test_ordinary_jpegs_and_scans_hidden_in_metadata_are_not_counted(tmp_path: Path) -> None:
    normal = scan_bomb(0)
    assert len(_scans(normal)) >= 6  # libjpeg's progressive script
    at_limit = scan_bomb(100 - len(_scans(normal)))
    assert decode_bytes(at_limit, name="x.jpg", max_pixels=MAX).width == 256
    # an APP segment full of SOS markers (an embedded thumbnail, a hostile comment) is skipped by length
    payload = b"\xff\xda\x00\x08" * 4000
    with_app = normal[:2] + b"\xff\xe2" + (len(payload) + 2).to_bytes(2, "big") + payload + normal[2:]
    assert decode_bytes(with_app, name="x.jpg", max_pixels=MAX).height == 256
    with pytest.raises(InputError, match="more than 100 scans"):
        decode_bytes(scan_bomb(101 - len(_scans(normal))), name="x.jpg", max_pixels=MAX)


def _outcome(decoded: object) -> object:
    try:
        return decoded().rgb  # type: ignore[operator]
    except InputError as exc:
        return str(exc)


@settings(max_examples=150, deadline=None)
@given(
    index=st.sampled_from([i for i, (fmt, _) in enumerate(CORPUS) if fmt == "JPEG"]),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 7)), max_size=6),
    cut=st.one_of(st.none(), st.tuples(st.floats(0.0, 1.0), st.integers(1, 200))),
)
def test_a_damaged_jpeg_decodes_or_fails_as_pillow_alone_would(
    index: int, flips: list[tuple[float, int]], cut: tuple[float, int] | None,
) -> None:
    """simplejpeg decodes sRGB JPEGs straight into numpy, strictly: a file it finds anything wrong with
    goes to Pillow, so a damaged JPEG gives the very pixels, or the very message, of Pillow's decoder."""
    from bgwatch.pipeline import imageio

    data = bytearray(CORPUS[index][1])
    for where, bit in flips:
        data[min(int(where * len(data)), len(data) - 1)] ^= 1 << bit
    if cut is not None:  # bytes lost from the middle (the end marker often survives)
        at = int(cut[0] * len(data))
        del data[at : at + cut[1]]
    blob = bytes(data)
    straight = _outcome(lambda: decode_bytes(blob, name="x.jpg", max_pixels=MAX))
    original = imageio._jpeg_rgb
    imageio._jpeg_rgb = lambda *args: None  # type: ignore[assignment]
    try:
        pillow = _outcome(lambda: decode_bytes(blob, name="x.jpg", max_pixels=MAX))
    finally:
        imageio._jpeg_rgb = original
    if isinstance(pillow, str) or isinstance(straight, str):
        assert straight == pillow
    else:
        assert isinstance(straight, np.ndarray) and np.array_equal(straight, pillow)
