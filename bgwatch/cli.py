"""The command line: a thin layer over the library, and the one place that turns a BgwatchError into a
message and an exit code (0 ok, 1 some work failed, 2 bad configuration or usage).

Heavy libraries are imported inside the commands that need them: `bgwatch --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bgwatch import __version__, report
from bgwatch.errors import BgwatchError, ConfigError

Command = Callable[[argparse.Namespace], int]


SERVICE_CONFIG = Path("/etc/bgwatch/config.yaml")


def _config_path(arg: str | None) -> Path | None:
    """-c, else $BGWATCH_CONFIG, else ./config.yaml, else the service's /etc/bgwatch/config.yaml."""
    if arg:
        return Path(arg)
    if os.environ.get("BGWATCH_CONFIG"):
        return Path(os.environ["BGWATCH_CONFIG"])
    for candidate in (Path("config.yaml"), SERVICE_CONFIG):
        if candidate.exists():
            return candidate
    return None


def _load(args: argparse.Namespace, *, required: bool = True) -> Any:
    """The configuration; commands about a daemon's state refuse to guess one (a `state` folder here)."""
    from bgwatch.config import load_config

    path = _config_path(args.config)
    if path is None and required:
        raise ConfigError("config.yaml", "", "no configuration found: pass -c CONFIG, set BGWATCH_CONFIG, or "
                          f"run from the folder holding config.yaml (the service's is {SERVICE_CONFIG})")
    config = load_config(path)
    from bgwatch.models import use_model_locations

    use_model_locations(config, downloads=True if getattr(args, "action", "") == "pull" else None)
    return config


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _setup_logs(config: Any, *, quiet: bool = False, to_files: bool = True) -> None:
    from bgwatch.logs import setup_logging

    setup_logging(config.log_dir if to_files else None, debug=config.debug, quiet=quiet,
                  secrets=(config.runway.api_key,))
    if config.debug:
        from loguru import logger

        logger.debug("configuration {}: device {}, state {}, host {}, {} inbox(es)", config.source or "(built-in)",
                     config.device, config.state_dir, config.host, len(config.inboxes))
        for inbox in config.inboxes:
            logger.debug("inbox {} -> {} ({}, on_success {}): rules {}", inbox.path, inbox.outbox,
                         "polled" if inbox.poll else "inotify", inbox.on_success, dict(inbox.rules))


# ---------------------------------------------------------------------- commands


_early_stop: list[int] = []  # signals that arrived while the daemon was still starting


def _catch_stop_early() -> None:
    """TERM during start-up (imports, pre-flight) must not kill the daemon mid-recovery: it is kept and
    handed to the daemon, which then starts, settles what it left last time, drains and exits 0."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: _early_stop.append(number))


def cmd_run(args: argparse.Namespace) -> int:
    _catch_stop_early()
    config = _load(args)
    if not config.inboxes:
        raise ConfigError(config.source or "(built-in config)", "inboxes", "no inboxes configured")
    return _run_daemon(args, config)


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bgwatch.config import check_http

    _catch_stop_early()
    config = _load(args, required=False)
    if args.listen:
        config = replace(config, http=replace(config.http, listen=args.listen))
        check_http("--listen", config.http)
    if not config.http.listen:
        raise ConfigError(config.source or "(built-in config)", "http.listen",
                          "the HTTP API is off: set http.listen in config.yaml, or pass --listen HOST:PORT")
    args.once, args.no_progress = False, True  # serve has no --once, so no progress bar either
    return _run_daemon(args, replace(config, inboxes=()))


def _run_daemon(args: argparse.Namespace, config: Any) -> int:
    from bgwatch import runner

    warnings = runner.preflight(config)
    _setup_logs(config, quiet=args.once and not config.debug)
    return runner.run_daemon(config, once=args.once, show_progress=not args.no_progress, warnings=warnings,
                             early_stop=_early_stop)


def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    import yaml

    fragment: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--set", pair, "expected key=value", "e.g. --set mode=color --set mask.engine=rembg")
        value = yaml.safe_load(raw) if raw else ""
        if value is None and raw.strip() not in ("null", "~", "Null", "NULL"):
            value = raw  # `#00ff00` is a comment to YAML; on a command line it is a colour
        node = fragment
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return fragment


def cmd_process(args: argparse.Namespace) -> int:
    from bgwatch.single import images_to_process, process_many

    config = _load(args, required=False)
    images = images_to_process(Path(args.image))
    _setup_logs(config, to_files=False)
    folder = Path(args.image).is_dir()
    results = process_many(images, config, Path(args.output), _parse_sets(args.set or []), each_error=folder)
    for image, result in zip(images, results, strict=True):
        if result.error:
            print(f"failed: {result.error}" if not folder or image.name in result.error
                  else f"failed: {image.name}: {result.error}", file=sys.stderr)
            continue
        timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        print(f"{result.output_path}  ({result.mask_engine}{' + ' + result.bg_engine if result.bg_engine else ''};"
              f" {timings})")
    failed = sum(1 for r in results if r.error)
    if folder:
        print(f"{len(results)} file(s): {len(results) - failed} ok, {failed} failed")
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    if not args.watch:
        status = report.status_of(config)
        if args.json:
            _print_json(status)
        else:
            print(report.format_status(status))
        return 0
    import time

    clear = "\x1b[H\x1b[J" if sys.stdout.isatty() else ""
    while True:  # until ^C (main() turns KeyboardInterrupt into exit 130)
        status = report.status_of(config)
        if args.json:
            print(json.dumps(status, default=str), flush=True)  # one JSON document a line
        else:
            print(f"{clear}{report.format_status(status)}\n", flush=True)
        time.sleep(args.interval)


def _rows(config: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    since = report.parse_since(args.since) if args.since else None
    return report.history_rows(config, args.status, args.limit, since, args.inbox)


def cmd_history(args: argparse.Namespace) -> int:
    config = _load(args)
    rows = _rows(config, args)
    from bgwatch.htmlreport import trusted_folders

    roots = trusted_folders(config)  # an output's compliance marks follow no link below them
    if args.json:
        _print_json([report.run_record(r, roots=roots) for r in rows])
        return 0
    report.print_history(rows, roots=roots)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from bgwatch.single import retry_runs

    config = _load(args)
    if not args.run_ids and not args.failed:
        raise ConfigError("retry", "RUN_ID", "name run ids or pass --failed")
    bad = [i for i in args.run_ids if not i.isdigit()]
    if bad:
        raise ConfigError("retry", "RUN_ID", f"{bad[0]!r} is not a run id", "whole numbers from `bgwatch history`")
    moved, problems = retry_runs(config, [int(i) for i in args.run_ids], all_failed=args.failed)
    for line in moved:
        print(f"back in the inbox: {line}")
    for line in problems:
        print(f"not retried: {line}", file=sys.stderr)
    return 1 if problems else 0


def _same(path: Path, other: Path | None) -> bool:
    return other is not None and os.path.abspath(path) == os.path.abspath(other)


def cmd_validate(args: argparse.Namespace) -> int:
    from bgwatch.single import validate_paths

    config_path = _config_path(args.config)
    paths = [Path(p) for p in args.paths]
    problems = validate_paths([p for p in paths if not _same(p, config_path)], config_path)
    for path in paths:
        if _same(path, config_path):  # named by -c: a config.yaml, whatever keys it has (or lacks)
            from bgwatch.config import load_config

            try:
                load_config(path)
                problems[path] = []
            except BgwatchError as exc:
                problems[path] = [str(exc)]
    problems = {p: problems[p] for p in paths}
    for path, errors in problems.items():
        if errors:
            for error in errors:
                print(f"{error}")
        else:
            print(f"{path}: OK")
    return 2 if any(problems.values()) else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from bgwatch import reference, rules
    from bgwatch.errors import InputError

    config = _load(args)
    image = Path(args.image)
    inbox = config.inbox_for(image)
    if inbox is None:
        raise InputError(image, "is not inside any configured inbox: "
                         + ", ".join(str(ib.path) for ib in config.inboxes))
    resolved = rules.resolve(image, inbox, config)
    if args.json:
        _print_json([{"key": k, "value": v, "source": s} for k, v, s in resolved.describe()])
    else:
        print(reference.format_explanation(resolved))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from bgwatch.single import cache_command

    config = _load(args)
    if args.json and args.action == "ls":
        from bgwatch.pipeline.cache import BackgroundCache
        from bgwatch.storebase import open_store

        store = open_store(config.store, sqlite_path=config.db_path, host=config.host)
        rows = BackgroundCache(store, config.cache_dir, config.cache.max_bytes).ls()
        store.close()
        _print_json([{**r, **{k: report.iso(r[k]) for k in ("created_at", "last_used_at") if k in r}} for r in rows])
        return 0
    print(cache_command(config, args.action))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from bgwatch.single import models_command

    config = _load(args, required=False)
    _setup_logs(config, to_files=False)
    if args.json and args.action == "ls":
        from dataclasses import asdict

        from bgwatch import models
        from bgwatch.doctor import disk_size

        _print_json([{**asdict(s), "bytes": disk_size(Path(s.path)) if s.present else None}
                     for s in models.list_models(config, tuple(args.names))])
        return 0
    if args.action == "quantize":
        from bgwatch import models

        statuses = models.quantize_models(config, tuple(args.names))
        print(models.format_quantize(statuses))
        return 0 if all(s.passed for s in statuses) else 1
    text, ok = models_command(config, args.action, args.names, fp16=args.fp16)
    print(text)
    return 0 if ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from bgwatch.compliance import for_run, tally
    from bgwatch.htmlreport import trusted_folders, write_report

    config = _load(args)
    rows = _rows(config, args)
    roots = trusted_folders(config)
    marked = [for_run(dict(row), roots) for row in rows]  # each output read once, for the page and this line
    target = write_report(rows, Path(args.output), roots=roots, marked=marked)
    print(f"{target}: {len(rows)} run(s)" + (f"; {tally(marked)}" if tally(marked) else ""))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from bgwatch import doctor

    config = _load(args)
    checks = doctor.run_checks(config)
    code = doctor.exit_code(checks)
    device = next(c for c in checks if c.area == "device")
    if args.json:
        _print_json({"status": ("ok", "warning", "error")[code], "device": device.detail["device"],
                     "device_reason": device.message, "checks": [c.to_dict() for c in checks]})
    else:
        print(doctor.format_checks(checks))
    return code


def cmd_store(args: argparse.Namespace) -> int:
    import socket

    from bgwatch.pgimport import migrate_command

    target = args.target or _load(args).store
    print(migrate_command(Path(args.source), target, host=socket.gethostname()))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from bgwatch.init import write_config

    target = Path(args.path)
    write_config(target, state_dir=Path(args.state_dir), inbox_root=Path(args.inbox_root),
                 outbox_root=Path(args.outbox_root) if args.outbox_root else None, force=args.force)
    print(f"wrote {target}; check it with `bgwatch doctor -c {target}`")
    return 0


# ---------------------------------------------------------------------- parser


class _VersionAction(argparse.Action):
    """--version: bgwatch and, imported only now, torch, its CUDA and ONNX Runtime."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from bgwatch.accelerator import stack_versions

        versions = stack_versions()
        print(f"bgwatch {versions.pop('bgwatch')}")
        for name, version in versions.items():
            print(f"  {name + ':':12} {version}")
        parser.exit()


CONFIG_HELP = "config.yaml (default: $BGWATCH_CONFIG, else ./config.yaml, else /etc/bgwatch/config.yaml)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgwatch",
        description="Hot-folder daemon: images dropped in an inbox come out of the outbox with their "
                    "background removed, softened, recoloured or replaced.")
    parser.add_argument("--version", action=_VersionAction,
                        help=f"show bgwatch {__version__}, torch, CUDA and ONNX Runtime versions and exit")
    parser.add_argument("-c", "--config", help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, help_text: str, *, json_flag: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: given after the subcommand it wins, absent it leaves the one given before it alone.
        p.add_argument("-c", "--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON (times in ISO 8601) for scripts")
        p.set_defaults(handler=handler)
        return p

    p = add("run", cmd_run, "Watch the configured inboxes and process what arrives (the daemon).")
    p.add_argument("--once", action="store_true",
                   help="process what is in the inboxes now, then exit 0 if every file succeeded, else 1")
    p.add_argument("--no-progress", action="store_true", help="with --once: no progress bar")

    p = add("serve", cmd_serve, "Serve the HTTP API (the original service's endpoints) without watching inboxes.")
    p.add_argument("--listen", metavar="HOST:PORT", help="instead of http.listen (beyond loopback: keys required)")

    p = add("process", cmd_process, "Process one image, or a folder's images, now, without the daemon.")
    p.add_argument("image", metavar="IMAGE|FOLDER",
                   help="an image file, or a folder: its images (not its subfolders)")
    p.add_argument("-o", "--output", default=".", help="folder for the result (default: current folder)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a JobSpec value, e.g. --set mode=color --set mask.engine=classical (repeatable)")

    p = add("status", cmd_status, "Show whether the daemon runs, run counts and what waits in each inbox.",
            json_flag=True)
    p.add_argument("--watch", action="store_true", help="print the status again every --interval seconds")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between updates with --watch")

    p = add("history", cmd_history, "List recent runs, with their times and durations.", json_flag=True)
    p.add_argument("--status", choices=["queued", "running", "done", "failed", "skipped"], help="only these")
    p.add_argument("--since", metavar="WHEN", help="only runs created since: 2026-11-28, 2026-11-28T09:30, 2h, 7d")
    p.add_argument("--inbox", metavar="INBOX", help="only this inbox (its path or folder name)")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")

    p = add("retry", cmd_retry, "Put failed runs' originals back in their inbox so they are taken again.")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="run ids (see `bgwatch history`)")
    p.add_argument("--failed", action="store_true", help="every failed run whose original is in failed/")

    p = add("validate", cmd_validate, "Check a config.yaml, a .bgwatch.yaml folder file or a sidecar.")
    p.add_argument("paths", nargs="+", metavar="PATH")

    p = add("explain", cmd_explain, "Print an image's resolved JobSpec and where each value came from.",
            json_flag=True)
    p.add_argument("image", help="an image inside an inbox")

    p = add("cache", cmd_cache, "List, prune (to the size cap) or clear the generated-background cache.",
            json_flag=True)
    p.add_argument("action", choices=["ls", "prune", "clear"])

    p = add("models", cmd_models, "List the mask and SDXL models present, pull them (needs internet), or "
            "quantize the mask nets to int8 for the CPU (a calibrated variant, kept only if it passes its "
            "quality gate against fp32).", json_flag=True)
    p.add_argument("action", choices=["ls", "pull", "quantize"])
    p.add_argument("names", nargs="*", metavar="MODEL",
                   help="rembg model names or SDXL hub ids (default: the ones the config uses)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="fp16", action="store_true", default=None,
                           help="pull: SDXL's half-precision weights (for a GPU; default when this machine has CUDA)")
    precision.add_argument("--fp32", dest="fp16", action="store_false",
                           help="pull: SDXL's full-precision weights (for the CPU)")

    p = add("report", cmd_report, "Write a self-contained HTML contact sheet of recent runs: input, mask and "
            "output thumbnails, status, engines, times, errors.")
    p.add_argument("-o", "--output", default="bgwatch-report.html", help="the HTML file (default bgwatch-report.html)")
    p.add_argument("--status", choices=["queued", "running", "done", "failed", "skipped"], help="only these")
    p.add_argument("--since", metavar="WHEN", help="only runs created since: 2026-11-28, 2026-11-28T09:30, 2h, 7d")
    p.add_argument("--inbox", metavar="INBOX", help="only this inbox (its path or folder name)")
    p.add_argument("--limit", type=int, default=200, help="how many runs, newest first (default 200)")

    add("doctor", cmd_doctor, "Check this machine against the config: GPU, ONNX Runtime, weights, inboxes, "
        "outboxes, state folder, inotify, numba cache. Exit 0 ok, 1 warnings, 2 errors.", json_flag=True)

    p = add("store", cmd_store, "Import a workstation's SQLite history (its runs and cached backgrounds) into the "
            "studio's PostgreSQL store; running it again adds nothing twice.")
    p.add_argument("action", choices=["migrate"])
    p.add_argument("source", metavar="FROM", help="the workstation's state folder, or its bgwatch.db")
    p.add_argument("target", metavar="TO", nargs="?",
                   help="the studio's postgresql:// URL (default: the config's `store:`)")

    p = add("init", cmd_init, "Write a sample config.yaml with absolute, service-ready paths.")
    p.add_argument("path", nargs="?", default="config.yaml", help="where to write it (default ./config.yaml; "
                   f"the service reads {SERVICE_CONFIG})")
    p.add_argument("--state-dir", default="/var/lib/bgwatch", help="default /var/lib/bgwatch (systemd StateDirectory)")
    p.add_argument("--inbox-root", default="/srv/bgwatch/inbox", help="folder holding the inboxes")
    p.add_argument("--outbox-root", help="folder holding the outboxes (default: beside the inbox root)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"bgwatch: {exc}", file=sys.stderr)
        return 2
    except BgwatchError as exc:
        print(f"bgwatch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `bgwatch history | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
