"""Compositing on scenes whose truth is known: the subject's own colours F, its coverage alpha and the old
background B, photographed as I = aF + (1-a)B — so halos, colour shifts and stray shadows can be measured."""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np
import pytest

from bgwatch.jobs import JobSpec
from bgwatch.pipeline.composite import composite, contact_shadow
from bgwatch.pipeline.foreground import BandedFusion
from bgwatch.samples import studio_shot

OFF = JobSpec(
    operation="replace",
    engine="color",
    match_colors=False,
    feather_edges=False,
    shadow=False,
    enhance_fg=False,
)


@dataclass(frozen=True)
class Scene:
    photo: np.ndarray  # uint8, I = aF + (1-a)B
    fg: np.ndarray  # float [0,1] true subject colours (defined everywhere)
    alpha: np.ndarray  # float32 [0,1], anti-aliased
    old_bg: np.ndarray  # float [0,1]


def bottle_scene(
    size: tuple[int, int] = (320, 256),
    old_bg: tuple[int, int, int] = (40, 200, 60),
    with_handle: bool = False,
) -> Scene:
    """A shaded blue bottle (plus, optionally, a detached ring beside it, like a mug's handle) on a
    strongly coloured old background, its outline supersampled 8x so edge pixels carry true mixtures."""
    w, h = size
    s = 8
    big = np.zeros((h * s, w * s), np.uint8)
    cx = w * s // 2
    cv2.rectangle(big, (cx - 40 * s, 90 * s), (cx + 40 * s, 220 * s), 255, -1)
    cv2.ellipse(big, (cx, 90 * s), (40 * s, 30 * s), 0, 180, 360, 255, -1)
    cv2.rectangle(big, (cx - 12 * s, 30 * s), (cx + 12 * s, 70 * s), 255, -1)
    if with_handle:
        cv2.ellipse(big, (cx - 75 * s, 150 * s), (22 * s, 30 * s), 0, 0, 360, 255, 9 * s)
    alpha = cv2.resize(big.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_AREA)
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    shade = 0.55 + 0.45 * np.cos(np.clip(xx * 1.6, -np.pi / 2, np.pi / 2))
    fg = np.broadcast_to(np.array([0.16, 0.32, 0.78], np.float32) * shade, (h, w, 3)).copy()
    bg = np.broadcast_to(np.array(old_bg, np.float32) / 255.0, (h, w, 3)).copy()
    a = alpha[..., None]
    photo = np.clip(np.rint((fg * a + bg * (1 - a)) * 255), 0, 255).astype(np.uint8)
    return Scene(photo, fg, alpha, bg)


def backdrop_like(scene: Scene, color: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), scene.photo.shape).copy()


def delta_e76(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def lab(x: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(x.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)

    return np.linalg.norm(lab(a) - lab(b), axis=-1)


def ring(alpha: np.ndarray, width: int = 1) -> np.ndarray:
    """Edge pixels: partly covered, plus `width` px either side."""
    edge = ((alpha > 0.02) & (alpha < 0.98)).astype(np.uint8)
    return cv2.dilate(edge, np.ones((2 * width + 1, 2 * width + 1), np.uint8)) > 0


def interior(alpha: np.ndarray, margin: int = 4) -> np.ndarray:
    return cv2.erode((alpha > 0.999).astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0


def outside(alpha: np.ndarray, margin: int = 6) -> np.ndarray:
    return cv2.dilate((alpha > 0).astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) == 0


# ---------------------------------------------------------------- the backdrop and the subject


@pytest.mark.parametrize("spec", [OFF, replace(OFF, match_colors=True, feather_edges=True)])
def test_outside_the_subject_the_output_is_the_backdrop(spec: JobSpec) -> None:
    scene = bottle_scene()
    backdrop = np.random.default_rng(0).integers(0, 256, scene.photo.shape, dtype=np.uint8)
    out = composite(scene.photo, scene.alpha, backdrop, spec)
    assert out.shape == scene.photo.shape and out.dtype == np.uint8
    away = outside(scene.alpha)
    assert np.abs(out[away].astype(int) - backdrop[away]).max() <= 1


def test_the_subject_keeps_its_colours_without_matching() -> None:
    scene = bottle_scene()
    out = composite(scene.photo, scene.alpha, backdrop_like(scene, (230, 120, 40)), OFF)
    inside = interior(scene.alpha)
    assert delta_e76(out, scene.photo)[inside].mean() < 3.0


def test_matching_moves_the_subject_only_a_bounded_step_toward_the_new_light() -> None:
    scene = bottle_scene(old_bg=(245, 245, 245))  # shot on white, placed on a deep warm orange
    backdrop = backdrop_like(scene, (200, 90, 20))
    matched = composite(scene.photo, scene.alpha, backdrop, replace(OFF, match_colors=True))
    inside = interior(scene.alpha, margin=8)
    de = delta_e76(matched, scene.photo)[inside]
    assert 1.0 < de.mean() < 8.0  # it moved, but the product keeps its colour
    # ... and toward the backdrop: warmer (higher b*) and darker.
    lab_before = cv2.cvtColor(scene.photo.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)[inside].mean(0)
    lab_after = cv2.cvtColor(matched.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)[inside].mean(0)
    assert lab_after[2] > lab_before[2] and lab_after[0] < lab_before[0]


def test_a_neutral_backdrop_does_not_pull_a_coloured_product_grey() -> None:
    scene = bottle_scene(old_bg=(240, 240, 240))
    matched = composite(
        scene.photo, scene.alpha, backdrop_like(scene, (235, 235, 235)), replace(OFF, match_colors=True)
    )
    assert delta_e76(matched, scene.photo)[interior(scene.alpha, margin=8)].mean() < 1.5


# ---------------------------------------------------------------- edges


def test_no_halo_of_the_old_background_at_the_edge() -> None:
    scene = bottle_scene(old_bg=(40, 200, 60))  # a green old background: any spill shows on grey
    backdrop = backdrop_like(scene, (128, 128, 128))
    out = composite(scene.photo, scene.alpha, backdrop, OFF)
    a = scene.alpha[..., None]
    clean = np.rint((scene.fg * a + backdrop / 255.0 * (1 - a)) * 255)  # the true foreground, composited
    naive = np.rint(scene.photo * a + backdrop * (1 - a))  # the photo's edge pixels pasted as they are
    edge = ring(scene.alpha)
    ours = np.abs(out.astype(float) - clean)[edge].mean()
    pasted = np.abs(naive - clean)[edge].mean()
    assert ours < 1.0 and ours < pasted / 3
    # The green channel is where a halo would be: edge pixels are not greener than the clean composite.
    assert (out[..., 1].astype(float) - clean[..., 1])[edge].mean() < 2.0


def whole_image_fusion(image: np.ndarray, alpha: np.ndarray, radii: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(F, B_old) by blur fusion as the paper writes it: cv2's box filters over the whole image, each radius
    in turn (the reference BandedFusion is held to)."""
    a = alpha[..., None]
    i = image.astype(np.float32) / 255.0
    fg, bg = i, i
    for r in radii:
        size = (2 * r + 1, 2 * r + 1)
        mean_a = cv2.blur(alpha, size, borderType=cv2.BORDER_REPLICATE)[..., None]
        mean_fg = cv2.blur(fg * a, size, borderType=cv2.BORDER_REPLICATE) / (mean_a + 1e-5)
        mean_bg = cv2.blur(bg * (1 - a), size, borderType=cv2.BORDER_REPLICATE) / (1 - mean_a + 1e-5)
        fg = np.clip(mean_fg + a * (i - a * mean_fg - (1 - a) * mean_bg), 0.0, 1.0)
        bg = mean_bg
    return fg, np.clip(bg, 0.0, 1.0)


def test_foreground_estimation_recovers_true_colours_at_partial_coverage() -> None:
    scene = bottle_scene()
    h, w = scene.alpha.shape
    fusion = BandedFusion(scene.photo, scene.alpha, (29, 2), (0, h, 0, w), with_bg=True)
    fg = np.concatenate([band for _, _, band in fusion.bands()])
    assert fusion.old_bg is not None
    old = cv2.resize(fusion.old_bg, (w, h), interpolation=cv2.INTER_NEAREST)  # read at every 4th pixel
    partial = (scene.alpha > 0.2) & (scene.alpha < 0.8)
    assert np.abs(fg - scene.fg)[partial].mean() < 0.03
    assert np.abs(old - scene.old_bg)[outside(scene.alpha)].mean() < 0.01



# ---------------------------------------------------------------- bands of rows


@pytest.mark.parametrize("band_rows", [1, 3, 50])
@pytest.mark.parametrize("with_bg", [True, False])
def test_blur_fusion_in_bands_gives_the_whole_region_s_colours(band_rows: int, with_bg: bool) -> None:
    """F on the inner box and B_old on every 4th pixel, band by band, are the whole region's (cv2's box
    filters over all of it), whether the inner box touches the region's edge or not."""
    scene = bottle_scene(with_handle=True)
    alpha8 = np.rint(scene.alpha * 255).astype(np.uint8)
    whole_fg, whole_bg = whole_image_fusion(scene.photo, alpha8.astype(np.float32) / 255, (29, 2))
    for inner in [(20, 240, 30, 300), (0, 256, 0, 320)]:
        e0, e1, f0, f1 = inner
        fusion = BandedFusion(scene.photo, alpha8, (29, 2), inner, with_bg)
        bands = list(fusion.bands(band_rows))
        assert [b[0] for b in bands] == list(range(0, e1 - e0, band_rows))
        fg = np.concatenate([b[2] for b in bands])
        assert np.abs(fg - whole_fg[e0:e1, f0:f1]).max() < 1e-5
        if with_bg:
            assert fusion.old_bg is not None and np.abs(fusion.old_bg - whole_bg[::4, ::4]).max() < 1e-5


def _filled_frame_shot() -> tuple[np.ndarray, np.ndarray]:
    """A product cropped tight (it fills the frame, touching the top and bottom edges), with a hard mask."""
    shot = studio_shot(3, (480, 320), "white_sweep")
    ys, xs = np.nonzero(shot.mask > 0.05)
    crop = (slice(ys.min() + 6, ys.max() - 6), slice(max(0, xs.min() - 12), xs.max() + 12))
    rgb = cv2.resize(shot.rgb[crop], (360, 240), interpolation=cv2.INTER_CUBIC)
    return rgb, (cv2.resize(shot.mask[crop], (360, 240)) > 0.5).astype(np.float32)


@pytest.mark.parametrize("band_rows", [1, 7, 40])
def test_the_composite_in_bands_is_the_whole_box_composite(band_rows: int) -> None:
    """Bands of rows (each grown by its blurs' reach) give the picture one band over the whole box gives:
    no seams where bands meet, with every step on (colour matching, light wrap, feathering, shadow)."""
    rgb, alpha = _filled_frame_shot()
    backdrop = np.dstack([np.linspace(250, 90, 240)[:, None].repeat(360, 1)] * 3).astype(np.uint8)
    spec = JobSpec(operation="replace", engine="gradient", shadow=True, enhance_fg=True)
    # Hard edges (no feathering) show a light wrap cut short at a band's edge; float sums may round apart.
    for step in (spec, replace(spec, match_colors=False), replace(spec, feather_edges=False)):
        whole = composite(rgb, alpha, backdrop, step, band_rows=10_000)
        banded = composite(rgb, alpha, backdrop, step, band_rows=band_rows)
        differs = np.abs(whole.astype(int) - banded)
        assert differs.max() <= 1 and np.count_nonzero(differs) < 1e-4 * differs.size
    # ... and that is not the backdrop: the subject is there, with its own colours.
    assert delta_e76(banded, rgb)[interior(alpha, margin=6)].mean() < 8.0

def test_feathering_smooths_a_hard_jagged_mask() -> None:
    scene = bottle_scene()
    hard = (scene.alpha > 0.5).astype(np.float32)  # a binary mask: stair-stepped edges
    backdrop = backdrop_like(scene, (250, 250, 250))
    jagged = composite(scene.photo, hard, backdrop, OFF)
    soft = composite(scene.photo, hard, backdrop, replace(OFF, feather_edges=True))
    edge = ring(scene.alpha, 2)
    # Feathered edges have in-between values; the subject's size stays (coverage within 2%).
    levels = lambda img: len(np.unique(img[..., 0][edge]))  # noqa: E731
    assert levels(soft) > levels(jagged) * 1.5
    lum = lambda img: 1 - img[..., 0].astype(float) / 250  # noqa: E731
    assert abs(lum(soft).sum() / lum(jagged).sum() - 1) < 0.02


# ---------------------------------------------------------------- shadow


def test_shadow_darkens_below_the_subject_only() -> None:
    scene = bottle_scene(size=(320, 300))
    backdrop = backdrop_like(scene, (220, 220, 220))
    out = composite(scene.photo, scene.alpha, backdrop, replace(OFF, shadow=True)).astype(int)
    rows = np.nonzero(scene.alpha.max(axis=1) > 0.5)[0]
    cols = np.nonzero(scene.alpha.max(axis=0) > 0.5)[0]
    top, base, left, right = rows[0], rows[-1], cols[0], cols[-1]
    below = out[base + 2 : base + 8, left + 10 : right - 10, 0]
    assert below.mean() < 220 - 25  # a visible contact shadow right under the base
    assert (out[: top - 2, :, 0] == 220).all()  # nothing above the subject
    away = outside(scene.alpha, margin=6)
    assert (out[: base - 10][away[: base - 10]] == 220).all()  # nor beside it, above the base
    assert (out[-5:, :, 0] == 220).all()  # and it fades out before the frame's bottom
    # The darkest row is at the base: the shadow touches the subject, it does not float.
    shade = contact_shadow(scene.alpha)
    assert abs(int(shade.max(axis=1).argmax()) - base) <= 4


def test_parts_above_the_base_cast_no_shadow_of_their_own() -> None:
    scene = bottle_scene(size=(320, 300), with_handle=True)
    shade = contact_shadow(scene.alpha)
    handle_cols = slice(int(320 / 2 - 97), int(320 / 2 - 53))
    handle_bottom = int(np.nonzero(scene.alpha[:, handle_cols].max(axis=1) > 0.5)[0][-1])
    # Under the ring (which ends well above the bottle's base) the backdrop stays clean.
    assert shade[handle_bottom + 2 : handle_bottom + 20, handle_cols].max() < 0.02


def test_the_shadow_read_in_windows_is_the_whole_shadow() -> None:
    from bgwatch.pipeline.composite import _shadow_stamps

    scene = bottle_scene(size=(320, 300), with_handle=True)
    shadow = _shadow_stamps(scene.alpha)
    whole = contact_shadow(scene.alpha)
    assert whole.shape == scene.alpha.shape and whole.max() > 0.2
    pieces = np.concatenate([shadow.rows((y0, min(y0 + 37, 300), 0, 320)) for y0 in range(0, 300, 37)])
    assert np.abs(pieces - whole).max() < 1e-6
    assert np.abs(shadow.rows((150, 290, 40, 250)) - whole[150:290, 40:250]).max() < 1e-6


def test_no_subject_gives_the_backdrop() -> None:
    backdrop = np.full((40, 50, 3), 77, np.uint8)
    out = composite(
        np.zeros((40, 50, 3), np.uint8), np.zeros((40, 50), np.float32), backdrop, replace(OFF, shadow=True)
    )
    assert np.array_equal(out, backdrop)


def test_a_uint8_mask_and_a_backdrop_of_another_size_are_accepted() -> None:
    scene = bottle_scene()
    backdrop = np.full((100, 100, 3), 200, np.uint8)
    out = composite(scene.photo, np.rint(scene.alpha * 255).astype(np.uint8), backdrop, OFF)
    assert out.shape == scene.photo.shape and (out[outside(scene.alpha)] == 200).all()


def test_enhance_fg_changes_the_subject_not_the_backdrop() -> None:
    shot = studio_shot(2, (256, 256))
    backdrop = np.full((256, 256, 3), 180, np.uint8)
    plain = composite(shot.rgb, shot.mask, backdrop, OFF)
    enhanced = composite(shot.rgb, shot.mask, backdrop, replace(OFF, enhance_fg=True))
    inside = interior(shot.mask)
    assert np.abs(plain.astype(int) - enhanced)[inside].mean() > 0.5
    assert np.array_equal(plain[outside(shot.mask)], enhanced[outside(shot.mask)])


@pytest.mark.parametrize("seed", [1, 5])
def test_sample_shots_keep_their_subject_on_a_new_backdrop(seed: int) -> None:
    shot = studio_shot(seed, (320, 256))
    backdrop = np.full((256, 320, 3), (30, 90, 70), np.uint8)
    spec = JobSpec(operation="replace", engine="color", enhance_fg=False, shadow=True)  # defaults otherwise
    out = composite(shot.rgb, shot.mask, backdrop, spec)
    assert delta_e76(out, shot.rgb)[interior(shot.mask)].mean() < 8.0
    far = outside(shot.mask, margin=8)
    far[int(np.nonzero(shot.mask.max(axis=1) > 0.5)[0][-1]) - 10 :] = False  # leave the shadow out
    assert np.abs(out[far].astype(int) - backdrop[far]).max() <= 1
