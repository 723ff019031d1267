"""Sidecar timing and live folder rules, through the real daemon."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from bgwatch.samples import write_samples
from bgwatch.store import Store
from tests.helpers import DaemonThread, files_under, make_config, wait_for


def corner(path: Path) -> tuple[int, ...]:
    with Image.open(path) as img:
        return img.convert("RGBA").getpixel((1, 1))


def test_sidecar_before_the_image_steers_it(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    with DaemonThread(config) as daemon:
        (inbox / "shot-a.yaml").write_text("mode: color\nbackground_color: '#00ff00'\n")
        time.sleep(0.5)
        shot = write_samples(inbox, 1, size=(200, 160), seed=8)[0].rename(inbox / "shot-a.jpg")
        wait_for(lambda: len(daemon.results) == 1)
    assert corner(outbox / "shot-a.png") == (0, 255, 0, 255)
    assert files_under(inbox / "done") == ["shot-a.jpg", "shot-a.yaml"], "the sidecar travels with its image"
    assert not shot.exists()


def test_a_late_sidecar_never_re_renders_a_delivered_output_by_default(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    with DaemonThread(config) as daemon:
        write_samples(inbox, 1, size=(200, 160), seed=9)[0].rename(inbox / "late.jpg")
        wait_for(lambda: len(daemon.results) == 1)
        before = (outbox / "late.png").read_bytes()
        (inbox / "late.yaml").write_text("mode: color\nbackground_color: '#0000ff'\n")
        wait_for(lambda: (inbox / "failed" / "late.yaml.error.txt").exists(), timeout=30)
    assert "already processed" in (inbox / "failed" / "late.yaml.error.txt").read_text()
    assert (outbox / "late.png").read_bytes() == before and len(daemon.results) == 1


def test_sidecar_after_the_image_reprocesses_when_the_inbox_allows_it(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"cleanup": {"late_sidecars": "redo"}})
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    with DaemonThread(config) as daemon:
        write_samples(inbox, 1, size=(200, 160), seed=9)[0].rename(inbox / "late.jpg")
        wait_for(lambda: len(daemon.results) == 1)
        assert corner(outbox / "late.png")[3] == 0, "first run: transparent"
        (inbox / "late.yaml").write_text("mode: color\nbackground_color: '#0000ff'\n")
        wait_for(lambda: len(daemon.results) == 2, timeout=30)
        # the same sidecar again changes nothing: filed beside its image, no third run
        (inbox / "late.yaml").write_text("mode: color\nbackground_color: '#0000ff'\n")
        wait_for(lambda: "late.yaml" in files_under(inbox / "done") and not (inbox / "late.yaml").exists())
        time.sleep(1.5)
        assert len(daemon.results) == 2
    assert corner(outbox / "late.png") == (0, 0, 255, 255)
    assert files_under(outbox) == ["late.png"], "the output is replaced, not duplicated"
    store = Store(config.db_path)
    assert [r["status"] for r in store.history()] == ["done", "done"]


def test_require_sidecar_waits_then_fails_with_a_reason(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"strict": {"rules": {"require_sidecar": True}}})
    inbox = config.inboxes[0].path
    with DaemonThread(config) as daemon:
        write_samples(inbox, 2, size=(160, 120), seed=12)
        first, second = sorted(inbox.glob("*.jpg"))
        time.sleep(1.0)
        second.with_suffix(".yaml").write_text("mode: soften\n")
        wait_for(lambda: len(daemon.results) == 2, timeout=30)
    states = {r.output_path.name if r.output_path else r.error: r.state.value for r in daemon.results}
    assert states.get(second.with_suffix(".png").name) == "done"
    note = (inbox / "failed" / f"{first.name}.error.txt").read_text()
    assert "require_sidecar" in note and "no sidecar arrived" in note


def test_orphan_sidecar_is_filed_away_not_looped(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    with DaemonThread(config):
        (inbox / "ghost.yaml").write_text("mode: color\n")
        wait_for(lambda: (inbox / "failed" / "ghost.yaml.error.txt").exists(), timeout=30)
    assert "no image" in (inbox / "failed" / "ghost.yaml.error.txt").read_text()
    assert not (inbox / "ghost.yaml").exists()


def test_live_folder_rules_and_a_broken_folder_file_fails_only_its_images(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    (inbox / "red").mkdir()
    (inbox / "broken").mkdir()
    with DaemonThread(config) as daemon:
        (inbox / "red" / ".bgwatch.yaml").write_text("mode: color\nbackground_color: '#ff0000'\n")
        (inbox / "broken" / ".bgwatch.yaml").write_text("mode: blurry\n")
        time.sleep(0.5)
        write_samples(inbox / "red", 1, size=(160, 120), seed=13)
        write_samples(inbox / "broken", 1, size=(160, 120), seed=14)
        wait_for(lambda: len(daemon.results) == 2, timeout=30)
        # edit the rules: the next file follows them, no restart
        (inbox / "red" / ".bgwatch.yaml").write_text("mode: color\nbackground_color: '#ffff00'\n")
        time.sleep(0.5)
        later = write_samples(inbox / "red", 1, size=(160, 120), seed=15)[0]
        wait_for(lambda: len(daemon.results) == 3, timeout=30)
    assert corner(outbox / "red" / later.with_suffix(".png").name) == (255, 255, 0, 255)
    [note] = (inbox / "failed" / "broken").glob("*.error.txt")
    text = note.read_text()
    assert "mode" in text and "blurry" in text and "transparent, soften, color" in text
