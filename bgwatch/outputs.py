"""Outputs reserved where every host sees them: which file in the outbox belongs to which input.

An output's name is taken on the outbox itself, by the move that puts it there: a no-replace rename
(or link + unlink), or, where a share offers neither (some SMB mounts), an exclusive create of the name
and a rename over that reservation. A name that is taken gets the next number (`photo-2.png`, the one
naming scheme of safefs.numbered). So no output ever replaces another input's output, whatever each host
remembers.

Who owns an output is recorded on the share too: `<inbox>/.bgwatch/outputs/<digest>.json` names the output
(relative to the outbox), the input it belongs to (the dropped rel path and the input's sha256), the
output's sha256 and the run that wrote it. The same input run again (another spec, a restart) replaces
its own output, and only when the record says so *and* the output still holds the bytes the record names
(an output a user replaced by hand is not ours any more). Identity is by content, never by inode numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bgwatch import fileid, safefs
from bgwatch.safefs import Folder

OUTPUTS = "outputs"
RECORD_LIMIT = 1 << 14  # bytes: a record is a few hundred
OUTPUT_LIMIT = 1 << 30  # bytes: more than any output bgwatch writes; a planted giant is not hashed
_MISSES = 3  # consecutive free numbers after which a numbered output is not looked for further


@dataclass(frozen=True, slots=True)
class Owner:
    """The input an output belongs to."""

    rel: str  # where the input was dropped, relative to its inbox
    input_sha256: str
    host: str = ""
    run_id: int = 0


class OutputRecords:
    """The owner records of one inbox's outputs, on the share."""

    def __init__(self, work: Callable[..., Folder], host: str) -> None:
        self._work = work  # opens a folder under <inbox>/.bgwatch/ (through descriptors)
        self.host = host

    def get(self, output_rel: str) -> dict[str, object] | None:
        try:
            with self._work(OUTPUTS, create=False) as folder:
                data = json.loads(folder.read_bytes(_key(output_rel), RECORD_LIMIT))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("output") == output_rel else None

    def put(self, output_rel: str, owner: Owner, sha256: str) -> None:
        record = {"output": output_rel, "rel": owner.rel, "input": owner.input_sha256, "sha256": sha256,
                  "host": owner.host, "run_id": owner.run_id}
        with self._work(OUTPUTS, create=True) as folder:
            folder.write_atomic(_key(output_rel), json.dumps(record).encode(), owner=self.host)

    def owned_by(self, output_rel: str, owner: Owner) -> str | None:
        """The sha256 of the output this input owns under `output_rel`, per its record; None if not its own."""
        record = self.get(output_rel)
        if record is None or (record.get("rel"), record.get("input")) != (owner.rel, owner.input_sha256):
            return None
        sha = record.get("sha256")
        return sha if isinstance(sha, str) else None

    def of_run(self, output_rel: str, host: str, run_id: int, input_sha256: str) -> str | None:
        """The name (relative to the outbox) under which run `run_id` of `host` delivered, looked for from
        the name it wanted through its numbered alternatives; None if it delivered nothing."""
        for rel in candidates(output_rel):
            record = self.get(rel)
            if record is None:
                continue
            if (record.get("host"), record.get("run_id"), record.get("input")) == (host, run_id, input_sha256):
                return rel
        return None


def wanted(rel: str, suffix: str, extension: str) -> str:
    """The output name an input dropped at `rel` asks for: its folders and stem, the suffix, the format's
    extension (`a/photo.jpg` -> `a/photo.png`)."""
    path = PurePosixPath(rel)
    name = safefs.fit_name(f"{path.stem}{suffix}", extension)
    return str(path.parent / name) if path.parent.parts else name


def candidates(output_rel: str, limit: int = 64) -> Iterator[str]:
    """`a/photo.png`, `a/photo-2.png`, ... (the names an output wanted as `a/photo.png` may have got)."""
    head, _, name = output_rel.rpartition("/")
    for n in range(1, limit + 1):
        numbered = safefs.numbered(name, n)
        yield f"{head}/{numbered}" if head else numbered


def holds(out_dir: Folder, name: str, sha256: str) -> bool:
    """Whether `name` in out_dir is a regular file with these bytes (read without following a link)."""
    try:
        return fileid.sha256_at(out_dir, name, OUTPUT_LIMIT) == sha256
    except (OSError, ValueError):
        return False


def find(out_dir: Folder, output_rel: str, sha256: str) -> str | None:
    """The name under which an output with these bytes was placed: the wanted name or a numbered one.
    Stops after a few free numbers in a row (numbers are taken in order)."""
    misses = 0
    for rel in candidates(output_rel, 10_000):
        name = rel.rpartition("/")[2]
        if out_dir.lstat(name) is None:
            misses += 1
            if misses >= _MISSES:
                return None
            continue
        misses = 0
        if holds(out_dir, name, sha256):
            return rel
    return None


def place(out_dir: Folder, temp: str, output_rel: str, sha256: str, owner: Owner, records: OutputRecords,
          before_move: Callable[[], None] = lambda: None) -> str:
    """Move the finished temp output `temp` (in out_dir) to the first name of `output_rel`'s numbering that
    is free, or that is this input's own output (per its record). Returns the name it got (relative to the
    outbox); the caller records the owner. FileNotFoundError if the temp output is gone (another host placed it)."""
    head = output_rel.rpartition("/")[0]
    for rel in candidates(output_rel, 10_000):
        name = rel.rpartition("/")[2]
        before_move()
        try:
            safefs.move_noreplace(out_dir, temp, out_dir, name)
        except FileExistsError:
            if not _own(out_dir, name, rel, owner, records):
                continue
            os.rename(temp, name, src_dir_fd=out_dir.fd, dst_dir_fd=out_dir.fd)  # this input's own: replaced
        except safefs.NoReplaceUnsupported:
            # The reservation names the temp output (unique to this delivery, and in its marker): the same
            # delivery placed again after a kill between reserving and renaming, by this host or a taker,
            # uses the name it reserved instead of leaving a stray reservation in the outbox.
            if not (out_dir.reserve(name, temp) or out_dir.holds_reservation(name, temp)
                    or _own(out_dir, name, rel, owner, records)):
                continue
            try:
                os.rename(temp, name, src_dir_fd=out_dir.fd, dst_dir_fd=out_dir.fd)
            except FileNotFoundError:
                if out_dir.holds_reservation(name, temp):
                    out_dir.unlink(name)  # our reservation, never a placed output
                raise
        out_dir.fsync()
        return rel
    raise FileExistsError(f"no free output name for {output_rel} in {out_dir.path}" + (f" ({head})" if head else ""))


def _own(out_dir: Folder, name: str, rel: str, owner: Owner, records: OutputRecords) -> bool:
    """The output already at `name` is this input's: its record names this input and the file still holds
    the bytes the record names (an output replaced by hand, or by anyone else, is not)."""
    recorded = records.owned_by(rel, owner)
    return recorded is not None and holds(out_dir, name, recorded)


def _key(output_rel: str) -> str:
    return hashlib.sha256(output_rel.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".json"


def earlier(records: OutputRecords, outbox: Path, output: Path) -> bytes | None:
    """The bytes of an earlier run's output (a repeated drop reuses it), read inside the outbox without
    following a link, and only if it still holds what its owner record says was written; None otherwise."""
    try:
        rel = PurePosixPath(os.path.relpath(output, outbox)).as_posix()
        parts = PurePosixPath(rel).parts
        record = records.get(rel)
        if record is None or rel.startswith("../") or not parts:
            return None
        with Folder.open_root(outbox) as root, root.sub(*parts[:-1]) as folder:
            data = folder.read_bytes(parts[-1], OUTPUT_LIMIT)
    except (OSError, ValueError):
        return None
    return data if hashlib.sha256(data).hexdigest() == record.get("sha256") else None
