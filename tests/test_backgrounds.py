"""Background requests, the engine registry, the plain engines, the 4K rule — and one behaviour suite run
over every background engine (sdxl on the tiny pipeline, runway against the loopback server)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runway_server import FakeRunway

from bgwatch.config import Config, RunwaySettings
from bgwatch.errors import EngineError, InputError
from bgwatch.jobs import DEFAULT_RUNWAY_MODEL, DEFAULT_SDXL_MODEL, JobSpec
from bgwatch.pipeline.backgrounds import (
    BACKGROUND_ENGINES,
    BackgroundRequest,
    check_input_size,
    draw_seed,
    fit_contain,
    fit_cover,
    load_background_engine,
)

CPU = Config(device="cpu")


def replace_spec(**kw: object) -> JobSpec:
    return JobSpec(operation="replace", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- requests


def test_from_spec_fills_engine_defaults_and_keeps_the_chosen_seed() -> None:
    sdxl = BackgroundRequest.from_spec(replace_spec(engine="sdxl", prompt="a studio", seed=42), 640, 480)
    assert (sdxl.model, sdxl.seed, sdxl.seed_drawn, sdxl.cacheable) == (DEFAULT_SDXL_MODEL, 42, False, True)
    runway = BackgroundRequest.from_spec(replace_spec(engine="runway", prompt="x", seed=1), 640, 480)
    assert runway.model == DEFAULT_RUNWAY_MODEL
    color = BackgroundRequest.from_spec(replace_spec(engine="color", seed=5), 640, 480)
    assert color.seed is None and not color.generative and not color.cacheable and color.model == ""


def test_a_drawn_seed_is_recorded_but_never_cacheable() -> None:
    spec = replace_spec(engine="sdxl", prompt="a studio")  # no seed
    given = BackgroundRequest.from_spec(spec, 640, 480, 1234)
    assert given.seed == 1234 and given.seed_drawn and not given.cacheable
    drawn = BackgroundRequest.from_spec(spec, 640, 480)
    assert drawn.seed is not None and 0 <= drawn.seed < 2**32 and drawn.seed_drawn


def test_scheduler_comes_from_the_config_for_sdxl_only() -> None:
    config = Config(sdxl=replace(CPU.sdxl, scheduler="dpmpp_2m"))
    sdxl = BackgroundRequest.from_spec(replace_spec(engine="sdxl", prompt="p", seed=1), 64, 64, config=config)
    runway = BackgroundRequest.from_spec(
        replace_spec(engine="runway", prompt="p", seed=1), 64, 64, config=config
    )
    assert (sdxl.scheduler, runway.scheduler) == ("dpmpp_2m", "")


def test_cache_key_covers_every_field_that_changes_the_pixels() -> None:
    base = BackgroundRequest.from_spec(replace_spec(engine="sdxl", prompt="a studio", seed=7), 640, 480)
    assert (
        base.cache_key()
        == BackgroundRequest.from_spec(
            replace_spec(engine="sdxl", prompt="a studio", seed=7), 640, 480
        ).cache_key()
    )
    changes = dict(
        model="other/model",
        prompt="a beach",
        negative_prompt="cats",
        seed=8,
        width=641,
        height=481,
        steps=21,
        guidance_scale=7.0,
        scheduler="euler_a",
        engine="runway",
    )
    keys = {base.cache_key()}
    for name, value in changes.items():
        keys.add(replace(base, **{name: value}).cache_key())
    assert len(keys) == len(changes) + 1
    # Whether the seed was drawn says nothing about the pixels, nor do fields the engine does not read.
    assert replace(base, seed_drawn=True).cache_key() == base.cache_key()
    recoloured = replace_spec(
        engine="sdxl", prompt="a studio", seed=7, background_color="#000000", shadow=True
    )
    assert BackgroundRequest.from_spec(recoloured, 640, 480).cache_key() == base.cache_key()
    runway = BackgroundRequest.from_spec(replace_spec(engine="runway", prompt="p", seed=1, steps=50), 64, 64)
    assert runway.steps == 0 and runway.negative_prompt == "" and runway.scheduler == ""


def test_draw_seed_is_random_and_fits_every_engine() -> None:
    seeds = {draw_seed() for _ in range(50)}
    assert len(seeds) > 45 and all(0 <= s < 2**32 for s in seeds)


# ---------------------------------------------------------------- registry and the 4K rule


def test_registry_knows_the_engines_and_lists_them_for_an_unknown_name() -> None:
    assert list(BACKGROUND_ENGINES) == ["sdxl", "runway", "image", "color", "gradient"]
    with pytest.raises(EngineError) as err:
        load_background_engine("dalle", CPU)
    assert "dalle" in str(err.value) and "sdxl, runway, image, color, gradient" in str(err.value)


def test_engines_are_loaded_once_per_settings() -> None:
    assert load_background_engine("gradient", CPU) is load_background_engine("gradient", Config(device="cpu"))
    other = Config(device="cpu", runway=RunwaySettings(base_url="http://127.0.0.1:9"))
    assert load_background_engine("runway", CPU) is not load_background_engine("runway", other)


@pytest.mark.parametrize(
    ("engine", "size", "allow", "refused"),
    [
        ("sdxl", (5000, 3000), False, True),
        ("sdxl", (3000, 4097), False, True),
        ("sdxl", (4096, 4096), False, False),
        ("sdxl", (5000, 3000), True, False),
        ("runway", (5000, 3000), False, False),
        ("gradient", (8000, 6000), False, False),
    ],
)
def test_the_4k_rule(engine: str, size: tuple[int, int], allow: bool, refused: bool) -> None:
    spec = replace_spec(engine=engine, prompt="p")
    if not refused:
        check_input_size(spec, *size, allow)
        return
    with pytest.raises(InputError) as err:
        check_input_size(spec, *size, allow, source=Path("/inbox/big.jpg"))
    text = str(err.value)
    assert (
        text.startswith("big.jpg:") and "4096" in text and "limits.allow_4k" in text and "ALLOW_4K=1" in text
    )


def test_the_4k_rule_does_not_touch_cleanup() -> None:
    check_input_size(JobSpec(operation="cleanup", engine="sdxl"), 9000, 9000, False)


# ---------------------------------------------------------------- fitting and the plain engines


def _quadrants(w: int, h: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 0)
    return img


def test_fit_cover_crops_the_centre_without_distortion() -> None:
    wide = _quadrants(400, 100)  # 4:1 into a square: the middle half survives, quadrant corners stay
    out = fit_cover(wide, 200, 200)
    assert out.shape == (200, 200, 3)
    assert tuple(out[10, 10]) == (255, 0, 0) and tuple(out[190, 190]) == (255, 255, 0)
    assert tuple(out[10, 190]) == (0, 255, 0) and tuple(out[190, 10]) == (0, 0, 255)


def test_fit_contain_keeps_all_of_the_image_and_pads_with_its_own_colours() -> None:
    img = np.full((100, 400, 3), (200, 120, 40), np.uint8)
    out = fit_contain(img, 300, 300)
    assert out.shape == (300, 300, 3)
    # The margins (above and below the 300x75 image) continue the image: never black.
    assert np.abs(out[:20].astype(int) - (200, 120, 40)).max() <= 2
    assert np.abs(out[-20:].astype(int) - (200, 120, 40)).max() <= 2


def test_color_engine_fills_exactly() -> None:
    req = BackgroundRequest.from_spec(replace_spec(engine="color", background_color="#3c8c8c"), 33, 17)
    out = load_background_engine("color", CPU).render(req)
    assert out.shape == (17, 33, 3) and (out == (0x3C, 0x8C, 0x8C)).all()


def test_gradient_is_smooth_without_bands() -> None:
    # A long, shallow ramp: 8 levels over 1000 rows is where 8-bit gradients band.
    spec = replace_spec(engine="gradient", gradient=("#808080", "#888888"), gradient_direction="vertical")
    out = load_background_engine("gradient", CPU).render(BackgroundRequest.from_spec(spec, 200, 1000))
    assert tuple(out[0].mean(0).round()) == (128, 128, 128) and tuple(out[-1].mean(0).round()) == (
        136,
        136,
        136,
    )
    rows = out[..., 0].astype(float).mean(axis=1)
    ideal = np.linspace(128, 136, 1000)
    # Without dither each row would sit on an 8-bit step (error up to 0.5); dithered rows follow the ramp.
    assert np.abs(rows - ideal).max() < 0.2
    assert np.all(np.diff(np.convolve(rows, np.ones(50) / 50, mode="valid")) > -0.02)


@pytest.mark.parametrize("direction", ["vertical", "horizontal", "radial"])
def test_gradient_in_strips_is_the_whole_frame_gradient(direction: str) -> None:
    """Rendered strip by strip (the dither drawn as two streams), the pixels are those of the one-piece
    render: an odd pixel count over more than one strip, so the second stream starts mid-step."""
    width, height = 1201, 901
    spec = replace_spec(engine="gradient", gradient=("#102030", "#f0e0d0"), gradient_direction=direction)
    out = load_background_engine("gradient", CPU).render(BackgroundRequest.from_spec(spec, width, height))
    start, end = np.array([16, 32, 48], np.float32), np.array([240, 224, 208], np.float32)
    t: np.ndarray
    if direction == "vertical":
        t = np.broadcast_to(np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None], (height, width))
    elif direction == "horizontal":
        t = np.broadcast_to(np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :], (height, width))
    else:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        cx, cy = (width - 1) / 2, (height - 1) / 2
        t = np.hypot(xx - cx, yy - cy) / max(np.hypot(cx, cy), 1.0)
    rng = np.random.default_rng(0)
    dither = rng.random((height, width, 1), np.float32) - rng.random((height, width, 1), np.float32)
    whole = np.clip(np.rint(start + (end - start) * t[..., None] + dither), 0, 255).astype(np.uint8)
    assert np.array_equal(out, whole)


@pytest.mark.parametrize("direction", ["horizontal", "radial"])
def test_gradient_directions(direction: str) -> None:
    spec = replace_spec(engine="gradient", gradient=("#000000", "#ffffff"), gradient_direction=direction)
    out = load_background_engine("gradient", CPU).render(BackgroundRequest.from_spec(spec, 101, 61))
    lum = out[..., 0].astype(int)
    if direction == "horizontal":
        assert (
            lum[:, 0].max() <= 1 and lum[:, -1].min() >= 254 and abs(int(lum[0, 50]) - int(lum[60, 50])) <= 2
        )
    else:
        assert lum[30, 50] <= 3 and min(lum[0, 0], lum[0, -1], lum[-1, 0], lum[-1, -1]) >= 252


def test_image_engine_fits_the_backdrop_file(tmp_path: Path) -> None:
    path = tmp_path / "backdrop.png"
    Image.fromarray(_quadrants(400, 100)).save(path)
    engine = load_background_engine("image", CPU)
    cover = engine.render(
        BackgroundRequest.from_spec(replace_spec(engine="image", background_image=str(path)), 200, 200)
    )
    assert tuple(cover[10, 10]) == (255, 0, 0)
    contain = engine.render(
        BackgroundRequest.from_spec(
            replace_spec(engine="image", background_image=str(path), background_fit="contain"), 200, 200
        )
    )
    assert contain.shape == (200, 200, 3)
    assert tuple(contain[100, 10]) == (0, 0, 255)  # the whole image is inside: its left edge is visible
    assert contain[:20].mean() > 40  # margins continue the image, not black bars


def test_image_engine_missing_file_is_an_input_error(tmp_path: Path) -> None:
    spec = replace_spec(engine="image", background_image=str(tmp_path / "gone.jpg"))
    with pytest.raises(InputError):
        load_background_engine("image", CPU).render(BackgroundRequest.from_spec(spec, 10, 10))


# ---------------------------------------------------------------- one suite, every engine


@pytest.fixture(scope="module")
def runway_server() -> Iterator[FakeRunway]:
    with FakeRunway() as server:
        yield server


@pytest.fixture(params=["color", "gradient", "image", "sdxl", "runway"])
def engine_case(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_sdxl: Path,
    runway_server: FakeRunway,
) -> tuple[object, JobSpec]:
    name = request.param
    backdrop = tmp_path / "backdrop.jpg"
    Image.fromarray(_quadrants(300, 200)).save(backdrop)
    config = Config(
        device="cpu", runway=RunwaySettings(base_url=runway_server.url, api_key="k", poll_interval=0.01)
    )
    spec = replace_spec(
        engine=name,
        prompt="a quiet studio",
        seed=3,
        steps=2,
        background_image=str(backdrop),
        model=str(tiny_sdxl) if name == "sdxl" else "",
    )
    return load_background_engine(name, config), spec


@pytest.mark.parametrize("size", [(120, 90), (70, 130)])
def test_every_engine_renders_exact_size_rgb_deterministically(
    engine_case: tuple[object, JobSpec], size: tuple[int, int]
) -> None:
    engine, spec = engine_case
    request = BackgroundRequest.from_spec(spec, *size)
    first = engine.render(request)  # type: ignore[attr-defined]
    assert first.shape == (size[1], size[0], 3) and first.dtype == np.uint8
    assert first.std() > 0 or spec.engine == "color"
    again = engine.render(request)  # type: ignore[attr-defined]
    assert np.array_equal(first, again)
