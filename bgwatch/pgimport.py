"""`bgwatch store migrate FROM TO`: a workstation's SQLite history into the studio's PostgreSQL.

Every run keeps its host, times, engines, timings and paths; it gets a new id in the studio (ids are the
studio's) and an `origin` (host, its id in the SQLite file, its creation time) so that running the
import again, or importing the same file twice, adds nothing twice. Background rows are imported when
their key is not in the studio yet (their files stay where they are: a cache folder every host reaches
makes them hits for everyone). The SQLite file is opened read-only: the workstation keeps its history.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bgwatch.errors import ConfigError

if TYPE_CHECKING:
    from bgwatch.pgstore import PgStore

RUN_COPIED = ("key", "inbox", "rel_path", "source_path", "input_sha256", "spec_json", "status", "attempts", "host",
              "mask_engine", "bg_engine", "seed", "output_path", "error", "created_at", "started_at", "finished_at",
              "timings_json")
# The studio's NOT NULL columns, for rows an older SQLite left empty (nullable ones stay None).
_NOT_NULL: dict[str, Any] = {name: "" for name in RUN_COPIED if name not in ("seed", "started_at", "finished_at")}
_NOT_NULL.update(attempts=0, created_at=0.0)
BATCH = 500


@dataclass(frozen=True, slots=True)
class Imported:
    runs: int  # added to the studio
    runs_known: int  # already there from an earlier import
    backgrounds: int
    backgrounds_known: int

    def __str__(self) -> str:
        return (f"{self.runs} run(s) imported ({self.runs_known} already there), {self.backgrounds} background(s) "
                f"imported ({self.backgrounds_known} already there)")


def sqlite_file(source: Path) -> Path:
    """FROM may be the database itself or the state folder holding bgwatch.db."""
    path = source / "bgwatch.db" if source.is_dir() else source
    if not path.is_file():
        raise ConfigError(source, "FROM", "no SQLite history here", "a state folder holding bgwatch.db, or the file")
    return path


def _rows(conn: sqlite3.Connection, table: str) -> list[dict[str, Any]]:
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
        return []
    cur = conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur]


def import_sqlite(source: Path, store: PgStore, *, host: str = "") -> Imported:
    """Copy `source`'s runs and backgrounds into `store`; `host` names rows that carry none."""
    from bgwatch.pgstore import BACKGROUND_FIELDS

    path = sqlite_file(source)
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            runs, backgrounds = _rows(conn, "runs"), _rows(conn, "backgrounds")
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(path, "FROM", f"cannot read this SQLite history ({exc})") from None
    added = bg_added = 0
    with store.connection() as pg, pg.transaction():
        for start in range(0, len(runs), BATCH):
            for row in runs[start:start + BATCH]:
                given = {**row, "host": row.get("host") or host}
                values = [_NOT_NULL.get(name) if given.get(name) is None else given[name] for name in RUN_COPIED]
                origin = f"{given['host']}#{row['id']}@{row.get('created_at') or 0}"
                cur = pg.execute(
                    f"INSERT INTO runs ({', '.join(RUN_COPIED)}, origin) VALUES "
                    f"({', '.join('%s' for _ in RUN_COPIED)}, %s) ON CONFLICT (origin) DO NOTHING",
                    [*values, origin])
                added += cur.rowcount
        for row in backgrounds:
            names = [n for n in BACKGROUND_FIELDS if n in row]
            cur = pg.execute(f"INSERT INTO backgrounds ({', '.join(names)}) VALUES "
                             f"({', '.join('%s' for _ in names)}) ON CONFLICT (key) DO NOTHING",
                             [row[n] for n in names])
            bg_added += cur.rowcount
    return Imported(added, len(runs) - added, bg_added, len(backgrounds) - bg_added)


def migrate_command(source: Path, target: str, *, host: str = "") -> str:
    """`bgwatch store migrate FROM TO`'s line: what was imported, the target shown without its password."""
    from bgwatch.pgstore import PgStore
    from bgwatch.storebase import StoreUnavailable, is_postgres, redact

    if not is_postgres(target):
        raise ConfigError("bgwatch store migrate", "TO", f"{redact(target)!r} is not a PostgreSQL URL",
                          "postgresql://user@host/dbname (the studio's `store:`)")
    path = sqlite_file(source)
    try:
        store = PgStore(target, host=host)
    except StoreUnavailable as exc:
        raise ConfigError("bgwatch store migrate", "TO", str(exc)) from None
    try:
        done = import_sqlite(path, store, host=host)
    except StoreUnavailable as exc:
        raise ConfigError("bgwatch store migrate", "TO", str(exc)) from None
    finally:
        store.close()
    return f"{path} -> {store.shown}: {done}"
