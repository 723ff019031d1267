"""The generated-background cache over real SQLite and real files (and the real tiny SDXL pipeline)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bgwatch.config import Config
from bgwatch.jobs import JobSpec
from bgwatch.pipeline.backgrounds import BackgroundRequest, load_background_engine
from bgwatch.pipeline.cache import BackgroundCache
from bgwatch.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state" / "bgwatch.db", clock=Clock())
    yield s
    s.close()


def make_request(
    seed: int = 1, prompt: str = "a studio", size: tuple[int, int] = (64, 48)
) -> BackgroundRequest:
    spec = JobSpec(operation="replace", engine="sdxl", prompt=prompt, seed=seed)
    return BackgroundRequest.from_spec(spec, *size)


class Renderer:
    """A stand-in generator that counts its calls (the real pipeline is used further down)."""

    def __init__(self, request: BackgroundRequest) -> None:
        self.request = request
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> np.ndarray:
        with self.lock:
            self.calls += 1
        rng = np.random.default_rng(self.request.seed)
        return rng.integers(0, 256, (self.request.height, self.request.width, 3), dtype=np.uint8)


def get_or_render(cache: BackgroundCache, request: BackgroundRequest, render: Callable[[], np.ndarray],
                  before_generate: Callable[[], object] | None = None) -> tuple[np.ndarray, bool]:
    """What the daemon's stages do: look up (prepare), else take a token and generate (gate, device), then
    keep it (finish)."""
    cached = cache.lookup(request)
    if cached is not None:
        return cached, True
    if before_generate is not None:
        before_generate()
    image = render()
    cache.keep(request, image)
    return image, False


def test_a_miss_generates_and_stores_a_hit_reads_back_without_a_token(store: Store, tmp_path: Path) -> None:
    cache = BackgroundCache(store, tmp_path / "cache", 10**9)
    request = make_request()
    render = Renderer(request)
    tokens: list[int] = []
    first, hit1 = get_or_render(cache, request, render, before_generate=lambda: tokens.append(1))
    second, hit2 = get_or_render(cache, request, render, before_generate=lambda: tokens.append(1))
    assert (hit1, hit2) == (False, True)
    assert render.calls == 1 and tokens == [1]
    assert np.array_equal(first, second)
    row = store.get_background(request.cache_key())
    assert row is not None and row["hits"] == 1 and row["seed"] == 1 and row["prompt"] == "a studio"
    assert Path(row["path"]).is_file() and Path(row["path"]).parent == tmp_path / "cache"
    assert row["bytes"] == Path(row["path"]).stat().st_size
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{request.cache_key()}.png"]  # no temp left


def test_a_drawn_seed_is_neither_served_nor_stored(store: Store, tmp_path: Path) -> None:
    cache = BackgroundCache(store, tmp_path / "cache", 10**9)
    spec = JobSpec(operation="replace", engine="sdxl", prompt="a studio")  # no seed: drawn per run
    request = BackgroundRequest.from_spec(spec, 64, 48, 99)
    render = Renderer(request)
    tokens: list[int] = []
    for _ in range(2):
        _, hit = get_or_render(cache, request, render, before_generate=lambda: tokens.append(1))
        assert not hit
    assert render.calls == 2 and tokens == [1, 1] and store.list_backgrounds() == []


def _fill(cache: BackgroundCache, seeds: list[int]) -> dict[int, BackgroundRequest]:
    requests = {}
    for seed in seeds:
        requests[seed] = make_request(seed=seed)
        get_or_render(cache, requests[seed], Renderer(requests[seed]))
    return requests


def test_the_size_cap_evicts_the_least_recently_used(store: Store, tmp_path: Path) -> None:
    probe = BackgroundCache(store, tmp_path / "probe", 10**9)
    one = make_request(seed=50)
    get_or_render(probe, one, Renderer(one))
    size = store.get_background(one.cache_key())["bytes"]  # type: ignore[index]
    probe.clear()
    cache = BackgroundCache(store, tmp_path / "cache", int(size * 2.5))  # room for two
    requests = _fill(cache, [1, 2])
    get_or_render(cache, requests[1], Renderer(requests[1]))  # 1 used again: 2 is now the oldest
    requests.update(_fill(cache, [3]))
    kept = {row["seed"] for row in store.list_backgrounds()}
    assert kept == {1, 3}
    files = {p.name for p in (tmp_path / "cache").iterdir()}
    assert files == {f"{requests[1].cache_key()}.png", f"{requests[3].cache_key()}.png"}
    assert store.backgrounds_total_bytes() <= cache.max_bytes


def test_a_row_whose_file_vanished_is_a_miss(store: Store, tmp_path: Path) -> None:
    cache = BackgroundCache(store, tmp_path / "cache", 10**9)
    request = make_request()
    render = Renderer(request)
    get_or_render(cache, request, render)
    Path(store.get_background(request.cache_key())["path"]).unlink()  # type: ignore[index]
    _, hit = get_or_render(cache, request, render)
    assert not hit and render.calls == 2
    assert Path(store.get_background(request.cache_key())["path"]).is_file()  # type: ignore[index]


def test_a_corrupt_file_is_a_miss(store: Store, tmp_path: Path) -> None:
    cache = BackgroundCache(store, tmp_path / "cache", 10**9)
    request = make_request()
    render = Renderer(request)
    get_or_render(cache, request, render)
    Path(store.get_background(request.cache_key())["path"]).write_bytes(b"\x89PNG truncated")  # type: ignore[index]
    image, hit = get_or_render(cache, request, render)
    assert not hit and render.calls == 2 and image.shape == (48, 64, 3)


def test_ls_prune_and_clear(store: Store, tmp_path: Path) -> None:
    cache = BackgroundCache(store, tmp_path / "cache", 10**9)
    requests = _fill(cache, [1, 2, 3])
    listed = cache.ls()
    assert [row["seed"] for row in listed] == [3, 2, 1]  # most recently used first
    assert {"key", "engine", "prompt", "width", "height", "bytes", "hits", "last_used_at"} <= set(listed[0])
    orphan = tmp_path / "cache" / ("0" * 64 + ".png")  # an interrupted write: a file with no row
    orphan.write_bytes(b"x")
    Path(store.get_background(requests[2].cache_key())["path"]).unlink()  # type: ignore[index]
    assert cache.prune() == 1  # the row whose file vanished
    assert not orphan.exists() and {row["seed"] for row in cache.ls()} == {1, 3}
    assert cache.prune(max_bytes=cache.store.backgrounds_total_bytes() - 1) == 1  # the older of the two goes
    assert [row["seed"] for row in cache.ls()] == [3]
    assert cache.clear() == 1
    assert cache.ls() == [] and list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------- with the real pipeline


def test_hits_skip_the_real_pipeline(store: Store, tmp_path: Path, tiny_sdxl: Path) -> None:
    engine = load_background_engine("sdxl", Config(device="cpu"))
    cache = BackgroundCache(store, tmp_path / "cache", 10**9)
    spec = JobSpec(
        operation="replace", engine="sdxl", model=str(tiny_sdxl), prompt="a studio", steps=2, seed=5
    )
    request = BackgroundRequest.from_spec(spec, 120, 90)
    render: Callable[[], np.ndarray] = lambda: engine.render(request)  # noqa: E731
    before = engine.calls  # type: ignore[attr-defined]
    generated, hit1 = get_or_render(cache, request, render)
    cached, hit2 = get_or_render(cache, request, render)
    assert (hit1, hit2) == (False, True) and engine.calls == before + 1  # type: ignore[attr-defined]
    assert np.array_equal(generated, cached)  # PNG is lossless
    other = replace(request, seed=6)
    get_or_render(cache, other, lambda: engine.render(other))  # type: ignore[attr-defined]
    assert engine.calls == before + 2  # type: ignore[attr-defined]
