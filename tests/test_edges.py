"""Guided upsampling of a net's small mask, on synthetic photos whose alpha is known."""

from __future__ import annotations

import numpy as np
import pytest

from bgwatch.pipeline.edges import guided_upsample, plain_upsample


def _known_alpha(width: int = 1200, height: int = 900, *, same_colour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(photo, true alpha): a disc and a tilted box, drawn 4x larger and area-averaged (1 px soft edges),
    over a textured backdrop."""
    import cv2

    big = np.zeros((height * 4, width * 4), np.uint8)
    cv2.circle(big, (width * 4 // 3, height * 2), height * 4 // 3, 255, -1, lineType=cv2.LINE_AA)
    box = cv2.boxPoints(((width * 4 * 0.7, height * 4 * 0.5), (width * 1.2, height * 2.4), 17.0))
    cv2.fillPoly(big, [box.astype(np.int32)], 255, lineType=cv2.LINE_AA)
    alpha = cv2.resize(big, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    rng = np.random.default_rng(7)
    texture = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 3) * 40
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    backdrop = np.stack([150 + 60 * yy + texture, 170 + texture, 200 - 40 * yy + texture], axis=-1)
    subject = backdrop + 4 if same_colour else np.stack(
        [190 + 0 * yy + 0 * texture, 60 + 40 * yy + 0 * texture, 40 + 0 * yy + 0 * texture], axis=-1)
    photo = subject * alpha[..., None] + backdrop * (1 - alpha[..., None])
    return np.clip(np.round(photo), 0, 255).astype(np.uint8), alpha


def _net_mask(alpha: np.ndarray) -> np.ndarray:
    import cv2

    return np.round(cv2.resize(alpha, (320, 320), interpolation=cv2.INTER_AREA) * 255).astype(np.uint8)


def _edge_band(alpha: np.ndarray, px: int = 3) -> np.ndarray:
    import cv2

    solid = (alpha > 0.5).astype(np.uint8)
    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return np.asarray(cv2.dilate(solid, kernel) != cv2.erode(solid, kernel))


def test_guided_upsampling_beats_plain_upsampling_on_the_edges() -> None:
    photo, truth = _known_alpha()
    small = _net_mask(truth)
    plain = plain_upsample(small, *truth.shape).astype(np.float32) / 255
    guided = guided_upsample(small, photo)
    assert guided.shape == truth.shape and guided.dtype == np.float32
    assert float(guided.min()) >= 0.0 and float(guided.max()) <= 1.0
    band = _edge_band(truth)
    plain_error = float(np.abs(plain[band] - truth[band]).mean())
    guided_error = float(np.abs(guided[band] - truth[band]).mean())
    assert guided_error < 0.6 * plain_error, (plain_error, guided_error)
    # Away from the outline nothing changes: the plain mask's solid inside and empty outside.
    far = ~_edge_band(truth, 40)
    assert np.abs(guided[far] - plain[far]).max() < 0.02


def test_without_a_colour_edge_the_plain_mask_comes_back() -> None:
    """Subject and backdrop of one colour: nothing to follow, so no worse than plain upsampling."""
    photo, truth = _known_alpha(600, 450, same_colour=True)
    small = _net_mask(truth)
    plain = plain_upsample(small, *truth.shape).astype(np.float32) / 255
    guided = guided_upsample(small, photo)
    band = _edge_band(truth)
    assert float(np.abs(guided[band] - truth[band]).mean()) <= float(np.abs(plain[band] - truth[band]).mean()) + 0.01


def test_a_mask_at_full_size_or_empty() -> None:
    photo, truth = _known_alpha(320, 320)
    same = guided_upsample(_net_mask(truth), photo)
    assert same.shape == (320, 320) and float(np.abs(same - truth).mean()) < 0.02
    empty = guided_upsample(np.zeros((320, 320), np.uint8), np.zeros((1000, 700, 3), np.uint8))
    assert empty.shape == (1000, 700) and not empty.any()


def test_the_fits_made_in_blocks_of_rows_are_the_whole_crops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fits are made a few dozen rows at a time, each block with two windows' reach more rows, and the
    windows' means worked on only in the rows within one window of the block's own: the alpha is the one
    a single block over the whole crop gives, to the bit (blocks shorter than a window's radius too)."""
    from bgwatch.pipeline import edges

    photo, alpha = _known_alpha(600, 450)
    mask = _net_mask(alpha)
    in_blocks = guided_upsample(mask, photo)
    monkeypatch.setattr(edges, "FIELD_ROWS", 3)
    in_thin_blocks = guided_upsample(mask, photo)
    monkeypatch.setattr(edges, "FIELD_ROWS", 10_000)
    whole = guided_upsample(mask, photo)
    assert np.array_equal(in_blocks, whole) and np.array_equal(in_thin_blocks, whole)


def test_the_uint8_alpha_is_the_float_alphas_rounded_to_the_bit() -> None:
    """guided_upsample8 makes no float32 plane: its alpha is refine.to_alpha8 of guided_upsample's, and a
    mask already at the photo's size is left as it was."""
    from bgwatch.pipeline.edges import guided_upsample8
    from bgwatch.pipeline.refine import to_alpha8

    photo, alpha = _known_alpha(600, 450)
    for mask in (_net_mask(alpha), np.round(alpha * 255).astype(np.uint8)):
        given = mask.copy()
        rounded = guided_upsample8(mask, photo)
        assert rounded.dtype == np.uint8 and rounded.shape == alpha.shape
        assert np.array_equal(rounded, to_alpha8(guided_upsample(mask, photo)))
        assert np.array_equal(mask, given)


@pytest.mark.parametrize("seed", [1, 2])
def test_the_fits_made_only_where_the_band_reads_them_are_the_dense_ones(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows are each fitted only over the runs of columns the band's samples read there
    (plus two windows' reach): on random blobs over a random photo, in blocks of 5 rows cut into pieces
    wherever the band leaves a few columns out, the alpha (float and uint8) is the one a single block over
    the whole crop gives, to the bit."""
    import cv2

    from bgwatch.pipeline import edges
    from bgwatch.pipeline.edges import guided_upsample8

    rng = np.random.default_rng(seed)
    blobs = cv2.GaussianBlur(rng.normal(0, 1, (90, 120)).astype(np.float32), (0, 0), 4)
    mask = np.clip((blobs - 0.1) * 2000 + 128, 0, 255).astype(np.uint8)
    alpha = cv2.resize(mask, (480, 360), interpolation=cv2.INTER_LINEAR).astype(np.float32)[..., None] / 255
    colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    noise = rng.normal(0, 6, (360, 480, 3)).astype(np.float32)
    photo = np.clip(colours[0] * alpha + colours[1] * (1 - alpha) + noise, 0, 255).astype(np.uint8)
    monkeypatch.setattr(edges, "FIELD_ROWS", 5)
    monkeypatch.setattr(edges, "SPLIT_GAP", 0)  # pieces as close as they may be (2 windows' reach apart)
    cut = guided_upsample(mask, photo), guided_upsample8(mask, photo)
    monkeypatch.setattr(edges, "FIELD_ROWS", 10_000)
    monkeypatch.setattr(edges, "SPLIT_GAP", 10_000)
    whole = guided_upsample(mask, photo), guided_upsample8(mask, photo)
    assert np.array_equal(cut[0], whole[0]) and np.array_equal(cut[1], whole[1])
    assert np.abs(whole[0] - plain_upsample(mask, 360, 480) / 255).max() > 0.1  # the fits did change it


def test_samples_of_a_field_at_whole_and_fractional_positions() -> None:
    """sample_at lays a list longer than a row out in rows (the last padded): at the field's pixel centres
    it gives the field's values, past an edge the edge's, and each position's samples are the same
    whether it is sampled in a long list or alone."""
    from bgwatch.pipeline.edges import SAMPLE_ROW, sample_at

    rng = np.random.default_rng(3)
    field = rng.random((40, 50, 5), dtype=np.float32)
    n = SAMPLE_ROW + 7
    ys, xs = rng.integers(0, 40, n), rng.integers(0, 50, n)
    assert np.array_equal(sample_at(field, ys.astype(np.float64), xs.astype(np.float64)), field[ys, xs])
    assert np.array_equal(sample_at(field, np.array([-3.0, 45.0]), np.array([-0.5, 60.0])),
                          field[[0, 39], [0, 49]])
    py, px = rng.uniform(-1, 41, n), rng.uniform(-1, 51, n)
    listed = sample_at(field, py, px)
    assert listed.shape == (n, 5) and listed.dtype == np.float32
    alone = [sample_at(field, py[i:i + 1], px[i:i + 1])[0] for i in (0, SAMPLE_ROW - 1, SAMPLE_ROW, n - 1)]
    assert np.array_equal(listed[[0, SAMPLE_ROW - 1, SAMPLE_ROW, n - 1]], np.array(alone))
