"""Explaining the JobSpec to people: `bgwatch explain` and the README's key reference, both generated from
the one schema in rules.py (FIELDS), so the docs cannot drift from the code.

    python -m bgwatch.reference --reference    # prints the README block
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from bgwatch.fields import FIELDS, Field, number_text
from bgwatch.rules import ResolvedSpec

REFERENCE_START = "<!-- spec-reference:start -->"
REFERENCE_END = "<!-- spec-reference:end -->"

_TYPES = {"choice": "one of", "flag": "true/false", "int": "whole number", "float": "number",
          "seed": "whole number or null", "colour": "colour", "colours": "list of 2 colours", "text": "text",
          "suffix": "text", "path": "path", "model": "model",
          "size": "text", "margin": "text or number"}


def format_explanation(resolved: ResolvedSpec) -> str:
    """`bgwatch explain`: every key, its resolved value and where that value came from."""
    rows = [(f"{key}: {_yaml_value(value)}", source) for key, value, source in resolved.describe()]
    width = max(len(text) for text, _ in rows if len(text) <= 48)
    return "\n".join(f"{text:{width}}  <- {source}" for text, source in rows)


def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"' if value == "" or value.startswith("#") else value
    return str(value)


def _allowed_text(field: Field) -> str:
    kind = field.kind
    if kind == "choice":
        return ", ".join(f"`{c}`" for c in field.choices)
    if kind in ("int", "float", "seed"):
        text = f"{number_text(field.minimum)}–{number_text(field.maximum)}"
        return text + ", or `null` (random)" if kind == "seed" else text
    return {
        "colour": "`#rgb` or `#rrggbb`",
        "colours": "two colours: from, to",
        "path": "relative to the file naming it; sidecars and folder files: inside the inbox",
        "model": "sidecars and folder files: the configured models and `allowed_models`",
        "suffix": "up to 64 characters, no slashes",
        "text": "any text",
        "flag": "`true`, `false`",
        "size": '`WIDTHxHEIGHT` (16–20000 px), `"W:H"` (1:10–10:1), or empty',
        "margin": "`40` or `40px`, `7.5%` (at most 45%); 1, 2 or 4 values (top right bottom left)",
    }[kind]


def reference_markdown() -> str:
    """The key reference table for the README, generated from FIELDS (so the two cannot drift)."""
    lines = ["| key | type | allowed | default | example | what it does |", "|---|---|---|---|---|---|"]
    for field in FIELDS:
        cells = [f"`{field.name}`", _TYPES[field.kind], _allowed_text(field),
                 f"`{_yaml_value(field.default)}`", f"`{_yaml_value(field.example)}`", field.help]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def reference_block() -> str:
    """reference_markdown() between the README markers, ready to paste."""
    return f"{REFERENCE_START}\n{reference_markdown()}{REFERENCE_END}\n"


def check_readme(readme_text: str) -> bool:
    """True when the README carries exactly the generated reference between the markers."""
    start, end = readme_text.find(REFERENCE_START), readme_text.find(REFERENCE_END)
    if start < 0 or end < start:
        return False
    return readme_text[start + len(REFERENCE_START):end].strip() == reference_markdown().strip()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bgwatch.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true", help="print the README key reference block")
    args = parser.parse_args(argv)
    if not args.reference:
        parser.print_help()
        return 2
    sys.stdout.write(reference_block())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
