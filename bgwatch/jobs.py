"""Immutable job data: what a job asks for (JobSpec), the job itself (Job), how it ended (RunResult).

JobSpec's field defaults are the built-in defaults of the rules cascade (rules.py reads them from here),
so there is exactly one place where a default lives.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class JobState(str, enum.Enum):
    """The life of a run row in SQLite."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    SUPERSEDED = "superseded"  # its claim was taken back by another host, which processed the file instead

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class MaskSpec:
    """Which engine cuts the subject out, and how."""

    engine: str = "auto"  # auto | rembg | classical (any registered name)
    model: str = "u2net"  # rembg model name (u2net, isnet-general-use, birefnet-general, ...)
    post_process: bool = True  # remove specks and holes, keep edges soft
    alpha_matting: bool = False
    precision: str = "auto"  # auto | fp32 | int8: the net's weights on the CPU (auto: int8 where VNNI/AMX)


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """How the finished image is encoded and named."""

    format: str = "png"  # png | jpg | webp
    quality: int = 92  # 1-100, jpg and webp
    suffix: str = ""  # appended to the input stem: photo.jpg -> photo<suffix>.png


@dataclass(frozen=True, slots=True)
class CanvasSpec:
    """Where the subject lands: the output's frame, margins, placement and checks (pipeline/canvas.py)."""

    size: str = ""  # "" = the input's own frame | "2000x2000" (pixels) | "4:5" (aspect; long_side gives the size)
    long_side: int = 2000  # px: the canvas's long side when size is an aspect ratio
    margin: str = "0"  # "7.5%" | "40" (px) | per side, top right bottom left: "5% 5% 10% 5%"
    position: str = "center"  # center | bottom
    trim: bool = False  # fit the subject's box, not the whole frame
    upscale: bool = False  # a small subject may be enlarged (at most canvas.MAX_UPSCALE times)
    min_subject: int = 0  # px: a subject whose box's long side is smaller fails (0 = no check)
    min_fill: float = 0.0  # the subject's box's share of the canvas: less fails
    max_fill: float = 1.0  # ...more fails (a subject cut by the frame)
    max_side: int = 0  # px: without a size, the output is scaled down to at most this long side (0 = off)


DEFAULT_SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_RUNWAY_MODEL = "gen4_image"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything one image's processing depends on, fully resolved (see rules.py)."""

    operation: str = "cleanup"  # cleanup | replace
    # cleanup
    mode: str = "transparent"  # transparent | soften | color
    background_color: str = "#ffffff"
    enhance_fg: bool = False
    denoise: bool = False
    blur_radius: int = 0  # soften: the backdrop's blur radius in pixels; 0 = scaled to the image
    desaturate_pct: int = 45  # soften: how much colour the backdrop loses
    # replace
    engine: str = "sdxl"  # sdxl | runway | image | color | gradient
    model: str = ""  # "" = the engine's default (DEFAULT_SDXL_MODEL, DEFAULT_RUNWAY_MODEL)
    gradient: tuple[str, str] = ("#f4f4f4", "#c8c8c8")
    gradient_direction: str = "vertical"  # vertical | horizontal | radial
    prompt: str = ""
    negative_prompt: str = "people, text, watermark"
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int | None = None  # None: a seed is drawn per run and recorded
    background_image: str = ""  # absolute path once resolved by rules.py
    background_fit: str = "cover"  # cover | contain
    match_colors: bool = True
    feather_edges: bool = True
    shadow: bool = False
    fallback_engine: str = ""  # the engine that makes the backdrop when the generation fails ("" = none)
    # both
    mask: MaskSpec = field(default_factory=MaskSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    # marketplace-ready outputs (presets.py, pipeline/canvas.py, pipeline/metadata.py)
    canvas: CanvasSpec = field(default_factory=CanvasSpec)
    preset: str = "none"  # the last preset named in the cascade (its keys applied where it was named)
    metadata: str = "web"  # keep | strip | web (credits and DPI kept; GPS and serial numbers dropped)
    # control (not part of the pixels)
    require_sidecar: bool = False
    reprocess: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gradient"] = list(self.gradient)
        return data

    def to_json(self) -> str:
        """Every field, as stored in the runs table's spec_json."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """The inverse of to_dict (for specs read back from the runs table)."""
        values = dict(data)
        values["mask"] = MaskSpec(**values.get("mask", {}))
        values["output"] = OutputSpec(**values.get("output", {}))
        values["canvas"] = CanvasSpec(**values.get("canvas", {}))
        values["gradient"] = tuple(values.get("gradient", JobSpec().gradient))
        return cls(**values)

    def canonical_json(self) -> str:
        """Stable JSON of the fields that change the output (control fields left out)."""
        data = self.to_dict()
        for control in ("require_sidecar", "reprocess"):
            data.pop(control)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def is_generative(self) -> bool:
        return self.operation == "replace" and self.engine in GENERATIVE_ENGINES


GENERATIVE_ENGINES = frozenset({"sdxl", "runway"})


def job_key(input_sha256: str, spec: JobSpec) -> str:
    """The idempotency key: same bytes and same resolved spec means the same output."""
    return hashlib.sha256(f"{input_sha256}\n{spec.canonical_json()}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed image on its way through the pipeline."""

    run_id: int
    inbox: str  # the inbox's path as configured (its name in the runs table)
    rel_path: str  # the image's path relative to the inbox root, as dropped (POSIX separators)
    source: Path  # where the bytes are now (the claimed copy under .bgwatch/claimed/<host>/)
    spec: JobSpec
    input_sha256: str
    key: str
    ticket: object = None  # opaque: what its source needs to deliver it (a folder job's claim); only the source looks
    root: Path | None = None  # the folder `source` is re-opened below without following links (a claimed file's inbox)
    output_rel: str = ""  # the output's path relative to the inbox's outbox, chosen when the run was recorded


@dataclass(frozen=True, slots=True)
class RunResult:
    """How one run ended."""

    run_id: int
    state: JobState
    output_path: Path | None = None
    error: str = ""
    mask_engine: str = ""
    bg_engine: str = ""
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    parked: Path | None = None  # where the original went (done/, failed/, back in the inbox for keep)
