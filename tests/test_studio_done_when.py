"""Issue 16's "done when" for the background cache, end to end: three workstations (real `bgwatch run`
processes, tests/studiohosts.py) on one share and one PostgreSQL; one cacheable Runway backdrop asked by nine
files at once is generated once for the studio, and every view on any one host says so."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from runway_server import FakeRunway  # tests/ is on sys.path (conftest)
from share import files_under, image_bytes
from studiohosts import StudioHost, drop, start_all, stop_all

from tests import pgserver

pg_cluster = pgserver.pg_cluster
pg_url = pgserver.pg_url


@pytest.mark.slow  # three daemon processes
@pytest.mark.timeout(120)
def test_one_backdrop_asked_by_nine_files_on_three_hosts_is_generated_once(tmp_path: Path, pg_url: str) -> None:
    share = tmp_path / "share"
    (share / "inbox").mkdir(parents=True)
    rules = {"operation": "replace", "engine": "runway", "prompt": "sunlit beach", "seed": 7}
    # The generation takes a few polls: meanwhile every host fills its window of 3 with files that wait for it.
    with FakeRunway(statuses=["RUNNING"] * 6 + ["SUCCEEDED"]) as server:
        extra = {"cache": {"dir": str(share / "cache")}, "pipeline": {"window_per_worker": 3},
                 "runway": {"base_url": server.url, "api_key": "k-studio", "poll_interval": 0.1}}
        hosts = [StudioHost(tmp_path / f"h{i}", f"h{i}", share, store=pg_url, rules=rules, extra=extra)
                 for i in (1, 2, 3)]
        try:
            start_all(hosts)
            for i in range(9):
                drop(share / "inbox", f"ring-{i:03}.png", image_bytes(100 + i, size=64))
            deadline = time.monotonic() + 60
            while len(files_under(share / "inbox" / "done")) < 9 and time.monotonic() < deadline:
                assert all(h.alive for h in hosts), "\n".join(f"{h.name}: {h.log_tail()}" for h in hosts)
                time.sleep(0.1)
            assert len(files_under(share / "inbox" / "done")) == 9, "\n".join(h.log_tail() for h in hosts)
        finally:
            codes = stop_all(hosts)
        posts = [r for r in server.requests if r.method == "POST"]
    assert codes == {"h1": 0, "h2": 0, "h3": 0}
    assert len(posts) == 1, "one generation for the whole studio"
    assert len(files_under(share / "outbox")) == 9

    cached = hosts[1].bgwatch("cache", "ls", "--json")
    assert cached.returncode == 0, cached.stderr
    [entry] = json.loads(cached.stdout)
    assert entry["hits"] == 8 and entry["engine"] == "runway" and entry["path"].startswith(str(share / "cache"))

    listed = hosts[2].bgwatch("history", "--json", "--limit", "50")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    assert sorted(r["rel_path"] for r in runs) == [f"ring-{i:03}.png" for i in range(9)]
    assert all(r["status"] == "done" and r["bg_engine"].startswith("runway") for r in runs)
    assert {r["host"] for r in runs} == {"h1", "h2", "h3"}, "each host took some of the nine"

    page = tmp_path / "studio.html"
    assert hosts[0].bgwatch("report", "-o", str(page)).returncode == 0
    shown = re.findall(r'<article class="run" [^>]*data-host="(h\d)"', page.read_text())
    assert Counter(shown) == Counter(r["host"] for r in runs)  # the page says which host ran each
