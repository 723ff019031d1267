"""yamlsafe: hostile YAML is refused quickly, in bounded memory, with a message a user understands."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest

from bgwatch.errors import SpecError
from bgwatch.yamlsafe import load_yaml_file, load_yaml_mapping

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def refused(path: Path, **kwargs: int) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_yaml_file(path, **kwargs)
    assert info.value.source == str(path)
    assert info.value.key == ""
    return info.value


def test_plain_mapping_is_read_and_dates_stay_text(tmp_path: Path) -> None:
    path = write(tmp_path, "photo.yaml", "mode: color\nsteps: 20\nseed: null\n"
                 "gradient: ['#fff', '#000']\noutput: {suffix: 2024-05-01}\nenhance_fg: !!bool true\n")
    assert load_yaml_mapping(path) == {
        "mode": "color", "steps": 20, "seed": None, "gradient": ["#fff", "#000"],
        "output": {"suffix": "2024-05-01"}, "enhance_fg": True,
    }


@pytest.mark.parametrize("content", ["", "# only a comment\n", "---\n", "~\n"])
def test_empty_document_is_an_empty_mapping(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, "photo.yaml", content)
    assert load_yaml_file(path) == {}
    assert load_yaml_mapping(path) == {}


def test_utf8_bom_and_non_ascii_text_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, "photo.yaml", "\ufeffprompt: café on a marble table — soft light\n")
    assert load_yaml_mapping(path) == {"prompt": "café on a marble table — soft light"}


def test_billion_laughs_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    path = write(tmp_path, "bomb.yaml", BILLION_LAUGHS)
    tracemalloc.start()
    try:
        error = refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024
    assert "anchors/aliases" in str(error)
    assert str(error).startswith(f"{path}: uses YAML anchors/aliases (&, *)")
    assert "write the values out" in str(error)


def test_a_lone_alias_or_anchor_is_refused(tmp_path: Path) -> None:
    assert "anchors/aliases" in str(refused(write(tmp_path, "a.yaml", "base: &b {mode: color}\n")))
    assert "anchors/aliases" in str(refused(write(tmp_path, "b.yaml", "x: 1\nmerge: {<<: *b}\n")))


def test_a_one_megabyte_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, "big.yaml", "prompt: " + "x" * (1024 * 1024) + "\n")
    started = time.perf_counter()
    error = refused(path)
    assert time.perf_counter() - started < 1.0
    assert "bytes" in error.problem and str(64 * 1024) in error.problem


def test_max_bytes_is_honoured(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "".join(f"k{i:02}: {i}\n" for i in range(50)))  # 390 bytes
    assert "at most 100" in refused(path, max_bytes=100).problem
    assert len(load_yaml_mapping(path, max_bytes=390)) == 50  # exactly the cap is fine


def test_python_object_tag_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, "evil.yaml", f'x: !!python/object/apply:os.system ["touch {marker}"]\n')
    started = time.perf_counter()
    error = refused(path)
    assert time.perf_counter() - started < 1.0
    assert "!!python/object/apply:os.system" in error.problem
    assert "plain values only" in error.problem
    assert not marker.exists()


@pytest.mark.parametrize("text", ["x: !!binary aGVsbG8=\n", "x: !!set {a, b}\n", "x: !custom 1\n",
                                  "x: !!timestamp 2024-01-01\n"])
def test_other_non_plain_tags_are_refused(tmp_path: Path, text: str) -> None:
    assert "YAML tag" in refused(write(tmp_path, "t.yaml", text)).problem


def test_non_utf8_is_refused(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "latin1.yaml", "prompt: caf\xe9\n".encode("latin-1")))
    assert "not UTF-8" in error.problem
    error = refused(write(tmp_path, "utf16.yaml", "mode: color\n".encode("utf-16")))
    assert "not UTF-8" in error.problem


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "a list"), ("just words\n", "a line of text"),
                                             ("42\n", "int")])
def test_non_mapping_document_is_refused_by_load_yaml_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, "photo.yaml", text)
    assert load_yaml_file(path) is not None
    with pytest.raises(SpecError, match="must be a mapping") as info:
        load_yaml_mapping(path)
    assert kind in info.value.problem


def test_invalid_yaml_names_line_and_column_but_not_the_content(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "bad.yaml", "mode: color\nprompt: [secret-token-123\n"))
    assert "not valid YAML" in error.problem and "line 3" in error.problem
    assert "secret-token-123" not in str(error)


def test_control_characters_are_refused(tmp_path: Path) -> None:
    assert "not valid YAML" in refused(write(tmp_path, "c.yaml", "mode: \x07\n")).problem


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "d.yaml", "mode: color\nsteps: 3\nmode: soften\n"))
    assert "'mode' twice" in error.problem
    # the same key in two different mappings is fine
    assert load_yaml_mapping(write(tmp_path, "e.yaml", "mask: {model: a}\noutput: {suffix: b}\nmodel: c\n"))


def test_several_documents_are_refused(tmp_path: Path) -> None:
    assert "more than one YAML document" in refused(write(tmp_path, "m.yaml", "a: 1\n---\nb: 2\n")).problem


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    started = time.perf_counter()
    error = refused(write(tmp_path, "deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert time.perf_counter() - started < 1.0
    assert "nested more than" in error.problem


def test_missing_file_directory_and_fifo_are_refused(tmp_path: Path) -> None:
    assert "no such file" in refused(tmp_path / "nope.yaml").problem
    (tmp_path / "dir.yaml").mkdir()
    assert "not a regular file" in refused(tmp_path / "dir.yaml").problem
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.yaml"
        os.mkfifo(fifo)
        started = time.perf_counter()
        assert "not a regular file" in refused(fifo).problem
        assert time.perf_counter() - started < 1.0
