"""Sidecars on their own: a sidecar whose image is not in the inbox waits a while for it, is filed beside
its image in done/ when it changes nothing, makes the image be processed again (late_sidecars: redo), or
is filed in failed/ with the reason. The intake's main thread drives it (`check` every tick)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from bgwatch import fileid, rules, sidecars
from bgwatch.claims import DONE_DIR, FAILED_DIR
from bgwatch.config import Config
from bgwatch.errors import BgwatchError
from bgwatch.jobs import job_key
from bgwatch.storebase import RunStore
from bgwatch.text import shown

if TYPE_CHECKING:
    from bgwatch.intake import Site, Waiting


class OrphanSidecars:
    def __init__(self, store: RunStore, config: Callable[[], Config], requeue: Callable[[Path, Site], None]) -> None:
        self.store = store
        self.config = config  # the current config (it changes on a reload)
        self.requeue = requeue  # an image brought back from done/ to be processed again
        self.waiting: dict[Path, Waiting] = {}  # stable sidecars whose image is not in the inbox

    def check(self, now: float) -> None:
        """Look at each waiting sidecar again (main thread, every tick)."""
        for path, waiting in list(self.waiting.items()):
            try:
                self._check_orphan(path, waiting, now)
            except (OSError, BgwatchError, sqlite3.Error, ValueError) as exc:
                # logged once, not ten times a second: the sidecar is looked at again if it changes
                logger.error("{}: {}; leaving this sidecar where it is", shown(str(path)), shown(str(exc)))
                self.waiting.pop(path, None)

    def _check_orphan(self, path: Path, waiting: Waiting, now: float) -> None:
        if not os.path.lexists(path):
            del self.waiting[path]
            return
        if sidecars.sidecar_images(path):
            del self.waiting[path]  # its image arrived: it travels with it when the image is taken
            return
        site = waiting.site
        rel = site.inbox.rel_path(path)
        done_twin = site.inbox.path / DONE_DIR / rel
        images = sidecars.sidecar_images(done_twin)
        if images:
            self._sidecar_after_image(site, path, images[0])
            del self.waiting[path]
        elif now - waiting.first_seen >= self.config().watch.orphan_sidecar_seconds:
            reason = (f"no image belongs to this sidecar (looked for {path.stem}.* beside it) within "
                      f"{self.config().watch.orphan_sidecar_seconds:g} s")
            site.custody.park_unclaimed(rel, FAILED_DIR, reason)
            logger.warning("{}: {}", shown(rel), shown(reason))
            del self.waiting[path]

    def _sidecar_after_image(self, site: Site, sidecar: Path, done_image: Path) -> None:
        """A sidecar arrived after its image was processed: process it again if the resolved spec changed."""
        inbox = site.inbox
        image_rel = inbox.rel_path(sidecar.parent / done_image.name)
        try:
            spec = rules.resolve(inbox.path / image_rel, inbox, self.config(), sidecar=sidecar).spec
        except BgwatchError as exc:
            site.custody.park_unclaimed(inbox.rel_path(sidecar), FAILED_DIR, str(exc))
            return
        if self.store.find_done(job_key(fileid.sha256_file(done_image), spec)) is not None:
            site.custody.park_unclaimed(inbox.rel_path(sidecar), DONE_DIR)
            logger.info("{}: sidecar changes nothing; filed beside its image in done/", shown(inbox.rel_path(sidecar)))
            return
        if inbox.late_sidecars != "redo":
            reason = (f"its image {done_image.name} was already processed, and a delivered output is not re-rendered "
                      "by a sidecar dropped later; to redo it, move the image from done/ back into the inbox "
                      "with this sidecar (or set late_sidecars: redo on this inbox in config.yaml)")
            site.custody.park_unclaimed(inbox.rel_path(sidecar), FAILED_DIR, reason)
            logger.warning("{}: {}", shown(inbox.rel_path(sidecar)), shown(reason))
            return
        logger.info("{}: sidecar arrived after its image; processing it again", shown(image_rel))
        back = site.custody.restore(DONE_DIR, inbox.rel_path(done_image)[len(DONE_DIR) + 1:], image_rel)
        if back is not None:
            self.requeue(inbox.path / back, site)
