"""Presets: a marketplace's image rules named in one line (`preset: amazon`).

A preset is a bundle of JobSpec keys (the canvas, the background, the output format, the metadata policy)
plus what `bgwatch report` checks an output against. rules.resolve applies a preset's keys at the level
that names it, below that level's own keys: defaults < earlier levels < the preset < explicit keys at the
same or later levels. So an inbox rule `preset: amazon` with a sidecar `output: {quality: 90}` keeps every
amazon key but the quality. This module is data only (rules.py validates the bundles against FIELDS; a
test checks that every bundle is valid).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Preset:
    """One named bundle, and the targets its outputs are marked against."""

    name: str
    summary: str  # one line for the README and `explain`
    keys: Mapping[str, object]  # a JobSpec fragment, as a rule would write it
    size: tuple[int, int]  # the output's width and height
    format: str  # the output format (png | jpg | webp)
    fill: float  # the subject's box's share of the canvas (its long side on a square canvas)
    fill_tolerance: float = 0.03
    position: str = "center"
    background: tuple[int, int, int] | None = None  # every pixel outside the subject must be exactly this
    notes: tuple[str, ...] = field(default_factory=tuple)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "amazon", "Amazon main image: 2000x2000 sRGB JPEG, pure white, the product's box 85% of the frame, "
        "centred; products under 500 px fail",
        {"operation": "cleanup", "mode": "color", "background_color": "#ffffff",
         "canvas": {"size": "2000x2000", "margin": "7.5%", "position": "center", "trim": True, "upscale": True,
                    "min_subject": 500, "min_fill": 0.82, "max_fill": 0.88},
         "output": {"format": "jpg", "quality": 95}, "metadata": "web"},
        size=(2000, 2000), format="jpg", fill=0.85, background=(255, 255, 255),
        notes=("Amazon asks for pure white (255, 255, 255), the product filling about 85% of the frame and "
               "at least 1000 px on the long side (2000 px recommended, for zoom).",),
    ),
    Preset(
        "square-white", "a square 1600x1600 catalogue shot: pure white, the product's box 80% of the frame, "
        "centred; products under 400 px fail",
        {"operation": "cleanup", "mode": "color", "background_color": "#ffffff",
         "canvas": {"size": "1:1", "long_side": 1600, "margin": "10%", "position": "center", "trim": True,
                    "upscale": True, "min_subject": 400, "min_fill": 0.77, "max_fill": 0.83},
         "output": {"format": "jpg", "quality": 92}, "metadata": "web"},
        size=(1600, 1600), format="jpg", fill=0.80, background=(255, 255, 255),
    ),
    Preset(
        "shopify", "Shopify's square 2048x2048 sRGB JPEG: white, every product standing on the same bottom "
        "margin, its box 84% of the frame; products under 500 px fail",
        {"operation": "cleanup", "mode": "color", "background_color": "#ffffff",
         "canvas": {"size": "2048x2048", "margin": "8%", "position": "bottom", "trim": True, "upscale": True,
                    "min_subject": 500, "min_fill": 0.81, "max_fill": 0.87},
         "output": {"format": "jpg", "quality": 90}, "metadata": "web"},
        size=(2048, 2048), format="jpg", fill=0.84, position="bottom", background=(255, 255, 255),
        notes=("Shopify themes crop a catalogue to one aspect ratio: square 2048 px is its recommendation, "
               "and products standing on one line read as a shelf.",),
    ),
)}
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)
