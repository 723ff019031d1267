"""Logging in real processes: journald priority prefixes, stdlib libraries routed into loguru, DEBUG=1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, tmp_path: Path, *, journal: bool, debug: bool = False) -> tuple[str, str]:
    """Run `code` after setup_logging in a fresh interpreter whose stderr is a file; JOURNAL_STREAM names
    that file (as systemd does for StandardError=journal) when `journal`. Returns (stderr, app.log)."""
    stderr_path = tmp_path / "stderr.txt"
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from bgwatch.logs import setup_logging
        setup_logging(Path(sys.argv[1]), debug=sys.argv[2] == "1")
        from loguru import logger
    """) + textwrap.dedent(code)
    with stderr_path.open("w") as stderr:
        info = os.fstat(stderr.fileno())
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        else:
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino + 1}"  # some other file: not the journal
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "logs"), "1" if debug else "0"],
                       stderr=stderr, env=env, check=True, timeout=120)
    app_log = tmp_path / "logs" / "app.log"
    return stderr_path.read_text(), app_log.read_text() if app_log.exists() else ""


def test_journald_priority_prefixes_on_every_line(tmp_path: Path) -> None:
    err, _ = run_python("""
        logger.info("queued photo.jpg")
        logger.warning("inbox missing")
        try:
            1 / 0
        except ZeroDivisionError:
            logger.exception("device worker crashed")
        logger.debug("hidden at INFO")
    """, tmp_path, journal=True)
    lines = err.splitlines()
    assert lines[0] == "<6>queued photo.jpg", "no timestamp: journald stamps its own"
    assert lines[1] == "<4>inbox missing"
    assert lines[2] == "<3>device worker crashed"
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[3:]), "the traceback is priority err too"
    assert any("ZeroDivisionError" in line for line in lines[3:])
    assert "hidden at INFO" not in err


def test_plain_console_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    err, _ = run_python('logger.warning("inbox missing")', tmp_path, journal=False)
    [line] = err.splitlines()
    assert not line.startswith("<") and "WARNING" in line and line.endswith("inbox missing")


def test_stdlib_and_library_loggers_reach_loguru_once(tmp_path: Path) -> None:
    err, app_log = run_python("""
        import logging
        logging.getLogger("watchdog.observers.inotify").error(
            "InotifyEmitter.queue_events() called when the thread is inactive")
        logging.getLogger("onnxruntime").warning("ort says %s", "hello")
        # imported after the set-up, as the engines do: their own stderr handler is taken away
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.get_logger("huggingface_hub.file_download").warning("hub says hello")
        from transformers.utils import logging as tf_logging
        tf_logging.get_logger("transformers.modeling_utils").warning("transformers says hello")
    """, tmp_path, journal=True)
    for text in ("ort says hello", "hub says hello", "transformers says hello"):
        assert f"<4>{text}" in err.splitlines(), err
        assert err.count(text) == 1, f"{text!r} printed twice (a library's own handler survived)"
        assert any("WARNING" in line and text in line for line in app_log.splitlines())
    assert "InotifyEmitter" not in err, "known shutdown noise is demoted below INFO"
    error_log = (tmp_path / "logs" / "error.log").read_text()
    assert "InotifyEmitter" not in error_log
    assert any("huggingface_hub" in line and "hub says hello" in line for line in app_log.splitlines())


def test_debug_shows_demoted_noise_library_debug_and_sources(tmp_path: Path) -> None:
    err, app_log = run_python("""
        import logging
        logging.getLogger("watchdog.observers.inotify").error(
            "InotifyEmitter.queue_events() called when the thread is inactive")
        logging.getLogger("bgwatch.test").debug("a library debug line")
        logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR'")
        logger.debug("chose the classical engine")
    """, tmp_path, journal=True, debug=True)
    assert "<7>InotifyEmitter.queue_events() called when the thread is inactive" in err
    assert "<7>a library debug line" in err and "<7>chose the classical engine [__main__:" in err
    assert "STREAM" not in err, "PIL's chunk-by-chunk debug stays quiet"
    assert "chose the classical engine" in app_log


def test_debug_env_through_the_cli(tmp_path: Path) -> None:
    from PIL import Image

    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ndefaults: {{mask: {{engine: classical}}}}\n"
                      f"inboxes: [{{path: {tmp_path / 'in'}, outbox: {tmp_path / 'out'}}}]\n")
    image = tmp_path / "shot.png"
    Image.new("RGB", (64, 48), (240, 240, 240)).save(image)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JOURNAL_STREAM", None)
    quiet = subprocess.run([sys.executable, "-m", "bgwatch", "process", str(image), "-c", str(config), "-o",
                            str(tmp_path / "o1")], capture_output=True, text=True, env={**env, "DEBUG": "0"},
                           timeout=120)
    loud = subprocess.run([sys.executable, "-m", "bgwatch", "process", str(image), "-c", str(config), "-o",
                           str(tmp_path / "o2")], capture_output=True, text=True, env={**env, "DEBUG": "1"},
                          timeout=120)
    assert "DEBUG" not in quiet.stderr
    assert "DEBUG" in loud.stderr and "bgwatch.cli:" in loud.stderr and "configuration" in loud.stderr


def test_library_hints_and_python_warnings_reach_the_log_not_raw_stderr(tmp_path: Path) -> None:
    """transformers' torchvision hint and watchdog's re-registration warning are known noise (DEBUG only);
    other Python warnings are log lines with a priority, never raw stderr."""
    code = """
        import warnings
        from transformers.utils import logging as tf_logging
        tf_logging.get_logger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        warnings.warn_explicit("Callback with id '1' already exists for watch <Watch wd=8>. It will be Overwritten.",
                               RuntimeWarning, "watchdog/observers/inotify.py", 365,
                               module="watchdog.observers.inotify")
        warnings.warn_explicit("a library's own warning", UserWarning, "somelib/core.py", 7, module="somelib.core")
    """
    err, app_log = run_python(code, tmp_path, journal=True)
    assert "torchvision" not in err + app_log and "Callback with id" not in err + app_log
    [line] = [line for line in err.splitlines() if "a library's own warning" in line]
    assert line.startswith("<4>") and "UserWarning" in line, err
    assert "a library's own warning" in app_log
    (tmp_path / "debug").mkdir()
    err, _ = run_python(code, tmp_path / "debug", journal=True, debug=True)
    assert any(line.startswith("<7>") and "requires torchvision" in line for line in err.splitlines()), err
    assert any(line.startswith("<7>") and "Callback with id" in line for line in err.splitlines()), err


def test_loading_an_sdxl_pipeline_draws_no_progress_bars(tiny_sdxl: Path, capfd) -> None:
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars are off in bgwatch."""
    import torch

    from bgwatch.pipeline.sdxl_load import from_pretrained

    capfd.readouterr()
    pipe = from_pretrained(str(tiny_sdxl), torch.float32, fp16_variant=False)
    out, err = capfd.readouterr()
    assert pipe is not None
    assert "Loading" not in out + err and "it/s" not in out + err and "\r" not in out + err, err
