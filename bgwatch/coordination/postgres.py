"""Coordination through the studio's PostgreSQL: who holds a file is a row with a lease and a fencing token
(pgclaims.py), who is alive is a row in `hosts` beaten on the server's clock. The files stay on the share
and move as before, only by their holder and only by no-replace renames (custody): a row admits a host to
a file, the rename moves it. Nothing here reads or writes heartbeat files, so no host polls the share to
learn who is alive.

A store that is away: the beat fails, this host stops claiming (may_claim is False after half a lease),
judges nobody silent and reclaims nothing, and its jobs in flight go on; the rows' leases outlive a short
outage, and the share's fence still decides every delivery.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from loguru import logger

from bgwatch.pgclaims import PgClaims, RowClaim
from bgwatch.storebase import StoreUnavailable

if TYPE_CHECKING:
    from bgwatch.claims import Claim
    from bgwatch.coordination import Coordinator
    from bgwatch.delivery import Custody, Settled
    from bgwatch.pgstore import PgStore
    from bgwatch.storebase import RunStore


class PostgresCoordinator:
    """One inbox, as one host coordinates with the others through the studio store."""

    def __init__(self, custody: Custody, store: PgStore, lease_seconds: float, *, inbox_key: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.custody = custody
        self.store = store
        self.host = custody.host
        # The inbox's name in the rows: the same on every host even where the share is mounted elsewhere.
        self.inbox_key = inbox_key or str(custody.inbox)
        self.lease_seconds = float(lease_seconds)
        self.rows = PgClaims(store, self.host, lease_seconds)
        self.clock = clock
        self._held: dict[str, tuple[RowClaim, Claim]] = {}  # by the claim's name under claimed/<host>/
        self._last_ok: float | None = None
        self._problem = ""

    # ------------------------------------------------------------------ liveness

    def beat(self) -> bool:
        """Alive in `hosts`; leases renewed for the files still claimed, rows of files gone from claimed/
        (fenced for delivery, or returned) settled."""
        try:
            self.store.beat(self.host, len(self._held))
            for name, (row, claim) in list(self._held.items()):
                if not claim.path.exists():
                    self.rows.settle(row)
                    self._held.pop(name, None)
            # Only the claims this coordinator made: rows left by an earlier start or reload run out by
            # themselves (their files are this host's on the share whatever the row says).
            self.rows.renew(self.inbox_key, [row.rel for row, _claim in self._held.values()])
        except StoreUnavailable as exc:
            if not self._problem:
                logger.warning("{}: not claiming until the studio store answers again ({})", self.custody.inbox, exc)
            self._problem = f"the studio store is unavailable ({exc})"
            return False
        if self._problem:
            logger.info("{}: the studio store answers again; claiming resumes", self.custody.inbox)
        self._problem = ""
        self._last_ok = self.clock()
        return True

    def may_claim(self) -> bool:
        return self._last_ok is not None and self.clock() - self._last_ok < self.lease_seconds / 2

    def why_not_claiming(self) -> str:
        if self.may_claim():
            return ""
        return self._problem or "no recent heartbeat in the studio store"

    # ------------------------------------------------------------------ files

    def claim(self, rel: str, sidecar_rel: str | None = None) -> Claim | None:
        """The row first (one host wins it), then the rename (the file may still have gone: its row goes).
        StoreUnavailable (an sqlite3.Error, as a busy store's) when the store is away: try again later."""
        try:
            row = self.rows.claim(self.inbox_key, rel)
        except StoreUnavailable as exc:
            # Not "another host has it": the caller keeps the file waiting, and claims nothing more until a
            # beat reaches the store again.
            self._last_ok = None
            self._problem = f"the studio store is unavailable ({exc})"
            raise
        if row is None:
            return None
        try:
            claim = self.custody.claim(rel, sidecar_rel)
        except BaseException:
            self._forget(row)
            raise
        if claim is None:
            self._forget(row)
            return None
        self._held[claim.name] = (row, claim)
        return claim

    def _forget(self, row: RowClaim) -> None:
        with contextlib.suppress(StoreUnavailable):  # away: its lease runs out by itself
            self.rows.settle(row)

    def still_holds(self, token: str) -> bool:
        """The delivery's fence on the share, and a lease this host has renewed within half a lease."""
        return self.may_claim() and self.custody.still_holds(token)

    def settle(self, host: str, token: str) -> Settled:
        return self.custody.settle(host, token)

    def silent_hosts(self) -> list[str]:
        """Hosts with files or rows here whose beat in `hosts` is older than the lease (the server's clock).
        Nobody is judged while the store is away."""
        try:
            ages = {h.host: h.age for h in self.store.hosts()}
            candidates = set(self.custody.other_hosts()) | set(self.rows.holders(self.inbox_key))
        except StoreUnavailable:
            return []
        candidates.discard(self.host)
        return sorted(h for h in candidates if ages.get(h, float("inf")) > self.lease_seconds)

    def reclaim_silent(self, host: str) -> list[str]:
        """Take the silent host's expired rows (SKIP LOCKED: two reclaimers split them), then move its files
        back through custody, then free the rows: the files are in the inbox for anyone to claim."""
        if host == self.host:
            raise ValueError("a host does not reclaim its own files while it runs")
        try:
            if host not in self.silent_hosts():
                return []
            taken = self.rows.take_over(self.inbox_key, host)
        except StoreUnavailable:
            return []
        back = self.custody.reclaim(host)
        for row in taken:
            self._forget(row)
        return back


def studio_coordinator(store: RunStore, custody: Custody, lease_seconds: float,
                       inbox_key: str) -> PostgresCoordinator | None:
    """The coordinator a studio store gives an inbox (None: the share coordinates, as on SQLite)."""
    from bgwatch.pgstore import PgStore

    if not isinstance(store, PgStore):
        return None
    return PostgresCoordinator(custody, store, lease_seconds, inbox_key=inbox_key)


if TYPE_CHECKING:
    def _is_a_coordinator(coordinator: PostgresCoordinator) -> Coordinator:
        return coordinator  # mypy proves the interface is met
