"""Presets (issue 19): valid bundles, their place in the cascade, and outputs marked against them in the
report (text, JSON and HTML)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bgwatch import compliance, htmlreport, report, rules
from bgwatch.errors import SpecError
from bgwatch.jobs import OutputSpec
from bgwatch.pipeline import canvas, imageio
from bgwatch.presets import PRESETS
from tests.helpers import make_config

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_its_marks_match_its_keys(tmp_path: Path, name: str) -> None:
    preset = PRESETS[name]
    config = make_config(tmp_path, {"shop": {"rules": {"preset": name}}})
    image = config.inboxes[0].path / "a.jpg"
    image.write_bytes(b"\xff\xd8")
    spec = rules.resolve(image, config.inboxes[0], config).spec
    assert spec.preset == name
    assert canvas.parse_size(spec.canvas.size, spec.canvas.long_side) == preset.size
    assert spec.output.format == preset.format and spec.canvas.position == preset.position
    assert spec.canvas.min_fill < preset.fill < spec.canvas.max_fill
    assert spec.metadata == "web" and spec.canvas.trim
    if preset.background is not None:
        assert spec.background_color == "#{:02x}{:02x}{:02x}".format(*preset.background)


def test_readme_documents_every_preset() -> None:
    text = README.read_text()
    section = text[text.index("## Marketplace-ready outputs"):]
    section = section[: section.index("\n## ", 5)]
    for name, preset in PRESETS.items():
        assert f"`{name}`" in section, f"README's Marketplace-ready outputs section lacks preset {name}"
        assert f"{preset.size[0]}x{preset.size[1]}" in section


def test_a_preset_sits_under_its_own_levels_keys_and_over_earlier_ones(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"shop": {"rules": {"output": {"quality": 70}, "mode": "soften"}}})
    inbox = config.inboxes[0]
    image = inbox.path / "cups" / "mug.jpg"
    image.parent.mkdir()
    image.write_bytes(b"\xff\xd8")
    (inbox.path / "cups" / ".bgwatch.yaml").write_text("preset: amazon\ncanvas: {margin: '10%'}\n")
    (inbox.path / "cups" / "mug.yaml").write_text("canvas: {position: bottom}\n")
    resolved = rules.resolve(image, inbox, config)
    spec, sources = resolved.spec, resolved.sources
    assert spec.output.quality == 95 and spec.mode == "color"  # the later preset beats the inbox's keys
    assert spec.canvas.margin == "10%"  # its own level's key beats it
    assert spec.canvas.position == "bottom"  # and so does a later level
    assert spec.canvas.size == "2000x2000"
    folder_file = sources["canvas.margin"]
    assert folder_file.endswith("cups/.bgwatch.yaml")
    assert sources["output.quality"] == f"preset amazon (named in {folder_file})"
    from bgwatch.reference import format_explanation

    assert "canvas.size: 2000x2000" in format_explanation(resolved)


def test_an_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(SpecError) as info:
        rules.validate_fragment({"preset": "amazn"}, "photo.yaml", trusted=False)
    assert "did you mean 'amazon'" in str(info.value) and "square-white" in str(info.value)


# ---------------------------------------------------------------- compliance marks


def product_on_white(size: int = 2000, side: int = 1700, *, quality: int = 95, pure: bool = True,
                     fmt: str = "jpg") -> bytes:
    image = np.full((size, size, 3), 255, np.uint8)
    top = (size - side) // 2
    image[top : top + side, top : top + side] = (28, 52, 112)
    image[top + side // 8 : top + side // 4, top + side // 6 : top + side // 2] = (226, 186, 38)  # a label
    return imageio.encode(image, OutputSpec(format=fmt, quality=quality), pure_background=pure)


def test_a_conforming_output_meets_amazon(tmp_path: Path) -> None:
    path = tmp_path / "ok.jpg"
    path.write_bytes(product_on_white())
    marked = compliance.check_file(path, PRESETS["amazon"])
    assert marked.ok, marked.summary()
    assert [c.name for c in marked.checks] == ["size", "format", "profile", "fill", "position", "background"]


def test_each_way_of_missing_the_preset_is_named(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    small.write_bytes(product_on_white(1000, 600, fmt="png"))
    failed = {c.name: c for c in compliance.check_file(small, PRESETS["amazon"]).checks if not c.ok}
    assert set(failed) == {"size", "format", "fill"}
    assert failed["fill"].found == "60.0%" and failed["size"].wanted == "2000x2000"
    kept = tmp_path / "kept.jpg"
    kept.write_bytes(product_on_white(quality=85, pure=True))
    assert compliance.check_file(kept, PRESETS["amazon"]).ok


@pytest.mark.parametrize(("pure", "bleeds"), [(False, True), (True, False)])
def test_a_pure_background_jpeg_keeps_its_colour_outside_the_subjects_blocks(pure: bool, bleeds: bool) -> None:
    # 4:2:0 colour (a JPEG below quality 90 without pure_background) bleeds past the 8x8 blocks the
    # product touches; 4:4:4 keeps every block without a product pixel exactly white.
    with Image.open(io.BytesIO(product_on_white(quality=85, pure=pure))) as im:
        pixels = np.asarray(im)
    top, side = 150, 1700
    blocks = np.zeros((250, 250), bool)
    blocks[top // 8 : -(-(top + side) // 8), top // 8 : -(-(top + side) // 8)] = True
    outside = ~np.repeat(np.repeat(blocks, 8, 0), 8, 1)
    assert bool((pixels[outside] != 255).any()) is bleeds


def test_a_stray_off_white_pixel_far_from_the_product_fails_purity() -> None:
    with Image.open(io.BytesIO(product_on_white())) as im:
        pixels = np.array(im)
    pixels[20, 20] = (252, 252, 252)
    checks = {c.name: c for c in compliance.image_checks(pixels, PRESETS["amazon"])}
    assert not checks["background"].ok and checks["background"].found.startswith("1 px")


def run_row(tmp_path: Path, preset: str, data: bytes, status: str = "done") -> dict[str, Any]:
    output = tmp_path / "out" / "shot.jpg"
    output.parent.mkdir(exist_ok=True)
    output.write_bytes(data)
    return {"id": 7, "status": status, "inbox": str(tmp_path / "inbox" / "shop"), "rel_path": "shot.jpg",
            "output_path": str(output), "spec_json": json.dumps({"preset": preset}), "created_at": 1.0,
            "started_at": 1.0, "finished_at": 2.0, "timings_json": "{}", "mask_engine": "classical",
            "bg_engine": "", "error": ""}


def test_history_json_and_the_html_report_mark_outputs_against_their_preset(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = run_row(tmp_path, "amazon", product_on_white())
    report.print_history([good], roots=[tmp_path])
    assert "[amazon: ok]" in capsys.readouterr().out
    record = report.run_record(good, roots=[tmp_path])
    assert record["compliance"]["ok"] is True and record["compliance"]["preset"] == "amazon"
    plain = run_row(tmp_path, "none", product_on_white())
    assert "compliance" not in report.run_record(plain, roots=[tmp_path])
    page = htmlreport.render([good])
    assert 'data-compliance="ok"' in page and "1 of 1 output(s) meet their preset" in page
    shopify = run_row(tmp_path, "shopify", product_on_white())  # 2000 px, centred: not shopify's
    page = htmlreport.render([shopify])
    assert 'data-compliance="not"' in page and "✗ size 2000x2000 (wanted 2048x2048)" in page


def test_the_http_api_takes_a_preset_and_canvas_keys_like_a_sidecar(tmp_path: Path) -> None:
    from bgwatch.apischema import form_schema
    from bgwatch.httpforms import form_fragment

    fragment = form_fragment("cleanup", {"preset": "amazon", "margin": "5%", "metadata": "strip"})
    config = make_config(tmp_path)
    image = config.inboxes[0].path / "upload.jpg"
    image.write_bytes(b"\xff\xd8")
    spec = rules.resolve(image, config.inboxes[0], config, sidecar=None, overrides=fragment).spec
    assert (spec.preset, spec.canvas.size, spec.canvas.margin, spec.metadata) == ("amazon", "2000x2000", "5%", "strip")
    with pytest.raises(SpecError, match=r"canvas\.size.*not a canvas size"):
        form_fragment("replace", {"canvas_size": "huge"})
    properties = form_schema("replace")["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert properties["preset"]["enum"] == ["none", *PRESETS]
