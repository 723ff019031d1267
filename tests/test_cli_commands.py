"""Each subcommand through a real `python -m bgwatch` process: exit codes, output, logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bgwatch.samples import write_samples
from tests.helpers import make_config

ROOT = Path(__file__).resolve().parents[1]


def bgwatch(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bgwatch", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture
def config(tmp_path: Path):
    return make_config(tmp_path, {"cleanup": {"rules": {"operation": "cleanup"}},
                                  "replace": {"rules": {"operation": "replace", "engine": "sdxl",
                                                        "prompt": "oak table", "steps": 30}}})


def test_process_one_file_with_set_overrides(tmp_path: Path, config) -> None:
    [shot] = write_samples(tmp_path / "loose", 1, size=(200, 150), seed=40)
    out = tmp_path / "results"
    proc = bgwatch("process", str(shot), "-c", str(config.source), "-o", str(out), "--set", "mode=color",
                   "--set", "background_color=#00ff00", "--set", "mask.engine=classical")
    assert proc.returncode == 0, proc.stderr
    result = out / f"{shot.stem}.png"
    assert str(result) in proc.stdout and "classical" in proc.stdout
    with Image.open(result) as img:
        assert img.convert("RGB").getpixel((1, 1)) == (0, 255, 0)
    assert shot.exists(), "process leaves the original where it is"

    bad = tmp_path / "loose" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    proc = bgwatch("process", str(bad), "-c", str(config.source), "-o", str(out))
    assert proc.returncode == 1 and proc.stderr.startswith("failed: ") and "broken.jpg" in proc.stderr

    proc = bgwatch("process", str(shot), "-c", str(config.source), "--set", "mode=blurry")
    assert proc.returncode == 1
    assert "mode" in proc.stderr and "blurry" in proc.stderr and "Traceback" not in proc.stderr


def test_run_once_prints_a_table_and_writes_rotating_logs(config) -> None:
    inbox = config.inboxes[0].path
    write_samples(inbox, 1, size=(160, 120), seed=41)
    (inbox / "zero.jpg").write_bytes(b"")
    proc = bgwatch("run", "--once", "--no-progress", "-c", str(config.source))
    assert proc.returncode == 1, "one file failed"
    assert "1 ok, 1 failed" in proc.stdout
    assert "zero.jpg" in proc.stdout and "done" in proc.stdout
    app_log = (config.log_dir / "app.log").read_text()
    error_log = (config.log_dir / "error.log").read_text()
    assert "queued as run" in app_log
    assert "zero.jpg" in error_log and "queued as run" not in error_log

    status = bgwatch("status", "-c", str(config.source))
    assert status.returncode == 0
    assert "not running" in status.stdout and "done 1" in status.stdout and "failed 1" in status.stdout

    history = bgwatch("history", "--json", "--status", "failed", "-c", str(config.source))
    rows = json.loads(history.stdout)
    assert [r["rel_path"] for r in rows] == ["zero.jpg"] and "empty" in rows[0]["error"].lower()
    table = bgwatch("history", "-c", str(config.source))
    assert "zero.jpg" in table.stdout and "done" in table.stdout

    retry = bgwatch("retry", "--failed", "-c", str(config.source))
    assert retry.returncode == 0 and (inbox / "zero.jpg").exists()


def test_validate_and_explain(tmp_path: Path, config) -> None:
    replace = config.inboxes[1].path
    (replace / ".bgwatch.yaml").write_text("steps: 12\n")
    good = replace / "ok.yaml"
    good.write_text("seed: 5\n")
    bad = replace / "bad.yaml"
    bad.write_text("promt: beach\nsteps: 500\n")
    proc = bgwatch("validate", str(config.source), str(good), str(bad))
    assert proc.returncode == 2, "an invalid file is a configuration error (README: exit 2)"
    assert f"{config.source}: OK" in proc.stdout and f"{good}: OK" in proc.stdout
    assert "did you mean 'prompt'" in proc.stdout and "steps" in proc.stdout and "500" in proc.stdout

    image = replace / "ok.jpg"
    write_samples(replace, 1, size=(64, 64), seed=1)[0].rename(image)
    proc = bgwatch("explain", str(image), "-c", str(config.source))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(":")[0]: line for line in proc.stdout.splitlines()}
    assert "ok.yaml" in lines["seed"] and "5" in lines["seed"]
    assert ".bgwatch.yaml" in lines["steps"] and "12" in lines["steps"]
    assert "inboxes[1].rules" in lines["prompt"]
    assert "built-in default" in lines["guidance_scale"]


def test_cache_and_models_commands(config) -> None:
    empty = bgwatch("cache", "ls", "-c", str(config.source))
    assert empty.returncode == 0 and "empty" in empty.stdout
    assert bgwatch("cache", "clear", "-c", str(config.source)).stdout.strip() == "cleared 0 background(s)"
    models = bgwatch("models", "ls", "-c", str(config.source), env={"U2NET_HOME": str(config.state_dir / "m")})
    assert models.returncode == 0
    assert "stabilityai/stable-diffusion-xl-base-1.0" in models.stdout and "missing" in models.stdout
    pull = bgwatch("models", "pull", "-c", str(config.source), env={
        "U2NET_HOME": str(config.state_dir / "m"), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert pull.returncode == 1 and pull.stdout.startswith("bgwatch: ") and "Traceback" not in pull.stdout
