"""Claims, leases and fencing tokens as rows (pgclaims.py), and the PostgreSQL coordinator over the share's
custody (coordination/postgres.py), on a throwaway cluster and real files in a temporary inbox."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import pgserver

pg_cluster = pgserver.pg_cluster
pg_url = pgserver.pg_url


@pytest.fixture
def stores(pg_url: str) -> Iterator[list[Any]]:
    from bgwatch.pgstore import PgStore

    made = [PgStore(pg_url, host=f"h{i}") for i in (1, 2)]
    yield made
    for store in made:
        store.close()


def _wait_until(check: Any, store: Any, tries: int = 100) -> None:
    """Poll `check` between short sleeps on the server (leases are judged by the server's clock)."""
    for _ in range(tries):
        if check():
            return
        with store.connection() as conn:
            conn.execute("SELECT pg_sleep(0.02)")
    pytest.fail("the condition never held")


def test_one_host_wins_a_file_and_tokens_only_grow(stores: list[Any]) -> None:
    from bgwatch.pgclaims import PgClaims

    one, two = PgClaims(stores[0], "h1", 60), PgClaims(stores[1], "h2", 60)
    first = one.claim("/in", "a.jpg")
    assert first is not None and two.claim("/in", "a.jpg") is None
    assert one.holds(first) and not two.holds(first)
    assert one.release(first) and not one.holds(first)
    again = two.claim("/in", "a.jpg")
    assert again is not None and again.token > first.token
    assert one.settle(first) is False  # an old token settles nothing
    assert two.settle(again) is True and two.claim("/in", "a.jpg") is not None


def test_an_expired_lease_is_taken_over_and_the_old_token_is_fenced_out(stores: list[Any]) -> None:
    from bgwatch.pgclaims import PgClaims

    silent, taker = PgClaims(stores[0], "h1", 0.05), PgClaims(stores[1], "h2", 60)
    old = silent.claim("/in", "a.jpg")
    assert old is not None
    _wait_until(lambda: not silent.holds(old), stores[0])
    assert taker.take_over("/in", "h2") == []
    [new] = taker.take_over("/in", "h1")
    assert new.token > old.token and new.previous == "h1"
    assert taker.holds(new) and not silent.holds(old)
    assert silent.renew() == 0  # a waking host renews nothing it lost


def test_renew_keeps_a_live_hosts_leases(stores: list[Any]) -> None:
    from bgwatch.pgclaims import PgClaims

    live = PgClaims(stores[0], "h1", 0.2)
    row = live.claim("/in", "a.jpg")
    assert row is not None and live.renew("/in") == 1
    assert live.holds(row, margin=0.1)
    assert live.holders("/in")["h1"] < 0  # its lease is in the future


def test_skip_locked_hands_each_offered_file_to_exactly_one_host(stores: list[Any]) -> None:
    from bgwatch.pgclaims import PgClaims

    rels = [f"{i:03}.jpg" for i in range(60)]
    assert PgClaims(stores[0], "h1", 60).offer("/in", rels) == 60
    assert PgClaims(stores[0], "h1", 60).offer("/in", rels[:5]) == 0
    got: dict[str, list[str]] = {"h1": [], "h2": []}

    def work(store: Any, host: str) -> None:
        claims = PgClaims(store, host, 60)
        while batch := claims.claim_next(3, inbox="/in"):
            got[host].extend(c.rel for c in batch)

    threads = [threading.Thread(target=work, args=(store, f"h{i + 1}")) for i, store in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got["h1"] + got["h2"]) == rels


# ---------------------------------------------------------------- the coordinator over real files


@pytest.fixture
def share(tmp_path: Path) -> tuple[Path, Path]:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    return inbox, outbox


def _coordinator(store: Any, share: tuple[Path, Path], host: str, lease: float) -> Any:
    from bgwatch.coordination.postgres import PostgresCoordinator
    from bgwatch.delivery import Custody

    return PostgresCoordinator(Custody(share[0], host, f"e-{host}", share[1]), store, lease)


def test_the_coordinator_claims_through_the_row_and_the_rename(stores: list[Any], share: tuple[Path, Path]) -> None:
    one, two = _coordinator(stores[0], share, "h1", 60), _coordinator(stores[1], share, "h2", 60)
    assert not one.may_claim() and "heartbeat" in one.why_not_claiming()
    assert one.beat() and two.beat() and one.may_claim() and one.why_not_claiming() == ""
    (share[0] / "a.jpg").write_bytes(b"jpeg")
    claim = one.claim("a.jpg")
    assert claim is not None and claim.path.read_bytes() == b"jpeg"
    (share[0] / "a.jpg").write_bytes(b"a second drop of the same name")
    assert two.claim("a.jpg") is None  # the row is h1's while its claim lives, whatever is in the inbox
    assert one.silent_hosts() == [] and two.silent_hosts() == []
    assert one.claim("gone.jpg") is None  # no such file: no row is left behind
    assert one.rows.holders(one.inbox_key) == {"h1": pytest.approx(-60, abs=5)}


def test_a_silent_host_is_found_by_its_row_and_its_files_go_back(stores: list[Any], share: tuple[Path, Path]) -> None:
    silent, taker = _coordinator(stores[0], share, "h1", 0.1), _coordinator(stores[1], share, "h2", 0.1)
    assert silent.beat() and taker.beat()
    (share[0] / "a.jpg").write_bytes(b"jpeg")
    assert silent.claim("a.jpg") is not None
    assert taker.reclaim_silent("h1") == []  # not silent yet: nothing moves
    _wait_until(lambda: taker.beat() and "h1" in taker.silent_hosts(), stores[1])
    assert taker.reclaim_silent("h1") != []
    assert (share[0] / "a.jpg").read_bytes() == b"jpeg"
    assert taker.claim("a.jpg") is not None


def test_a_store_that_is_away_stops_claiming_and_judges_nobody(pg_cluster: Any, pg_url: str,
                                                                 share: tuple[Path, Path]) -> None:
    import psycopg

    from bgwatch.pgstore import PgStore
    from bgwatch.storebase import StoreUnavailable

    store = PgStore(pg_url, host="h1", connect_timeout=0.3)
    coordinator = _coordinator(store, share, "h1", 60)
    assert coordinator.beat()
    database = pg_url.split("?")[0].rsplit("/", 1)[-1]

    def connections(allowed: bool) -> None:  # the database refuses everyone and drops who is there
        with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))

    (share[0] / "a.jpg").write_bytes(b"jpeg")
    connections(False)
    try:
        assert coordinator.beat() is False
        coordinator._last_ok = None  # half a lease later (60 s): not waited for here
        assert not coordinator.may_claim() and "unavailable" in coordinator.why_not_claiming()
        assert "bob" not in coordinator.why_not_claiming()
        with pytest.raises(StoreUnavailable):  # not "another host has it": the file waits for the store
            coordinator.claim("a.jpg")
        assert (share[0] / "a.jpg").exists() and not coordinator.may_claim()
        assert coordinator.silent_hosts() == [] and coordinator.reclaim_silent("h2") == []
    finally:
        connections(True)
    _wait_until(coordinator.beat, store)
    assert coordinator.may_claim() and coordinator.claim("a.jpg") is not None
    store.close()


# ---------------------------------------------------------------- the studio's bucket and one generation per key


def test_the_generation_bucket_is_the_studios(stores: list[Any]) -> None:
    from bgwatch.studio import StudioBucket

    slept: list[float] = []
    one = StudioBucket(stores[0], "sdxl", 6)
    two = StudioBucket(stores[1], "sdxl", 6, sleep=slept.append)
    assert one.delay() == 0.0 and one.acquire()
    assert 9.0 < two.delay() <= 10.0  # the other host's token counts here: one every 10 s at 6 a minute
    stop = threading.Event()
    stop.set()
    assert two.acquire(stop) is False and slept == []
    assert StudioBucket(stores[1], "runway", 6).acquire()  # its own engine, its own bucket
    assert StudioBucket(stores[1], "sdxl", 0).acquire() and StudioBucket(stores[1], "sdxl", 0).unlimited
    fast = StudioBucket(stores[1], "fast", 6000, sleep=slept.append)
    assert fast.acquire() and fast.acquire()  # the second waits about 10 ms, slept in slices
    assert all(0 < s <= 0.011 for s in slept)


def test_two_hosts_asking_for_one_backdrop_at_once_generate_it_once(stores: list[Any]) -> None:
    from bgwatch.studio import generate_once

    made: list[str] = []
    start = threading.Barrier(2)
    results: dict[str, tuple[str, bool]] = {}

    def ask(store: Any, host: str) -> None:
        def generate() -> str:
            made.append(host)
            store.put_background({"key": "bg1", "engine": "sdxl", "path": f"/cache/bg1-{host}.png", "bytes": 1})
            return f"/cache/bg1-{host}.png"

        def read() -> str | None:
            row = store.get_background("bg1")
            return None if row is None else str(row["path"])

        start.wait()
        results[host] = generate_once(store, "bg1", host, read, generate, poll=0.02)

    threads = [threading.Thread(target=ask, args=(store, f"h{i + 1}")) for i, store in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1
    assert results["h1"][0] == results["h2"][0] == f"/cache/bg1-{made[0]}.png"
    assert sorted(generated for _path, generated in results.values()) == [False, True]


def test_a_failed_generation_lets_the_next_host_generate(stores: list[Any]) -> None:
    from bgwatch.studio import generate_once

    def broken() -> str:
        raise RuntimeError("GPU out of memory")

    with pytest.raises(RuntimeError):
        generate_once(stores[0], "bg1", "h1", lambda: None, broken)
    assert generate_once(stores[1], "bg1", "h2", lambda: None, lambda: "made") == ("made", True)


def test_the_gate_waits_for_the_host_that_leads_a_key(stores: list[Any]) -> None:
    from bgwatch.studio import StudioGenerations

    kept: dict[str, str] = {}
    leader = StudioGenerations(stores[0], "h1", 60)
    waiting: list[float] = []

    def keep_while_the_other_waits(seconds: float) -> None:  # the second host's poll: h1 keeps its image
        waiting.append(seconds)
        kept["bg1"] = "h1's image"
        leader.done("bg1")

    follower = StudioGenerations(stores[1], "h2", 60, sleep=keep_while_the_other_waits)
    assert leader.lead_or_wait("bg1", lambda: kept.get("bg1")) is None  # h1 generates
    assert follower.lead_or_wait("bg1", lambda: kept.get("bg1")) == "h1's image" and waiting == [0.5]
    stop = threading.Event()
    stop.set()
    assert leader.lead_or_wait("bg2", lambda: None) is None
    assert StudioGenerations(stores[1], "h2", 60).lead_or_wait("bg2", lambda: None, stop) is None  # stopping


def test_an_inbox_has_one_name_in_the_rows_wherever_a_host_mounts_the_share(stores: list[Any], tmp_path: Path,
                                                                            share: tuple[Path, Path]) -> None:
    from bgwatch.coordination.postgres import inbox_id

    elsewhere = tmp_path / "mnt-ws2"
    elsewhere.symlink_to(tmp_path)  # the second workstation's mount point of the same share
    moved = (elsewhere / "inbox", elsewhere / "outbox")
    one, two = _coordinator(stores[0], share, "h1", 60), _coordinator(stores[1], moved, "h2", 60)
    assert one.inbox_key == two.inbox_key == inbox_id(share[0]) != inbox_id(share[1])
    assert one.beat() and two.beat()
    (share[0] / "a.jpg").write_bytes(b"jpeg")
    assert one.rows.claim(one.inbox_key, "a.jpg") is not None  # h1's row, before its rename
    assert two.claim("a.jpg") is None and (share[0] / "a.jpg").exists()
    planted = tmp_path / "planted"
    (planted / "real").mkdir(parents=True)
    (planted / ".bgwatch").symlink_to(planted / "real")
    with pytest.raises(OSError, match="is a symbolic link or not a folder"):
        inbox_id(planted)
    stuck = _coordinator(stores[0], (planted, share[1]), "h3", 60)  # its first beat needs the inbox's id
    assert not stuck.beat() and "studio id cannot be read or made" in stuck.why_not_claiming()


@pytest.mark.parametrize("fs", ["posix", "smb"])
def test_an_inbox_id_that_cannot_be_written_whole_is_never_left_half_made(tmp_path: Path, fs: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A full share fails the id's write (seen in CI: an empty studio-id, and every host then refused it
    and exited): nothing is published, and the next try makes it. On a share with no-replace moves the id
    appears whole or not at all; on SMB (an exclusive create, then the write) a failed write is undone."""
    import errno

    from bgwatch import safefs
    from bgwatch.coordination import postgres

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    if fs == "smb":
        monkeypatch.setitem(safefs._strategy, os.stat(inbox).st_dev, safefs.UNIQUE)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        postgres.inbox_id(inbox)
    assert sorted(p.name for p in (inbox / ".bgwatch").iterdir()) == [], "no id, no temp file"
    monkeypatch.setattr(os, "fsync", real_fsync)
    made = postgres.inbox_id(inbox)
    assert made == postgres.inbox_id(inbox) == f"inbox-{(inbox / '.bgwatch' / 'studio-id').read_text().strip()}"


def test_two_daemons_beating_under_one_host_name_stop_claiming(stores: list[Any], share: tuple[Path, Path]) -> None:
    from bgwatch.coordination.postgres import PostgresCoordinator
    from bgwatch.delivery import Custody

    def daemon(epoch: str, store: Any) -> PostgresCoordinator:  # one host name, two processes (a cloned VM)
        return PostgresCoordinator(Custody(share[0], "h1", epoch, share[1]), store, 60)

    first, clone = daemon("e-first", stores[0]), daemon("e-clone", stores[1])
    assert first.beat() and first.may_claim()
    assert clone.beat() and clone.may_claim()  # its first beat finds another epoch: a restart, as far as it knows
    assert first.beat() and not first.may_claim() and "e-clone" in first.why_not_claiming()
    assert clone.beat() and not clone.may_claim() and "e-first" in clone.why_not_claiming()
    (share[0] / "a.jpg").write_bytes(b"jpeg")
    assert first.beat() and not first.may_claim()  # the clone stops here
    assert first.beat() and first.may_claim() and first.claim("a.jpg") is not None
    restarted = daemon("e-restarted", stores[1])  # the same host started again after the first stopped
    assert restarted.beat() and restarted.may_claim()


def test_a_restarted_host_claims_again_at_once_what_its_earlier_start_left_in_the_rows(
        stores: list[Any], share: tuple[Path, Path]) -> None:
    """A row an earlier daemon could not release (the store was away at its last release, then it stopped)
    kept the same host from claiming that name for a whole lease after its restart."""
    earlier = _coordinator(stores[0], share, "h1", 300)
    assert earlier.beat()
    (share[0] / "a.jpg").write_bytes(b"jpeg")
    claim = earlier.claim("a.jpg")
    assert claim is not None
    claim.path.rename(share[0] / "a.jpg")  # the file went back to the inbox; its row's release never arrived
    restarted = _coordinator(stores[0], share, "h1", 300)
    assert restarted.claim("a.jpg") is None  # before its first beat the earlier row still stands
    assert restarted.beat() and restarted.may_claim()
    again = restarted.claim("a.jpg")
    assert again is not None and again.path.read_bytes() == b"jpeg"
    other = _coordinator(stores[1], share, "h2", 300)
    assert other.beat()
    (share[0] / "b.jpg").write_bytes(b"jpeg")
    assert other.claim("b.jpg") is not None
    assert restarted.beat()  # a later beat frees nothing of its own, and nothing of another host's
    assert set(restarted.rows.holders(restarted.inbox_key)) == {"h1", "h2"}
