"""Coordination of the hosts that serve one inbox: who may claim, who holds a file, whose delivery is
finished, who is silent and whose files go back. One interface; the share implements it today
(share.py: renames and heartbeat files), so that an implementation on a real database (rows, SKIP LOCKED,
leases) can follow without touching the intake or the delivery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bgwatch.claims import Claim
    from bgwatch.delivery import Settled


class Coordinator(Protocol):
    host: str

    def beat(self) -> bool:
        """This host is alive here (the heartbeat thread, nothing else); False when that cannot be said."""

    def may_claim(self) -> bool:
        """Whether this host may take new files here now (its beat is recent, no twin uses its name)."""

    def why_not_claiming(self) -> str:
        """Why it may not, in words ("" when it may)."""

    def claim(self, rel: str, sidecar_rel: str | None = None) -> Claim | None:
        """Take a stable file (and its sidecar) for this host; None when another host has it."""

    def still_holds(self, token: str) -> bool:
        """Whether this host still holds the delivery `token` (proved before every move of it)."""

    def settle(self, host: str, token: str) -> Settled:
        """Finish or undo a delivery this host holds (its own after a crash, or one taken over)."""

    def silent_hosts(self) -> list[str]:
        """Other hosts with files here that have been silent longer than the lease (heartbeat thread)."""

    def reclaim_silent(self, host: str) -> list[str]:
        """A silent host's deliveries settled and its claims returned (main thread)."""
