"""`bgwatch report` after a real batch, loaded in headless Chromium: every thumbnail must render.

Needs Debian's `chromium` package: installed here with apt-get when running as root and missing;
otherwise the browser test is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bgwatch.samples import write_samples
from tests.helpers import make_config

ROOT = Path(__file__).resolve().parents[1]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is missing and this is not root with apt-get: `apt-get install chromium`")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        pytest.skip(f"could not install Debian's chromium package: {proc.stderr.strip()[-300:]}")
    return found


def bgwatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bgwatch", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def batch(tmp_path: Path):
    """A finished batch: a transparent cut-out (mask kept), a white-background JPEG (opaque), a failed file."""
    config = make_config(tmp_path, {
        "cleanup": {"rules": {"operation": "cleanup", "mode": "transparent"}},
        "white": {"rules": {"operation": "cleanup", "mode": "color", "output": {"format": "jpg"}}}})
    write_samples(config.inboxes[0].path, 1, size=(320, 240), seed=60)
    write_samples(config.inboxes[1].path, 1, size=(240, 320), seed=61)
    (config.inboxes[0].path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    proc = bgwatch("run", "--once", "--no-progress", "-c", str(config.source))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return config


def test_report_is_self_contained_with_one_card_per_run(batch, tmp_path: Path) -> None:
    target = tmp_path / "report" / "batch.html"
    proc = bgwatch("report", "-o", str(target), "-c", str(batch.source))
    assert proc.returncode == 0 and f"{target}: 3 run(s)" in proc.stdout, proc.stderr
    page = target.read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(link.startswith("data:image/jpeg;base64,") for link in links), "no external resource"
    cards = re.findall(r'<article class="run" data-run="(\d+)" data-status="(\w+)"', page)
    assert sorted(status for _, status in cards) == ["done", "done", "failed"]
    assert "broken.jpg" in page and 'class="error"' in page
    assert "cannot be shown (not a readable image)" in page, "the failed original is on disk but is no image"
    transparent = page.split('data-status="done"')[1:]
    assert any('alt="mask"' in card.split("</article>")[0] for card in transparent), "the cut-out's mask is shown"
    assert any("no mask kept (opaque output)" in card.split("</article>")[0] for card in transparent)

    failed_only = bgwatch("report", "-o", str(tmp_path / "failed.html"), "--status", "failed", "-c", str(batch.source))
    assert failed_only.returncode == 0 and ": 1 run(s)" in failed_only.stdout


def test_every_thumbnail_renders_in_headless_chromium(batch, tmp_path: Path) -> None:
    browser = chromium()
    target = tmp_path / "batch.html"
    assert bgwatch("report", "-o", str(target), "-c", str(batch.source)).returncode == 0
    thumbs = target.read_text().count('<img class="thumb"')
    assert thumbs >= 4, "at least the outputs, the cut-out's mask and the failed file's input"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
         target.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:2000]
    rendered = re.search(r'data-rendered="(\d+)"', body.group(1))
    broken = re.search(r'data-broken="(\d+)"', body.group(1))
    assert rendered and broken, f"the page's load script did not run: {body.group(0)}"
    assert int(broken.group(1)) == 0
    assert int(rendered.group(1)) == thumbs
