from __future__ import annotations

import sqlite3
from pathlib import Path

from bgwatch.jobs import JobState
from bgwatch.store import SCHEMA_VERSION, Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def add(store: Store, key: str = "k", **extra: str) -> int:
    fields = {"key": key, "inbox": "in", "rel_path": "a.jpg", "source_path": "/x/a.jpg", "input_sha256": "s",
              "spec_json": "{}", "host": "h", **extra}
    return store.add_run(**fields)


def test_wal_busy_timeout_and_schema(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
    assert store.conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)
    store.close()
    # a second connection sees WAL persisted
    assert sqlite3.connect(tmp_path / "db.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_run_lifecycle(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path / "db.sqlite", clock=clock)
    run_id = add(store)
    row = store.get_run(run_id)
    assert row is not None and row.status == "queued"
    assert store.start_run(run_id, "h")
    assert not store.start_run(run_id, "h"), "a running row cannot be started twice"
    row = store.get_run(run_id)
    assert row is not None and (row.attempts, row.started_at) == (1, 1000.0)
    assert [r.id for r in store.runs_in((JobState.RUNNING,), host="h")] == [run_id]
    store.finish_run(run_id, JobState.FAILED, error="broken", timings={"mask": 0.5})
    row = store.get_run(run_id)
    assert row is not None and (row.status, row.error) == ("failed", "broken")
    assert store.counts() == {"failed": 1}


def test_names_that_are_not_utf8_or_carry_control_characters_are_stored_escaped(tmp_path: Path) -> None:
    import os

    store = Store(tmp_path / "db.sqlite")
    run_id = add(store, rel_path=os.fsdecode(b"caf\xe9\n.jpg"))
    row = store.get_run(run_id)
    assert row is not None and row.rel_path == "caf\\xe9\\n.jpg"


def test_find_done_needs_the_output_to_exist(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    out = tmp_path / "out.png"
    run_id = add(store, key="same")
    store.finish_run(run_id, JobState.DONE, output_path=str(out))
    assert store.find_done("same") is None, "an output deleted by a user must be made again"
    out.write_bytes(b"png")
    found = store.find_done("same")
    assert found is not None and found.id == run_id
    assert store.find_done("other") is None


def test_backgrounds_lru_order_and_total(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path / "db.sqlite", clock=clock)
    for i, key in enumerate(["a", "b", "c"]):
        clock.now += 1
        store.put_background({"key": key, "engine": "sdxl", "path": f"{key}.png", "bytes": 10 * (i + 1)})
    clock.now += 1
    store.touch_background("a")
    assert [r["key"] for r in store.lru_backgrounds()] == ["b", "c", "a"]
    assert store.backgrounds_total_bytes() == 60
    assert store.get_background("a")["hits"] == 1
    store.delete_background("b")
    assert store.get_background("b") is None


def test_a_damaged_database_is_refused_with_what_to_do(tmp_path: Path) -> None:
    import pytest

    from bgwatch.errors import ConfigError

    path = tmp_path / "bgwatch.db"
    path.write_bytes(b"not a database" * 500)
    with pytest.raises(ConfigError, match=r"damaged .*mv bgwatch\.db bgwatch\.db\.damaged"):
        Store(path)


def test_a_run_is_recorded_with_its_output_name_in_one_step_and_notes_what_it_waits_for(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    run_id = add(store, output_path="/out/a.png")
    row = store.get_run(run_id)
    assert row is not None and row.output_path == "/out/a.png" and row.status == "queued"
    store.note(run_id, "waiting to be delivered: /out: No space left on device (ENOSPC)")
    row = store.get_run(run_id)
    assert row is not None and "ENOSPC" in row.error and row.status == "queued"
    store.close()


def _made_by_sqlite_utils(path: Path) -> None:
    """The tables as bgwatch made them through sqlite-utils before it wrote their SQL itself."""
    import sqlite_utils

    from bgwatch.store import BACKGROUND_COLUMNS, RUN_COLUMNS

    db = sqlite_utils.Database(path)
    db.enable_wal()
    db.table("runs").create(RUN_COLUMNS, pk="id", not_null={"key", "status"})
    db.table("runs").create_index(["key", "status"])
    db.table("runs").create_index(["status"])
    db.table("backgrounds").create(BACKGROUND_COLUMNS, pk="key")
    db.table("backgrounds").create_index(["last_used_at"])
    db.table("meta").insert({"name": "schema_version", "value": str(SCHEMA_VERSION)}, pk="name")
    db.table("runs").insert({"key": "old", "status": "done", "inbox": "in", "rel_path": "a.jpg", "attempts": 1})
    db.conn.close()


def test_a_database_made_by_sqlite_utils_is_the_same_and_opens_as_it_was(tmp_path: Path) -> None:
    """The daemon no longer imports sqlite-utils; the tables it makes are the ones sqlite-utils made, and a
    database an earlier version made is used as it is."""
    _made_by_sqlite_utils(tmp_path / "old.sqlite")
    Store(tmp_path / "new.sqlite").close()
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    assert (sqlite3.connect(tmp_path / "old.sqlite").execute(schema).fetchall()
            == sqlite3.connect(tmp_path / "new.sqlite").execute(schema).fetchall())
    old = Store(tmp_path / "old.sqlite")
    assert [r["key"] for r in old.history()] == ["old"]
    run_id = add(old, "k2")
    assert old.get_run(run_id) is not None and old.counts() == {"done": 1, "queued": 1}
    old.put_background({"key": "b", "engine": "sdxl", "path": "/x.png", "bytes": 5})
    old.put_background({"key": "b", "bytes": 7})  # an upsert: the columns not given stay
    row = old.get_background("b")
    assert row is not None and (row["engine"], row["path"], row["bytes"]) == ("sdxl", "/x.png", 7)
    old.close()


def test_opening_the_store_imports_no_sqlite_utils(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from bgwatch.store import Store; "
            f"Store(Path({str(tmp_path / 'db.sqlite')!r})).close(); print('sqlite_utils' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
