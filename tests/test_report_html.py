"""`bgwatch report` after a real batch, loaded in headless Chromium: every thumbnail must render.

Needs Debian's `chromium` package: installed here with apt-get when running as root and missing;
otherwise the browser test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bgwatch.samples import write_samples
from tests.helpers import chromium, make_config

ROOT = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- hostile share content (issue 20, item 6)

LINK = """
import os, sys
os.symlink(sys.argv[1], sys.argv[2])
"""


def test_the_report_follows_no_link_in_done_failed_or_the_outbox() -> None:
    from bgwatch.htmlreport import render
    from tests.unprivileged import as_nobody, open_to_all, shared_root

    with shared_root() as share:
        inbox, outbox, private = share / "inbox", share / "outbox", share / "private"
        [secret] = write_samples(private, 1, size=(96, 72), seed=62)
        (private / "secret.png").write_bytes(secret.read_bytes())  # content sniffed, not the name: still shown
        write_samples(private / "album", 1, size=(96, 72), seed=63)[0].rename(private / "album" / "photo.jpg")
        private.chmod(0o700)  # another share user cannot read any of it
        [own] = write_samples(inbox / "done", 2, size=(96, 72), seed=64)[:1]
        for folder in (inbox / "done", inbox / "failed", outbox):
            folder.mkdir(parents=True, exist_ok=True)
            open_to_all(folder)
        plants = {inbox / "done" / "photo.jpg": secret, inbox / "failed" / "album": private / "album",
                  outbox / "photo.png": private / "secret.png"}
        for link, target in plants.items():
            proc = as_nobody(LINK, str(target), str(link))
            assert proc.returncode == 0, proc.stderr
        rows = [
            {"id": 1, "status": "done", "inbox": str(inbox), "rel_path": "photo.jpg",
             "spec_json": '{"preset": "amazon"}', "source_path": str(inbox / "done" / "photo.jpg"),
             "output_path": str(outbox / "photo.png")},
            {"id": 2, "status": "failed", "inbox": str(inbox), "rel_path": "album/photo.jpg",
             "source_path": str(inbox / "failed" / "album" / "photo.jpg"), "error": "damaged"},
            {"id": 3, "status": "done", "inbox": str(inbox), "rel_path": own.name, "source_path": str(own),
             "output_path": str(own)},
        ]
        page = render(rows, roots=[inbox, outbox])
    cards = page.split("<article")[1:]
    assert len(cards) == 3
    for card in cards[:2]:
        assert "data:image" not in card and "symbolic link" in card, card
    assert "the folder &#x27;album&#x27; is a symbolic link" in cards[1]
    assert 'data-compliance="not"' in cards[0] and "96x72" not in cards[0], "the compliance marks read no link"
    assert cards[2].count("data:image/jpeg") == 2, "a real file is still shown"


def test_the_page_loads_nothing_and_prints_nothing_unbounded(tmp_path: Path) -> None:
    import base64
    import hashlib

    from bgwatch.htmlreport import render
    from tests.test_decode_fuzz import scan_bomb

    bomb = tmp_path / "failed" / "bomb.jpg"
    bomb.parent.mkdir()
    bomb.write_bytes(scan_bomb(20_000))
    huge = "x" * 60_000
    rows = [{"id": 1, "status": "failed", "inbox": str(tmp_path), "rel_path": f"evil\x1b[2J\n{huge}.jpg",
             "source_path": str(bomb), "error": f"<script>alert(1)</script> {huge}", "mask_engine": huge,
             "timings_json": json.dumps({huge: 1.0})}]
    page = render(rows, title=huge)
    assert len(page) < 30_000, "a 60 KB value is cut, not printed whole"
    assert "more characters" in page and "<script>alert" not in page and "\x1b" not in page and "\\x1b[2J" in page
    assert "cannot be shown (not a readable image)" in page, "the scan bomb is refused, not decoded"
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert csp and page.index(csp.group(0)) < page.index("<script>"), "the policy comes before the script"
    policy = dict(part.strip().split(" ", 1) for part in csp.group(1).split(";"))
    assert policy["default-src"] == "'none'" and policy["img-src"] == "data:"
    assert policy["style-src"] == "'unsafe-inline'"
    script = re.search(r"<script>(.*?)</script>", page, re.S)
    assert script is not None
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
    assert policy["script-src"] == f"'sha256-{digest}'", "the one inline script is allowed by its hash only"
