"""Coordination through the share itself: claims and leases are renames (custody), liveness is a heartbeat
file per host judged by change on this host's clock (liveness). The default, and the only one today."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bgwatch.liveness import Heartbeat, Liveness

if TYPE_CHECKING:
    from bgwatch.claims import Claim
    from bgwatch.delivery import Custody, Settled


class ShareCoordinator:
    """One inbox, as one host coordinates with the others on its share."""

    def __init__(self, custody: Custody, heartbeat: Heartbeat, liveness: Liveness) -> None:
        self.custody = custody
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.host = custody.host

    def beat(self) -> bool:
        return self.heartbeat.beat()

    def may_claim(self) -> bool:
        return self.heartbeat.fresh()

    def why_not_claiming(self) -> str:
        return self.heartbeat.why_not_claiming()

    def claim(self, rel: str, sidecar_rel: str | None = None) -> Claim | None:
        return self.custody.claim(rel, sidecar_rel)

    def still_holds(self, token: str) -> bool:
        return self.custody.still_holds(token)

    def settle(self, host: str, token: str) -> Settled:
        return self.custody.settle(host, token)

    def silent_hosts(self) -> list[str]:
        lease = self.heartbeat.lease_seconds
        return [host for host in self.custody.other_hosts()
                if self.liveness.silent_for(self.custody.inbox, host) > lease]

    def reclaim_silent(self, host: str) -> list[str]:
        return self.custody.reclaim(host)
