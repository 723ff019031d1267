"""Admission by estimated working set (limits.max_memory), with threads as the daemon's prepare workers."""

from __future__ import annotations

import threading

from bgwatch.budget import MemoryBudget
from tests.helpers import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def start_acquire(budget: MemoryBudget, run_id: int, need: int, stop: threading.Event) -> list[bool]:
    got: list[bool] = []
    threading.Thread(target=lambda: got.append(budget.acquire(run_id, need, stop)), daemon=True).start()
    return got


def test_one_job_alone_is_always_admitted() -> None:
    budget = MemoryBudget(100)
    assert budget.acquire(1, 500, threading.Event()) and budget.in_use == 500
    budget.release(1)
    budget.release(1)  # idempotent
    assert budget.in_use == 0


def test_a_big_job_waits_while_small_ones_that_fit_go_first_then_it_is_not_starved() -> None:
    clock, stop = Clock(), threading.Event()
    budget = MemoryBudget(100, patience=30, clock=clock)
    assert budget.acquire(1, 60, stop)
    big = start_acquire(budget, 2, 90, stop)  # does not fit beside run 1
    small = start_acquire(budget, 3, 30, stop)  # fits: goes first, not held behind the big one
    wait_for(lambda: small == [True])
    assert big == [] and budget.in_use == 90
    clock.now = 31  # the big one has waited past its patience: it is next
    wait_for(lambda: budget._next == 2)
    later = start_acquire(budget, 4, 5, stop)  # would fit, but waits for the big one now
    budget.release(1)
    assert later == [] and budget._next == 2  # 5 fits beside 30, but the big one is next: nothing passes it
    budget.release(3)
    wait_for(lambda: big == [True])
    wait_for(lambda: later == [True])  # fits beside the big one, once the big one is in
    assert budget.in_use == 95 and list(budget._held) == [2, 4]  # the big one first
    budget.release(2)
    stop.set()


def test_a_waiting_job_gives_up_when_the_daemon_stops() -> None:
    stop = threading.Event()
    budget = MemoryBudget(100)
    assert budget.acquire(1, 100, stop)
    waiting = start_acquire(budget, 2, 50, stop)
    stop.set()
    wait_for(lambda: waiting == [False])
    assert budget.in_use == 100
