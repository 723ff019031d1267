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
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from bgwatch.pgclaims import PgClaims, RowClaim
from bgwatch.storebase import StoreUnavailable
from bgwatch.text import shown

if TYPE_CHECKING:
    from bgwatch.claims import Claim
    from bgwatch.coordination import Coordinator
    from bgwatch.delivery import Custody, Settled
    from bgwatch.pgstore import PgStore
    from bgwatch.safefs import Folder
    from bgwatch.storebase import RunStore


class PostgresCoordinator:
    """One inbox, as one host coordinates with the others through the studio store."""

    def __init__(self, custody: Custody, store: PgStore, lease_seconds: float, *, inbox_key: str | None = None,
                 in_flight: Callable[[], int] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.custody = custody
        self.store = store
        self.host = custody.host
        self._inbox_key = inbox_key  # None: the inbox's own id, read from the share when first needed
        self.lease_seconds = float(lease_seconds)
        self.rows = PgClaims(store, self.host, lease_seconds)
        self.clock = clock
        # The host's jobs in flight, for `status` and /metrics (the daemon's count; else this inbox's claims).
        self.in_flight = in_flight or (lambda: len(self._held))
        self._held: dict[str, tuple[RowClaim, Claim]] = {}  # by the claim's name under claimed/<host>/
        self._last_ok: float | None = None
        self._problem = ""
        self._twin = ""  # the epoch of another daemon beating under this host's name
        self._beats = 0

    @property
    def inbox_key(self) -> str:
        """The inbox's name in the rows: the same on every host wherever it mounts the share. OSError while
        the inbox is away."""
        if self._inbox_key is None:
            self._inbox_key = inbox_id(self.custody.inbox)
        return self._inbox_key

    # ------------------------------------------------------------------ liveness

    def beat(self) -> bool:
        """Alive in `hosts`; leases renewed for the files still claimed, rows of files gone from claimed/
        (fenced for delivery, or returned) settled."""
        try:
            before, ago = self.store.beat(self.host, self.in_flight(), self.custody.epoch)
            # Another daemon beating under this host's name between two of ours, within the lease (a cloned
            # VM): neither claims until one of them has stopped, as with heartbeat files on the share. A first
            # beat that finds the previous daemon's epoch is a restart, not a twin.
            twin = (before if self._beats and before not in ("", self.custody.epoch) and ago < self.lease_seconds
                    else "")
            if not self._beats and not self._held:
                # This start holds nothing yet: rows under this host's name are an earlier daemon's (a restart,
                # or a `--once` run whose last release could not reach the store). Its files are this host's
                # on the share, and recovery settles them; left alone, the rows would keep this host from
                # claiming files of those names until their lease ran out (up to lease_seconds after a
                # restart). Files already in claimed/ cannot be claimed by anyone, so freeing is safe.
                freed = self.rows.forget_host(self.inbox_key, self.host)
                if freed:
                    logger.debug("{}: {} claim row(s) of an earlier start freed", self.custody.inbox, freed)
            self._beats += 1
            if twin and twin != self._twin:
                logger.warning("{}: another daemon beats as host {} (epoch {}); not claiming", self.custody.inbox,
                               self.host, twin)
            self._twin = twin
            for name, (row, claim) in list(self._held.items()):
                if not claim.path.exists():
                    self.rows.settle(row)
                    self._held.pop(name, None)
            # Only the claims this coordinator made: rows left by an earlier start or reload run out by
            # themselves (their files are this host's on the share whatever the row says).
            if self._held:
                self.rows.renew(self.inbox_key, [row.rel for row, _claim in self._held.values()])
        except StoreUnavailable as exc:
            if not self._problem:
                logger.warning("{}: not claiming until the studio store answers again ({})", self.custody.inbox, exc)
            self._problem = f"the studio store is unavailable ({exc})"
            return False
        except OSError as exc:  # the inbox's id (inbox_key) cannot be read or made: the share away, or full
            if not self._problem:
                logger.warning("{}: not claiming until the inbox's studio id can be read ({})", self.custody.inbox,
                               shown(str(exc)))
            self._problem = f"the inbox's studio id cannot be read or made ({exc})"
            return False
        if self._problem:
            logger.info("{}: the studio store answers again; claiming resumes", self.custody.inbox)
        self._problem = ""
        self._last_ok = self.clock()
        return True

    def may_claim(self) -> bool:
        return not self._twin and self._last_ok is not None and self.clock() - self._last_ok < self.lease_seconds / 2

    def why_not_claiming(self) -> str:
        if self.may_claim():
            return ""
        if self._twin:
            return (f"another daemon beats as host {self.host} (epoch {self._twin}); claiming resumes once it has "
                    f"not beaten for {self.lease_seconds:g} s")
        return self._problem or "no recent heartbeat in the studio store"

    # ------------------------------------------------------------------ files

    def claim(self, rel: str, sidecar_rel: str | None = None) -> Claim | None:
        """The row first (one host wins it), then the rename (the file may still have gone: its row goes).
        StoreUnavailable (an sqlite3.Error, as a busy store's) when the store is away: try again later."""
        try:
            key = self.inbox_key
        except OSError:
            return None  # the inbox is away, and the file with it
        try:
            row = self.rows.claim(key, rel)
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
        except (StoreUnavailable, OSError):  # the store or the share away: nobody is judged
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
        with contextlib.suppress(StoreUnavailable):  # away: its rows' leases run out by themselves
            self.rows.forget_host(self.inbox_key, host)
        return back


ID_FILE = "studio-id"  # in the inbox's work folder: its name in the studio store's rows


def inbox_id(inbox: Path) -> str:
    """The inbox's studio-wide id: made once by the first host that needs it, read by every other wherever
    it mounts the share. Published whole: written under a temp name and moved into place without replacing
    (so two hosts at once agree, and nobody ever reads a half-made id); where the share can neither rename
    without replacing nor link (SMB), made by an exclusive create, and removed again if its write fails (a
    full share), so that the next try makes it. Never read through a link. OSError while the inbox is away
    or the id cannot be made."""
    from bgwatch import safefs
    from bgwatch.claims import WORK_DIR

    made = uuid.uuid4().hex
    with safefs.Folder.open_root(inbox) as root, root.sub(WORK_DIR, create=True) as work:
        try:
            published = _publish_id(work, made)
        except safefs.NoReplaceUnsupported:
            published = _create_id(work, made)
        if published:
            return f"inbox-{made}"
        text = ""  # another host's id is there
        for _ in range(50):  # on SMB its maker may be between the exclusive create and the write
            text = work.read_bytes(ID_FILE, 64).decode("ascii", "replace").strip()
            if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
                return f"inbox-{text}"
            time.sleep(0.02)
    raise OSError(f"{work.path / ID_FILE}: not an inbox id ({text[:40]!r}); remove it and bgwatch makes a new one")


def _publish_id(work: Folder, made: str) -> bool:
    """The id written whole under a temp name, then moved into place without replacing: False if another
    host's is there. NoReplaceUnsupported where the share offers no such move."""
    from bgwatch import safefs

    tmp = work.write_temp(ID_FILE, (made + "\n").encode())
    try:
        safefs.move_noreplace(work, tmp, work, ID_FILE)
    except FileExistsError:
        return False
    finally:
        work.unlink(tmp)  # gone once moved; left when the name was taken or the move refused
    return True


def _create_id(work: Folder, made: str) -> bool:
    """The id by an exclusive create (a share without no-replace moves): False if another host's is there."""
    fd = work.open_exclusive(ID_FILE)
    if fd is None:
        return False
    try:
        with os.fdopen(fd, "w") as out:
            out.write(made + "\n")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        work.unlink(ID_FILE)  # ours, and empty or partial: the next try makes it again
        raise
    return True


def studio_coordinator(store: RunStore, custody: Custody, lease_seconds: float, *,
                       in_flight: Callable[[], int] | None = None) -> PostgresCoordinator | None:
    """The coordinator a studio store gives an inbox (None: the share coordinates, as on SQLite)."""
    from bgwatch.pgstore import PgStore

    if not isinstance(store, PgStore):
        return None
    return PostgresCoordinator(custody, store, lease_seconds, in_flight=in_flight)


if TYPE_CHECKING:
    def _is_a_coordinator(coordinator: PostgresCoordinator) -> Coordinator:
        return coordinator  # mypy proves the interface is met
