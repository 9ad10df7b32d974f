"""Textual pass pipelines, MLIR style: parse and print, both ways.

Grammar (whitespace between tokens is ignored)::

    pipeline := element ("," element)*
    element  := NAME ("{" option ("," option)* "}")?
    option   := NAME "=" value
    value    := BARE | '"' chars with \\" and \\\\ escapes '"'

``NAME`` is kebab-case (``[a-z0-9-_]+``). An element names a registered pass or a registered
named pipeline (which expands to its own text and takes no options).

Round trip: ``Pipeline.parse(text).to_text() == text`` for canonical text (no spaces, values as
:func:`~sparsec.passes.base.format_option_value` prints them), and
``Pipeline.parse(p.to_text())`` rebuilds an equal pipeline for any ``p``.

    >>> Pipeline.parse("prune-magnitude{sparsity=0.75},lower-cpu").to_text()
    'prune-magnitude{sparsity=0.75},lower-cpu'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sparsec.passes.base import (
    Pass,
    PassOptionError,
    make_pass,
    parse_option_value,
    pass_class,
    registered_passes,
    suggest,
)


class PipelineSyntaxError(ValueError):
    """Bad pipeline text. ``str()`` is one line; :meth:`pretty` adds the text and a caret."""

    def __init__(self, message: str, text: str, position: int) -> None:
        self.message, self.text, self.position = message, text, position
        super().__init__(f"bad pipeline at column {position + 1}: {message}")

    def pretty(self) -> str:
        return f"{self}\n  {self.text}\n  {' ' * self.position}^"


_PIPELINES: dict[str, Callable[[], str]] = {}
_PIPELINE_DOCS: dict[str, str] = {}


def register_pipeline(name: str, doc: str = "") -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register a named pipeline: a function returning pipeline text. Names are unique."""

    def decorate(fn: Callable[[], str]) -> Callable[[], str]:
        if name in _PIPELINES:
            raise ValueError(f"pipeline name {name!r} is already registered")
        _PIPELINES[name] = fn
        fn_doc = (fn.__doc__ or "").strip()
        _PIPELINE_DOCS[name] = doc or (fn_doc.splitlines()[0] if fn_doc else "")
        return fn

    return decorate


def registered_pipelines() -> dict[str, str]:
    """``{name: expanded text}`` of every named pipeline."""
    return {name: fn() for name, fn in sorted(_PIPELINES.items())}


def pipeline_doc(name: str) -> str:
    return _PIPELINE_DOCS.get(name, "")


@dataclass
class Pipeline:
    """An ordered list of configured passes."""

    passes: list[Pass]

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        """Parse pipeline text; raises :class:`PipelineSyntaxError` pointing at the bad column."""
        return cls(_Parser(text).parse())

    def to_text(self, full: bool = False) -> str:
        return ",".join(p.to_text(full=full) for p in self.passes)

    def __str__(self) -> str:
        return self.to_text()

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and [(p.name, p.options()) for p in self.passes] == [
            (p.name, p.options()) for p in other.passes
        ]


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")
_BARE_STOP = set(',{}="\' \t\n')


class _Parser:
    def __init__(self, text: str, depth: int = 0) -> None:
        self.text, self.i, self.depth = text, 0, depth

    def error(self, message: str, position: int | None = None) -> PipelineSyntaxError:
        return PipelineSyntaxError(message, self.text, self.i if position is None else position)

    def skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, ch: str, what: str) -> None:
        if self.peek() != ch:
            found = repr(self.text[self.i]) if self.i < len(self.text) else "end of text"
            raise self.error(f"expected {ch!r} {what}, found {found}")
        self.i += 1

    def name(self, what: str) -> tuple[str, int]:
        self.skip_ws()
        start = self.i
        while self.i < len(self.text) and self.text[self.i] in _NAME_CHARS:
            self.i += 1
        if self.i == start:
            found = repr(self.text[self.i]) if self.i < len(self.text) else "end of text"
            raise self.error(f"expected {what}, found {found}")
        return self.text[start:self.i], start

    def value(self) -> tuple[str, bool, int]:
        self.skip_ws()
        start = self.i
        if self.peek() == '"':
            self.i += 1
            out = []
            while self.i < len(self.text) and self.text[self.i] != '"':
                if self.text[self.i] == "\\" and self.i + 1 < len(self.text):
                    self.i += 1
                out.append(self.text[self.i])
                self.i += 1
            if self.i >= len(self.text):
                raise self.error("unterminated quoted value", start)
            self.i += 1
            return "".join(out), True, start
        while self.i < len(self.text) and self.text[self.i] not in _BARE_STOP:
            self.i += 1
        if self.i == start:
            raise self.error("expected a value after '='")
        return self.text[start:self.i], False, start

    def parse(self) -> list[Pass]:
        if not self.text.strip():
            raise self.error("empty pipeline; give at least one pass, e.g. 'prune-magnitude{sparsity=0.5}'")
        passes = self.element()
        while self.peek() == ",":
            self.i += 1
            passes += self.element()
        if self.peek():
            raise self.error(f"unexpected {self.text[self.i]!r}; separate passes with ','")
        return passes

    def element(self) -> list[Pass]:
        name, start = self.name("a pass name")
        if name in _PIPELINES and name not in registered_passes():
            if self.peek() == "{":
                raise self.error(f"named pipeline {name!r} takes no options")
            if self.depth > 8:
                raise self.error(f"named pipeline {name!r} expands into itself", start)
            return _Parser(_PIPELINES[name](), self.depth + 1).parse()
        try:
            cls = pass_class(name)
        except PassOptionError:
            known = list(registered_passes()) + list(_PIPELINES)
            raise self.error(f"unknown pass {name!r}{suggest(name, known)}", start) from None
        options: dict[str, object] = {}
        if self.peek() == "{":
            self.i += 1
            types = cls.option_types()
            while True:
                key, kstart = self.name(f"an option name of {name}")
                if key not in types:
                    listing = ", ".join(types) or "(none)"
                    raise self.error(f"{name} has no option {key!r}{suggest(key, types)}; options: {listing}",
                                     kstart)
                if key in options:
                    raise self.error(f"option {key!r} given twice", kstart)
                self.expect("=", f"after option name {key!r}")
                raw, quoted, vstart = self.value()
                try:
                    options[key] = parse_option_value(cls, key, raw, quoted)
                except PassOptionError as e:
                    raise self.error(str(e), vstart) from None
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.expect("}", f"to close the options of {name}")
                break
        try:
            return [make_pass(name, **options)]
        except PassOptionError as e:
            raise self.error(str(e), start) from None
