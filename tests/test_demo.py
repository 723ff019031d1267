"""`make demo`'s job: the shipped config.yaml, as is, on generated shots, with no model weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_the_shipped_config_end_to_end(tmp_path: Path) -> None:
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "U2NET_HOME": str(tmp_path / "no-weights")}
    proc = subprocess.run([sys.executable, "-m", "bgwatch.demo", "config.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "7 file(s): 7 ok, 0 failed" in proc.stdout
    # What the demo prints is bgwatch's: no library warning dumps (watchdog's RuntimeWarning), no tracebacks.
    assert "Warning" not in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    modes = {"cleanup": "RGBA", "white": "RGB", "soften": "RGB", "gradient": "RGB"}
    for box, mode in modes.items():
        outputs = sorted((tmp_path / "outbox" / box).iterdir())
        assert outputs, f"nothing in outbox/{box}"
        with Image.open(outputs[0]) as img:
            assert img.mode == mode and img.size == (1024, 1024)
    with Image.open(next((tmp_path / "outbox" / "white").iterdir())) as img:
        assert img.format == "JPEG" and img.getpixel((5, 5)) == (255, 255, 255)
    assert "classical" in proc.stdout, "with no weights, auto falls back to the classical engine"
