"""The one-shot commands behind the CLI: process one file, retry, validate, explain, cache, models."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from bgwatch import fileid, runs, safefs
from bgwatch.config import Config, InboxConfig, load_config
from bgwatch.errors import BgwatchError, InputError
from bgwatch.jobs import Job, JobState, RunResult, job_key
from bgwatch.runs import Ledger


def images_to_process(path: Path) -> list[Path]:
    """`bgwatch process PATH`: a file, or the images directly inside a folder (not its subfolders, hidden
    files or sidecars). InputError naming what is allowed when there is nothing to process."""
    from bgwatch.sidecars import IMAGE_SUFFIXES

    allowed = ", ".join(sorted(IMAGE_SUFFIXES))
    if path.is_dir():
        images = sorted(p for p in path.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not images:
            raise InputError(path, f"a folder with no images in it (allowed: an image file, or a folder of {allowed})")
        return images
    if not path.exists():
        raise InputError(path, f"no such file or folder (allowed: an image file, or a folder of {allowed})")
    if not path.is_file():
        raise InputError(path, "neither a regular file nor a folder")
    return [path]


def process_one(image: Path, config: Config, out_dir: Path, overrides: Mapping[str, Any]) -> RunResult:
    """Run the three stages on one file, write the result into out_dir, and record the run."""
    [result] = process_many([image], config, out_dir, overrides, each_error=False)
    return result


def process_many(images: Sequence[Path], config: Config, out_dir: Path, overrides: Mapping[str, Any], *,
                 each_error: bool = True) -> list[RunResult]:
    """process_one for several files with one store and one set of loaded engines. each_error: a file whose
    spec cannot be resolved (its sidecar, say) is a failed result and the others go on; else it raises."""
    from bgwatch.pipeline import stages
    from bgwatch.storebase import open_store
    from bgwatch.studio import generation_bucket

    for image in images:
        if not image.is_file():
            raise InputError(image, "no such file")
    store = open_store(config.store, sqlite_path=config.db_path, host=config.host)  # a studio's: its history too
    engines = stages.Engines(config, store, generation_bucket(store, config.limits.generations_per_minute))
    ledger = Ledger(store, config.host)
    results = []
    try:
        for image in images:
            try:
                job = _record(image.resolve(), config, ledger, out_dir, overrides)
            except BgwatchError as exc:
                if not each_error:
                    raise
                results.append(runs.failed(0, str(exc)))  # no run recorded: its spec could not be resolved
                continue
            results.append(_process_and_record(job, config, engines, ledger, image.resolve(), out_dir))
    finally:
        store.close()
    return results


def _record(image: Path, config: Config, ledger: Ledger, out_dir: Path, overrides: Mapping[str, Any]) -> Job:
    """The job for one file, its run recorded as running (SpecError when its spec cannot be resolved)."""
    from bgwatch import rules

    inbox = config.inbox_for(image) or InboxConfig(path=image.parent, outbox=out_dir, rules={})
    spec = rules.resolve(image, inbox, config, overrides=overrides or None).spec
    sha = fileid.sha256_file(image)
    rel = PurePosixPath(*image.relative_to(inbox.path).parts).as_posix()
    run_id = ledger.add(key=job_key(sha, spec), inbox="(process)", rel_path=rel, source_path=str(image),
                        input_sha256=sha, spec_json=spec.to_json())
    ledger.start(run_id, at=time.time())
    return Job(run_id=run_id, inbox="(process)", rel_path=rel, source=image, spec=spec, input_sha256=sha,
               key=job_key(sha, spec))


def _process_and_record(job: Job, config: Config, engines: Any, ledger: Ledger, image: Path,
                        out_dir: Path) -> RunResult:
    from bgwatch.pipeline import stages

    spec = job.spec
    try:
        finished = stages.run_all(job, config, engines, max_memory=config.limits.max_memory)
        target = out_dir / f"{image.stem}{spec.output.suffix}{finished.extension}"
        if target.resolve() == image:  # never overwrite the input itself
            target = out_dir / f"{image.stem}-bgwatch{finished.extension}"
        out_dir.mkdir(parents=True, exist_ok=True)
        safefs.write_file_atomic(target, finished.data)
    except (BgwatchError, OSError) as exc:
        result = runs.failed(job.run_id, str(exc))
    except BaseException as exc:  # a bug or ^C: the row must not stay 'running'; then let it surface
        ledger.finish(runs.failed(job.run_id, f"internal error ({type(exc).__name__}: {exc})"))
        raise
    else:
        result = runs.done(job.run_id, target, finished)
    ledger.finish(result)
    return result


def retry_runs(config: Config, run_ids: Sequence[int], *, all_failed: bool) -> tuple[list[str], list[str]]:
    """Move failed originals (and their sidecars) from failed/ back to where they were dropped."""
    from bgwatch.custody import FAILED_DIR, Custody
    from bgwatch.liveness import new_epoch
    from bgwatch.storebase import open_store

    store = open_store(config.store, sqlite_path=config.db_path, host=config.host)
    rows = [(i, store.get_run(i)) for i in run_ids]
    if all_failed:
        rows += [(r.id, r) for r in store.runs_in((JobState.FAILED,)) if r.id not in run_ids]
    moved: list[str] = []
    problems: list[str] = []
    seen: set[str] = set()
    epoch = new_epoch()
    try:
        for run_id, row in rows:
            if row is None:
                problems.append(f"run {run_id}: no such run")
                continue
            if row.status != "failed":
                problems.append(f"run {run_id}: it is {row.status}, not failed")
                continue
            source = Path(row.source_path or "")
            inbox = next((ib for ib in config.inboxes if ib.name == row.inbox), None)
            failed_dir = inbox.path / FAILED_DIR if inbox is not None else None
            if inbox is None or failed_dir is None or failed_dir not in source.parents or not source.is_file():
                if not all_failed:
                    problems.append(f"run {run_id}: its original is no longer in failed/ ({source})")
                continue
            if str(source) in seen:
                continue
            seen.add(str(source))
            custody = Custody(inbox.path, config.host, epoch)
            parked_rel = PurePosixPath(*source.relative_to(failed_dir).parts).as_posix()
            try:
                back = custody.restore(FAILED_DIR, parked_rel, row.rel_path)
            except OSError as exc:
                problems.append(f"run {run_id}: cannot move it back: {exc}")
                continue
            if back is None:
                problems.append(f"run {run_id}: its original is no longer in failed/ ({source})")
                continue
            target = inbox.path / back
            store.mark_retried(row.id, str(target))
            moved.append(f"run {row.id}: {target}")
    finally:
        store.close()
    return moved, problems


def validate_paths(paths: Sequence[Path], config_path: Path | None) -> dict[Path, list[str]]:
    """Every problem in each file, as the daemon would see it. A config.yaml is recognised by its top-level
    keys. A sidecar or folder file inside a configured inbox is resolved as the daemon resolves it (same
    reader, same 64 KiB cap, the inbox's rules, trust and limits), for the image it belongs to."""
    from bgwatch import rules
    from bgwatch.yamlsafe import DEFAULT_MAX_BYTES, load_yaml_mapping

    config: Config | None = None
    if config_path is not None and config_path.is_file():
        try:
            config = load_config(config_path)
        except BgwatchError:
            config = None  # reported when the config itself is validated
    problems: dict[Path, list[str]] = {}
    for path in paths:
        errors: list[str] = []
        try:
            try:
                data = load_yaml_mapping(path)
            except BgwatchError:
                data = load_yaml_mapping(path, max_bytes=16 * DEFAULT_MAX_BYTES)  # a config.yaml may be bigger
                if "inboxes" not in data and "state_dir" not in data:
                    raise
            if "inboxes" in data or "state_dir" in data:
                load_config(path)
            else:
                errors = [str(e) for e in rules.validate_fragment_all(data, str(path), trusted=False)]
                if not errors and config is not None:
                    _validate_in_inbox(path, config)
        except BgwatchError as exc:
            errors = [str(exc)]
        problems[path] = errors
    return problems


def _validate_in_inbox(path: Path, config: Config) -> None:
    """Resolve a sidecar or folder file in its inbox as the daemon would (SpecError if it would fail)."""
    from bgwatch import rules, sidecars

    absolute = Path(os.path.abspath(path))
    inbox = config.inbox_for(absolute)
    if inbox is None:
        return  # not in an inbox: only its own keys and values can be checked
    if path.name == rules.FOLDER_FILE:
        rules.resolve(absolute.parent / "any-image.jpg", inbox, config, sidecar=None)
        return
    images = sidecars.sidecar_images(absolute)
    stem = absolute.name[: -len(absolute.suffix)]
    image = images[0] if images else absolute.with_name(stem if "." in stem else stem + ".jpg")
    rules.resolve(image, inbox, config, sidecar=absolute)


def explain(image: Path, config: Config) -> str:
    from bgwatch import reference, rules

    inbox = config.inbox_for(image)
    if inbox is None:
        raise InputError(image, "is not inside any configured inbox: "
                         + ", ".join(str(ib.path) for ib in config.inboxes))
    resolved = rules.resolve(image, inbox, config)
    return reference.format_explanation(resolved)


def cache_command(config: Config, action: str) -> str:
    from bgwatch.pipeline.cache import BackgroundCache
    from bgwatch.storebase import open_store

    store = open_store(config.store, sqlite_path=config.db_path, host=config.host)
    cache = BackgroundCache(store, config.cache_dir, config.cache.max_bytes)
    try:
        if action == "ls":
            rows = cache.ls()
            if not rows:
                return "cache is empty"
            lines = [f"{'key':12}  {'engine':8}  {'size':>9}  {'hits':>4}  {'last used':19}  prompt"]
            for r in rows:
                used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_used_at"]))
                lines.append(f"{r['key'][:12]:12}  {r['engine']:8}  {r['width']}x{r['height']:<4}  "
                             f"{r['hits']:>4}  {used:19}  {r['prompt'][:50]}")
            total = sum(r["bytes"] for r in rows)
            lines.append(f"{len(rows)} background(s), {total / 1e6:.1f} MB of {config.cache.max_bytes / 1e6:.0f} MB")
            return "\n".join(lines)
        if action == "prune":
            removed = cache.prune()
            return f"pruned {removed} background(s)"
        removed = cache.clear()
        return f"cleared {removed} background(s)"
    finally:
        store.close()


def models_command(config: Config, action: str, names: Sequence[str] = (), *,
                   fp16: bool | None = None) -> tuple[str, bool]:
    from bgwatch import models

    if action == "ls":
        return models.format_models(models.list_models(config, tuple(names))), True
    try:
        return models.format_pull(models.pull_models(config, tuple(names), fp16=fp16)), True
    except BgwatchError as exc:
        return f"bgwatch: {exc}", False
