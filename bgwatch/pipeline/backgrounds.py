"""Backdrops for `operation: replace`: the BackgroundEngine protocol, its registry and the plain engines.

Engines register by name (BACKGROUND_ENGINES); `load_background_engine(name, config)` loads one once per
daemon so models stay loaded. Every engine turns a `BackgroundRequest` into an HxWx3 uint8 image at
exactly request.width x request.height. The generative engines live in their own modules, imported only
when they are used: `sdxl` (diffusers, bgwatch/pipeline/sdxl.py) and `runway` (Runway's HTTP API,
bgwatch/pipeline/runway.py). `image`, `color` and `gradient` need no weights and no network.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from bgwatch.errors import EngineError, InputError
from bgwatch.jobs import DEFAULT_RUNWAY_MODEL, DEFAULT_SDXL_MODEL, GENERATIVE_ENGINES, JobSpec
from bgwatch.pipeline.tiles import strips

if TYPE_CHECKING:
    from bgwatch.config import Config

MAX_SIDE_WITHOUT_4K = 4096
SEED_RANGE = 2**32  # Runway takes 0..4294967295; SDXL any 64-bit seed: draw within both


class BackgroundEngine(Protocol):
    """Turns a request into a backdrop: HxWx3 uint8, exactly request.width x request.height."""

    name: str

    def render(self, request: BackgroundRequest) -> np.ndarray: ...


@runtime_checkable
class StoppableEngine(Protocol):
    """An engine whose render can be given up from outside (a remote task: cancelled, not left running)."""

    def render_until(self, request: BackgroundRequest, stop: threading.Event | None) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class BackgroundRequest:
    """Everything that decides a backdrop's pixels (and, for generative engines, its cache key)."""

    engine: str
    width: int
    height: int
    model: str = ""  # the engine's default already filled in
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = None  # generative engines always get one (drawn if the spec had none)
    steps: int = 0  # sdxl only, like negative_prompt, guidance_scale and scheduler
    guidance_scale: float = 0.0
    scheduler: str = ""  # sdxl: config.sdxl.scheduler ("" keeps the checkpoint's)
    color: str = "#ffffff"
    gradient: tuple[str, str] = ("#f4f4f4", "#c8c8c8")
    gradient_direction: str = "vertical"
    image: str = ""  # backdrop file (absolute path)
    image_fit: str = "cover"  # cover | contain
    seed_drawn: bool = False  # the seed was drawn for this run: never served from or stored in the cache

    @classmethod
    def from_spec(
        cls, spec: JobSpec, width: int, height: int, seed: int | None = None, *, config: Config | None = None
    ) -> BackgroundRequest:
        """The request for one input image of width x height; its backdrop is made at that input's output
        frame (backdrop_size: the canvas's size when the spec gives one).

        seed: the seed to use when the spec has none (the caller draws it with draw_seed() and records
        it); None with no spec seed draws one here. Pass `config` so sdxl requests carry the configured
        scheduler (it changes the pixels, so it belongs in the cache key).
        """
        engine = spec.engine
        width, height = backdrop_size(spec, int(width), int(height))
        base = cls(engine=engine, width=width, height=height)
        # Only the fields the engine reads are set; the rest keep their defaults, so a change to a field
        # an engine ignores (a colour for sdxl, steps for runway) never misses the cache.
        if engine in GENERATIVE_ENGINES:
            chosen = seed if seed is not None else spec.seed if spec.seed is not None else draw_seed()
            base = replace(base, prompt=spec.prompt, seed=chosen, seed_drawn=spec.seed is None)
            if engine == "runway":  # Runway takes a prompt, a ratio and a seed
                return replace(base, model=spec.model or DEFAULT_RUNWAY_MODEL)
            return replace(
                base,
                model=spec.model or DEFAULT_SDXL_MODEL,
                negative_prompt=spec.negative_prompt,
                steps=spec.steps,
                guidance_scale=float(spec.guidance_scale),
                scheduler=config.sdxl.scheduler if config is not None else "",
            )
        if engine == "color":
            return replace(base, color=spec.background_color)
        if engine == "gradient":
            return replace(base, gradient=tuple(spec.gradient), gradient_direction=spec.gradient_direction)  # type: ignore[arg-type]
        if engine == "image":
            return replace(base, image=spec.background_image, image_fit=spec.background_fit)
        return base

    @property
    def generative(self) -> bool:
        return self.engine in GENERATIVE_ENGINES

    @property
    def cacheable(self) -> bool:
        """Generated with a seed someone chose: the same request later may be served from the cache."""
        return self.generative and self.seed is not None and not self.seed_drawn

    def cache_key(self) -> str:
        """sha256 over every field that changes the pixels (seed_drawn does not)."""
        data = asdict(self)
        data.pop("seed_drawn")
        data["gradient"] = list(self.gradient)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def backdrop_size(spec: JobSpec, width: int, height: int) -> tuple[int, int]:
    """(width, height) a width x height input's backdrop is made at: its output's frame (canvas.frame_size:
    the canvas's size when the spec gives one), so the backdrop is rendered or generated once at the size it
    is shown, never cropped or blurred by a second fit, and cached under that size; the input's size when
    the frame waits on the subject (canvas.trim without a size), which the composite then fits to."""
    from bgwatch.pipeline.canvas import frame_size

    return frame_size(spec, width, height) or (width, height)


def draw_seed() -> int:
    """A fresh random seed, valid for every engine (0 .. 2**32-1)."""
    return secrets.randbelow(SEED_RANGE)


def check_input_size(
    spec: JobSpec, width: int, height: int, allow_4k: bool, *, source: str | Path = "input image"
) -> None:
    """The 4K rule: sdxl generates about one megapixel, so an input over 4096 px on a side is refused."""
    if spec.operation != "replace" or spec.engine != "sdxl" or allow_4k:
        return
    if max(width, height) > MAX_SIDE_WITHOUT_4K:
        raise InputError(
            source,
            f"{width}x{height} is over {MAX_SIDE_WITHOUT_4K} px on a side; the sdxl engine generates about "
            "one megapixel and would be upscaled that far. Allow it with limits.allow_4k: true in "
            "config.yaml (or ALLOW_4K=1), or use a smaller image",
        )


# ---------------------------------------------------------------- registry

BACKGROUND_ENGINES: dict[str, str] = {
    "sdxl": "bgwatch.pipeline.sdxl:SdxlEngine",
    "runway": "bgwatch.pipeline.runway:RunwayEngine",
    "image": "bgwatch.pipeline.backgrounds:ImageEngine",
    "color": "bgwatch.pipeline.backgrounds:ColorEngine",
    "gradient": "bgwatch.pipeline.backgrounds:GradientEngine",
}

_loaded: dict[tuple[object, ...], BackgroundEngine] = {}
_loaded_lock = threading.Lock()


def _engine_class(name: str) -> type:
    if name not in BACKGROUND_ENGINES:
        raise EngineError(name, f"unknown background engine (known: {', '.join(BACKGROUND_ENGINES)})")
    module_name, _, attr = BACKGROUND_ENGINES[name].partition(":")
    cls: type = getattr(importlib.import_module(module_name), attr)
    return cls


def load_background_engine(name: str, config: Config) -> BackgroundEngine:
    """The engine `name`, created once per (name, settings) and kept: models stay loaded between jobs."""
    key = (name, config.device, config.sdxl, config.runway, config.limits.max_pixels)
    with _loaded_lock:
        engine = _loaded.get(key)
        if engine is None:
            engine = _engine_class(name)(config)
            _loaded[key] = engine
        return engine


def unload_background_engines() -> None:
    """Forget every loaded engine (config reload, tests); their models are freed with them."""
    with _loaded_lock:
        _loaded.clear()


# ---------------------------------------------------------------- fitting


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width * height < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interpolation)


def fit_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to cover width x height, then crop the centre (no bars, no distortion)."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    sw, sh = max(width, round(w * scale)), max(height, round(h * scale))
    scaled = _resize(image, sw, sh)
    x, y = (sw - width) // 2, (sh - height) // 2
    return np.ascontiguousarray(scaled[y : y + height, x : x + width])


def fit_contain(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to fit inside width x height; the margins continue the image, blurred (never black bars)."""
    import cv2

    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = fit_cover(image, width, height)
    sigma = max(width, height) / 30
    canvas = cv2.GaussianBlur(canvas, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    x, y = (width - sw) // 2, (height - sh) // 2
    inner = _resize(image, sw, sh)
    # Fade the image's own border into the blurred margin over a few pixels: no hard seam. The fade is the
    # Gaussian blur of a rectangle, a product of a blurred row and a blurred column: made in strips of rows
    # straight into the canvas, never a full-size float image.
    seam = max(1.0, max(width, height) / 300)
    inset = int(2 * seam)
    fade_y = _blurred_step(height, y + inset, y + sh - inset, seam)
    fade_x = _blurred_step(width, x + inset, x + sw - inset, seam)[None, :, None]
    for s0, s1 in strips(height, width):
        sharp = canvas[s0:s1].copy()
        r0, r1 = max(s0, y), min(s1, y + sh)
        if r1 > r0:
            sharp[r0 - s0 : r1 - s0, x : x + sw] = inner[r0 - y : r1 - y]
        blend = fade_y[s0:s1, None, None] * fade_x
        rows = sharp * blend + canvas[s0:s1] * (1.0 - blend)
        canvas[s0:s1] = np.clip(np.rint(rows), 0, 255)
    return canvas


def _blurred_step(length: int, start: int, stop: int, sigma: float) -> np.ndarray:
    """1 on start:stop and 0 elsewhere, Gaussian-blurred as cv2.GaussianBlur blurs a float image (its kernel
    size, its reflect-101 border): one axis of the blurred rectangle."""
    import cv2

    step = np.zeros(length, np.float32)
    step[max(0, start) : max(0, stop)] = 1.0
    size = round(sigma * 8 + 1) | 1
    kernel = cv2.getGaussianKernel(size, sigma, cv2.CV_32F)[:, 0]
    padded = np.pad(step, size // 2, mode="reflect")
    return np.asarray(np.convolve(padded, kernel, mode="valid"), np.float32)


# ---------------------------------------------------------------- plain engines


def parse_color(text: str, key: str = "background_color") -> tuple[int, int, int]:
    """'#rgb' / '#rrggbb' / a CSS name -> (r, g, b); the same parser cleanup uses, so the two agree."""
    from bgwatch.pipeline.cleanup import parse_color as cleanup_parse_color

    return cleanup_parse_color(text, source="spec", key=key)


class ColorEngine:
    """A flat backdrop in background_color."""

    name = "color"

    def __init__(self, config: Config | None = None) -> None:
        pass

    def render(self, request: BackgroundRequest) -> np.ndarray:
        out = np.empty((request.height, request.width, 3), np.uint8)
        out[:] = parse_color(request.color)
        return out


class GradientEngine:
    """Two colours, vertical / horizontal / radial; dithered so 8-bit output shows no bands."""

    name = "gradient"

    def __init__(self, config: Config | None = None) -> None:
        pass

    def render(self, request: BackgroundRequest) -> np.ndarray:
        """Rendered strip by strip into the uint8 result: the ramp is a row or a column (radial: one strip's
        distances), never a full-size float image."""
        from bgwatch.pipeline.tiles import strips

        w, h = request.width, request.height
        start = np.array(parse_color(request.gradient[0], "gradient"), np.float32)
        end = np.array(parse_color(request.gradient[1], "gradient"), np.float32)
        direction = request.gradient_direction
        if direction not in ("vertical", "horizontal", "radial"):
            raise EngineError(
                "gradient", f"gradient_direction {direction!r} (allowed: vertical, horizontal, radial)"
            )
        # A triangular dither of +-1 level (seeded: a request always gives the same pixels) breaks up the
        # 8-bit steps of a long, shallow ramp, which otherwise show as bands. The two uniform fields are
        # one stream each, drawn strip by strip: the second starts where h * w draws of the first end.
        later = np.random.PCG64(0)  # default_rng(0)'s bit generator
        later.advance((h * w) // 2)  # two float32 draws a step
        first, second = np.random.default_rng(0), np.random.Generator(later)
        if (h * w) % 2:
            second.random(1, np.float32)
        out = np.empty((h, w, 3), np.uint8)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        for y0, y1 in strips(h, w):
            t: np.ndarray
            if direction == "vertical":
                t = np.linspace(0.0, 1.0, h, dtype=np.float32)[y0:y1, None]
            elif direction == "horizontal":
                t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
            else:
                yy, xx = np.mgrid[y0:y1, 0:w].astype(np.float32)
                t = np.hypot(xx - cx, yy - cy) / max(np.hypot(cx, cy), 1.0)
            dither = first.random((y1 - y0, w, 1), np.float32) - second.random((y1 - y0, w, 1), np.float32)
            rows = start + (end - start) * t[..., None] + dither
            out[y0:y1] = np.clip(np.rint(rows), 0, 255)
        return out


class ImageEngine:
    """A supplied backdrop image, fitted by cover (centred crop) or contain (blurred continuation)."""

    name = "image"

    def __init__(self, config: Config | None = None) -> None:
        self.max_pixels = config.limits.max_pixels if config is not None else 100_000_000

    def render(self, request: BackgroundRequest) -> np.ndarray:
        if not request.image:
            raise EngineError("image", "no background_image given for engine image")
        # Decoded no larger than it must be: a JPEG twice the backdrop's size or more at a reduced scale.
        rgb = load_backdrop(Path(request.image), self.max_pixels, at_least=(request.width, request.height))
        if request.image_fit == "contain":
            return fit_contain(rgb, request.width, request.height)
        return fit_cover(rgb, request.width, request.height)


def load_backdrop(path: Path, max_pixels: int, *, at_least: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a backdrop file to HxWx3 uint8 sRGB. rules.py resolved it to a real path (inside the inbox
    for sidecars and folder files), so no link is followed anywhere on it: a folder or the file swapped
    since for a link, or the file for a pipe or device, is refused, never read. `at_least` (width, height):
    the size it is fitted to; a JPEG at least twice that on both sides is decoded at a half, quarter or
    eighth of its size (decoded_size says which), far less memory and time than the whole."""
    from bgwatch.pipeline import imageio

    with _backdrop_fd(path) as fd:
        return imageio.decode(Path(path), max_pixels=max_pixels, fd=fd, at_least=at_least).rgb


def decoded_size(path: Path, at_least: tuple[int, int]) -> tuple[int, int] | None:
    """(width, height) load_backdrop decodes the backdrop `path` to when it is fitted to `at_least`, from
    its header (read as load_backdrop reads it, no link followed): admission counts it. None when the header
    cannot be read (the job then fails in its backdrop stage, saying why)."""
    from bgwatch.pipeline import imageio

    try:
        with _backdrop_fd(path) as fd:
            width, height = imageio.probe_size(Path(path), fd=fd)
            os.lseek(fd, 0, os.SEEK_SET)
            is_jpeg = os.read(fd, 3) == b"\xff\xd8\xff"
    except InputError:
        return None
    if not is_jpeg:
        return width, height
    # Pillow's JpegImageFile.draft: the largest of 8, 4, 2 that keeps both sides at least the size asked.
    ratio = min(width // max(1, at_least[0]), height // max(1, at_least[1]))
    scale = next((s for s in (8, 4, 2) if ratio >= s), 1)
    return -(-width // scale), -(-height // scale)


@contextmanager
def _backdrop_fd(path: Path) -> Iterator[int]:
    from bgwatch import sharefiles

    try:
        fd = sharefiles.open_no_links(Path(path))
    except sharefiles.RefusedFile as exc:
        raise InputError(path, f"background_image: {exc.what}; refused") from None
    except FileNotFoundError:
        raise InputError(path, "background_image does not exist") from None
    except OSError as exc:
        raise InputError(path, f"background_image cannot be read: {exc.strerror or exc}") from None
    try:
        yield fd
    finally:
        os.close(fd)
