"""The multi-host fault suite as a table: fault | rounds | files | lost | processed twice | stranded | outputs
overwritten | inputs without their own output | originals renamed without a clash.

Runs the scenarios of tests/test_multihost.py (real daemons on FUSE bind mounts of one share; needs
bindfs and /dev/fuse, as root or with the fuse group) and prints one row per fault, then each
scenario's violations. Not a timed test; exit status 1 if any invariant broke.

    python bench/bench_faults.py [--only sigkill,sigstop] [--kill-rounds 30] [--files 180] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hosts import Cluster  # noqa: E402  (tests/ is put on the path just above)
from share import Report, fuse_problem  # noqa: E402
from test_multihost import (  # noqa: E402
    scenario_crash_after_delivery,
    scenario_db_lock,
    scenario_full_outbox,
    scenario_full_state_folder,
    scenario_keep,
    scenario_keep_once,
    scenario_same_name_twice,
    scenario_share_mode,
    scenario_sigkill,
    scenario_sigstop,
    scenario_stop_mid_filing,
    scenario_unmount,
)


def scenarios(args: argparse.Namespace) -> dict[str, tuple[dict[str, Any], Callable[[Cluster], Report]]]:
    """name -> (Cluster arguments, the scenario with this run's sizes)."""
    return {
        "sigkill": ({}, lambda c: scenario_sigkill(c, rounds=args.kill_rounds, files=args.files)),
        "sigstop": ({}, lambda c: scenario_sigstop(c)),
        "db-lock": ({}, lambda c: scenario_db_lock(c)),
        "unmount": ({}, lambda c: scenario_unmount(c)),
        "crash-after-write": ({}, lambda c: scenario_crash_after_delivery(c)),
        "same-name": ({}, lambda c: scenario_same_name_twice(c, pairs=args.pairs)),
        "full-outbox": ({"hosts": 2}, lambda c: scenario_full_outbox(c)),
        "full-state": ({"hosts": 2}, lambda c: scenario_full_state_folder(c)),
        "stop-mid-filing": ({}, lambda c: scenario_stop_mid_filing(c)),
        "stop-mid-filing-smb": ({"fs": "smb"}, lambda c: scenario_stop_mid_filing(c)),
        # The FUSE passthrough answering in 10-20 ms a call (tests/fusefs.py), one row per kind of share
        **{f"share-{mode}": ({"fs": mode}, lambda c: scenario_share_mode(c, files=args.share_files,
                                                                          pairs=args.pairs, kills=args.share_kills))
           for mode in ("posix", "nfs", "smb")},
        "keep": ({"on_success": "keep"}, lambda c: scenario_keep(c)),
        "keep-once": ({"hosts": 1, "on_success": "keep"}, lambda c: scenario_keep_once(c)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--kill-rounds", type=int, default=30, help="SIGKILL rounds (default 30)")
    parser.add_argument("--files", type=int, default=180, help="files in the SIGKILL scenario (default 180)")
    parser.add_argument("--share-files", type=int, default=30, help="files per share-mode scenario (default 30)")
    parser.add_argument("--share-kills", type=int, default=6, help="SIGKILLs per share-mode scenario (default 6)")
    parser.add_argument("--pairs", type=int, default=6, help="same-name and output-name pairs (default 6)")
    parser.add_argument("--workdir", type=Path, help="keep the shares and logs here (default: a temp folder)")
    args = parser.parse_args()
    reason = fuse_problem()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    table = scenarios(args)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or list(table)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(table)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_faults-"))
    reports: list[Report] = []
    try:
        for name in chosen:
            kwargs, run = table[name]
            why = fuse_problem(kwargs.get("fs", "bindfs"))
            if why is not None:
                print(f"{name}: skipped: {why}", file=sys.stderr, flush=True)
                continue
            with Cluster(workdir / name, **kwargs) as cluster:
                report = run(cluster)
            reports.append(report)
            print(f"{name}: {len(report.violations)} violation(s)", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(Report.HEADER)
    print(" | ".join("---" for _ in Report.HEADER.split(" | ")))
    for report in reports:
        print(report.row())
    for report in reports:
        if report.violations or report.notes:
            print(f"\n{report.fault}:")
            for note in report.notes:
                print(f"  note: {note}")
            for violation in report.violations[:20]:
                print("  " + violation.replace("\n", "\n    "))
            if len(report.violations) > 20:
                print(f"  ... and {len(report.violations) - 20} more")
    return 1 if any(r.violations for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
