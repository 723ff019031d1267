"""What a studio's hosts share beyond records: one generation bucket per engine, and one generation per
background key. Both work on any storebase.StudioStore (the PostgreSQL store).

StudioBucket has ratelimit.TokenBucket's interface (per_minute, unlimited, delay, acquire, set_rate), so the
daemon can hand either one to its engines and its HTTP door. Its tokens live in one row per engine, timed
by the server's clock: three workstations with `generations_per_minute: 6` make 6 a minute together.
A store that is away makes a generation wait (the limit is a promise to a paid service), never skip it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from bgwatch.ratelimit import TokenBucket
from bgwatch.storebase import StoreUnavailable, StudioStore

if TYPE_CHECKING:
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


def generation_bucket(store: RunStore, per_minute: float) -> TokenBucket:
    """The daemon's generation bucket: the studio's (one row for every host) on a studio store, else this
    host's own."""
    if isinstance(store, StudioStore):
        return StudioBucket(store, "generations", per_minute)
    return TokenBucket(per_minute)


def generate_once(store: StudioStore, key: str, host: str, read: Callable[[], T | None], generate: Callable[[], T],
                  *, lease_seconds: float = 600.0, poll: float = 0.5,
                  sleep: Callable[[float], object] = time.sleep) -> tuple[T, bool]:
    """The background `key` for the whole studio: (image, generated here).

    `read` gives the cached image or None; `generate` makes it and keeps it in the cache (its row written)
    before returning. Of the hosts asking at once, one generates and the others wait and read its result;
    if the generating host fails or goes silent past `lease_seconds`, a waiting host takes over."""
    while True:
        found = read()
        if found is not None:
            return found, False
        if store.begin_generation(key, host, lease_seconds):
            try:
                found = read()  # made and kept between our read and our turn
                if found is not None:
                    return found, False
                return generate(), True
            finally:
                store.end_generation(key, host)
        sleep(poll)
