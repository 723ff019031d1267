"""The studio's generation bucket over 90 s of its clock in a fraction of a second: the bucket's row is timed by
the server's clock, so the test's clock moves it on by ageing the row (each sleep the bucket asks for makes the
row that much older), and three hosts' buckets on one PostgreSQL share it. Issue 16: with
`generations_per_minute: 6`, at most 10 generations in the first 90 s across all hosts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bgwatch.ratelimit import TokenBucket
from tests import pgserver

pg_cluster = pgserver.pg_cluster
pg_url = pgserver.pg_url


class StudioClock:
    """Seconds since the start, moved on only by the buckets' sleeps: each sleep ages every bucket row."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        with self.store.transaction() as conn:
            conn.execute("UPDATE buckets SET updated_at = updated_at - make_interval(secs => %s)", (seconds,))

    def clock(self) -> float:
        return self.now


@pytest.fixture
def stores(pg_url: str) -> Iterator[list[Any]]:
    from bgwatch.pgstore import PgStore

    made = [PgStore(pg_url, host=f"h{i}") for i in (1, 2, 3)]
    yield made
    for store in made:
        store.close()


def _take_in_turn(buckets: list[TokenBucket], clock: StudioClock, jobs: int, window: float) -> list[tuple[float, int]]:
    """Each host in turn waits for a token for its next job; (when, host) for every token taken in the window."""
    taken: list[tuple[float, int]] = []
    for job in range(jobs):
        host = job % len(buckets)
        assert buckets[host].acquire()
        if clock.now > window:
            break
        taken.append((clock.now, host))
    return taken


def test_three_hosts_at_6_a_minute_make_at_most_10_generations_in_90_s(stores: list[Any]) -> None:
    from bgwatch.studio import StudioBucket

    clock = StudioClock(stores[0])
    buckets: list[TokenBucket] = [StudioBucket(store, "runway", 6, sleep=clock.sleep) for store in stores]
    taken = _take_in_turn(buckets, clock, 30, 90.0)
    assert len(taken) == 10, taken  # one at once, then one every 10 s for the whole studio
    assert [round(at) for at, _host in taken] == list(range(0, 91, 10))
    assert {host for _at, host in taken} == {0, 1, 2}  # every host took its share of the one bucket
    assert clock.sleeps and max(clock.sleeps) <= StudioBucket.WAIT_SLICE  # waited in slices: a stop is heard


def test_each_hosts_own_bucket_would_make_three_times_that(stores: list[Any]) -> None:
    """What the studio's bucket prevents: the same three hosts, each with its own bucket, on the same clock."""
    clock = StudioClock(stores[0])
    buckets = [TokenBucket(6, clock=clock.clock, sleep=clock.sleep) for _ in stores]
    assert len(_take_in_turn(buckets, clock, 60, 90.0)) == 30
