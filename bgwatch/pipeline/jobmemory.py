"""How much memory one job needs, judged from its input's header before a pixel is decoded: the admission
the memory budget (budget.py) and limits.max_memory are checked with."""

from __future__ import annotations

from pathlib import Path

from bgwatch.errors import InputError
from bgwatch.jobs import JobSpec

# Peak working set of one job above the process's own footprint, in bytes a pixel of the input, measured
# by bench/bench_memory.py (cleanup: 12-22 with the classical or a rembg engine; replace, gradient backdrop
# with shadow, colour matching and feathered edges: 30.6 at 6 MP, 25.0 at 25 MP and 23.9 at 100 MP when the
# product fills the frame, as marketplaces ask (--tight: the composite's worst case, its float work in bands
# of rows over the subject's box), 19-29 when it sits in the middle). Replace: the worst (6 MP, where a
# job's fixed costs weigh most) with ~15% margin, since a job's need is judged from its header before its
# subject is known. An image backdrop adds its own decode, counted from its header at the size it is decoded
# to (backgrounds.decoded_size: a big JPEG at a reduced scale): Pillow's RGB and the numpy copy made from it
# (a 24 MP backdrop behind a 6 MP photo, decoded whole: 43 bytes a pixel of the photo, not the 36 counted).
# limits.max_memory is checked with it.
JOB_BYTES_PER_PIXEL = {"cleanup": 24, "replace": 36}
BACKDROP_BYTES_PER_PIXEL = 6  # a backdrop image's decoded pixel: Pillow's RGB and bgwatch's copy of it
DENOISE_BYTES_PER_PIXEL = 8  # LAB copy, the denoised lightness and the result
MATTING_BYTES = 2 * 2**30  # rembg alpha matting runs at <= REMBG_WORK_SIDE px a side: a fixed cost
DEFAULT_MAX_MEMORY = 8 * 2**30  # the daemon passes limits.max_memory; 8 GiB admits a 100 MP replace (3.6 GB)


def job_memory(width: int, height: int, spec: JobSpec, encoded: int = 0) -> int:
    """Estimated peak bytes one job on a width x height input needs, above the daemon's own memory.
    `encoded`: the input file's size, held whole in memory while the job decodes it (the private copy its
    bytes are checked and decoded from: stages.checked_copy); a file far larger than its pixels (a small
    first frame, huge extra chunks) counts as what it is."""
    per_pixel = JOB_BYTES_PER_PIXEL.get(spec.operation, max(JOB_BYTES_PER_PIXEL.values()))
    if spec.denoise:
        per_pixel += DENOISE_BYTES_PER_PIXEL
    fixed = MATTING_BYTES if spec.mask.alpha_matting else 0
    from bgwatch.pipeline.canvas import canvas_pixels

    # The composite then runs on the canvas: an upscaled product's canvas can outgrow its input.
    return (per_pixel * (width * height + canvas_pixels(spec.canvas)) + fixed + backdrop_memory(width, height, spec)
            + encoded)


def backdrop_memory(width: int, height: int, spec: JobSpec) -> int:
    """The bytes a backdrop image's decode takes for a width x height input (0 for other backdrops), from the
    backdrop's header: its pixels as decoded for the size the backdrop is made at."""
    if spec.operation != "replace" or spec.engine != "image" or not spec.background_image:
        return 0
    from bgwatch.pipeline.backgrounds import backdrop_size, decoded_size

    size = decoded_size(Path(spec.background_image), backdrop_size(spec, width, height))
    return 0 if size is None else BACKDROP_BYTES_PER_PIXEL * size[0] * size[1]


def check_job_memory(width: int, height: int, spec: JobSpec, *, max_memory: int = DEFAULT_MAX_MEMORY,
                     source: str | Path = "input image", encoded: int = 0) -> None:
    """InputError when one job on this input could never fit in `max_memory` bytes (limits.max_memory)."""
    need = job_memory(width, height, spec, encoded)
    if need > max_memory:
        held = f", its {encoded / 2**30:.1f} GiB file included" if encoded > need / 2 else ""
        raise InputError(
            source, f"{width}x{height} ({width * height / 1e6:.0f} MP{held}) needs about {need / 2**30:.1f} GiB for "
            f"{spec.operation}, more than limits.max_memory ({max_memory / 2**30:.1f} GiB); scale it down, or "
            "raise limits.max_memory in config.yaml"
        )
