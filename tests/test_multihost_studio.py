"""The multi-host fault suite with the PostgreSQL coordinator: test_multihost.py's scenarios, the same real
daemons on FUSE bind mounts (each host mounts the share at its own path), but every config names one studio
store, so claims, leases and liveness are rows. The share's invariants are checked by the same checker
(every input once in done/ or failed/, one output each, nothing overwritten or stranded), and the studio's
runs beside them: none left queued or running, no input done twice.

Not run here: test_multihost.py's "database locked 30 s" (scenario_db_lock holds one host's own SQLite file
with BEGIN EXCLUSIVE; with a studio store there is no such file to lock: PostgreSQL away is its fault here)
and "a full state folder" (it fills the folder that holds the host's SQLite database). The variants below
use fewer files than the share runs, the same faults in less of `make test`'s time."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml
from hosts import Cluster
from share import Report, StoreRun
from test_multihost import (
    MID_SIZE,
    _assert_clean,
    _drop_over,
    _wait_for_claims,
    make_cluster,
    scenario_crash_after_delivery,
    scenario_full_outbox,
    scenario_keep,
    scenario_keep_once,
    scenario_same_name_twice,
    scenario_share_mode,
    scenario_sigkill,
    scenario_sigstop,
    scenario_stop_mid_filing,
    scenario_unmount,
)

from tests import pgserver

pg_cluster = pgserver.pg_cluster
pg_url = pgserver.pg_url
__all__ = ["make_cluster"]  # the fixture, shared with test_multihost.py


def _on_the_studio(cluster: Cluster, url: str) -> Cluster:
    """Every host's config names the studio store; the cluster's checker reads the store's runs beside the
    hosts' own databases (none: their runs are rows in PostgreSQL), so the share checker's run checks (none
    left queued or running, no input with two 'done' rows, no run whose output holds another's pixels, a
    'done' row for every kept input) hold for the studio too."""
    for host in cluster.hosts:
        data = yaml.safe_load(host.config_path.read_text())
        host.config_path.write_text(yaml.safe_dump({**data, "store": url}, sort_keys=False))
    cluster.store_runs = lambda: _studio_runs(cluster, url)
    return cluster


def _studio_runs(cluster: Cluster, url: str) -> list[StoreRun]:
    from bgwatch.pgstore import PgStore

    store = PgStore(url)
    try:
        rows = store.history(limit=1_000_000)
    finally:
        store.close()
    return [(r["host"], cluster.root / r["host"], r["id"], r["rel_path"], r["input_sha256"], r["status"],
             r["output_path"]) for r in rows]


def _check_the_studio(url: str, report: Report) -> None:
    """The hosts recorded into the one studio store (the runs themselves are checked by the cluster's
    checker). Which hosts win claims is chance (with short jobs one may take none): two of them suffice."""
    from bgwatch.pgstore import PgStore

    store = PgStore(url)
    try:
        rows = store.history(limit=1_000_000)
    finally:
        store.close()
    hosts = {r["host"] for r in rows}
    assert len(hosts) >= 2, f"the hosts record into the one studio store: runs only from {sorted(hosts)}"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sigstop_longer_than_the_lease_on_postgresql(make_cluster: Callable[..., Cluster], pg_url: str) -> None:
    report = scenario_sigstop(_on_the_studio(make_cluster(), pg_url))
    _check_the_studio(pg_url, report)
    _assert_clean(report)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_sigkill_at_random_moments_on_postgresql(make_cluster: Callable[..., Cluster], pg_url: str) -> None:
    # Fewer rounds than test_multihost.py's (30): the same faults, a third of the time in `make test`.
    report = scenario_sigkill(_on_the_studio(make_cluster(), pg_url), rounds=10, files=60)
    _check_the_studio(pg_url, report)
    _assert_clean(report)


def scenario_store_away(cluster: Cluster, server: pgserver.Cluster, files: int = 60, down: float = 8.0) -> Report:
    """The studio's PostgreSQL stopped mid-batch for `down` seconds while files keep arriving: hosts stop
    claiming, jobs in flight finish, their records wait; every daemon keeps running; nothing is lost,
    doubled or stranded once the server is back."""
    cluster.start()
    cluster.share.drop_images(files // 2, size=MID_SIZE)
    _wait_for_claims(cluster, cluster.hosts[0])
    back = server.away_for(down)
    try:
        _drop_over(cluster, files - files // 2, down, size=MID_SIZE)
    finally:
        back.join()
    cluster.supervise()  # a daemon that died while the store was away is a violation
    cluster.wait_finished(90)
    return cluster.finish(f"PostgreSQL away {down:g} s", 1)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_postgresql_away_in_the_middle_of_a_batch(make_cluster: Callable[..., Cluster], pg_cluster: pgserver.Cluster,
                                                  pg_url: str) -> None:
    report = scenario_store_away(_on_the_studio(make_cluster(), pg_url), pg_cluster)
    _check_the_studio(pg_url, report)
    _assert_clean(report)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_same_name_dropped_twice_while_in_flight_on_postgresql(make_cluster: Callable[..., Cluster],
                                                                pg_url: str) -> None:
    report = scenario_same_name_twice(_on_the_studio(make_cluster(), pg_url), pairs=3, files=10)
    _check_the_studio(pg_url, report)
    _assert_clean(report)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_crash_between_output_write_and_done_on_postgresql(make_cluster: Callable[..., Cluster],
                                                           pg_url: str) -> None:
    report = scenario_crash_after_delivery(_on_the_studio(make_cluster(), pg_url), files=24)
    _check_the_studio(pg_url, report)
    _assert_clean(report)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_share_unmounted_and_mounted_again_on_postgresql(make_cluster: Callable[..., Cluster], pg_url: str) -> None:
    report = scenario_unmount(_on_the_studio(make_cluster(), pg_url), files=30)
    _check_the_studio(pg_url, report)
    _assert_clean(report)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_full_outbox_is_waited_out_not_failed_on_postgresql(make_cluster: Callable[..., Cluster],
                                                              pg_url: str) -> None:
    report = scenario_full_outbox(_on_the_studio(make_cluster(hosts=2), pg_url), files=8, wait=6.0)
    _check_the_studio(pg_url, report)
    _assert_clean(report)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_keep_mode_with_sidecars_and_a_slow_job_on_postgresql(make_cluster: Callable[..., Cluster],
                                                              pg_url: str) -> None:
    report = scenario_keep(_on_the_studio(make_cluster(on_success="keep"), pg_url), files=15)
    _check_the_studio(pg_url, report)
    _assert_clean(report)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_host_paused_mid_filing_files_nothing_twice_on_postgresql(make_cluster: Callable[..., Cluster],
                                                                    pg_url: str) -> None:
    report = scenario_stop_mid_filing(_on_the_studio(make_cluster(), pg_url), files=12)
    _check_the_studio(pg_url, report)
    _assert_clean(report)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_keep_mode_run_once_exits_on_postgresql(make_cluster: Callable[..., Cluster], pg_url: str) -> None:
    # One host: its runs are checked by the cluster's checker; there is no second host to find in the store.
    _assert_clean(scenario_keep_once(_on_the_studio(make_cluster(hosts=1, on_success="keep"), pg_url), files=10))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_smb_like_share_with_sigkills_and_same_names_on_postgresql(make_cluster: Callable[..., Cluster],
                                                                      pg_url: str) -> None:
    report = scenario_share_mode(_on_the_studio(make_cluster(fs="smb"), pg_url), files=8, pairs=2, kills=2)
    _check_the_studio(pg_url, report)
    _assert_clean(report)
