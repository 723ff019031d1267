"""The generated product shots: deterministic, realistic enough to be a test, fast enough for benches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bgwatch.samples import BACKDROPS, StudioShot, studio_shot, write_samples


def test_same_seed_same_shot_and_seeds_differ() -> None:
    a, b = studio_shot(5, size=(320, 240)), studio_shot(5, size=(320, 240))
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.mask, b.mask) and a.backdrop == b.backdrop
    assert not np.array_equal(a.rgb, studio_shot(6, size=(320, 240)).rgb)


@pytest.mark.parametrize("backdrop", BACKDROPS)
def test_every_backdrop_makes_a_sensible_shot(backdrop: str) -> None:
    shot = studio_shot(1, size=(400, 300), backdrop=backdrop)
    assert isinstance(shot, StudioShot) and shot.backdrop == backdrop
    assert shot.rgb.shape == (300, 400, 3) and shot.rgb.dtype == np.uint8
    assert shot.mask.shape == (300, 400) and shot.mask.dtype == np.float32
    assert float(shot.mask.min()) >= 0.0 and float(shot.mask.max()) == pytest.approx(1.0)
    assert 0.02 < float((shot.mask > 0.5).mean()) < 0.6
    edge = (shot.mask > 0.05) & (shot.mask < 0.95)
    assert edge.any()  # anti-aliased outline, like a real photo
    border = np.concatenate([shot.mask[0], shot.mask[-1], shot.mask[:, 0], shot.mask[:, -1]])
    assert border.max() < 0.01  # the product is never cropped by the frame
    # Sensor noise: flat backdrop pixels are not all identical.
    assert shot.rgb[:20, :20].std() > 0.5


def test_shadows_darken_the_backdrop_but_are_not_in_the_mask() -> None:
    for seed in range(8):
        shot = studio_shot(seed, size=(400, 400))
        assert shot.shadow is not None
        cast = (shot.shadow > 0.15) & (shot.mask < 0.01)
        assert cast.sum() > 100
        assert float(shot.mask[shot.shadow > 0.05].mean()) < 0.05  # only outline pixels mix


def test_unknown_backdrop_and_tiny_size_are_refused() -> None:
    with pytest.raises(ValueError, match="white_sweep"):
        studio_shot(0, backdrop="green_screen")
    with pytest.raises(ValueError):
        studio_shot(0, size=(10, 10))


def test_write_samples_writes_jpegs_cycling_backdrops(tmp_path: Path) -> None:
    from PIL import Image

    paths = write_samples(tmp_path / "inbox", 5, size=(160, 120), seed=3)
    assert len(paths) == 5 and all(p.suffix == ".jpg" and p.exists() for p in paths)
    assert [p.name.split("_", 2)[2][:-4] for p in paths[:4]] == list(BACKDROPS)
    with Image.open(paths[0]) as im:
        assert im.format == "JPEG" and im.size == (160, 120)
    again = write_samples(tmp_path / "again", 5, size=(160, 120), seed=3)
    assert again[2].read_bytes() == paths[2].read_bytes()
