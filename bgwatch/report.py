"""Tables for people: the summary `run --once` prints, and `bgwatch history`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from bgwatch.jobs import RunResult


def _short(path: str, width: int) -> str:
    if len(path) <= width:
        return path
    return "…" + path[-(width - 1):]


def print_results(results: Sequence[RunResult], rows: dict[int, dict[str, Any]]) -> None:
    if not results:
        print("nothing to do: the inboxes are empty")
        return
    print(f"{'input':34}  {'status':7}  {'output / error':44}  {'engine':26}  {'time':>6}")
    for result in results:
        row = rows.get(result.run_id, {})
        engine = result.mask_engine + (f" + {result.bg_engine}" if result.bg_engine else "")
        where = os.path.relpath(result.output_path) if result.output_path else result.error
        seconds = sum(result.timings.values())
        name = str(row.get("inbox", "")).rstrip("/").rsplit("/", 1)[-1] + "/" + str(row.get("rel_path", "?"))
        print(f"{_short(name, 34):34}  {result.state.value:7}  {_short(where, 44):44}  "
              f"{_short(engine, 26):26}  {seconds:5.2f}s")
    failed = sum(1 for r in results if r.state.value == "failed")
    print(f"{len(results)} file(s): {len(results) - failed} ok, {failed} failed")


def print_history(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        print("no runs recorded")
        return
    print(f"{'id':>5}  {'status':7}  {'input':36}  {'engines':28}  result")
    for row in rows:
        engines = (row.get("mask_engine") or "") + (f" + {row['bg_engine']}" if row.get("bg_engine") else "")
        result = row.get("output_path") if row["status"] in ("done", "skipped") else row.get("error")
        where = row["inbox"].rsplit("/", 1)[-1] + "/" + row["rel_path"]
        print(f"{row['id']:>5}  {row['status']:7}  {_short(where, 36):36}"
              f"  {_short(engines, 28):28}  {(result or '').splitlines()[0] if result else ''}")
