"""The rembg engine on the CPU: its ONNX Runtime session options, the u2net, isnet and birefnet families
run by bgwatch's own sessions (the same net input and mask as rembg's), predicts from several threads at
once."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import numpy as np
import pytest

from bgwatch.jobs import MaskSpec
from bgwatch.pipeline import masking, maskweights, refine
from bgwatch.pipeline.tiles import block_mean


def _photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.coffee())  # a real photograph: 400x600, a cup on a table


def _engine() -> masking.RembgMaskEngine:
    engine = masking.load_mask_engine(MaskSpec(engine="rembg", model="tiny.onnx"), "cpu")
    assert isinstance(engine, masking.RembgMaskEngine)
    return engine


def test_session_options_are_set(u2net_home: Path) -> None:
    engine = _engine()
    options = engine._session.session.get_session_options()
    assert options.intra_op_num_threads == masking.cpu_cores() == engine.threads
    assert options.inter_op_num_threads == 1
    assert options.enable_cpu_mem_arena is True and options.enable_mem_pattern is False
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert engine.parallel_runs == 1  # the threads fill the cores: one run at a time


def test_fewer_threads_a_run_allow_parallel_runs(u2net_home: Path) -> None:
    engine = masking.RembgMaskEngine("tiny.onnx", "cpu", threads=1)
    assert engine._session.session.get_session_options().intra_op_num_threads == 1
    assert engine.parallel_runs == masking.cpu_cores()
    again = engine.with_alpha_matting(True)
    assert again._session is engine._session and again.threads == 1


def test_same_mask_as_rembg_remove_on_a_real_photo(u2net_home: Path) -> None:
    from PIL import Image
    from rembg import new_session, remove

    from bgwatch.pipeline.edges import plain_upsample
    from bgwatch.pipeline.onnxnets import mask8

    engine = _engine()
    rgb = _photo()
    session = new_session("u2net_custom", model_path=str(u2net_home / "tiny.onnx"),
                          providers=["CPUExecutionProvider"])
    net_input = engine.preprocess(rgb)
    reference = session.normalize(Image.fromarray(rgb), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (320, 320))
    assert np.allclose(net_input, next(iter(reference.values())), atol=1e-6)  # the same net input
    theirs = np.asarray(remove(Image.fromarray(rgb), session=session, only_mask=True), np.float32) / 255
    # The net's mask is rembg's; scaled plainly (bicubic, not Pillow's Lanczos) it is rembg's full-size mask.
    plain = plain_upsample(mask8(engine.run(net_input)), *rgb.shape[:2]).astype(np.float32) / 255
    assert float(np.abs(plain - theirs).mean()) < 0.002 and float(np.abs(plain - theirs).max()) < 0.1
    # The engine's own mask follows the photo's edges instead: the same cut, a sharper outline.
    ours = engine.predict(rgb)
    assert ours.shape == theirs.shape == rgb.shape[:2] and ours.dtype == np.float32
    assert float(((ours > 0.5) == (theirs > 0.5)).mean()) > 0.99


def test_the_default_mask_path_never_imports_rembg(u2net_home: Path) -> None:
    """A mask through the tiny net, in a fresh process: rembg and pymatting (~173 MB resident) stay out."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from bgwatch.jobs import MaskSpec\n"
        "from bgwatch.pipeline import masking, refine\n"
        "from bgwatch.samples import studio_shot\n"
        "engine = masking.load_mask_engine(MaskSpec(engine='auto', model='tiny.onnx'), 'cpu')\n"
        "alpha = refine.refine_mask(engine.predict(studio_shot(2, size=(320, 240)).rgb), post_process=True)\n"
        "assert alpha.shape == (240, 320) and alpha.max() == 1.0\n"
        "print(engine.name, ','.join(m for m in ('rembg', 'pymatting', 'numba') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "rembg", out.stdout


def test_predict8_is_predicts_alpha_rounded_to_the_bit(u2net_home: Path) -> None:
    """The pipeline keeps the uint8 mask: the net's path rounds as it upsamples, with the very values of
    to_alpha8(predict) (and the classical engine rounds its own float mask)."""
    import cv2

    from bgwatch.samples import studio_shot

    engine = _engine()
    for rgb in (_photo(), studio_shot(5, size=(700, 500)).rgb,
                cv2.resize(_photo(), (1500, 1000), interpolation=cv2.INTER_CUBIC)):
        fast = engine.predict8(rgb)
        assert fast.dtype == np.uint8 and fast.shape == rgb.shape[:2]
        assert np.array_equal(fast, refine.to_alpha8(engine.predict(rgb)))
    classical = masking.load_mask_engine(MaskSpec(engine="classical"), "cpu")
    shot = studio_shot(3, size=(400, 300)).rgb
    assert np.array_equal(classical.predict8(shot), refine.to_alpha8(classical.predict(shot)))


def test_large_image_mask_is_scaled_to_full_size(u2net_home: Path) -> None:
    import cv2

    engine = _engine()
    rgb = cv2.resize(_photo(), (3000, 2000), interpolation=cv2.INTER_CUBIC)  # over REMBG_WORK_SIDE
    big = engine.predict(rgb)
    small = engine.predict(_photo())
    assert big.shape == (2000, 3000)
    back = cv2.resize(big, (600, 400), interpolation=cv2.INTER_AREA)
    assert float(np.abs(back - small).mean()) < 0.02


def test_every_recipe_is_rembgs_own() -> None:
    """Each model bgwatch runs without rembg is fed and read as rembg's session for it does: the same
    normalisation, size, output plane and sigmoid. A rembg that changes one of them fails this test."""
    from rembg.sessions import sessions_class

    from bgwatch.pipeline.onnxnets import RECIPES, recipe_for

    by_name = {cls.name(): cls for cls in sessions_class}
    assert recipe_for("shop/custom.onnx") == RECIPES["u2net"]
    for name, recipe in [*RECIPES.items(), ("u2net_custom", RECIPES["u2net"])]:
        cls = by_name[name]
        predict = next(c.__dict__["predict"] for c in cls.__mro__ if "predict" in c.__dict__)
        source = " ".join(inspect.getsource(predict).split())
        side = (recipe.side, recipe.side)
        assert f"{recipe.mean}, {recipe.std}, {side}" in source, name
        assert "(pred - mi) / (ma - mi)" in source and "ort_outs[0][:, 0, :, :]" in source, name
        assert ("self.sigmoid(ort_outs[0]" in source) == recipe.sigmoid, name


def test_birefnet_and_isnet_run_without_rembg(u2net_home: Path) -> None:
    """A net where rembg keeps birefnet-general (and isnet-general-use) runs through bgwatch's own session
    with its family's 1024x1024 input."""
    from bgwatch.pipeline.onnxnets import RECIPES
    from bgwatch.samples import studio_shot
    from tests.tinymodels import build_tiny_onnx

    shot = studio_shot(4, size=(400, 300), backdrop="white_sweep")
    for model in ("birefnet-general", "isnet-general-use"):
        target, recipe = maskweights.rembg_weights_target(model), RECIPES[model]
        build_tiny_onnx(target.parent, target.name, side=recipe.side, mean=recipe.mean, std=recipe.std,
                        logits=recipe.sigmoid)
        engine = masking.load_mask_engine(MaskSpec(engine="rembg", model=model), "cpu")
        assert isinstance(engine, masking.RembgMaskEngine)
        assert engine.preprocess(shot.rgb).shape == (1, 3, 1024, 1024)
        alpha = engine.predict(shot.rgb)
        solid, truth = alpha > 0.5, shot.mask > 0.5
        assert alpha.shape == (300, 400) and (solid & truth).sum() / (solid | truth).sum() > 0.8, model


def test_predict_from_several_threads_at_once(u2net_home: Path) -> None:
    engine = masking.RembgMaskEngine("tiny.onnx", "cpu", threads=1)
    from bgwatch.samples import studio_shot

    shots = [studio_shot(seed, size=(256, 192)).rgb for seed in range(6)]
    alone = [engine.predict(rgb) for rgb in shots]
    together: list[np.ndarray | None] = [None] * len(shots)

    def work(i: int) -> None:
        together[i] = engine.predict(shots[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shots))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together, strict=True):
        assert b is not None and np.array_equal(a, b)


@pytest.mark.parametrize("shape", [(1023, 1021, 3), (64, 50), (7, 9, 3), (5, 5, 6)])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_block_mean_is_the_mean_of_edge_padded_blocks(shape: tuple[int, ...], factor: int) -> None:
    image = np.random.default_rng(0).random(shape, dtype=np.float32) * 255
    h, w = shape[:2]
    padded = np.pad(image, ((0, -h % factor), (0, -w % factor)) + ((0, 0),) * (len(shape) - 2), mode="edge")
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor, *shape[2:])
    expected = blocks.mean(axis=(1, 3), dtype=np.float64)
    got = block_mean(image, factor)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert float(np.abs(got - expected).max()) < 1e-3


# ---------------------------------------------------------------- refinement in the subject's box


def _whole_frame_solid(alpha: np.ndarray) -> np.ndarray:
    """refine_mask's solid set (specks dropped, small holes filled) found over the whole frame, as
    refine_mask did before it worked in the subject's box: the reference the box must reproduce."""
    import cv2

    h, w = alpha.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats((alpha > 0.5).astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros((h, w), bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, bool)
    keep[1:] = (areas >= 0.002 * h * w) | (areas >= 0.05 * areas.max())
    kept = keep[labels]
    _, labels, stats, _ = cv2.connectedComponentsWithStats((~kept).astype(np.uint8), connectivity=4)
    x, y, ww, hh, area = (stats[:, i] for i in range(5))
    inner = (x > 0) & (y > 0) & (x + ww < w) & (y + hh < h) & (area <= 0.0002 * h * w)
    inner[0] = False
    return np.asarray(kept | inner[labels])


@pytest.mark.parametrize("seed", range(24))
def test_refine_in_the_box_finds_what_the_whole_frame_finds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(120, 400)), int(rng.integers(120, 400))
    alpha = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 4))):  # subjects, some touching or crossing the frame's edge
        y0, x0 = int(rng.integers(-h // 2, h - 10)), int(rng.integers(-w // 2, w - 10))
        alpha[max(y0, 0) : y0 + int(rng.integers(20, 2 * h)), max(x0, 0) : x0 + int(rng.integers(20, 2 * w))] = 1
    for _ in range(60):  # pinholes, specks, bigger holes, and notches in the frame's edge
        y, x, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(0, 6))
        if rng.random() < 0.3:
            y = int(rng.choice([0, h - 1])) if rng.random() < 0.5 else y
            x = int(rng.choice([0, w - 1])) if y not in (0, h - 1) else x
        alpha[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1] = float(rng.integers(0, 2))
    alpha += rng.normal(0, 0.05, alpha.shape).astype(np.float32)
    refined = refine_mask_clip(alpha)
    expected = _whole_frame_solid(np.clip(alpha, 0, 1))
    # Away from the outline refine_mask is exactly the solid set; on the outline it keeps soft values.
    import cv2

    k8 = expected.astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    band = (cv2.dilate(k8, kernel) - cv2.erode(k8, kernel)).astype(bool)
    assert np.array_equal(refined[~band] > 0.5, expected[~band])


@pytest.mark.parametrize("seed", range(6))
def test_refine_blurs_the_band_in_pieces_as_a_blur_of_the_whole_frame(seed: int) -> None:
    """refine_mask blurs only pieces of the outline's band (with a margin, on OpenCV's SIMD blocks): its
    values are those of the solid set (whole frame) with the band taken from a whole-frame blur."""
    import cv2

    rng = np.random.default_rng(100 + seed)
    h, w = int(rng.integers(150, 420)), int(rng.integers(150, 420))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    alpha = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 4))):  # soft discs, some past the frame's edge
        cy, cx, r = rng.uniform(-20, h + 20), rng.uniform(-20, w + 20), rng.uniform(20, 90)
        alpha = np.maximum(alpha, np.clip((r - np.hypot(yy - cy, xx - cx)) / 3 + 0.5, 0, 1))
    alpha8 = np.round(alpha * 255).astype(np.uint8)
    refined = refine.refine_mask(alpha8, post_process=True)
    kept = _whole_frame_solid(alpha8.astype(np.float32) / 255)
    radius = max(2, round(min(h, w) / 400))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    k8 = kept.astype(np.uint8)
    band = (cv2.dilate(k8, kernel) - cv2.erode(k8, kernel)).astype(bool)
    blurred = cv2.GaussianBlur(alpha8.astype(np.float32) * np.float32(1 / 255), (0, 0), 0.6)
    assert band.any() and refined.dtype == np.float32
    assert np.array_equal(refined[~band], kept[~band].astype(np.float32))
    # to the bit but for OpenCV's scalar tail at the end of the rows it filtered (a float32 ulp)
    assert float(np.abs(refined[band] - blurred[band]).max()) <= 2e-7


def refine_mask_clip(alpha: np.ndarray) -> np.ndarray:
    return refine.refine_mask(alpha, post_process=True)


def test_refine_of_an_empty_mask_is_empty() -> None:
    assert not refine.refine_mask(np.zeros((50, 60), np.float32), post_process=True).any()


def test_transparent_cleanup_keeps_colour_near_the_subject_and_black_further_out() -> None:
    from bgwatch.jobs import JobSpec
    from bgwatch.pipeline.cleanup import cleanup, foreground_points
    from bgwatch.samples import studio_shot

    shot = studio_shot(3, size=(320, 256))
    alpha = refine.refine_mask(shot.mask, post_process=True)
    out = cleanup(shot.rgb, alpha, JobSpec(mode="transparent"))
    a8 = refine.to_alpha8(alpha)
    assert np.array_equal(out[..., 3], a8)
    near = out[..., 3] > 0
    ys, xs, colours = foreground_points(shot.rgb, alpha, None)
    expected = shot.rgb.copy()
    expected[ys, xs] = colours
    import cv2

    reach = cv2.dilate(near.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)  # radius 2 at this size
    assert not out[~reach][:, :3].any()  # black away from the subject
    solid = a8 == 255
    assert np.array_equal(out[solid][:, :3], shot.rgb[solid])  # the subject's own pixels untouched


def test_an_engine_for_parallel_runs_is_loaded_once_with_its_own_threads(u2net_home: Path) -> None:
    spec = MaskSpec(engine="rembg", model="tiny.onnx")
    one_at_a_time = masking.load_mask_engine(spec, "cpu")
    lanes = masking.load_mask_engine(spec, "cpu", threads=1)
    assert isinstance(lanes, masking.RembgMaskEngine) and isinstance(one_at_a_time, masking.RembgMaskEngine)
    assert lanes is masking.load_mask_engine(spec, "cpu", threads=1) and lanes is not one_at_a_time
    assert lanes._session.session.get_session_options().intra_op_num_threads == 1
    assert lanes.parallel_runs == masking.cpu_cores()
    classical = masking.load_mask_engine(MaskSpec(engine="classical"), "cpu", threads=1)
    assert classical is masking.load_mask_engine(MaskSpec(engine="classical"), "cpu")
