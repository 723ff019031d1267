"""Tables for people: the summary `run --once` prints, and `bgwatch history`."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from bgwatch.jobs import RunResult


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


def print_results(results: Sequence[RunResult], rows: dict[int, dict[str, Any]]) -> None:
    if not results:
        print("nothing to do: the inboxes are empty")
        return
    print(f"{'input':34}  {'status':7}  {'output / error':44}  {'engine':26}  {'time':>6}")
    for result in results:
        row = rows.get(result.run_id, {})
        engine = result.mask_engine + (f" + {result.bg_engine}" if result.bg_engine else "")
        where = _short(os.path.relpath(result.output_path), 44) if result.output_path else _cut(result.error, 44)
        seconds = sum(result.timings.values())
        name = str(row.get("inbox", "")).rstrip("/").rsplit("/", 1)[-1] + "/" + str(row.get("rel_path", "?"))
        print(f"{_short(name, 34):34}  {result.state.value:7}  {where:44}  "
              f"{_short(engine, 26):26}  {seconds:5.2f}s")
    failed = sum(1 for r in results if r.state.value == "failed")
    print(f"{len(results)} file(s): {len(results) - failed} ok, {failed} failed")


def print_history(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        print("no runs recorded")
        return
    print(f"{'id':>5}  {'status':7}  {'created':14}  {'took':>7}  {'input':36}  {'engines':28}  result")
    for row in rows:
        engines = (row.get("mask_engine") or "") + (f" + {row['bg_engine']}" if row.get("bg_engine") else "")
        result = row.get("output_path") if row["status"] in ("done", "skipped") else row.get("error")
        where = row["inbox"].rsplit("/", 1)[-1] + "/" + row["rel_path"]
        print(f"{row['id']:>5}  {row['status']:7}  {_when(row.get('created_at')):14}  {_duration(row):>7}  "
              f"{_short(where, 36):36}  {_short(engines, 28):28}  {(result or '').splitlines()[0] if result else ''}")
