"""Delivery markers are data, never instructions.

A marker (`.bgwatch/delivering/<host>/<token>/marker.json`) is a file on the share that anyone who can write
the share can plant or change. So it may name only its own delivery folder's files and the inbox's outbox,
by name (a path relative to the outbox, no `..`); it is read without following a link and with a size cap;
and anything malformed or naming anything else is refused with the reason (delivery.py quarantines it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from bgwatch import safefs
from bgwatch.safefs import Folder

MARKER = "marker.json"
LIMIT = 1 << 16  # bytes; a marker is a few hundred
DISPOSITIONS = ("move", "delete", "keep", "failed")
_SHA = re.compile(r"[0-9a-f]{64}")


class Refused(ValueError):
    """A marker that is malformed or names something outside its folder and the outbox: why."""


def read(box: Folder, outbox: Path | None) -> dict[str, object]:
    """The checked marker in a delivery folder; {} when there is none. Refused for a bad one."""
    try:
        raw = box.read_bytes(MARKER, LIMIT + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise Refused(f"unreadable ({exc.strerror or exc})") from None
    if len(raw) > LIMIT:
        raise Refused(f"larger than {LIMIT} bytes")
    try:
        return checked(json.loads(raw), outbox)
    except Refused:
        raise
    except (ValueError, TypeError, UnicodeError) as exc:
        raise Refused(str(exc)) from None


def checked(data: object, outbox: Path | None) -> dict[str, object]:
    if not isinstance(data, dict):
        raise Refused("not a JSON object")
    disposition = data.get("disposition")
    if disposition not in DISPOSITIONS:
        raise Refused(f"unknown disposition {str(disposition)[:40]!r}")
    if disposition == "failed":
        return {k: data[k] for k in ("rel", "disposition", "reason", "run_id", "host") if k in data}
    if "output_rel" not in data:  # a marker of an earlier version: an absolute output path
        data["output_rel"] = _inside(str(data.get("output", "")), outbox)
        data.pop("output", None)
    wanted = str(data["output_rel"])
    out_parts(wanted)
    final = data.get("output")
    if final is not None:
        out_parts(str(final))
        if PurePosixPath(str(final)).parent != PurePosixPath(wanted).parent:
            raise Refused(f"its output {str(final)[:200]!r} is not beside {wanted[:200]!r} in the outbox")
    if not _SHA.fullmatch(str(data.get("sha256", ""))):
        raise Refused("no sha256 of its output")
    temp = str(data.get("temp", ""))
    if temp and not (is_temp(temp) and "/" not in temp and temp not in (".", "..")):
        raise Refused(f"its temp output {temp[:200]!r} is not a temp name in the outbox")
    try:
        int(str(data.get("run_id", 0)))
    except ValueError:
        raise Refused("its run id is not a number") from None
    return dict(data)


def _inside(output: str, outbox: Path | None) -> str:
    if outbox is None or not output:
        raise Refused("it names no output in this inbox's outbox")
    try:
        return PurePosixPath(output).relative_to(str(outbox)).as_posix()
    except ValueError:
        raise Refused(f"it names {output[:200]!r}, outside the inbox's outbox") from None


def out_parts(output_rel: str) -> tuple[str, ...]:
    """An output's path inside the outbox: relative, no '..', no empty names."""
    parts = PurePosixPath(output_rel).parts
    if not parts or output_rel.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise Refused(f"{output_rel[:200]!r} is not a file of the outbox")
    return parts


def is_temp(name: str) -> bool:
    return name.endswith(safefs.TEMP_SUFFIX)
