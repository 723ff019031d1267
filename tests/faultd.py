"""A daemon process with crash points, for the fault suite: the tests' seam, not the product's.

    python tests/faultd.py CONFIG --crash-at delivered[:N]     (or --stop-at filing[:N])

runs what `bgwatch run -c CONFIG` runs (logging, signal handlers, Daemon.run), with a `step` callback
handed to the daemon that SIGKILLs this process the N-th time a delivery reaches the named moment
(custody.Step: "marker", "delivered", "filing"). A power cut at exactly that point, on a real share.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class CrashAt:
    """`signum` (SIGKILL: a power cut; SIGSTOP: a paused VM, the harness sends SIGCONT) at the `count`-th
    pass through the delivery step `name` (any thread), once."""

    def __init__(self, spec: str, signum: int = signal.SIGKILL) -> None:
        name, _, count = spec.partition(":")
        self.name = name
        self.left = int(count or "1")
        self.signum = signum
        self._lock = threading.Lock()

    def __call__(self, step: str) -> None:
        if step != self.name:
            return
        with self._lock:
            self.left -= 1
            if self.left == 0:
                os.kill(os.getpid(), self.signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--crash-at", default="", help="STEP[:N]: SIGKILL at the N-th pass through STEP")
    parser.add_argument("--stop-at", default="", help="STEP[:N]: SIGSTOP at the N-th pass through STEP")
    args = parser.parse_args(argv)
    from bgwatch.config import load_config
    from bgwatch.daemon import Daemon
    from bgwatch.logs import setup_logging

    config = load_config(args.config)
    setup_logging(config.log_dir, debug=config.debug)
    step = (CrashAt(args.crash_at) if args.crash_at else
            CrashAt(args.stop_at, signal.SIGSTOP) if args.stop_at else None)
    daemon = Daemon(config, step=step)
    daemon.install_signal_handlers()
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
