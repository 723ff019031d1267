"""What someone who can write to a shared inbox must not be able to do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bgwatch.daemon import Daemon
from bgwatch.liveness import Heartbeat
from bgwatch.samples import write_samples
from tests.helpers import files_under, make_config


def test_a_huge_number_in_a_sidecar_fails_that_image_only(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    bad, good = write_samples(inbox, 2, size=(120, 90), seed=80)
    bad.with_suffix(".yaml").write_text("seed: " + "9" * 5000 + "\n")
    assert Daemon(config, once=True).run() == 1
    note = (inbox / "failed" / f"{bad.name}.error.txt").read_text()
    assert "ordinary size" in note
    assert bad.with_suffix(".yaml").name in files_under(inbox / "failed"), "the sidecar travels with it"
    assert files_under(config.inboxes[0].outbox) == [good.with_suffix(".png").name]
    assert not files_under(inbox / ".bgwatch" / "claimed")


def test_an_image_swapped_for_a_symlink_is_not_read_through(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    secret = write_samples(tmp_path / "private", 1, size=(120, 90), seed=81)[0]
    daemon = Daemon(config)
    link = inbox / "innocent.jpg"
    os.symlink(secret, link)
    daemon.intake.take(daemon.sites[config.inboxes[0].name], link)  # as if swapped after it was seen stable
    assert files_under(config.inboxes[0].outbox) == []
    note = (inbox / "failed" / "innocent.jpg.error.txt").read_text()
    assert "not a regular file" in note
    assert secret.exists()
    daemon.store.close()


def test_symlinked_work_folders_are_refused(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    outside = tmp_path / "outside"
    (inbox / ".bgwatch" / "heartbeats").mkdir(parents=True)
    outside.mkdir()
    target = outside / "precious.txt"
    target.write_text("keep me")
    # a planted link where the heartbeat's temp file or folder would go
    os.symlink(target, inbox / ".bgwatch" / "heartbeats" / ".ws1.123.tmp")
    assert Heartbeat(inbox, "ws1", "e1", 10).beat()
    assert target.read_text() == "keep me"
    # the heartbeats folder itself swapped for a link out of the inbox: refused, nothing written there
    os.unlink(inbox / ".bgwatch" / "heartbeats" / "ws1")
    os.unlink(inbox / ".bgwatch" / "heartbeats" / ".ws1.123.tmp")
    os.rmdir(inbox / ".bgwatch" / "heartbeats")
    os.symlink(outside, inbox / ".bgwatch" / "heartbeats")
    assert not Heartbeat(inbox, "ws1", "e1", 10).beat()
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_assets_are_never_taken_as_input(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    backdrop = write_samples(inbox / "_assets", 1, size=(120, 90), seed=82)[0]
    write_samples(inbox, 1, size=(120, 90), seed=83)
    assert Daemon(config, once=True).run() == 0
    assert backdrop.exists() and len(files_under(config.inboxes[0].outbox)) == 1


def test_names_not_utf8_near_the_limit_or_with_control_characters_are_processed(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    [sample] = write_samples(tmp_path / "src", 1, size=(120, 90), seed=84)
    odd = [os.fsencode(inbox) + b"/caf\xe9.jpg", os.fsencode(inbox) + b"/evil\x1b[2J\nname.jpg",
           os.fsencode(inbox) + b"/" + b"x" * 247 + b".jpg"]
    for name in odd:
        with open(name, "wb") as handle:
            handle.write(sample.read_bytes())
    with open(os.fsencode(inbox) + b"/" + b"y" * 247 + b".jpg", "wb") as handle:
        handle.write(b"not an image at all")
    assert Daemon(config, once=True).run() == 1  # the broken one fails; the others are done
    done = sorted(os.listdir(os.fsencode(inbox / "done")))
    assert done == sorted(os.path.basename(n) for n in odd)
    failed = sorted(os.listdir(os.fsencode(inbox / "failed")))
    assert len(failed) == 2 and any(f.endswith(b".error.txt") for f in failed), "the note fits the name limit"
    assert len(files_under(config.inboxes[0].outbox)) == 3
    assert Daemon(config, once=True).run() == 0, "and the daemon starts again"


def test_a_file_named_done_at_the_inbox_root_never_stops_the_daemon(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "done").write_text("someone's notes, not a folder")
    write_samples(inbox, 1, size=(120, 90), seed=85)
    Daemon(config, once=True).run()
    assert (inbox / "done").read_text() == "someone's notes, not a folder"
    assert not files_under(inbox / ".bgwatch" / "claimed")
    Daemon(config, once=True).run()  # starts again; the original waits where bgwatch left it
    (inbox / "done").unlink()
    assert Daemon(config, once=True).run() == 0
    assert len(files_under(inbox / "done")) == 1 and len(files_under(config.inboxes[0].outbox)) == 1


def test_every_file_not_taken_gets_a_word_and_once_exits_1(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox = config.inboxes[0].path
    [good] = write_samples(inbox, 1, size=(120, 90), seed=86)
    (inbox / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 64)
    (inbox / "notes.txt").write_text("call the client")
    os.symlink(good, inbox / "shortcut.jpg")
    os.mkfifo(inbox / "pipe.png")
    assert Daemon(config, once=True).run() == 1
    note = (inbox / "failed" / "anim.gif.error.txt").read_text()
    assert "GIF is not a format bgwatch reads" in note and "jpg" in note
    assert (inbox / "notes.txt").exists() and os.path.islink(inbox / "shortcut.jpg")
    assert files_under(config.inboxes[0].outbox) == [good.with_suffix(".png").name]


def test_output_suffix_takes_only_safe_characters() -> None:
    from bgwatch.errors import SpecError
    from bgwatch.rules import validate_fragment

    assert validate_fragment({"output": {"suffix": "_cutout-2"}}, "s.yaml", trusted=False)
    for bad in ("a\u202egnp", "x/y", "tab\there", "\x1b[31m"):
        with pytest.raises(SpecError, match="cannot be part of a file name"):
            validate_fragment({"output": {"suffix": bad}}, "s.yaml", trusted=False)


def test_validate_judges_a_sidecar_in_its_inbox_as_the_daemon_would(tmp_path: Path) -> None:
    from bgwatch.single import validate_paths

    config = make_config(tmp_path)  # a cleanup inbox: transparent PNGs
    inbox = config.inboxes[0].path
    inbox.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ninboxes:\n  - path: {inbox}\n    outbox: {tmp_path / 'out'}\n"
                   "    rules: {operation: cleanup, mode: transparent}\n")
    cases = {"gen.yaml": "operation: replace\nengine: sdxl\nprompt: a table\n",
             "model.yaml": "mask: {model: ../../etc/passwd}\n",
             "jpg.yaml": "output: {format: jpg}\n",
             "backdrop.yaml": "operation: replace\nengine: image\nbackground_image: missing.jpg\n",
             "big.yaml": "prompt: '" + "x" * 70_000 + "'\n",
             "fine.yaml": "mode: color\n"}
    for name, text in cases.items():
        (inbox / name).write_text(text)
    problems = validate_paths([inbox / n for n in cases], cfg)
    said = {p.name: " ".join(e) for p, e in problems.items()}
    assert "not an engine this inbox allows" in said["gen.yaml"]
    assert "not a model this inbox allows" in said["model.yaml"]
    assert "cannot hold a transparent background" in said["jpg.yaml"]
    assert "no such file" in said["backdrop.yaml"]
    assert "at most 65536" in said["big.yaml"]
    assert said["fine.yaml"] == ""


def test_an_original_that_could_not_be_filed_is_filed_by_the_running_daemon_once_it_can(tmp_path: Path) -> None:
    from tests.helpers import DaemonThread, wait_for

    config = make_config(tmp_path, watch={"lease_seconds": 2})
    inbox = config.inboxes[0].path
    (inbox / "done").write_text("someone's notes, not a folder")
    with DaemonThread(config) as daemon:
        write_samples(inbox, 1, size=(120, 90), seed=87)
        wait_for(lambda: len(daemon.results) == 1)
        assert daemon.results[0].state.value == "done" and "could not be filed" in daemon.results[0].error
        (inbox / "done").unlink()  # someone tidied up: the original is filed without a restart
        wait_for(lambda: len(files_under(inbox / "done")) == 1, timeout=30)
    assert not files_under(inbox / ".bgwatch" / "delivering")
