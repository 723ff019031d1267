"""TokenBucket on a fake clock: rate, burst, waiting in slices, stop, fairness between threads."""

from __future__ import annotations

import threading
import time

import pytest

from bgwatch.ratelimit import TokenBucket


class FakeTime:
    """A clock that moves only when someone sleeps (or the test advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.lock = threading.Lock()

    def clock(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def bucket(per_minute: float, burst: int = 1, t: FakeTime | None = None) -> tuple[TokenBucket, FakeTime]:
    t = t or FakeTime()
    return TokenBucket(per_minute, burst=burst, clock=t.clock, sleep=t.sleep), t


def test_unlimited_never_waits() -> None:
    b, t = bucket(0)
    assert all(b.try_acquire() for _ in range(1000))
    assert all(b.acquire() for _ in range(1000))
    assert b.delay() == 0.0
    assert t.sleeps == []


def test_burst_then_the_rate() -> None:
    b, t = bucket(60, burst=3)  # one a second
    assert [b.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert b.delay() == pytest.approx(1.0)
    t.advance(0.5)
    assert not b.try_acquire()
    assert b.delay() == pytest.approx(0.5)
    t.advance(0.5)
    assert b.try_acquire()
    t.advance(100)  # idle time refills up to the burst, no further
    assert [b.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_acquire_waits_in_slices_and_never_drops() -> None:
    b, t = bucket(120)  # one every 0.5 s
    start = t.now
    for _ in range(10):
        assert b.acquire() is True
    # the first token was there; the other nine came at the rate
    assert t.now - start == pytest.approx(9 * 0.5)
    assert t.sleeps and max(t.sleeps) <= TokenBucket.WAIT_SLICE + 1e-12


def test_acquire_returns_false_when_stopped_and_leaves_the_queue() -> None:
    b, t = bucket(1)  # one a minute
    assert b.try_acquire()
    stop = threading.Event()

    def sleep_then_stop(seconds: float) -> None:
        t.sleep(seconds)
        if t.now - 1000.0 >= 2.0:
            stop.set()

    b._sleep = sleep_then_stop
    assert b.acquire(stop) is False
    assert t.now - 1000.0 == pytest.approx(2.0)  # stopped within a slice of being asked to
    t.advance(60)
    assert b.try_acquire()  # the abandoned place in the queue holds nobody up


def test_set_rate_takes_effect_for_waiters() -> None:
    b, t = bucket(1)
    assert b.try_acquire()
    b.set_rate(600)  # 10 a second
    start = t.now
    assert b.acquire()
    assert t.now - start <= 0.1 + 1e-9
    b.set_rate(0)
    assert all(b.try_acquire() for _ in range(100))
    with pytest.raises(ValueError):
        b.set_rate(-1)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="per_minute"):
        TokenBucket(-1)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(10, burst=0)


def test_waiters_are_served_first_come_first_served() -> None:
    """Real threads, a fake clock that only the test moves: each token goes to the oldest waiter, and
    neither later waiters nor try_acquire can jump the queue."""
    t = FakeTime()
    b = TokenBucket(60, clock=t.clock, sleep=lambda s: time.sleep(0.002))  # real naps, frozen clock
    assert b.try_acquire()
    served: list[int] = []
    lock = threading.Lock()

    def waiter(i: int) -> None:
        assert b.acquire()
        with lock:
            served.append(i)

    threads = []
    for i in range(5):
        th = threading.Thread(target=waiter, args=(i,), daemon=True)
        th.start()
        threads.append(th)
        # delay() counts the queue: wait until this waiter is in it before starting the next
        deadline = time.monotonic() + 5
        while b.delay() < i + 2 - 1e-6:  # i + 1 waiters, then the newcomer: i + 2 tokens away
            assert time.monotonic() < deadline, "waiter did not queue"
            time.sleep(0.002)
    for n in range(1, 6):
        t.advance(1.0)  # exactly one more token...
        assert not b.try_acquire()  # ...which a newcomer never takes from a waiter
        deadline = time.monotonic() + 5
        while len(served) < n:
            assert time.monotonic() < deadline, f"no one was served token {n}"
            time.sleep(0.002)
        assert served == list(range(n))
    for th in threads:
        th.join(timeout=5)
    assert served == [0, 1, 2, 3, 4]
