"""The run ledger: the one writer of run records, and the one place a run's ending is put into words.

A run is added when a source has a job (its spec resolved, its output name chosen), started when a worker
takes it, finished once, or requeued after a restart. All of it happens on the daemon's main thread, in
the order the outcomes arrived (intake.apply_outcomes); workers never write a run. A locked or full
database, or a studio store that is away, delays the writing (the caller keeps the outcome and tries again);
it never loses one: an ending the store refused is appended to a local journal first (JSON lines in
state_dir, fsynced), replayed into the store at the next start and as soon as a write succeeds again, so a
daemon killed meanwhile loses no timings or engines. Replaying is idempotent: an entry ends only a run that
is still open, and the journal is emptied once every entry is in the store.

The endings below are the only RunResults bgwatch builds (the folder and HTTP sources, `bgwatch process`):
each says what happened in words.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from bgwatch.jobs import JobState, RunResult
from bgwatch.store import RunRow
from bgwatch.storebase import RunStore

if TYPE_CHECKING:
    from bgwatch.custody import Claim, Custody
    from bgwatch.pipeline.stages import Finished


JOURNAL = "journal.jsonl"  # in state_dir: the endings the store could not take yet
_OPEN = (JobState.QUEUED.value, JobState.RUNNING.value)


class Ledger:
    """Writes the runs table for one host. Main thread only. `journal`: where endings the store refused wait
    on local disk (None: they wait in the caller's memory only)."""

    def __init__(self, store: RunStore, host: str, journal: Path | None = None) -> None:
        self.store = store
        self.host = host
        self.journal = journal
        self._journaled: set[tuple[str, int]] = set()  # (op, run id) journaled: once, however often it fails
        self._pending = journal is not None and journal.exists()

    def add(self, *, key: str, inbox: str, rel_path: str, source_path: str, input_sha256: str = "",
            spec_json: str = "{}", output_path: str = "") -> int:
        return self.store.add_run(key=key, inbox=inbox, rel_path=rel_path, source_path=source_path,
                                  input_sha256=input_sha256, spec_json=spec_json, host=self.host,
                                  output_path=output_path)

    def start(self, run_id: int, at: float) -> None:
        """A worker took the run. A store that refuses it: the start waits in the journal (if there is one),
        so the ending behind it is tried (and journaled) too rather than held up in memory."""
        try:
            self.store.start_run(run_id, self.host, at=at)
        except sqlite3.Error:
            if not self._append({"op": "start", "run_id": run_id, "at": at}):
                raise

    def finish(self, result: RunResult) -> None:
        """Record how a run ended. sqlite3.Error (a locked database, a store away): the ending is in the
        journal, and the caller tries again later."""
        entry = _entry(result)
        try:
            self._write(entry)
        except sqlite3.Error:
            self._append(entry)
            raise
        if self._pending:
            self.replay()  # the store takes writes again: what waited in the journal goes first

    def _write(self, entry: dict[str, Any]) -> None:
        self.store.finish_run(int(entry["run_id"]), JobState(entry["state"]), output_path=entry["output_path"],
                              error=entry["error"], mask_engine=entry["mask_engine"], bg_engine=entry["bg_engine"],
                              seed=entry["seed"], timings=entry["timings"], source_path=entry["source_path"])

    def _append(self, entry: dict[str, Any]) -> bool:
        """Whether the entry is in the journal (fsynced)."""
        key = (str(entry["op"]), int(entry["run_id"]))
        if self.journal is None:
            return False
        if key in self._journaled:
            return True
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        try:
            fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # a full state disk: the ending still waits in the caller's memory
            logger.warning("run {}: cannot write its record to {}: {} (it waits in memory only)", entry["run_id"],
                           self.journal, exc.strerror or exc)
            return False
        self._journaled.add(key)
        self._pending = True
        return True

    def replay(self) -> int:
        """Write the journal's endings into the store (each only if its run is still open there), then empty
        it. Returns how many runs it ended; a store still away leaves the journal for later (0)."""
        if self.journal is None:
            return 0
        try:
            lines = self.journal.read_bytes().splitlines()
        except FileNotFoundError:
            self._pending = False
            return 0
        except OSError as exc:
            logger.warning("cannot read {}: {}", self.journal, exc.strerror or exc)
            return 0
        ended = 0
        try:
            for number, line in enumerate(lines, 1):
                entry = _parse(line)
                if entry is None:
                    if line.strip():  # a line cut short by a kill mid-write
                        logger.warning("{}: line {} is not a whole entry; skipped", self.journal, number)
                    continue
                if entry["op"] == "start":  # queued -> running only: a no-op once it started or ended
                    self.store.start_run(int(entry["run_id"]), self.host, at=float(entry["at"]))
                    continue
                row = self.store.get_run(int(entry["run_id"]))
                if row is not None and row.status in _OPEN:
                    self._write(entry)
                    ended += 1
        except sqlite3.Error as exc:
            logger.debug("{}: not replayed yet ({})", self.journal, exc)
            return 0
        try:
            os.unlink(self.journal)
        except FileNotFoundError:
            pass
        except OSError as exc:  # replayed again next time: the entries are idempotent
            logger.warning("cannot remove {}: {}", self.journal, exc.strerror or exc)
            return ended
        self._journaled.clear()
        self._pending = False
        if ended:
            logger.info("recorded {} run ending(s) kept in {} while the store was away", ended, self.journal)
        return ended

    def requeue(self, run_id: int) -> None:
        self.store.requeue(run_id)

    def note(self, run_id: int, text: str) -> None:
        """What an open run waits for (shown by `history` until it ends)."""
        self.store.note(run_id, text)

    def open_runs(self) -> list[RunRow]:
        """This host's runs left 'queued' or 'running' (after a restart: orphans by definition)."""
        return self.store.runs_in((JobState.QUEUED, JobState.RUNNING), host=self.host)


def _entry(result: RunResult) -> dict[str, Any]:
    return {"op": "finish", "run_id": result.run_id, "state": result.state.value,
            "output_path": str(result.output_path) if result.output_path else "", "error": result.error,
            "mask_engine": result.mask_engine, "bg_engine": result.bg_engine, "seed": result.seed,
            "timings": dict(result.timings) if result.timings else None,
            "source_path": str(result.parked) if result.parked else None}


def _parse(line: bytes) -> dict[str, Any] | None:
    """One journal line, checked (None: torn or not ours)."""
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict) or not isinstance(entry.get("run_id"), int):
            return None
        if entry.get("op") == "start":
            return entry if isinstance(entry.get("at"), (int, float)) else None
        if entry.get("op") != "finish":
            return None
        JobState(entry["state"])
        for key in ("output_path", "error", "mask_engine", "bg_engine"):
            if not isinstance(entry[key], str):
                return None
    except (ValueError, KeyError, TypeError):
        return None
    return entry


# ---------------------------------------------------------------------- how runs end


def done(run_id: int, output: Path | None, finished: Finished | None = None, *, problem: str = "",
         parked: Path | None = None) -> RunResult:
    """Delivered: the output is in place (`problem`: the original could not be filed yet, and why)."""
    if finished is None:
        return RunResult(run_id, JobState.DONE, output, error=problem, parked=parked)
    return RunResult(run_id, JobState.DONE, output, error=problem, mask_engine=finished.mask_engine,
                     bg_engine=finished.bg_engine, seed=finished.seed, timings=finished.timings, parked=parked)


def failed(run_id: int, reason: str, parked: Path | None = None) -> RunResult:
    return RunResult(run_id, JobState.FAILED, error=reason, parked=parked)


def skipped(run_id: int, output: Path | None, earlier_id: int, parked: Path | None) -> RunResult:
    return RunResult(run_id, JobState.SKIPPED, output, error=f"same image and spec as run {earlier_id}", parked=parked)


def superseded(run_id: int, why: str) -> RunResult:
    return RunResult(run_id, JobState.SUPERSEDED, error=why)


def taken_back(run_id: int) -> RunResult:
    return superseded(run_id, "its claim was taken back by another host (this one was silent longer than the "
                              "lease); that host processes the file, so this result was dropped")


def share_away(run_id: int) -> RunResult:
    return superseded(run_id, "the inbox's share went away while this file was processed; it stays claimed on the "
                              "share, where another host (or this one, when the share is back) takes it again")


def outbox_away(run_id: int, where: str) -> RunResult:
    return superseded(run_id, f"the outbox is not there ({where}: share not mounted?); the file went back to the "
                              "inbox and is taken again when the outbox returns")


def handed_over(run_id: int) -> RunResult:
    return superseded(run_id, "another host took this delivery over mid-way (this one was silent longer than the "
                              "lease) and finishes it with this run's output")


def undone(run_id: int, why: str) -> RunResult:
    return superseded(run_id, f"its delivery was undone ({why}); the original went back to the inbox and is "
                              "processed again")


def fail_filed(custody: Custody, claim: Claim, run_id: int, reason: str) -> RunResult:
    """File a failed job's original in failed/ (fenced) and say how the run ended. Never raises OSError:
    a failed/ that cannot be written leaves the original where it is, and says so."""
    from bgwatch import safefs

    try:
        settled = custody.fail(claim, run_id, reason)
    except safefs.FolderMissing:
        return share_away(run_id)
    except OSError as exc:
        return failed(run_id, f"{reason} (and the original could not be moved to failed/: {exc}; it stays in "
                              f"{custody.inbox / '.bgwatch'} until the next start)")
    if settled is None:
        return taken_back(run_id)
    return failed(run_id, f"{reason} ({settled.problem})" if settled.problem else reason, settled.parked)
