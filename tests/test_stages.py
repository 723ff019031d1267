"""The stages as `bgwatch process` runs them (run_all): a failed generation's fallback engine, the mask
engine's label on the run, a backdrop image's decode (admission and the reduced JPEG decode) and a
backdrop made at the canvas's size."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bgwatch import rules, samples
from bgwatch.jobs import Job, JobState
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
