"""Issue 20, item 11: the memory a replace job is admitted with covers what it takes when the product fills
the frame (the composite's worst case: its float work covers the subject's box, in bands of rows), and is
not far above it; measured in a fresh process from its own high-water mark (tests.test_memory.job_peak)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgwatch.jobs import JobSpec
from bgwatch.pipeline.jobmemory import job_memory
from tests.test_memory import job_peak


def tight_product_shot(path: Path, width: int, height: int) -> float:
    """A studio shot cropped to its product (4% margin) and scaled up: the product fills the frame. Returns
    the share of the frame the product's box covers."""
    import cv2

    from bgwatch.samples import studio_shot

    shot = studio_shot(3, (1000, 667), "white_sweep")
    ys, xs = np.nonzero(shot.mask > 0.05)
    my, mx = 27, 40
    box = (slice(max(0, ys.min() - my), ys.max() + my), slice(max(0, xs.min() - mx), xs.max() + mx))
    Image.fromarray(cv2.resize(shot.rgb[box], (width, height), interpolation=cv2.INTER_CUBIC)).save(path, quality=90)
    crop = shot.mask[box] > 0.05
    rows, cols = np.nonzero(crop.any(axis=1))[0], np.nonzero(crop.any(axis=0))[0]
    return float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)) / crop.size


@pytest.mark.slow
def test_a_replace_job_whose_product_fills_the_frame_stays_within_its_admitted_memory(tmp_path: Path) -> None:
    width, height = 3000, 2000  # 6 MP: the size where a job's fixed costs weigh most a pixel
    path = tmp_path / "tight.jpg"
    # The product's box is most of the frame; grown by the blurs' reach (a tenth of the side), all of it.
    assert tight_product_shot(path, width, height) > 0.55
    used = job_peak(path, "replace:gradient")
    admitted = job_memory(width, height, JobSpec(operation="replace", engine="gradient", shadow=True))
    pixels = width * height
    # The composite's float planes covered the subject's box: 56-61 bytes a pixel; in bands, ~30.
    assert used <= 35 * pixels, f"{used / pixels:.1f} bytes a pixel used"
    assert used <= admitted, f"{used / pixels:.1f} bytes a pixel used, {admitted / pixels:.0f} admitted"
    # ... and admission does not hold back much more than a job takes (64 a pixel held back twice as much).
    assert admitted <= 1.5 * used, f"{admitted / pixels:.0f} bytes a pixel admitted, {used / pixels:.1f} used"
