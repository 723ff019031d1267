"""The metadata policy (issue 19): what an output keeps of its input's EXIF, through the real encoder and
the pipeline's finish step."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.ExifTags import GPS, IFD, Base

from bgwatch import rules, samples
from bgwatch.jobs import Job, OutputSpec
from bgwatch.pipeline import imageio, metadata, stages
from tests.helpers import make_config

ARTIST, COPYRIGHT, DESCRIPTION = "Ann Lens", "(c) 2026 Studio North", "blue bottle, front"


def camera_exif() -> Image.Exif:
    """What a studio camera writes: credits, print size, orientation, serial numbers and a GPS fix."""
    exif = Image.Exif()
    exif[Base.Artist], exif[Base.Copyright], exif[Base.ImageDescription] = ARTIST, COPYRIGHT, DESCRIPTION
    exif[Base.XResolution], exif[Base.YResolution], exif[Base.ResolutionUnit] = 300.0, 300.0, 2
    exif[Base.Make], exif[Base.Model], exif[Base.Orientation] = "Camera Co", "Studio 5", 1
    details = exif.get_ifd(IFD.Exif)
    details[Base.BodySerialNumber], details[Base.LensSerialNumber] = "BODY-0042", "LENS-7"
    details[Base.ExifImageWidth], details[Base.ExifImageHeight] = 640, 480
    gps = exif.get_ifd(IFD.GPSInfo)
    gps[GPS.GPSLatitudeRef], gps[GPS.GPSLatitude] = "N", (52.0, 31.0, 12.0)
    gps[GPS.GPSLongitudeRef], gps[GPS.GPSLongitude] = "E", (13.0, 24.0, 0.0)
    return exif


def shot_file(tmp_path: Path, name: str = "shot.jpg") -> Path:
    path = tmp_path / name
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(path, quality=90, exif=camera_exif().tobytes(),
                                                               dpi=(300, 300))
    return path


def read_back(data: bytes) -> tuple[Image.Exif, dict[str, object]]:
    with Image.open(io.BytesIO(data)) as im:
        return im.getexif(), dict(im.info)


def test_web_keeps_credits_and_dpi_and_drops_gps_and_serial_numbers(tmp_path: Path) -> None:
    carried = metadata.carried(shot_file(tmp_path), "web")
    assert carried.dpi == (300.0, 300.0)
    exif, info = read_back(imageio.encode(np.zeros((8, 8, 3), np.uint8), OutputSpec(format="jpg"), carried))
    assert (exif[Base.Artist], exif[Base.Copyright], exif[Base.ImageDescription]) == (ARTIST, COPYRIGHT, DESCRIPTION)
    assert float(exif[Base.XResolution]) == 300.0 and info["dpi"] == pytest.approx((300, 300))
    assert IFD.GPSInfo not in exif and not exif.get_ifd(IFD.GPSInfo)
    assert not exif.get_ifd(IFD.Exif)  # the serial numbers live there
    assert Base.Make not in exif and "icc_profile" in info


def test_keep_copies_everything_but_what_no_longer_describes_the_output(tmp_path: Path) -> None:
    carried = metadata.carried(shot_file(tmp_path), "keep")
    exif, _ = read_back(imageio.encode(np.zeros((8, 8, 3), np.uint8), OutputSpec(format="png"), carried))
    assert exif[Base.Artist] == ARTIST and exif[Base.Make] == "Camera Co"
    assert exif.get_ifd(IFD.GPSInfo)[GPS.GPSLatitudeRef] == "N"
    assert exif.get_ifd(IFD.Exif)[Base.BodySerialNumber] == "BODY-0042"
    assert Base.Orientation not in exif  # the pixels are upright already
    assert Base.ExifImageWidth not in exif.get_ifd(IFD.Exif)


def test_strip_keeps_only_the_colour_profile(tmp_path: Path) -> None:
    carried = metadata.carried(shot_file(tmp_path), "strip")
    assert carried == metadata.NOTHING
    exif, info = read_back(imageio.encode(np.zeros((8, 8, 3), np.uint8), OutputSpec(format="webp"), carried))
    assert len(exif) == 0 and "icc_profile" in info


def test_an_unreadable_header_carries_nothing_and_says_so(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    lines: list[str] = []
    from loguru import logger

    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        assert metadata.carried(broken, "web") == metadata.NOTHING
    finally:
        logger.remove(sink)
    assert any("broken.jpg: its metadata could not be read" in line for line in lines)


@pytest.mark.parametrize(("policy", "gps"), [("web", False), ("keep", True)])
def test_the_finish_step_writes_what_the_jobs_policy_keeps(tmp_path: Path, policy: str, gps: bool) -> None:
    config = make_config(tmp_path, {"shop": {"rules": {"mode": "color", "output": {"format": "jpg"},
                                                       "metadata": policy}}})
    inbox = config.inboxes[0]
    path = inbox.path / "bottle.jpg"
    Image.fromarray(samples.studio_shot(2, (320, 240)).rgb).save(path, quality=92, exif=camera_exif().tobytes())
    spec = rules.resolve(path, inbox, config).spec
    job = Job(run_id=1, inbox=str(inbox.path), rel_path="bottle.jpg", source=path, spec=spec,
              input_sha256=hashlib.sha256(path.read_bytes()).hexdigest(), key="k")
    finished = stages.run_all(job, config, stages.Engines(config, None))
    exif, _ = read_back(finished.data)
    assert (exif[Base.Artist], exif[Base.Copyright]) == (ARTIST, COPYRIGHT)
    assert bool(exif.get_ifd(IFD.GPSInfo)) is gps


def test_a_descriptor_is_read_from_its_start_and_left_open(tmp_path: Path) -> None:
    import os

    fd = os.open(shot_file(tmp_path), os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_END)  # where a hash check leaves it
        carried = metadata.carried(fd, "web", name="shot.jpg")
        assert carried.exif and carried.dpi == (300.0, 300.0)
        assert os.fstat(fd).st_size > 0  # still open
    finally:
        os.close(fd)
