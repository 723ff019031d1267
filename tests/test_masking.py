"""Mask engines: the registry, rembg through a tiny real ONNX model, the classical engine on studio
shots with known masks, and refine_mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bgwatch.errors import EngineError
from bgwatch.jobs import MaskSpec
from bgwatch.pipeline.masking import (
    MASK_ENGINES,
    load_mask_engine,
    mask_engine_names,
    onnx_providers,
    resolve_mask_engine_name,
    resolve_onnx_device,
)
from bgwatch.pipeline.maskweights import rembg_weights_path, rembg_weights_target
from bgwatch.pipeline.refine import refine_mask
from bgwatch.samples import BACKDROPS, studio_shot


def iou(alpha: np.ndarray, truth: np.ndarray) -> float:
    a, t = alpha > 0.5, truth > 0.5
    return float((a & t).sum() / max((a | t).sum(), 1))


# ---------------------------------------------------------------- registry and resolution


def test_registry_names() -> None:
    assert set(MASK_ENGINES) == {"rembg", "classical"}
    assert mask_engine_names() == ["auto", "classical", "rembg"]


def test_unknown_engine_lists_the_known_ones() -> None:
    with pytest.raises(EngineError) as caught:
        load_mask_engine(MaskSpec(engine="magic"), "cpu")
    assert "classical" in str(caught.value) and "rembg" in str(caught.value) and "auto" in str(caught.value)


def test_auto_picks_rembg_when_weights_are_present(u2net_home: Path) -> None:
    assert resolve_mask_engine_name(MaskSpec(engine="auto", model="tiny.onnx")) == "rembg"
    assert load_mask_engine(MaskSpec(engine="auto", model="tiny.onnx"), "cpu").name == "rembg"


def test_auto_falls_back_to_classical_without_weights(empty_model_home: Path) -> None:
    assert resolve_mask_engine_name(MaskSpec(engine="auto", model="u2net")) == "classical"
    engine = load_mask_engine(MaskSpec(engine="auto", model="u2net"), "cpu")
    assert (engine.name, engine.model) == ("classical", "")


def test_named_model_weights_are_found_where_rembg_looks(empty_model_home: Path) -> None:
    from rembg.sessions.u2net import U2netSession

    assert rembg_weights_path("u2net") is None
    target = rembg_weights_target("u2net")
    assert target.parent == Path(U2netSession.model_dir())
    legacy = empty_model_home / "u2net.onnx"  # rembg also reads the old flat layout
    legacy.write_bytes(b"not really a model")
    assert rembg_weights_path("u2net") == legacy
    assert Path(U2netSession.resolve_existing("u2net.onnx")) == legacy
    assert resolve_mask_engine_name(MaskSpec(engine="auto", model="u2net")) == "rembg"


def test_devices_and_providers() -> None:
    assert resolve_onnx_device("cpu") == "cpu"
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    auto = resolve_onnx_device("auto")
    assert auto in ("cpu", "cuda")
    assert onnx_providers("auto")[-1] == "CPUExecutionProvider"
    assert (onnx_providers("auto")[0] == "CUDAExecutionProvider") == (auto == "cuda")
    with pytest.raises(EngineError, match="allowed"):
        resolve_onnx_device("tpu")


# ---------------------------------------------------------------- rembg through the tiny model


def test_rembg_tiny_model_through_the_real_code_path(u2net_home: Path) -> None:
    engine = load_mask_engine(MaskSpec(engine="rembg", model="tiny.onnx"), "cpu")
    assert (engine.name, engine.model) == ("rembg", "tiny.onnx")
    shot = studio_shot(3, size=(640, 480), backdrop="white_sweep")
    alpha = engine.predict(shot.rgb)
    assert alpha.shape == (480, 640) and alpha.dtype == np.float32
    assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0
    inside, outside = alpha[shot.mask > 0.5].mean(), alpha[shot.mask < 0.01].mean()
    assert inside > 0.8 and outside < 0.1
    assert iou(alpha, shot.mask) > 0.85


def test_rembg_sessions_stay_loaded(u2net_home: Path) -> None:
    spec = MaskSpec(engine="rembg", model="tiny.onnx")
    first = load_mask_engine(spec, "cpu")
    again = load_mask_engine(spec, "cpu")
    assert again is first  # the same loaded session, not a second load
    matting = load_mask_engine(MaskSpec(engine="rembg", model="tiny.onnx", alpha_matting=True), "cpu")
    assert matting.alpha_matting and matting._session is first._session  # one model in memory


@pytest.mark.slow
def test_rembg_alpha_matting_passthrough(u2net_home: Path) -> None:
    engine = load_mask_engine(MaskSpec(engine="rembg", model="tiny.onnx", alpha_matting=True), "cpu")
    shot = studio_shot(5, size=(192, 160), backdrop="gradient")
    alpha = engine.predict(shot.rgb)
    assert alpha.shape == (160, 192) and alpha.dtype == np.float32
    assert iou(alpha, shot.mask) > 0.7


def test_missing_weights_fail_fast_and_say_what_to_do(empty_model_home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    attempts: list[object] = []

    def no_network(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(EngineError) as caught:
        load_mask_engine(MaskSpec(engine="rembg", model="isnet-general-use"), "cpu")
    assert attempts == []  # no network wait, no download attempt
    message = str(caught.value)
    assert "bgwatch models pull isnet-general-use" in message
    assert str(rembg_weights_target("isnet-general-use")) in message
    assert not (empty_model_home / "models").exists()  # rembg's download attempt would leave a folder


def test_unknown_rembg_model_lists_known_models(empty_model_home: Path) -> None:
    with pytest.raises(EngineError) as caught:
        load_mask_engine(MaskSpec(engine="rembg", model="u3net"), "cpu")
    assert "u2net" in str(caught.value) and "birefnet-general" in str(caught.value)


def test_custom_model_must_exist_inside_the_model_home(u2net_home: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        load_mask_engine(MaskSpec(engine="rembg", model="other.onnx"), "cpu")
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((u2net_home / "tiny.onnx").read_bytes())
    with pytest.raises(EngineError, match="inside"):
        load_mask_engine(MaskSpec(engine="rembg", model=str(outside)), "cpu")


# ---------------------------------------------------------------- the classical engine


def test_classical_engine_on_studio_shots(studio_shots: list, tmp_path: Path) -> None:
    """Through JPEG like a real drop: mean IoU >= 0.95 over 12 shots on every backdrop, shadows excluded."""
    from PIL import Image

    from bgwatch.pipeline.imageio import decode

    engine = load_mask_engine(MaskSpec(engine="classical"), "cpu")
    scores, shadow_leaks = [], []
    for i, shot in enumerate(studio_shots):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(shot.rgb).save(path, "JPEG", quality=90)
        alpha = engine.predict(decode(path, max_pixels=10**8).rgb)
        scores.append(iou(alpha, shot.mask))
        shadow = (shot.shadow > 0.15) & (shot.mask == 0)
        assert shadow.sum() > 500, "every shot has a visible shadow"
        shadow_leaks.append(float(alpha[shadow].mean()))
    assert {s.backdrop for s in studio_shots} == set(BACKDROPS)
    assert np.mean(scores) >= 0.95, scores
    assert min(scores) >= 0.9, scores
    assert max(shadow_leaks) < 0.05, shadow_leaks


def test_classical_keeps_a_mug_handle_open() -> None:
    for seed in range(40):
        shot = studio_shot(seed, size=(512, 512), backdrop="white_sweep")
        import cv2

        backdrop = (shot.mask < 0.5).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(backdrop, connectivity=4)
        holes = [i for i in range(1, n) if stats[i, 4] > 150 and stats[i, 0] > 0 and stats[i, 1] > 0]
        if holes:
            break
    else:
        raise AssertionError("the generator made no mug with a handle in 40 seeds: the test needs one")
    alpha = load_mask_engine(MaskSpec(engine="classical"), "cpu").predict(shot.rgb)
    assert alpha[labels == holes[0]].mean() < 0.3  # the backdrop through the handle is not subject


def test_classical_refuses_busy_scenes_and_empty_frames() -> None:
    from skimage import data

    engine = load_mask_engine(MaskSpec(engine="classical"), "cpu")
    with pytest.raises(EngineError, match="rembg"):
        engine.predict(data.astronaut())
    with pytest.raises(EngineError, match="no subject"):
        engine.predict(np.full((200, 300, 3), 240, np.uint8))


def test_classical_runs_on_a_real_photo_of_objects_on_a_plain_backdrop() -> None:
    from skimage import data

    coins = np.dstack([data.coins()] * 3)  # coins on a plain (and unevenly lit) backdrop
    alpha = load_mask_engine(MaskSpec(engine="classical"), "cpu").predict(coins)
    assert 0.15 < float((alpha > 0.5).mean()) < 0.5
    import cv2

    count = cv2.connectedComponents((alpha > 0.5).astype(np.uint8))[0] - 1
    assert count >= 15  # 24 coins; neighbours may touch


@pytest.mark.parametrize("engine_name", ["classical", "rembg"])
def test_every_engine_meets_the_protocol(engine_name: str, u2net_home: Path) -> None:
    """One behaviour suite for every installed engine."""
    engine = load_mask_engine(MaskSpec(engine=engine_name, model="tiny.onnx"), "cpu")
    assert engine.name == engine_name and isinstance(engine.model, str)
    for backdrop in BACKDROPS:
        shot = studio_shot(7, size=(400, 300), backdrop=backdrop)
        alpha = engine.predict(shot.rgb)
        assert alpha.shape == (300, 400) and alpha.dtype == np.float32
        assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0
        assert iou(refine_mask(alpha, post_process=True), shot.mask) > 0.7  # the tiny net is no u2net


# ---------------------------------------------------------------- refine_mask


def _disc(size: int = 200, radius: float = 50.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.clip(radius + 0.5 - np.hypot(yy - size / 2, xx - size / 2), 0, 1)


def test_refine_removes_specks_and_fills_pinholes_without_growing() -> None:
    alpha = _disc()
    alpha[10:13, 10:13] = 1.0  # a speck far from the subject
    alpha[100:102, 100:102] = 0.0  # a pinhole in it
    refined = refine_mask(alpha, post_process=True)
    assert refined.dtype == np.float32
    assert refined[11, 11] == 0.0 and refined[100, 100] == 1.0
    assert abs(float((refined > 0.5).sum()) - float((_disc() > 0.5).sum())) < 0.01 * (_disc() > 0.5).sum()


def test_refine_keeps_real_holes_and_second_subjects() -> None:
    alpha = _disc(400, 120)
    yy, xx = np.mgrid[0:400, 0:400]
    alpha[np.hypot(yy - 200, xx - 200) < 40] = 0.0  # a ring: the hole is real
    alpha[20:60, 20:60] = 1.0  # a second, smaller product
    refined = refine_mask(alpha, post_process=True)
    assert refined[200, 200] == 0.0 and refined[40, 40] == 1.0


def test_refine_keeps_edges_soft_and_smooths_stair_steps() -> None:
    hard = (_disc() > 0.5).astype(np.float32)  # a jagged, binary outline
    refined = refine_mask(hard, post_process=True)
    partial = (refined > 0.02) & (refined < 0.98)
    assert partial.sum() > 100  # anti-aliased now
    import cv2

    near_edge = cv2.dilate(cv2.Canny((hard * 255).astype(np.uint8), 50, 150), np.ones((7, 7), np.uint8)) > 0
    assert np.array_equal(refined[~near_edge], hard[~near_edge])  # only the outline is touched


def test_refine_without_post_process_only_clips() -> None:
    raw = np.array([[-0.5, 0.2], [0.7, 1.5]], np.float32)
    assert np.array_equal(refine_mask(raw, post_process=False), np.array([[0, 0.2], [0.7, 1]], np.float32))


def test_masking_imports_no_heavy_modules() -> None:
    import subprocess
    import sys

    code = ("import sys, bgwatch.pipeline.masking; "
            "print(','.join(m for m in ('rembg', 'onnxruntime', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    from bgwatch.pipeline import classical

    assert classical.WORK_SIZE > 0


def test_auto_says_once_which_engine_it_chose(empty_model_home: Path) -> None:
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="INFO")
    try:
        for _ in range(3):
            resolve_mask_engine_name(MaskSpec(engine="auto", model="u2net"))
    finally:
        logger.remove(sink)
    chosen = [m for m in messages if "mask engine auto" in m]
    assert len(chosen) == 1 and "classical" in chosen[0] and "bgwatch models pull u2net" in chosen[0]


def test_the_classical_mask_depends_on_the_photo_alone_not_on_what_ran_before() -> None:
    """grabCut draws its k-means start from OpenCV's per-thread RNG: unseeded, a second run of one photo in
    the same thread moved edge alpha by up to 0.5 (a re-dropped file came out different)."""
    from bgwatch.pipeline.classical import studio_mask

    shot = studio_shot(seed=4, size=(480, 320), backdrop="grey_paper").rgb
    other = studio_shot(seed=9, size=(320, 320)).rgb
    first = studio_mask(shot)
    studio_mask(other)  # grabCut on another photo in between, as a daemon's thread does
    assert np.array_equal(studio_mask(shot), first)
    assert np.array_equal(studio_mask(shot), first)
