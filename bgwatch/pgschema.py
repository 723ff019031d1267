"""The studio store's schema, as numbered migrations applied at start (no ORM).

Each migration is a list of statements with a version number; `bgwatch_schema` holds the versions
applied. Every host runs `migrate` when it opens the store: under one advisory lock, so two hosts starting
at once apply each version exactly once, and a host whose code is older than the database is refused
(it would not know the newer columns) instead of writing half-rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bgwatch.errors import ConfigError

if TYPE_CHECKING:
    import psycopg

# An arbitrary constant: the advisory lock that serialises migrations across hosts.
MIGRATION_LOCK = 0x62677761746368  # "bgwatch"

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "runs, backgrounds, hosts", (
        """CREATE TABLE runs (
            id bigserial PRIMARY KEY,
            key text NOT NULL,
            inbox text NOT NULL DEFAULT '',
            rel_path text NOT NULL DEFAULT '',
            source_path text NOT NULL DEFAULT '',
            input_sha256 text NOT NULL DEFAULT '',
            spec_json text NOT NULL DEFAULT '',
            status text NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            host text NOT NULL DEFAULT '',
            mask_engine text NOT NULL DEFAULT '',
            bg_engine text NOT NULL DEFAULT '',
            seed bigint,
            output_path text NOT NULL DEFAULT '',
            error text NOT NULL DEFAULT '',
            created_at double precision NOT NULL DEFAULT 0,
            started_at double precision,
            finished_at double precision,
            timings_json text NOT NULL DEFAULT '',
            origin text UNIQUE
        )""",
        "CREATE INDEX runs_key_status ON runs (key, status)",
        "CREATE INDEX runs_status_host ON runs (status, host)",
        """CREATE TABLE backgrounds (
            key text PRIMARY KEY,
            engine text, model text, prompt text, negative_prompt text, seed bigint,
            width integer, height integer, steps integer, guidance_scale double precision,
            path text, bytes bigint NOT NULL DEFAULT 0,
            created_at double precision, last_used_at double precision, hits integer NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX backgrounds_last_used ON backgrounds (last_used_at)",
        """CREATE TABLE hosts (
            host text PRIMARY KEY,
            started_at timestamptz NOT NULL DEFAULT now(),
            last_beat timestamptz NOT NULL DEFAULT now(),
            in_flight integer NOT NULL DEFAULT 0
        )""",
    )),
    (2, "output names, generations, generation buckets", (
        """CREATE TABLE output_names (
            outbox text NOT NULL, name text NOT NULL, host text NOT NULL, run_id bigint,
            reserved_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (outbox, name)
        )""",
        """CREATE TABLE generations (
            key text PRIMARY KEY, host text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(), expires_at timestamptz NOT NULL
        )""",
        """CREATE TABLE buckets (
            engine text PRIMARY KEY, tokens double precision NOT NULL, updated_at timestamptz NOT NULL
        )""",
    )),
    (3, "claims, leases and fencing tokens", (
        "CREATE SEQUENCE fencing_tokens",
        """CREATE TABLE claims (
            inbox text NOT NULL, rel_path text NOT NULL,
            offered_at timestamptz NOT NULL DEFAULT now(),
            holder text, token bigint, expires_at timestamptz,
            PRIMARY KEY (inbox, rel_path)
        )""",
        "CREATE INDEX claims_holder ON claims (holder)",
        "CREATE INDEX claims_free ON claims (expires_at NULLS FIRST, offered_at)",
    )),
    (4, "the epoch of the daemon that beats for a host (two daemons with one name)", (
        "ALTER TABLE hosts ADD COLUMN epoch text NOT NULL DEFAULT ''",
    )),
)

LATEST = MIGRATIONS[-1][0]


def applied(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    exists = conn.execute("SELECT to_regclass('bgwatch_schema') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    return [int(str(v)) for (v,) in conn.execute("SELECT version FROM bgwatch_schema ORDER BY version")]


def migrate(conn: psycopg.Connection[tuple[object, ...]], where: str) -> list[int]:
    """Apply the versions this database lacks, in order, each in its own transaction; returns them."""
    done: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS bgwatch_schema (version integer PRIMARY KEY, name text NOT NULL, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        have = set(applied(conn))
        newer = sorted(v for v in have if v > LATEST)
        if newer:
            raise ConfigError(where, "store", f"the database has schema version {newer[-1]}, newer than this "
                              f"bgwatch knows ({LATEST})", "upgrade bgwatch on this host to the studio's version")
        for version, name, statements in MIGRATIONS:
            if version in have:
                continue
            with conn.transaction():
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO bgwatch_schema (version, name) VALUES (%s, %s)", (version, name))
            done.append(version)
    return done
