"""The canvas (issue 19): where the subject lands, how big, the checks that fail a shot, and the
amazon preset end to end through the pipeline's stages on studio shots of several sizes."""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from loguru import logger
from PIL import Image, ImageCms

from bgwatch import rules, samples
from bgwatch.errors import InputError, SpecError
from bgwatch.jobs import CanvasSpec, Job, JobSpec
from bgwatch.pipeline import canvas, jobmemory, stages
from tests.helpers import make_config


def subject(frame: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """A float mask of frame (width, height) with a solid rectangle at box (x0, y0, x1, y1)."""
    alpha = np.zeros((frame[1], frame[0]), np.float32)
    alpha[box[1] : box[3], box[0] : box[2]] = 1.0
    return alpha


def spec_with(**canvas_keys: object) -> JobSpec:
    return JobSpec(canvas=CanvasSpec(**canvas_keys))  # type: ignore[arg-type]


AMAZON_CANVAS = {"size": "2000x2000", "margin": "7.5%", "trim": True, "upscale": True}


@pytest.mark.parametrize("box", [(300, 200, 700, 800), (100, 400, 1100, 600), (50, 50, 650, 650)])
def test_trimmed_subject_fills_the_margin_box_and_is_centred(box: tuple[int, int, int, int]) -> None:
    alpha = subject((1200, 900), box)
    layout = canvas.plan(alpha, spec_with(**AMAZON_CANVAS))
    assert (layout.width, layout.height) == (2000, 2000)
    assert layout.fill == pytest.approx(0.85, abs=0.001)
    x0, y0, x1, y1 = layout.placed
    assert max(x1 - x0, y1 - y0) in (1700, 1701)
    assert abs((x0 + x1) / 2 - 1000) <= 1 and abs((y0 + y1) / 2 - 1000) <= 1
    rgb = np.full((900, 1200, 3), 200, np.uint8)
    _, placed_alpha = canvas.place(rgb, alpha, layout)
    found = canvas.subject_box(placed_alpha)
    assert found is not None and all(abs(a - b) <= 1 for a, b in zip(found, layout.placed, strict=True))


def test_aspect_size_bottom_position_and_per_side_margins() -> None:
    alpha = subject((1000, 1000), (400, 100, 600, 500))  # a tall product, 200 x 400
    spec = spec_with(size="4:5", long_side=1000, margin="10% 5% 20% 5%", position="bottom", trim=True,
                     upscale=True)
    layout = canvas.plan(alpha, spec)
    assert (layout.width, layout.height) == (800, 1000)
    x0, y0, x1, y1 = layout.placed
    assert y1 == 800  # standing on the 20% bottom margin
    assert y1 - y0 == 700  # the height between the margins: 1000 - 100 - 200
    assert abs((x0 + x1) / 2 - 400) <= 1


def test_bottom_with_a_shadow_keeps_room_for_it_under_the_product() -> None:
    alpha = subject((1000, 1000), (100, 300, 900, 700))  # wide: its shadow needs more than a 1% margin
    spec = replace(spec_with(size="1000x1000", margin="1%", position="bottom", trim=True),
                   operation="replace", shadow=True)
    layout = canvas.plan(alpha, spec)
    assert 1000 - layout.placed[3] >= canvas.SHADOW_ROOM * (layout.placed[2] - layout.placed[0]) - 1
    plain = canvas.plan(alpha, replace(spec, shadow=False))
    assert plain.placed[3] == 990


def test_the_shadow_room_follows_the_widest_footprint_not_the_whole_group() -> None:
    alpha = subject((1200, 1000), (100, 500, 300, 900))  # a box 200 wide
    alpha[300:900, 500:800] = 1.0  # a tall one 300 wide, 200 px to its right, on the same floor
    alpha[880:900, 300:320] = 1.0  # a foot beside the first box joins its run (220), still the narrower
    assert canvas.footprint(alpha, (100, 300, 800, 900)) == 300


def test_a_small_product_is_enlarged_at_most_to_the_limit_and_the_log_says_so() -> None:
    alpha = subject((1000, 1000), (450, 450, 550, 550))  # 100 px: needs x17 to fill 1700 px
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        layout = canvas.plan(alpha, spec_with(**AMAZON_CANVAS))
        kept = canvas.plan(alpha, spec_with(**{**AMAZON_CANVAS, "upscale": False}))
    finally:
        logger.remove(sink)
    assert layout.scale == canvas.MAX_UPSCALE
    assert kept.scale == 1.0
    assert any("too small for the 2000x2000 canvas" in line and "x17.00" in line for line in lines)


def test_min_subject_and_min_fill_fail_with_the_key_and_what_is_allowed() -> None:
    alpha = subject((1000, 1000), (400, 400, 800, 700))  # 400 px long side
    with pytest.raises(InputError) as small:
        canvas.plan(alpha, replace(spec_with(**AMAZON_CANVAS, min_subject=500), preset="amazon"),
                    source="shots/tiny.jpg")
    assert "tiny.jpg" in str(small.value) and "canvas.min_subject" in str(small.value)
    assert "400 px" in str(small.value) and "500 px" in str(small.value) and "preset amazon" in str(small.value)
    with pytest.raises(InputError, match=r"canvas.min_fill: the product would fill 20% .* less than the 80%"):
        canvas.plan(alpha, spec_with(size="2000x2000", trim=True, min_fill=0.8))


def test_max_fill_fails_a_product_cut_by_the_photos_edge() -> None:
    alpha = subject((1000, 1000), (0, 300, 600, 700))  # touches the left edge: cut off in the photo
    with pytest.raises(InputError, match=r"canvas\.max_fill: the product is cut off"):
        canvas.plan(alpha, spec_with(**AMAZON_CANVAS, max_fill=0.88))
    assert canvas.plan(alpha, spec_with(**AMAZON_CANVAS)).fill == pytest.approx(0.85, abs=0.001)


def test_without_a_size_trim_crops_to_the_box_and_max_side_scales_down() -> None:
    alpha = subject((1200, 900), (300, 200, 700, 800))
    trimmed = canvas.plan(alpha, spec_with(trim=True, margin="20px"))
    assert (trimmed.width, trimmed.height) == (440, 640)
    plain = canvas.plan(alpha, spec_with(max_side=600))
    assert (plain.width, plain.height) == (600, 450) and plain.scale == 0.5
    assert not canvas.active(CanvasSpec())


def test_trim_clears_the_mask_away_from_the_subject() -> None:
    alpha = subject((1200, 900), (300, 200, 700, 800))
    alpha[10:30, 1100:1180] = 0.3  # a faint smudge the mask engine left in a corner
    layout = canvas.plan(alpha, spec_with(**AMAZON_CANVAS))
    _, placed = canvas.place(np.zeros((900, 1200, 3), np.uint8), alpha, layout)
    x0, y0, x1, y1 = layout.placed
    outside = placed.copy()
    outside[y0 - 40 : y1 + 40, x0 - 40 : x1 + 40] = 0
    assert float(outside.max()) == 0.0


def test_canvas_keys_are_validated_like_the_others() -> None:
    with pytest.raises(SpecError, match="write it in quotes"):
        rules.validate_fragment({"canvas": {"size": 245}}, "photo.yaml", trusted=False)  # YAML's 4:5
    with pytest.raises(SpecError, match=r"canvas.margin.*too large"):
        rules.validate_fragment({"canvas": {"margin": "50%"}}, "photo.yaml", trusted=False)
    with pytest.raises(SpecError, match=r"canvas\.size.*not a canvas size"):
        rules.validate_fragment({"canvas": {"size": "big"}}, "photo.yaml", trusted=False)
    with pytest.raises(SpecError, match="did you mean 'margin'"):
        rules.validate_fragment({"canvas": {"margins": "5%"}}, "photo.yaml", trusted=False)
    ok = rules.validate_fragment({"canvas": {"size": "2000 X 2000", "margin": 40, "position": "centre"}},
                                 "photo.yaml", trusted=False)
    assert ok["canvas"] == {"size": "2000x2000", "margin": "40", "position": "center"}


def test_the_memory_estimate_counts_the_canvas() -> None:
    small = JobSpec(operation="cleanup")
    assert jobmemory.job_memory(500, 500, replace(small, canvas=CanvasSpec(size="4000x4000"))) > \
        jobmemory.job_memory(500, 500, small) + 16_000_000 * 20


# ---------------------------------------------------------------- the amazon preset through the stages

SHOTS = [((1200, 900), "white_sweep", 0), ((900, 1400), "grey_paper", 1), ((1500, 1000), "gradient", 1)]


def run_job(tmp_path: Path, name: str, rgb: np.ndarray, rules_: dict[str, object]) -> stages.Finished:
    config = make_config(tmp_path, {"shop": {"rules": rules_}})
    inbox = config.inboxes[0]
    path = inbox.path / name
    Image.fromarray(rgb).save(path, quality=95)
    spec = rules.resolve(path, inbox, config).spec
    job = Job(run_id=1, inbox=str(inbox.path), rel_path=name, source=path, spec=spec,
              input_sha256=hashlib.sha256(path.read_bytes()).hexdigest(), key="k")
    return stages.run_all(job, config, stages.Engines(config, None))


@pytest.mark.parametrize(("size", "backdrop", "seed"), SHOTS)
def test_amazon_shots_come_out_2000_square_srgb_jpeg_pure_white_85_percent_centred(
        tmp_path: Path, size: tuple[int, int], backdrop: str, seed: int) -> None:
    shot = samples.studio_shot(seed, size, backdrop)
    finished = run_job(tmp_path, "shot.jpg", shot.rgb, {"preset": "amazon"})
    assert finished.extension == ".jpg"
    with Image.open(io.BytesIO(finished.data)) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (2000, 2000), "RGB")
        profile = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
        assert "sRGB" in ImageCms.getProfileDescription(profile)
        out = np.asarray(im).astype(np.int16)
    far = (np.abs(out - 255) > 8).any(axis=2)
    ys, xs = np.nonzero(far)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    fill = max(x1 - x0, y1 - y0) / 2000
    assert abs(fill - 0.85) <= 0.03
    assert abs((x0 + x1) / 2 - 1000) <= 30 and abs((y0 + y1) / 2 - 1000) <= 30
    # Every pixel outside the subject's box grown by two JPEG blocks is exactly white (no ringing,
    # no remnant of the studio backdrop).
    outside = np.ones(far.shape, bool)
    outside[max(0, y0 - 16) : y1 + 16, max(0, x0 - 16) : x1 + 16] = False
    assert int((out[outside] != 255).any(axis=1).sum()) == 0
    from bgwatch import compliance
    from bgwatch.presets import PRESETS

    assert [c for c in compliance.image_checks(out.astype(np.uint8), PRESETS["amazon"]) if not c.ok] == []


def test_amazon_refuses_a_product_under_500_px(tmp_path: Path) -> None:
    shot = samples.studio_shot(3, (800, 600), "white_sweep")  # a 208 px product
    with pytest.raises(InputError, match=r"canvas.min_subject: the product is \d+ px .* under the 500 px allowed "
                       r"\(preset amazon\)"):
        run_job(tmp_path, "small.jpg", shot.rgb, {"preset": "amazon"})


def test_placing_reads_only_the_window_that_lands_on_the_canvas() -> None:
    import tracemalloc

    rgb = np.full((4000, 6000, 3), 180, np.uint8)
    alpha = subject((6000, 4000), (1800, 600, 4200, 3400))
    layout = canvas.plan(alpha, spec_with(**AMAZON_CANVAS))
    tracemalloc.start()
    try:
        placed_rgb, placed_alpha = canvas.place(rgb, alpha, layout)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    result = placed_rgb.nbytes + placed_alpha.nbytes  # the canvas: 28 MB; the input: 168 MB
    assert peak < 2.5 * result < (rgb.nbytes + alpha.nbytes) / 2


@pytest.mark.slow
def test_an_amazon_inbox_end_to_end_through_the_daemon_and_the_report(tmp_path: Path) -> None:
    from bgwatch import htmlreport
    from bgwatch.daemon import Daemon
    from bgwatch.store import Store
    from tests.helpers import files_under

    config = make_config(tmp_path, {"amazon": {"rules": {"preset": "amazon"}}})
    inbox = config.inboxes[0]
    for index, (size, backdrop, seed) in enumerate(SHOTS):
        Image.fromarray(samples.studio_shot(seed, size, backdrop).rgb).save(inbox.path / f"shot{index}.jpg",
                                                                            quality=95)
    Image.fromarray(samples.studio_shot(3, (800, 600), "white_sweep").rgb).save(inbox.path / "tiny.jpg")
    assert Daemon(config, once=True).run() == 1  # one file failed
    outputs = files_under(inbox.outbox)
    assert outputs == ["shot0.jpg", "shot1.jpg", "shot2.jpg"]
    for name in outputs:
        with Image.open(inbox.outbox / name) as im:
            assert (im.format, im.size) == ("JPEG", (2000, 2000))
    assert "tiny.jpg" in files_under(inbox.path / "failed")
    reason = (inbox.path / "failed" / "tiny.jpg.error.txt").read_text()
    assert "canvas.min_subject" in reason and "500 px allowed (preset amazon)" in reason
    store = Store(config.db_path)
    rows = store.history(limit=10)
    store.close()
    page = htmlreport.render(rows)
    assert page.count('data-compliance="ok"') == 3 and "3 of 3 output(s) meet their preset" in page
