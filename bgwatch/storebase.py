"""What a store is: the interface the daemon's callers use, and the choice between SQLite and PostgreSQL.

`RunStore` is the interface that bgwatch.store.Store (SQLite, one workstation) has always offered and that
every caller uses (intake, recovery, the HTTP door, the cache, the CLI); bgwatch.pgstore.PgStore offers
the same methods on PostgreSQL, and tests/test_store_suite.py holds both to one behaviour. `StudioStore`
adds what only a shared store can do for a studio: output-name reservations, one generation per
background key, one generation bucket per engine, and each host's heartbeat.

A store that is away raises StoreUnavailable. It is an sqlite3.OperationalError on purpose: every caller
already treats that as "the store is busy, try again later" (the daemon's retry path, the cache's miss),
so PostgreSQL restarting takes the same path as SQLite's busy timeout, with no traceback.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from bgwatch.jobs import JobState
    from bgwatch.store import RunRow

SQLITE = "sqlite"
URL_SCHEMES = ("postgresql://", "postgres://")


class StoreUnavailable(sqlite3.OperationalError):
    """The studio store cannot be reached now (restarting, network away, pool exhausted); try again later.
    Its text never carries the database's credentials."""


def is_postgres(setting: str) -> bool:
    return setting.startswith(URL_SCHEMES)


_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(url: str) -> str:
    """A libpq URL or key=value string with its password replaced by ***, fit for logs, errors and status."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a malformed port raises here, not later)
    except ValueError:
        return url.split("://", 1)[0] + "://***"
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(query=query))


def _secrets(url: str) -> list[str]:
    if "://" not in url:
        return [m.group(2).strip("'") for m in _KEYWORD_PASSWORD.finditer(url)]
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [unquote(v) for v in re.findall(r"(?:^|&)password=([^&]*)", parts.query)]
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    return found


def scrub(text: str, url: str) -> str:
    """`text` (a driver's error message) with any password from `url` taken out."""
    text = text.replace(url, redact(url))
    for secret in sorted(_secrets(url), key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


@runtime_checkable
class RunStore(Protocol):
    """Every claimed job's run record and the generated-background cache index."""

    def check(self) -> None:
        """Refuse a damaged or unusable store at start with what to do (ConfigError)."""

    def close(self) -> None: ...

    # runs
    def add_run(self, *, key: str, inbox: str, rel_path: str, source_path: str, input_sha256: str,
                spec_json: str, host: str, status: JobState = ..., output_path: str = "") -> int: ...

    def get_run(self, run_id: int) -> RunRow | None: ...

    def start_run(self, run_id: int, host: str, at: float | None = None) -> bool: ...

    def set_output(self, run_id: int, output_path: str) -> None: ...

    def note(self, run_id: int, error: str) -> None: ...

    def finish_run(self, run_id: int, state: JobState, *, output_path: str = "", error: str = "",
                   mask_engine: str = "", bg_engine: str = "", seed: int | None = None,
                   timings: dict[str, float] | None = None, source_path: str | None = None) -> None: ...

    def mark_retried(self, run_id: int, source_path: str) -> None: ...

    def requeue(self, run_id: int) -> None: ...

    def find_done(self, key: str) -> RunRow | None: ...

    def runs_in(self, states: tuple[JobState, ...], host: str | None = None) -> list[RunRow]: ...

    def history(self, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]: ...

    def counts(self) -> dict[str, int]: ...

    # backgrounds
    def get_background(self, key: str) -> dict[str, Any] | None: ...

    def put_background(self, row: dict[str, Any]) -> None: ...

    def touch_background(self, key: str, hits: int = 1) -> None: ...

    def delete_background(self, key: str) -> None: ...

    def list_backgrounds(self) -> list[dict[str, Any]]: ...

    def lru_backgrounds(self) -> list[dict[str, Any]]: ...

    def backgrounds_total_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class HostRow:
    """One host of the studio as the store last heard of it."""

    host: str
    started_at: float
    last_beat: float  # on the server's clock, like `age`
    in_flight: int
    age: float  # seconds since its last heartbeat, measured by the server


@runtime_checkable
class StudioStore(RunStore, Protocol):
    """What only a store every host shares can do."""

    def beat(self, host: str, in_flight: int, epoch: str = "") -> tuple[str, float]:
        """This host is alive with `in_flight` jobs (the row `status` and `/metrics` show), beaten by the
        daemon `epoch`. Returns the epoch that beat before and how long ago ("" and inf: the first beat), so
        that two daemons beating under one host name see each other."""

    def hosts(self) -> list[HostRow]: ...

    def reserve_output(self, outbox: str, name: str, host: str, run_id: int | None = None) -> bool:
        """Take `name` in `outbox` for this host; False when another host (or run) already has it."""

    def release_output(self, outbox: str, name: str) -> None: ...

    def begin_generation(self, key: str, host: str, lease_seconds: float) -> bool:
        """True: this host generates the background `key` now. False: another live host is generating it
        (wait for its row in the backgrounds table). A generation whose host went silent past its lease is
        taken over."""

    def end_generation(self, key: str, host: str) -> None: ...

    def take_token(self, engine: str, per_minute: float, burst: int = 1, *, take: bool = True) -> float:
        """Take one generation token from the studio's bucket for `engine`: 0.0 when taken, else the seconds
        until one will be free (nothing taken). `take` False: only ask."""


def open_store(setting: str, *, sqlite_path: Any, host: str, clock: Callable[[], float] | None = None) -> RunStore:
    """The store `store:` names: SQLite at `sqlite_path`, or the studio's PostgreSQL (migrated on open)."""
    import time

    if is_postgres(setting):
        from bgwatch.errors import ConfigError

        try:
            from bgwatch.pgstore import PgStore

            return PgStore(setting, host=host, clock=clock or time.time)
        except ImportError as exc:
            raise ConfigError(redact(setting), "store", f"PostgreSQL needs psycopg ({exc.name} is not installed)",
                              "pip install 'bgwatch[studio]'") from None
        except StoreUnavailable as exc:
            raise ConfigError(redact(setting), "store", str(exc),
                              "a running server this host can reach, with the database created") from None
    from bgwatch.store import Store

    return Store(sqlite_path, clock=clock or time.time)


def open_for_reading(config: Any) -> RunStore | None:
    """The store a view (status, history, report, cache ls) reads: the studio's, or this workstation's SQLite
    once it has one (None before its first run: nothing to show, and no file made by looking)."""
    if not is_postgres(config.store) and not config.db_path.exists():
        return None
    return open_store(config.store, sqlite_path=config.db_path, host=config.host)


def studio_hosts(store: RunStore, lease_seconds: float) -> list[dict[str, Any]] | None:
    """Each host of the studio (alive: beat within the lease; jobs in flight; its last beat); None on SQLite."""
    if not isinstance(store, StudioStore):
        return None
    return [{"host": h.host, "alive": h.age <= lease_seconds, "in_flight": h.in_flight, "last_beat": h.last_beat,
             "seconds_since_beat": round(h.age, 1)} for h in store.hosts()]
