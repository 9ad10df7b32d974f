"""Helpers for sparsec's one-line error messages.

This module imports nothing from the rest of sparsec, so every layer (``ir`` and ``formats``
included) may use it without changing the direction of the package's dependencies.
"""

from __future__ import annotations


def first_line(e: BaseException, default: str | None = None, limit: int | None = None) -> str:
    """The first line of ``str(e)`` once blank space around the whole message is stripped, to
    quote an exception inside a one-line message. ``default`` stands in for an empty message
    (the exception's type name unless given); ``limit`` cuts the line to that many characters."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__ if default is None else default
    return line if limit is None else line[:limit]


__all__ = ["first_line"]
