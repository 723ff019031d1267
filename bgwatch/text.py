"""Names and messages made safe to print: a file name is anyone's text on a shared drive.

Control characters (ESC sequences, newlines that would forge a log line, U+202E that reverses what
follows) are shown escaped, and bytes that are not UTF-8 (kept by Python as surrogate escapes) as \\xNN,
so a name prints on one line, as what it is, and can be stored in SQLite.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path


def shown(text: str, *, newlines: bool = False) -> str:
    """`text` with control and format characters escaped (newlines kept when `newlines`)."""
    if text.isprintable() and not _has_surrogates(text):
        return text
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if newlines and ch == "\n":
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") or not ch.isprintable():
            out.append(repr(ch)[1:-1] if code < 0x10000 and ch in "\t\n\r" else f"\\u{code:04x}" if code > 0xFF
                       else f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _has_surrogates(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


SECRET_RUN = 8  # a run this long of a secret's characters is taken as (a part of) it: shorter ones are words


def redacted(text: str, secret: str, mask: str = "***") -> str:
    """`text` with the secret, and every run of SECRET_RUN or more of its consecutive characters (a server
    that quotes part of it, a cut copy), replaced by `mask`. Call it before a text is cut to length: a cut
    made first can leave most of the secret just past where the redaction looks."""
    if not secret or not text:
        return text
    covered = bytearray(len(text))
    run = min(SECRET_RUN, len(secret))
    for start in range(len(secret) - run + 1):
        piece = secret[start : start + run]
        found = text.find(piece)
        while found != -1:
            covered[found : found + run] = b"\x01" * run
            found = text.find(piece, found + 1)
    if not any(covered):
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        if covered[i]:
            while i < len(text) and covered[i]:
                i += 1
            out.append(mask)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def on_share(text: str, inbox: str | Path) -> str:
    """`text` for a note that goes to the share: a path inside `inbox` is written relative to it (a claimed
    file's as it was dropped), so no path on the server reaches the people who read the note."""
    out = text
    for root in dict.fromkeys((str(inbox).rstrip("/"), os.path.abspath(inbox))):
        if root:
            work = r"(?:\.bgwatch/claimed/[^/\s]+/|\.bgwatch/delivering/[^/\s]+/[^/\s]+/)?"
            out = re.sub(re.escape(root + "/") + work, "", out)
    return out
