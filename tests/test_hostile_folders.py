"""Issue 20, item 3: a work folder the daemon may not open (another share user's `mkdir -m 700 .bgwatch`)
makes its inbox wait, with a logged error and a `status` line naming the folder and the fix; it never
crashes a start, and the other inboxes go on. The daemon runs without root's override of file rights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgwatch.samples import write_samples
from tests.helpers import files_under, make_config, wait_for
from tests.unprivileged import as_nobody, open_to_all, shared_root, without_file_rights

MKDIR = "import os, sys; os.mkdir(sys.argv[1], 0o700)"
CHMOD = "import os, sys; os.chmod(sys.argv[1], 0o777)"


@pytest.fixture
def share() -> Iterator[Path]:
    with shared_root() as root:
        yield root


def cleanup() -> dict[str, dict[str, str]]:
    return {"rules": {"operation": "cleanup"}}  # a new dict for each inbox (one object twice is a YAML alias)


def _problems(state: Path) -> list[str]:
    try:
        return list(json.loads((state / "status.json").read_text())["problems"])
    except (OSError, ValueError, KeyError):
        return []


@pytest.mark.slow
def test_a_work_folder_bgwatch_may_not_open_makes_its_inbox_wait_and_the_others_go_on(share: Path) -> None:
    config = make_config(share, {"locked": cleanup(), "open": cleanup()}, watch={"lease_seconds": 4})
    locked, other = config.inboxes
    open_to_all(locked.path)
    work = locked.path / ".bgwatch"
    made = as_nobody(MKDIR, str(work))
    assert made.returncode == 0, made.stderr
    [waiting] = write_samples(locked.path, 1, size=(160, 120), seed=1)
    [image] = write_samples(other.path, 1, size=(160, 120), seed=2)
    assert config.source is not None
    log = share / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "bgwatch", "run", "--no-progress", "-c", str(config.source)],
                                  preexec_fn=without_file_rights, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: files_under(other.outbox) == [image.with_suffix(".png").name] or daemon.poll() is not None,
                 timeout=60)
        assert daemon.poll() is None, log.read_text()
        [line] = wait_for(lambda: [p for p in _problems(config.state_dir) if p.startswith("inbox ")])
        assert f"inbox {locked.path} waits: cannot open {work}: Permission denied" in line
        assert "give it read, write and search rights there" in line
        assert files_under(locked.outbox) == [] and waiting.is_file(), "nothing is claimed in the waiting inbox"

        fixed = as_nobody(CHMOD, str(work))  # its owner lets bgwatch in: the inbox is recovered and goes on
        assert fixed.returncode == 0, fixed.stderr
        wait_for(lambda: files_under(locked.outbox) == [waiting.with_suffix(".png").name], timeout=60)
        wait_for(lambda: not [p for p in _problems(config.state_dir) if str(locked.path) in p])
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    text = log.read_text()
    assert daemon.returncode == 0, text
    assert "Traceback" not in text
    errors = (config.state_dir / "logs" / "error.log").read_text()
    assert f"{locked.path}: cannot open {work}: Permission denied" in errors
