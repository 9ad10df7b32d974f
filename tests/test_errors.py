"""first_line: an exception quoted inside a one-line error message."""

from __future__ import annotations

from sparsec.errors import first_line


def test_multi_line_message_gives_its_first_line():
    e = RuntimeError("\n  shapes do not match  \n  at layer 3\n")
    assert first_line(e) == "shapes do not match  "
    assert first_line(ValueError("one line")) == "one line"


def test_empty_message_gives_the_type_name_or_the_default():
    for e in (ValueError(""), RuntimeError(" \n\t "), OSError()):
        assert first_line(e) == type(e).__name__
        assert first_line(e, default="") == ""
        assert first_line(e, default="?") == "?"


def test_exception_without_args():
    assert str(RuntimeError()) == ""
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(RuntimeError(), default="") == ""


def test_non_string_args_and_limit():
    assert first_line(KeyError("model.layers.0")) == "'model.layers.0'"
    assert first_line(OSError(2, "No such file")) == "[Errno 2] No such file"
    assert first_line(RuntimeError("x" * 500 + "\nmore"), limit=200) == "x" * 200
    assert first_line(RuntimeError(), limit=3) == "Run"
