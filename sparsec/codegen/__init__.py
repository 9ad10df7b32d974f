"""Code generation: packed weights to kernels (``cpu``: Numba/llvmlite, ``cuda``: numba-cuda).

Depends on :mod:`sparsec.formats` only; the runtime picks kernels from here.
"""
