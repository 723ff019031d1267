"""The stages as `bgwatch process` runs them (run_all): a failed generation's fallback engine, the mask
engine's label on the run, a backdrop image's decode (admission and the reduced JPEG decode) and a
backdrop made at the canvas's size."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bgwatch import rules, samples
from bgwatch.jobs import CanvasSpec, Job, JobSpec, JobState
from bgwatch.pipeline import backgrounds, canvas, jobmemory, stages
from bgwatch.single import process_one
from bgwatch.storebase import open_for_reading
from tests.helpers import make_config
from tests.runway_server import FakeRunway


def _shot(path: Path, seed: int = 3, size: tuple[int, int] = (160, 120)) -> Path:
    Image.fromarray(samples.studio_shot(seed, size, "white_sweep").rgb).save(path, quality=95)
    return path


def _job(config: Any, path: Path) -> Job:
    inbox = config.inboxes[0]
    spec = rules.resolve(path, inbox, config).spec
    return Job(run_id=1, inbox=str(inbox.path), rel_path=path.name, source=path, spec=spec,
               input_sha256=hashlib.sha256(path.read_bytes()).hexdigest(), key="k")


# ---------------------------------------------------------------- item 3: the fallback in `bgwatch process`


@pytest.mark.parametrize("fallback", ["gradient", "color"])
def test_process_falls_back_when_runway_fails_and_records_the_engine_that_made_it(
        tmp_path: Path, fallback: str) -> None:
    with FakeRunway(statuses=["PENDING", "FAILED"]) as runway:
        config = make_config(tmp_path, {"shop": {"rules": {"operation": "replace", "engine": "runway"}}},
                             runway={"base_url": runway.url, "api_key": "k-test-runway", "poll_interval": 0.01},
                             limits={"generations_per_minute": 0})
        photo = _shot(config.inboxes[0].path / "photo.jpg")
        out = tmp_path / "out"
        result = process_one(photo, config, out, {"prompt": "oak table", "seed": 5, "fallback_engine": fallback})
        posts = [r for r in runway.requests if r.method == "POST"]
        plain = process_one(photo, config, tmp_path / "plain", {"prompt": "oak table", "seed": 5, "engine": fallback})
    assert len(posts) == 1, "Runway was asked (and failed)"
    assert result.state is JobState.DONE and result.bg_engine == fallback, result.error
    assert result.output_path is not None and plain.output_path is not None
    # The fallback made the very backdrop the engine makes when it is asked directly (the top rows show it).
    made, asked = np.asarray(Image.open(result.output_path)), np.asarray(Image.open(plain.output_path))
    assert np.array_equal(made[:8], asked[:8])
    assert (made[0, 0] == made[7, 0]).all() == (fallback == "color"), "a gradient changes down the rows"
    store = open_for_reading(config)
    assert store is not None
    recorded = store.history(None, 10)
    store.close()
    assert {(r["status"], r["bg_engine"]) for r in recorded} == {("done", fallback)}


def test_process_without_a_fallback_still_fails_with_runways_reason(tmp_path: Path) -> None:
    with FakeRunway(statuses=["PENDING", "FAILED"]) as runway:
        config = make_config(tmp_path, {"shop": {"rules": {"operation": "replace", "engine": "runway"}}},
                             runway={"base_url": runway.url, "api_key": "k-test-runway", "poll_interval": 0.01},
                             limits={"generations_per_minute": 0})
        photo = _shot(config.inboxes[0].path / "photo.jpg")
        result = process_one(photo, config, tmp_path / "out", {"prompt": "oak table", "seed": 5})
    assert result.state is JobState.FAILED and "moderation" in result.error


# ---------------------------------------------------------------- item 4: the mask engine's precision on the run


def test_the_run_records_the_precision_the_mask_net_ran_at(tmp_path: Path, u2net_home: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from bgwatch import report
    from bgwatch.pipeline import quantize
    from bgwatch.pipeline.onnxnets import U2NET

    shots = {"calibration": quantize.studio_images(range(1000, 1003), size=(128, 128)),
             "validation": quantize.studio_images(range(2000, 2003), size=(128, 128))}
    assert quantize.quantize(u2net_home / "tiny.onnx", U2NET, **shots).passed
    config = make_config(tmp_path, {"shop": {"rules": {"operation": "cleanup"}}})
    photo = _shot(config.inboxes[0].path / "photo.jpg")
    labels = {}
    for precision in ("int8", "fp32"):
        mask = {"engine": "rembg", "model": "tiny.onnx", "precision": precision}
        result = process_one(photo, config, tmp_path / precision, {"mask": mask})
        assert result.state is JobState.DONE, result.error
        labels[precision] = result.mask_engine
    assert labels == {"int8": "rembg:tiny.onnx:int8", "fp32": "rembg:tiny.onnx:fp32"}
    store = open_for_reading(config)
    assert store is not None
    rows = store.history(None, 10)
    store.close()
    report.print_history(rows, roots=())
    assert "rembg:tiny.onnx:int8" in capsys.readouterr().out


# ---------------------------------------------------------------- item 2: a backdrop image's decode


def _backdrop(path: Path, size: tuple[int, int]) -> Path:
    """A backdrop with detail at every scale (a reduced decode of it is visibly the same picture)."""
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([(xx * 255 // size[0]), (yy * 255 // size[1]), ((xx // 64 + yy // 64) % 2) * 200], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path, quality=90)
    return path


def test_a_big_jpeg_backdrop_is_decoded_reduced_and_its_decode_is_admitted(tmp_path: Path) -> None:
    big = _backdrop(tmp_path / "hall.jpg", (2400, 1600))
    # At least twice the target on both sides: the decoder's own scaling, never below the target.
    assert backgrounds.load_backdrop(big, 100_000_000, at_least=(600, 400)).shape == (400, 600, 3)
    assert backgrounds.load_backdrop(big, 100_000_000, at_least=(500, 300)).shape == (400, 600, 3)
    assert backgrounds.load_backdrop(big, 100_000_000, at_least=(1000, 700)).shape == (800, 1200, 3)
    assert backgrounds.load_backdrop(big, 100_000_000, at_least=(1300, 700)).shape == (1600, 2400, 3)
    assert backgrounds.decoded_size(big, (600, 400)) == (600, 400)
    assert backgrounds.decoded_size(big, (1000, 700)) == (1200, 800)
    assert backgrounds.decoded_size(big, (1300, 700)) == (2400, 1600)
    png = tmp_path / "hall.png"
    Image.open(big).save(png)
    assert backgrounds.decoded_size(png, (600, 400)) == (2400, 1600), "only a JPEG decodes reduced"
    assert backgrounds.decoded_size(tmp_path / "gone.jpg", (600, 400)) is None

    # Admission counts the backdrop's decode from its header, at the size it is decoded to.
    plain = JobSpec(operation="replace", engine="gradient")
    behind = JobSpec(operation="replace", engine="image", background_image=str(big))
    behind_png = JobSpec(operation="replace", engine="image", background_image=str(png))
    base = jobmemory.job_memory(300, 200, plain)
    assert jobmemory.job_memory(300, 200, behind) == base + jobmemory.BACKDROP_BYTES_PER_PIXEL * 300 * 200  # an eighth
    assert jobmemory.job_memory(300, 200, behind_png) == base + jobmemory.BACKDROP_BYTES_PER_PIXEL * 2400 * 1600
    # A canvas makes the backdrop at its own size: decoded for that.
    on_canvas = JobSpec(operation="replace", engine="image", background_image=str(big),
                        canvas=CanvasSpec(size="1000x700"))
    assert jobmemory.job_memory(300, 200, on_canvas) - jobmemory.job_memory(
        300, 200, JobSpec(operation="replace", engine="gradient", canvas=CanvasSpec(size="1000x700"))) \
        == jobmemory.BACKDROP_BYTES_PER_PIXEL * 1200 * 800


def test_the_image_engine_decodes_a_big_backdrop_reduced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = _backdrop(tmp_path / "hall.jpg", (2400, 1600))
    decoded: list[tuple[int, ...]] = []
    load = backgrounds.load_backdrop

    def watched(path: Path, max_pixels: int, **kw: Any) -> np.ndarray:
        rgb = load(path, max_pixels, **kw)
        decoded.append(rgb.shape)
        return rgb

    monkeypatch.setattr(backgrounds, "load_backdrop", watched)
    request = backgrounds.BackgroundRequest(engine="image", width=300, height=200, image=str(big))
    made = backgrounds.ImageEngine().render(request)
    assert made.shape == (200, 300, 3) and decoded == [(200, 300, 3)], decoded
    # The picture is the same as from the whole decode, within the reduced decode's rounding.
    whole = backgrounds.fit_cover(load(big, 100_000_000), 300, 200)
    assert np.abs(made.astype(int) - whole).mean() < 4


# ---------------------------------------------------------------- item 1: a backdrop made at the canvas's size


@pytest.mark.parametrize("keys", [{"size": "400x300"}, {"margin": "10%"}, {"margin": "5% 10%", "max_side": 200},
                                  {"margin": "30", "min_fill": 0.1},
                                  {"trim": True, "size": "2:3", "long_side": 500}])
def test_frame_size_is_the_canvas_plan_makes(keys: dict[str, Any]) -> None:
    alpha = np.zeros((240, 320), np.float32)
    alpha[60:200, 100:220] = 1.0
    spec = JobSpec(canvas=CanvasSpec(**keys))
    layout = canvas.plan(alpha, spec)
    made = (layout.width, layout.height) if canvas.active(spec.canvas) else (320, 240)  # finish() plans only then
    assert canvas.frame_size(spec, 320, 240) == made


def test_frame_size_without_a_canvas_and_when_the_subject_decides() -> None:
    assert canvas.frame_size(JobSpec(), 320, 240) == (320, 240)
    assert canvas.frame_size(JobSpec(canvas=CanvasSpec(trim=True, margin="5%")), 320, 240) is None


def test_a_backdrop_is_made_at_the_canvas_size_not_cropped_from_the_input_size(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"shop": {"rules": {
        "operation": "replace", "engine": "gradient", "gradient": ["#2040c0", "#f0d020"],
        "gradient_direction": "horizontal", "feather_edges": False, "match_colors": False,
        "canvas": {"size": "400x400", "margin": "10%"}}}})
    photo = _shot(config.inboxes[0].path / "photo.jpg", size=(320, 160))
    job = _job(config, photo)
    prepared = stages.prepare(job, config, stages.Engines(config, None))
    assert prepared.request is not None and prepared.backdrop is not None
    assert (prepared.request.width, prepared.request.height) == (400, 400)
    assert prepared.backdrop.shape == (400, 400, 3)
    finished = stages.run_all(job, config, stages.Engines(config, None))
    out = np.asarray(Image.open(io.BytesIO(finished.data)).convert("RGB")).astype(int)
    # The whole horizontal ramp shows across the canvas: its first and last columns are its two colours
    # (a backdrop made at 320x160 and cover-fitted to 400x400 loses both ends of the ramp).
    assert np.abs(out[:20, 0] - (0x20, 0x40, 0xC0)).max() <= 2
    assert np.abs(out[:20, -1] - (0xF0, 0xD0, 0x20)).max() <= 2
    # A generation is asked (and cached) at the size it is shown: its key is the canvas's, whatever the input.
    def key(canvas_size: str, width: int, height: int) -> str:
        spec = JobSpec(operation="replace", engine="sdxl", seed=1, canvas=CanvasSpec(size=canvas_size))
        return backgrounds.BackgroundRequest.from_spec(spec, width, height).cache_key()

    assert key("400x400", 320, 160) == key("400x400", 900, 600) != key("500x500", 320, 160)


def test_a_fallback_backdrop_is_made_at_the_canvas_size_too(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"shop": {"rules": {
        "operation": "replace", "engine": "runway", "prompt": "oak table", "seed": 5, "fallback_engine": "gradient",
        "canvas": {"size": "400x300"}}}})
    job = _job(config, _shot(config.inboxes[0].path / "photo.jpg", size=(320, 160)))
    prepared = stages.prepare(job, config)  # no engines: nothing generated or rendered
    assert prepared.request is not None and (prepared.request.width, prepared.request.height) == (400, 300)
    moved = stages.fall_back(prepared, config, RuntimeError("Runway said no"))
    assert moved is not None and moved.request is not None and moved.backdrop is None
    assert (moved.request.engine, moved.request.width, moved.request.height) == ("gradient", 400, 300)


# ---------------------------------------------------------------- one open of the input per job


def test_a_job_opens_its_input_once_for_admission_hash_pixels_and_metadata(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prepare worker opens the input once (a chain of openat calls from the inbox down): its header
    for admission, its bytes against the claimed hash, its pixels and the metadata the output keeps; the
    finish step does not open it again."""
    import threading

    from PIL.ExifTags import Base

    from bgwatch import sharefiles
    from bgwatch.budget import MemoryBudget
    from bgwatch.ratelimit import TokenBucket
    from bgwatch.service import Progress
    from bgwatch.workers import Workers

    config = make_config(tmp_path, {"shop": {"rules": {"mode": "color", "mask": {"engine": "classical"},
                                                       "metadata": "web"}}})
    path = config.inboxes[0].path / "bottle.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[Base.Artist] = "Ann Lens"
    Image.fromarray(samples.studio_shot(2, (160, 120)).rgb).save(path, quality=92, exif=exif.tobytes())
    job = _job(config, path)
    opened: list[tuple[str, ...]] = []
    real_open_below = sharefiles.open_below

    def open_below(root: Path, rel: Any) -> int:
        opened.append(tuple(rel))
        return real_open_below(root, rel)

    monkeypatch.setattr(sharefiles, "open_below", open_below)
    abort = threading.Event()
    engines = stages.Engines(config, None, None, abort)  # type: ignore[arg-type]  # no store needed here
    routed: list[stages.Prepared] = []
    pool = Workers(config, engines, budget=MemoryBudget(0), job_bucket=TokenBucket(0), progress=Progress(),
                   abort=abort, started=lambda _job: None, deliver=lambda _f: None, fail=lambda _j, _w: None)
    monkeypatch.setattr(pool, "route", routed.append)
    pool._prepare(job)
    [prepared] = routed
    assert opened == [("bottle.jpg",)]
    assert prepared.kept is not None and prepared.kept.exif
    finished = stages.finish(prepared, engines)
    assert opened == [("bottle.jpg",)]
    with Image.open(io.BytesIO(finished.data)) as im:
        assert im.getexif()[Base.Artist] == "Ann Lens"


def test_a_cleanup_job_imports_no_backdrop_engine_or_compositor(tmp_path: Path) -> None:
    import subprocess
    import sys

    config_dir = tmp_path / "c"
    config_dir.mkdir()
    code = f"""
import sys, hashlib
from pathlib import Path
from PIL import Image
from bgwatch import samples, rules
from bgwatch.jobs import Job
from bgwatch.pipeline import stages
from tests.helpers import make_config
config = make_config(Path({str(config_dir)!r}), {{"shop": {{"rules": {{"mask": {{"engine": "classical"}}}}}}}})
path = config.inboxes[0].path / "a.jpg"
path.parent.mkdir(parents=True, exist_ok=True)
Image.fromarray(samples.studio_shot(1, (96, 64)).rgb).save(path)
spec = rules.resolve(path, config.inboxes[0], config).spec
job = Job(run_id=1, inbox="shop", rel_path="a.jpg", source=path, spec=spec,
          input_sha256=hashlib.sha256(path.read_bytes()).hexdigest(), key="k")
assert stages.finish(stages.prepare(job, config)).data
print(sorted(m for m in ("bgwatch.pipeline.backgrounds", "bgwatch.pipeline.composite") if m in sys.modules))
"""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
