"""The runway engine against a real HTTP server on loopback that plays Runway's task life cycle."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from loguru import logger
from runway_server import FakeRunway

from bgwatch.config import Config, RunwaySettings
from bgwatch.errors import EngineError
from bgwatch.jobs import JobSpec
from bgwatch.pipeline.backgrounds import BackgroundRequest
from bgwatch.pipeline.runway import API_VERSION, RunwayEngine, nearest_ratio

KEY = "key_5ecret-runway-d0-not-leak"
SPEC = JobSpec(operation="replace", engine="runway", prompt="a sunlit beach at noon", seed=77)


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every loguru message, at every level, while the test runs."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="TRACE")
    yield lines
    logger.remove(sink)


def engine_for(server: FakeRunway | str, **settings: object) -> RunwayEngine:
    url = server if isinstance(server, str) else server.url
    values: dict[str, object] = {
        "base_url": url,
        "api_key": KEY,
        "poll_interval": 0.01,
        "request_timeout": 2.0,
        "task_deadline": 10.0,
        **settings,
    }
    return RunwayEngine(Config(runway=RunwaySettings(**values)))  # type: ignore[arg-type]


def render(engine: RunwayEngine, width: int = 640, height: int = 480) -> np.ndarray:
    return engine.render(BackgroundRequest.from_spec(SPEC, width, height))


def assert_key_only_in_authorization(server: FakeRunway) -> None:
    for rec in server.requests:
        assert KEY not in rec.path and KEY.encode() not in rec.body
        for name, value in rec.headers.items():
            if KEY in value:
                assert name.lower() == "authorization" and not rec.path.startswith("/files/")


# ---------------------------------------------------------------- the request


@pytest.mark.parametrize(
    ("size", "ratio"),
    [
        ((1000, 1000), "1024:1024"),
        ((1920, 1080), "1920:1080"),
        ((1080, 1920), "1080:1920"),
        ((640, 480), "1440:1080"),
        ((480, 640), "1080:1440"),
        ((2320, 1000), "2112:912"),
        ((3000, 1000), "1808:768"),
    ],
)
def test_nearest_ratio(size: tuple[int, int], ratio: str) -> None:
    assert nearest_ratio(*size) == ratio


def test_success_sends_the_documented_request_and_fits_the_result(logs: list[str]) -> None:
    with FakeRunway(statuses=["PENDING", "RUNNING", "SUCCEEDED"]) as server:
        out = render(engine_for(server), 640, 480)
    assert out.shape == (480, 640, 3) and out.dtype == np.uint8 and out.std() > 1
    create, *polls, download = server.requests
    assert (create.method, create.path) == ("POST", "/v1/text_to_image")
    assert create.headers["Authorization"] == f"Bearer {KEY}"
    assert create.headers["X-Runway-Version"] == API_VERSION == "2024-11-06"
    assert create.json() == {
        "model": "gen4_image",
        "promptText": "a sunlit beach at noon",
        "ratio": "1440:1080",
        "seed": 77,
    }
    assert [p.method for p in polls] == ["GET"] * 3 and all(p.path.startswith("/v1/tasks/") for p in polls)
    # The result URL is another host in real life: it never gets the key.
    assert download.path.startswith("/files/") and "Authorization" not in download.headers
    assert_key_only_in_authorization(server)
    assert not any(KEY in line for line in logs)


def test_throttled_tasks_are_waited_for() -> None:
    with FakeRunway(statuses=["THROTTLED", "THROTTLED", "PENDING", "RUNNING", "SUCCEEDED"]) as server:
        assert render(engine_for(server)).shape == (480, 640, 3)
    assert sum(r.path.startswith("/v1/tasks/") for r in server.requests) == 5


@pytest.mark.parametrize("final", ["FAILED", "CANCELLED"])
def test_a_failed_task_says_why(final: str) -> None:
    with (
        FakeRunway(
            statuses=["PENDING", final],
            failure="Prompt flagged by moderation",
            failure_code="SAFETY.INPUT.TEXT",
        ) as server,
        pytest.raises(EngineError) as err,
    ):
        render(engine_for(server))
    text = str(err.value)
    assert text.startswith("runway engine:") and final.lower() in text
    assert "SAFETY.INPUT.TEXT" in text and "Prompt flagged by moderation" in text


def test_429_is_retried_after_the_servers_retry_after(logs: list[str]) -> None:
    with FakeRunway(post_errors=[(429, {"Retry-After": "1"})]) as server:
        started = time.monotonic()
        out = render(engine_for(server))
        took = time.monotonic() - started
    assert out.shape == (480, 640, 3)
    assert [r.method for r in server.requests].count("POST") == 2
    assert took >= 1.0
    assert any("429" in line for line in logs)


def test_5xx_answers_are_retried_with_backoff() -> None:
    with FakeRunway(post_errors=[(503, {}), (502, {})], poll_errors=[(500, {})]) as server:
        assert render(engine_for(server)).shape == (480, 640, 3)
    assert [r.method for r in server.requests].count("POST") == 3


def test_endless_5xx_gives_up_with_the_status() -> None:
    with FakeRunway(post_errors=[(500, {})] * 20) as server, pytest.raises(EngineError, match="HTTP 500"):
        render(engine_for(server))


def test_a_hanging_server_hits_the_deadline_and_the_task_is_cancelled(logs: list[str]) -> None:
    with FakeRunway(hang=True) as server:
        engine = engine_for(server, request_timeout=0.3, task_deadline=1.2)
        with pytest.raises(EngineError) as err:
            render(engine)
    assert "runway.task_deadline" in str(err.value) and "1.2s" in str(err.value)
    assert sum(r.method == "GET" for r in server.requests) >= 2, "it kept polling until the deadline"
    assert server.cancelled  # a task given up on is cancelled, not left costing credits
    assert not any(KEY in line for line in logs) and KEY not in str(err.value)


def test_a_task_that_never_finishes_hits_the_deadline() -> None:
    with FakeRunway(statuses=["RUNNING"]) as server, pytest.raises(EngineError, match="task deadline"):
        render(engine_for(server, task_deadline=0.5))
    assert server.cancelled


def test_a_stop_cancels_the_task_in_flight_at_once() -> None:
    """The daemon's drain is over and it stops for good: the task it polls is cancelled then, not left
    running (and costing) with nobody to collect it. Given up through Engines.generate, as the remote lane
    runs it, with the daemon's stop event."""
    import threading

    from bgwatch.pipeline import stages

    stop = threading.Event()
    with FakeRunway(statuses=["RUNNING"]) as server:
        # Polled first after 60 s: without the stop the task would be polled (RUNNING) until its deadline.
        engine = engine_for(server, poll_interval=60.0, task_deadline=120.0)
        engines = stages.Engines(Config(runway=engine.settings), None, None, stop)
        request = BackgroundRequest.from_spec(SPEC, 640, 480)
        prepared = stages.Prepared(job=None, image=None, request=request)  # type: ignore[arg-type]
        threading.Timer(0.3, stop.set).start()
        with pytest.raises(EngineError, match="bgwatch is stopping") as err:
            engines.generate(prepared)
    assert list(server.tasks) and server.cancelled == list(server.tasks), "the task in flight was cancelled"
    assert not any(r.method == "GET" for r in server.requests), "given up in its first wait, never polled"
    assert "taken again at the next start" in str(err.value)


def test_no_server_listening_is_an_engine_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(EngineError, match="cannot reach"):
            render(engine_for(f"http://127.0.0.1:{port}"))


# ---------------------------------------------------------------- the key


def test_missing_key_says_where_to_put_it() -> None:
    with FakeRunway() as server, pytest.raises(EngineError) as err:
        render(engine_for(server, api_key=""))
    assert "RUNWAY_API_KEY" in str(err.value) and "runway.api_key_file" in str(err.value)
    assert server.requests == []


def test_key_file_is_read(tmp_path: Path) -> None:
    key_file = tmp_path / "runway.key"
    key_file.write_text(KEY + "\n")
    with FakeRunway() as server:
        render(engine_for(server, api_key="", api_key_file=key_file))
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"


def test_the_key_never_appears_in_errors_reprs_or_logs(logs: list[str]) -> None:
    with FakeRunway(reject=(401, {"error": "Invalid API key"}), echo_key_in_error=True) as server:
        engine = engine_for(server)
        with pytest.raises(EngineError) as err:
            render(engine)
    assert "401" in str(err.value) and "Invalid API key" in str(err.value)
    assert KEY not in str(err.value) and KEY not in repr(err.value)
    assert (
        KEY not in repr(engine)
        and KEY not in repr(engine.settings)
        and KEY not in repr(Config(runway=engine.settings))
    )
    assert not any(KEY in line for line in logs)


def test_a_malformed_base_url_is_an_engine_error() -> None:
    with pytest.raises(EngineError):
        render(engine_for("htp:/nowhere"))


@pytest.mark.parametrize("scenario", ["rejected", "echoed", "hang", "unreachable"])
def test_the_key_stays_out_of_a_logged_traceback_with_variables(scenario: str) -> None:
    """A daemon logging a failed run with logger.exception (loguru's diagnose shows each frame's
    variables) must not print the key."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="ERROR", backtrace=True, diagnose=True)
    try:
        with FakeRunway(
            reject=(403, {"error": "Forbidden"}),
            echo_key_in_error=scenario == "echoed",
            hang=scenario == "hang",
        ) as server:
            url = "http://127.0.0.1:9" if scenario == "unreachable" else server.url
            engine = engine_for(url, request_timeout=0.2, task_deadline=1.0)
            try:
                render(engine)
            except EngineError:
                logger.exception("run failed")
    finally:
        logger.remove(sink)
    text = "\n".join(lines)
    assert "run failed" in text and "EngineError" in text
    assert KEY not in text


# ---------------------------------------------------------------- no part of the key anywhere (issue 20, item 7)

RANDOM_KEY = "rwQ7pLx9ZkT2mVb8NcR4sWd6YhJ3uFe5Ga1XoK0q"  # like a real key: no word in it


def key_runs(text: str, key: str = RANDOM_KEY, run: int = 4) -> list[str]:
    """Every `run`-character piece of the key found in `text`."""
    return sorted({key[i : i + run] for i in range(len(key) - run + 1) if key[i : i + run] in text})


def test_redaction_comes_before_the_cut_and_catches_a_quoted_part_of_the_key(logs: list[str]) -> None:
    # The key straddles character 300 of the server's error text: cut first, 19 of 20 characters leaked.
    padded = (401, {"error": "Invalid API key. " + "." * 251})  # the key begins at character 281
    with FakeRunway(reject=padded, echo_key_in_error=True) as server, pytest.raises(EngineError) as err:
        render(engine_for(server, api_key=RANDOM_KEY))
    assert "HTTP 401" in str(err.value) and len(err.value.reason) <= 400
    assert key_runs(str(err.value)) == [] and key_runs("\n".join(logs)) == []
    quoting = f"request from key {RANDOM_KEY[:14]}... refused by moderation " + "x" * 60_000
    with FakeRunway(statuses=["RUNNING", "FAILED"], failure=quoting) as server, pytest.raises(EngineError) as err:
        render(engine_for(server, api_key=RANDOM_KEY))
    assert "refused by moderation" in str(err.value) and key_runs(str(err.value)) == []
    assert len(str(err.value)) < 400, "a 60 KB failure text is cut"


@pytest.mark.slow
def test_a_runway_error_quoting_the_key_leaves_no_part_of_it_anywhere(tmp_path: Path, logs: list[str]) -> None:
    import sqlite3
    import threading

    import httpx

    from bgwatch.daemon import Daemon
    from bgwatch.samples import write_samples
    from tests.helpers import make_config, wait_for

    key_file = tmp_path / "runway.key"
    key_file.write_text(RANDOM_KEY + "\n")
    padded = (401, {"error": "Invalid API key. " + "." * 251})  # the key begins at character 281
    with FakeRunway(reject=padded, echo_key_in_error=True) as server:
        config = make_config(tmp_path, {"beach": {"rules": {"operation": "replace", "engine": "runway",
                                                            "prompt": "a beach"}}},
                             runway={"base_url": server.url, "api_key_file": str(key_file), "poll_interval": 0.01,
                                     "request_timeout": 2.0, "task_deadline": 10.0},
                             http={"listen": "127.0.0.1:0"})
        [photo] = write_samples(config.inboxes[0].path, 1, size=(160, 120), seed=70)
        daemon = Daemon(config, http=True)
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        try:
            assert daemon.http is not None
            wait_for(lambda: daemon.http.url)  # type: ignore[union-attr]
            note = config.inboxes[0].path / "failed" / f"{photo.name}.error.txt"
            wait_for(lambda: note.exists())
            failed_photo = config.inboxes[0].path / "failed" / photo.name
            with httpx.Client(base_url=daemon.http.url, timeout=60) as client:
                answer = client.post("/background/replace", params={"wait": "false"},
                                     files={"file": ("shot.jpg", failed_photo.read_bytes(), "image/jpeg")},
                                     data={"engine": "runway", "prompt": "a beach"})
                assert answer.status_code == 202, answer.text
                run = answer.headers["location"]
                record = wait_for(lambda: (r := client.get(run)).json()["status"] == "failed" and r)
                served = record.text
        finally:
            daemon.request_stop()
            thread.join(timeout=30)
    assert "HTTP 401" in note.read_text() and "HTTP 401" in served
    db = sqlite3.connect(config.db_path)
    errors = [row[0] for row in db.execute("SELECT error FROM runs")]
    db.close()
    assert len(errors) == 2 and all("HTTP 401" in e for e in errors)
    stored = b"".join(p.read_bytes() for p in config.state_dir.glob("bgwatch.db*"))
    for where, text in {"note": note.read_text(), "GET /runs": served, "logs": "\n".join(logs),
                        "database": stored.decode("latin-1")}.items():
        assert key_runs(text) == [], f"part of the key in the {where}"
