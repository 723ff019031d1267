"""`bgwatch report`: one self-contained HTML page to judge a batch by eye.

A contact sheet: for each run its input, its mask and its output as thumbnails (JPEG, base64 in the page:
the file can be mailed or opened on another machine), with status, engines, times and, for a failed run,
the error. The mask is the output's alpha channel; an opaque output (a colour, a backdrop, a scene) keeps
no mask, and the page says so. Transparent pixels are shown over a checkerboard.

The page carries no external resource. A few lines of inline script count the thumbnails that rendered
and mark any that did not (`data-rendered` / `data-broken` on <body>), for a person and for tests.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

THUMB = 240  # px, the longer side
STATUS_COLOURS = {"done": "#1a7f37", "skipped": "#6e7781", "failed": "#cf222e", "queued": "#9a6700",
                  "running": "#0969da", "superseded": "#6e7781"}

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;background:#f6f8fa;color:#1f2328}
h1{font-size:20px;margin:0 0 4px}.summary{margin:0 0 16px;color:#57606a}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(780px,1fr));gap:16px}
.run{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px}
.run header{display:flex;gap:8px;align-items:baseline;flex-wrap:wrap;margin-bottom:8px}
.badge{color:#fff;border-radius:10px;padding:0 8px;font-size:12px}
.name{font-weight:600;word-break:break-all}.meta{color:#57606a;font-size:12px}
.thumbs{display:flex;gap:8px}.thumbs figure{margin:0;width:240px;text-align:center}
.thumbs img{max-width:240px;max-height:240px;display:block;margin:0 auto;border:1px solid #d0d7de}
.thumbs figcaption{font-size:12px;color:#57606a}
.none{width:240px;height:120px;display:flex;align-items:center;justify-content:center;background:#eaeef2;
color:#57606a;font-size:12px;border:1px dashed #d0d7de}
.error{color:#cf222e;white-space:pre-wrap;margin-top:8px;font-size:13px}
img.broken{outline:3px solid #cf222e}
.compliance{margin-top:8px;font-size:13px}.compliance .pass{color:#1a7f37}.compliance .fail{color:#cf222e}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.querySelectorAll('img.thumb'));
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  broken.forEach(function (img) { img.classList.add('broken'); });
  document.body.dataset.rendered = String(images.length - broken.length);
  document.body.dataset.broken = String(broken.length);
});
"""


def _checkerboard(size: tuple[int, int]) -> Any:
    from PIL import Image, ImageDraw

    board = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(board)
    step = 12
    for y in range(0, size[1], step):
        for x in range((y // step) % 2 * step, size[0], 2 * step):
            draw.rectangle((x, y, x + step - 1, y + step - 1), fill=(214, 214, 214))
    return board


def _data_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnails(path: Path | None) -> tuple[str | None, str | None]:
    """(image, mask) thumbnails of a file as data URIs; the mask only when the file has an alpha channel.
    (None, None) when the file is gone or unreadable: the page says so instead of failing."""
    if path is None or not path.is_file():
        return None, None
    from PIL import Image, ImageOps

    from bgwatch.pipeline.imageio import allowed_formats

    try:  # only the formats bgwatch decodes: a file on a share may be anything (never Ghostscript)
        with Image.open(path, formats=list(allowed_formats())) as opened:
            image = ImageOps.exif_transpose(opened)
            image.thumbnail((THUMB, THUMB))
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, None
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        shown = _checkerboard(rgba.size)
        shown.paste(rgba, mask=rgba.getchannel("A"))
        return _data_uri(shown), _data_uri(rgba.getchannel("A").convert("RGB"))
    return _data_uri(image.convert("RGB")), None


def _figure(uri: str | None, caption: str, missing: str) -> str:
    if uri is None:
        return f'<figure><div class="none">{html.escape(missing)}</div><figcaption>{caption}</figcaption></figure>'
    return f'<figure><img class="thumb" alt="{caption}" src="{uri}"><figcaption>{caption}</figcaption></figure>'


def _when(epoch: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch))) if epoch else ""


def _run_card(row: dict[str, Any], marked: Any = None) -> str:
    status = str(row.get("status", ""))
    source = Path(row["source_path"]) if row.get("source_path") else None
    output = Path(row["output_path"]) if row.get("output_path") else None
    input_uri, _ = thumbnails(source)
    output_uri, mask_uri = thumbnails(output) if status in ("done", "skipped") else (None, None)
    engines = " + ".join(e for e in (row.get("mask_engine"), row.get("bg_engine")) if e) or "—"
    try:
        timings = json.loads(row.get("timings_json") or "{}")
    except ValueError:
        timings = {}
    took = ""
    if row.get("started_at") and row.get("finished_at"):
        took = f"{float(row['finished_at']) - float(row['started_at']):.2f} s"
    stages = ", ".join(f"{k} {float(v):.2f} s" for k, v in timings.items())
    inbox = str(row.get("inbox", "")).rstrip("/").rsplit("/", 1)[-1]
    colour = STATUS_COLOURS.get(status, "#57606a")
    parts = [
        f'<article class="run" data-run="{row.get("id")}" data-status="{html.escape(status)}">',
        f'<header><span class="badge" style="background:{colour}">{html.escape(status)}</span>'
        f'<span class="name">{html.escape(inbox)}/{html.escape(str(row.get("rel_path", "")))}</span>'
        f'<span class="meta">run {row.get("id")} · {html.escape(engines)} · {_when(row.get("created_at"))}'
        f'{" · " + took if took else ""}</span></header>',
        '<div class="thumbs">',
        _figure(input_uri, "input", "cannot be shown (not a readable image)" if source and source.is_file()
                else "original no longer on disk"),
        _figure(mask_uri, "mask", "no mask kept (opaque output)" if output_uri else "no output"),
        _figure(output_uri, "output", "failed: no output" if status == "failed" else "output no longer on disk"),
        "</div>",
    ]
    if stages:
        parts.append(f'<div class="meta">{html.escape(stages)}</div>')
    if marked is not None:  # compliance.Compliance: the output against its preset
        parts.append(_compliance_html(marked))
    if status == "failed" and row.get("error"):
        parts.append(f'<div class="error">{html.escape(str(row["error"]))}</div>')
    parts.append("</article>")
    return "\n".join(parts)


def _compliance(row: dict[str, Any]) -> Any:
    from bgwatch.compliance import for_run

    return for_run(row)


def _compliance_html(marked: Any) -> str:
    """The output against its preset: one mark a check, each saying what it found."""
    verdict = "meets" if marked.ok else "does NOT meet"
    items = " · ".join(f'<span class="{"pass" if c.ok else "fail"}">{"✓" if c.ok else "✗"} {html.escape(str(c))}</span>'
                       for c in marked.checks)
    return (f'<div class="compliance" data-compliance="{"ok" if marked.ok else "not"}">'
            f"{verdict} preset <b>{html.escape(marked.preset)}</b>: {items}</div>")


def render(rows: Sequence[dict[str, Any]], title: str = "bgwatch batch report") -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row.get("status"))] = counts.get(str(row.get("status")), 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs"
    marked = [_compliance(dict(row)) for row in rows]
    marks = [m for m in marked if m is not None]
    if marks:
        summary += f" · {sum(m.ok for m in marks)} of {len(marks)} output(s) meet their preset"
    cards = "\n".join(_run_card(dict(row), mark) for row, mark in zip(rows, marked, strict=True))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n<script>{SCRIPT}</script></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n"
            f'<p class="summary">{len(rows)} run(s): {html.escape(summary)} · written {_when(time.time())}</p>\n'
            f'<main class="sheet">\n{cards}\n</main></body></html>\n')


def write_report(rows: Sequence[dict[str, Any]], target: Path, title: str = "bgwatch batch report") -> Path:
    from bgwatch import safefs

    target.parent.mkdir(parents=True, exist_ok=True)
    safefs.write_file_atomic(target, render(rows, title).encode("utf-8"))
    return target
