"""Issue 16: a studio store that is away delays run records, never loses them. An ending the store refuses
goes to a local journal (state_dir, fsynced); a daemon killed meanwhile replays it at its next start."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bgwatch import runs
from bgwatch.jobs import JobState, RunResult
from bgwatch.pgstore import PgStore
from bgwatch.store import Store
from tests import pgserver

pg_cluster = pgserver.pg_cluster
pg_url = pgserver.pg_url

TIMINGS = {"prepare": 0.01, "mask": 0.25, "finish": 0.05}


def _open_run(ledger: runs.Ledger, name: str) -> int:
    run_id = ledger.add(key=f"k-{name}", inbox="photos", rel_path=name, source_path=f"/in/{name}",
                        spec_json='{"operation": "cleanup"}', output_path=f"/out/{name}.png")
    ledger.start(run_id, at=1.0)
    return run_id


def _done(run_id: int, name: str) -> RunResult:
    return RunResult(run_id, JobState.DONE, Path(f"/out/{name}.png"), mask_engine="rembg:u2net:int8",
                     bg_engine="gradient", seed=7, timings=TIMINGS)


@pytest.mark.slow  # a 2.5 s outage of the studio store
def test_an_ending_made_while_the_store_is_away_survives_a_kill_and_is_replayed(
        tmp_path: Path, pg_cluster: Any, pg_url: str) -> None:
    journal = tmp_path / runs.JOURNAL
    ledger = runs.Ledger(PgStore(pg_url), "ws1", journal=journal)
    run_id = _open_run(ledger, "a.jpg")
    back = pg_cluster.away_for(2.5)
    try:
        with pytest.raises(sqlite3.Error):
            ledger.finish(_done(run_id, "a.jpg"))
    finally:
        back.join()
    ledger.store.close()
    [line] = journal.read_text().splitlines()
    assert json.loads(line)["timings"] == TIMINGS
    # killed now: nothing of that daemon is left but the journal; the next start replays it
    store = PgStore(pg_url)
    restarted = runs.Ledger(store, "ws1", journal=journal)
    assert restarted.replay() == 1
    row = store.get_run(run_id)
    assert row is not None and row.status == "done"
    assert (row.mask_engine, row.bg_engine, row.seed, row.output_path) == ("rembg:u2net:int8", "gradient", 7,
                                                                           "/out/a.jpg.png")
    assert json.loads(row.timings_json) == TIMINGS
    assert not journal.exists() and restarted.replay() == 0
    store.close()


def test_replaying_ends_only_open_runs_and_skips_a_torn_line(tmp_path: Path) -> None:
    journal = tmp_path / runs.JOURNAL
    store = Store(tmp_path / "bgwatch.db")
    ledger = runs.Ledger(store, "ws1", journal=journal)
    open_id, ended_id = _open_run(ledger, "open.jpg"), _open_run(ledger, "ended.jpg")
    ledger.finish(runs.failed(ended_id, "not an image"))
    stale = runs._entry(_done(ended_id, "ended.jpg"))  # its ending reached the store before the kill
    entries = [runs._entry(_done(open_id, "open.jpg")), stale]
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"run_id": 9, "sta')
    assert runs.Ledger(store, "ws1", journal=journal).replay() == 1
    rows = {r.id: r for r in store.runs_in((JobState.DONE, JobState.FAILED))}
    assert rows[open_id].status == "done" and rows[open_id].mask_engine == "rembg:u2net:int8"
    assert rows[ended_id].status == "failed" and rows[ended_id].error == "not an image", "never ended twice"
    assert not journal.exists()
    store.close()


def test_a_later_write_that_succeeds_replays_what_waited(tmp_path: Path) -> None:
    journal = tmp_path / runs.JOURNAL
    store = Store(tmp_path / "bgwatch.db")
    first, second = _open_run(runs.Ledger(store, "ws1"), "1.jpg"), _open_run(runs.Ledger(store, "ws1"), "2.jpg")
    journal.write_text(json.dumps(runs._entry(_done(first, "1.jpg"))) + "\n")  # left by a killed daemon
    ledger = runs.Ledger(store, "ws1", journal=journal)
    ledger.finish(_done(second, "2.jpg"))  # the store takes writes again: the journal goes with it
    assert {r.id: r.status for r in store.runs_in((JobState.DONE,))} == {first: "done", second: "done"}
    assert not journal.exists()
    store.close()


def _daemon_until_killed(config: Any, cluster: Any) -> None:
    """A child process: the daemon, the studio store stopped at its first delivery's marker."""
    from loguru import logger

    from bgwatch.daemon import Daemon

    logger.add(config.state_dir.parent / "daemon.log", level="DEBUG")  # shown if the test fails

    def step(name: str) -> None:
        if name == "marker" and cluster is not None:
            cluster.stop("fast")

    Daemon(config, step=step).run()
    os._exit(0)


@pytest.mark.slow  # a daemon process, killed while the store is away, and a restart
def test_a_daemon_killed_while_the_store_is_away_keeps_its_runs_timings(tmp_path: Path, pg_cluster: Any,
                                                                        pg_url: str) -> None:
    from bgwatch.daemon import Daemon
    from bgwatch.samples import write_samples
    from tests.helpers import files_under, make_config, wait_for

    share = tmp_path / "share"
    share.mkdir()
    config = make_config(share, state_dir=str(tmp_path / "state"), host="ws1", store=pg_url)
    write_samples(config.inboxes[0].path, 1, size=(160, 120), seed=5)
    journal = config.state_dir / runs.JOURNAL
    child = multiprocessing.get_context("spawn").Process(target=_daemon_until_killed, args=(config, pg_cluster))
    child.start()
    try:
        wait_for(lambda: journal.exists() or not child.is_alive(), timeout=60)  # its ending refused by the store
        assert journal.exists(), (tmp_path / "daemon.log").read_text()
    finally:
        child.kill()
        child.join(timeout=30)
        pg_cluster.restart()  # the store is back (it was stopped, so this starts it)
    assert files_under(config.inboxes[0].outbox), "its output was delivered before the kill"

    assert Daemon(config, once=True).run() == 0  # the restart replays the journal before recovery
    store = PgStore(pg_url)
    [row] = store.runs_in((JobState.DONE,))
    store.close()
    assert row.mask_engine == "classical" and json.loads(row.timings_json).get("mask", 0) > 0
    assert "recorded at the restart" not in row.error, "rebuilt from the share, not from its own record"
    assert not journal.exists()
