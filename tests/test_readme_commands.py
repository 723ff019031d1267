"""Every command of the README's "Running it" block runs as written, in a folder set up as the README says.

The block is a synopsis: `a | b` lists alternatives and `[x]` an optional part; each variant is run. The
daemon (`run`, `serve`) is started and stopped with SIGTERM. Nothing may print a traceback; exit codes
are the documented ones.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bgwatch.samples import write_samples

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Running it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands: list[str] = []
    for line in block.splitlines():
        line = line.split(" # ", 1)[0].strip()
        if line.startswith("bgwatch "):
            commands += expand(line)
    return commands


def expand(line: str) -> list[str]:
    """`bgwatch cache ls | prune` -> two commands; `[--json]` -> with and without."""
    words = line.split()
    head = " ".join(words[:2])
    rest = " ".join(words[2:])
    variants = [f"{head} {alt.strip()}".strip() for alt in rest.split(" | ")] if " | " in rest else [line]
    if " | " in rest and not rest.split(" | ")[0].startswith("-"):
        prefix = rest.split(" | ")[0].split()
        # `retry 17 18 | --failed`: the alternatives replace the arguments
        variants = [f"{head} {' '.join(prefix)}"] + [f"{head} {alt.strip()}" for alt in rest.split(" | ")[1:]]
    out: list[str] = []
    for variant in variants:
        optional = re.findall(r"\[([^\]]+)\]", variant)
        base = re.sub(r"\s*\[[^\]]+\]", "", variant)
        for chosen in itertools.product([False, True], repeat=len(optional)):
            out.append(" ".join([base, *[o for o, c in zip(optional, chosen, strict=True) if c]]))
    return out


def test_the_synopsis_is_expanded_as_a_reader_would() -> None:
    assert expand("bgwatch cache ls | prune | clear") == ["bgwatch cache ls", "bgwatch cache prune",
                                                         "bgwatch cache clear"]
    assert expand("bgwatch retry 17 18 | --failed") == ["bgwatch retry 17 18", "bgwatch retry --failed"]
    assert expand("bgwatch doctor [--json]") == ["bgwatch doctor", "bgwatch doctor --json"]


@pytest.mark.slow
def test_every_command_in_the_readme_runs_as_written(tmp_path: Path) -> None:
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    write_samples(tmp_path / "inbox" / "white", 2, size=(160, 120), seed=3)
    [photo] = write_samples(tmp_path, 1, size=(160, 120), seed=4)
    photo.rename(tmp_path / "photo.jpg")
    (tmp_path / "photo.yaml").write_text("mode: color\nbackground_color: '#f0f0f0'\n")
    write_samples(tmp_path / "inbox" / "replace", 1, size=(160, 120), seed=5)[0].rename(
        tmp_path / "inbox" / "replace" / "photo.jpg")
    (tmp_path / "inbox" / "replace" / ".bgwatch.yaml").write_text("prompt: a marble table\n")
    etc = tmp_path / "etc-bgwatch"  # `init /etc/bgwatch/config.yaml` writes here instead of the machine's /etc
    env = {**os.environ, "BGWATCH_CONFIG": str(tmp_path / "config.yaml"), "U2NET_HOME": str(tmp_path / "u2net"),
           "HF_HOME": str(tmp_path / "hf")}
    commands = readme_commands()
    assert len(commands) >= 20 and commands[0] == "bgwatch run -c config.yaml"
    for command in sorted(commands, key=lambda c: "run --once" not in c):  # the batch first: runs to look at
        argv = [sys.executable, "-m", "bgwatch", *command.split()[1:]]
        argv = [a.replace("/etc/bgwatch", str(etc)) for a in argv]
        daemon = command.split()[1] in ("run", "serve") and "--once" not in command
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if daemon:
            try:
                out, err = proc.communicate(timeout=4)  # it must not exit on its own
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=60)
            else:
                pytest.fail(f"`{command}` exited at once ({proc.returncode}): {err[-500:]}")
        else:
            out, err = proc.communicate(timeout=120)
        assert "Traceback" not in err + out, f"`{command}` printed a traceback:\n{err[-2000:]}"
        # 0 ok, 1 some work failed (replace without SDXL weights; pull without internet; retry of no run);
        # doctor's 2 is its documented "errors found" (here: inboxes of the sample that do not exist)
        allowed = (0, 1, 2) if command.startswith("bgwatch doctor") else (0, 1)
        assert proc.returncode in allowed, f"`{command}` exited {proc.returncode}: {err[-500:]}"
    assert (etc / "config.yaml").is_file() and (tmp_path / "batch.html").is_file()


def test_install_facts_agree_everywhere() -> None:
    """One torch version (constraints.txt, the Makefile, the README's install step) and one Python floor."""
    constraints = (ROOT / "constraints.txt").read_text()
    [pin] = re.findall(r"^torch==(\S+)$", constraints, re.M)
    readme = (ROOT / "README.md").read_text()
    install = readme.split("## On a GPU workstation", 1)[1].split("###", 1)[0]
    assert set(re.findall(r"torch==(\S+?)[\s`]", install)) == {pin}, "the README's torch step is pinned to it"
    makefile = (ROOT / "Makefile").read_text()
    assert "grep -E '^torch==' constraints.txt" in makefile and "torch==" not in makefile.replace(
        "'^torch=='", ""), "the Makefile takes torch's pin from constraints.txt"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11"' in pyproject and 'python_version = "3.11"' in pyproject
    assert "Python 3.11" in install and "3.10+" not in readme
    assert "R580" in install, "CUDA 13 wheels need driver R580 or newer"
