"""Memory bounded by pixels: images past OpenCV's 32767-pixel limits, one job's peak RSS per pixel, and
the pixel limit on every decode (backdrops, downloads)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgwatch.errors import EngineError, InputError
from bgwatch.jobs import JobSpec
from bgwatch.pipeline.cleanup import cleanup
from bgwatch.pipeline.refine import refine_mask, to_alpha8

ROOT = Path(__file__).resolve().parents[1]


def _wide_shot(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A long product (a rail, a ribbon) across a very wide frame, with a soft edge."""
    import cv2

    alpha = np.zeros((height, width), np.float32)
    alpha[height // 4 : 3 * height // 4, 1000 : width - 1000] = 1.0
    alpha = cv2.GaussianBlur(alpha, (0, 0), 1.5)
    mixed = alpha[..., None] * np.array([40, 90, 160], np.float32) + (1 - alpha[..., None]) * 235
    return np.round(mixed).astype(np.uint8), alpha


@pytest.mark.parametrize("mode", ["transparent", "color", "soften"])
def test_images_wider_than_shrt_max_are_cleaned(mode: str) -> None:
    """cv2.remap refused maps and images over 32767 px a side (edge colours of a 10000x10000 or a
    40000-px-wide image failed with '(-215) ... SHRT_MAX in function remap'); nothing uses it now."""
    rgb, alpha = _wide_shot(64, 70_000)
    out = cleanup(rgb, refine_mask(to_alpha8(alpha), post_process=True), JobSpec(mode=mode))
    assert out.shape == (64, 70_000, 4 if mode == "transparent" else 3)
    assert tuple(out[32, 35_000, :3]) == (40, 90, 160)  # the subject is untouched
    if mode == "transparent":
        assert out[2, 35_000, 3] == 0 and out[32, 35_000, 3] == 255
        edge = out[15:17, 35_000]  # the soft edge has the subject's colour, not a mix with the white
        assert 0 < int(edge[0, 3]) < 255 and 0 < int(edge[1, 3]) < 255
        assert np.abs(edge[:, :3].astype(int) - (40, 90, 160)).max() <= 12
    else:
        assert abs(int(out[2, 35_000, 0]) - 235) < 40  # the background is a backdrop, not the subject


def test_a_thin_image_past_shrt_max_goes_through_the_classical_engine() -> None:
    from bgwatch.pipeline.masking import ClassicalMaskEngine

    rgb, _ = _wide_shot(40, 40_000)
    try:
        alpha = ClassicalMaskEngine().predict(rgb)
    except EngineError:
        return  # refusing a frame it cannot read is fine; crashing in OpenCV is not
    assert alpha.shape == (40, 40_000) and alpha.dtype == np.float32


def test_mask_between_stages_is_uint8_and_refines_like_float() -> None:
    rng = np.random.default_rng(1)
    raw = np.clip(rng.random((120, 160)).astype(np.float32) * 0.2, 0, 1)
    raw[30:90, 40:120] = 0.9
    a8 = to_alpha8(raw)
    assert a8.dtype == np.uint8 and int(a8[50, 60]) == round(0.9 * 255)
    assert np.abs(refine_mask(a8, post_process=True) - refine_mask(raw, post_process=True)).max() <= 1 / 255 + 1e-6


# One job in a fresh process. ru_maxrss would count the parent's size at the fork (a pytest process that ran
# daemons is bigger than the job, and its size would be read as the job's): the child resets its own
# high-water mark after its imports (/proc/self/clear_refs, 5) and reads VmHWM at the end, as
# bench/bench_memory.py does. argv: the image, then cleanup:MODE or replace:ENGINE.
_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import cv2, numpy as np
    from bgwatch.config import Config
    from bgwatch.jobs import Job, JobSpec, MaskSpec
    from bgwatch.pipeline import classical, cleanup, composite, foreground, imageio, masking, stages
    import PIL.PngImagePlugin
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    path = Path(sys.argv[1])
    operation, _, name = sys.argv[2].partition(":")
    mask = MaskSpec(engine="classical")
    if operation == "replace":
        spec = JobSpec(operation="replace", engine=name, shadow=True, mask=mask)
    else:
        spec = JobSpec(operation="cleanup", mode=name, mask=mask)
    job = Job(run_id=1, inbox="t", rel_path=path.name, source=path, spec=spec, input_sha256="", key="")
    config = Config()
    stages.run_all(job, config, stages.Engines(config, None))
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
    """
)


def job_peak(path: Path, job: str) -> int:
    """Peak bytes above its imports of one job (`job`: cleanup:MODE or replace:ENGINE, classical mask) on
    the image at `path`, in a fresh process that reads its own high-water mark."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), job], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    return int(usage["peak"] - usage["base"])


@pytest.mark.slow
def test_the_child_reads_its_own_peak_not_its_parents(tmp_path: Path) -> None:
    """A parent holding 400 MB starts the job's child; the child's peak must not include them. ru_maxrss
    would (it starts from the parent's size at the fork), and read a small job's peak as 0 above its
    base, or as the parent's size."""
    from bgwatch.samples import studio_shot

    ballast = np.ones(400 * 2**20, np.uint8)  # touched: resident in this process
    path = tmp_path / "small.jpg"
    Image.fromarray(studio_shot(4, (512, 512), "white_sweep").rgb).save(path, quality=90)
    peak = job_peak(path, "replace:gradient")
    assert 0 < peak < 200 * 2**20, f"{peak / 2**20:.0f} MB for a 512x512 job"
    del ballast


def _bytes_per_pixel(tmp_path: Path, job: str) -> float:
    """One 12 MP studio shot through the whole job in a fresh process: peak above the imports, a pixel."""
    import cv2

    from bgwatch.samples import studio_shot

    width, height = 4200, 2800
    small = studio_shot(4, (1050, 700), "white_sweep").rgb
    big = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "studio.jpg"
    Image.fromarray(big).save(path, quality=90)
    del big
    return job_peak(path, job) / (width * height)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["transparent", "color"])
def test_one_cleanup_job_stays_within_bytes_per_pixel(tmp_path: Path, mode: str) -> None:
    """Decode, classical mask, refine, cleanup and PNG encode: under 25 bytes a pixel (it was ~90 before)."""
    per_pixel = _bytes_per_pixel(tmp_path, f"cleanup:{mode}")
    assert per_pixel <= 25, f"{per_pixel:.1f} bytes a pixel above the imports"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["gradient", "color"])
def test_one_replace_job_stays_within_bytes_per_pixel(tmp_path: Path, engine: str) -> None:
    """Decode, classical mask, backdrop, composite (shadow, colour matching, feathered edges) and PNG encode:
    under 25 bytes a pixel (it was ~50 before: full-size float backdrop, shadow and foreground planes)."""
    per_pixel = _bytes_per_pixel(tmp_path, f"replace:{engine}")
    assert per_pixel <= 25, f"{per_pixel:.1f} bytes a pixel above the imports"


# ---------------------------------------------------------------- the pixel limit on every decode


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, "PNG")
    return buffer.getvalue()


def test_backdrop_images_are_decoded_under_the_pixel_limit(tmp_path: Path) -> None:
    from bgwatch.pipeline.backgrounds import load_backdrop

    path = tmp_path / "oak.png"
    path.write_bytes(_png(200, 100))
    with pytest.raises(InputError) as caught:
        load_backdrop(path, max_pixels=19_999)
    assert "200x100" in str(caught.value) and "max_pixels" in str(caught.value)
    assert load_backdrop(path, max_pixels=20_000).shape == (100, 200, 3)


def test_backdrop_images_are_checked_by_content(tmp_path: Path) -> None:
    from bgwatch.pipeline.backgrounds import load_backdrop

    path = tmp_path / "oak.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(InputError, match="PostScript"):
        load_backdrop(path, max_pixels=10**8)


def test_downloaded_runway_images_are_decoded_under_the_pixel_limit() -> None:
    from bgwatch.config import Config, Limits
    from bgwatch.pipeline import runway

    engine = runway.RunwayEngine(Config(limits=Limits(max_pixels=19_999)))
    with pytest.raises(EngineError) as caught:
        runway._decode(_png(200, 100), engine.max_pixels)
    assert "200x100" in str(caught.value) and "max_pixels" in str(caught.value)
    assert runway._decode(_png(200, 100), 20_000).shape == (100, 200, 3)
    with pytest.raises(EngineError, match="PostScript"):
        runway._decode(b"%!PS-Adobe-3.0\n", 10**8)


def test_a_job_that_could_never_fit_the_memory_budget_fails_before_decoding() -> None:
    from bgwatch.jobs import MaskSpec
    from bgwatch.pipeline.jobmemory import DEFAULT_MAX_MEMORY, check_job_memory, job_memory

    cleanup_100mp = job_memory(10_000, 10_000, JobSpec(operation="cleanup"))
    assert cleanup_100mp <= 2.5e9  # the goal: 25 bytes a pixel
    assert job_memory(10_000, 10_000, JobSpec(operation="replace", engine="color")) > cleanup_100mp
    assert job_memory(1000, 1000, JobSpec(mask=MaskSpec(alpha_matting=True))) > job_memory(1000, 1000, JobSpec())
    check_job_memory(10_000, 10_000, JobSpec(operation="cleanup"), max_memory=DEFAULT_MAX_MEMORY)
    with pytest.raises(InputError) as caught:
        check_job_memory(10_000, 10_000, JobSpec(), max_memory=2**30, source="big.jpg")
    text = str(caught.value)
    assert text.startswith("big.jpg") and "limits.max_memory" in text and "10000x10000" in text


def test_an_input_file_far_larger_than_its_pixels_counts_as_what_it_is(tmp_path: Path) -> None:
    """The input is held whole in memory while it is checked and decoded (stages.checked_copy): a small
    image carrying megabytes of extra chunks is admitted by its file's size, not its pixels' alone."""
    import struct
    import zlib

    from bgwatch.config import Config
    from bgwatch.jobs import Job, job_key
    from bgwatch.pipeline import stages
    from bgwatch.pipeline.jobmemory import job_memory

    photo = Image.new("RGB", (64, 48), (245, 245, 245))
    photo.paste((200, 30, 30), (16, 12, 48, 40))  # a product on a plain backdrop: the classical mask finds it
    photo.save(tmp_path / "small.png")
    png = (tmp_path / "small.png").read_bytes()
    body = b"x" * (4 << 20)  # a private ancillary chunk of 4 MiB before IEND
    chunk = struct.pack(">I", len(body)) + b"prVt" + body + struct.pack(">I", zlib.crc32(b"prVt" + body))
    big = tmp_path / "big.png"
    big.write_bytes(png[:-12] + chunk + png[-12:])
    spec = JobSpec()
    pixels_only = job_memory(64, 48, spec)
    assert job_memory(64, 48, spec, big.stat().st_size) == pixels_only + big.stat().st_size

    def job(path: Path) -> Job:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        return Job(run_id=1, inbox=str(tmp_path), rel_path=path.name, source=path, spec=spec, input_sha256=sha,
                   key=job_key(sha, spec))

    limit = pixels_only + (1 << 20)
    assert stages.prepare(job(tmp_path / "small.png"), Config(), max_memory=limit).image.width == 64
    with pytest.raises(InputError, match="file included") as caught:
        stages.prepare(job(big), Config(), max_memory=limit)
    assert str(caught.value).startswith("big.png")


_ARENAS = """
import ctypes, sys, tempfile, threading
if sys.argv[1] == "limited":
    from bgwatch.service import limit_malloc_arenas
    assert limit_malloc_arenas(2)
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    keep = [bytearray(2000) for _ in range(2000)]
    barrier.wait()  # all eight alive with their blocks: none hands its arena on to another
def main():
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    with tempfile.NamedTemporaryFile("r") as report:
        fp = ctypes.c_void_p(libc.fopen(report.name.encode(), b"w"))
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        print(report.read().count("<heap nr="))
main()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and malloc_info are glibc's")
def test_the_daemons_threads_share_at_most_one_c_heap_arena_a_core() -> None:
    """Eight threads allocating at once get eight arenas of their own by default; limited, they share two
    (in a child: the setting is process-wide, and the daemon owns its process)."""
    def arenas(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert arenas("default") > 2
    assert arenas("limited") <= 2
