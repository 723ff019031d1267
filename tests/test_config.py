from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bgwatch.config import Config, load_config, parse_config
from bgwatch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_sample_config_parses_and_documents_every_setting() -> None:
    config = load_config(ROOT / "config.yaml", env={})
    assert config.device == "auto"
    assert config.limits.generations_per_minute == 10
    assert config.limits.max_pixels == 100_000_000
    assert config.watch.settle_seconds == 2.0
    assert [ib.path.name for ib in config.inboxes][:2] == ["cleanup", "white"]
    assert config.inboxes[0].rules["mode"] == "transparent"
    assert config.state_dir == ROOT / "state"
    text = (ROOT / "config.yaml").read_text()
    defaults = Config()
    for section in ("limits", "watch", "pipeline", "sdxl", "runway", "cache", "metrics"):
        for name in getattr(defaults, section).__dataclass_fields__:
            if name == "api_key":
                continue  # secrets belong in the environment, not in a sample on a share
            assert f"{name}:" in text, f"config.yaml does not document {section}.{name}"


def test_environment_overrides_of_the_original_service(tmp_path: Path) -> None:
    data = {"inboxes": [{"path": "in", "outbox": "out"}]}
    env = {"DEVICE": "cpu", "BG_REQS_PER_MIN": "3", "ALLOW_4K": "1", "DEBUG": "1", "BG_ENGINE": "gradient",
           "MODEL_ID": "stabilityai/sdxl-turbo", "OUTPUT_DIR": str(tmp_path / "elsewhere"),
           "RUNWAY_API_KEY": "sekret-123"}
    config = parse_config(data, tmp_path / "config.yaml", env=env)
    assert config.device == "cpu"
    assert config.limits.generations_per_minute == 3.0
    assert config.limits.allow_4k is True
    assert config.debug is True
    assert config.defaults["engine"] == "gradient"
    assert config.defaults["model"] == "stabilityai/sdxl-turbo"
    assert config.inboxes[0].outbox == tmp_path / "elsewhere" / "in"
    assert config.runway.key() == "sekret-123"
    assert "sekret" not in repr(config), "the Runway key must never appear in a repr (or a log)"


@pytest.mark.parametrize(
    ("data", "env", "expected"),
    [
        ({"device": "gpu"}, {}, "device: 'gpu' is not allowed (allowed: auto, cuda, cpu)"),
        ({"limits": {"jobs_per_minute": -1}}, {}, "limits.jobs_per_minute: must be >= 0"),
        ({"limits": {"allow_4k": "yes"}}, {}, "limits.allow_4k: must be true or false"),
        ({"watch": {"setle_seconds": 1}}, {}, "watch.setle_seconds: unknown key; did you mean 'settle_seconds'?"),
        ({"inboxes": [{"path": "in"}]}, {}, "inboxes[0].outbox: every inbox needs an outbox"),
        ({"inboxes": [{"path": "in", "outbox": "in/out"}]}, {}, "must not be inside its inbox"),
        ({"inboxes": [{"path": "in", "outbox": "o", "on_success": "archive"}]}, {},
         "inboxes[0].on_success: 'archive' is not allowed (allowed: move, delete, keep)"),
        ({}, {"DEVICE": "tpu"}, "DEVICE: 'tpu' is not allowed"),
        ({"metrics": {"listen": "9464"}}, {}, "metrics.listen: '9464' is not host:port"),
        ({}, {"BG_REQS_PER_MIN": "ten"}, "BG_REQS_PER_MIN: 'ten' is not a number"),
    ],
)
def test_invalid_config_names_file_key_and_what_is_allowed(tmp_path: Path, data: dict, env: dict,
                                                           expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path / "config.yaml", env=env)
    assert expected in str(info.value)


def test_cli_reports_a_bad_config_in_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("device: gpu\ninboxes: []\n")
    proc = subprocess.run([sys.executable, "-m", "bgwatch", "status", "-c", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"bgwatch: {bad}: device: 'gpu' is not allowed (allowed: auto, cuda, cpu)"]


def test_an_outbox_inside_any_inbox_is_refused_also_through_output_dir(tmp_path: Path) -> None:
    two = {"inboxes": [{"path": "in/a", "outbox": "out/a"}, {"path": "in/b", "outbox": "in/a/results"}]}
    with pytest.raises(ConfigError, match=r"inboxes\[1\].outbox: must not be inside inboxes\[0\]"):
        parse_config(two, tmp_path / "config.yaml", env={})
    # OUTPUT_DIR=<an inbox> would make every outbox <inbox>/<name>: white/white/white/... without end
    one = {"inboxes": [{"path": "white", "outbox": "out"}]}
    with pytest.raises(ConfigError, match=r"environment OUTPUT_DIR=.*must not be inside its inbox"):
        parse_config(one, tmp_path / "config.yaml", env={"OUTPUT_DIR": str(tmp_path / "white")})
