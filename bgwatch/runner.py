"""`bgwatch run` and `bgwatch serve` in the foreground: the pre-flight checks, the daemon with its metrics
server when configured, the progress bar and the closing table of `run --once`.

The command line (cli.py) sets up logging between the pre-flight checks and the start, so that a refusal
to start is one clear line and everything after it goes to the log.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from bgwatch import report
from bgwatch.errors import ConfigError


def preflight(config: Any) -> list[str]:
    """The folder checks of `bgwatch doctor` before anything starts: an error refuses to start (exit 2,
    which the unit does not restart), warnings go to the log once logging is set up."""
    from bgwatch import doctor
    from bgwatch.service import InstanceLock

    if InstanceLock.held(config.state_dir):
        raise ConfigError(config.source or "(built-in config)", "state_dir",
                          f"another bgwatch is already running with state folder {config.state_dir}")
    checks = doctor.folder_checks(config)
    if config.device == "cuda":
        checks += doctor.device_checks(config)
    errors = [c for c in checks if c.level is doctor.Level.ERROR]
    if errors:
        more = f" (and {len(errors) - 1} more: bgwatch doctor)" if len(errors) > 1 else ""
        raise ConfigError(config.source or "(built-in config)", f"{errors[0].area} {errors[0].subject}",
                          errors[0].message + more)
    for inbox in config.inboxes:
        inbox.outbox.mkdir(parents=True, exist_ok=True)
    return [f"{c.area} {c.subject}: {c.message}" for c in checks if c.level is doctor.Level.WARNING]


def run_daemon(config: Any, *, once: bool, show_progress: bool, warnings: Sequence[str],
               early_stop: Sequence[int]) -> int:
    """`run` and `serve`: the daemon, with its metrics and HTTP API when configured, until stopped."""
    from loguru import logger

    from bgwatch.daemon import Daemon

    for warning in warnings:
        logger.warning("pre-flight: {}", warning)
    progress = None
    # A share that is not mounted: `run --once` says so, and exits 1 when no inbox could be looked at (a cron
    # job must learn that nothing was done, not read "the inboxes are empty").
    missing = [str(ib.path) for ib in config.inboxes if not ib.path.is_dir()] if once else []
    if once and show_progress:  # tqdm, and the count of waiting files, only for a bar someone sees
        from tqdm import tqdm

        progress = tqdm(desc="bgwatch", unit="img", file=sys.stderr,
                        total=sum(report.waiting(inbox) for inbox in config.inboxes) or None)

    def advance(_result: Any) -> None:
        if progress is None:
            return
        if progress.total is not None and progress.n >= progress.total:
            progress.total = progress.n + 1  # a file dropped meanwhile
        progress.update(1)

    metrics, server = None, None
    http = bool(config.http.listen) and not once
    if http and not config.metrics.listen:  # the API serves /metrics
        from bgwatch.metrics import Metrics

        metrics = Metrics(status=lambda: report.live_status(config), stale_seconds=config.metrics.stale_seconds)
    if config.metrics.listen and not once:
        from bgwatch.metrics import Metrics

        metrics = Metrics(status=lambda: report.live_status(config), stale_seconds=config.metrics.stale_seconds)
        try:
            server = metrics.serve(config.metrics.listen, keys=config.http.api_keys())
        except OSError as exc:
            raise ConfigError(config.source or "(built-in config)", "metrics.listen",
                              f"cannot listen on {config.metrics.listen}: {exc.strerror or exc}") from None
        logger.info("metrics on {}/metrics, health check on {}/healthz", server.url, server.url)

    def finished(result: Any) -> None:
        advance(result)
        if metrics is not None:
            engine = "+".join(e for e in (result.mask_engine, result.bg_engine) if e) or "none"
            inbox = "http" if daemon.http is not None and daemon.http.knows(result.run_id) else report.inbox_of(
                config, result)
            metrics.run_finished(result.state.value, inbox, engine, result.timings)

    daemon = Daemon(config, once=once,
                    on_result=finished if progress is not None or metrics is not None else None, metrics=metrics,
                    http=http)
    daemon.install_signal_handlers()
    for _ in early_stop:
        daemon.request_stop()
    try:
        code = daemon.run()
    finally:
        if server is not None:
            server.close()
    if not once and daemon.stop_event.is_set():
        # Stopped on request (systemctl stop): exit 0 whatever the jobs did. Failed jobs are reported per
        # file; a non-zero status would mark the unit failed and restart it.
        return 0
    if once:
        if progress is not None:
            progress.close()
        from bgwatch.storebase import open_store

        store = open_store(config.store, sqlite_path=config.db_path, host=config.host)
        rows = {r["id"]: r for r in store.history(limit=max(len(daemon.results), 1) * 2 + 100)}
        store.close()
        report.print_results(daemon.results, rows, missing=missing, inboxes=len(config.inboxes))
        if missing and len(missing) == len(config.inboxes):
            return max(code, 1)
    return code
