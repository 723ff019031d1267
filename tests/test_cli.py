from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bgwatch.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_has_help_and_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = subcommands()
    assert {"run", "process", "status", "history", "retry", "validate", "explain", "cache", "models"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description, f"`bgwatch {name}` has no help"
        assert f"bgwatch {name}" in readme, f"README does not mention `bgwatch {name}`"


def test_help_imports_no_heavy_library() -> None:
    code = ("import sys, bgwatch.cli; bgwatch.cli.build_parser().format_help();"
            "heavy = [m for m in ('torch', 'diffusers', 'rembg', 'onnxruntime', 'cv2', 'numpy', 'PIL', "
            "'transformers', 'sqlite_utils', 'watchdog') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_help_answers() -> None:
    proc = subprocess.run([sys.executable, "-m", "bgwatch", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "run" in proc.stdout and "process" in proc.stdout


def test_readme_carries_the_generated_jobspec_reference() -> None:
    from bgwatch import reference

    assert reference.check_readme((ROOT / "README.md").read_text()), (
        "README's JobSpec reference differs from the schema: paste `python -m bgwatch.reference --reference`")
