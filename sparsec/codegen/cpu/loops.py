"""Kernels for the ``csr`` and ``nm`` formats: plain Numba loops over the stored values.

These formats are the runners-up of format selection (CSR wins only above ~94% sparsity, N:M
where the model was pruned N:M), so their kernels stay simple: one pass over a row's kept values,
each decoded (float types, int8 per row, int4 per group) and multiplied into ``x^T[col, 0:B]``
(batch rows contiguous, so the inner loop over the batch vectorizes), float64 accumulators in a
per-thread scratch row. Rows are split over threads by kept values, like the bitmask kernels.

Generated per (format, value type) like :mod:`.bitmask`, and cached on disk the same way.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sparsec.codegen.cpu.bitmask import ACT_CODE
from sparsec.codegen.cpu.codecache import generated_module
from sparsec.codegen.cpu.partition import balanced_row_split
from sparsec.codegen.cpu.threads import run_ranges

_DEQ = {
    "fp32": "np.float64(vals[j])",
    "bf16": "np.float64(bf16_to_f32(vals[j]))",
    "fp16": "np.float64(f16_to_f32(vals[j]))",
    "int8": "np.float64(vals[j])",
    "int4": "np.float64((((np.int64(vals[j >> 1]) >> (4 * (j & 1))) & 15) ^ 8) - 8)"
    " * scales[r * gstride + c // gs]",
}

_HEADER = """import numpy as np
from numba import njit
from sparsec.codegen.cpu.simd import bf16_to_f32, f16_to_f32
from sparsec.codegen.cpu.bitmask import act
_JIT = dict(nogil=True, fastmath=True, boundscheck=False, error_model="numpy", cache=True)
"""


def _epilogue(vt: str) -> str:
    scale = " * scales[r]" if vt == "int8" else ""
    return f"""        for b in range(B):
            y[b, r] = act(acc[t, b]{scale} + bias[r], actc)
"""


def csr_source(vt: str) -> str:
    return (
        _HEADER
        + f"""

@njit(**_JIT)
def kernel(r0, r1, t, B, indptr, indices, vals, scales, gstride, gs, xt, bias, actc, y, acc):
    for r in range(r0, r1):
        for b in range(B):
            acc[t, b] = 0.0
        for j in range(np.int64(indptr[r]), np.int64(indptr[r + 1])):
            c = np.int64(indices[j])
            v = {_DEQ[vt]}
            xo = c * B
            for b in range(B):
                acc[t, b] += v * xt[xo + b]
"""
        + _epilogue(vt)
    )


def nm_source(vt: str) -> str:
    return (
        _HEADER
        + f"""

@njit(**_JIT)
def kernel(r0, r1, t, B, n, m, ibits, ibytes, groups, indices, vals, scales, gstride, gs, xt, bias, actc, y,
           acc):
    fmask = (1 << ibits) - 1
    per_row = groups * n
    for r in range(r0, r1):
        for b in range(B):
            acc[t, b] = 0.0
        ib = r * ibytes
        j = r * per_row
        for grp in range(groups):
            for q in range(n):
                bit = (grp * n + q) * ibits
                byte = ib + (bit >> 3)
                word = np.int64(indices[byte])
                if (bit & 7) + ibits > 8:
                    word |= np.int64(indices[byte + 1]) << 8
                c = grp * m + ((word >> (bit & 7)) & fmask)
                v = {_DEQ[vt]}
                xo = c * B
                for b in range(B):
                    acc[t, b] += v * xt[xo + b]
                j += 1
"""
        + _epilogue(vt)
    )


def _values(t: torch.Tensor) -> np.ndarray:
    """A stored values tensor as numpy (bf16/fp16 as their 16-bit patterns: numba reads those)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


class _LoopImpl:
    """A csr or nm layer bound to its generated loop kernel."""

    def __init__(self, k, fmt: str) -> None:
        self.k = k
        p = k.packed
        vt = p.value_type
        self.fmt = fmt
        src = csr_source(vt) if fmt == "csr" else nm_source(vt)
        self.fn = generated_module(f"{fmt}_{vt}", lambda: src).kernel
        self.vals = _values(p.values)
        if self.vals.shape[0] == 0:
            self.vals = np.zeros(1, dtype=self.vals.dtype)
        self.gs = int(getattr(p, "group_size", 1))
        if p.scales is None:
            self.scales, self.gstride = np.ones(1, dtype=np.float32), 1
        else:
            self.scales = np.ascontiguousarray(p.scales.numpy(), dtype=np.float32).reshape(-1)
            self.gstride = p.scales.shape[1] if p.scales.dim() == 2 else 1
        rows, cols = k.rows, k.cols
        threads = k.threads if rows * cols >= k.PARALLEL_MIN_WEIGHTS else 1
        if fmt == "csr":
            self.indptr = p.indptr.numpy()
            self.indices = (
                p.indices.numpy() if p.indices.numel() else np.zeros(1, dtype=p.indices.numpy().dtype)
            )
            counts = np.diff(self.indptr.astype(np.int64))
            self.fixed = (self.indptr, self.indices)
        else:
            from sparsec.formats.nm import index_bits

            ibits = index_bits(p.m)
            ind = p.indices.numpy()
            self.fixed = (p.n, p.m, ibits, ind.shape[1] if ind.ndim == 2 else 0, cols // p.m, ind.reshape(-1))
            if self.fixed[-1].shape[0] == 0:
                self.fixed = self.fixed[:-1] + (np.zeros(1, dtype=np.uint8),)
            counts = np.full(rows, cols // p.m * p.n, dtype=np.int64)
        self.parts = balanced_row_split(counts, min(threads, max(rows, 1)), row_cost=4.0)
        self.density = float(counts.sum()) / max(1, rows * cols)
        self.actc = ACT_CODE[k.activation]
        x = torch.randn(1, cols, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        compiled = bool(self.fn.signatures)
        self(x)
        if not compiled:
            k.compile_seconds += time.perf_counter() - t0

    def describe(self) -> str:
        return f"{self.fmt}-loops"

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        k = self.k
        B = x2.shape[0]
        if B >= k.DENSE_MIN_BATCH or (B > 16 and self.density > 0.45):
            # these scalar loops lose to dense torch on half-dense layers once the batch grows
            return k.dense_linear(x2)
        xt = x2.t().contiguous().reshape(-1).numpy()
        y = torch.empty(B, k.rows, dtype=torch.float32)
        acc = np.zeros((len(self.parts) - 1, B), dtype=np.float64)
        args = (B,) + self.fixed + (self.vals, self.scales, self.gstride, self.gs, xt, k._bias_np, self.actc)
        run_ranges(self.fn, self.parts, args + (y.numpy(), acc))
        return y


def bind(kernel) -> _LoopImpl | None:
    """The loop kernel for ``kernel.packed`` if its format has one here, else ``None``."""
    if kernel.format_name in ("csr", "nm"):
        return _LoopImpl(kernel, kernel.format_name)
    return None
