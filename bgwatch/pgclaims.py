"""Claims, leases and fencing tokens as rows of the studio store (the `claims` table, pgschema v3).

One row per file (inbox, rel): the host that holds it, a fencing token drawn from one sequence (never
reused, always growing, so a newer holder's token is larger than any older one's) and a lease that expires
on the server's clock unless its holder renews it. Two shapes use the same rows:

- `claim(inbox, rel)`: a host that saw a stable file asks for that one; one host wins, a second gets None
  until the first releases it or its lease runs out (the coordinator's shape: every host watches the share).
- `offer` + `claim_next(n)`: files put on the table once, and any number of hosts take the next free ones
  with `FOR UPDATE SKIP LOCKED`, never waiting on each other's locks (a queue's shape; the benchmark's).

Rows decide who may move a file; the files themselves stay on the share and are moved only by the holder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bgwatch.pgstore import PgStore

_LEASE = "now() + make_interval(secs => %s)"


@dataclass(frozen=True, slots=True)
class RowClaim:
    inbox: str
    rel: str
    token: int  # the fencing token: proved before every move of the file
    previous: str | None = None  # the host whose lease ran out, when this claim took over its row


class PgClaims:
    """The claim rows of one studio store, as one host uses them."""

    def __init__(self, store: PgStore, host: str, lease_seconds: float) -> None:
        self.store = store
        self.host = host
        self.lease_seconds = float(lease_seconds)

    def claim(self, inbox: str, rel: str) -> RowClaim | None:
        """This file for this host: a new row, or a row that is free or whose lease ran out."""
        with self.store.transaction() as conn:
            row = conn.execute(
                "WITH old AS (SELECT holder FROM claims WHERE inbox = %s AND rel_path = %s) "
                "INSERT INTO claims (inbox, rel_path, holder, token, expires_at) "
                f"VALUES (%s, %s, %s, nextval('fencing_tokens'), {_LEASE}) "
                "ON CONFLICT (inbox, rel_path) DO UPDATE SET holder = EXCLUDED.holder, token = EXCLUDED.token, "
                "expires_at = EXCLUDED.expires_at WHERE claims.holder IS NULL OR claims.expires_at < now() "
                "RETURNING token, (SELECT holder FROM old) AS previous",
                (inbox, rel, inbox, rel, self.host, self.lease_seconds)).fetchone()
        if row is None:
            return None
        previous = row["previous"] if row["previous"] not in (None, self.host) else None
        return RowClaim(inbox, rel, int(row["token"]), previous)

    def offer(self, inbox: str, rels: list[str]) -> int:
        """Put files on the table (once each); returns how many were new."""
        with self.store.transaction() as conn:
            cur = conn.cursor()
            cur.executemany("INSERT INTO claims (inbox, rel_path) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                            [(inbox, rel) for rel in rels])
            return max(0, cur.rowcount)

    def claim_next(self, n: int = 1, inbox: str | None = None) -> list[RowClaim]:
        """Up to `n` free (or lease-expired) rows for this host, oldest offer first, skipping rows another
        host is taking at this moment instead of waiting for it."""
        where = "(holder IS NULL OR expires_at < now())" + (" AND inbox = %s" if inbox is not None else "")
        args: list[object] = [inbox] if inbox is not None else []
        with self.store.transaction() as conn:
            rows = conn.execute(
                f"WITH free AS (SELECT inbox, rel_path, holder FROM claims WHERE {where} "
                "ORDER BY offered_at, rel_path LIMIT %s FOR UPDATE SKIP LOCKED) "
                "UPDATE claims c SET holder = %s, token = nextval('fencing_tokens'), "
                f"expires_at = {_LEASE} FROM free WHERE c.inbox = free.inbox AND c.rel_path = free.rel_path "
                "RETURNING c.inbox, c.rel_path, c.token, free.holder AS previous",
                [*args, n, self.host, self.lease_seconds]).fetchall()
        return [RowClaim(r["inbox"], r["rel_path"], int(r["token"]), r["previous"]) for r in rows]

    def holds(self, claim: RowClaim, margin: float = 0.0) -> bool:
        """The fencing check: this host's token is still the row's and its lease has `margin` seconds left."""
        with self.store.connection() as conn:
            row = conn.execute("SELECT 1 FROM claims WHERE inbox = %s AND rel_path = %s AND token = %s "
                               "AND holder = %s AND expires_at > now() + make_interval(secs => %s)",
                               (claim.inbox, claim.rel, claim.token, self.host, margin)).fetchone()
        return row is not None

    def renew(self, inbox: str | None = None, rels: list[str] | None = None) -> int:
        """Extend the leases this host holds (in `inbox`, of `rels`: all when None); returns how many."""
        sql = f"UPDATE claims SET expires_at = {_LEASE} WHERE holder = %s"
        args: list[object] = [self.lease_seconds, self.host]
        if inbox is not None:
            sql += " AND inbox = %s"
            args.append(inbox)
        if rels is not None:
            sql += " AND rel_path = ANY(%s)"
            args.append(rels)
        with self.store.transaction() as conn:
            return conn.execute(sql, args).rowcount

    def settle(self, claim: RowClaim) -> bool:
        """The file's life is over (delivered, failed, returned): its row goes. False: not ours any more."""
        with self.store.transaction() as conn:
            return conn.execute("DELETE FROM claims WHERE inbox = %s AND rel_path = %s AND token = %s",
                                (claim.inbox, claim.rel, claim.token)).rowcount == 1

    def release(self, claim: RowClaim) -> bool:
        """Give a row back without finishing it (the file went back to the inbox): free for any host."""
        with self.store.transaction() as conn:
            return conn.execute("UPDATE claims SET holder = NULL, token = NULL, expires_at = NULL "
                                "WHERE inbox = %s AND rel_path = %s AND token = %s",
                                (claim.inbox, claim.rel, claim.token)).rowcount == 1

    def take_over(self, inbox: str, silent: str) -> list[RowClaim]:
        """The rows of `silent` in `inbox` whose lease ran out, now this host's (with new tokens), so that this
        host, and no other, moves their files back. Rows another reclaimer is taking are skipped."""
        with self.store.transaction() as conn:
            rows = conn.execute(
                "WITH gone AS (SELECT inbox, rel_path FROM claims WHERE inbox = %s AND holder = %s "
                "AND expires_at < now() FOR UPDATE SKIP LOCKED) "
                "UPDATE claims c SET holder = %s, token = nextval('fencing_tokens'), "
                f"expires_at = {_LEASE} FROM gone WHERE c.inbox = gone.inbox AND c.rel_path = gone.rel_path "
                "RETURNING c.inbox, c.rel_path, c.token",
                (inbox, silent, self.host, self.lease_seconds)).fetchall()
        return [RowClaim(r["inbox"], r["rel_path"], int(r["token"]), silent) for r in rows]

    def forget_host(self, inbox: str, host: str) -> int:
        """Every row `host` holds in `inbox`, gone: called once its files were returned to the inbox, so that
        rows whose lease has not quite run out do not keep those files from being claimed."""
        with self.store.transaction() as conn:
            return conn.execute("DELETE FROM claims WHERE inbox = %s AND holder = %s", (inbox, host)).rowcount

    def holders(self, inbox: str) -> dict[str, float]:
        """Each host holding rows in `inbox`, with the seconds since its newest lease ran out (negative: live)."""
        with self.store.connection() as conn:
            rows = conn.execute("SELECT holder, extract(epoch FROM now() - max(expires_at))::float8 AS over "
                                "FROM claims WHERE inbox = %s AND holder IS NOT NULL GROUP BY holder",
                                (inbox,)).fetchall()
        return {r["holder"]: float(r["over"]) for r in rows}
