"""Two workstations on one share and one PostgreSQL (`store:`): the daemon records into the studio store,
claims through its rows, and every view (status, history) shows every host's runs and each host."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest

from bgwatch import cli, htmlreport, report
from bgwatch.daemon import Daemon
from bgwatch.samples import write_samples
from tests import pgserver
from tests.helpers import files_under, make_config

pg_cluster = pgserver.pg_cluster
pg_url = pgserver.pg_url


def _workstation(share: Path, host: str, url: str) -> Any:
    return make_config(share, state_dir=str(share.parent / f"state-{host}"), host=host, store=url)


def test_two_workstations_one_studio_store(tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bgwatch.coordination.postgres import PostgresCoordinator
    from bgwatch.pgstore import PgStore
    from bgwatch.studio import StudioBucket

    share = tmp_path / "share"
    share.mkdir()
    url = pg_url.replace("postgresql://bgwatch@", "postgresql://bgwatch:hunter2@")
    first = _workstation(share, "ws1", url)
    inbox, outbox = first.inboxes[0].path, first.inboxes[0].outbox
    write_samples(inbox, 2, size=(160, 120), seed=3)
    daemon = Daemon(first, once=True)
    sites = list(daemon.intake.sites.values())
    assert sites and all(isinstance(site.coordinator, PostgresCoordinator) for site in sites)
    assert isinstance(daemon.generation_bucket, StudioBucket)  # limits.generations_per_minute is the studio's
    assert daemon.run() == 0
    second = _workstation(share, "ws2", url)
    write_samples(inbox / "more", 2, size=(160, 120), seed=4)
    assert Daemon(second, once=True).run() == 0

    assert len(files_under(outbox)) == 4 and len(files_under(inbox / "done")) == 4
    for config in (first, second):  # either workstation sees the studio's runs
        rows = report.history_rows(config, None, 100)
        assert sorted((r["host"], r["status"]) for r in rows) == [("ws1", "done")] * 2 + [("ws2", "done")] * 2
    report.print_history(report.history_rows(first, None, 100), roots=())
    table = capsys.readouterr().out.splitlines()
    assert "host" in table[0] and sum(" ws2 " in line for line in table[1:]) == 2
    # `bgwatch report` on either workstation: a card per studio run, each saying its host
    assert cli.main(["report", "-c", str(second.source), "-o", str(tmp_path / "studio.html")]) == 0
    page = (tmp_path / "studio.html").read_text()
    cards = re.findall(r'<article class="run"[^>]*>.*?</article>', page, re.S)
    assert len(cards) == 4 and sorted(re.findall(r'<article [^>]*data-host="(\w+)"', page)) == ["ws1"] * 2 + ["ws2"] * 2
    assert all(" · host ws" in card for card in cards) and "on 2 hosts: ws1, ws2" in page
    one_host = htmlreport.render([r for r in report.history_rows(first, None, 100) if r["host"] == "ws1"])
    assert "data-host" not in one_host and " · host " not in one_host  # one workstation's page as before
    status = report.status_of(second)
    assert status["runs"] == {"done": 4}
    assert {h["host"] for h in status["hosts"]} == {"ws1", "ws2"}
    assert status["store"].startswith("postgresql://bgwatch:***@") and "hunter2" not in str(status)
    text = report.format_status(status)
    assert "host:     ws1" in text and "hunter2" not in text
    assert not (tmp_path / "state-ws1" / "bgwatch.db").exists()  # nothing recorded beside the studio
    studio = PgStore(pg_url)
    assert studio.counts() == {"done": 4}
    studio.close()


@pytest.mark.slow  # a 1.5 s outage, and the reconnection after it
def test_the_studio_store_away_in_the_middle_of_a_batch_loses_and_strands_nothing(tmp_path: Path, pg_cluster: Any,
                                                                                  pg_url: str) -> None:
    from bgwatch.pgstore import PgStore

    share = tmp_path / "share"
    share.mkdir()
    config = make_config(share, state_dir=str(tmp_path / "state"), host="ws1", store=pg_url,
                         watch={"lease_seconds": 4})  # a beat a second: claiming resumes soon after the outage
    inbox, outbox = config.inboxes[0].path, config.inboxes[0].outbox
    write_samples(inbox, 6, size=(160, 120), seed=7)
    outage: list[Any] = []
    once = threading.Lock()

    def step(name: str) -> None:  # the first delivery's marker: the server goes away for 1.5 s
        if name == "marker" and once.acquire(blocking=False):
            outage.append(pg_cluster.away_for(1.5))

    try:
        code = Daemon(config, once=True, step=step).run()
    finally:
        for thread in outage:
            thread.join()
    assert outage
    if code != 0:  # --once does not wait for the store: what it could not claim waits in the inbox, unclaimed
        waiting = [p for p in files_under(inbox) if not p.startswith((".bgwatch/", "done/"))]
        assert waiting and all("/" not in p for p in waiting)
        # A file whose run could not be recorded went back to the inbox, but its claim row (its release did not
        # reach the store either) holds it until its lease runs out: a new daemon waits for that, as here.
        _wait_for_leases_to_run_out(pg_url)
        assert Daemon(config, once=True).run() == 0  # the next run takes them
    assert len(files_under(outbox)) == 6 and len(files_under(inbox / "done")) == 6
    left = [p for p in files_under(inbox) if not p.startswith(("done/", ".bgwatch/outputs/", ".bgwatch/studio-id"))]
    assert left == []  # nothing stranded in claimed/ or delivering/, nothing back in the inbox
    studio = PgStore(pg_url)
    assert studio.counts() == {"done": 6}  # every result recorded once the store was back, none twice
    studio.close()


def _wait_for_leases_to_run_out(url: str) -> None:
    from bgwatch.pgstore import PgStore

    studio = PgStore(url)
    try:
        for _ in range(200):  # on the server's clock, which judges the leases
            with studio.connection() as conn:
                row = conn.execute("SELECT count(*) AS held FROM claims WHERE expires_at > now()").fetchone()
                if row is not None and row["held"] == 0:
                    return
                conn.execute("SELECT pg_sleep(0.05)")
        pytest.fail("a claim row was still held after 10 s")
    finally:
        studio.close()


def test_a_backdrop_asked_on_two_workstations_is_generated_once_for_the_studio(tmp_path: Path, pg_url: str) -> None:
    from runway_server import FakeRunway  # tests/ is on sys.path (conftest)

    from bgwatch.pgstore import PgStore

    share = tmp_path / "share"
    share.mkdir()
    rules = {"operation": "replace", "engine": "runway", "prompt": "sunlit beach", "seed": 3}
    with FakeRunway(statuses=["RUNNING", "SUCCEEDED"]) as server:
        def workstation(host: str) -> Any:
            return make_config(share, {"cloud": {"rules": rules}}, state_dir=str(tmp_path / f"state-{host}"),
                               host=host, store=pg_url, cache={"dir": str(share / "cache")},
                               runway={"base_url": server.url, "api_key": "k-1", "poll_interval": 0.01})

        first = workstation("ws1")
        write_samples(first.inboxes[0].path, 2, size=(300, 200), seed=30)
        assert Daemon(first, once=True).run() == 0
        second = workstation("ws2")
        write_samples(first.inboxes[0].path / "more", 2, size=(300, 200), seed=31)
        assert Daemon(second, once=True).run() == 0
        posts = [r for r in server.requests if r.method == "POST"]
    assert len(posts) == 1, "one generation for the studio: the second workstation read the first's"
    studio = PgStore(pg_url)
    [entry] = studio.list_backgrounds()
    assert entry["hits"] == 3 and entry["path"].startswith(str(share / "cache"))
    assert sorted((r["host"], r["bg_engine"].split(":")[0]) for r in studio.history()) == [
        ("ws1", "runway"), ("ws1", "runway"), ("ws2", "runway"), ("ws2", "runway")]
    studio.close()


def test_process_records_into_the_studio_store(tmp_path: Path, pg_url: str) -> None:
    from bgwatch.pgstore import PgStore
    from bgwatch.single import process_many

    config = make_config(tmp_path, host="ws3", store=pg_url)
    [photo] = write_samples(tmp_path / "photos", 1, size=(160, 120), seed=9)
    [result] = process_many([photo], config, tmp_path / "out", {})
    assert result.state.value == "done"
    studio = PgStore(pg_url)
    assert [(r["host"], r["status"]) for r in studio.history()] == [("ws3", "done")]
    studio.close()
    assert not config.db_path.exists()
