"""The `runway` background engine: Runway's text-to-image API through httpx.

POST /v1/text_to_image creates a task; GET /v1/tasks/{id} is polled (with growing delays) through
PENDING, THROTTLED and RUNNING until SUCCEEDED (output[0] is a short-lived URL to the image) or
FAILED / CANCELLED (their failure and failureCode become the error). 429 and 5xx answers and dropped
connections are retried with backoff, honouring Retry-After; every call has a timeout
(runway.request_timeout) and the whole task a deadline (runway.task_deadline), after which the task is
cancelled (best effort) and the run fails.

The API key is sent only in the Authorization header to runway.base_url — never to the download host —
and never appears in a log line, an error, a repr or the database.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from loguru import logger

from bgwatch.errors import BgwatchError, EngineError, InputError
from bgwatch.pipeline.backgrounds import BackgroundRequest, fit_cover
from bgwatch.text import redacted, shown

if TYPE_CHECKING:
    from collections.abc import Generator

    from bgwatch.config import Config

API_VERSION = "2024-11-06"

GEN4_RATIOS = (
    "1920:1080",
    "1080:1920",
    "1024:1024",
    "1360:768",
    "1080:1080",
    "1168:880",
    "1440:1080",
    "1080:1440",
    "1808:768",
    "2112:912",
    "1280:720",
    "720:1280",
    "720:720",
    "960:720",
    "720:960",
    "1680:720",
)
MODEL_RATIOS: dict[str, tuple[str, ...]] = {"gen4_image": GEN4_RATIOS, "gen4_image_turbo": GEN4_RATIOS}

WAITING = {"PENDING", "THROTTLED", "RUNNING"}
MAX_ATTEMPTS = 6  # per HTTP call, for 429 / 5xx / dropped connections (the deadline bounds it too)
MAX_POLL_DELAY = 10.0
MAX_BACKOFF = 30.0
MAX_REASON = 300  # characters of a server's error text kept in a run's reason


class _Secret(str):
    """The API key: a str whose repr never shows it, should a traceback print its frame's locals."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class _BearerAuth(httpx.Auth):
    """Adds the key to each API request as it is sent: no dict of headers ever holds it."""

    def __init__(self, key: _Secret) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "_BearerAuth(***)"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._key}"
        yield request


class _TaskEnded(EngineError):
    """The task itself ended badly (FAILED / CANCELLED): nothing left to cancel."""


def nearest_ratio(width: int, height: int, model: str = "gen4_image") -> str:
    """The model's allowed ratio nearest width/height (ties: the first listed, the larger size)."""
    ratios = MODEL_RATIOS.get(model, GEN4_RATIOS)
    aspect = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = (int(v) for v in ratio.split(":"))
        return abs(math.log(w / h) - aspect)

    return min(ratios, key=distance)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class RunwayEngine:
    """Text-to-image on Runway's servers; nothing to load, so nothing kept but the settings."""

    name = "runway"

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = config.runway
        self.max_pixels = config.limits.max_pixels  # a download is decoded under the inputs' pixel limit
        self.clock = clock
        self.sleep = sleep
        self.calls = 0  # tasks that produced an image

    def __repr__(self) -> str:
        return f"RunwayEngine(base_url={self.settings.base_url!r})"

    def _key(self) -> _Secret:
        try:
            key = _Secret(self.settings.key())
        except BgwatchError as exc:
            raise EngineError("runway", str(exc)) from None
        if not key:
            raise EngineError(
                "runway", "no API key: set RUNWAY_API_KEY, or runway.api_key_file in config.yaml"
            )
        return key

    def render(self, request: BackgroundRequest) -> np.ndarray:
        return self.render_until(request, None)

    def render_until(self, request: BackgroundRequest, stop: threading.Event | None) -> np.ndarray:
        """render, given up once `stop` is set (the daemon stops for good, its drain over): the task is
        cancelled at once instead of left running, and costing, with no one to collect it; the job stays
        open and is taken again at the next start."""
        key = self._key()
        s = self.settings
        deadline = self.clock() + s.task_deadline
        ratio = nearest_ratio(request.width, request.height, request.model)
        body: dict[str, Any] = {"model": request.model, "promptText": request.prompt, "ratio": ratio}
        if request.seed is not None:
            body["seed"] = int(request.seed)
        headers = {"X-Runway-Version": API_VERSION}
        try:
            with httpx.Client(
                base_url=s.base_url, headers=headers, auth=_BearerAuth(key), timeout=s.request_timeout
            ) as api:
                answer = self._call(
                    api, "POST", "/v1/text_to_image", deadline, "creating the task", json=body
                )
                task_id = str(self._json(answer, "creating the task").get("id") or "")
                if not task_id:
                    raise EngineError("runway", "creating the task: the answer has no task id")
                logger.info("runway: task {} created ({}, ratio {})", shown(task_id), request.model, ratio)
                try:
                    url = self._wait(api, task_id, deadline, stop)
                except _TaskEnded:
                    raise
                except EngineError:
                    self._cancel(api, task_id)
                    raise
            with httpx.Client(timeout=s.request_timeout, follow_redirects=True) as download:
                data = self._call(download, "GET", url, deadline, "downloading the image").content
        except EngineError as exc:
            # Belt and braces: whatever a server echoed back, no part of the key leaves in an error, and
            # a reason is cut to length only once the key is out of it.
            reason = redacted(exc.reason, key)
            if reason != exc.reason or len(reason) > MAX_REASON:
                raise EngineError("runway", _cut(reason)) from None
            raise
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # a malformed base_url or output URL
            raise EngineError("runway", _cut(f"{type(exc).__name__}: {redacted(str(exc), key)}")) from None
        image = _decode(data, self.max_pixels)
        self.calls += 1
        return fit_cover(image, request.width, request.height)

    # ------------------------------------------------------------ task life cycle

    def _wait(self, api: httpx.Client, task_id: str, deadline: float, stop: threading.Event | None) -> str:
        delay = self.settings.poll_interval
        while True:
            self._pause(delay, deadline, f"task {task_id} still running", stop=stop)
            answer = self._call(api, "GET", f"/v1/tasks/{task_id}", deadline, f"polling task {task_id}")
            task = self._json(answer, f"polling task {task_id}")
            status = str(task.get("status", ""))
            if status == "SUCCEEDED":
                output = task.get("output") or []
                if not output or not isinstance(output[0], str):
                    raise EngineError("runway", f"task {task_id} succeeded without an output URL")
                return output[0]
            if status in ("FAILED", "CANCELLED"):
                failure = str(task.get("failure") or "no reason given")
                code = str(task.get("failureCode") or "no failureCode")
                raise _TaskEnded("runway", f"task {task_id} {status.lower()}: {failure} ({code})")
            if status not in WAITING:
                raise EngineError("runway", f"task {task_id}: unexpected status {status!r}")
            delay = min(delay * 1.5, MAX_POLL_DELAY)

    def _cancel(self, api: httpx.Client, task_id: str) -> None:
        """Best effort: a task we gave up on should not go on costing credits."""
        with contextlib.suppress(httpx.HTTPError):
            api.delete(f"/v1/tasks/{task_id}", timeout=min(self.settings.request_timeout, 5.0))

    def _pause(self, seconds: float, deadline: float, why: str, *, partial: bool = True,
               stop: threading.Event | None = None) -> None:
        """Sleep `seconds`, or (partial) what is left before the deadline; past it, fail. With `stop`, the
        sleep ends when it is set, and fails."""
        remaining = deadline - self.clock()
        if remaining <= 0 or (not partial and seconds > remaining):
            raise EngineError(
                "runway",
                f"{why} (task deadline of {self.settings.task_deadline:g}s reached, runway.task_deadline)",
            )
        if stop is None:
            self.sleep(min(seconds, remaining))
        elif stop.wait(min(seconds, remaining)):
            raise EngineError("runway", f"{why}: bgwatch is stopping; the task is cancelled, and the job is "
                              "taken again at the next start")

    def _call(
        self, client: httpx.Client, method: str, url: str, deadline: float, what: str, **kwargs: Any
    ) -> httpx.Response:
        """One HTTP call with retries for 429 / 5xx / dropped connections, inside the deadline."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise EngineError(
                    "runway",
                    f"{what} (task deadline of {self.settings.task_deadline:g}s reached, "
                    "runway.task_deadline)",
                )
            wait: float | None = None
            try:
                answer = client.request(
                    method, url, timeout=min(self.settings.request_timeout, remaining), **kwargs
                )
            except httpx.TimeoutException:
                problem = f"no answer within {min(self.settings.request_timeout, remaining):.3g}s"
            except httpx.TransportError as exc:
                problem = f"cannot reach the server ({type(exc).__name__})"
            else:
                if answer.status_code == 429 or answer.status_code >= 500:
                    problem = f"HTTP {answer.status_code}"
                    wait = _retry_after(answer.headers.get("Retry-After"))
                elif answer.status_code >= 400:
                    text = _error_text(answer, self._key())
                    raise EngineError("runway", f"{what}: HTTP {answer.status_code}: {text}")
                else:
                    return answer
            if attempt == MAX_ATTEMPTS:
                raise EngineError("runway", f"{what}: {problem}; gave up after {attempt} attempts")
            if wait is None:
                backoff = self.settings.poll_interval * 2 ** (attempt - 1)
                wait = min(backoff, MAX_BACKOFF) * random.uniform(0.8, 1.2)
            logger.warning("runway: {}: {}; retrying in {:.1f}s", what, problem, wait)
            # A Retry-After beyond the deadline is not worth waiting for: fail now, not at the deadline.
            self._pause(wait, deadline, f"{what}: {problem}", partial=False)
        raise AssertionError("unreachable")

    @staticmethod
    def _json(answer: httpx.Response, what: str) -> dict[str, Any]:
        try:
            data = answer.json()
        except ValueError:
            raise EngineError("runway", f"{what}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise EngineError("runway", f"{what}: unexpected answer {str(data)[:100]!r}")
        return data


def _error_text(answer: httpx.Response, key: str) -> str:
    """The server's words for an error, the key redacted out of them before they are cut to length."""
    try:
        data = answer.json()
    except ValueError:
        return _cut(redacted(answer.text, key)) or answer.reason_phrase
    if isinstance(data, dict):
        text = data.get("error") or data.get("message") or data
        issues = data.get("issues")
        if issues:
            text = f"{text} {issues}"
        return _cut(redacted(str(text), key))
    return _cut(redacted(str(data), key))


def _cut(text: str, limit: int = MAX_REASON) -> str:
    """A server-supplied text at most `limit` characters, on one line (redact before cutting)."""
    text = shown(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    """The downloaded result through bgwatch's one decoder (allowed formats, pixel limit)."""
    from bgwatch.pipeline.imageio import decode_bytes

    try:
        return decode_bytes(data, name="downloaded image", max_pixels=max_pixels).rgb
    except InputError as exc:
        raise EngineError("runway", f"the downloaded result was refused: {exc.reason}") from None
