"""What the CLI shows: the `run --once` summary, `bgwatch status` and `bgwatch history` as tables for people and
as JSON records for scripts (ISO 8601 times, durations in seconds, no JSON inside JSON)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bgwatch.errors import ConfigError
from bgwatch.jobs import RunResult
from bgwatch.text import shown

ERROR_INDENT = 4  # a failure's whole error, under its row of the `run --once` table


def _short(path: str, width: int) -> str:
    """A path cut from the left: its end (the file name) is what tells runs apart."""
    if len(path) <= width:
        return path
    return "…" + path[-(width - 1):]


def _cut(text: str, width: int) -> str:
    """A message cut from the right: its start says what went wrong."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(epoch: Any) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(float(epoch))) if epoch else ""


def _duration(row: dict[str, Any]) -> str:
    started, finished = row.get("started_at"), row.get("finished_at")
    if not started or not finished:
        return ""
    seconds = float(finished) - float(started)
    return f"{seconds:.2f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def print_results(results: Sequence[RunResult], rows: dict[int, dict[str, Any]], *, missing: Sequence[str] = (),
                  inboxes: int = 0) -> None:
    """The `run --once` table; a failure's whole error follows its row, wrapped (the column keeps its start).
    `missing`: inboxes not there (a share not mounted), said on stderr, where a cron job's mail picks it up."""
    for path in missing:
        print(f"bgwatch: inbox {shown(path)} is missing (a share not mounted?): nothing was taken from it",
              file=sys.stderr)
    if not results:
        if missing and len(missing) >= inboxes:
            print("nothing done: no inbox is there to look at")
        else:
            print("nothing to do: the inboxes are empty")
        return
    width = max(60, shutil.get_terminal_size((120, 24)).columns - ERROR_INDENT)
    print(f"{'input':34}  {'status':7}  {'output / error':44}  {'engine':26}  {'time':>6}")
    for result in results:
        row = rows.get(result.run_id, {})
        engine = result.mask_engine + (f" + {result.bg_engine}" if result.bg_engine else "")
        error = shown(result.error)
        where = _short(shown(os.path.relpath(result.output_path)), 44) if result.output_path else _cut(error, 44)
        seconds = sum(result.timings.values())
        name = shown(str(row.get("inbox", "")).rstrip("/").rsplit("/", 1)[-1] + "/" + str(row.get("rel_path", "?")))
        print(f"{_short(name, 34):34}  {result.state.value:7}  {where:44}  "
              f"{_short(engine, 26):26}  {seconds:5.2f}s")
        if not result.output_path and len(error) > 44:
            for line in textwrap.wrap(error, width, break_long_words=True, break_on_hyphens=False):
                print(" " * ERROR_INDENT + line)
    failed = sum(1 for r in results if r.state.value == "failed")
    print(f"{len(results)} file(s): {len(results) - failed} ok, {failed} failed")


def print_history(rows: Sequence[dict[str, Any]], *, roots: Sequence[Path]) -> None:
    """The `history` table; `roots`: the configured folders (htmlreport.trusted_folders) below which an
    output's compliance marks read nothing through a link."""
    if not rows:
        print("no runs recorded")
        return
    # A studio's history (several hosts in one store) says which host ran each; one workstation's does not.
    hosts = len({row.get("host") for row in rows}) > 1
    print(f"{'id':>5}  {'status':7}  {'created':14}  {'took':>7}  " + (f"{'host':12}  " if hosts else "")
          + f"{'input':36}  {'engines':28}  result")
    for row in rows:
        engines = (row.get("mask_engine") or "") + (f" + {row['bg_engine']}" if row.get("bg_engine") else "")
        result = row.get("output_path") if row["status"] in ("done", "skipped") else row.get("error")
        where = shown(row["inbox"].rsplit("/", 1)[-1] + "/" + row["rel_path"])
        result = shown(result) if result else result
        host = f"{_short(shown(row.get('host') or ''), 12):12}  " if hosts else ""
        print(f"{row['id']:>5}  {row['status']:7}  {_when(row.get('created_at')):14}  {_duration(row):>7}  {host}"
              f"{_short(where, 36):36}  {_short(engines, 28):28}  {(result or '').splitlines()[0] if result else ''}"
              f"{_compliance_text(row, roots)}")


def _compliance_text(row: dict[str, Any], roots: Sequence[Path]) -> str:
    """'  [amazon: ok]' for an output made under a preset, marked against it (compliance.py); '' otherwise."""
    from bgwatch.compliance import for_run

    marked = for_run(row, roots)
    return f"  [{shown(marked.summary())}]" if marked is not None else ""


# ---------------------------------------------------------------------- status and history


def iso(epoch: Any) -> str | None:
    """Seconds since the epoch as local ISO 8601 with its offset (scripts: no floats, no guessing the zone)."""
    if epoch is None or epoch == "":
        return None
    from datetime import datetime

    return datetime.fromtimestamp(float(epoch)).astimezone().isoformat(timespec="seconds")


def inbox_of(config: Any, result: Any) -> str:
    """The inbox a finished run came from: where its original was parked, or whose outbox got the output."""
    if result.parked is not None:
        inbox = config.inbox_for(Path(result.parked))
        if inbox is not None:
            return str(inbox.path)
    if result.output_path is not None:
        output = Path(result.output_path).resolve()
        for inbox in config.inboxes:
            if inbox.outbox.resolve() in output.parents:
                return str(inbox.path)
    return "unknown"


def waiting(inbox: Any) -> int:
    """Images waiting in an inbox (not in its work folders, done/ or failed/)."""
    if not inbox.path.is_dir():
        return 0
    from bgwatch.sidecars import IMAGE_SUFFIXES, is_ignored

    return sum(1 for p in inbox.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
               and not is_ignored(p.relative_to(inbox.path)))


def status_of(config: Any) -> dict[str, Any]:
    from bgwatch.service import InstanceLock

    running = InstanceLock.held(config.state_dir)
    from bgwatch.storebase import open_for_reading, redact, studio_hosts

    counts: dict[str, int] = {}
    hosts = None
    store = open_for_reading(config)
    if store is not None:
        counts = store.counts()
        hosts = studio_hosts(store, config.watch.lease_seconds)
        store.close()
    live = live_status(config) if running else None
    if live is not None and "updated_at" in live:
        live["updated_at"] = iso(live["updated_at"])
    return {
        "config": str(config.source) if config.source else None,
        "state_dir": str(config.state_dir),
        "running": running,
        "live": live,
        "runs": counts,
        "store": redact(config.store),  # never its password
        "hosts": hosts,  # the studio's hosts (a PostgreSQL store), else None
        "inboxes": [{"path": str(ib.path), "outbox": str(ib.outbox), "present": ib.path.is_dir(),
                     "waiting": waiting(ib)} for ib in config.inboxes],
    }


def format_status(status: dict[str, Any]) -> str:
    lines = [f"daemon:   {'running' if status['running'] else 'not running'} (state {status['state_dir']})"]
    live = status["live"]
    if live is not None:
        lines.append(f"work:     {live.get('in_flight', 0)} in flight, {live.get('waiting', 0)} waiting to be claimed")
        stages = live.get("stages") or {}
        if stages.get("handled"):
            waiting = stages.get("waiting", {})
            lines.append("stages:   " + ", ".join(f"{name} {n} ({waiting.get(name, 0)} waiting)"
                                                  for name, n in stages["handled"].items()))
        for name in ("mask_engine", "engines", "device"):
            if live.get(name):
                lines.append(f"{name + ':':9} {live[name]}")
        for inbox in live.get("inboxes", []):
            health = f"watching ({inbox['observer']})" if inbox["healthy"] else f"NOT WATCHING: {inbox['problem']}"
            lines.append(f"watch:    {inbox['path']}  {health}, {inbox['settling']} settling, "
                         f"{inbox['restarts']} restart(s)")
        for problem in live.get("problems", []):
            lines.append(f"problem:  {problem}")
    counts = status["runs"]
    lines.append("runs:     " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none yet"))
    if status.get("hosts") is not None:
        lines.append(f"store:    {status['store']}")
        for host in status["hosts"]:
            lines.append(f"host:     {host['host']}  {'alive' if host['alive'] else 'SILENT'}, {host['in_flight']} in "
                         f"flight, last beat {host['seconds_since_beat']:g} s ago")
    for inbox in status["inboxes"]:
        where = f"{inbox['waiting']} waiting" if inbox["present"] else "MISSING"
        lines.append(f"inbox:    {inbox['path']}  ({where}) -> {inbox['outbox']}")
    return "\n".join(lines)


def live_status(config: Any) -> dict[str, Any] | None:
    from bgwatch.service import STATUS_FILE

    try:
        return dict(json.loads((config.state_dir / STATUS_FILE).read_text()))
    except (OSError, ValueError):
        return None


def parse_since(text: str) -> float:
    """--since: an ISO date or time (local unless it says otherwise), or an age such as 30m, 2h, 7d."""
    import time
    from datetime import datetime

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text[:-1].replace(".", "", 1).isdigit() and text[-1:] in units:
        return time.time() - float(text[:-1]) * units[text[-1]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ConfigError("--since", text, "is neither an ISO date/time nor an age",
                          "2026-11-28, 2026-11-28T09:30, 30m, 2h, 7d") from None


def run_record(row: dict[str, Any], *, roots: Sequence[Path]) -> dict[str, Any]:
    """A runs row for scripts: ISO times, durations in seconds, the spec and timings as objects; `roots` as
    for print_history."""
    out = {k: v for k, v in row.items() if not k.endswith("_json") and not k.endswith("_at") and k != "lease_until"}
    for name in ("created_at", "started_at", "finished_at"):
        out[name] = iso(row.get(name))
    started, finished, created = row.get("started_at"), row.get("finished_at"), row.get("created_at")
    out["queued_seconds"] = round(started - created, 3) if started and created else None
    out["duration_seconds"] = round(finished - started, 3) if started and finished else None
    for name in ("spec_json", "timings_json"):
        raw = row.get(name)
        try:
            out[name[:-5]] = json.loads(raw) if raw else None
        except ValueError:
            out[name[:-5]] = raw
    from bgwatch.compliance import for_run

    marked = for_run(row, roots)
    if marked is not None:  # the output against its preset: {"preset", "ok", "checks": [{name, ok, found, wanted}]}
        out["compliance"] = {"preset": marked.preset, "ok": marked.ok,
                             "checks": [{"name": c.name, "ok": c.ok, "found": c.found, "wanted": c.wanted}
                                        for c in marked.checks]}
    return out


def history_rows(config: Any, status: str | None, limit: int, since: float | None = None,
             inbox: str | None = None) -> list[dict[str, Any]]:
    from bgwatch.storebase import open_for_reading

    store = open_for_reading(config)
    if store is None:
        return []
    filtered = since is not None or inbox is not None
    rows = store.history(status, 10_000_000 if filtered else limit)
    store.close()
    if inbox is not None:
        wanted = {str(ib.path) for ib in config.inboxes
                  if inbox in (str(ib.path), ib.path.name) or Path(inbox).resolve() == ib.path.resolve()}
        if not wanted:
            raise ConfigError("--inbox", inbox, "is not a configured inbox",
                              ", ".join(ib.path.name for ib in config.inboxes))
        rows = [r for r in rows if r["inbox"] in wanted]
    if since is not None:
        rows = [r for r in rows if (r.get("created_at") or 0) >= since]
    return rows[:limit]
