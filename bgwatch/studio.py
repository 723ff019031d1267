"""What a studio's hosts share beyond records: one generation bucket per engine, and one generation per
background key. Both work on any storebase.StudioStore (the PostgreSQL store).

StudioBucket has ratelimit.TokenBucket's interface (per_minute, unlimited, delay, acquire, set_rate), so the
daemon can hand either one to its engines and its HTTP door. Its tokens live in one row per engine, timed
by the server's clock: three workstations with `generations_per_minute: 6` make 6 a minute together.
A store that is away makes a generation wait (the limit is a promise to a paid service), never skip it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from bgwatch.ratelimit import TokenBucket
from bgwatch.storebase import StoreUnavailable, StudioStore

if TYPE_CHECKING:
    from bgwatch.doctor import Check
    from bgwatch.storebase import RunStore

T = TypeVar("T")


class StudioBucket(TokenBucket):
    """The studio's bucket for one engine (or one for every generation: name it "generations"): a TokenBucket
    whose tokens are a row every host shares, so it goes wherever the daemon hands a TokenBucket."""

    #: the longest single sleep while waiting: a stop is noticed, and the store is asked again, this often
    WAIT_SLICE = 1.0

    def __init__(self, store: StudioStore, engine: str, per_minute: float, *, burst: int = 1,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        super().__init__(per_minute, burst=burst, sleep=sleep)
        self.store = store
        self.engine = engine

    @property
    def unlimited(self) -> bool:
        return self.per_minute == 0.0

    def __repr__(self) -> str:
        rate = "unlimited" if self.unlimited else f"{self.per_minute:g}/min"
        return f"<StudioBucket {self.engine} {rate} burst={self.burst}>"

    def set_rate(self, per_minute: float) -> None:
        if per_minute < 0:
            raise ValueError(f"per_minute must be >= 0 (0 = unlimited), got {per_minute!r}")
        self.per_minute = float(per_minute)
        self._rate = self.per_minute / 60.0

    def try_acquire(self) -> bool:
        if self.unlimited:
            return True
        try:
            return self.store.take_token(self.engine, self.per_minute, self.burst) == 0.0
        except StoreUnavailable:
            return False

    def delay(self) -> float:
        """Seconds a caller arriving now would wait (the studio's bucket; a store away: one slice)."""
        if self.unlimited:
            return 0.0
        try:
            return self.store.take_token(self.engine, self.per_minute, self.burst, take=False)
        except StoreUnavailable:
            return self.WAIT_SLICE

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait for the studio's token and take it; False only if `stop` was set while waiting."""
        while not self.unlimited:
            try:
                wait = self.store.take_token(self.engine, self.per_minute, self.burst)
            except StoreUnavailable:
                wait = self.WAIT_SLICE
            if wait <= 0.0:
                return True
            if stop is not None and stop.is_set():
                return False
            self._sleep(min(wait, self.WAIT_SLICE))
            if stop is not None and stop.is_set():
                return False
        return True


def studio_generations(store: RunStore | None, config: Any) -> StudioGenerations | None:
    """One generation per key for the studio on a studio store (None otherwise: this host's own single flight,
    workers.SharedGenerations, is all there is). A generation's row outlives a stalled worker by nothing more."""
    if not isinstance(store, StudioStore):
        return None
    return StudioGenerations(store, config.host, config.pipeline.stall_seconds)


def watch_studio(metrics: Any, store: RunStore, lease_seconds: float) -> None:
    """/metrics on a studio store also shows the studio: each host (up, jobs in flight, seconds since its
    beat) and every host's runs by status, read from the store when Prometheus scrapes."""
    if not isinstance(store, StudioStore):
        return
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

    studio = store

    class StudioCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            up = GaugeMetricFamily("bgwatch_studio_store_up", "1 while the studio store answers")
            try:
                hosts, counts = studio.hosts(), studio.counts()
            except StoreUnavailable:
                up.add_metric([], 0.0)
                yield up
                return
            up.add_metric([], 1.0)
            yield up
            alive = GaugeMetricFamily("bgwatch_studio_host_up", "1 while the host beats within the lease",
                                      labels=["host"])
            busy = GaugeMetricFamily("bgwatch_studio_host_jobs_in_flight", "Jobs each host holds", labels=["host"])
            age = GaugeMetricFamily("bgwatch_studio_host_seconds_since_beat", "Seconds since each host's last beat "
                                    "(the server's clock)", labels=["host"])
            for host in hosts:
                alive.add_metric([host.host], 1.0 if host.age <= lease_seconds else 0.0)
                busy.add_metric([host.host], float(host.in_flight))
                age.add_metric([host.host], host.age)
            runs = GaugeMetricFamily("bgwatch_studio_runs", "Every host's runs, by status", labels=["status"])
            for status, n in sorted(counts.items()):
                runs.add_metric([status], float(n))
            yield from (alive, busy, age, runs)

    metrics.registry.register(StudioCollector())


def generation_bucket(store: RunStore, per_minute: float) -> TokenBucket:
    """The daemon's generation bucket: the studio's (one row for every host) on a studio store, else this
    host's own."""
    if isinstance(store, StudioStore):
        return StudioBucket(store, "generations", per_minute)
    return TokenBucket(per_minute)


class StudioGenerations:
    """One generation per background key for the whole studio, as the daemon's gate uses it: the host that
    leads a key holds its row in `generations` until its image is in the cache (`done`); the others wait
    for that image instead of generating it again. A store that is away costs at most a second generation,
    never a job."""

    def __init__(self, store: StudioStore, host: str, lease_seconds: float, *, poll: float = 0.5,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        self.store = store
        self.host = host
        self.lease_seconds = float(lease_seconds)
        self.poll = poll
        self._sleep = sleep

    def lead_or_wait(self, key: str, read: Callable[[], T | None], stop: threading.Event | None = None) -> T | None:
        """The image another host made (a hit), or None: this host generates it now, and calls done(key)."""
        while True:
            found = read()
            if found is not None:
                return found
            try:
                if self.store.begin_generation(key, self.host, self.lease_seconds):
                    found = read()  # kept by another host between our read and our turn
                    if found is not None:
                        self.done(key)
                    return found
            except StoreUnavailable:
                return None
            if stop is not None and stop.is_set():
                return None
            self._sleep(self.poll)

    def done(self, key: str) -> None:
        """This host's generation of `key` is in the cache, or failed: the others may go on."""
        with contextlib.suppress(StoreUnavailable):  # away: its lease runs out by itself
            self.store.end_generation(key, self.host)


def generate_once(store: StudioStore, key: str, host: str, read: Callable[[], T | None], generate: Callable[[], T],
                  *, lease_seconds: float = 600.0, poll: float = 0.5,
                  sleep: Callable[[float], object] = time.sleep) -> tuple[T, bool]:
    """The background `key` for the whole studio: (image, generated here). `read` gives the cached image or
    None; `generate` makes it and keeps it in the cache (its row written) before returning."""
    generations = StudioGenerations(store, host, lease_seconds, poll=poll, sleep=sleep)
    found = generations.lead_or_wait(key, read)
    if found is not None:
        return found, False
    try:
        return generate(), True
    finally:
        generations.done(key)


def store_checks(config: Any) -> list[Check]:
    """`bgwatch doctor` on a studio store: the connection, the server's version, the schema's migrations.
    Read only: migrations are applied by the daemon at start, never by looking."""
    from bgwatch.doctor import Check, Level
    from bgwatch.storebase import is_postgres, redact, scrub

    if not is_postgres(config.store):
        return []
    shown = redact(config.store)
    try:
        import psycopg

        from bgwatch import pgschema
    except ImportError as exc:
        return [Check("store", shown, Level.ERROR, f"psycopg is not installed ({exc.name}): "
                      "pip install 'bgwatch[studio]'")]
    try:
        with psycopg.connect(config.store, connect_timeout=5, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "?"
            have = pgschema.applied(conn)
    except psycopg.Error as exc:
        reason = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, config.store)
        return [Check("store", shown, Level.ERROR, f"cannot connect: {reason}")]
    detail: dict[str, str | int | float | bool | None] = {
        "server_version": version, "schema_version": max(have, default=0), "latest": pgschema.LATEST}
    checks = [Check("store", shown, Level.OK, f"PostgreSQL {version} answers", detail)]
    if config.cache.dir is None:
        checks.append(Check("store", "cache.dir", Level.WARNING, f"the background cache is this host's "
                            f"{config.cache_dir}: set cache.dir to a folder on the share so that every host's "
                            "generations are hits for the others"))
    newer = [v for v in have if v > pgschema.LATEST]
    missing = [v for v, _name, _sql in pgschema.MIGRATIONS if v not in have]
    if newer:
        checks.append(Check("store", "migrations", Level.ERROR, f"the database has schema version {max(newer)}, "
                            f"newer than this bgwatch knows ({pgschema.LATEST}): upgrade bgwatch here", detail))
    elif missing:
        checks.append(Check("store", "migrations", Level.WARNING, f"{len(missing)} migration(s) to apply "
                            f"(versions {', '.join(map(str, missing))}): the daemon applies them at its next start",
                            detail))
    else:
        checks.append(Check("store", "migrations", Level.OK, f"schema version {pgschema.LATEST}, up to date", detail))
    return checks
