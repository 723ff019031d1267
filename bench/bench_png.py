"""PNG encoding of transparent cut-outs: bgwatch's own writer with each deflate and row filter, against
Pillow's encoder (its default level 6, and level 1).

    python bench/bench_png.py [--count 12] [--size 1024] [--from DIR]

The cut-outs are the transparent results of a cleanup (pipeline/cleanup.py) of studio shots from
bgwatch.samples with their true masks, as the daemon writes them; `--from DIR` adds the PNGs of a run's
outbox (bench_cleanup.py leaves them under bench/out/bgwatch-run-*/outbox). Each way is timed in CPU ms
an image (best of 3 passes) and its file read back by Pillow and compared with the pixels exactly.
Deflates: zlib, ISA-L (`isal`, levels 0-3), zlib-ng (`zlib-ng`) and libdeflate (`deflate`, whole buffers
only) where installed. Not a timed test.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cutouts(count: int, size: int, extra: Path | None) -> list[np.ndarray]:
    from PIL import Image

    from bgwatch.jobs import JobSpec
    from bgwatch.pipeline import cleanup
    from bgwatch.samples import studio_shot

    images = []
    for seed in range(count):
        shot = studio_shot(seed, (size, size))
        images.append(cleanup.cleanup(shot.rgb, np.round(shot.mask * 255).astype(np.uint8), JobSpec()))
    if extra is not None:
        for path in sorted(extra.glob("*.png"))[:count]:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGBA")).copy())
    return images


def filtered(image: np.ndarray, kind: str) -> np.ndarray:
    """Every row of an RGBA image with its PNG filter byte, filtered as `kind` says (none, sub, up, avg,
    paeth; the same filter on every row)."""
    height, width, channels = image.shape
    rows = image.reshape(height, width * channels)
    out = np.empty((height, width * channels + 1), np.uint8)
    out[:, 0] = ("none", "sub", "up", "avg", "paeth").index(kind)
    left = np.zeros_like(rows)
    left[:, channels:] = rows[:, :-channels]
    up = np.zeros_like(rows)
    up[1:] = rows[:-1]
    if kind == "none":
        out[:, 1:] = rows
    elif kind == "sub":
        np.subtract(rows, left, out=out[:, 1:])
    elif kind == "up":
        np.subtract(rows, up, out=out[:, 1:])
    elif kind == "avg":
        np.subtract(rows, ((left.astype(np.uint16) + up) >> 1).astype(np.uint8), out=out[:, 1:])
    else:
        corner = np.zeros_like(rows)
        corner[1:, channels:] = rows[:-1, :-channels]
        a, b, c = (x.astype(np.int16) for x in (left, up, corner))
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        predicted = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c)).astype(np.uint8)
        np.subtract(rows, predicted, out=out[:, 1:])
    return out


def png_with(image: np.ndarray, kind: str, compress: Callable[[bytes], bytes]) -> bytes:
    from bgwatch.pipeline.encoding import _png_chunk

    height, width = image.shape[:2]
    header = np.array([width, height], ">u4").tobytes() + bytes([8, 6, 0, 0, 0])
    data = compress(filtered(image, kind).tobytes())
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def streaming(module: ModuleType, level: int, strategy: int | None = None) -> Callable[[bytes], bytes]:
    def compress(data: bytes) -> bytes:
        obj = (module.compressobj(level) if strategy is None
               else module.compressobj(level, module.DEFLATED, 15, 8, strategy))
        return bytes(obj.compress(data) + obj.flush())
    return compress


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--from", dest="extra", type=Path, default=None, help="a folder of cut-out PNGs too")
    args = parser.parse_args()

    from PIL import Image

    from bgwatch.pipeline import encoding
    from bgwatch.pipeline.encoding import _png, _srgb_bytes

    images = cutouts(args.count, args.size, args.extra)
    icc = _srgb_bytes()
    ways: dict[str, Callable[[np.ndarray], bytes]] = {}

    def pillow(level: int) -> Callable[[np.ndarray], bytes]:
        def save(image: np.ndarray) -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(image, "RGBA").save(buffer, "PNG", compress_level=level, icc_profile=icc)
            return buffer.getvalue()
        return save

    ways["bgwatch, zlib 1, up (before)"] = lambda im: _png(im, True, icc, None, deflate=zlib)
    ways["bgwatch, png_deflate() (now)"] = lambda im: _png(im, True, icc, None)
    ways["Pillow level 6 (its default)"] = pillow(6)
    ways["Pillow level 1"] = pillow(1)
    compressors: dict[str, Callable[[bytes], bytes]] = {
        "zlib 1": streaming(zlib, 1), "zlib 2": streaming(zlib, 2), "zlib 6": streaming(zlib, 6),
        "zlib 1 RLE": streaming(zlib, 1, zlib.Z_RLE), "zlib 1 FILTERED": streaming(zlib, 1, zlib.Z_FILTERED),
    }
    missing = []
    try:
        from isal import isal_zlib

        compressors.update({f"isal {n}": streaming(isal_zlib, n) for n in range(4)})
    except ImportError:
        missing.append("isal")
    try:
        from zlib_ng import zlib_ng

        compressors.update({f"zlib-ng {n}": streaming(zlib_ng, n) for n in (1, 2)})
    except ImportError:
        missing.append("zlib-ng")
    try:
        import deflate

        compressors.update({f"libdeflate {n}": (lambda data, n=n: bytes(deflate.zlib_compress(data, n)))
                            for n in (1, 3, 6)})
    except ImportError:
        missing.append("deflate")
    for kind in ("up", "sub", "none", "avg", "paeth"):
        for name, compress in compressors.items():
            if kind in ("avg", "paeth", "none") and not name.startswith(("isal 1", "zlib 1")):
                continue
            ways[f"{kind}, {name}"] = lambda im, kind=kind, compress=compress: png_with(im, kind, compress)

    transparent = np.mean([float((im[..., 3] < 255).mean()) for im in images])
    print(f"{len(images)} cut-outs {args.size}x{args.size} (RGBA, {transparent:.0%} of pixels transparent), "
          f"png_deflate() is {encoding.png_deflate().__name__}; CPU ms an image, best of 3\n")
    print(f"{'':34} {'CPU ms':>8} {'KiB':>8} {'size/before':>12}")
    before_size = None
    for name, way in ways.items():
        best = float("inf")
        outputs: list[bytes] = []
        for _ in range(3):
            start = time.process_time()
            outputs = [way(image) for image in images]
            best = min(best, (time.process_time() - start) * 1000 / len(images))
        for image, data in zip(images, outputs, strict=True):
            with Image.open(io.BytesIO(data)) as back:
                assert np.array_equal(np.asarray(back.convert("RGBA")), image), name
        size = float(np.mean([len(d) for d in outputs])) / 1024
        before_size = before_size or size
        print(f"{name:34} {best:8.2f} {size:8.1f} {size / before_size:12.3f}")
    if missing:
        print(f"\nnot installed: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
