"""One behaviour suite for every store (huey's StorageTests): SQLite and the studio's PostgreSQL give the
same answers to every method of storebase.RunStore. PostgreSQL runs on a throwaway cluster
(tests/pgserver.py); without one the postgres half is skipped with the reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bgwatch.jobs import JobState
from bgwatch.storebase import RunStore, StudioStore
from tests import pgserver

pg_cluster = pgserver.pg_cluster  # the session's throwaway cluster
pg_url = pgserver.pg_url  # an empty database of its own for each test


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    clock = Clock()
    made: Any
    if request.param == "sqlite":
        from bgwatch.store import Store

        made = Store(tmp_path / "bgwatch.db", clock=clock)
    else:
        from bgwatch.pgstore import PgStore

        made = PgStore(request.getfixturevalue("pg_url"), host="h1", clock=clock)
    made.test_clock = clock
    yield made
    made.close()


def _run(store: Any, key: str = "k1", rel: str = "a.jpg", host: str = "h1", **extra: Any) -> int:
    return int(store.add_run(key=key, inbox="/in", rel_path=rel, source_path=f"/in/.claimed/{rel}",
                             input_sha256="ab" * 32, spec_json='{"mode": "cutout"}', host=host, **extra))


def test_every_store_is_a_run_store(store: Any) -> None:
    assert isinstance(store, RunStore)


def test_add_and_get_run(store: Any) -> None:
    first = _run(store)
    second = _run(store, rel="b.jpg", output_path="/out/b.png")
    assert second > first
    row = store.get_run(second)
    assert (row.key, row.inbox, row.rel_path, row.source_path, row.status, row.attempts, row.host) == (
        "k1", "/in", "b.jpg", "/in/.claimed/b.jpg", "queued", 0, "h1")
    assert row.output_path == "/out/b.png" and row.created_at == 1_000.0
    assert row.started_at is None and row.finished_at is None and row.seed is None
    assert store.get_run(second + 100) is None


def test_paths_with_control_characters_are_shown_escaped(store: Any) -> None:
    run = _run(store, rel="a\nb.jpg")
    assert "\n" not in store.get_run(run).rel_path


def test_start_run_only_from_queued(store: Any) -> None:
    run = _run(store)
    assert store.start_run(run, "h2", at=1_005.0) is True
    row = store.get_run(run)
    assert (row.status, row.attempts, row.host, row.started_at) == ("running", 1, "h2", 1_005.0)
    assert store.start_run(run, "h3") is False
    store.test_clock.now = 1_010.0
    store.requeue(run)
    assert store.start_run(run, "h3") is True
    row = store.get_run(run)
    assert (row.attempts, row.host, row.started_at) == (2, "h3", 1_010.0)


def test_set_output_note_and_requeue(store: Any) -> None:
    run = _run(store)
    store.set_output(run, "/out/a.png")
    store.note(run, "outbox full")
    row = store.get_run(run)
    assert (row.output_path, row.error) == ("/out/a.png", "outbox full")
    store.start_run(run, "h1")
    store.requeue(run)
    row = store.get_run(run)
    assert (row.status, row.error) == ("queued", "")


def test_finish_run_records_everything(store: Any) -> None:
    run = _run(store)
    store.start_run(run, "h1")
    store.test_clock.now = 1_002.5
    store.finish_run(run, JobState.DONE, output_path="/out/a.png", mask_engine="classical", bg_engine="color",
                     seed=7, timings={"mask": 0.5, "total": 1.5}, source_path="/in/done/a.jpg")
    row = store.get_run(run)
    assert (row.status, row.output_path, row.mask_engine, row.bg_engine, row.seed) == (
        "done", "/out/a.png", "classical", "color", 7)
    assert row.finished_at == 1_002.5 and row.source_path == "/in/done/a.jpg"
    assert json.loads(row.timings_json) == {"mask": 0.5, "total": 1.5}
    other = _run(store, rel="b.jpg")
    store.finish_run(other, JobState.FAILED, error="broken image")
    row = store.get_run(other)
    assert (row.status, row.error, row.source_path) == ("failed", "broken image", "/in/.claimed/b.jpg")
    with pytest.raises(AssertionError):
        store.finish_run(other, JobState.RUNNING)


def test_mark_retried_keeps_the_error_and_moves_the_source(store: Any) -> None:
    run = _run(store)
    store.finish_run(run, JobState.FAILED, error="broken")
    store.mark_retried(run, "/in/a.jpg")
    row = store.get_run(run)
    assert (row.error, row.source_path, row.status) == ("broken [retried]", "/in/a.jpg", "failed")


def test_find_done_needs_the_output_on_disk(store: Any, tmp_path: Path) -> None:
    old, new, gone = _run(store), _run(store, rel="b.jpg"), _run(store, rel="c.jpg")
    (tmp_path / "old.png").write_bytes(b"x")
    store.finish_run(old, JobState.DONE, output_path=str(tmp_path / "old.png"))
    store.finish_run(new, JobState.DONE, output_path=str(tmp_path / "new.png"))  # never written
    store.finish_run(gone, JobState.FAILED, output_path=str(tmp_path / "old.png"))
    found = store.find_done("k1")
    assert found is not None and found.id == old
    (tmp_path / "new.png").write_bytes(b"y")
    assert store.find_done("k1").id == new
    assert store.find_done("other") is None


def test_runs_in_by_state_and_host(store: Any) -> None:
    a, b, c = _run(store), _run(store, rel="b.jpg", host="h2"), _run(store, rel="c.jpg")
    store.start_run(b, "h2")
    store.finish_run(c, JobState.DONE)
    assert [r.id for r in store.runs_in((JobState.QUEUED, JobState.RUNNING))] == [a, b]
    assert [r.id for r in store.runs_in((JobState.QUEUED, JobState.RUNNING), host="h2")] == [b]
    assert [r.id for r in store.runs_in((JobState.DONE,))] == [c]
    assert store.runs_in((JobState.FAILED,)) == []


def test_history_and_counts(store: Any) -> None:
    ids = [_run(store, rel=f"{i}.jpg") for i in range(5)]
    store.finish_run(ids[1], JobState.DONE)
    store.finish_run(ids[3], JobState.FAILED, error="x")
    rows = store.history(limit=3)
    assert [r["id"] for r in rows] == ids[:1:-1][:3]
    assert {"id", "key", "status", "host", "created_at", "timings_json", "output_path"} <= set(rows[0])
    assert [r["id"] for r in store.history("failed")] == [ids[3]]
    assert store.counts() == {"queued": 3, "done": 1, "failed": 1}


def _background(key: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"key": key, "engine": "sdxl", "model": "m", "prompt": "marble", "negative_prompt": "", "seed": 3,
            "width": 64, "height": 48, "steps": 4, "guidance_scale": 5.0, "path": f"/cache/{key}.png",
            "bytes": size, **extra}


def test_background_rows(store: Any) -> None:
    assert store.get_background("a") is None and store.backgrounds_total_bytes() == 0
    store.put_background(_background("a", 100))
    store.test_clock.now = 1_001.0
    store.put_background(_background("b", 250))
    row = store.get_background("a")
    assert (row["prompt"], row["seed"], row["width"], row["bytes"], row["hits"], row["created_at"]) == (
        "marble", 3, 64, 100, 0, 1_000.0)
    assert store.backgrounds_total_bytes() == 350
    store.test_clock.now = 1_002.0
    store.touch_background("a", 2)
    assert store.get_background("a")["hits"] == 2
    assert [r["key"] for r in store.list_backgrounds()] == ["a", "b"]
    assert [r["key"] for r in store.lru_backgrounds()] == ["b", "a"]
    store.put_background(_background("b", 50))  # a second write of a key replaces its row
    assert store.backgrounds_total_bytes() == 150
    store.delete_background("a")
    assert store.get_background("a") is None and [r["key"] for r in store.list_backgrounds()] == ["b"]
    with pytest.raises(ValueError, match="unknown background columns"):
        store.put_background({"key": "c", "colour": 1})


def test_check_passes_on_a_healthy_store(store: Any) -> None:
    store.check()


# ---------------------------------------------------------------- what only the studio's store does


@pytest.fixture
def studio(pg_url: str) -> Iterator[Any]:
    from bgwatch.pgstore import PgStore

    made = PgStore(pg_url, host="h1")
    yield made
    made.close()


def test_postgres_is_a_studio_store(studio: Any) -> None:
    assert isinstance(studio, StudioStore)


def test_runs_of_every_host_in_one_history(studio: Any, pg_url: str) -> None:
    from bgwatch.pgstore import PgStore

    other = PgStore(pg_url, host="h2")
    try:
        _run(studio, host="h1")
        _run(other, rel="b.jpg", host="h2")
        assert {r["host"] for r in studio.history()} == {"h1", "h2"}
        assert {r["host"] for r in other.history()} == {"h1", "h2"}
    finally:
        other.close()


def test_output_names_one_host_wins(studio: Any) -> None:
    assert studio.reserve_output("/out", "a.png", "h1", 1) is True
    assert studio.reserve_output("/out", "a.png", "h1", 1) is True  # the same run again keeps it
    assert studio.reserve_output("/out", "a.png", "h2", 2) is False
    assert studio.reserve_output("/out2", "a.png", "h2", 2) is True
    studio.release_output("/out", "a.png")
    assert studio.reserve_output("/out", "a.png", "h2", 2) is True


def test_one_generation_per_key(studio: Any) -> None:
    assert studio.begin_generation("bg1", "h1", 60) is True
    assert studio.begin_generation("bg1", "h2", 60) is False
    assert studio.begin_generation("bg2", "h2", 60) is True
    studio.end_generation("bg1", "h2")  # not its generation: nothing happens
    assert studio.begin_generation("bg1", "h3", 60) is False
    studio.end_generation("bg1", "h1")
    assert studio.begin_generation("bg1", "h3", 60) is True


def test_a_silent_generation_is_taken_over_after_its_lease(studio: Any) -> None:
    assert studio.begin_generation("bg1", "h1", 0.01) is True
    with studio.connection() as conn:
        conn.execute("SELECT pg_sleep(0.05)")
    assert studio.begin_generation("bg1", "h2", 60) is True


def test_generation_bucket_is_one_per_engine(studio: Any) -> None:
    assert studio.take_token("sdxl", 6, burst=2) == 0.0
    assert studio.take_token("sdxl", 6, burst=2) == 0.0
    wait = studio.take_token("sdxl", 6, burst=2)
    assert 9.0 < wait <= 10.0  # one token every 10 s at 6 a minute
    assert studio.take_token("runway", 6) == 0.0  # its own bucket
    assert studio.take_token("sdxl", 0) == 0.0  # 0: unlimited


def test_hosts_heartbeats(studio: Any) -> None:
    studio.beat("h1", 2)
    studio.beat("h2", 0)
    studio.beat("h1", 3)
    hosts = {h.host: h for h in studio.hosts()}
    assert set(hosts) == {"h1", "h2"} and hosts["h1"].in_flight == 3
    assert 0.0 <= hosts["h1"].age < 60.0
