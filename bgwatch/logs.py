"""loguru set-up. Called by cli.py only: the library never configures logging."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def setup_logging(log_dir: Path | None, *, debug: bool = False, quiet: bool = False,
                  secrets: tuple[str, ...] = ()) -> None:
    """Console on stderr, plus rotating app.log and error.log under log_dir (the state folder's logs/)."""
    from loguru import logger

    hidden = tuple(s for s in secrets if s)

    def redact(record: Any) -> bool:
        # Defence in depth: a secret (the Runway key) must never reach a log, even through an exception.
        for secret in hidden:
            if secret in record["message"]:
                record["message"] = record["message"].replace(secret, "***")
        return True

    logger.remove()
    level = "DEBUG" if debug else "INFO"
    console_format = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}"
    if not quiet:
        logger.add(sys.stderr, level=level, format=console_format, filter=redact, backtrace=False,
                   diagnose=False)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_format = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {name}:{line} | {message}"
        logger.add(log_dir / "app.log", level=level, format=file_format, rotation="10 MB", retention=5,
                   filter=redact, enqueue=False, backtrace=False, diagnose=False)
        logger.add(log_dir / "error.log", level="ERROR", format=file_format, rotation="10 MB", retention=5,
                   filter=redact, enqueue=False, backtrace=True, diagnose=False)
