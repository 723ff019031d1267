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

from bgwatch import __version__
from bgwatch.errors import BgwatchError, ConfigError

Command = Callable[[argparse.Namespace], int]


def _config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    if os.environ.get("BGWATCH_CONFIG"):
        return Path(os.environ["BGWATCH_CONFIG"])
    local = Path("config.yaml")
    return local if local.exists() else None


def _load(args: argparse.Namespace) -> Any:
    from bgwatch.config import load_config

    return load_config(_config_path(args.config))


def _setup_logs(config: Any, *, quiet: bool = False, to_files: bool = True) -> None:
    from bgwatch.logs import setup_logging

    setup_logging(config.log_dir if to_files else None, debug=config.debug, quiet=quiet,
                  secrets=(config.runway.api_key,))


# ---------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from bgwatch.daemon import Daemon

    config = _load(args)
    if not config.inboxes:
        raise ConfigError(config.source or "(built-in config)", "inboxes", "no inboxes configured")
    _setup_logs(config, quiet=args.once and not config.debug)
    for inbox in config.inboxes:
        inbox.path.mkdir(parents=True, exist_ok=True)
        inbox.outbox.mkdir(parents=True, exist_ok=True)
    progress = None
    if args.once:
        from tqdm import tqdm

        progress = tqdm(desc="bgwatch", unit="img", file=sys.stderr, disable=args.no_progress)
    daemon = Daemon(config, once=args.once, on_result=(lambda _r: progress.update(1)) if progress is not None else None)
    daemon.install_signal_handlers()
    code = daemon.run()
    if progress is not None:
        progress.close()
        from bgwatch.report import print_results
        from bgwatch.store import Store

        store = Store(config.db_path)
        rows = {r["id"]: r for r in store.history(limit=max(len(daemon.results), 1) * 2 + 100)}
        store.close()
        print_results(daemon.results, rows)
    return code


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
    from bgwatch.single import process_one

    config = _load(args)
    _setup_logs(config, to_files=False)
    result = process_one(Path(args.image), config, Path(args.output), _parse_sets(args.set or []))
    if result.error:
        print(f"failed: {result.error}", file=sys.stderr)
        return 1
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"{result.output_path}  ({result.mask_engine}{' + ' + result.bg_engine if result.bg_engine else ''};"
          f" {timings})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from bgwatch.daemon import InstanceLock
    from bgwatch.store import Store

    config = _load(args)
    running = InstanceLock.held(config.state_dir)
    print(f"daemon:   {'running' if running else 'not running'} (state {config.state_dir})")
    live = _live_status(config) if running else None
    if live is not None:
        print(f"work:     {live['in_flight']} in flight, {live['waiting']} waiting to be claimed")
        for inbox in live["inboxes"]:
            health = f"watching ({inbox['observer']})" if inbox["healthy"] else f"NOT WATCHING: {inbox['problem']}"
            print(f"watch:    {inbox['path']}  {health}, {inbox['settling']} settling, "
                  f"{inbox['restarts']} restart(s)")
    if not config.db_path.exists():
        print("runs:     none yet")
        return 0
    store = Store(config.db_path)
    counts = store.counts()
    print("runs:     " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none yet"))
    for inbox in config.inboxes:
        waiting = 0
        if inbox.path.is_dir():
            from bgwatch.sidecars import IMAGE_SUFFIXES
            from bgwatch.watch import is_ignored

            waiting = sum(1 for p in inbox.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                          and not is_ignored(p.relative_to(inbox.path)))
        print(f"inbox:    {inbox.path}  ({waiting} waiting) -> {inbox.outbox}")
    store.close()
    return 0


def _live_status(config: Any) -> dict[str, Any] | None:
    from bgwatch.daemon import STATUS_FILE

    try:
        return dict(json.loads((config.state_dir / STATUS_FILE).read_text()))
    except (OSError, ValueError):
        return None


def cmd_history(args: argparse.Namespace) -> int:
    from bgwatch.store import Store

    config = _load(args)
    if not config.db_path.exists():
        rows: list[dict[str, Any]] = []
    else:
        store = Store(config.db_path)
        rows = store.history(args.status, args.limit)
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    from bgwatch.report import print_history

    print_history(rows)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from bgwatch.single import retry_runs

    config = _load(args)
    if not args.run_ids and not args.failed:
        raise ConfigError("retry", "RUN_ID", "name run ids or pass --failed")
    moved, problems = retry_runs(config, [int(i) for i in args.run_ids], all_failed=args.failed)
    for line in moved:
        print(f"back in the inbox: {line}")
    for line in problems:
        print(f"not retried: {line}", file=sys.stderr)
    return 1 if problems else 0


def cmd_validate(args: argparse.Namespace) -> int:
    from bgwatch.single import validate_paths

    problems = validate_paths([Path(p) for p in args.paths], _config_path(args.config))
    for path, errors in problems.items():
        if errors:
            for error in errors:
                print(f"{error}")
        else:
            print(f"{path}: OK")
    return 1 if any(problems.values()) else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from bgwatch.single import explain

    config = _load(args)
    print(explain(Path(args.image), config))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from bgwatch.single import cache_command

    config = _load(args)
    print(cache_command(config, args.action))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from bgwatch.single import models_command

    config = _load(args)
    _setup_logs(config, to_files=False)
    text, ok = models_command(config, args.action, args.names)
    print(text)
    return 0 if ok else 1


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgwatch",
        description="Hot-folder daemon: images dropped in an inbox come out of the outbox with their "
                    "background removed, softened, recoloured or replaced.")
    parser.add_argument("--version", action="version", version=f"bgwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", help="config.yaml (default: $BGWATCH_CONFIG, else ./config.yaml)")
        p.set_defaults(handler=handler)
        return p

    p = add("run", cmd_run, "Watch the configured inboxes and process what arrives (the daemon).")
    p.add_argument("--once", action="store_true",
                   help="process what is in the inboxes now, then exit 0 if every file succeeded, else 1")
    p.add_argument("--no-progress", action="store_true", help="with --once: no progress bar")

    p = add("process", cmd_process, "Process one image now, without the daemon.")
    p.add_argument("image", help="the image file")
    p.add_argument("-o", "--output", default=".", help="folder for the result (default: current folder)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a JobSpec value, e.g. --set mode=color --set mask.engine=classical (repeatable)")

    add("status", cmd_status, "Show whether the daemon runs, run counts and what waits in each inbox.")

    p = add("history", cmd_history, "List recent runs.")
    p.add_argument("--status", choices=["queued", "running", "done", "failed", "skipped"], help="only these")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON rows")

    p = add("retry", cmd_retry, "Put failed runs' originals back in their inbox so they are taken again.")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="run ids (see `bgwatch history`)")
    p.add_argument("--failed", action="store_true", help="every failed run whose original is in failed/")

    p = add("validate", cmd_validate, "Check a config.yaml, a .bgwatch.yaml folder file or a sidecar.")
    p.add_argument("paths", nargs="+", metavar="PATH")

    p = add("explain", cmd_explain, "Print an image's resolved JobSpec and where each value came from.")
    p.add_argument("image", help="an image inside an inbox")

    p = add("cache", cmd_cache, "List, prune (to the size cap) or clear the generated-background cache.")
    p.add_argument("action", choices=["ls", "prune", "clear"])

    p = add("models", cmd_models, "List the mask and SDXL models present, or pull them (needs internet).")
    p.add_argument("action", choices=["ls", "pull"])
    p.add_argument("names", nargs="*", metavar="MODEL",
                   help="rembg model names or SDXL hub ids (default: the ones the config uses)")
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
