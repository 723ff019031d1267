"""The HTTP door's results folder: the names it gives results, writing them, serving them back by name,
pruning them after http.keep_hours, and an HTTP run as GET /runs/{id} shows it.

The folder is state_dir/http/results, or the operator's (OUTPUT_DIR, http.results_dir), which may hold
other files: only names this door makes (stem-<12 hex>.ext) are ever served or removed, and never through
a link.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

from loguru import logger

from bgwatch import safefs
from bgwatch.jobs import JobState, OutputSpec
from bgwatch.storebase import RunStore

MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}
_RESULT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,80}-[0-9a-f]{12}\.(png|jpg|webp)")
_SAFE_STEM = re.compile(r"[^A-Za-z0-9_-]+")


class ResultsFolder:
    def __init__(self, path: Path, *, private: bool) -> None:
        self.path = Path(os.path.abspath(path))
        self.private = private  # the daemon's own folder (0700), not the operator's

    def make(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700 if self.private else 0o755)

    def name_for(self, upload_name: str, output: OutputSpec) -> str:
        """A new result's name: the upload's stem made safe, a random token, the output's extension."""
        from bgwatch.pipeline.imageio import output_extension

        stem = _SAFE_STEM.sub("_", Path(upload_name).stem)[:60].strip("_-") or "image"
        return f"{stem}-{secrets.token_hex(6)}{output_extension(output)}"

    def write(self, name: str, data: bytes) -> Path:
        target = self.path / name
        safefs.write_file_atomic(target, data)
        return target

    def read(self, name: str) -> tuple[bytes, str] | None:
        """A result by its bare name, with its media type; None for anything else (another folder, a link,
        a name this door never makes)."""
        if not _RESULT_NAME.fullmatch(name):
            return None
        try:
            fd = os.open(self.path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read(), MEDIA_TYPES[Path(name).suffix]

    def prune(self, older_than: float) -> int:
        """Remove this door's results last changed before `older_than` (a time); returns how many."""
        removed = 0
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return 0
        for entry in entries:
            try:
                if (_RESULT_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_mtime < older_than):
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed

    def run_record(self, store: RunStore, run_id: int, inbox: str) -> dict[str, Any] | None:
        """An HTTP run as GET /runs/{id} shows it; None for a run that did not come through `inbox`."""
        row = store.get_run(run_id)
        if row is None or row.inbox != inbox:
            return None
        failed = row.status == JobState.FAILED.value
        record: dict[str, Any] = {
            "success": not failed, **({"detail": row.error} if failed else {}),
            "run_id": row.id, "status": row.status, "filename": row.rel_path, "error": row.error or None,
            "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at,
            "timings": json.loads(row.timings_json) if row.timings_json else {}, "seed": row.seed,
            "mask_engine": row.mask_engine or None, "bg_engine": row.bg_engine or None,
        }
        name = Path(row.output_path).name if row.output_path else ""
        if row.status == JobState.DONE.value and name and (self.path / name).is_file():
            record["download_url"] = f"/download/{name}"
            record["output_path"] = str(self.path / name)
        return record


def log_pruned(removed: int, keep_hours: float) -> None:
    if removed:
        logger.info("removed {} HTTP result(s) older than {:g} h", removed, keep_hours)
