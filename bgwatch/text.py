"""Names and messages made safe to print: a file name is anyone's text on a shared drive.

Control characters (ESC sequences, newlines that would forge a log line, U+202E that reverses what
follows) are shown escaped, and bytes that are not UTF-8 (kept by Python as surrogate escapes) as \\xNN,
so a name prints on one line, as what it is, and can be stored in SQLite.
"""

from __future__ import annotations

import unicodedata


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
