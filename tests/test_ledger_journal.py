"""Issue 16: a studio store that is away delays run records, never loses them. An ending the store refuses
goes to a local journal (state_dir, fsynced); a daemon killed meanwhile replays it at its next start."""

from __future__ import annotations

import json
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
