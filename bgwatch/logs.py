"""loguru set-up. Called by cli.py only: the library never configures logging.

- Console on stderr. Under systemd (JOURNAL_STREAM names our stderr) each line carries an sd-daemon
  priority prefix (`<3>` for errors ...) and no timestamp, so `journalctl -p err` finds bgwatch's errors.
- Rotating app.log and error.log under the state folder's logs/.
- stdlib logging (watchdog, huggingface_hub, transformers, diffusers, httpx, ...) is routed into loguru, so
  their messages reach the same sinks; libraries that install their own stderr handler on import are
  adopted when they are imported; Python warnings are logged too. Known harmless noise is demoted to DEBUG.
- debug (DEBUG=1): DEBUG level everywhere, the source of each console line, and the libraries' own DEBUG.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

# loguru level -> syslog priority (sd-daemon(3): <0> emerg ... <7> debug)
PRIORITIES = {"TRACE": 7, "DEBUG": 7, "INFO": 6, "SUCCESS": 5, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

# Libraries that attach a stderr handler to their own root logger (and may stop propagation) when their
# logging module is imported: that handler is removed and propagation restored, so loguru gets the records.
ADOPTED = {"transformers.utils.logging": "transformers", "diffusers.utils.logging": "diffusers",
           "huggingface_hub.utils.logging": "huggingface_hub"}

# Chatty at DEBUG and never useful to a studio's admin: kept at INFO even with DEBUG=1.
QUIET_IN_DEBUG = ("PIL", "urllib3", "httpcore", "numba", "matplotlib", "asyncio", "filelock", "fsspec")

# (logger, text in the message): known harmless messages logged above their weight, shown with DEBUG=1 only.
# - watchdog logs an ERROR when an inotify emitter is stopped while its thread is already gone (every
#   observer restart), and warns (a Python warning, captured) when a watched folder is created again under a
#   name it watched before (claim and delivery folders come and go).
# - transformers 5 warns once that its image processors fall back to PIL without torchvision, which bgwatch
#   never installs (an unpinned torchvision drags in another torch) and never needs (no image processor).
DEMOTED = (("watchdog.observers.inotify", "InotifyEmitter.queue_events() called when the thread is inactive"),
           ("py.warnings", "RuntimeWarning: Callback with id"),
           ("transformers.utils.import_utils", "requires torchvision (not installed)"))


def journal_stream(stream: TextIO, env: dict[str, str] | None = None) -> bool:
    """True when `stream` is the journal: JOURNAL_STREAM ("device:inode") names its file (systemd.exec(5))."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return info.st_dev == int(device) and info.st_ino == int(inode)


def journal_sink(stream: TextIO) -> Callable[[Any], None]:
    """A loguru sink writing `<N>` before every line (a traceback's too), as journald parses stderr."""

    def write(message: Any) -> None:
        prefix = f"<{PRIORITIES.get(message.record['level'].name, 6)}>"
        text = str(message).rstrip("\n")
        stream.write("".join(f"{prefix}{line}\n" for line in text.split("\n")))
        stream.flush()

    return write


class InterceptHandler(logging.Handler):
    """stdlib logging -> loguru, keeping the level, the logger name and the caller's frame."""

    def emit(self, record: logging.LogRecord) -> None:
        from loguru import logger

        message = record.getMessage()
        level: str | int
        if any(record.name == name and text in message for name, text in DEMOTED):
            level = "DEBUG"
        else:
            try:
                level = logger.level(record.levelname).name
            except ValueError:
                level = record.levelno
        # Point loguru at the library's call site, past the logging module's own frames.
        frame, depth = inspect.currentframe(), 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        name = record.name  # log lines name the library's logger, not the module that happened to call it

        def rename(log_record: Any) -> None:
            log_record["name"] = name

        logger.patch(rename).opt(depth=depth, exception=record.exc_info).log(
            level, "{}", message)


def adopt_library_logger(module: ModuleType, name: str) -> None:
    """Take a library's own stderr handler away and let its records propagate to the root (-> loguru)."""
    if hasattr(module, "disable_default_handler"):  # transformers, diffusers: configures, then removes
        module.disable_default_handler()
    if hasattr(module, "enable_propagation"):
        module.enable_propagation()
    library = logging.getLogger(name)
    for handler in list(library.handlers):
        if type(handler) is logging.StreamHandler:
            library.removeHandler(handler)
    library.propagate = True


class _AdoptingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self.loader, self.name = loader, name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        adopt_library_logger(module, self.name)


class _AdoptingFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the library logging modules in ADOPTED (heavy libraries are imported lazily,
    long after logging is set up, and would otherwise print around loguru)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in ADOPTED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _AdoptingLoader(spec.loader, ADOPTED[fullname])
                return spec
        return None


def route_stdlib_logging(debug: bool) -> None:
    """Send every stdlib logger's records to loguru; adopt libraries already imported or imported later."""
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.DEBUG if debug else logging.INFO, force=True)
    logging.captureWarnings(True)  # Python warnings (watchdog's, the libraries') reach the logs, not raw stderr
    for name in QUIET_IN_DEBUG:
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.WARNING)
    for module_name, name in ADOPTED.items():
        if module_name in sys.modules:
            adopt_library_logger(sys.modules[module_name], name)
    if not any(isinstance(f, _AdoptingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AdoptingFinder())


def setup_logging(log_dir: Path | None, *, debug: bool = False, quiet: bool = False,
                  secrets: tuple[str, ...] = ()) -> None:
    """Console on stderr (journald priorities under systemd), plus rotating app.log and error.log under
    log_dir (the state folder's logs/), and stdlib logging routed into all of them."""
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
    source = " <cyan>{name}:{line}</cyan>" if debug else ""
    if not quiet:
        if journal_stream(sys.stderr):
            # journald stamps the time and the unit; the priority travels in the prefix.
            logger.add(journal_sink(sys.stderr), level=level, filter=redact, colorize=False, backtrace=False,
                       diagnose=False, format="{message}" + (" [{name}:{line}]" if debug else ""))
        else:
            console_format = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level>" + source + " {message}"
            logger.add(sys.stderr, level=level, format=console_format, filter=redact, backtrace=False,
                       diagnose=False)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_format = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {name}:{line} | {message}"
        logger.add(log_dir / "app.log", level=level, format=file_format, rotation="10 MB", retention=5,
                   filter=redact, enqueue=False, backtrace=False, diagnose=False)
        logger.add(log_dir / "error.log", level="ERROR", format=file_format, rotation="10 MB", retention=5,
                   filter=redact, enqueue=False, backtrace=True, diagnose=False)
    route_stdlib_logging(debug)
