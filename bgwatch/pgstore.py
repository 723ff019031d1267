"""The studio store: every host's runs, the background cache index, output names, generation buckets and
hosts, in one PostgreSQL (psycopg 3 with a connection pool).

The same methods as bgwatch.store.Store (storebase.RunStore), so the daemon's callers do not know which
one they hold, plus storebase.StudioStore. Run times come from the injected clock, as in SQLite; leases,
heartbeats and the generation buckets use the server's clock, the one clock every host shares.

A server that restarts or cannot be reached raises StoreUnavailable (an sqlite3.OperationalError: the
callers' "busy, try later" path); the pool drops broken connections and reconnects by itself. The URL's
password is never in a message: `shown` is the URL as logs, errors and `status` print it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from bgwatch.errors import ConfigError
from bgwatch.jobs import JobState
from bgwatch.storebase import HostRow, StoreUnavailable, redact, scrub
from bgwatch.text import shown

if TYPE_CHECKING:
    import psycopg

    from bgwatch.store import RunRow

RUN_FIELDS = ("id", "key", "inbox", "rel_path", "source_path", "input_sha256", "spec_json", "status", "attempts",
              "host", "mask_engine", "bg_engine", "seed", "output_path", "error", "created_at", "started_at",
              "finished_at", "timings_json")
RUN_SELECT = "SELECT " + ", ".join(RUN_FIELDS) + " FROM runs"
BACKGROUND_FIELDS = ("key", "engine", "model", "prompt", "negative_prompt", "seed", "width", "height", "steps",
                     "guidance_scale", "path", "bytes", "created_at", "last_used_at", "hits")
BACKGROUND_SELECT = "SELECT " + ", ".join(BACKGROUND_FIELDS) + " FROM backgrounds"
CONNECT_TIMEOUT = 5.0
# How long a caller waits for a pooled connection before the store counts as away: short, because the
# daemon's main thread records runs and must go on answering signals while PostgreSQL restarts.
WAIT_SECONDS = 2.0
_EPSILON = 1e-9


class PgStore:
    """The studio's PostgreSQL store; migrated to the latest schema when opened."""

    def __init__(self, url: str, *, host: str = "", clock: Callable[[], float] = time.time,
                 max_connections: int = 4, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        from bgwatch import pgschema

        self.url = url
        self.shown = redact(url)
        self.host = host
        self.clock = clock
        self.migrated: list[int] = []
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(connect_timeout))) as conn:
                self.migrated = pgschema.migrate(conn, self.shown)
        except psycopg.Error as exc:
            raise self._away(exc) from None
        self.pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            url, min_size=1, max_size=max_connections, open=False, timeout=min(connect_timeout, WAIT_SECONDS),
            kwargs={"autocommit": True, "row_factory": dict_row,
                    "connect_timeout": max(1, round(connect_timeout))},
            check=ConnectionPool.check_connection, name="bgwatch-store", reconnect_timeout=float("inf"))
        self.pool.open(wait=False)

    def _away(self, exc: BaseException) -> StoreUnavailable:
        reason = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, self.url)
        return StoreUnavailable(f"the studio store {self.shown} is unavailable: {reason}")

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A pooled connection (autocommit; open a transaction with conn.transaction()); a server that is
        away raises StoreUnavailable."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self.pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self._away(exc) from None

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        with self.connection() as conn, conn.transaction():
            yield conn

    def check(self) -> None:
        """The server answers and the schema is the one this bgwatch knows."""
        from bgwatch import pgschema

        with self.connection() as conn:
            have = [int(r["version"]) for r in conn.execute("SELECT version FROM bgwatch_schema ORDER BY version")]
        if not have or have[-1] != pgschema.LATEST:
            raise ConfigError(self.shown, "store", f"schema version {have[-1] if have else 0}, expected "
                              f"{pgschema.LATEST}", "restart bgwatch to migrate it")

    def server_version(self) -> str:
        with self.connection() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row["server_version"]) if row else ""

    def schema_versions(self) -> list[int]:
        with self.connection() as conn:
            return [int(r["version"]) for r in conn.execute("SELECT version FROM bgwatch_schema ORDER BY version")]

    def close(self) -> None:
        self.pool.close()

    # ------------------------------------------------------------------ runs

    def add_run(self, *, key: str, inbox: str, rel_path: str, source_path: str, input_sha256: str,
                spec_json: str, host: str, status: JobState = JobState.QUEUED, output_path: str = "") -> int:
        with self.transaction() as conn:
            row = conn.execute(
                "INSERT INTO runs (key, inbox, rel_path, source_path, input_sha256, spec_json, status, attempts, "
                "host, created_at, output_path) VALUES (%s, %s, %s, %s, %s, %s, %s, 0, %s, %s, %s) RETURNING id",
                (key, inbox, shown(rel_path), shown(source_path), input_sha256, spec_json, str(status), host,
                 self.clock(), shown(output_path))).fetchone()
        assert row is not None
        return int(row["id"])

    def get_run(self, run_id: int) -> RunRow | None:
        from bgwatch.store import RunRow

        with self.connection() as conn:
            row = conn.execute(RUN_SELECT + " WHERE id = %s", (run_id,)).fetchone()
        return RunRow.from_row(row) if row else None

    def start_run(self, run_id: int, host: str, at: float | None = None) -> bool:
        with self.transaction() as conn:
            cur = conn.execute("UPDATE runs SET status = 'running', attempts = attempts + 1, host = %s, "
                               "started_at = %s WHERE id = %s AND status = 'queued'",
                               (host, self.clock() if at is None else at, run_id))
            return cur.rowcount == 1

    def set_output(self, run_id: int, output_path: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET output_path = %s WHERE id = %s", (shown(output_path), run_id))

    def note(self, run_id: int, error: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET error = %s WHERE id = %s", (shown(error), run_id))

    def finish_run(self, run_id: int, state: JobState, *, output_path: str = "", error: str = "",
                   mask_engine: str = "", bg_engine: str = "", seed: int | None = None,
                   timings: dict[str, float] | None = None, source_path: str | None = None) -> None:
        assert state in (JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.SUPERSEDED)
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET status = %s, output_path = %s, error = %s, mask_engine = %s, bg_engine = %s, "
                "seed = %s, timings_json = %s, finished_at = %s, source_path = COALESCE(%s, source_path) "
                "WHERE id = %s",
                (str(state), shown(output_path), shown(error), mask_engine, bg_engine, seed,
                 json.dumps(timings or {}, sort_keys=True), self.clock(),
                 None if source_path is None else shown(source_path), run_id))

    def mark_retried(self, run_id: int, source_path: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET error = error || ' [retried]', source_path = %s WHERE id = %s",
                         (shown(source_path), run_id))

    def requeue(self, run_id: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET status = 'queued', error = '' WHERE id = %s", (run_id,))

    def find_done(self, key: str) -> RunRow | None:
        from bgwatch.store import RunRow

        with self.connection() as conn:
            rows = conn.execute(RUN_SELECT + " WHERE key = %s AND status = 'done' ORDER BY id DESC", (key,)).fetchall()
        for row in rows:
            if row["output_path"] and os.path.lexists(row["output_path"]):
                return RunRow.from_row(row)
        return None

    def runs_in(self, states: tuple[JobState, ...], host: str | None = None) -> list[RunRow]:
        from bgwatch.store import RunRow

        sql = RUN_SELECT + " WHERE status = ANY(%s)"
        args: list[Any] = [[str(s) for s in states]]
        if host is not None:
            sql += " AND host = %s"
            args.append(host)
        with self.connection() as conn:
            return [RunRow.from_row(r) for r in conn.execute(sql + " ORDER BY id", args)]

    def history(self, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        sql = RUN_SELECT
        args: list[Any] = []
        if status:
            sql += " WHERE status = %s"
            args.append(status)
        args.append(limit)
        with self.connection() as conn:
            return conn.execute(sql + " ORDER BY id DESC LIMIT %s", args).fetchall()

    def counts(self) -> dict[str, int]:
        with self.connection() as conn:
            rows = conn.execute("SELECT status, COUNT(*) AS n FROM runs GROUP BY status").fetchall()
        return {r["status"]: int(r["n"]) for r in rows}

    # ------------------------------------------------------------------ backgrounds

    def get_background(self, key: str) -> dict[str, Any] | None:
        with self.connection() as conn:
            return conn.execute(BACKGROUND_SELECT + " WHERE key = %s", (key,)).fetchone()

    def put_background(self, row: dict[str, Any]) -> None:
        now = self.clock()
        data = {"created_at": now, "last_used_at": now, "hits": 0, **row}
        unknown = set(data) - set(BACKGROUND_FIELDS)
        if unknown:
            raise ValueError(f"unknown background columns: {sorted(unknown)}")
        names = list(data)
        updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in names if n != "key")
        with self.transaction() as conn:
            conn.execute(f"INSERT INTO backgrounds ({', '.join(names)}) VALUES ({', '.join('%s' for _ in names)}) "
                         f"ON CONFLICT (key) DO UPDATE SET {updates}", [data[n] for n in names])

    def touch_background(self, key: str, hits: int = 1) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE backgrounds SET last_used_at = %s, hits = hits + %s WHERE key = %s",
                         (self.clock(), hits, key))

    def delete_background(self, key: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM backgrounds WHERE key = %s", (key,))

    def list_backgrounds(self) -> list[dict[str, Any]]:
        with self.connection() as conn:
            return conn.execute(BACKGROUND_SELECT + " ORDER BY last_used_at DESC").fetchall()

    def lru_backgrounds(self) -> list[dict[str, Any]]:
        with self.connection() as conn:
            return conn.execute(BACKGROUND_SELECT + " ORDER BY last_used_at ASC, created_at ASC").fetchall()

    def backgrounds_total_bytes(self) -> int:
        with self.connection() as conn:
            row = conn.execute("SELECT COALESCE(SUM(bytes), 0) AS total FROM backgrounds").fetchone()
        return int(row["total"]) if row else 0

    # ------------------------------------------------------------------ the studio

    def beat(self, host: str, in_flight: int, epoch: str = "") -> tuple[str, float]:
        with self.transaction() as conn:
            row = conn.execute(
                "WITH old AS (SELECT epoch, extract(epoch FROM clock_timestamp() - last_beat)::float8 AS age "
                "FROM hosts WHERE host = %s) "
                "INSERT INTO hosts (host, in_flight, epoch) VALUES (%s, %s, %s) ON CONFLICT (host) DO UPDATE "
                "SET last_beat = now(), in_flight = EXCLUDED.in_flight, epoch = EXCLUDED.epoch "
                "RETURNING (SELECT epoch FROM old) AS epoch, (SELECT age FROM old) AS age",
                (host, host, in_flight, epoch)).fetchone()
        if row is None or row["epoch"] is None:
            return "", float("inf")
        return str(row["epoch"]), max(0.0, float(row["age"]))

    def hosts(self) -> list[HostRow]:
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT host, extract(epoch FROM started_at)::float8 AS started_at, "
                "extract(epoch FROM last_beat)::float8 AS last_beat, in_flight, "
                "extract(epoch FROM clock_timestamp() - last_beat)::float8 AS age FROM hosts ORDER BY host").fetchall()
        return [HostRow(host=r["host"], started_at=r["started_at"], last_beat=r["last_beat"],
                        in_flight=int(r["in_flight"]), age=max(0.0, r["age"])) for r in rows]

    def reserve_output(self, outbox: str, name: str, host: str, run_id: int | None = None) -> bool:
        # The same host and run asking again (a retried write) keeps its reservation.
        with self.transaction() as conn:
            row = conn.execute(
                "INSERT INTO output_names (outbox, name, host, run_id) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (outbox, name) DO UPDATE SET reserved_at = now() "
                "WHERE output_names.host = EXCLUDED.host AND output_names.run_id IS NOT DISTINCT FROM EXCLUDED.run_id "
                "RETURNING host", (outbox, shown(name), host, run_id)).fetchone()
        return row is not None

    def release_output(self, outbox: str, name: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM output_names WHERE outbox = %s AND name = %s", (outbox, shown(name)))

    def begin_generation(self, key: str, host: str, lease_seconds: float) -> bool:
        # Two hosts inserting at once: the second waits on the key's index entry, then finds the first's
        # live row and gets nothing back.
        with self.transaction() as conn:
            row = conn.execute(
                "INSERT INTO generations (key, host, expires_at) VALUES (%s, %s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (key) DO UPDATE SET host = EXCLUDED.host, started_at = now(), "
                "expires_at = EXCLUDED.expires_at "
                "WHERE generations.expires_at < now() OR generations.host = EXCLUDED.host RETURNING host",
                (key, host, float(lease_seconds))).fetchone()
        return row is not None

    def end_generation(self, key: str, host: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM generations WHERE key = %s AND host = %s", (key, host))

    def take_token(self, engine: str, per_minute: float, burst: int = 1, *, take: bool = True) -> float:
        """`take` False: only the seconds a caller would wait now (nothing taken, nothing written)."""
        if per_minute <= 0:
            return 0.0
        rate = per_minute / 60.0
        with self.transaction() as conn:
            conn.execute("INSERT INTO buckets (engine, tokens, updated_at) VALUES (%s, %s, clock_timestamp()) "
                         "ON CONFLICT (engine) DO NOTHING", (engine, float(burst)))
            # The row lock orders every host's take; the time is read after the lock is held.
            row = conn.execute("SELECT tokens, clock_timestamp() AS at, "
                               "greatest(0, extract(epoch FROM clock_timestamp() - updated_at))::float8 AS elapsed "
                               "FROM buckets WHERE engine = %s FOR UPDATE", (engine,)).fetchone()
            assert row is not None
            tokens = min(float(burst), float(row["tokens"]) + float(row["elapsed"]) * rate)
            wait = 0.0
            if tokens + _EPSILON < 1.0:
                wait = (1.0 - tokens) / rate
            elif take:
                tokens -= 1.0
            if not take:
                return wait
            conn.execute("UPDATE buckets SET tokens = %s, updated_at = %s WHERE engine = %s",
                         (tokens, row["at"], engine))
        return wait
