"""The multi-host fault suite with the PostgreSQL coordinator: test_multihost.py's scenarios, the same real
daemons on FUSE bind mounts (each host mounts the share at its own path), but every config names one studio
store, so claims, leases and liveness are rows. The share's invariants are checked by the same checker
(every input once in done/ or failed/, one output each, nothing overwritten or stranded), and the studio's
runs beside them: none left queued or running, no input done twice."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import yaml
from hosts import Cluster
from share import Report
from test_multihost import (
    MID_SIZE,
    _assert_clean,
    _drop_over,
    _wait_for_claims,
    make_cluster,
    scenario_sigkill,
    scenario_sigstop,
)

from tests import pgserver

pg_cluster = pgserver.pg_cluster
pg_url = pgserver.pg_url
__all__ = ["make_cluster"]  # the fixture, shared with test_multihost.py


def _on_the_studio(cluster: Cluster, url: str) -> Cluster:
    for host in cluster.hosts:
        data = yaml.safe_load(host.config_path.read_text())
        host.config_path.write_text(yaml.safe_dump({**data, "store": url}, sort_keys=False))
    return cluster


def _check_the_studio(url: str, report: Report) -> None:
    from bgwatch.pgstore import PgStore

    store = PgStore(url)
    try:
        rows = store.history(limit=1_000_000)
    finally:
        store.close()
    for row in rows:
        if row["status"] in ("queued", "running"):
            report.violations.append(f"studio store: run {row['id']} ({row['rel_path']}) of {row['host']} left "
                                     f"{row['status']!r}")
    done = Counter((r["rel_path"], r["input_sha256"]) for r in rows if r["status"] == "done")
    report.violations.extend(f"studio store: {rel} done {n} times" for (rel, _sha), n in done.items() if n > 1)
    assert {r["host"] for r in rows} >= {"h1", "h2"}, "the hosts record into the one studio store"


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
