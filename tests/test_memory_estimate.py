"""Issue 20, item 11: the memory a replace job is admitted with covers what it takes when the product fills
the frame (the composite's float planes cover the subject's box), measured in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgwatch.jobs import JobSpec
from bgwatch.pipeline.stages import job_memory

ROOT = Path(__file__).resolve().parents[1]

# ru_maxrss would count the parent's size at the fork (a pytest process that ran a daemon is bigger than the
# job): the child resets its own high-water mark after its imports (clear_refs 5) and reads VmHWM at the end.
CHILD = """
import json, sys
from pathlib import Path
import cv2, numpy as np
from bgwatch.config import Config
from bgwatch.jobs import Job, JobSpec, MaskSpec
from bgwatch.pipeline import classical, composite, imageio, masking, stages
import PIL.PngImagePlugin
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
path = Path(sys.argv[1])
spec = JobSpec(operation="replace", engine="gradient", shadow=True, mask=MaskSpec(engine="classical"))
job = Job(run_id=1, inbox="t", rel_path=path.name, source=path, spec=spec, input_sha256="", key="")
config = Config()
stages.run_all(job, config, stages.Engines(config, None))
peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak}))
"""


def tight_product_shot(path: Path, width: int, height: int) -> None:
    """A studio shot cropped to its product (4% margin) and scaled up: the product fills the frame."""
    import cv2

    from bgwatch.samples import studio_shot

    shot = studio_shot(3, (1000, 667), "white_sweep")
    ys, xs = np.nonzero(shot.mask > 0.05)
    my, mx = 27, 40
    crop = shot.rgb[max(0, ys.min() - my) : ys.max() + my, max(0, xs.min() - mx) : xs.max() + mx]
    Image.fromarray(cv2.resize(crop, (width, height), interpolation=cv2.INTER_CUBIC)).save(path, quality=90)


@pytest.mark.slow
def test_a_replace_job_whose_product_fills_the_frame_stays_within_its_admitted_memory(tmp_path: Path) -> None:
    width, height = 3000, 2000
    path = tmp_path / "tight.jpg"
    tight_product_shot(path, width, height)
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    used = usage["peak"] - usage["base"]
    admitted = job_memory(width, height, JobSpec(operation="replace", engine="gradient", shadow=True))
    pixels = width * height
    # ~45 here (a product in the middle of the frame: ~25): the composite's worst case is what is measured
    assert used > 32 * pixels, f"{used / pixels:.1f} bytes a pixel: the product does not fill the frame"
    assert used <= admitted, f"{used / pixels:.1f} bytes a pixel used, {admitted / pixels:.0f} admitted"
