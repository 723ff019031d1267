"""Issue 20, items 8 and 11: what the share writes reaches the log and the notes as visible text, on one
line, and a note on the share names files relative to the inbox, never by a path on the server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from bgwatch.daemon import Daemon
from bgwatch.samples import write_samples
from bgwatch.text import shown
from tests.helpers import make_config

# Everything a terminal or a log reader would act on: line breaks, ESC and CSI sequences (C0 and C1),
# DEL, the Unicode line and paragraph separators and a right-to-left override.
CONTROLS = ("\n", "\r", "\x1b", "\x9b", "\x85", "\x7f", "\u2028", "\u2029", "\u202e", "\x00"[:0] or "\x07")


@pytest.fixture
def records() -> Iterator[list[str]]:
    """Every log message (the formatted message only, at every level) while the test runs."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="TRACE")
    yield lines
    logger.remove(sink)


def test_shown_renders_every_control_visibly_on_one_line() -> None:
    text = "a\nb\rc\x1b[2Jd\x9b31me\x85f\x7fg\u2028h\u202ei\x07j"
    out = shown(text)
    assert not any(c in out for c in CONTROLS)
    for escaped in ("\\n", "\\r", "\\x1b[2J", "\\x9b", "\\x85", "\\x7f", "\\u2028", "\\u202e", "\\x07"):
        assert escaped in out
    assert shown("café photo_01.jpg") == "café photo_01.jpg", "printable text is left alone"
    assert shown(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg", "a byte that is not UTF-8 is shown as \\xNN"


def test_names_and_share_values_reach_the_log_escaped_on_one_line(tmp_path: Path, records: list[str]) -> None:
    config = make_config(tmp_path, {"cleanup": {"rules": {"operation": "cleanup"}},
                                    "scene": {"rules": {"operation": "replace", "engine": "image"}}})
    inbox, scenes = config.inboxes[0].path, config.inboxes[1].path
    [sample] = write_samples(tmp_path / "src", 1, size=(96, 72), seed=71)
    forged = "\n2026-12-07 10:00:00.000 | INFO     | bgwatch.intake - admin.jpg: done\x1b[2K\r"
    names = {"good": f"ok{forged}\u2028.jpg", "broken": f"bad{forged}\x9b31m.jpg", "scene": f"sc{forged}.jpg"}
    (inbox / names["good"]).write_bytes(sample.read_bytes())
    (inbox / names["broken"]).write_bytes(b"\xff\xd8\xff" + b"\x1b[31m not a JPEG \n forged line")
    (scenes / names["scene"]).write_bytes(sample.read_bytes())
    # a sidecar naming a backdrop that is not there, with a forged line in the value it quotes back
    (scenes / names["scene"]).with_suffix(".yaml").write_text(f"background_image: \"x{forged}.jpg\"\n")
    (inbox / f"orphan{forged}.yaml").write_text("mode: color\n")
    assert Daemon(config, once=True).run() == 1
    assert any("done ->" in r for r in records) and any("failed" in r for r in records)
    shown_names = [r for r in records if "\\n2026-12-07 10:00:00.000" in r]
    assert len(shown_names) >= 4, "each name is printed, escaped"
    for record in records:
        bad = [c for c in CONTROLS if c in record]
        assert not bad, f"{bad} in the log line {record!r}"


def test_failure_notes_name_files_relative_to_the_inbox(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"cleanup": {"rules": {"operation": "cleanup"}},
                                    "scene": {"rules": {"operation": "replace", "engine": "image"}}})
    inbox, scenes = config.inboxes[0].path, config.inboxes[1].path
    (inbox / "shoot").mkdir()
    (inbox / "shoot" / "empty.jpg").write_bytes(b"")
    (inbox / "shoot" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 64)
    (inbox / "shoot" / "named.png").write_bytes(b"\xff\xd8\xff" + b"\x00" * 64)
    [sample] = write_samples(tmp_path / "src", 1, size=(96, 72), seed=72)
    (scenes / "shoot").mkdir()
    for name, sidecar in {"missing.jpg": "background_image: _assets/none.jpg\n",
                          "outside.jpg": "background_image: ../../secret.jpg\n",
                          "badkey.jpg": "colour: red\n"}.items():
        (scenes / "shoot" / name).write_bytes(sample.read_bytes())
        (scenes / "shoot" / name).with_suffix(".yaml").write_text(sidecar)
    (tmp_path / "secret.jpg").write_bytes(sample.read_bytes())
    assert Daemon(config, once=True).run() == 1
    notes = {p.name: p.read_text() for box in (inbox, scenes) for p in (box / "failed").rglob("*.error.txt")}
    assert len(notes) == 6, sorted(notes)
    for name, note in notes.items():
        assert str(tmp_path) not in note, f"{name} names a path on the server:\n{note}"
        assert "/.bgwatch/" not in note and ".bgwatch/claimed" not in note, note
    assert "shoot/empty.jpg" in notes["empty.jpg.error.txt"] or "empty.jpg" in notes["empty.jpg.error.txt"]
