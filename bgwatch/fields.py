"""The JobSpec schema: every key a rule, folder file, sidecar or form may set, and how one value is checked.

FIELDS is the one schema every source is checked against; its defaults are read from JobSpec, and the
README's key reference is generated from it (reference.py). Checking a fragment here knows nothing of
where it sits in the cascade (rules.py): only whether its source is trusted (config.yaml) or not
(folder files, sidecars: their paths must stay inside the inbox).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import TypeAlias

from bgwatch.errors import SpecError
from bgwatch.jobs import DEFAULT_RUNWAY_MODEL, DEFAULT_SDXL_MODEL, JobSpec
from bgwatch.presets import PRESET_NAMES
from bgwatch.sidecars import FOLDER_FILE as FOLDER_FILE
from bgwatch.text import shown

BUILT_IN = "built-in default"
OVERRIDES = "command line (--set)"
GROUPS = ("mask", "output", "canvas")
MASK_ENGINES = ("auto", "rembg", "classical")  # checked lazily against masking's registry for others
SEED_MAX = 2**32 - 1

_COLOUR = re.compile(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
_ALIASES = {"jpeg": "jpg", "colour": "color", "centre": "center"}
_DEFAULT_SPEC = JobSpec()

#: One checked value, as FIELDS' kinds allow it: flag, number, seed (or null), text, colour, two colours.
SpecValue: TypeAlias = bool | int | float | str | list[str] | None
#: A checked source: top-level keys, and the nested `mask` and `output` groups.
Fragment: TypeAlias = dict[str, SpecValue | dict[str, SpecValue]]


def _default(name: str) -> object:
    value: object = _DEFAULT_SPEC
    for part in name.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, slots=True)
class Field:
    """One key a spec may set: how it is checked, documented and defaulted."""

    name: str  # dotted for the nested groups: "mask.engine"
    kind: str  # choice | flag | int | float | seed | colour | colours | text | suffix | path | model | size | margin
    help: str
    example: object
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def default(self) -> object:
        return _default(self.name)


FIELDS: tuple[Field, ...] = (
    Field("operation", "choice", "what happens to the background", "replace", choices=("cleanup", "replace")),
    Field("mode", "choice", "cleanup: what the background becomes", "color",
          choices=("transparent", "soften", "color")),
    Field("background_color", "colour", "cleanup mode color and replace engine color: the fill", "#f0f0f0"),
    Field("enhance_fg", "flag", "lift the subject's contrast (CLAHE on its lightness)", True),
    Field("denoise", "flag", "reduce sensor noise before compositing", True),
    Field("blur_radius", "int", "cleanup mode soften: the background's blur radius in pixels, as the original "
          "service's (a 2r+1 kernel); 0: scaled to the image", 8, minimum=0, maximum=200),
    Field("desaturate_pct", "int", "cleanup mode soften: how much colour the background loses, in percent", 25,
          minimum=0, maximum=100),
    Field("engine", "choice", "replace: where the new background comes from", "image",
          choices=("sdxl", "runway", "image", "color", "gradient")),
    Field("model", "model", f"sdxl: hub id or local folder; runway: model name; empty: {DEFAULT_SDXL_MODEL} "
          f"(sdxl), {DEFAULT_RUNWAY_MODEL} (runway)", "stabilityai/sdxl-turbo"),
    Field("gradient", "colours", "replace engine gradient: from, to", ["#ffffff", "#d0d8e0"]),
    Field("gradient_direction", "choice", "replace engine gradient: its direction", "radial",
          choices=("vertical", "horizontal", "radial")),
    Field("prompt", "text", "sdxl, runway: the scene to generate (required for those engines)",
          "marble countertop, soft window light"),
    Field("negative_prompt", "text", "sdxl: what the scene must not contain", "people, text, blur"),
    Field("steps", "int", "sdxl: denoising steps", 30, minimum=1, maximum=100),
    Field("guidance_scale", "float", "sdxl: how closely to follow the prompt (0 for turbo/lightning models)",
          5.0, minimum=0, maximum=20),
    Field("seed", "seed", "sdxl, runway: generation seed; null draws one per run and records it", 42,
          minimum=0, maximum=SEED_MAX),
    Field("background_image", "path", "replace engine image: the backdrop file", "_assets/oak.jpg"),
    Field("background_fit", "choice", "replace engine image: fill and crop, or show it whole", "contain",
          choices=("cover", "contain")),
    Field("match_colors", "flag", "replace: shift the subject's colours toward the new light", False),
    Field("feather_edges", "flag", "replace: soften the cut-out's edge", False),
    Field("shadow", "flag", "replace: a soft contact shadow under the subject", True),
    Field("fallback_engine", "choice", "replace: the engine that makes the background when the engine's "
          "generation fails (recorded on the run); empty: none, the job fails", "sdxl",
          choices=("", "sdxl", "runway", "image", "color", "gradient")),
    Field("mask.engine", "choice", "what cuts the subject out; auto: rembg when its weights are present, "
          "else classical", "classical", choices=MASK_ENGINES),
    Field("mask.model", "model", "rembg model name (weights under U2NET_HOME)", "birefnet-general"),
    Field("mask.post_process", "flag", "remove specks and fill holes in the mask", False),
    Field("mask.alpha_matting", "flag", "rembg alpha matting for hair and fur (slower)", True),
    Field("mask.precision", "choice", "the net's weights: auto runs the int8 variant (`bgwatch models quantize`) "
          "on a CPU with VNNI/AMX when it passed its quality gate, fp32 elsewhere and on CUDA", "fp32",
          choices=("auto", "fp32", "int8")),
    Field("output.format", "choice", "the file written to the outbox", "webp",
          choices=("png", "jpg", "webp")),
    Field("output.quality", "int", "jpg and webp quality", 85, minimum=1, maximum=100),
    Field("output.suffix", "suffix", "added to the output's name: `_cutout` makes photo_cutout.png",
          "_cutout"),
    Field("canvas.size", "size", "the output's frame: WIDTHxHEIGHT in pixels, or an aspect ratio in quotes "
          '("4:5", sized by canvas.long_side); empty: the input\'s own frame', "2000x2000"),
    Field("canvas.long_side", "int", "an aspect-ratio canvas's long side, in pixels", 1600, minimum=16,
          maximum=20000),
    Field("canvas.margin", "margin", "space around the subject: pixels or percent of the canvas's side, one "
          "value or per side like CSS (top right bottom left)", "5% 5% 8% 5%"),
    Field("canvas.position", "choice", "where the subject stands: centred, or on the bottom margin (its contact "
          "shadow below it)", "bottom", choices=("center", "bottom")),
    Field("canvas.trim", "flag", "fit the subject's box into the canvas, not the whole photo", True),
    Field("canvas.upscale", "flag", "enlarge a subject smaller than the canvas (at most 4x; the log says when "
          "a product is too small)", True),
    Field("canvas.min_subject", "int", "fail a shot whose subject's box is shorter than this on its long side, "
          "in input pixels (0: no check)", 500, minimum=0, maximum=20000),
    Field("canvas.min_fill", "float", "fail a shot whose subject's box fills less of the canvas than this "
          "(its long side's share on a square canvas)", 0.8, minimum=0, maximum=1),
    Field("canvas.max_fill", "float", "fail a shot whose subject fills more than this, or is cut off by the "
          "photo's edge (1: no check)", 0.9, minimum=0, maximum=1),
    Field("canvas.max_side", "int", "without a canvas size: scale the output down to at most this long side "
          "(0: keep its size)", 3000, minimum=0, maximum=20000),
    Field("preset", "choice", "a marketplace's bundle of the keys above and the output format (see "
          "Marketplace-ready outputs); later keys override it one by one", "amazon",
          choices=("none", *PRESET_NAMES)),
    Field("metadata", "choice", "EXIF kept in the output: web keeps artist, copyright, description and DPI "
          "and drops GPS and serial numbers; keep copies all but the orientation; strip drops all", "keep",
          choices=("web", "keep", "strip")),
    Field("require_sidecar", "flag", "images wait for their sidecar before they are taken", True),
    Field("reprocess", "flag", "process again even when these bytes and this spec were done before", True),
)
FIELDS_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
_TOP_NAMES = sorted([f.name for f in FIELDS if "." not in f.name] + list(GROUPS))
_GROUP_NAMES = {g: [f.name.split(".", 1)[1] for f in FIELDS if f.name.startswith(g + ".")] for g in GROUPS}


def validate_fragment(data: object, source: str, *, trusted: bool) -> Fragment:
    """Check one source's keys against FIELDS; the normalised fragment (nested `mask`/`output` dicts).

    Untrusted sources (folder files, sidecars) may not name absolute or `..` paths; the checks that need
    the config and the file system (models, symlinks, existence) happen in resolve().
    """
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpecError(source, "", f"must be a mapping of keys to values, got {type(data).__name__}")
    out: Fragment = {}
    for key, value in data.items():
        if key in GROUPS:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise SpecError(source, key, f"must be a mapping like `{key}: {{...}}`, got {value!r}")
            group: dict[str, SpecValue] = {}
            for sub, sub_value in value.items():
                field = FIELDS_BY_NAME.get(f"{key}.{sub}") if isinstance(sub, str) else None
                if field is None:
                    raise _unknown(source, sub, key)
                group[sub] = _check(field, sub_value, source, trusted)
            out[key] = group
            continue
        field = FIELDS_BY_NAME.get(key) if isinstance(key, str) and "." not in key else None
        if field is None:
            raise _unknown(source, key, "")
        out[key] = _check(field, value, source, trusted)
    return out


def validate_fragment_all(data: object, source: str, *, trusted: bool) -> list[SpecError]:
    """Every problem in a fragment, not just the first (for `bgwatch validate`); [] when it is valid."""
    try:
        validate_fragment(data, source, trusted=trusted)
    except SpecError as first:
        if not isinstance(data, Mapping):
            return [first]
    else:
        return []
    errors = []
    for key, value in data.items():
        nested = key in GROUPS and isinstance(value, Mapping)
        for part in [{key: {sub: v}} for sub, v in value.items()] if nested else [{key: value}]:
            try:
                validate_fragment(part, source, trusted=trusted)
            except SpecError as exc:
                errors.append(exc)
    return errors


def _unknown(source: str, key: object, group: str) -> SpecError:
    names = _GROUP_NAMES[group] if group else _TOP_NAMES
    shown = f"{group}.{key}" if group else str(key)
    hint = ""
    if isinstance(key, str):
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        nested = [f.name for f in FIELDS if not group and f.name.split(".")[-1] == key and "." in f.name]
        if key in FIELDS_BY_NAME and "." in key:
            outer, inner = key.split(".", 1)
            hint = f"; write it nested: `{outer}: {{{inner}: ...}}`"
        elif nested:
            outer, inner = nested[0].split(".", 1)
            hint = f"; did you mean {nested[0]!r}? (write `{outer}: {{{inner}: ...}}`)"
        elif close:
            hint = f"; did you mean {close[0]!r}?"
    return SpecError(source, shown, f"unknown key {key!r}{hint}", ", ".join(names))


def _check(field: Field, value: object, source: str, trusted: bool) -> SpecValue:
    key, kind = field.name, field.kind
    if kind == "flag":
        if not isinstance(value, bool):
            raise SpecError(source, key, f"must be true or false, got {value!r}", "true, false")
        return value
    if kind in ("int", "float", "seed"):
        if kind == "seed" and value is None:
            return None
        return _number(field, value, source)
    if kind == "choice":
        return _choice(field, value, source)
    if kind == "colour":
        return _colour(key, value, source)
    if kind in ("size", "margin"):
        return _canvas_text(key, value, source)
    if kind == "colours":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise SpecError(source, key, f"must be a list of two colours, got {value!r}",
                            'like ["#f4f4f4", "#c8c8c8"]')
        return [_colour(key, item, source) for item in value]
    # text-like kinds: an empty YAML value means the empty text
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise SpecError(source, key, f"must be text, got {value!r} (put it in quotes)")
    if kind == "suffix":
        # Letters, digits and - _ . + only: a suffix lands in every output name, where a right-to-left
        # override (U+202E), a control character or a slash would disguise or misplace the file.
        if len(value) > 64 or not all(c.isalnum() or c in "-_.+" for c in value) or not value.isprintable():
            raise SpecError(source, key, f"{shown(value)!r} cannot be part of a file name",
                            "up to 64 letters, digits, '-', '_', '.' or '+'")
    elif kind in ("path", "model"):
        if "\x00" in value or len(value) > 1024:
            raise SpecError(source, key, f"{value[:80]!r} is not a usable name")
        if key == "mask.model" and not value:
            raise SpecError(source, key, "must name a rembg model", "u2net, birefnet-general, ...")
        if kind == "path" and not trusted and value:
            _check_untrusted_path(value, source, key)
    return value


def _canvas_text(key: str, value: object, source: str) -> str:
    """canvas.size and canvas.margin, checked by the canvas's own parsers and kept as normalised text."""
    from bgwatch.pipeline import canvas

    if key == "canvas.margin" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = f"{value:g}"  # a bare number is pixels
    if value is None:
        value = ""
    if isinstance(value, int) and not isinstance(value, bool) and key == "canvas.size":
        raise SpecError(source, key, f"got the number {value}: YAML reads an unquoted ratio like 4:5 as a "
                        'number; write it in quotes, size: "4:5"', '"2000x2000" or "4:5"')
    if not isinstance(value, str):
        raise SpecError(source, key, f"must be text, got {value!r}")
    if key == "canvas.size":
        text = value.strip().lower().replace(" ", "").replace("×", "x")
        return "" if canvas.parse_size(text, 2000, source=source) is None else text
    canvas.parse_margin(value, source=source)
    return " ".join(value.replace(",", " ").split()).lower()


def _number(field: Field, value: object, source: str) -> int | float:
    key = field.name
    whole = field.kind in ("int", "seed")
    lo, hi = field.minimum, field.maximum
    allowed = f"{number_text(lo)} to {number_text(hi)}"
    if field.kind == "seed":
        allowed += ", or null for a random seed"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        noun = "a whole number" if whole else "a number"
        raise SpecError(source, key, f"must be {noun}, got {value!r}", allowed)
    if whole and isinstance(value, float) and not value.is_integer():
        raise SpecError(source, key, f"must be a whole number, got {value!r}", allowed)
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise SpecError(source, key, f"{value!r} is out of range", allowed)
    return int(value) if whole else float(value)


def _choice(field: Field, value: object, source: str) -> str:
    key = field.name
    if isinstance(value, str):
        text = _ALIASES.get(value.strip().lower(), value.strip().lower())
        if text in field.choices:
            return text
        if key == "mask.engine" and text in _mask_engine_names():
            return text
    choices = list(field.choices)
    if key == "mask.engine":
        choices = sorted(set(choices) | set(_mask_engine_names()), key=lambda n: (n != "auto", n))
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise SpecError(source, key, f"{value!r} is not allowed{hint}", ", ".join(choices))


def _mask_engine_names() -> list[str]:
    """Registered mask engines, from masking's registry when it is importable (imported lazily)."""
    try:
        from bgwatch.pipeline import masking
    except ImportError:
        return list(MASK_ENGINES)
    names = getattr(masking, "mask_engine_names", None)
    return ["auto", *names()] if callable(names) else list(MASK_ENGINES)


def _colour(key: str, value: object, source: str) -> str:
    if value is None:
        raise SpecError(source, key, 'is empty; in YAML a colour needs quotes, like "#ffffff" '
                        "(an unquoted # starts a comment)", "#rgb, #rrggbb")
    if not isinstance(value, str) or not _COLOUR.fullmatch(value.strip()):
        raise SpecError(source, key, f"{value!r} is not a colour", "#rgb, #rrggbb")
    digits = value.strip()[1:].lower()
    return "#" + ("".join(c * 2 for c in digits) if len(digits) == 3 else digits)


def _check_untrusted_path(value: str, source: str, key: str) -> None:
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or value.startswith("\\"):
        raise SpecError(source, key, f"{value!r} is an absolute path; sidecars and folder files may only "
                        "name files inside the inbox", "a path relative to this file")
    if ".." in re.split(r"[/\\]", value):
        raise SpecError(source, key, f"{value!r} leads out of its folder with '..'; sidecars and folder "
                        "files may only name files inside the inbox", "a path relative to this file")


def number_text(value: float | None) -> str:
    """A bound as people write it: 100, not 100.0."""
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)
