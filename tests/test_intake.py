"""The intake driven directly (intake.py, runs.py, outcomes.py): a real inbox, a real SQLite store, no
watcher thread and no workers — jobs handed to `submit` are collected, outcomes put on the queue by hand."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bgwatch import runs
from bgwatch.custody import Claim
from bgwatch.daemon import Daemon
from bgwatch.intake import Intake
from bgwatch.jobs import Job, JobState
from bgwatch.samples import write_samples
from tests.helpers import make_config


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Intake, list[Job], Daemon]:
    config = make_config(tmp_path)
    daemon = Daemon(config)  # its sites (custody, heartbeat) and store; no thread is started
    jobs: list[Job] = []
    intake = Intake(config, daemon.store, daemon.sites, jobs.append)
    for site in daemon.sites.values():
        site.heartbeat.beat()
    return intake, jobs, daemon


def test_take_records_the_run_with_the_output_name_it_wants_and_an_opaque_ticket(
        setup: tuple[Intake, list[Job], Daemon]) -> None:
    intake, jobs, daemon = setup
    site = next(iter(daemon.sites.values()))
    [shot] = write_samples(site.inbox.path / "sub", 1, size=(64, 64), seed=1)
    run_id = intake.take(site, shot)
    assert run_id is not None and [j.run_id for j in jobs] == [run_id]
    job = jobs[0]
    assert isinstance(job.ticket, Claim) and job.root == site.inbox.path and job.output_rel == f"sub/{shot.stem}.png"
    row = daemon.store.get_run(run_id)
    assert row is not None and row.status == "queued" and row.output_path == str(site.inbox.outbox / job.output_rel)
    # a file another host took meanwhile: no run, no error
    assert intake.take(site, site.inbox.path / "sub" / "gone.jpg") is None
    daemon.store.close()


def test_outcomes_are_recorded_in_order_and_only_the_ledger_writes(setup: tuple[Intake, list[Job], Daemon]) -> None:
    intake, _, daemon = setup
    site = next(iter(daemon.sites.values()))
    [shot] = write_samples(site.inbox.path, 1, size=(64, 64), seed=2)
    run_id = intake.take(site, shot)
    assert run_id is not None
    from bgwatch.outcomes import Started

    intake.outcomes.put(Started(run_id, 123.0))
    intake.outcomes.put(runs.undone(run_id, "its output is not in the outbox"))
    intake.apply_outcomes()
    row = daemon.store.get_run(run_id)
    assert row is not None and row.status == JobState.SUPERSEDED.value and row.started_at == 123.0
    assert "its delivery was undone (its output is not in the outbox)" in row.error
    assert run_id not in intake.inflight
    daemon.store.close()


def test_a_store_that_cannot_record_pauses_claiming_and_strands_nothing(setup: tuple[Intake, list[Job], Daemon],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full state disk: the run cannot be added; the file goes back to the inbox (not left claimed, no
    'queued' row), and claiming pauses instead of trying again every tick."""
    intake, jobs, daemon = setup
    site = next(iter(daemon.sites.values()))
    [shot] = write_samples(site.inbox.path, 1, size=(64, 64), seed=3)

    def full(**_kwargs: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(intake.ledger, "add", full)
    assert intake.take(site, shot) is None
    assert shot.exists() and not list((site.inbox.path / ".bgwatch" / "claimed").rglob("*.jpg"))
    assert daemon.store.history() == [] and jobs == []
    assert intake._db_pause > intake.clock() and shot in intake.pending
    paused_until = intake._db_pause
    intake._take_pending(intake.clock())  # within the pause: not tried again
    assert intake._db_pause == paused_until and jobs == []
    daemon.store.close()


def test_a_waiting_file_is_resolved_once_and_its_inbox_looked_at_once_per_pass(
        setup: tuple[Intake, list[Job], Daemon], monkeypatch: pytest.MonkeyPatch) -> None:
    """The main thread claims the next file while the stages wait for it: each file's spec is resolved once
    (not once to see whether it waits for a sidecar and again after its claim), and the checks that hold
    for a whole inbox (its outbox there, this host may claim) are made once per pass, not once per file."""
    from bgwatch import intake as intake_module
    from bgwatch.intake import Waiting

    intake, jobs, daemon = setup
    site = next(iter(daemon.sites.values()))
    site.inbox.outbox.mkdir(parents=True, exist_ok=True)
    shots = write_samples(site.inbox.path, 6, size=(64, 64), seed=4)
    resolved: list[Path] = []
    blocked: list[str] = []
    real_resolve, real_blocked = intake_module.rules.resolve, intake_module.Intake._blocked

    def resolve(image: Path, *args: object, **kwargs: object) -> object:
        resolved.append(Path(image))
        return real_resolve(image, *args, **kwargs)  # type: ignore[arg-type]

    def count_blocked(of: object) -> bool:
        blocked.append(str(of))
        return real_blocked(of)  # type: ignore[arg-type]

    monkeypatch.setattr(intake_module.rules, "resolve", resolve)
    monkeypatch.setattr(intake_module.Intake, "_blocked", staticmethod(count_blocked))
    intake.once = True
    for shot in shots:
        intake.pending[shot] = Waiting(site, 0.0)
    intake._take_pending(1.0)  # room for window_per_worker files
    taken = [job.source.name for job in jobs]
    assert len(taken) == daemon.config.pipeline.window_per_worker
    assert sorted(p.name for p in resolved) == sorted(taken)  # one resolve per file taken
    assert len(blocked) == 1
    daemon.store.close()


def test_an_ending_wakes_the_main_loop_and_a_start_waits_for_its_next_turn(
        setup: tuple[Intake, list[Job], Daemon]) -> None:
    """One wake a job: a start frees no room in the window; it is recorded at the next turn, before the
    ending that follows it, with the time the worker took."""
    from bgwatch.outcomes import Started

    intake, _, daemon = setup
    site = next(iter(daemon.sites.values()))
    [shot] = write_samples(site.inbox.path, 1, size=(64, 64), seed=5)
    run_id = intake.take(site, shot)
    assert run_id is not None
    intake.wake.clear()
    intake.outcomes.put(Started(run_id, 50.0))
    assert not intake.wake.is_set()
    intake.outcomes.put(runs.undone(run_id, "its output is not in the outbox"))
    assert intake.wake.is_set()
    intake.apply_outcomes()
    row = daemon.store.get_run(run_id)
    assert row is not None and row.started_at == 50.0 and row.status == JobState.SUPERSEDED.value
    daemon.store.close()
