"""SQLite: every claimed job's state, and the generated-background cache index.

One file per workstation, on local disk (WAL does not work over a network filesystem). One connection
shared by the daemon's threads behind a lock; every write is a short transaction. The runs table is
written by the daemon's main thread only (intake); a lock held by another process delays those writes
(sqlite3.OperationalError is raised after the busy timeout and the caller tries again later); it never
reaches the heartbeat, which does not use SQLite at all.

The tables are made with the very SQL sqlite-utils wrote for them (earlier versions made them through it),
so databases made by either are the same; the daemon no longer imports sqlite-utils (~0.1 s of every
start) for the few statements it needs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bgwatch.errors import ConfigError
from bgwatch.jobs import JobState
from bgwatch.text import shown

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000

RUN_COLUMNS: dict[str, type] = {
    "id": int,
    "key": str,
    "inbox": str,
    "rel_path": str,
    "source_path": str,  # where the bytes are while the run is open (the claimed copy)
    "input_sha256": str,
    "spec_json": str,
    "status": str,
    "attempts": int,
    "host": str,
    "mask_engine": str,
    "bg_engine": str,
    "seed": int,
    "output_path": str,
    "error": str,
    "created_at": float,
    "started_at": float,
    "finished_at": float,
    "timings_json": str,
}



@dataclass(frozen=True, slots=True)
class RunRow:
    """One row of the runs table."""

    id: int
    key: str
    inbox: str
    rel_path: str
    source_path: str
    input_sha256: str
    spec_json: str
    status: str
    attempts: int = 0
    host: str = ""
    mask_engine: str = ""
    bg_engine: str = ""
    seed: int | None = None
    output_path: str = ""
    error: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    timings_json: str = ""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRow:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        for text in ("source_path", "input_sha256", "spec_json", "host", "mask_engine", "bg_engine", "output_path",
                     "error", "timings_json"):
            if values.get(text) is None:
                values[text] = ""
        return cls(**values)


BACKGROUND_COLUMNS: dict[str, type] = {
    "key": str,
    "engine": str,
    "model": str,
    "prompt": str,
    "negative_prompt": str,
    "seed": int,
    "width": int,
    "height": int,
    "steps": int,
    "guidance_scale": float,
    "path": str,
    "bytes": int,
    "created_at": float,
    "last_used_at": float,
    "hits": int,
}


def damaged(path: Path, problem: object) -> ConfigError:
    return ConfigError(path, "state_dir", f"the state database is damaged ({problem}); move it aside "
                       f"(mv {path.name} {path.name}.damaged) and start again: bgwatch makes a new one, and the "
                       "files on the shares are unaffected. Keep state_dir on local disk: SQLite is damaged "
                       "by network filesystems")


_SQL_TYPES = {int: "INTEGER", str: "TEXT", float: "REAL"}


def _create_table(name: str, columns: dict[str, type], pk: str, not_null: frozenset[str] = frozenset()) -> str:
    body = ",\n".join(f'   "{c}" {_SQL_TYPES[t]}'
                      + (" PRIMARY KEY" if c == pk else " NOT NULL" if c in not_null else "")
                      for c, t in columns.items())
    return f'CREATE TABLE "{name}" (\n{body}\n)'


def _create_index(table: str, *columns: str) -> str:
    return (f'CREATE INDEX "idx_{table}_{"_".join(columns)}"\n    ON "{table}" ('
            + ", ".join(f'"{c}"' for c in columns) + ")")


class Store:
    """The runs and backgrounds tables; the clock is injected so runs can be timed in tests."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        self._lock = threading.RLock()
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                               isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.conn = conn
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = wal")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise damaged(path, exc) from None

    def check(self) -> None:
        """PRAGMA quick_check: a damaged database is refused at start with what to do, not a traceback."""
        try:
            with self._lock:
                result = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise damaged(self.path, exc) from None
        if result != "ok":
            raise damaged(self.path, result)

    def _tables(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _migrate(self) -> None:
        with self._lock:
            if {"runs", "backgrounds", "meta"} <= self._tables():
                return
            with self._tx() as conn:
                tables = self._tables()  # again, under the write lock: another process may have just made them
                if "runs" not in tables:
                    conn.execute(_create_table("runs", RUN_COLUMNS, "id", frozenset({"key", "status"})))
                    conn.execute(_create_index("runs", "key", "status"))
                    conn.execute(_create_index("runs", "status"))
                if "backgrounds" not in tables:
                    conn.execute(_create_table("backgrounds", BACKGROUND_COLUMNS, "key"))
                    conn.execute(_create_index("backgrounds", "last_used_at"))
                if "meta" not in tables:
                    conn.execute(_create_table("meta", {"name": str, "value": str}, "name"))
                    conn.execute("INSERT INTO meta (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts (column name -> value), under the lock."""
        with self._lock:
            cur = self.conn.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ------------------------------------------------------------------ runs

    def add_run(self, *, key: str, inbox: str, rel_path: str, source_path: str, input_sha256: str,
                spec_json: str, host: str, status: JobState = JobState.QUEUED, output_path: str = "") -> int:
        """One run, in one transaction with the output name it wants (never a row without it)."""
        now = self.clock()
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO runs (key, inbox, rel_path, source_path, input_sha256, spec_json, status, "
                "attempts, host, created_at, output_path) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (key, inbox, shown(rel_path), shown(source_path), input_sha256, spec_json, str(status), host, now,
                 shown(output_path)),
            )
            return int(cur.lastrowid or 0)

    def get_run(self, run_id: int) -> RunRow | None:
        rows = self._query("SELECT * FROM runs WHERE id = ?", [run_id])
        return RunRow.from_row(rows[0]) if rows else None

    def start_run(self, run_id: int, host: str, at: float | None = None) -> bool:
        """queued -> running; False when the row is not queued any more."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE runs SET status = 'running', attempts = attempts + 1, host = ?, started_at = ? "
                "WHERE id = ? AND status = 'queued'",
                (host, self.clock() if at is None else at, run_id),
            )
            return cur.rowcount == 1

    def set_output(self, run_id: int, output_path: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE runs SET output_path = ? WHERE id = ?", (shown(output_path), run_id))

    def note(self, run_id: int, error: str) -> None:
        """What an open run waits for (a full outbox), shown by `history` until the run ends."""
        with self._tx() as conn:
            conn.execute("UPDATE runs SET error = ? WHERE id = ?", (shown(error), run_id))

    def finish_run(self, run_id: int, state: JobState, *, output_path: str = "", error: str = "",
                   mask_engine: str = "", bg_engine: str = "", seed: int | None = None,
                   timings: dict[str, float] | None = None, source_path: str | None = None) -> None:
        assert state in (JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.SUPERSEDED)
        with self._tx() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, output_path = ?, error = ?, mask_engine = ?, bg_engine = ?, "
                "seed = ?, timings_json = ?, finished_at = ?, "
                "source_path = COALESCE(?, source_path) WHERE id = ?",
                (str(state), shown(output_path), shown(error), mask_engine, bg_engine, seed,
                 json.dumps(timings or {}, sort_keys=True), self.clock(),
                 None if source_path is None else shown(source_path), run_id),
            )

    def mark_retried(self, run_id: int, source_path: str) -> None:
        """A failed run whose original `bgwatch retry` put back in its inbox: said in its error, with where
        the original is now. Its times, timings and engines stay: its duration is the run's, not the retry's."""
        with self._tx() as conn:
            conn.execute("UPDATE runs SET error = COALESCE(error, '') || ' [retried]', source_path = ? WHERE id = ?",
                         (shown(source_path), run_id))

    def requeue(self, run_id: int) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE runs SET status = 'queued', error = '' WHERE id = ?", (run_id,))

    def find_done(self, key: str) -> RunRow | None:
        """The newest finished run with this key whose output still exists."""
        rows = self._query("SELECT * FROM runs WHERE key = ? AND status = 'done' ORDER BY id DESC", [key])
        for row in rows:
            if row["output_path"] and os.path.lexists(row["output_path"]):
                return RunRow.from_row(row)
        return None

    def runs_in(self, states: tuple[JobState, ...], host: str | None = None) -> list[RunRow]:
        marks = ",".join("?" for _ in states)
        sql = f"SELECT * FROM runs WHERE status IN ({marks})"
        args: list[Any] = [str(s) for s in states]
        if host is not None:
            sql += " AND host = ?"
            args.append(host)
        return [RunRow.from_row(r) for r in self._query(sql + " ORDER BY id", args)]

    def history(self, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        sql = "SELECT * FROM runs"
        args: list[Any] = []
        if status:
            sql += " WHERE status = ?"
            args.append(status)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return self._query(sql, args)

    def counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._query("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")}

    # ------------------------------------------------------------------ backgrounds

    def get_background(self, key: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM backgrounds WHERE key = ?", [key])
        return rows[0] if rows else None

    def put_background(self, row: dict[str, Any]) -> None:
        now = self.clock()
        data = {"created_at": now, "last_used_at": now, "hits": 0, **row}
        unknown = set(data) - set(BACKGROUND_COLUMNS)
        if unknown:
            raise ValueError(f"unknown background columns: {sorted(unknown)}")
        names = list(data)
        update = ", ".join(f"{n} = excluded.{n}" for n in names if n != "key")
        with self._tx() as conn:  # an upsert: the columns given are set, the others kept
            conn.execute(f"INSERT INTO backgrounds ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)}) "
                         f"ON CONFLICT(key) DO UPDATE SET {update}", [data[n] for n in names])

    def touch_background(self, key: str, hits: int = 1) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE backgrounds SET last_used_at = ?, hits = hits + ? WHERE key = ?",
                         (self.clock(), hits, key))

    def delete_background(self, key: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM backgrounds WHERE key = ?", (key,))

    def list_backgrounds(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM backgrounds ORDER BY last_used_at DESC")

    def lru_backgrounds(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM backgrounds ORDER BY last_used_at ASC, created_at ASC")

    def backgrounds_total_bytes(self) -> int:
        return int(self._query("SELECT COALESCE(SUM(bytes), 0) AS total FROM backgrounds")[0]["total"])
