"""Intake: from a stable file in an inbox to a recorded run, and from a finished run to done/ or failed/.

Runs on the daemon's main thread (tick), except complete() and fail(), which the stage workers call.
Files are claimed only while this host has room in its window; the rest stay, unclaimed, in the inbox,
where another workstation may take them.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from loguru import logger

from bgwatch import claim, outbox, rules, sidecars
from bgwatch.config import InboxConfig
from bgwatch.errors import BgwatchError, SpecError
from bgwatch.jobs import Job, JobSpec, JobState, RunResult, job_key
from bgwatch.sidecars import IMAGE_SUFFIXES, SIDECAR_SUFFIXES
from bgwatch.watch import InboxWatcher

if TYPE_CHECKING:
    from bgwatch.daemon import Daemon
    from bgwatch.pipeline.stages import Finished

RULES_FILE = ".bgwatch.yaml"


@dataclass(slots=True)
class Waiting:
    inbox: InboxConfig
    first_seen: float


def rel_of(inbox: InboxConfig, path: Path) -> str:
    return PurePosixPath(*path.relative_to(inbox.path).parts).as_posix()


class Intake:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.watcher: InboxWatcher | None = None
        self.pending: dict[Path, Waiting] = {}  # stable images not yet claimed (no room, or awaiting sidecar)
        self.sidecars: dict[Path, Waiting] = {}  # stable sidecars whose image is not in the inbox
        self.kept: dict[Path, tuple[int, int]] = {}  # on_success: keep -> (size, mtime_ns) already handled
        self._kept_limit = 10_000
        self.sidecar_of: dict[int, Path] = {}  # run id -> its claimed sidecar
        self.liveness = claim.Liveness()  # other hosts, judged on this host's clock

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.watcher = InboxWatcher(self.d.config.inboxes, self.d.config.watch)
        self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()

    def restart_watcher(self) -> None:
        self.stop()
        self.start()

    def idle(self) -> bool:
        """Nothing left to take: used by `run --once` to know when to exit."""
        assert self.watcher is not None
        return (not self.pending and not self.sidecars_waiting() and self.watcher.settled())

    def sidecars_waiting(self) -> bool:
        # In --once mode an orphan sidecar does not hold the exit: it is left for a later run.
        return False if self.d.once else bool(self.sidecars)

    # ------------------------------------------------------------------ recovery

    def recover(self) -> None:
        """After a crash: resume queued work, take back this host's running work, settle stray claims."""
        store, host = self.d.store, self.d.config.host
        for row in store.runs_in((JobState.RUNNING,), host=host):
            logger.warning("run {} ({}) was running when bgwatch stopped; taking it again", row["id"],
                           row["rel_path"])
            store.requeue(row["id"])
        open_sources: set[str] = set()
        for row in store.runs_in((JobState.QUEUED,), host=host):
            source = Path(row["source_path"])
            inbox = self.d.inbox_named(row["inbox"])
            if inbox is None or not source.exists():
                store.finish_run(row["id"], JobState.FAILED,
                                 error="its claimed file vanished while bgwatch was stopped")
                continue
            open_sources.add(str(source))
            sidecar = self._claimed_sidecar(source)
            if sidecar is not None:
                self.sidecar_of[row["id"]] = sidecar
            self.d.enqueue(row["id"])
        for inbox in self.d.config.inboxes:
            if outbox.remove_own_temp_files(inbox.outbox, host):
                logger.info("{}: removed half-written outputs left by the last run", inbox.outbox)
            folder = claim.claimed_dir(inbox.path, host)
            if not folder.is_dir():
                continue
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            for path in files:
                if str(path) not in open_sources and path.suffix.lower() not in SIDECAR_SUFFIXES:
                    self._settle_stray_claim(inbox, path)
            for path in files:
                if path.exists() and path.suffix.lower() in SIDECAR_SUFFIXES and not sidecars.sidecar_images(path):
                    claim.unclaim(inbox.path, path, host)

    @staticmethod
    def _claimed_sidecar(image: Path) -> Path | None:
        try:
            return sidecars.find_sidecar(image)
        except SpecError:
            return None

    def _settle_stray_claim(self, inbox: InboxConfig, path: Path) -> None:
        store = self.d.store
        with store._lock:
            rows = list(store.db.query("SELECT * FROM runs WHERE source_path = ? ORDER BY id DESC LIMIT 1",
                                       [str(path)]))
        row = rows[0] if rows else None
        if row is not None and row["input_sha256"] != outbox.sha256_file(path):
            row = None  # a newer file claimed under the same name before its run was recorded
        if row is not None and row["status"] in ("done", "skipped"):
            sidecar = self._claimed_sidecar(path)
            if sidecar is not None:
                self.sidecar_of[row["id"]] = sidecar
            self._dispose_original(inbox, path, row["rel_path"], row["id"])
        elif row is not None and row["status"] == "failed":
            target = outbox.move_to_failed(inbox.path, path, row["rel_path"], row["error"] or "failed")
            sidecar = self._claimed_sidecar(path)
            if sidecar is not None:
                park_sidecar(inbox.path, sidecar, target)
        else:
            back = claim.unclaim(inbox.path, path, self.d.config.host)
            logger.info("returned unfinished claim {} to the inbox", back)

    # ------------------------------------------------------------------ tick

    def tick(self) -> None:
        assert self.watcher is not None
        now = time.monotonic()
        if len(self.kept) > self._kept_limit:  # files kept in place and since removed by people: forget them
            self.kept = {p: sig for p, sig in self.kept.items() if p.exists()}
            self._kept_limit = max(10_000, 2 * len(self.kept))
        for inbox, path in self.watcher.poll_ready():
            self._guarded(path, self._classify, inbox, path, now)
        self._take_pending(now)
        self._check_sidecars(now)

    @staticmethod
    def _guarded(path: Path, step: Callable[..., object], *args: object) -> None:
        """One file's trouble (a vanished share, a read-only folder, a locked database) is logged and
        retried at the next rescan; it never stops the daemon."""
        try:
            step(*args)
        except (OSError, BgwatchError, sqlite3.Error, ValueError) as exc:
            logger.error("{}: {}", path, exc)

    def _classify(self, inbox: InboxConfig, path: Path, now: float) -> None:
        inbox = self.d.inbox_named(inbox.name) or inbox  # the watcher's copy predates a config reload
        name = path.name
        suffix = path.suffix.lower()
        if name == RULES_FILE:
            logger.info("folder rules {} changed: they apply to files arriving from now on", path)
        elif suffix in SIDECAR_SUFFIXES:
            self.sidecars.setdefault(path, Waiting(inbox, now))
            for image in sidecars.sidecar_images(path):
                self.kept.pop(image, None)  # a changed sidecar re-takes a kept image
                self.pending.setdefault(image, Waiting(inbox, now))
        elif suffix in IMAGE_SUFFIXES:
            signature = self._signature(path)
            if signature is not None and self.kept.get(path) == signature:
                return
            self.pending.setdefault(path, Waiting(inbox, now))
        else:
            logger.debug("ignoring {} (not an image bgwatch reads: {})", path, ", ".join(sorted(IMAGE_SUFFIXES)))

    @staticmethod
    def _signature(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns)

    def _take_pending(self, now: float) -> None:
        for path in list(self.pending):
            if self.d.stop_event.is_set() or self.d.room() <= 0:
                return
            waiting = self.pending[path]
            if not path.exists():
                del self.pending[path]
                continue
            if self._awaits_sidecar(waiting, path, now):
                continue
            del self.pending[path]
            self._guarded(path, self.take, self.d.inbox_named(waiting.inbox.name) or waiting.inbox, path)

    def _awaits_sidecar(self, waiting: Waiting, path: Path, now: float) -> bool:
        """require_sidecar: wait up to watch.sidecar_seconds for the sidecar, then go (and fail)."""
        try:
            if sidecars.find_sidecar(path) is not None:
                return False
            spec = rules.resolve(path, waiting.inbox, self.d.config, sidecar=None).spec
        except (BgwatchError, OSError, ValueError):
            return False  # take it now; the error is reported on the run
        return spec.require_sidecar and now - waiting.first_seen < self.d.config.watch.sidecar_seconds

    # ------------------------------------------------------------------ take

    def take(self, inbox: InboxConfig, path: Path) -> int | None:
        """Claim one stable image (and its sidecar), record its run, and queue it. Returns the run id."""
        host = self.d.config.host
        rel = rel_of(inbox, path)
        try:
            sidecar = sidecars.find_sidecar(path)
        except SpecError as exc:
            sidecar, sidecar_error = None, str(exc)
        else:
            sidecar_error = ""
        claimed = claim.claim(inbox.path, path, host)
        if claimed is None:
            logger.debug("{}: another host took it", path)
            return None
        claimed_sidecar = None
        if sidecar is not None:
            claimed_sidecar = claim.claim(inbox.path, sidecar, host)
            self.sidecars.pop(sidecar, None)
        store = self.d.store
        if not stat.S_ISREG(os.lstat(claimed).st_mode):  # swapped for a link or a FIFO while it waited
            run_id = store.add_run(key="-", inbox=inbox.name, rel_path=rel, source_path=str(claimed),
                                   input_sha256="", spec_json="{}", host=host)
            self._fail_claimed(inbox, run_id, rel, claimed,
                               "not a regular file (a symbolic link, pipe or device); bgwatch reads only files")
            return run_id
        try:
            sha = outbox.sha256_file(claimed)
        except OSError:
            claim.unclaim(inbox.path, claimed, host)
            if claimed_sidecar is not None:
                claim.unclaim(inbox.path, claimed_sidecar, host)
            raise
        try:
            if sidecar_error:
                raise SpecError(rel, "sidecar", sidecar_error)
            resolved = rules.resolve(path, inbox, self.d.config, sidecar=claimed_sidecar)
            spec = resolved.spec
            if spec.require_sidecar and claimed_sidecar is None:
                raise SpecError(
                    path.parent / RULES_FILE, "require_sidecar",
                    f"no sidecar arrived for {path.name} within {self.d.config.watch.sidecar_seconds:g} s",
                    f"drop {path.stem}.yaml beside it, or set require_sidecar: false")
        except (BgwatchError, ValueError) as exc:
            run_id = store.add_run(key=sha, inbox=inbox.name, rel_path=rel, source_path=str(claimed),
                                   input_sha256=sha, spec_json="{}", host=host)
            if claimed_sidecar is not None:
                self.sidecar_of[run_id] = claimed_sidecar
            self._fail_claimed(inbox, run_id, rel, claimed, str(exc))
            return run_id
        key = job_key(sha, spec)
        earlier = None if spec.reprocess else store.find_done(key)
        run_id = store.add_run(key=key, inbox=inbox.name, rel_path=rel, source_path=str(claimed),
                               input_sha256=sha, spec_json=spec.to_json(), host=host)
        if claimed_sidecar is not None:
            self.sidecar_of[run_id] = claimed_sidecar
        if earlier is not None:
            try:
                output = self._deliver_earlier(inbox, rel, spec, Path(earlier["output_path"]))
            except OSError as exc:
                self._fail_claimed(inbox, run_id, rel, claimed, f"could not deliver the earlier output: {exc}")
                return run_id
            store.finish_run(run_id, JobState.SKIPPED, output_path=str(output),
                             error=f"same image and spec as run {earlier['id']}")
            logger.info("{}: same image and spec as run {}, skipped (output {})", rel, earlier["id"], output)
            self._dispose_original(inbox, claimed, rel, run_id)
            self.d.record(RunResult(run_id, JobState.SKIPPED, output))
            return run_id
        logger.info("{}: queued as run {} ({} {})", rel, run_id, spec.operation,
                    spec.mode if spec.operation == "cleanup" else spec.engine)
        self.d.enqueue(run_id)
        return run_id

    def _deliver_earlier(self, inbox: InboxConfig, rel: str, spec: JobSpec, earlier: Path) -> Path:
        """No second inference; but an input dropped under another name still finds its output there."""
        from bgwatch.pipeline.imageio import output_extension

        target = self.d.outbox.reserve(inbox.outbox, rel, spec.output.suffix, output_extension(spec.output))
        try:
            if target != earlier:
                outbox.atomic_write(target, earlier.read_bytes(), owner=self.d.config.host)
        finally:
            self.d.outbox.release(target)
        return target

    # ------------------------------------------------------------------ endings

    def complete(self, finished: Finished) -> None:
        """Write the output atomically, record 'done', and move the original per on_success."""
        job = finished.job
        inbox = self.d.inbox_named(job.inbox)
        if inbox is None:  # removed by a config reload while the job ran: there is no outbox to write to
            raise BgwatchError(f"inbox {job.inbox} was removed from the configuration while this file was "
                               "processed; put the file back in a configured inbox to process it")
        target = self.d.outbox.reserve(inbox.outbox, job.rel_path, job.spec.output.suffix, finished.extension)
        try:
            # Recorded first: after a kill between write and 'done', the rerun knows this file is its own.
            self.d.store.set_output(job.run_id, str(target))
            target.parent.mkdir(parents=True, exist_ok=True)
            claim.refuse_links(inbox.outbox, target.parent)
            outbox.atomic_write(target, finished.data, owner=self.d.config.host)
        finally:
            self.d.outbox.release(target)
        self.d.store.finish_run(job.run_id, JobState.DONE, output_path=str(target),
                                mask_engine=finished.mask_engine, bg_engine=finished.bg_engine,
                                seed=finished.seed, timings=finished.timings)
        logger.info("{}: done -> {} ({:.2f} s)", job.rel_path, target, sum(finished.timings.values()))
        try:
            self._dispose_original(inbox, job.source, job.rel_path, job.run_id)
        except OSError as exc:
            logger.error("{}: output written, but the original could not be moved: {}", job.rel_path, exc)
        self.d.record(RunResult(job.run_id, JobState.DONE, target, mask_engine=finished.mask_engine,
                                bg_engine=finished.bg_engine, seed=finished.seed, timings=finished.timings))

    def fail(self, job: Job, reason: str) -> None:
        self._fail_claimed(self._inbox(job), job.run_id, job.rel_path, job.source, reason)

    def _fail_claimed(self, inbox: InboxConfig, run_id: int, rel: str, claimed: Path, reason: str) -> None:
        logger.error("{}: failed: {}", rel, reason)
        where = claimed
        try:
            if claimed.exists():
                where = outbox.move_to_failed(inbox.path, claimed, rel, reason)
            sidecar = self.sidecar_of.pop(run_id, None)
            if sidecar is not None and sidecar.exists():
                park_sidecar(inbox.path, sidecar, where)
        except OSError as exc:
            reason += f" (and the original could not be moved to failed/: {exc}; it is at {claimed})"
            logger.error("{}: cannot move to failed/: {}", rel, exc)
        self.d.store.finish_run(run_id, JobState.FAILED, error=reason, source_path=str(where))
        self.d.record(RunResult(run_id, JobState.FAILED, error=reason))

    def _dispose_original(self, inbox: InboxConfig, current: Path, rel: str, run_id: int | None) -> None:
        sidecar = self.sidecar_of.pop(run_id, None) if run_id is not None else None
        sidecar_rel = str(PurePosixPath(rel).parent / sidecar.name) if sidecar is not None else ""
        if inbox.on_success == "move":
            target = outbox.move_to_done(inbox.path, current, rel)
            if sidecar is not None and sidecar.exists():
                park_sidecar(inbox.path, sidecar, target)
        elif inbox.on_success == "delete":
            current.unlink(missing_ok=True)
            if sidecar is not None:
                sidecar.unlink(missing_ok=True)
        else:  # keep: back where it was dropped, remembered so that it is not taken again unchanged
            original = outbox.free_name((inbox.path / rel).parent, PurePosixPath(rel).name)
            os.replace(current, original)
            signature = self._signature(original)
            if signature is not None:
                self.kept[original] = signature
            if sidecar is not None and sidecar.exists():
                os.replace(sidecar, outbox.free_name((inbox.path / sidecar_rel).parent, sidecar.name))

    def _inbox(self, job: Job) -> InboxConfig:
        inbox = self.d.inbox_named(job.inbox)
        if inbox is None:  # removed by a config reload while the job ran: file the original where it came from
            inbox = InboxConfig(path=Path(job.inbox), outbox=Path(job.inbox), on_success="move")
        return inbox

    # ------------------------------------------------------------------ sidecars on their own

    def _check_sidecars(self, now: float) -> None:
        for path, waiting in list(self.sidecars.items()):
            try:
                self._check_sidecar(path, waiting, now)
            except (OSError, BgwatchError, sqlite3.Error, ValueError) as exc:
                # logged once, not ten times a second: the sidecar is looked at again if it changes
                logger.error("{}: {}; leaving this sidecar where it is", path, exc)
                self.sidecars.pop(path, None)

    def _check_sidecar(self, path: Path, waiting: Waiting, now: float) -> None:
        if not path.exists():
            del self.sidecars[path]
            return
        if sidecars.sidecar_images(path):
            return  # its image is in the inbox: it travels with it when the image is taken
        inbox = waiting.inbox
        rel = rel_of(inbox, path)
        done_twin = inbox.path / outbox.DONE_DIR / rel
        images = sidecars.sidecar_images(done_twin)
        if images:
            self._sidecar_after_image(inbox, path, images[0])
            del self.sidecars[path]
        elif now - waiting.first_seen >= self.d.config.watch.orphan_sidecar_seconds:
            reason = (f"no image belongs to this sidecar (looked for {path.stem}.* beside it) within "
                      f"{self.d.config.watch.orphan_sidecar_seconds:g} s")
            outbox.move_to_failed(inbox.path, path, rel, reason)
            logger.warning("{}: {}", rel, reason)
            del self.sidecars[path]

    def _sidecar_after_image(self, inbox: InboxConfig, sidecar: Path, done_image: Path) -> None:
        """A sidecar arrived after its image was processed: reprocess if the resolved spec changed."""
        image_rel = rel_of(inbox, sidecar.parent / done_image.name)
        original = inbox.path / image_rel
        try:
            spec = rules.resolve(original, inbox, self.d.config, sidecar=sidecar).spec
        except BgwatchError as exc:
            outbox.move_to_failed(inbox.path, sidecar, rel_of(inbox, sidecar), str(exc))
            return
        if self.d.store.find_done(job_key(outbox.sha256_file(done_image), spec)) is not None:
            outbox.park(inbox.path, sidecar, rel_of(inbox, sidecar), outbox.DONE_DIR)
            logger.info("{}: sidecar changes nothing; filed beside its image in done/", rel_of(inbox, sidecar))
            return
        logger.info("{}: sidecar arrived after its image; processing it again", image_rel)
        os.replace(done_image, original if not original.exists() else outbox.free_name(original.parent,
                                                                                        original.name))
        self.pending.setdefault(original, Waiting(inbox, time.monotonic()))

    def heartbeat(self) -> None:
        now = time.time()
        for inbox in self.d.config.inboxes:
            if not inbox.path.is_dir():
                continue
            claim.Heartbeat(inbox.path, self.d.config.host).beat()
            for back in claim.reclaim_stale(inbox.path, self.d.config.watch.lease_seconds, self.d.config.host,
                                            now, self.liveness):
                logger.warning("returned {} to the inbox: its host stopped beating", back)


def park_sidecar(inbox_root: Path, sidecar: Path, image: Path) -> Path:
    """File a sidecar beside its parked image under the image's (possibly numbered) name."""
    stem = image.name if sidecar.name.startswith(image.name) else image.stem
    target = outbox.free_name(image.parent, stem + sidecar.suffix)
    os.replace(sidecar, target)
    return target
