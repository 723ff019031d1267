"""rules: one schema for every source, the five-layer cascade, the Trust rules, sidecars, the reference."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from bgwatch import reference, rules
from bgwatch.config import Config, InboxConfig, parse_config
from bgwatch.errors import ConfigError, SpecError
from bgwatch.jobs import DEFAULT_SDXL_MODEL, JobSpec, MaskSpec, OutputSpec
from bgwatch.rules import FIELDS, resolve, validate_fragment
from bgwatch.sidecars import find_sidecar, sidecar_images


def setup(tmp_path: Path, *, defaults: Any = None, rules_: Any = None, env: dict[str, str] | None = None,
          **top: Any) -> tuple[Config, InboxConfig]:
    """A config.yaml with two inboxes; tests use the second (inboxes[1]) at tmp_path/inbox."""
    (tmp_path / "inbox").mkdir(exist_ok=True)
    data = {
        "defaults": defaults,
        "inboxes": [{"path": "other", "outbox": "out-other"},
                    {"path": "inbox", "outbox": "out", "rules": rules_}],
        **top,
    }
    config = parse_config(data, source=tmp_path / "config.yaml", env=env or {})
    return config, config.inboxes[1]


def put(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def image(tmp_path: Path, rel: str = "a/b/photo.jpg") -> Path:
    path = tmp_path / "inbox" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 not really a jpeg")
    return path


def spec_error(data: Any, *, trusted: bool = False, source: str = "photo.yaml") -> SpecError:
    with pytest.raises(SpecError) as info:
        validate_fragment(data, source, trusted=trusted)
    return info.value


# ---------------------------------------------------------------- the schema


def test_fields_cover_every_jobspec_field_and_take_its_defaults() -> None:
    expected = {f.name for f in dataclasses.fields(JobSpec) if f.name not in rules.GROUPS}
    for group in rules.GROUPS:  # mask, output, canvas
        expected |= {f"{group}.{f.name}" for f in dataclasses.fields(getattr(JobSpec(), group))}
    assert {f.name for f in FIELDS} == expected
    spec = JobSpec()
    assert rules.FIELDS_BY_NAME["steps"].default == spec.steps
    assert rules.FIELDS_BY_NAME["mask.model"].default == spec.mask.model
    assert rules.FIELDS_BY_NAME["output.quality"].default == spec.output.quality
    assert rules.FIELDS_BY_NAME["gradient"].default == list(spec.gradient)


def nest(key: str, value: Any) -> dict[str, Any]:
    group, _, leaf = key.partition(".")
    return {group: {leaf: value}} if leaf else {key: value}


def test_every_example_and_default_passes_its_own_check() -> None:
    for field in FIELDS:
        for value in (field.example, field.default):
            assert validate_fragment(nest(field.name, value), "x", trusted=False) == nest(field.name, value)


def test_values_are_normalised_and_validation_is_idempotent() -> None:
    data = {"guidance_scale": 7, "steps": 30.0, "background_color": "#ABC", "gradient": ("#fff", "#000000"),
            "mode": "Colour", "output": {"format": "JPEG"}, "mask": None, "prompt": None, "seed": None}
    fragment = validate_fragment(data, "x", trusted=False)
    assert fragment == {"guidance_scale": 7.0, "steps": 30, "background_color": "#aabbcc",
                        "gradient": ["#ffffff", "#000000"], "mode": "color", "output": {"format": "jpg"},
                        "mask": {}, "prompt": "", "seed": None}
    assert isinstance(fragment["guidance_scale"], float)
    assert validate_fragment(fragment, "x", trusted=False) == fragment
    assert validate_fragment(None, "x", trusted=False) == {}


def test_unknown_key_suggests_the_nearest() -> None:
    error = spec_error({"promt": "a studio"})
    assert error.key == "promt"
    assert "did you mean 'prompt'?" in str(error)
    assert str(error).startswith("photo.yaml: promt: unknown key 'promt'")
    assert "negative_prompt" in error.allowed  # what is allowed is listed
    nested = spec_error({"mask": {"engin": "rembg"}})
    assert nested.key == "mask.engin" and "did you mean 'engine'?" in str(nested)


def test_unknown_key_that_belongs_in_a_group_says_where() -> None:
    error = spec_error({"format": "jpg"})
    assert "did you mean 'output.format'? (write `output: {format: ...}`)" in str(error)
    assert "write it nested: `mask: {engine: ...}`" in str(spec_error({"mask.engine": "rembg"}))
    assert "unknown key 7" in str(spec_error({7: "x"}))


@pytest.mark.parametrize(("data", "key", "words"), [
    ({"steps": "twenty"}, "steps", "must be a whole number, got 'twenty'"),
    ({"steps": 12.5}, "steps", "must be a whole number, got 12.5"),
    ({"steps": True}, "steps", "must be a whole number, got True"),
    ({"guidance_scale": "high"}, "guidance_scale", "must be a number"),
    ({"enhance_fg": "yes"}, "enhance_fg", "must be true or false, got 'yes'"),
    ({"denoise": 1}, "denoise", "must be true or false, got 1"),
    ({"prompt": 42}, "prompt", "must be text, got 42 (put it in quotes)"),
    ({"mask": ["rembg"]}, "mask", "must be a mapping"),
    ({"gradient": "#fff"}, "gradient", "must be a list of two colours"),
    ({"gradient": ["#fff", "#000", "#111"]}, "gradient", "must be a list of two colours"),
])
def test_wrong_types_are_refused(data: dict[str, Any], key: str, words: str) -> None:
    error = spec_error(data)
    assert error.key == key
    assert words in str(error)
    assert str(error).startswith(f"photo.yaml: {key}: ")


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("steps", 0, "1 to 100"), ("steps", 101, "1 to 100"),
    ("guidance_scale", 20.5, "0 to 20"), ("guidance_scale", -1, "0 to 20"),
    ("guidance_scale", float("nan"), "0 to 20"),
    ("seed", -1, "0 to 4294967295, or null for a random seed"),
    ("seed", 2**32, "0 to 4294967295, or null for a random seed"),
    ("output.quality", 0, "1 to 100"), ("output.quality", 101, "1 to 100"),
])
def test_out_of_range_values_are_refused(key: str, value: Any, allowed: str) -> None:
    error = spec_error(nest(key, value))
    assert error.key == key and "out of range" in error.problem and error.allowed == allowed
    assert f"{value!r} is out of range (allowed: {allowed})" in str(error)


def test_range_edges_are_accepted() -> None:
    fragment = validate_fragment({"steps": 100, "guidance_scale": 0, "seed": 2**32 - 1,
                                  "output": {"quality": 1}}, "x", trusted=False)
    assert fragment["seed"] == 2**32 - 1 and fragment["output"]["quality"] == 1


@pytest.mark.parametrize(("data", "key", "words", "allowed"), [
    ({"operation": "remove"}, "operation", "'remove' is not allowed", "cleanup, replace"),
    ({"mode": "blurry"}, "mode", "'blurry' is not allowed", "transparent, soften, color"),
    ({"engine": "sdxI"}, "engine", "did you mean 'sdxl'?", "sdxl, runway, image, color, gradient"),
    ({"gradient_direction": "diagonal"}, "gradient_direction", "not allowed", "vertical, horizontal, radial"),
    ({"background_fit": "stretch"}, "background_fit", "not allowed", "cover, contain"),
    ({"output": {"format": "gif"}}, "output.format", "'gif' is not allowed", "png, jpg, webp"),
    ({"mask": {"engine": "rembj"}}, "mask.engine", "did you mean 'rembg'?", None),
])
def test_bad_enum_values_are_refused(data: dict[str, Any], key: str, words: str, allowed: str | None) -> None:
    error = spec_error(data)
    assert error.key == key and words in str(error)
    if allowed is not None:
        assert error.allowed == allowed
    else:
        assert {"auto", "rembg", "classical"} <= set(error.allowed.split(", "))


@pytest.mark.parametrize("value", ["white", "#ggg", "#12345", "ffffff", 0xFFFFFF, ["#fff"]])
def test_bad_colours_are_refused(value: Any) -> None:
    error = spec_error({"background_color": value})
    assert error.key == "background_color" and "is not a colour" in error.problem
    assert error.allowed == "#rgb, #rrggbb"
    assert "is not a colour" in str(spec_error({"gradient": ["#fff", value]}))


def test_an_unquoted_hash_colour_gets_a_yaml_hint() -> None:
    error = spec_error({"background_color": None})  # `background_color: #fff` parses as null
    assert "needs quotes" in error.problem


@pytest.mark.parametrize("suffix", ["/../../etc/x", "a\\b", "tab\there", "x" * 65])
def test_output_suffix_must_be_part_of_a_file_name(suffix: str) -> None:
    error = spec_error({"output": {"suffix": suffix}}, trusted=True)
    assert error.key == "output.suffix" and "cannot be part of a file name" in error.problem


def test_untrusted_paths_are_checked_at_once_but_trusted_ones_are_free() -> None:
    for value, words in (("../backdrop.jpg", "'..'"), ("a/../../b.jpg", "'..'"), ("/etc/passwd", "absolute"),
                         ("C:\\x.jpg", "absolute"), ("\\\\server\\x.jpg", "absolute")):
        error = spec_error({"background_image": value})
        assert error.key == "background_image" and words in error.problem
        assert "inside the inbox" in error.problem
    assert validate_fragment({"background_image": "/srv/backdrops/oak.jpg"}, "c", trusted=True)
    assert validate_fragment({"background_image": "../backdrops/oak.jpg"}, "c", trusted=True)


def test_config_errors_come_from_the_same_schema(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"defaults": {"stpes": 3}}, source=tmp_path / "config.yaml", env={})
    assert str(info.value).startswith(f"{tmp_path / 'config.yaml'}: defaults: stpes: unknown key")
    assert "did you mean 'steps'?" in str(info.value)
    with pytest.raises(ConfigError, match=r"inboxes\[0\]\.rules: output.quality: 0 is out of range"):
        parse_config({"inboxes": [{"path": "i", "outbox": "o", "rules": {"output": {"quality": 0}}}]},
                     source=tmp_path / "config.yaml", env={})


def test_validate_fragment_all_reports_every_problem() -> None:
    data = {"promt": "x", "steps": 0, "mode": "color", "mask": {"engine": "nope", "model": "u2net"},
            "output": {"quality": "high"}}
    errors = rules.validate_fragment_all(data, "photo.yaml", trusted=False)
    assert [e.key for e in errors] == ["promt", "steps", "mask.engine", "output.quality"]
    assert all(str(e).startswith("photo.yaml: ") for e in errors)
    assert rules.validate_fragment_all({"mode": "color"}, "photo.yaml", trusted=False) == []
    assert [e.key for e in rules.validate_fragment_all(["a"], "photo.yaml", trusted=False)] == [""]


# ---------------------------------------------------------------- the cascade


def test_five_layers_in_order_with_their_sources(tmp_path: Path) -> None:
    config, inbox = setup(
        tmp_path,
        defaults={"steps": 1, "guidance_scale": 1, "seed": 1, "negative_prompt": "d", "prompt": "d"},
        rules_={"steps": 2, "guidance_scale": 2, "seed": 2, "negative_prompt": "r"},
    )
    root = tmp_path / "inbox"
    outer = put(root / ".bgwatch.yaml", "steps: 3\nguidance_scale: 3\nseed: 3\n")
    inner = put(root / "a" / "b" / ".bgwatch.yaml", "steps: 4\nguidance_scale: 4\n")
    sidecar = put(root / "a" / "b" / "photo.yaml", "steps: 5\n")
    resolved = resolve(image(tmp_path), inbox, config)
    spec, sources = resolved.spec, resolved.sources
    cfg = str(tmp_path / "config.yaml")
    got = (spec.steps, spec.guidance_scale, spec.seed, spec.negative_prompt, spec.prompt)
    assert got == (5, 4.0, 3, "r", "d")
    assert sources["steps"] == str(sidecar)
    assert sources["guidance_scale"] == str(inner)
    assert sources["seed"] == str(outer)
    assert sources["negative_prompt"] == f"{cfg}: inboxes[1].rules"
    assert sources["prompt"] == f"{cfg}: defaults"
    assert sources["mode"] == "built-in default" and spec.mode == JobSpec().mode
    assert set(sources) == {f.name for f in FIELDS}
    assert [k for k, _, _ in resolved.describe()] == [f.name for f in FIELDS]


def test_a_folder_file_beside_the_image_outranks_one_above_it_but_not_the_sidecar(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path)
    put(tmp_path / "inbox" / "a" / ".bgwatch.yaml", "mode: soften\noutput: {suffix: _a}\n")
    put(tmp_path / "inbox" / "a" / "b" / ".bgwatch.yaml", "mode: color\n")
    put(tmp_path / "inbox" / "a" / "b" / "photo.jpg.yml", "mode: transparent\n")
    deeper = resolve(image(tmp_path), inbox, config).spec
    assert (deeper.mode, deeper.output.suffix) == ("transparent", "_a")
    sibling = resolve(image(tmp_path, "a/other.jpg"), inbox, config).spec  # the b/ file does not apply
    assert sibling.mode == "soften"


def test_groups_merge_key_by_key(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path, defaults={"mask": {"engine": "classical"}, "output": {"format": "webp"}},
                          rules_={"output": {"quality": 70}})
    put(tmp_path / "inbox" / ".bgwatch.yaml", "mask: {post_process: false}\n")
    put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "mask: {alpha_matting: true}\noutput: {suffix: _x}\n")
    resolved = resolve(image(tmp_path), inbox, config)
    assert resolved.spec.mask == MaskSpec(engine="classical", model="u2net", post_process=False,
                                          alpha_matting=True)
    assert resolved.spec.output == OutputSpec(format="webp", quality=70, suffix="_x")
    assert resolved.sources["mask.model"] == "built-in default"
    assert resolved.sources["output.quality"].endswith("inboxes[1].rules")


def test_built_in_config_is_named_as_such(tmp_path: Path) -> None:
    inboxes = [{"path": str(tmp_path), "outbox": str(tmp_path.parent / "o")}]
    data = {"defaults": {"steps": 9}, "inboxes": inboxes}
    config = parse_config(data, None, env={})
    resolved = resolve(tmp_path / "photo.jpg", config.inboxes[0], config)
    assert resolved.sources["steps"] == "(built-in config): defaults"


def test_resolved_spec_is_frozen_and_gradient_a_tuple(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path, defaults={"gradient": ["#fff", "#000"]})
    resolved = resolve(image(tmp_path), inbox, config)
    assert resolved.spec.gradient == ("#ffffff", "#000000")
    resolved.spec.canonical_json()  # hashable/serialisable as the job key needs
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.spec = JobSpec()  # type: ignore[misc]


def test_a_claimed_image_resolves_from_its_original_path_and_explicit_sidecar(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path)
    put(tmp_path / "inbox" / "a" / ".bgwatch.yaml", "mode: soften\n")
    put(tmp_path / "inbox" / "a" / "back.jpg", "x")
    original = tmp_path / "inbox" / "a" / "photo.jpg"  # moved away: it no longer exists there
    claimed = put(tmp_path / "inbox" / ".bgwatch" / "claimed" / "host" / "a" / "photo.yaml",
                  "operation: replace\nengine: image\nbackground_image: back.jpg\n")
    resolved = resolve(original, inbox, config, sidecar=claimed)
    assert resolved.spec.mode == "soften"
    # named as the file the user dropped, not where the daemon moved it
    assert resolved.sources["engine"] == str(tmp_path / "inbox" / "a" / "photo.yaml")
    assert resolved.spec.background_image == str((tmp_path / "inbox" / "a" / "back.jpg").resolve())


def test_sidecar_none_ignores_a_sidecar_that_is_there(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path)
    put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "mode: color\n")
    assert resolve(image(tmp_path), inbox, config, sidecar=None).spec.mode == "transparent"
    assert resolve(image(tmp_path), inbox, config).spec.mode == "color"


def test_an_error_in_a_sidecar_names_the_sidecar(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path)
    sidecar = put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "steps: 500\n")
    with pytest.raises(SpecError) as info:
        resolve(image(tmp_path), inbox, config)
    assert str(info.value) == f"{sidecar}: steps: 500 is out of range (allowed: 1 to 100)"
    put(sidecar, "x: &a 1\ny: *a\n")
    with pytest.raises(SpecError, match="anchors/aliases") as info:
        resolve(image(tmp_path), inbox, config)
    assert info.value.source == str(sidecar)


def test_overrides_go_over_the_sidecar_and_are_trusted(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path)
    put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "mode: soften\nsteps: 4\n")
    overrides = {"mode": "color", "model": "/any/local/folder", "mask": {"engine": "classical"}}
    resolved = resolve(image(tmp_path), inbox, config, overrides=overrides)
    assert (resolved.spec.mode, resolved.spec.steps, resolved.spec.model) == ("color", 4, "/any/local/folder")
    assert resolved.sources["mode"] == resolved.sources["mask.engine"] == rules.OVERRIDES
    with pytest.raises(SpecError, match="did you mean 'prompt'") as info:
        resolve(image(tmp_path), inbox, config, overrides={"promt": "x"})
    assert info.value.source == rules.OVERRIDES


def test_format_explanation_lists_every_key_value_and_source(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path, rules_={"output": {"format": "webp"}})
    sidecar = put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "background_color: '#abc'\n")
    text = reference.format_explanation(resolve(image(tmp_path), inbox, config))
    lines = text.splitlines()
    assert len(lines) == len(FIELDS)
    row = next(line for line in lines if line.startswith("background_color: "))
    assert '"#aabbcc"' in row and row.endswith(f"<- {sidecar}")
    row = next(line for line in lines if line.startswith("output.format: "))
    assert "webp" in row and row.endswith("inboxes[1].rules")
    assert next(line for line in lines if line.startswith("seed: ")).split()[1] == "null"


def test_an_image_outside_the_inbox_is_refused(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path)
    with pytest.raises(SpecError, match="is not inside the inbox"):
        resolve(tmp_path / "elsewhere" / "photo.jpg", inbox, config)


# ---------------------------------------------------------------- checks after merging


@pytest.mark.parametrize("engine", ["sdxl", "runway"])
def test_generative_replace_needs_a_prompt(tmp_path: Path, engine: str) -> None:
    config, inbox = setup(tmp_path, defaults={"engine": engine, "operation": "replace"})
    folder_file = put(tmp_path / "inbox" / "a" / ".bgwatch.yaml", "operation: replace\nprompt: '  '\n")
    with pytest.raises(SpecError) as info:
        resolve(image(tmp_path), inbox, config)
    assert info.value.key == "prompt" and info.value.source == str(folder_file)
    assert f"engine {engine} needs a prompt" in str(info.value)
    put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "prompt: oak table\n")
    assert resolve(image(tmp_path), inbox, config).spec.prompt == "oak table"


def test_a_prompt_is_not_needed_for_cleanup_or_other_engines(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path, rules_={"operation": "replace", "engine": "gradient"})
    assert resolve(image(tmp_path), inbox, config).spec.engine == "gradient"


def test_engine_image_needs_a_background_image(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path, rules_={"operation": "replace", "engine": "image"})
    with pytest.raises(SpecError) as info:
        resolve(image(tmp_path), inbox, config)
    assert info.value.key == "background_image" and info.value.source.endswith("inboxes[1].rules")


def test_config_backdrop_is_relative_to_the_config_file(tmp_path: Path) -> None:
    put(tmp_path / "backdrops" / "oak.jpg", "x")
    config, inbox = setup(tmp_path, rules_={"operation": "replace", "engine": "image",
                                           "background_image": "backdrops/oak.jpg"})
    spec = resolve(image(tmp_path), inbox, config).spec
    assert spec.background_image == str(tmp_path / "backdrops" / "oak.jpg")
    config, inbox = setup(tmp_path, rules_={"operation": "replace", "engine": "image",
                                           "background_image": "backdrops/missing.jpg"})
    with pytest.raises(SpecError, match="no such file"):
        resolve(image(tmp_path), inbox, config)


def test_folder_file_backdrop_is_relative_to_its_folder(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path, rules_={"operation": "replace", "engine": "image"})
    put(tmp_path / "inbox" / "a" / "bg" / "oak.jpg", "x")
    put(tmp_path / "inbox" / "a" / ".bgwatch.yaml", "background_image: bg/oak.jpg\n")
    resolved = resolve(image(tmp_path), inbox, config)
    assert resolved.spec.background_image == str((tmp_path / "inbox" / "a" / "bg" / "oak.jpg").resolve())
    assert resolved.sources["background_image"] == str(tmp_path / "inbox" / "a" / ".bgwatch.yaml")


@pytest.mark.parametrize(("value", "words"), [("../../outside.jpg", "'..'"), ("/etc/hosts", "absolute path")])
def test_untrusted_backdrop_may_not_leave_the_inbox(tmp_path: Path, value: str, words: str) -> None:
    put(tmp_path / "outside.jpg", "x")
    config, inbox = setup(tmp_path)
    sidecar = put(tmp_path / "inbox" / "a" / "b" / "photo.yaml",
                  f"operation: replace\nengine: image\nbackground_image: {value}\n")
    with pytest.raises(SpecError) as info:
        resolve(image(tmp_path), inbox, config)
    assert info.value.source == str(sidecar) and info.value.key == "background_image"
    assert words in info.value.problem and value in info.value.problem


def test_untrusted_backdrop_may_not_escape_through_a_symlink(tmp_path: Path) -> None:
    secret = put(tmp_path / "secret" / "backdrop.jpg", "x")
    config, inbox = setup(tmp_path)
    (tmp_path / "inbox" / "a" / "b").mkdir(parents=True)
    (tmp_path / "inbox" / "a" / "b" / "link.jpg").symlink_to(secret)
    (tmp_path / "inbox" / "a" / "b" / "dirlink").symlink_to(secret.parent, target_is_directory=True)
    for value in ("link.jpg", "dirlink/backdrop.jpg"):
        put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", f"background_image: {value}\n")
        with pytest.raises(SpecError, match="outside the inbox through a symbolic link"):
            resolve(image(tmp_path), inbox, config)
    # a link that stays inside the inbox is fine
    inside = put(tmp_path / "inbox" / "shared" / "oak.jpg", "x")
    (tmp_path / "inbox" / "a" / "b" / "ok.jpg").symlink_to(inside)
    put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "background_image: ok.jpg\n")
    assert resolve(image(tmp_path), inbox, config).spec.background_image == str(inside.resolve())


def test_untrusted_backdrop_must_exist(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path)
    put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "background_image: nope.jpg\n")
    with pytest.raises(SpecError, match=r"'nope\.jpg': no such file"):
        resolve(image(tmp_path), inbox, config)


def test_sidecars_and_folder_files_that_link_outside_are_not_read(tmp_path: Path) -> None:
    outside = put(tmp_path / "elsewhere.yaml", "mode: color\n")
    config, inbox = setup(tmp_path)
    img = image(tmp_path)
    (img.parent / "photo.yaml").symlink_to(outside)
    with pytest.raises(SpecError, match="link to a file outside the inbox"):
        resolve(img, inbox, config)
    (img.parent / "photo.yaml").unlink()
    (tmp_path / "inbox" / ".bgwatch.yaml").symlink_to(outside)
    with pytest.raises(SpecError, match="link to a file outside the inbox") as info:
        resolve(img, inbox, config)
    assert info.value.source == str(tmp_path / "inbox" / ".bgwatch.yaml")


def test_untrusted_model_is_refused(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path)
    sidecar = put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "model: /home/someone/evil-pipeline\n")
    with pytest.raises(SpecError) as info:
        resolve(image(tmp_path), inbox, config)
    error = info.value
    assert error.source == str(sidecar) and error.key == "model"
    assert "'/home/someone/evil-pipeline' is not a model this inbox allows" in str(error)
    assert DEFAULT_SDXL_MODEL in error.allowed and "allowed_models" in error.problem
    put(sidecar, "mask: {model: ../../weights/x}\n")
    with pytest.raises(SpecError, match="is not a model this inbox allows") as info:
        resolve(image(tmp_path), inbox, config)
    assert info.value.key == "mask.model" and info.value.allowed == "u2net"


def test_allowed_and_configured_models_may_be_named_by_untrusted_sources(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path, rules_={"model": "stabilityai/sdxl-turbo"},
                          allowed_models=["/srv/models/lightning", "birefnet-general"],
                          env={"MODEL_ID": "segmind/SSD-1B"})
    sidecar = tmp_path / "inbox" / "a" / "b" / "photo.yaml"
    models = ("/srv/models/lightning", "stabilityai/sdxl-turbo", "segmind/SSD-1B", "")
    for model in models:
        put(sidecar, f"model: '{model}'\nmask: {{model: birefnet-general}}\n")
        spec = resolve(image(tmp_path), inbox, config).spec
        assert (spec.model, spec.mask.model) == (model, "birefnet-general")
    # where the operator configured a model, the built-in hub default (a 7 GB download) is not implied
    put(sidecar, f"model: '{DEFAULT_SDXL_MODEL}'\n")
    with pytest.raises(SpecError, match="not a model this inbox allows"):
        resolve(image(tmp_path), inbox, config)
    # the operator's own files may name anything
    config, inbox = setup(tmp_path, rules_={"model": "/anywhere/at/all", "mask": {"model": "my-net"}})
    put(sidecar, "steps: 3\n")
    assert resolve(image(tmp_path), inbox, config).spec.model == "/anywhere/at/all"


def test_an_overridden_untrusted_model_does_not_matter(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path, allowed_models=["ok-model"])
    put(tmp_path / "inbox" / ".bgwatch.yaml", "model: not-allowed\n")
    put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "model: ok-model\n")
    assert resolve(image(tmp_path), inbox, config).spec.model == "ok-model"


# ---------------------------------------------------------------- sidecars


@pytest.mark.parametrize("name", ["photo.yaml", "photo.yml", "photo.jpg.yaml", "photo.jpg.yml"])
def test_find_sidecar_each_name(tmp_path: Path, name: str) -> None:
    put(tmp_path / name, "mode: color\n")
    assert find_sidecar(tmp_path / "photo.jpg") == tmp_path / name
    assert find_sidecar(tmp_path / "other.jpg") is None


def test_two_sidecars_are_an_error_naming_both(tmp_path: Path) -> None:
    put(tmp_path / "photo.yaml", "")
    put(tmp_path / "photo.jpg.yaml", "")
    with pytest.raises(SpecError) as info:
        find_sidecar(tmp_path / "photo.jpg")
    assert str(tmp_path / "photo.yaml") in str(info.value)
    assert str(tmp_path / "photo.jpg.yaml") in str(info.value)
    assert "keep only one" in str(info.value)


def test_sidecar_images(tmp_path: Path) -> None:
    for name in ("photo.jpg", "photo.PNG", "photo.txt", "photograph.jpg", "shot.jpg"):
        put(tmp_path / name, "x")
    (tmp_path / "photo.webp").mkdir()
    assert sidecar_images(tmp_path / "photo.yaml") == [tmp_path / "photo.PNG", tmp_path / "photo.jpg"]
    assert sidecar_images(tmp_path / "photo.jpg.yml") == [tmp_path / "photo.jpg"]
    assert sidecar_images(tmp_path / "shot.yaml") == [tmp_path / "shot.jpg"]
    assert sidecar_images(tmp_path / "missing.yaml") == []
    assert sidecar_images(tmp_path / "nowhere" / "x.yaml") == []


# ---------------------------------------------------------------- the README reference


def test_reference_lists_every_key_with_default_and_example() -> None:
    table = reference.reference_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [f.name for f in FIELDS]
    steps = next(row for row in rows if row.startswith("| `steps`"))
    assert "1–100" in steps and "`20`" in steps
    assert "`cleanup`, `replace`" in table and "4294967295" in table


def test_check_readme_needs_the_exact_block() -> None:
    readme = f"# bgwatch\n\nintro\n\n{reference.reference_block()}\nmore text\n"
    assert reference.check_readme(readme)
    assert not reference.check_readme(readme.replace("1–100", "1–99"))
    assert not reference.check_readme("# bgwatch\nno reference here\n")


def test_reference_command_prints_the_block(capsys: pytest.CaptureFixture[str]) -> None:
    assert reference.main(["--reference"]) == 0
    out = capsys.readouterr().out
    assert out == reference.reference_block()
    assert out.startswith(reference.REFERENCE_START) and out.rstrip().endswith(reference.REFERENCE_END)


def test_rules_imports_no_heavy_library() -> None:
    import subprocess
    import sys

    code = ("import sys, bgwatch.rules, bgwatch.yamlsafe; "
            "print(sorted(m for m in ('torch', 'cv2', 'rembg', 'onnxruntime', 'diffusers', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONPATH": "."})
    assert out.stdout.strip() == "[]"


def test_untrusted_files_cannot_turn_on_generation_the_operator_did_not_configure(tmp_path: Path) -> None:
    from bgwatch.config import parse_config
    from bgwatch.errors import SpecError
    from bgwatch.rules import resolve

    config = parse_config({"inboxes": [{"path": "cut", "outbox": "out/cut", "rules": {"operation": "cleanup"}},
                                       {"path": "gen", "outbox": "out/gen",
                                        "rules": {"operation": "replace", "engine": "sdxl", "prompt": "x"}}]},
                          tmp_path / "config.yaml", env={})
    cut, gen = config.inboxes
    for inbox in (cut, gen):
        inbox.path.mkdir()
        (inbox.path / "a.jpg").write_bytes(b"x")
    (cut.path / "a.yaml").write_text("operation: replace\nprompt: a beach\n")
    with pytest.raises(SpecError) as info:
        resolve(cut.path / "a.jpg", cut, config)
    assert "not an engine this inbox allows" in str(info.value) and "gradient" in str(info.value)
    (cut.path / "a.yaml").write_text("operation: replace\nengine: gradient\n")
    assert resolve(cut.path / "a.jpg", cut, config).spec.engine == "gradient"
    (gen.path / "a.yaml").write_text("engine: runway\n")
    with pytest.raises(SpecError):
        resolve(gen.path / "a.jpg", gen, config)
    (gen.path / "a.yaml").write_text("prompt: a beach\nseed: 3\n")
    assert resolve(gen.path / "a.jpg", gen, config).spec.engine == "sdxl"


def test_jpg_for_a_transparent_cut_out_is_refused_naming_the_file_that_asked(tmp_path: Path) -> None:
    config, inbox = setup(tmp_path, rules_={"operation": "cleanup", "mode": "transparent"})
    sidecar = put(tmp_path / "inbox" / "a" / "b" / "photo.yaml", "output: {format: jpg}\n")
    with pytest.raises(SpecError) as info:
        resolve(image(tmp_path), inbox, config)
    assert info.value.source == str(sidecar) and info.value.key == "output.format"
    assert "png or webp" in str(info.value)
    put(sidecar, "output: {format: jpg}\nmode: color\n")
    assert resolve(image(tmp_path), inbox, config).spec.output.format == "jpg"
