"""Start-up recovery (recovery.py) and the intake's endings (intake.py, outcomes.py), driven directly on real
folders and a real SQLite store, without starting the daemon's threads."""

from __future__ import annotations

from pathlib import Path

from bgwatch.daemon import Daemon
from bgwatch.jobs import JobState
from bgwatch.outputs import earlier
from bgwatch.recovery import recover
from bgwatch.store import Store
from tests.helpers import make_config


def _open_run(store: Store, inbox: Path, outbox: Path, rel: str, sha: str) -> int:
    run_id = store.add_run(key="k", inbox=str(inbox), rel_path=rel, source_path=str(
        inbox / ".bgwatch" / "claimed" / "testhost" / rel), input_sha256=sha, spec_json="{}", host="testhost",
        output_path=str(outbox / "shot.png"))
    store.start_run(run_id, "testhost")
    return run_id


def test_a_kill_right_after_delivery_is_recorded_done_at_the_restart(tmp_path: Path) -> None:
    """The delivery finished (output placed, original in done/) but the process died before its 'done' was
    recorded: the restart finds the run's output on the share and records 'done', not 'superseded'."""
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    daemon = Daemon(config)
    (inbox / "shot.jpg").write_bytes(b"the shot")
    import hashlib

    sha = hashlib.sha256(b"the shot").hexdigest()
    run_id = _open_run(daemon.store, inbox, outbox, "shot.jpg", sha)
    outbox.mkdir(parents=True)
    (outbox / "shot.png").write_bytes(b"someone else's output")  # so it lands on shot-2.png
    site = daemon.sites[config.inboxes[0].name]
    claim = site.custody.claim("shot.jpg")
    assert claim is not None
    settled = site.custody.deliver(claim, run_id, outbox, "shot.png", b"our output", "move", input_sha256=sha)
    assert settled is not None and settled.output == outbox / "shot-2.png"
    # ... killed here: the row is still 'running'
    restarted = Daemon(config)
    assert recover(restarted.intake, "testhost") == []
    row = restarted.store.get_run(run_id)
    assert row is not None and row.status == JobState.DONE.value and row.output_path == str(outbox / "shot-2.png")
    daemon.store.close()
    restarted.store.close()


def test_a_run_whose_file_was_taken_back_is_superseded_with_that_reason(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    daemon = Daemon(config)
    run_id = _open_run(daemon.store, inbox, outbox, "gone.jpg", "0" * 64)
    assert recover(daemon.intake, "testhost") == []
    row = daemon.store.get_run(run_id)
    assert row is not None and row.status == JobState.SUPERSEDED.value and "taken back" in row.error
    daemon.store.close()


def test_an_earlier_output_is_read_only_inside_the_outbox_and_never_through_a_link(tmp_path: Path) -> None:
    """A repeated drop reuses the earlier output only if it is still the file its owner record names:
    a link planted in its place (to a private key) is never read, nor is a file outside the outbox."""
    config = make_config(tmp_path)
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    daemon = Daemon(config)
    site = daemon.sites[config.inboxes[0].name]
    (inbox / "a.jpg").write_bytes(b"a")
    claim = site.custody.claim("a.jpg")
    assert claim is not None
    outbox.mkdir(parents=True)
    site.custody.deliver(claim, 1, outbox, "a.png", b"the earlier output", "move")
    assert earlier(site.custody.outputs, outbox, outbox / "a.png") == b"the earlier output"
    secret = tmp_path / "id_rsa"
    secret.write_bytes(b"PRIVATE KEY")
    (outbox / "a.png").unlink()
    (outbox / "a.png").symlink_to(secret)
    assert earlier(site.custody.outputs, outbox, outbox / "a.png") is None
    assert earlier(site.custody.outputs, outbox, secret) is None
    (outbox / "a.png").unlink()
    (outbox / "a.png").write_bytes(b"replaced by hand")
    assert earlier(site.custody.outputs, outbox, outbox / "a.png") is None
    daemon.store.close()
