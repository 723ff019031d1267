"""Each subcommand through a real `python -m bgwatch` process: exit codes, output, logs."""

from __future__ import annotations

import itertools
import json
import os
import shutil
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

    # A folder: its images, each with its own line; the broken one fails without stopping the others.
    (tmp_path / "loose" / "notes.txt").write_text("not an image")
    folder_out = tmp_path / "from-folder"
    proc = bgwatch("process", str(tmp_path / "loose") + "/", "-c", str(config.source), "-o", str(folder_out),
                   "--set", "mask.engine=classical")
    assert proc.returncode == 1 and "2 file(s): 1 ok, 1 failed" in proc.stdout, proc.stdout + proc.stderr
    assert (folder_out / f"{shot.stem}.png").is_file() and "broken.jpg" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = bgwatch("process", str(tmp_path / "empty"), "-c", str(config.source))
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert "empty: a folder with no images" in proc.stderr and ".jpg" in proc.stderr and "Traceback" not in proc.stderr


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

    before = {r["id"]: r for r in json.loads(bgwatch("history", "--json", "-c", str(config.source)).stdout)}
    retry = bgwatch("retry", "--failed", "-c", str(config.source))
    assert retry.returncode == 0 and (inbox / "zero.jpg").exists()
    after = {r["id"]: r for r in json.loads(bgwatch("history", "--json", "-c", str(config.source)).stdout)}
    [failed] = [i for i, r in before.items() if r["status"] == "failed"]
    assert after[failed]["error"] == before[failed]["error"] + " [retried]"
    for key in ("started_at", "finished_at", "duration_seconds", "timings", "mask_engine"):
        assert after[failed][key] == before[failed][key], f"retry rewrote the run's {key}"


def test_run_once_shows_a_long_error_whole(config) -> None:
    """The table keeps its columns; a failure's whole error follows its row, wrapped."""
    (config.inboxes[0].path / "notes.jpg").write_text("a text file saved with the wrong name, not a photo\n" * 3)
    proc = bgwatch("run", "--once", "--no-progress", "-c", str(config.source), env={"COLUMNS": "100"})
    assert proc.returncode == 1
    [row] = json.loads(bgwatch("history", "--json", "-c", str(config.source)).stdout)
    error = row["error"]
    assert len(error) > 60
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "notes.jpg" in line and "failed" in line)
    follow = list(itertools.takewhile(lambda line: line.startswith("    "), lines[at + 1:]))
    assert follow and all(len(line) <= 100 for line in follow)
    assert "".join(" ".join(follow).split()) == "".join(error.split()), "the whole error, nothing cut"


def test_run_once_says_when_an_inbox_is_missing(config) -> None:
    """An unmounted share is not an empty inbox: it is named, and with no inbox there at all, exit 1."""
    cleanup, replace = (ib.path for ib in config.inboxes)
    replace.rmdir()
    some = bgwatch("run", "--once", "--no-progress", "-c", str(config.source))
    assert some.returncode == 0, some.stderr
    assert f"inbox {replace} is missing" in some.stderr and str(cleanup) not in some.stderr
    shutil.rmtree(cleanup)  # with the .bgwatch/ work folder the first run made
    none = bgwatch("run", "--once", "--no-progress", "-c", str(config.source))
    assert none.returncode == 1, "a cron job learns that nothing could be looked at"
    assert "nothing done" in none.stdout and "the inboxes are empty" not in none.stdout
    assert f"inbox {cleanup} is missing" in none.stderr and "Traceback" not in none.stderr


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


def test_commands_for_scripts_json_iso_times_filters(tmp_path: Path, config) -> None:
    from datetime import datetime

    inbox = config.inboxes[0].path
    write_samples(inbox, 1, size=(120, 90), seed=42)
    (inbox / "zero.jpg").write_bytes(b"")
    assert bgwatch("run", "--once", "--no-progress", "-c", str(config.source)).returncode == 1

    rows = json.loads(bgwatch("history", "--json", "-c", str(config.source)).stdout)
    assert {r["status"] for r in rows} == {"done", "failed"}
    for row in rows:
        assert not any(k.endswith("_json") for k in row), "no JSON inside JSON"
        created = datetime.fromisoformat(row["created_at"])
        assert created.tzinfo is not None, "ISO times carry their offset"
        assert isinstance(row["spec"], dict) and row["spec"]["operation"] == "cleanup"
    [done] = [r for r in rows if r["status"] == "done"]
    assert done["duration_seconds"] >= 0 and isinstance(done["timings"], dict)
    assert datetime.fromisoformat(done["finished_at"]) >= datetime.fromisoformat(done["started_at"])

    since = bgwatch("history", "--json", "--since", "1h", "--inbox", "cleanup", "-c", str(config.source))
    assert len(json.loads(since.stdout)) == 2
    assert json.loads(bgwatch("history", "--json", "--since", "2999-01-01", "-c", str(config.source)).stdout) == []
    assert json.loads(bgwatch("history", "--json", "--inbox", "replace", "-c", str(config.source)).stdout) == []
    unknown = bgwatch("history", "--inbox", "nope", "-c", str(config.source))
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1 and "cleanup" in unknown.stderr
    table = bgwatch("history", "-c", str(config.source)).stdout.splitlines()
    assert "created" in table[0] and "took" in table[0]
    assert any(line.split()[1] == "done" and line.split()[4].endswith("s") for line in table[1:])

    before = bgwatch("-c", str(config.source), "status", "--json")
    after = bgwatch("status", "--json", "-c", str(config.source))
    assert before.returncode == after.returncode == 0 and json.loads(before.stdout) == json.loads(after.stdout)
    status = json.loads(before.stdout)
    assert status["running"] is False and status["runs"] == {"done": 1, "failed": 1}
    assert status["state_dir"] == str(config.state_dir)
    assert [i["waiting"] for i in status["inboxes"]] == [0, 0]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_env = bgwatch("status", "--json", cwd=elsewhere, env={"BGWATCH_CONFIG": str(config.source)})
    assert json.loads(by_env.stdout)["runs"] == {"done": 1, "failed": 1}, "BGWATCH_CONFIG, not ./state"
    if not Path("/etc/bgwatch/config.yaml").exists():
        env = {k: v for k, v in os.environ.items() if k != "BGWATCH_CONFIG"}
        none = subprocess.run([sys.executable, "-m", "bgwatch", "status"], capture_output=True, text=True,
                              cwd=elsewhere, env={**env, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert none.returncode == 2 and "no configuration found" in none.stderr
        assert not (elsewhere / "state").exists()

    retry = bgwatch("retry", "abc", "-c", str(config.source))
    assert retry.returncode == 2 and retry.stderr.strip().splitlines() == [
        "bgwatch: retry: RUN_ID: 'abc' is not a run id (allowed: whole numbers from `bgwatch history`)"]

    replace = config.inboxes[1].path
    image = write_samples(replace, 1, size=(64, 64), seed=3)[0]
    explained = json.loads(bgwatch("explain", "--json", str(image), "-c", str(config.source)).stdout)
    by_key = {e["key"]: e for e in explained}
    assert by_key["steps"]["value"] == 30 and "inboxes[1].rules" in by_key["steps"]["source"]
    assert json.loads(bgwatch("cache", "ls", "--json", "-c", str(config.source)).stdout) == []
    models = json.loads(bgwatch("models", "ls", "--json", "-c", str(config.source),
                                env={"U2NET_HOME": str(tmp_path / "m")}).stdout)
    assert [(m["kind"], m["name"], m["present"], m["bytes"]) for m in models] == [
        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", False, None)], "the classical mask needs no weights"


def test_status_watch_prints_until_interrupted(config) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bgwatch", "status", "--watch", "--json", "--interval", "0.2",
                             "-c", str(config.source)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(2)  # ^C
        proc.communicate(timeout=30)
    assert first["state_dir"] == second["state_dir"] == str(config.state_dir)
    assert proc.returncode == 130
