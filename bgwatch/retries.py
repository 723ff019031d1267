"""Deliveries waiting for storage: an outbox (or done/) that is full, over quota, read-only or failing.

The output is kept in memory and its claim held (the original is back in this host's claimed folder, the
heartbeat goes on, so no other host takes it). It is tried again with back-off — 2, 4, 8 … 60 s — never in
a hot loop, and the cause is named: in the log (a WARNING when it starts, INFO when it clears), on the run's
row (`history` shows it), in `status` and in /metrics (per error). After `give_up_seconds` the job fails
with the cause in its NAME.error.txt, so `bgwatch retry --failed` redoes it once there is room.
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass, field
from typing import Generic, TypeVar

FIRST_DELAY = 2.0
MAX_DELAY = 60.0
GIVE_UP_SECONDS = 600.0

T = TypeVar("T")


@dataclass(slots=True)
class _Waiting(Generic[T]):
    item: T
    cause: str
    since: float
    due: float
    attempts: int = 1


@dataclass(slots=True)
class Retries(Generic[T]):
    """Items (finished jobs) waiting to be delivered again, by run id. Main thread only."""

    give_up_seconds: float = GIVE_UP_SECONDS
    waiting: dict[int, _Waiting[T]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)  # errno name -> how many times, since the start

    def add(self, run_id: int, item: T, cause: str, code: int, now: float) -> tuple[int, float]:
        """Another failed attempt; returns (attempts so far, seconds until the next one)."""
        self.errors[errno.errorcode.get(code, str(code))] += 1
        entry = self.waiting.get(run_id)
        if entry is None:
            entry = self.waiting[run_id] = _Waiting(item, cause, now, now)
        else:
            entry.attempts += 1
            entry.item, entry.cause = item, cause
        delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (entry.attempts - 1))
        entry.due = now + delay
        return entry.attempts, delay

    def due(self, now: float) -> list[tuple[T, bool]]:
        """The items to try again now, each with whether it is the last try (then it fails if it fails)."""
        ready = [w for w in self.waiting.values() if w.due <= now]
        for w in ready:
            w.due = float("inf")  # being tried: add() again if it fails, clear() when it ended
        return [(w.item, now - w.since >= self.give_up_seconds) for w in ready]

    def clear(self, run_id: int) -> bool:
        """The run ended (delivered, failed, superseded): True if it had been waiting."""
        return self.waiting.pop(run_id, None) is not None

    def problems(self) -> list[str]:
        return [f"run {run_id}: {w.cause} (try {w.attempts}, waiting since {w.since:.0f})"
                for run_id, w in sorted(self.waiting.items())]

    def __contains__(self, run_id: int) -> bool:
        return run_id in self.waiting

    def __len__(self) -> int:
        return len(self.waiting)
