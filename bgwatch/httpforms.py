"""The API's form fields: each one a JobSpec key (checked by rules.py as a sidecar's would be), with the
original service's defaults where they differ from bgwatch's; and the client's file name made safe."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bgwatch import rules
from bgwatch.errors import SpecError

REQUEST = "request"  # where a bad parameter came from, in its message (a sidecar's would name the file)


@dataclass(frozen=True, slots=True)
class FormField:
    """One form field of an endpoint: the JobSpec key it sets, and the API's default where the original
    service's differs from bgwatch's (enhance_fg: true)."""

    name: str
    key: str
    default: object = None

    @property
    def spec_field(self) -> rules.Field:
        return rules.FIELDS_BY_NAME[self.key]


CLEANUP_FORM: tuple[FormField, ...] = (
    FormField("mode", "mode"),
    FormField("background_color", "background_color"),
    FormField("enhance_fg", "enhance_fg", True),
    FormField("denoise", "denoise"),
    FormField("blur_radius", "blur_radius"),
    FormField("desaturate_pct", "desaturate_pct"),
    FormField("format", "output.format"),
)
REPLACE_FORM: tuple[FormField, ...] = (
    FormField("prompt", "prompt"),
    FormField("negative_prompt", "negative_prompt"),
    FormField("steps", "steps"),
    FormField("guidance_scale", "guidance_scale"),
    FormField("seed", "seed"),
    FormField("enhance_fg", "enhance_fg", True),
    FormField("match_colors", "match_colors"),
    FormField("feather_edges", "feather_edges"),
    FormField("engine", "engine"),
    FormField("background_color", "background_color"),
    FormField("gradient", "gradient"),
    FormField("gradient_direction", "gradient_direction"),
    FormField("shadow", "shadow"),
    FormField("fallback_engine", "fallback_engine"),
    FormField("format", "output.format"),
)
# Marketplace-ready outputs (presets.py, pipeline/canvas.py): the same keys for both endpoints.
CANVAS_FORM = (
    FormField("preset", "preset"),
    FormField("metadata", "metadata"),
    FormField("canvas_size", "canvas.size"),
    FormField("margin", "canvas.margin"),
    FormField("position", "canvas.position"),
    FormField("trim", "canvas.trim"),
    FormField("upscale", "canvas.upscale"),
)
CLEANUP_FORM += CANVAS_FORM
REPLACE_FORM += CANVAS_FORM
FORMS: dict[str, tuple[FormField, ...]] = {"cleanup": CLEANUP_FORM, "replace": REPLACE_FORM}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _typed(form_field: FormField, text: str) -> object:
    """A form value as the JobSpec schema wants it; what does not parse is passed on as text, so that
    rules.py refuses it with the message a sidecar would get."""
    kind = form_field.spec_field.kind
    value = text.strip()
    if kind == "flag":
        lowered = value.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else text
    if kind == "seed" and value.lower() in ("", "null", "none", "random"):
        return None
    if kind in ("int", "seed", "float"):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                continue
        return text
    if kind == "colours":
        return [part.strip() for part in value.split(",")] if value else text
    return text


def form_fragment(operation: str, fields: Mapping[str, str]) -> rules.Fragment:
    """The request's form fields as a checked JobSpec fragment (SpecError names `request` and the key)."""
    form = {f.name: f for f in FORMS[operation]}
    data: dict[str, Any] = {"operation": operation}
    for name, text in fields.items():
        form_field = form.get(name)
        if form_field is None:
            raise SpecError(REQUEST, name, "unknown form field", ", ".join(["file", *form]))
        _put_key(data, form_field.key, _typed(form_field, text))
    for form_field in form.values():
        if form_field.name not in fields and form_field.default is not None:
            _put_key(data, form_field.key, form_field.default)
    return rules.validate_fragment(data, REQUEST, trusted=False)


def _put_key(data: dict[str, Any], key: str, value: object) -> None:
    group, dot, name = key.partition(".")
    if dot:
        data.setdefault(group, {})[name] = value
    else:
        data[key] = value


def safe_upload_name(name: str | None) -> str:
    """The client's file name, without folders or control characters (used in messages and history)."""
    base = re.split(r"[/\\]", name or "")[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    if not base or base.startswith("."):
        base = "upload" + (base if base.startswith(".") and "." not in base[1:] else "")
    stem, suffix = os.path.splitext(base)
    suffix = suffix if len(suffix.encode()) <= 16 else ""
    while len((stem + suffix).encode()) > 200:  # a file name's limit is in bytes
        stem = stem[:-1]
    return (stem or "upload") + suffix
