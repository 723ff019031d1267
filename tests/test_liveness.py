"""Heartbeats are data too (liveness.py): a forged or twin heartbeat blocks claiming only while it keeps
changing, and says why; the heartbeat thread reads no marker (silent hosts are settled on the main thread)."""

from __future__ import annotations

import json
from pathlib import Path

from bgwatch.daemon import Daemon
from bgwatch.liveness import Heartbeat
from tests.helpers import make_config


def test_a_forged_heartbeat_blocks_claiming_only_until_it_stops_changing(tmp_path: Path) -> None:
    now = [0.0]
    beat = Heartbeat(tmp_path, "ws1", "epoch-a", 10, clock=lambda: now[0])
    assert beat.beat() and beat.fresh() and beat.why_not_claiming() == ""
    forged = tmp_path / ".bgwatch" / "heartbeats" / "ws1"
    forged.write_text(json.dumps({"host": "ws1", "epoch": "forged", "time": 0}))
    assert beat.beat() and not beat.fresh()
    assert "another daemon writes the heartbeat" in beat.why_not_claiming() and "forged" in beat.why_not_claiming()
    for _ in range(4):  # the forger wrote once: our own beats are all we find from now on
        now[0] += 3
        assert beat.beat()
    assert beat.twin == "" and beat.fresh() and beat.why_not_claiming() == ""


def test_a_live_twin_keeps_claiming_blocked(tmp_path: Path) -> None:
    now = [0.0]
    one = Heartbeat(tmp_path, "ws1", "epoch-a", 10, clock=lambda: now[0])
    two = Heartbeat(tmp_path, "ws1", "epoch-b", 10, clock=lambda: now[0])
    one.beat()
    for _ in range(8):
        now[0] += 2.5
        two.beat()
        one.beat()
    assert one.twin == "epoch-b" and not one.fresh()


def test_the_heartbeat_reads_no_marker_and_the_main_thread_settles_silent_hosts(tmp_path: Path) -> None:
    config = make_config(tmp_path, watch={"lease_seconds": 2})
    inbox = config.inboxes[0].path
    box = inbox / ".bgwatch" / "delivering" / "ghost" / "t-1"
    box.mkdir(parents=True)
    (box / "p.jpg").write_bytes(b"p")
    (box / "marker.json").write_text(json.dumps({"disposition": "move", "output": "/proc/self/pagemap",
                                                 "sha256": "0" * 64}))
    daemon = Daemon(config)
    now = [0.0]
    daemon.liveness.clock = lambda: now[0]
    daemon._beat()
    now[0] += 10  # the ghost never beats: silent longer than the lease
    daemon._beat()
    assert (box / "marker.json").exists(), "the heartbeat thread settled a delivery (it reads no marker)"
    for source in daemon.sources:  # the main loop sweeps each source
        source.sweep()
    assert (inbox / "p.jpg").read_bytes() == b"p" and not box.exists()
    [reason] = (inbox / ".bgwatch" / "quarantine").glob("*.txt")
    assert "outside" in reason.read_text()
    daemon.store.close()
