"""Reading YAML that anyone with write access to a share may have written.

Sidecars and folder files come from strangers, so a document is checked as a stream of parser events
before a single Python object is built: anchors and aliases (the billion-laughs bomb), tags other than
the plain standard ones (``!!python/object/apply:os.system``), duplicate keys, deep nesting and several
documents in one file are refused while the parser is still streaming, in bounded memory. Only then is
the (small, plain) document constructed, by yaml's safe loader. The file itself is size-capped with
fstat and a bounded read, and opened so that a FIFO or device dropped in its place cannot hang us.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bgwatch.errors import SpecError

try:  # libyaml's C parser when present: faster, and its parser keeps an explicit stack
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - pyyaml built without libyaml
    # the pure-Python loader stands in for the C one under the same name; mypy sees two classes
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

DEFAULT_MAX_BYTES = 64 * 1024
MAX_DEPTH = 32  # the deepest real bgwatch file (config.yaml: inboxes[].rules.mask) is 4 levels

_STANDARD = "tag:yaml.org,2002:"
_ALLOWED_TAGS = frozenset(_STANDARD + name for name in ("str", "int", "float", "bool", "null", "map", "seq"))


class _Loader(_BaseLoader):
    """Safe loader that leaves dates as text: `suffix: 2024-05-01` is a string in a spec, not a date."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _STANDARD + "timestamp"]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}


def load_yaml_file(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, inside: Path | None = None) -> object:
    """The document in `path` as plain Python data ({} for an empty file); SpecError if it is unsafe.
    `inside`: the file opened must lie in this folder (checked on the open file, not its name: a sidecar
    swapped for a link to a file elsewhere after it was checked is refused, never read).

    Plain data of any shape: text, numbers, true/false, null, lists and mappings; the caller checks it.

    Every error is SpecError(source=path, key="", problem=...) with a message a user can act on.
    """
    path = Path(path)
    text = _read_text(path, max_bytes, inside)
    _check_events(path, text)
    try:
        data: object = yaml.load(text, Loader=_Loader)  # a safe loader; events checked above
    except yaml.YAMLError as exc:
        raise SpecError(path, "", _yaml_problem(exc)) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an integer of 5000 digits
        raise SpecError(path, "", f"holds a value bgwatch cannot read ({type(exc).__name__}); "
                        "numbers must be of ordinary size") from None
    return {} if data is None else data


def load_yaml_mapping(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, inside: Path | None = None
                      ) -> dict[str, Any]:
    """Like load_yaml_file, but the document must be a mapping of keys to values."""
    data = load_yaml_file(path, max_bytes=max_bytes, inside=inside)
    if not isinstance(data, dict):
        raise SpecError(
            path, "", f"must be a mapping of keys to values (like `mode: transparent`), got {_kind(data)}"
        )
    return data


def _read_text(path: Path, max_bytes: int, inside: Path | None = None) -> str:
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise SpecError(path, "", "no such file") from None
    except OSError as exc:
        raise SpecError(path, "", f"cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(before.st_mode):
        raise SpecError(path, "", "is not a regular file")
    if before.st_size > max_bytes:
        raise SpecError(path, "", f"is {before.st_size} bytes; bgwatch reads YAML of at most {max_bytes}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SpecError(path, "", f"cannot read it: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a FIFO or device since the stat
            raise SpecError(path, "", "is not a regular file")
        if inside is not None and not _opened_inside(fd, inside):
            raise SpecError(path, "", "is a link to a file outside the inbox, which bgwatch refuses to read")
        chunks: list[bytes] = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise SpecError(path, "", f"cannot read it: {exc.strerror}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > max_bytes:
        raise SpecError(path, "", f"grew past {max_bytes} bytes while being read; bgwatch reads at most that")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(
            path, "", f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save as UTF-8"
        ) from None


def _opened_inside(fd: int, folder: Path) -> bool:
    """Whether the file open on `fd` lies in `folder` (by the kernel's name for the open file)."""
    try:
        real = Path(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
    except OSError:
        return False
    return Path(os.path.realpath(folder)) in real.parents


@dataclass(slots=True)
class _Frame:
    """One open collection while the parser streams."""

    is_mapping: bool
    expecting_key: bool = True  # in a mapping: the next scalar is a key
    keys: set[str] = field(default_factory=set)  # a mapping's scalar keys seen so far


def _check_events(path: Path, text: str) -> None:
    """Walk the parser's events and refuse what a plain spec never needs, before anything is built."""
    stack: list[_Frame] = []
    documents = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            line = event.start_mark.line + 1 if event.start_mark is not None else 0
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise SpecError(
                    path, "", f"uses YAML anchors/aliases (&, *) at line {line}, which bgwatch refuses; "
                    "write the values out"
                )
            tag = getattr(event, "tag", None)
            if tag is not None and tag not in _ALLOWED_TAGS:
                shown = "!!" + tag[len(_STANDARD):] if tag.startswith(_STANDARD) else tag
                raise SpecError(
                    path, "", f"uses the YAML tag {shown} at line {line}; bgwatch reads plain values only "
                    "(text, numbers, true/false, lists, mappings)"
                )
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise SpecError(path, "", f"holds more than one YAML document (second at line {line})")
                continue
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                stack.pop()
                _value_done(stack)
                continue
            if isinstance(event, yaml.ScalarEvent):
                if stack and stack[-1].is_mapping and stack[-1].expecting_key:
                    frame = stack[-1]
                    if event.value in frame.keys:
                        raise SpecError(path, "", f"has the key {event.value!r} twice (line {line})")
                    frame.keys.add(event.value)
                    frame.expecting_key = False
                else:
                    _value_done(stack)
                continue
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if stack and stack[-1].is_mapping and stack[-1].expecting_key:
                    stack[-1].expecting_key = False  # a complex key: legal YAML, refused by the schema later
                stack.append(_Frame(is_mapping=isinstance(event, yaml.MappingStartEvent)))
                if len(stack) > MAX_DEPTH:
                    raise SpecError(path, "", f"is nested more than {MAX_DEPTH} levels deep (line {line})")
    except yaml.YAMLError as exc:
        raise SpecError(path, "", _yaml_problem(exc)) from None


def _value_done(stack: list[_Frame]) -> None:
    if stack and stack[-1].is_mapping:
        stack[-1].expecting_key = True  # a mapping's value is complete: the next scalar is a key


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # Only the parser's own words and the position: the offending line itself is not echoed, so an
    # error file written next to the image never repeats what the YAML file contained.
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"is not valid YAML: {exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
        return f"is not valid YAML: {exc.reason} (character #x{char:04x} at offset {exc.position})"
    return f"is not valid YAML ({type(exc).__name__})"


def _kind(data: object) -> str:
    if isinstance(data, list):
        return "a list"
    if isinstance(data, str):
        return "a line of text"
    return f"a single {type(data).__name__} value"
