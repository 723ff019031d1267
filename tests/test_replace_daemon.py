"""operation: replace through the real daemon: tiny SDXL loaded by folder path, the cache, Runway on
loopback, and the 4K rule."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runway_server import FakeRunway  # tests/ is on sys.path (conftest)

from bgwatch.daemon import Daemon
from bgwatch.samples import write_samples
from tests.helpers import files_under, make_config

pytestmark = pytest.mark.slow


def rows(config) -> list[dict]:
    db = sqlite3.connect(config.db_path)
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY id")]


def test_sdxl_replace_generates_once_then_serves_the_cache(tmp_path: Path, tiny_sdxl: Path) -> None:
    rules = {"operation": "replace", "engine": "sdxl", "model": str(tiny_sdxl), "prompt": "oak table",
             "seed": 7, "steps": 2, "output": {"format": "jpg"}}
    config = make_config(tmp_path, {"gen": {"rules": rules}, "drawn": {"rules": {**rules, "seed": None}}},
                         device="cpu")
    gen, drawn = config.inboxes
    write_samples(gen.path, 2, size=(256, 192), seed=21)  # same size: the same background serves both
    write_samples(drawn.path, 1, size=(256, 192), seed=23)
    assert Daemon(config, once=True).run() == 0

    outputs = files_under(gen.outbox)
    assert len(outputs) == 2 and all(o.endswith(".jpg") for o in outputs)
    with Image.open(gen.outbox / outputs[0]) as img:
        assert img.size == (256, 192) and img.mode == "RGB"
    db = sqlite3.connect(config.db_path)
    [(hits, width, height)] = db.execute("SELECT hits, width, height FROM backgrounds").fetchall()
    assert hits == 1, "the second image of the same size is a cache hit"
    assert (width, height) == (256, 192)
    assert len(list(config.cache_dir.glob("*.png"))) == 1, "a drawn seed is never cached"
    recorded = {Path(r["rel_path"]).name: r for r in rows(config)}
    assert all(r["status"] == "done" and r["bg_engine"].startswith("sdxl") for r in recorded.values())
    seeds = sorted(r["seed"] for r in recorded.values())
    assert seeds.count(7) == 2 and seeds[-1] is not None, "a drawn seed is recorded so the run can be redone"


def test_runway_replace_through_the_daemon(tmp_path: Path) -> None:
    with FakeRunway(statuses=["PENDING", "THROTTLED", "RUNNING", "SUCCEEDED"]) as server:
        rules = {"operation": "replace", "engine": "runway", "prompt": "sunlit beach", "seed": 3, "shadow": True}
        config = make_config(tmp_path, {"cloud": {"rules": rules}},
                             runway={"base_url": server.url, "api_key": "k-123-secret", "poll_interval": 0.01})
        write_samples(config.inboxes[0].path, 1, size=(300, 200), seed=30)
        assert Daemon(config, once=True).run() == 0
        posts = [r for r in server.requests if r.method == "POST"]
        assert len(posts) == 1 and posts[0].json()["promptText"] == "sunlit beach"
    [out] = config.inboxes[0].outbox.glob("*.png")
    with Image.open(out) as img:
        assert np.asarray(img).shape == (200, 300, 3)
    text = config.db_path.read_bytes() + b"".join(p.read_bytes() for p in config.log_dir.glob("*.log"))
    assert b"k-123-secret" not in text, "the key never reaches the database or a log"


def test_4k_rule_refuses_big_inputs_for_sdxl_unless_allowed(tmp_path: Path) -> None:
    rules = {"operation": "replace", "engine": "sdxl", "prompt": "x", "seed": 1, "model": "/nonexistent"}
    config = make_config(tmp_path, {"gen": {"rules": rules}})
    inbox = config.inboxes[0].path
    Image.new("RGB", (4200, 64), (200, 200, 200)).save(inbox / "banner.jpg")
    assert Daemon(config, once=True).run() == 1
    note = (inbox / "failed" / "banner.jpg.error.txt").read_text()
    assert "4096" in note and "ALLOW_4K" in note


def test_generations_wait_for_tokens_and_never_fail_for_lack_of_one(tmp_path: Path, tiny_sdxl: Path) -> None:
    import time

    rules = {"operation": "replace", "engine": "sdxl", "model": str(tiny_sdxl), "prompt": "oak table",
             "steps": 1}  # no seed: every image generates (drawn seeds are never cached)
    config = make_config(tmp_path, {"gen": {"rules": rules}}, device="cpu",
                         limits={"generations_per_minute": 60})  # one token a second, burst 1
    write_samples(config.inboxes[0].path, 3, size=(128, 96), seed=70)
    start = time.monotonic()
    assert Daemon(config, once=True).run() == 0
    assert time.monotonic() - start >= 1.9, "three generations at 60/min take at least two seconds"
    assert len(files_under(config.inboxes[0].outbox)) == 3
