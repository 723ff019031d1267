"""Rate limits. TokenBucket: at most `per_minute` jobs a minute, with bursts of up to `burst`.

It waits, never drops: a caller that finds the bucket empty queues behind the callers already waiting
and gets its token in turn (first come, first served), so no waiter starves. The clock and the sleep are
passed in, so tests drive time instead of waiting for it.

RequestSchedule: the same rate for callers that must know at once how long they would wait (the HTTP
door answers 429 instead of waiting past http.max_wait): each books its slot, or is told it is too far.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class TokenBucket:
    """Hands out tokens at `per_minute` a minute (0 = unlimited), holding at most `burst` in reserve."""

    #: the longest single sleep while waiting, so that a stop event is noticed promptly
    WAIT_SLICE = 0.1

    def __init__(
        self,
        per_minute: float,
        *,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if per_minute < 0:
            raise ValueError(f"per_minute must be >= 0 (0 = unlimited), got {per_minute!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.per_minute = float(per_minute)
        self.burst = int(burst)
        self._rate = self.per_minute / 60.0  # tokens a second
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._updated = clock()
        # Waiters, oldest first. A waiter may take a token only when there are enough for everyone
        # ahead of it too, so newcomers (and try_acquire) never jump the queue.
        self._queue: deque[object] = deque()

    # Float rounding must not leave a waiter sleeping for a billionth of a token.
    _EPSILON = 1e-9

    @property
    def unlimited(self) -> bool:
        return self._rate == 0.0

    def __repr__(self) -> str:
        rate = "unlimited" if self.unlimited else f"{self.per_minute:g}/min"
        return f"<TokenBucket {rate} burst={self.burst}>"

    def set_rate(self, per_minute: float) -> None:
        """Change the rate (a config reload); waiters carry on at the new rate, or go at once if 0."""
        if per_minute < 0:
            raise ValueError(f"per_minute must be >= 0 (0 = unlimited), got {per_minute!r}")
        with self._lock:
            if self.unlimited:  # no tokens were counted while unlimited: start full
                self._tokens = float(self.burst)
                self._updated = self._clock()
            else:
                self._refill()
            self.per_minute = float(per_minute)
            self._rate = self.per_minute / 60.0

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self._rate)

    def _wait_for(self, position: int) -> float:
        """Seconds until there are tokens for `position` waiters ahead plus this one."""
        missing = position + 1 - self._tokens
        return 0.0 if missing <= self._EPSILON else missing / self._rate

    def try_acquire(self) -> bool:
        """Take a token if one is free now and nobody is waiting for one; never waits."""
        if self.unlimited:
            return True
        with self._lock:
            self._refill()
            if self._tokens + self._EPSILON >= len(self._queue) + 1:
                self._tokens -= 1.0
                return True
            return False

    def delay(self) -> float:
        """Seconds a caller arriving now would wait for its token (0 if one is free now)."""
        if self.unlimited:
            return 0.0
        with self._lock:
            self._refill()
            return self._wait_for(len(self._queue))

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait for a token and take it. Returns False only if `stop` was set while waiting."""
        if self.unlimited:
            return True
        ticket = object()
        with self._lock:
            self._queue.append(ticket)
        try:
            while True:
                with self._lock:
                    if self.unlimited:  # set_rate(0) while we waited
                        self._queue.remove(ticket)
                        ticket = None
                        return True
                    self._refill()
                    position = self._queue.index(ticket)
                    if self._tokens + self._EPSILON >= position + 1:
                        self._tokens -= 1.0
                        self._queue.remove(ticket)
                        ticket = None
                        return True
                    wait = self._wait_for(position)
                if stop is not None and stop.is_set():
                    return False
                self._sleep(min(wait, self.WAIT_SLICE))
                if stop is not None and stop.is_set():
                    return False
        finally:
            if ticket is not None:
                with self._lock:
                    self._queue.remove(ticket)


class RequestSchedule:
    """http.limit requests: every request books the next free slot of `per_minute` a minute, with a burst
    of `burst` (the original service's bucket starts full: burst = per_minute). Booking in order is fair
    (first come, first served) and needs no polling: the caller sleeps until its slot."""

    def __init__(self, per_minute: float, *, burst: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.burst = max(1, burst)
        self.clock = clock
        self._lock = threading.Lock()
        self._next = clock()  # the theoretical arrival time of the next request (GCRA)

    def book(self, max_wait: float) -> float | None:
        """Seconds to wait for this request's slot (booked); None when that is more than max_wait (nothing
        booked)."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self.clock()
            start = max(self._next, now)
            wait = max(0.0, start - now - (self.burst - 1) * self.interval)
            if wait > max_wait:
                return None
            self._next = start + self.interval
            return wait

    def delay(self) -> float:
        """Seconds a request arriving now would wait (nothing booked)."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self.clock()
            return max(0.0, max(self._next, now) - now - (self.burst - 1) * self.interval)
