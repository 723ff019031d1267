"""Which worker does what: the device worker does only the accelerator's work, Runway has its own pool,
the generation token is taken at the gate, and jobs in flight with the same request share one generation.

Real daemons on real folders with the tiny SDXL pipeline and the fake Runway server on loopback."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runway_server import FakeRunway  # tests/ is on sys.path (conftest)

from bgwatch.config import Config
from bgwatch.daemon import Daemon
from bgwatch.jobs import Job, JobSpec, MaskSpec
from bgwatch.pipeline import stages
from bgwatch.pipeline.backgrounds import BackgroundRequest, load_background_engine, unload_background_engines
from bgwatch.pipeline.imageio import DecodedImage
from bgwatch.ratelimit import TokenBucket
from bgwatch.samples import write_samples
from bgwatch.workers import SharedGenerations
from tests.helpers import DaemonThread, files_under, make_config, wait_for

# ---------------------------------------------------------------- one generation per request in flight


def _prepared(seed: int = 1) -> stages.Prepared:
    spec = JobSpec(operation="replace", engine="sdxl", prompt="oak", seed=seed)
    job = Job(run_id=seed, inbox="in", rel_path=f"{seed}.jpg", source=Path(f"/nonexistent/{seed}.jpg"), spec=spec,
              input_sha256="0" * 64, key=str(seed))
    image = DecodedImage(rgb=np.zeros((4, 4, 3), np.uint8), alpha=None, source_format="JPEG", width=4, height=4)
    return stages.Prepared(job=job, image=image, request=BackgroundRequest.from_spec(spec, 4, 4))


def test_the_first_job_leads_the_others_wait_then_are_served() -> None:
    shared = SharedGenerations()
    a, b, c, late = _prepared(), _prepared(), _prepared(), _prepared()
    assert shared.join("k", a) == (True, None)
    assert shared.join("k", b) == (False, None) and shared.join("k", c) == (False, None)
    backdrop = np.full((4, 4, 3), 9, np.uint8)
    assert shared.generated("k", backdrop) == [b, c]
    leads, served = shared.join("k", late)  # arrives before the leader stored it: served from memory
    assert not leads and served is backdrop
    assert shared.stored("k") == 3  # three jobs served by one generation: counted as cache hits
    assert len(shared) == 0
    assert shared.join("k", _prepared()) == (True, None)  # after the store, the cache serves; a new key leads


def test_a_failed_generation_hands_its_followers_back() -> None:
    shared = SharedGenerations()
    a, b = _prepared(), _prepared()
    shared.join("k", a)
    shared.join("k", b)
    assert shared.failed("k") == [b]
    assert shared.join("k", b) == (True, None)  # b leads its own try


def test_a_generated_backdrop_is_read_only_for_every_job_that_shares_it() -> None:
    done = stages.generated(_prepared(), np.zeros((4, 4, 3), np.uint8))
    assert done.backdrop is not None and not done.backdrop.flags.writeable
    assert done.to_cache and not done.cache_hit
    follower = stages.generated(_prepared(), done.backdrop, shared=True)
    assert follower.cache_hit and not follower.to_cache


# ---------------------------------------------------------------- through real daemons



class RecordingBucket(TokenBucket):
    """A real token bucket that notes which thread took each token."""

    def __init__(self, per_minute: float) -> None:
        super().__init__(per_minute)
        self.takers: list[str] = []

    def acquire(self, stop: threading.Event | None = None) -> bool:
        self.takers.append(threading.current_thread().name)
        return super().acquire(stop)


def _daemon(config: Config, bucket: RecordingBucket | None = None) -> Daemon:
    daemon = Daemon(config, once=True)
    if bucket is not None:
        daemon.generation_bucket = daemon.engines.generation_bucket = bucket
    return daemon


def _backgrounds(config: Config) -> list[tuple[int, int]]:
    db = sqlite3.connect(config.db_path)
    return [tuple(r) for r in db.execute("SELECT hits, width FROM backgrounds")]


@pytest.mark.slow
def test_same_request_in_flight_generates_once_and_cache_hits_never_reach_the_device(
        tmp_path: Path, tiny_sdxl: Path) -> None:
    rules = {"operation": "replace", "engine": "sdxl", "model": str(tiny_sdxl), "prompt": "oak table",
             "seed": 7, "steps": 1}
    config = make_config(tmp_path, {"gen": {"rules": rules}}, device="cpu",
                         pipeline={"window_per_worker": 8})
    inbox = config.inboxes[0]
    write_samples(inbox.path, 5, size=(128, 96), seed=3)  # one size: one request for all five
    engine = load_background_engine("sdxl", config)
    before = engine.calls  # type: ignore[attr-defined]
    bucket = RecordingBucket(600)
    daemon = _daemon(config, bucket)
    assert daemon.run() == 0
    assert len(files_under(inbox.outbox)) == 5
    assert engine.calls == before + 1, "five jobs with one request: one generation"  # type: ignore[attr-defined]
    assert len(bucket.takers) == 1 and bucket.takers[0].startswith("bgwatch-gate"), bucket.takers
    assert _backgrounds(config) == [(4, 128)], "the four others count as hits"
    assert daemon.workers.handled().get("device") == 1

    # A second daemon: every job is a cache hit, served in the prepare pool; the device never sees one.
    write_samples(inbox.path, 3, size=(128, 96), seed=13)
    again = _daemon(config, RecordingBucket(600))
    assert again.run() == 0
    assert len(files_under(inbox.outbox)) == 8
    assert engine.calls == before + 1  # type: ignore[attr-defined]
    handled = again.workers.handled()
    assert "device" not in handled and "gate" not in handled and handled["prepare"] == 3, handled
    assert _backgrounds(config) == [(7, 128)]


@pytest.mark.slow
def test_tokens_are_taken_at_the_gate_before_the_device(tmp_path: Path, tiny_sdxl: Path) -> None:
    rules = {"operation": "replace", "engine": "sdxl", "model": str(tiny_sdxl), "prompt": "oak table",
             "steps": 1}  # no seed: every job generates
    config = make_config(tmp_path, {"gen": {"rules": rules}}, device="cpu")
    write_samples(config.inboxes[0].path, 3, size=(96, 64), seed=5)
    bucket = RecordingBucket(6000)
    daemon = _daemon(config, bucket)
    assert daemon.run() == 0
    assert len(bucket.takers) == 3 and all(t.startswith("bgwatch-gate") for t in bucket.takers), bucket.takers
    assert daemon.workers.handled()["device"] == 3


@pytest.mark.slow
def test_a_runway_task_never_holds_up_the_device(tmp_path: Path, tiny_sdxl: Path) -> None:
    """A Runway task whose polls hang (minutes, in real life) runs on the remote pool: an sdxl job dropped
    after it is generated and delivered meanwhile."""
    with FakeRunway(hang=True) as server:
        cloud = {"operation": "replace", "engine": "runway", "prompt": "beach", "seed": 3}
        local = {"operation": "replace", "engine": "sdxl", "model": str(tiny_sdxl), "prompt": "oak", "seed": 4,
                 "steps": 1}
        config = make_config(tmp_path, {"cloud": {"rules": cloud}, "local": {"rules": local}}, device="cpu",
                             runway={"base_url": server.url, "api_key": "k", "poll_interval": 0.01},
                             pipeline={"stop_timeout": 1})
        cloud_box, local_box = config.inboxes
        with DaemonThread(config) as daemon:
            write_samples(cloud_box.path, 1, size=(96, 64), seed=1)
            wait_for(lambda: any(r.method == "GET" for r in server.requests), timeout=60)  # it is polling
            write_samples(local_box.path, 1, size=(96, 64), seed=2)
            wait_for(lambda: files_under(local_box.outbox), timeout=60)
            assert not files_under(cloud_box.outbox), "the Runway task is still hanging"
            assert daemon.workers.handled()["remote"] == 1
            # The hanging poll ends with the server, while the daemon runs: its run fails here, on this test's
            # watch (stopped first, the daemon left the remote thread polling a dead server after the test).
            server.stop()
            wait_for(lambda: files_under(cloud_box.path / "failed"), timeout=60)
        assert not [t.name for t in daemon.workers.threads if t.is_alive()], "a worker outlived its daemon"


@pytest.mark.slow
def test_the_configured_sdxl_model_is_loaded_at_start_before_any_job(tmp_path: Path, tiny_sdxl: Path) -> None:
    rules = {"operation": "replace", "engine": "sdxl", "model": str(tiny_sdxl), "prompt": "oak", "steps": 1}
    config = make_config(tmp_path, {"gen": {"rules": rules}}, device="cpu")
    unload_background_engines()  # as in a new process: no model loaded yet
    engine = load_background_engine("sdxl", config)
    loads, calls = engine.loads, engine.calls  # type: ignore[attr-defined]
    with DaemonThread(config):
        wait_for(lambda: engine.loads == loads + 1, timeout=60)  # type: ignore[attr-defined]
        assert engine.calls == calls, "on cpu the warm-up loads the model, no generation"  # type: ignore[attr-defined]
        write_samples(config.inboxes[0].path, 1, size=(96, 64), seed=8)
        wait_for(lambda: files_under(config.inboxes[0].outbox), timeout=60)
    assert (engine.loads, engine.calls) == (loads + 1, calls + 1)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- leaving


def test_stop_wakes_every_idle_worker_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle workers wait on their queues; stop() hands each a None, so none has to notice the abort flag by
    its own poll (with the poll made an hour here, a worker that was not woken would still be waiting)."""
    from bgwatch import workers as workers_module
    from bgwatch.budget import MemoryBudget
    from bgwatch.service import Progress

    monkeypatch.setattr(workers_module, "_POLL", 3600.0)
    config = make_config(tmp_path)
    abort = threading.Event()
    engines = stages.Engines(config, None, None, abort)  # type: ignore[arg-type]  # no store: no job runs
    pool = workers_module.Workers(config, engines, budget=MemoryBudget(0), job_bucket=TokenBucket(0),
                                  progress=Progress(), abort=abort, started=lambda _job: None,
                                  deliver=lambda _finished: None, fail=lambda _job, _why: None)
    pool.start()
    assert len(pool.threads) > 4  # prepare, mask, gate, device, collect, remote and finish threads
    abort.set()
    assert pool.stop(timeout=60) == []


def test_the_inboxes_mask_nets_are_loaded_ahead_as_the_lanes_will_ask_for_them(
        tmp_path: Path, u2net_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At start the daemon loads each inbox's mask net with the lane's thread count, so the first jobs do
    not wait for ONNX Runtime and the weights: the lane's own load then finds it loaded."""
    from bgwatch import workers as workers_module
    from bgwatch.budget import MemoryBudget
    from bgwatch.pipeline import masking
    from bgwatch.service import Progress

    config = make_config(tmp_path, {"shop": {"rules": {"mask": {"engine": "rembg", "model": "tiny.onnx",
                                                                "precision": "fp32"}}},
                                    "plain": {"rules": {"mask": {"engine": "classical"}}}})
    made: list[str] = []
    real_init = masking.RembgMaskEngine.__init__

    def init(self: masking.RembgMaskEngine, model: str, *args: Any, **kwargs: Any) -> None:
        made.append(model)
        real_init(self, model, *args, **kwargs)

    monkeypatch.setattr(masking.RembgMaskEngine, "__init__", init)
    abort = threading.Event()
    pool = workers_module.Workers(config, stages.Engines(config, None, None, abort),  # type: ignore[arg-type]
                                  budget=MemoryBudget(0), job_bucket=TokenBucket(0), progress=Progress(),
                                  abort=abort, started=lambda _j: None, deliver=lambda _f: None,
                                  fail=lambda _j, _w: None)
    pool.warm_masks()
    assert made == ["tiny.onnx"]  # the classical inbox needs no net
    lane_spec = MaskSpec(engine="rembg", model="tiny.onnx", precision="fp32", post_process=False)
    masking.load_mask_engine(lane_spec, config.device, threads=pool._lane_threads())
    assert made == ["tiny.onnx"]  # the lane's load found it loaded
