"""Plain Numba kernels for the csr and nm formats (filled in below)."""

from __future__ import annotations


def bind(kernel):
    return None
