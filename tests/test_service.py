"""Process-wide settings a daemon applies when it starts (service.share_cores)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

LOW = 128


def _lower_soft_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, hard))


def test_a_daemon_start_raises_the_open_file_limit_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= LOW:
        pytest.skip(f"the hard open-file limit here is {hard}: nothing to raise")
    code = ("import resource; from bgwatch.service import share_cores\n"
            "before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
            "share_cores(2, 2)\n"
            "print(before, *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=_lower_soft_limit, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    before, soft, child_hard = (int(x) for x in out)
    assert before == LOW
    assert soft > LOW
    assert soft == child_hard or child_hard == resource.RLIM_INFINITY
