"""`bgwatch report`: one self-contained HTML page to judge a batch by eye.

A contact sheet: for each run its input, its mask and its output as thumbnails (JPEG, base64 in the page:
the file can be mailed or opened on another machine), with status, engines, times and, for a failed run,
the error. The mask is the output's alpha channel; an opaque output (a colour, a backdrop, a scene) keeps
no mask, and the page says so. Transparent pixels are shown over a checkerboard.

The page carries no external resource. A few lines of inline script count the thumbnails that rendered
and mark any that did not (`data-rendered` / `data-broken` on <body>), for a person and for tests.

Everything on the page came from someone on the share: a Content-Security-Policy lets it load nothing
(images only as data: URIs, the one script by its hash); every printed value is escaped and cut to a
length (a 60 KB name or error cannot flood the page); and a thumbnail is read through descriptors, no
link followed below the configured folders (a link planted in done/, failed/ or an outbox is shown as
such, never what it points to).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bgwatch.text import shown

THUMB = 240  # px, the longer side
NAME_CHARS = 300  # a printed name, engine or timing line is cut to this many characters
ERROR_CHARS = 2000  # a failed run's error
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


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
            "base-uri 'none'; form-action 'none'")


def _text(value: Any, limit: int = NAME_CHARS) -> str:
    """A value from the database (anyone's text) for the page: control characters shown escaped, cut to
    `limit` characters, HTML-escaped."""
    text = shown(str(value))
    if len(text) > limit:
        text = f"{text[: limit - 1]}… ({len(text) - limit + 1} more characters)"
    return html.escape(text)


def trusted_folders(config: Any) -> list[Path]:
    """The folders whose own paths the operator configured (links in them are the operator's): each
    inbox, each outbox and the state folder (HTTP uploads and results). Below them no link is followed."""
    folders = [Path(config.state_dir)]
    for inbox in config.inboxes:
        folders += [Path(inbox.path), Path(inbox.outbox)]
    return folders


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


def thumbnails(path: Path | None, roots: Iterable[Path] = ()) -> tuple[str | None, str | None]:
    """(image, mask) thumbnails of a file as data URIs; the mask only when the file has an alpha channel.
    (None, None) when the file is gone, unreadable or reached through a link: the page says so instead."""
    return _thumbnails(path, roots)[:2]


def _thumbnails(path: Path | None, roots: Iterable[Path]) -> tuple[str | None, str | None, str]:
    """(image, mask, why not shown) for the file at `path`, opened without following a link below the
    deepest of `roots` holding it (below / where none does)."""
    from PIL import Image, ImageOps

    from bgwatch import sharefiles
    from bgwatch.errors import InputError
    from bgwatch.pipeline.imageio import allowed_formats, check_jpeg_scans

    if path is None:
        return None, None, "no longer on disk"
    try:
        fd = sharefiles.open_under(path, roots)
    except sharefiles.RefusedFile as exc:
        return None, None, f"not shown: {exc.what}"
    except FileNotFoundError:
        return None, None, "no longer on disk"
    except (OSError, ValueError):
        return None, None, "cannot be shown (not readable)"
    try:  # only the formats bgwatch decodes: a file on a share may be anything (never Ghostscript)
        with os.fdopen(fd, "rb") as handle, Image.open(handle, formats=list(allowed_formats())) as opened:
            if opened.format == "JPEG":
                check_jpeg_scans(handle, path)  # a scan bomb in failed/ must not stall the report
            image = ImageOps.exif_transpose(opened)
            image.thumbnail((THUMB, THUMB))
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError, InputError):
        return None, None, "cannot be shown (not a readable image)"
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        board = _checkerboard(rgba.size)
        board.paste(rgba, mask=rgba.getchannel("A"))
        return _data_uri(board), _data_uri(rgba.getchannel("A").convert("RGB")), ""
    return _data_uri(image.convert("RGB")), None, ""


def _figure(uri: str | None, caption: str, missing: str) -> str:
    if uri is None:
        return f'<figure><div class="none">{html.escape(missing)}</div><figcaption>{caption}</figcaption></figure>'
    return f'<figure><img class="thumb" alt="{caption}" src="{uri}"><figcaption>{caption}</figcaption></figure>'


def _when(epoch: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch))) if epoch else ""


def _run_card(row: dict[str, Any], marked: Any = None, roots: Sequence[Path] = (), *,
              show_host: bool = False) -> str:
    """One run; `show_host`: the runs came from several hosts (a studio), so each card says which ran it."""
    status = str(row.get("status", ""))
    source = Path(row["source_path"]) if row.get("source_path") else None
    output = Path(row["output_path"]) if row.get("output_path") else None
    input_uri, _, input_missing = _thumbnails(source, roots)
    output_uri, mask_uri, output_missing = (_thumbnails(output, roots) if status in ("done", "skipped")
                                            else (None, None, ""))
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
    run = _text(row.get("id"), 20)
    host = _text(row.get("host") or "?", 64) if show_host else ""
    host_attr = f' data-host="{host}"' if host else ""
    parts = [
        f'<article class="run" data-run="{run}" data-status="{_text(status, 20)}"{host_attr}>',
        f'<header><span class="badge" style="background:{colour}">{_text(status, 20)}</span>'
        f'<span class="name">{_text(inbox)}/{_text(row.get("rel_path", ""))}</span>'
        f'<span class="meta">run {run}{" · host " + host if host else ""} · {_text(engines)} · '
        f'{_when(row.get("created_at"))}'
        f'{" · " + took if took else ""}</span></header>',
        '<div class="thumbs">',
        _figure(input_uri, "input", "original no longer on disk" if input_missing == "no longer on disk"
                else input_missing),
        _figure(mask_uri, "mask", "no mask kept (opaque output)" if output_uri else "no output"),
        _figure(output_uri, "output", "failed: no output" if status == "failed" else
                "output no longer on disk" if output_missing == "no longer on disk" else output_missing),
        "</div>",
    ]
    if stages:
        parts.append(f'<div class="meta">{_text(stages)}</div>')
    if marked is not None:  # compliance.Compliance: the output against its preset
        parts.append(_compliance_html(marked))
    if status == "failed" and row.get("error"):
        parts.append(f'<div class="error">{_text(row["error"], ERROR_CHARS)}</div>')
    parts.append("</article>")
    return "\n".join(parts)


def _compliance(row: dict[str, Any], roots: Sequence[Path]) -> Any:
    from bgwatch.compliance import for_run

    return for_run(row, roots)


def _compliance_html(marked: Any) -> str:
    """The output against its preset: one mark a check, each saying what it found."""
    verdict = "meets" if marked.ok else "does NOT meet"
    items = " · ".join(f'<span class="{"pass" if c.ok else "fail"}">{"✓" if c.ok else "✗"} {_text(c)}</span>'
                       for c in marked.checks)
    return (f'<div class="compliance" data-compliance="{"ok" if marked.ok else "not"}">'
            f"{verdict} preset <b>{_text(marked.preset)}</b>: {items}</div>")


def render(rows: Sequence[dict[str, Any]], title: str = "bgwatch batch report", *,
           roots: Sequence[Path] = (), marked: Sequence[Any] | None = None) -> str:
    """The page; `roots`: the configured folders (trusted_folders) below which no link is followed;
    `marked`: each row's compliance.for_run, when the caller has them already (each output read once)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row.get("status"))] = counts.get(str(row.get("status")), 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs"
    from bgwatch.compliance import tally

    marked = [_compliance(dict(row), roots) for row in rows] if marked is None else marked
    if tally(marked):
        summary += f" · {tally(marked)}"
    # A studio's runs (several hosts in one store) say which host ran each, as `bgwatch history` does.
    hosts = sorted({str(row.get("host") or "?") for row in rows})
    show_host = len(hosts) > 1
    if show_host:
        summary += f" · on {len(hosts)} hosts: {', '.join(hosts)}"
    cards = "\n".join(_run_card(dict(row), mark, roots, show_host=show_host)
                      for row, mark in zip(rows, marked, strict=True))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_csp()}">\n<title>{_text(title)}</title>\n'
            f"<style>{STYLE}</style>\n<script>{SCRIPT}</script></head>\n"
            f"<body><h1>{_text(title)}</h1>\n"
            f'<p class="summary">{len(rows)} run(s): {_text(summary, ERROR_CHARS)} · written {_when(time.time())}</p>\n'
            f'<main class="sheet">\n{cards}\n</main></body></html>\n')


def write_report(rows: Sequence[dict[str, Any]], target: Path, title: str = "bgwatch batch report", *,
                 roots: Sequence[Path] = (), marked: Sequence[Any] | None = None) -> Path:
    from bgwatch import safefs

    target.parent.mkdir(parents=True, exist_ok=True)
    safefs.write_file_atomic(target, render(rows, title, roots=roots, marked=marked).encode("utf-8"))
    return target
