"""The rules cascade: built-in defaults < config defaults < inbox rules < folder files < sidecar -> JobSpec.

Each source is checked against the schema in fields.py; here the layers are found, merged and judged
together. Sources are trusted (config.yaml) or not (folder files, sidecars: anyone who can write to the
share): their paths must stay inside the inbox, and their models and generative engines must be ones the
operator configured for that inbox.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final

from bgwatch.errors import SpecError
from bgwatch.fields import BUILT_IN as BUILT_IN
from bgwatch.fields import FIELDS as FIELDS
from bgwatch.fields import FIELDS_BY_NAME as FIELDS_BY_NAME
from bgwatch.fields import FOLDER_FILE as FOLDER_FILE
from bgwatch.fields import GROUPS as GROUPS
from bgwatch.fields import OVERRIDES as OVERRIDES
from bgwatch.fields import Field as Field
from bgwatch.fields import Fragment as Fragment
from bgwatch.fields import SpecValue as SpecValue
from bgwatch.fields import validate_fragment as validate_fragment
from bgwatch.fields import validate_fragment_all as validate_fragment_all
from bgwatch.jobs import (
    DEFAULT_RUNWAY_MODEL,
    DEFAULT_SDXL_MODEL,
    GENERATIVE_ENGINES,
    CanvasSpec,
    JobSpec,
    MaskSpec,
    OutputSpec,
)
from bgwatch.presets import PRESETS
from bgwatch.sidecars import find_sidecar
from bgwatch.yamlsafe import load_yaml_mapping

if TYPE_CHECKING:
    from bgwatch.config import Config, InboxConfig


@dataclass(frozen=True, slots=True)
class ResolvedSpec:
    """A fully resolved JobSpec and, for every dotted key, where its value came from."""

    spec: JobSpec
    sources: dict[str, str]

    def describe(self) -> list[tuple[str, object, str]]:
        """(key, value, source) for every key, in schema order: what `bgwatch explain` can print."""
        values = _flat_spec(self.spec)
        return [(f.name, values[f.name], self.sources[f.name]) for f in FIELDS]


# ---------------------------------------------------------------- resolving


class _Auto(enum.Enum):
    AUTO = "look the sidecar up beside the image"


AUTO: Final = _Auto.AUTO  # resolve(sidecar=AUTO): look the sidecar up beside the image


@dataclass(frozen=True, slots=True)
class _Layer:
    label: str
    data: Mapping[str, object]  # as read; validate_fragment checks it
    trusted: bool
    base: Path  # what relative paths in this layer are relative to


def resolve(image: Path, inbox: InboxConfig, config: Config, *, sidecar: Path | _Auto | None = AUTO,
            overrides: Mapping[str, object] | None = None) -> ResolvedSpec:
    """The JobSpec for `image` (its path as dropped, inside inbox.path; it may since have been claimed).

    Folder files are read from the inbox tree along the image's original path. `sidecar`: AUTO looks it
    up beside `image`; None means none; a Path (e.g. the claimed sidecar) is read from there but named
    in sources and errors as the file beside the image that the user dropped. `overrides` (`bgwatch
    process --set`, the operator's: trusted, paths relative to the working folder) go over everything.
    """
    image = Path(image)
    root = Path(os.path.abspath(inbox.path))
    rel = _relative(image, inbox, root)
    image_dir = root.joinpath(*rel.parent.parts)
    layers = _config_layers(inbox, config)
    parts = rel.parent.parts
    for depth in range(len(parts) + 1):  # the inbox root first, the image's own folder last
        folder = root.joinpath(*parts[:depth])
        if os.path.lexists(folder / FOLDER_FILE):
            label = str(Path(inbox.path).joinpath(*parts[:depth], FOLDER_FILE))
            layers.append(_Layer(label, _read_untrusted(folder / FOLDER_FILE, label, root), False, folder))
    if sidecar is AUTO:
        sidecar = find_sidecar(image)
    if sidecar is not None:
        sidecar = Path(sidecar)
        label = str(Path(inbox.path).joinpath(*rel.parent.parts, sidecar.name))
        layers.append(_Layer(label, _read_untrusted(sidecar, label, root), False, image_dir))
    if overrides:
        layers.append(_Layer(OVERRIDES, overrides, True, Path.cwd()))

    values = {f.name: f.default for f in FIELDS}
    sources = dict.fromkeys(values, BUILT_IN)
    order: dict[str, float] = {BUILT_IN: -1}
    origin: dict[str, _Layer] = {}
    for index, layer in enumerate(layers):
        order[layer.label] = index
        fragment = validate_fragment(layer.data, layer.label, trusted=layer.trusted)
        preset = fragment.get("preset")
        if isinstance(preset, str) and preset != "none":
            # A preset's keys go in at the level that names it, under that level's own keys.
            label = f"preset {preset} (named in {layer.label})"
            order[label] = index - 0.5
            for key, value in _flatten(validate_fragment(PRESETS[preset].keys, label, trusted=True)):
                values[key], sources[key], origin[key] = value, label, layer
        for key, value in _flatten(fragment):
            values[key], sources[key], origin[key] = value, layer.label, layer
    _check_merged(values, sources, order, origin, root, inbox, config)
    return ResolvedSpec(_build(values), sources)


def _relative(image: Path, inbox: InboxConfig, root: Path) -> PurePosixPath:
    real = Path(os.path.realpath(image)), Path(os.path.realpath(root))
    for a, b in ((Path(os.path.abspath(image)), root), real):
        try:
            return PurePosixPath(a.relative_to(b).as_posix())
        except ValueError:
            continue
    raise SpecError(image, "", f"is not inside the inbox {inbox.path}")


def _config_layers(inbox: InboxConfig, config: Config) -> list[_Layer]:
    name = str(config.source) if config.source is not None else "(built-in config)"
    base = config.source.parent.resolve() if config.source is not None else Path.cwd()
    index = next((i for i, ib in enumerate(config.inboxes) if ib is inbox), None)
    if index is None:
        index = next((i for i, ib in enumerate(config.inboxes) if ib.path == inbox.path), None)
    rules = f"{name}: inboxes[{index}].rules" if index is not None else f"{name}: rules of inbox {inbox.path}"
    return [_Layer(f"{name}: defaults", config.defaults, True, base), _Layer(rules, inbox.rules, True, base)]


def _read_untrusted(path: Path, label: str, root: Path) -> dict[str, object]:
    if not _inside(path, root):
        raise SpecError(label, "", "is a link to a file outside the inbox, which bgwatch refuses to read")
    try:
        return load_yaml_mapping(path, inside=root)  # checked again on the open file: no swap in between
    except SpecError as exc:
        raise SpecError(label, exc.key, exc.problem, exc.allowed) from None


def _inside(path: Path, root: Path) -> bool:
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return real != real_root and real_root in real.parents


def _flatten(fragment: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in fragment.items():
        if key in GROUPS:
            for sub, sub_value in value.items():
                yield f"{key}.{sub}", sub_value
        else:
            yield key, value


def _check_merged(values: dict[str, Any], sources: dict[str, str], order: dict[str, float],
                  origin: dict[str, _Layer], root: Path, inbox: InboxConfig, config: Config) -> None:
    def setter(*keys: str) -> str:  # the innermost file that set any of these keys
        return max((sources[k] for k in keys), key=lambda s: order.get(s, -1))

    replace, engine = values["operation"] == "replace", values["engine"]
    if replace and engine in GENERATIVE_ENGINES and not values["prompt"].strip():
        raise SpecError(setter("operation", "engine"), "prompt",
                        f"engine {engine} needs a prompt describing the scene to generate; add `prompt: ...` "
                        "here, in a folder file or in a sidecar")
    if values["output.format"] == "jpg" and not replace and values["mode"] == "transparent":
        raise SpecError(setter("output.format", "mode"), "output.format", "jpg cannot hold a transparent background",
                        "png or webp for mode transparent; jpg with mode soften or color, or with replace")
    if replace and engine == "image" and not values["background_image"]:
        raise SpecError(setter("operation", "engine"), "background_image",
                        "engine image needs a background_image (the backdrop file)")
    if values["background_image"]:
        values["background_image"] = _backdrop(values["background_image"], origin["background_image"], root,
                                               must_exist=replace and engine == "image")
    untrusted = [origin[k] for k in ("operation", "engine") if k in origin and not origin[k].trusted]
    if replace and engine in GENERATIVE_ENGINES and untrusted:
        engine_layer = untrusted[-1]
        # Generation costs GPU time or cloud credit: only the operator may turn it on for an inbox.
        configured = _operator_engines(inbox, config)
        if engine not in configured:
            raise SpecError(engine_layer.label, "engine",
                            f"{engine!r} is not an engine this inbox allows; sidecars and folder files may "
                            "name image, color, gradient, or a generative engine the inbox's rules already use",
                            ", ".join(sorted({"image", "color", "gradient"} | configured)))
    fallback, fallback_layer = values["fallback_engine"], origin.get("fallback_engine")
    if (replace and fallback in GENERATIVE_ENGINES and fallback_layer is not None and not fallback_layer.trusted
            and fallback not in _operator_engines(inbox, config)):
        raise SpecError(fallback_layer.label, "fallback_engine",
                        f"{fallback!r} is not an engine this inbox allows; sidecars and folder files may name "
                        "image, color, gradient, or a generative engine the inbox's rules already use",
                        ", ".join(sorted({"", "image", "color", "gradient"} | _operator_engines(inbox, config))))
    for key in ("model", "mask.model"):
        layer = origin.get(key)
        if layer is None or layer.trusted:
            continue
        allowed = _allowed_models(key, inbox, config)
        if values[key] not in allowed:
            raise SpecError(layer.label, key,
                            f"{values[key]!r} is not a model this inbox allows; sidecars and folder files "
                            "may only name configured models (an operator can add more under allowed_models "
                            "in config.yaml)", ", ".join(sorted(m for m in allowed if m)))


def _backdrop(value: str, layer: _Layer, root: Path, *, must_exist: bool) -> str:
    key = "background_image"
    if layer.trusted:
        path = Path(os.path.expanduser(value))
        path = Path(os.path.abspath(path if path.is_absolute() else layer.base / path))
        if must_exist and not path.is_file():
            raise SpecError(layer.label, key, f"{value!r}: no such file ({path})")
        return os.path.realpath(path)  # links resolved now; the loader refuses one that appears later
    path = layer.base / value
    if not _inside(path, root):
        raise SpecError(layer.label, key, f"{value!r} leads outside the inbox through a symbolic link; "
                        "sidecars and folder files may only name files inside the inbox")
    if not path.is_file():
        raise SpecError(layer.label, key, f"{value!r}: no such file next to this file ({path})")
    return os.path.realpath(path)


def _operator_engines(inbox: InboxConfig, config: Config) -> set[str]:
    """The generative engines the operator turned on for this inbox: the engine its own rules name, or,
    when its rules make it a replace inbox without naming one, the config's (or built-in) default."""
    if "engine" in inbox.rules:
        return {str(inbox.rules["engine"])}
    operation = inbox.rules.get("operation", config.defaults.get("operation", JobSpec().operation))
    return {str(config.defaults.get("engine", JobSpec().engine))} if operation == "replace" else set()


def _allowed_models(key: str, inbox: InboxConfig, config: Config) -> set[str]:
    """Models a sidecar may name: the ones the operator configured for this inbox (or, where none is, the
    built-in default), plus `allowed_models`. Never an arbitrary folder or hub id to download."""
    allowed = set(config.allowed_models)
    configured = {value for fragment in (config.defaults, inbox.rules) for k, value in _flatten(fragment)
                  if k == key}
    allowed |= configured
    if key == "mask.model":
        if not configured:
            allowed.add(MaskSpec().model)
    elif not configured:
        allowed |= {"", DEFAULT_SDXL_MODEL, DEFAULT_RUNWAY_MODEL}
    else:
        allowed.add("")  # "" means the configured one
    return allowed


def _build(values: Mapping[str, Any]) -> JobSpec:
    top = {k: v for k, v in values.items() if "." not in k}
    top["gradient"] = tuple(top["gradient"])
    mask = MaskSpec(**{k[5:]: v for k, v in values.items() if k.startswith("mask.")})
    output = OutputSpec(**{k[7:]: v for k, v in values.items() if k.startswith("output.")})
    canvas = CanvasSpec(**{k[7:]: v for k, v in values.items() if k.startswith("canvas.")})
    return JobSpec(**top, mask=mask, output=output, canvas=canvas)


def _flat_spec(spec: JobSpec) -> dict[str, object]:
    data = spec.to_dict()
    flat = {k: v for k, v in data.items() if k not in GROUPS}
    for group in GROUPS:
        flat.update({f"{group}.{k}": v for k, v in data[group].items()})
    return flat
