"""`bgwatch history`'s compliance marks (issue 20): an output is read through descriptors below the
configured folders, so a folder another share user linked into the outbox is refused, never followed to
the file it points to (`report` already did so; history, table and JSON, did not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bgwatch import cli
from bgwatch.jobs import JobState
from bgwatch.store import Store
from tests.test_presets import product_on_white

LINK = """
import os, sys
os.symlink(sys.argv[1], sys.argv[2])
"""


def test_history_marks_follow_no_link_planted_in_the_outbox(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unprivileged import as_nobody, open_to_all, shared_root

    with shared_root() as share:
        inbox, outbox, private = share / "inbox", share / "outbox", share / "private"
        for folder in (inbox, outbox, private / "album"):
            folder.mkdir(parents=True)
        # A file that meets amazon, where the share's users cannot read it ...
        (private / "album" / "shot.jpg").write_bytes(product_on_white())
        private.chmod(0o700)
        open_to_all(outbox)
        # ... and a folder in the outbox that another user made a link to it.
        proc = as_nobody(LINK, str(private / "album"), str(outbox / "album"))
        assert proc.returncode == 0, proc.stderr
        config_file = tmp_path / "config.yaml"
        config_file.write_text(json.dumps({"state_dir": str(tmp_path / "state"), "host": "ws1",
                                           "inboxes": [{"path": str(inbox), "outbox": str(outbox)}]}))
        store = Store(tmp_path / "state" / "bgwatch.db")
        run = store.add_run(key="k1", inbox=str(inbox), rel_path="album/shot.jpg", source_path="",
                            input_sha256="ab", spec_json=json.dumps({"preset": "amazon"}), host="ws1")
        store.start_run(run, "ws1")
        store.finish_run(run, JobState.DONE, output_path=str(outbox / "album" / "shot.jpg"), mask_engine="classical")
        store.close()

        assert cli.main(["history", "-c", str(config_file)]) == 0
        table = capsys.readouterr().out
        assert cli.main(["history", "--json", "-c", str(config_file)]) == 0
        [record] = json.loads(capsys.readouterr().out)
    assert "amazon: NOT output unreadable" in table and "symbolic link" in table, table
    assert record["compliance"]["ok"] is False
    assert [c["name"] for c in record["compliance"]["checks"]] == ["output"], "no mark read the linked file"


def test_report_says_on_the_console_how_many_outputs_meet_their_preset(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    (outbox / "good.jpg").write_bytes(product_on_white())
    (outbox / "small.jpg").write_bytes(product_on_white(size=800, side=680))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps({"state_dir": str(tmp_path / "state"), "host": "ws1",
                                       "inboxes": [{"path": str(inbox), "outbox": str(outbox)}]}))
    store = Store(tmp_path / "state" / "bgwatch.db")
    for n, (name, preset) in enumerate([("good.jpg", "amazon"), ("small.jpg", "amazon"), ("plain.jpg", "none")]):
        run = store.add_run(key=f"k{n}", inbox=str(inbox), rel_path=name, source_path="", input_sha256="ab",
                            spec_json=json.dumps({"preset": preset}), host="ws1")
        store.start_run(run, "ws1")
        store.finish_run(run, JobState.DONE, output_path=str(outbox / name), mask_engine="classical")
    store.close()
    page = tmp_path / "report.html"
    assert cli.main(["report", "-c", str(config_file), "-o", str(page)]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{page}: 3 run(s); 1 of 2 output(s) meet their preset", line
    assert "1 of 2 output(s) meet their preset" in page.read_text(), "the page says the same"
