"""Cleanup modes, edge decontamination, enhancement, denoising and colour parsing."""

from __future__ import annotations

import numpy as np
import pytest

from bgwatch.errors import SpecError
from bgwatch.jobs import JobSpec
from bgwatch.pipeline.cleanup import cleanup, denoise, enhance_foreground, estimate_noise, parse_color


def red_disc_on_white(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A red subject with anti-aliased edges photographed on a white backdrop: edge pixels are a mix."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(yy - size / 2, xx - size / 2)
    alpha = np.clip(np.clip(size / 4 + 0.5 - r, 0, 1) * 0.5 + np.clip(size / 4 + 2 - r, 0, 3) / 6, 0, 1)
    red, white = np.array((200, 30, 30), np.float32), np.array((250, 250, 250), np.float32)
    rgb = alpha[..., None] * red + (1 - alpha[..., None]) * white
    return np.round(rgb).astype(np.uint8), alpha.astype(np.float32)


@pytest.mark.parametrize(
    ("text", "rgb"),
    [("#fff", (255, 255, 255)), ("#1E2a44", (30, 42, 68)), ("#000", (0, 0, 0)), (" White ", (255, 255, 255)),
     ("grey", (128, 128, 128)), ("gray", (128, 128, 128)), ("navy", (0, 0, 128))],
)
def test_parse_color(text: str, rgb: tuple[int, int, int]) -> None:
    assert parse_color(text) == rgb


@pytest.mark.parametrize("text", ["", "#ff", "#gggggg", "fff", "#12345", "ultraviolet", "rgb(1,2,3)"])
def test_parse_color_rejects_with_the_key_and_what_is_allowed(text: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_color(text, source="photo.yaml")
    assert caught.value.key == "background_color" and caught.value.source == "photo.yaml"
    assert "#rrggbb" in str(caught.value)


def test_transparent_is_rgba_with_decontaminated_edges() -> None:
    rgb, alpha = red_disc_on_white()
    out = cleanup(rgb, alpha, JobSpec(mode="transparent"))
    assert out.shape == (256, 256, 4) and out.dtype == np.uint8
    assert np.array_equal(out[..., 3], np.round(alpha * 255).astype(np.uint8))
    edge = (alpha > 0.1) & (alpha < 0.9)
    assert edge.sum() > 100
    # The naive colour there is pink (red mixed with the white backdrop); the cut-out must be red.
    naive = rgb[edge].astype(float).mean(axis=0)
    fixed = out[..., :3][edge].astype(float).mean(axis=0)
    assert naive[1] > 90 and fixed[1] < 50 and fixed[0] > 170
    # On a black page the edge shows no pale fringe: no edge pixel is lighter than the subject.
    on_black = out[..., :3].astype(float) * out[..., 3:4] / 255
    assert on_black[edge][:, 1].max() < 40
    # Transparent pixels far from the subject are plain zeros (compress well); near it, the subject's colour.
    assert (out[:5, :5] == 0).all()
    ring = (alpha == 0) & (np.hypot(*np.mgrid[-128:128, -128:128]) < 67.5)
    assert ring.sum() > 50
    assert out[..., 0][ring].mean() > 150


def test_transparent_works_in_the_window_around_the_subject() -> None:
    """A subject past the frame's corner, and faint alpha (below half a level) far from it: the output is
    the rounded alpha everywhere, the photo's own colour where opaque, and zeros beyond the subject's reach;
    an alpha that is all zero gives all zeros."""
    from bgwatch.pipeline.refine import to_alpha8

    rgb, alpha = red_disc_on_white(512)
    rgb, alpha = rgb[240:496, 20:276], alpha[240:496, 20:276]  # the disc cut by the top and right edges
    alpha[200:210, 5:15] = 0.001  # rounds to 0: no colour kept there, but part of the subject's box
    out = cleanup(rgb, alpha, JobSpec(mode="transparent"))
    a8 = to_alpha8(alpha)
    assert np.array_equal(out[..., 3], a8)
    opaque = alpha >= 1
    assert np.array_equal(out[..., :3][opaque], rgb[opaque])
    assert not out[150:, :100].any()  # the faint patch and the rest far from the disc: plain zeros
    edge = (alpha > 0.1) & (alpha < 0.9)
    assert out[..., 1][edge].mean() < 50 < rgb[..., 1][edge].mean()  # decontaminated up to the frame's edge
    assert not cleanup(rgb, np.zeros_like(alpha), JobSpec(mode="transparent")).any()


@pytest.mark.parametrize("step", [1, 2, 4, 8, 16, 32])
def test_block_means_in_uint16_are_block_mean_to_the_bit(step: int) -> None:
    from bgwatch.pipeline.cleanup import _block_means
    from bgwatch.pipeline.tiles import block_mean

    image = np.random.default_rng(step).integers(0, 256, (3 * step, 5 * step, 4), dtype=np.uint8)
    image[: step, : step] = 255  # a block at the top of uint16's range
    assert np.array_equal(_block_means(image, step), block_mean(image, step))


def test_color_mode_fills_exactly_and_keeps_the_subject() -> None:
    rgb, alpha = red_disc_on_white()
    out = cleanup(rgb, alpha, JobSpec(mode="color", background_color="#1e2a44"))
    assert out.shape == (256, 256, 3)
    assert (out[alpha == 0] == (30, 42, 68)).all()
    assert np.array_equal(out[alpha == 1], rgb[alpha == 1])
    edge = (alpha > 0.2) & (alpha < 0.8)
    assert out[edge][:, 1].max() < 60  # no white fringe between red and navy


def test_soften_blurs_and_mutes_the_background_only() -> None:
    rng = np.random.default_rng(0)
    rgb, alpha = red_disc_on_white()
    busy = rng.integers(0, 256, rgb.shape, dtype=np.uint8)
    busy[..., 2] = 30  # a saturated, busy backdrop
    scene = np.where(alpha[..., None] > 0, rgb, busy).astype(np.uint8)
    out = cleanup(scene, alpha, JobSpec(mode="soften"))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert np.array_equal(out[alpha == 1], scene[alpha == 1])  # the subject stays sharp
    outside = np.hypot(*np.mgrid[-128:128, -128:128]) > 90
    assert out[outside].std(axis=0).mean() < 0.3 * scene[outside].std(axis=0).mean()  # blurred

    def saturation(px: np.ndarray) -> float:
        return float((px.max(axis=1).astype(float) - px.min(axis=1)).mean())

    assert saturation(out[outside]) < 0.7 * saturation(scene[outside])  # muted


def test_soften_keeps_the_subject_colour_out_of_the_background() -> None:
    rgb, alpha = red_disc_on_white()
    out = cleanup(rgb, alpha, JobSpec(mode="soften"))
    just_outside = (alpha == 0) & (np.hypot(*np.mgrid[-128:128, -128:128]) < 80)
    r, g, _ = out[just_outside].astype(float).mean(axis=0)
    assert r - g < 12  # no red halo bled into the blurred backdrop


def test_enhance_touches_only_the_subject() -> None:
    rng = np.random.default_rng(1)
    rgb = np.clip(rng.normal(120, 12, (256, 256, 3)), 0, 255).astype(np.uint8)  # flat, low contrast
    alpha = np.zeros((256, 256), np.float32)
    alpha[64:192, 64:192] = 1.0
    alpha[60:64, 64:192] = 0.5
    out = enhance_foreground(rgb, alpha)
    assert np.array_equal(out[alpha == 0], rgb[alpha == 0])
    inside = alpha == 1
    assert out[inside].astype(float).std() > 1.3 * rgb[inside].astype(float).std()
    assert np.array_equal(cleanup(rgb, alpha, JobSpec(mode="color", enhance_fg=True))[alpha == 0],
                          np.full(((alpha == 0).sum(), 3), 255, np.uint8))


def test_enhance_with_empty_mask_is_a_no_op() -> None:
    rgb = np.full((32, 32, 3), 100, np.uint8)
    assert np.array_equal(enhance_foreground(rgb, np.zeros((32, 32), np.float32)), rgb)


def test_denoise_reduces_noise_quickly_and_leaves_clean_images_alone() -> None:
    import cv2
    from skimage import data

    clean = cv2.resize(data.astronaut(), (1024, 1024), interpolation=cv2.INTER_AREA)
    noisy = np.clip(clean + np.random.default_rng(2).normal(0, 8, clean.shape), 0, 255).astype(np.uint8)
    out = denoise(noisy)
    grey = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
    assert estimate_noise(grey) < 0.6 * estimate_noise(cv2.cvtColor(noisy, cv2.COLOR_RGB2GRAY))
    assert np.abs(out.astype(float) - clean).mean() < np.abs(noisy.astype(float) - clean).mean()
    flat = np.full((64, 64, 3), 90, np.uint8)
    assert denoise(flat) is flat


def test_cleanup_rejects_unknown_mode_and_mismatched_mask() -> None:
    rgb, alpha = red_disc_on_white(64)
    with pytest.raises(SpecError) as caught:
        cleanup(rgb, alpha, JobSpec(mode="sparkle"))
    assert caught.value.key == "mode" and "soften" in str(caught.value)
    with pytest.raises(ValueError):
        cleanup(rgb, alpha[:10], JobSpec(mode="color"))


def test_all_modes_on_a_studio_shot_with_every_option() -> None:
    from bgwatch.pipeline.masking import studio_mask
    from bgwatch.pipeline.refine import refine_mask
    from bgwatch.samples import studio_shot

    shot = studio_shot(11, size=(480, 360))
    alpha = refine_mask(studio_mask(shot.rgb), post_process=True)
    for mode, channels in (("transparent", 4), ("soften", 3), ("color", 3)):
        out = cleanup(shot.rgb, alpha, JobSpec(mode=mode, enhance_fg=True, denoise=True))
        assert out.shape == (360, 480, channels) and out.dtype == np.uint8
