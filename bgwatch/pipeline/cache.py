"""The generated-background cache: PNG files in state_dir/cache, one row each in the backgrounds table.

A generated backdrop costs GPU seconds or cloud credits, so the same request (same engine, model,
prompt, seed, size, steps, guidance, scheduler — BackgroundRequest.cache_key) is generated once and then
read back. The daemon looks a request up in its CPU pool (a hit costs no generation, no rate-limit token
and no device time) and stores a new generation when it finishes the job; jobs with the same request in
flight at once share one generation (workers.SharedGenerations). The folder is bounded by a size cap,
evicting the least recently used. A request whose seed was drawn for the run is neither served from nor
stored in the cache: nobody will ask for it again.

Files are written first (temp name, fsync, rename) and rows second, so a crash leaves at most an orphan
file, which prune() removes; a row whose file vanished is a miss.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from loguru import logger

if TYPE_CHECKING:
    from bgwatch.pipeline.backgrounds import BackgroundRequest
    from bgwatch.storebase import RunStore

PNG_LEVEL = 1  # OFFLINE.md: level 6 costs 4x the time for ~10% less disk


class BackgroundCache:
    """Generated backdrops by request key, bounded to max_bytes (least recently used go first)."""

    def __init__(self, store: RunStore, cache_dir: Path, max_bytes: int) -> None:
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.max_bytes = int(max_bytes)
        self._evict_lock = threading.Lock()

    # ------------------------------------------------------------ lookup and store

    def lookup(self, request: BackgroundRequest) -> np.ndarray | None:
        """The cached backdrop for `request`, or None (a miss, or not cacheable). A hit counts as used."""
        if not request.cacheable:
            return None
        key = request.cache_key()
        try:
            cached = self._read(key, request)
            if cached is not None:
                self.store.touch_background(key)
        except sqlite3.Error as exc:  # a locked or damaged database costs a generation, never the job
            logger.warning("cache: cannot look up background {} ({}); generating it", key[:12], exc)
            return None
        return cached

    def keep(self, request: BackgroundRequest, image: np.ndarray) -> None:
        """Keep a new generation for the next job that asks for it, then evict down to the cap."""
        if not request.cacheable:
            return
        try:
            self._write(request.cache_key(), request, image)
            self._evict(self.max_bytes)
        except sqlite3.Error as exc:
            logger.warning("cache: cannot record background {} ({}); not cached", request.cache_key()[:12], exc)

    def count_hits(self, request: BackgroundRequest, hits: int) -> None:
        """Jobs served by a generation shared while it was in flight count as hits of its entry."""
        if request.cacheable and hits > 0:
            try:
                self.store.touch_background(request.cache_key(), hits)
            except sqlite3.Error as exc:
                logger.warning("cache: cannot count {} hit(s) of background {} ({})", hits,
                               request.cache_key()[:12], exc)

    # ------------------------------------------------------------ files and rows

    def _read(self, key: str, request: BackgroundRequest) -> np.ndarray | None:
        from bgwatch.errors import InputError
        from bgwatch.pipeline.imageio import decode

        row = self.store.get_background(key)
        if row is None:
            return None
        path = Path(row["path"])
        rgb: np.ndarray | None = None
        if path.is_file():
            # bgwatch's one decoder, with the request's own size as the pixel limit.
            with contextlib.suppress(InputError):
                rgb = decode(path, max_pixels=request.width * request.height).rgb
        if rgb is None or rgb.shape[:2] != (request.height, request.width):
            logger.warning("cache: background {} is missing or unreadable; generating it again", key[:12])
            self.store.delete_background(key)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return rgb

    def _write(self, key: str, request: BackgroundRequest, image: np.ndarray) -> None:
        import cv2

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f"{key}.png"
        ok, encoded = cv2.imencode(
            ".png", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL]
        )
        if not ok:
            logger.warning("cache: cannot encode background {}; not cached", key[:12])
            return
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=self.cache_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(encoded.tobytes())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            logger.warning("cache: cannot write {}: {}; not cached", path, exc.strerror)
            return
        self.store.put_background(
            {
                "key": key,
                "engine": request.engine,
                "model": request.model,
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "seed": request.seed,
                "width": request.width,
                "height": request.height,
                "steps": request.steps,
                "guidance_scale": request.guidance_scale,
                "path": str(path),
                "bytes": len(encoded),
                "hits": 0,
            }
        )

    def _remove(self, row: dict[str, Any]) -> int:
        self.store.delete_background(row["key"])
        with contextlib.suppress(OSError):
            Path(row["path"]).unlink()
        return int(row["bytes"] or 0)

    def _evict(self, max_bytes: int) -> int:
        removed = freed = 0
        with self._evict_lock:
            total = self.store.backgrounds_total_bytes()
            if total <= max_bytes:
                return 0
            for row in self.store.lru_backgrounds():
                if total <= max_bytes:
                    break
                size = self._remove(row)
                total -= size
                freed += size
                removed += 1
        if removed:
            logger.info("cache: evicted {} background(s), {} bytes (cap {} bytes)", removed, freed, max_bytes)
        return removed

    # ------------------------------------------------------------ bgwatch cache ls | prune | clear

    def ls(self) -> list[dict[str, Any]]:
        """The backgrounds table's rows (key, engine, model, prompt, seed, width, height, bytes, hits,
        created_at, last_used_at, path, ...), most recently used first."""
        return self.store.list_backgrounds()

    def prune(self, max_bytes: int | None = None) -> int:
        """Drop rows whose file vanished and files with no row (an interrupted write), then evict down
        to max_bytes (the configured cap when None). Returns the number of backgrounds removed."""
        removed = 0
        known: set[str] = set()
        for row in self.store.lru_backgrounds():
            if Path(row["path"]).is_file():
                known.add(Path(row["path"]).name)
            else:
                self.store.delete_background(row["key"])
                removed += 1
        if self.cache_dir.is_dir():
            for path in self.cache_dir.iterdir():
                if path.is_file() and path.suffix == ".png" and path.name not in known:
                    path.unlink(missing_ok=True)
        return removed + self._evict(self.max_bytes if max_bytes is None else int(max_bytes))

    def clear(self) -> int:
        """Remove every cached background; returns how many there were."""
        return self.prune(max_bytes=0)
