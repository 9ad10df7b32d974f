"""``CpuLinearKernel``: one packed layer bound to the kernel that runs it on this CPU.

``build_linear_kernel(packed, bias, activation)`` looks at the packed weight once (format, value
type, shape, how its kept values spread over rows), chooses the kernel family per batch size,
compiles what is missing (shared by every layer of the same value type) and returns a callable:

    kernel = build_linear_kernel(pack(w, "bitmask", "int8"), bias=b, activation="silu")
    y = kernel(x)            # == silu(x @ unpack(w).T + b), x float32 [..., cols]

Batch regimes for the bitmask format, by the number ``B`` of rows of ``x`` (all leading dims
flattened), with the crossovers measured on this project's benchmark machine (see
docs/performance.md):

* ``B <= ROWS_MAX_BATCH``: the ``rows`` kernel (decode each chunk once, reuse it for the batch);
* larger ``B``: the ``nnz`` kernel (batch in the vector lanes, 64 rows at a time), unless the layer
  is denser than ``DENSE_ABOVE_DENSITY`` allows at that batch: then (prefill of a half-dense
  layer, say) ``torch.nn.functional.linear`` on the dense weight, unpacked once on first use and
  cached on the kernel.

A ``dense`` int8 layer (an int8 ``lm_head``, say) runs the bitmask ``rows`` kernel at batch 1-4
on its own bytes, seen as a bitmask whose every bit is set (the values of a dense int8 weight
are already in the bitmask format's row-major order): a quarter of the bytes of the fp32 weight
torch would read. Larger batches run through torch on the unpacked weight.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from sparsec.codegen.cpu import bitmask as bm_kernels
from sparsec.codegen.cpu.host import host_features
from sparsec.codegen.cpu.partition import balanced_row_split
from sparsec.codegen.cpu.threads import cpu_threads, run_ranges
from sparsec.formats.base import PackedWeight
from sparsec.formats.bitmask import BitmaskArrays

ACTIVATIONS = bm_kernels.ACTIVATIONS

_TORCH_ACT = {None: None, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class KernelError(ValueError):
    """A layer or an input the CPU kernels cannot run, with what to change."""


def _check_activation(activation: object) -> str | None:
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise KernelError(f"unknown activation {activation!r}; choose one of {names}")
    return activation  # type: ignore[return-value]


def _check_bias(bias: torch.Tensor | None, rows: int) -> np.ndarray:
    if bias is None:
        return np.zeros(max(rows, 1), dtype=np.float64)
    if not isinstance(bias, torch.Tensor):
        raise KernelError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (rows,):
        raise KernelError(
            f"bias has shape {tuple(bias.shape)}, expected ({rows},) (one value per output row)"
        )
    if not bias.is_floating_point():
        raise KernelError(f"bias must be a floating-point tensor, got dtype {bias.dtype}")
    b = bias.detach().to("cpu", torch.float64).contiguous().numpy()
    if not np.isfinite(b).all():
        raise KernelError("bias holds NaN or Inf values")
    return b if rows else np.zeros(1, dtype=np.float64)


class CpuLinearKernel:
    """``y = act(x @ W^T + bias)`` for one packed weight ``W`` (``[rows, cols]``) on this CPU.

    Call with float32 ``x`` of shape ``[..., cols]`` (any strides); returns a new contiguous
    float32 tensor ``[..., rows]``. Attributes: ``format_name``, ``value_type``, ``rows``,
    ``cols``, ``activation``, ``compile_seconds`` (time spent compiling kernels while building
    this one: zero when an earlier layer already compiled the same variants).
    """

    #: bitmask: largest batch the ``rows`` kernel serves (it beats dense torch at any density).
    ROWS_MAX_BATCH = 4
    #: bitmask, larger batches: ``(largest batch, density)`` pairs; a layer denser than the density
    #: of the first pair whose batch bound is >= B runs through dense torch. Measured on 4096x4096
    #: (2 Zen 4 cores, CPU time): the nnz kernel costs about ``c(B) * density`` of dense fp32
    #: ``F.linear``, with c = 1.05 at B = 16, 1.45 at B = 64 and 2.3 at B = 128..256.
    DENSE_ABOVE_DENSITY: tuple[tuple[int, float], ...] = ((16, 0.9), (64, 0.65), (1 << 62, 0.45))
    #: batches from here on are always dense (for non-bitmask formats with loop kernels too).
    DENSE_MIN_BATCH = 1 << 62
    #: layers with fewer dense positions than this run on one thread.
    PARALLEL_MIN_WEIGHTS = 1 << 22

    def __init__(
        self,
        packed: PackedWeight,
        bias: torch.Tensor | None,
        activation: str | None,
        *,
        vector: bool | None = None,
        parallel_min_weights: int | None = None,
    ) -> None:
        """``vector``: force the AVX-512 (``True``, only on a CPU that has it) or the portable
        (``False``) bitmask kernels; ``None`` lets the host CPU decide. ``parallel_min_weights``:
        override :attr:`PARALLEL_MIN_WEIGHTS` for this layer."""
        if not isinstance(packed, PackedWeight):
            raise KernelError(
                "build_linear_kernel needs a PackedWeight (from sparsec.formats.pack), "
                f"got {type(packed).__name__}"
            )
        self.packed = packed
        self.format_name: str = packed.format_name
        self.value_type: str = packed.value_type
        self.rows, self.cols = packed.shape
        self.activation = _check_activation(activation)
        self._bias_np = _check_bias(bias, self.rows)
        self._bias_t = (
            None if bias is None else torch.from_numpy(self._bias_np[: self.rows]).to(torch.float32)
        )
        self._dense: torch.Tensor | None = None
        self.compile_seconds = 0.0
        self.threads = cpu_threads()
        if parallel_min_weights is not None:
            self.PARALLEL_MIN_WEIGHTS = parallel_min_weights
        has = host_features().vector_bitmask
        if vector and not has:
            raise KernelError(
                "this CPU lacks AVX-512 (F/BW/VBMI/VBMI2): use the portable kernels (vector=False)"
            )
        self.vector = has if vector is None else bool(vector)
        t0 = time.perf_counter()
        self._impl = self._bind()
        self.build_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ binding per format

    def _bind(self):
        if self.format_name == "bitmask":
            return _BitmaskImpl(self)
        if self.format_name == "dense" and self.value_type == "int8" and self.vector:
            return _BitmaskImpl(self, dense_as_bitmask(self.packed))
        from sparsec.codegen.cpu import loops

        impl = loops.bind(self)
        if impl is None:
            return _DenseImpl(self)
        return impl

    def dense_weight(self) -> torch.Tensor:
        """The unpacked float32 weight, built once (only the large-batch path needs it)."""
        if self._dense is None:
            self._dense = self.packed.unpack().to(torch.float32).contiguous()
        return self._dense

    def dense_linear(self, x2: torch.Tensor) -> torch.Tensor:
        y = F.linear(x2, self.dense_weight(), self._bias_t)
        act = _TORCH_ACT[self.activation]
        return act(y) if act is not None else y

    # ------------------------------------------------------------------ call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise KernelError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise KernelError(f"input must be float32, got {x.dtype}; convert it with x.float()")
        if x.device.type != "cpu":
            raise KernelError(f"input is on {x.device}; the CPU kernel needs a CPU tensor")
        if x.dim() < 1 or x.shape[-1] != self.cols:
            raise KernelError(
                f"input has shape {tuple(x.shape)}, expected [..., {self.cols}] (in_features of this layer)"
            )
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self.cols)
        B = x2.shape[0]
        if B == 0 or self.rows == 0:
            y = torch.zeros(B, self.rows, dtype=torch.float32)
            if self._bias_t is not None and B:
                y += self._bias_t
            act = _TORCH_ACT[self.activation]
            y = act(y) if act is not None else y
        else:
            y = self._impl(x2)
        return y if x.dim() == 2 else y.reshape(*lead, self.rows)

    def __repr__(self) -> str:
        return (
            f"CpuLinearKernel({self.format_name}/{self.value_type}, {self.rows}x{self.cols}, "
            f"activation={self.activation!r}, kernel={self._impl.describe()})"
        )


class _DenseImpl:
    """Every batch through torch on the unpacked weight (dense format, and formats without a
    dedicated kernel)."""

    def __init__(self, k: CpuLinearKernel) -> None:
        self.k = k
        k.dense_weight()

    def describe(self) -> str:
        return "torch-dense"

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return self.k.dense_linear(x2)


def kernel_modules(format_name: str, value_type: str) -> set[str]:
    """Keys of the generated kernel modules (:mod:`.codecache`) a layer of this format and value
    type calls: what an artifact must carry for it to load without compiling."""
    keys = {f"{format_name}_{value_type}"}
    if format_name == "dense" and value_type == "int8":
        keys.add("bitmask_int8")
    return keys


def dense_as_bitmask(packed: PackedWeight) -> BitmaskArrays:
    """A dense int8 weight as bitmask arrays with every bit set, sharing its values (no copy)."""
    rows, cols = packed.shape
    nbytes = (cols + 7) // 8
    bitmask = np.full((rows, nbytes), 0xFF, dtype=np.uint8)
    if cols % 8 and nbytes:
        bitmask[:, -1] = (1 << (cols % 8)) - 1  # bits past the last column are zero
    return BitmaskArrays(
        rows=rows, cols=cols, value_type="int8", group_size=int(packed.group_size),
        values=packed.weight.contiguous().numpy().reshape(-1), bitmask=bitmask,
        row_offsets=np.arange(rows, dtype=np.int64) * cols,
        scales=np.ascontiguousarray(packed.scales.numpy()),
    )  # fmt: skip


class _BitmaskImpl:
    """The bitmask kernels (:mod:`.bitmask`) bound to one layer's arrays: the packed bitmask
    weight's, or ``dense`` (from :func:`dense_as_bitmask`) for an int8 dense weight, which runs
    only the batch 1-4 ``rows`` kernels (larger batches go to torch: it is 100% dense)."""

    def __init__(self, k: CpuLinearKernel, dense: BitmaskArrays | None = None) -> None:
        self.k = k
        self.dense = dense is not None
        a = k.packed.arrays() if dense is None else dense
        self.vt = a.value_type
        # numba has no float16 arrays: fp16 (like bf16) travels as its 16-bit patterns
        self.vals = a.values.view(np.uint16) if a.values.dtype == np.float16 else a.values
        if self.vals.shape[0] == 0:  # an all-zero layer: give the kernels one readable element
            self.vals = np.zeros(1, dtype=self.vals.dtype)
        self.bm = a.bitmask.reshape(-1)
        if self.bm.shape[0] == 0:
            self.bm = np.zeros(1, dtype=np.uint8)
        rows, cols = k.rows, k.cols
        self.nbytes = (cols + 7) // 8
        self.offs = a.row_offsets.astype(np.int64, copy=False)
        self.gs = int(a.group_size)
        if a.scales is None:
            self.scales, self.gstride = np.ones(1, dtype=np.float32), 1
        else:
            self.scales = np.ascontiguousarray(a.scales, dtype=np.float32).reshape(-1)
            self.gstride = a.scales.shape[1] if a.scales.ndim == 2 else 1
        nnz = int(k.packed.nnz) if dense is None else rows * cols
        counts = np.diff(np.append(self.offs, nnz))
        self.density = nnz / max(1, rows * cols)
        # Small layers run on one thread: waking a second costs more than it saves.
        threads = k.threads if rows * cols >= k.PARALLEL_MIN_WEIGHTS else 1
        self.parts = balanced_row_split(counts, min(threads, max(rows, 1)), row_cost=cols / 64.0)
        self.vector = k.vector
        # int4 scales must be uniform over a chunk: 64 columns (rows kernel), 16 (nnz kernel).
        self.rows_ok = self.vector and (self.vt != "int4" or self.gs % 64 == 0)
        self.nnz_ok = self.vector and (self.vt != "int4" or self.gs % 16 == 0) and dense is None
        _, self.W, _, _, _, self.g = bm_kernels._VT[self.vt]
        self.nfull_w, rem = divmod(cols, self.W)
        self.tail_w = (rem + 7) // 8
        self.nfull_16, rem16 = divmod(cols, 16)
        self.tail_16 = (rem16 + 7) // 8
        self.cap = cols + 32
        self._f1 = np.zeros(1, dtype=np.float32)
        self._n1 = np.zeros(1, dtype=np.int32)
        self._f2 = np.zeros((1, 1), dtype=np.float32)
        self._d2 = np.zeros((1, 1), dtype=np.float64)
        self.actc = bm_kernels.ACT_CODE[k.activation]
        self._i1 = np.zeros(1, dtype=np.int64)
        self._u1 = np.zeros(1, dtype=np.uint8)
        self._d1 = np.zeros(1, dtype=np.float64)
        if self.vt == "int8" and dense is not None:
            # sum of each row's int8 levels: the int8 kernel's fixed-point x carries a 2^23 offset
            self.rowsum = k.packed.weight.sum(dim=1, dtype=torch.int64).numpy()
        elif self.vt == "int8":
            cs = np.concatenate([[0], np.cumsum(self.vals.astype(np.int64))])
            self.rowsum = cs[self.offs + counts] - cs[self.offs]
        else:
            self.rowsum = self._i1
        self._plans: dict[int, tuple] = {}
        # the kernels' arguments that never change for this layer (order: bitmask.ARGS)
        self.fixed = (
            self.vals, self.bm, self.nbytes, self.offs, self.scales, self.gstride, self.gs,
            k._bias_np, self.actc, self.nfull_w, self.tail_w, self.nfull_16, self.tail_16,
            self.cap, self.rowsum,
        )  # fmt: skip
        # Compile (or load from the disk cache) every function this layer can call, now.
        gen = torch.Generator().manual_seed(0)
        for B in self.warm_batches():
            family, tile = self.plan(B)
            if not bm_kernels.kernel_function(self.vt, family, tile).signatures:
                self.run(torch.randn(B, cols, generator=gen), charge=True)

    def warm_batches(self) -> list[int]:
        if not self.vector:
            return [1]
        out = [1, 2, 4] if self.rows_ok else []
        if self.nnz_ok:
            out += [16, 32, 64]
        return out

    def plan(self, B: int) -> tuple[str, int]:
        """(family, tile) serving batch ``B``: rows tile 1/2/4, nnz lanes 1/2/4 x 16, or portable.

        Batch tiles measured at 4096x4096, 75%, B = 4 (CPU us, 2 threads): int8 tile 1/2/4 =
        1705/1047/1938, bf16 2508/1819/2013, int4 4700/2098/1631; so B = 3..4 runs as two tiles
        of 2, except int4 (one tile of 4).
        """
        if self.rows_ok and (B <= self.k.ROWS_MAX_BATCH or not self.nnz_ok):
            if B == 1:
                return "rows", 1
            return "rows", 4 if (self.vt == "int4" and B > 2) else 2
        if self.nnz_ok:
            return "nnz", 1 if B <= 16 else (2 if B <= 32 else 4)
        return "portable", 0

    def describe(self) -> str:
        if self.dense:
            return "bitmask-avx512 rows (all bits set) at batch <= 4, torch-dense above"
        return f"bitmask-{'avx512' if self.vector else 'portable'}"

    def use_dense(self, B: int) -> bool:
        """True when dense torch on the unpacked weight beats the sparse kernels at batch ``B``."""
        k = self.k
        if B >= k.DENSE_MIN_BATCH:
            return True
        if B <= k.ROWS_MAX_BATCH and self.rows_ok:
            return False
        bound = next(d for limit, d in k.DENSE_ABOVE_DENSITY if B <= limit)
        return self.density > bound

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        B = x2.shape[0]
        if self.use_dense(B):
            return self.k.dense_linear(x2)
        if B > 64 and self.plan(B)[0] == "nnz":
            return torch.cat([self.run(x2[i : i + 64], charge=False) for i in range(0, B, 64)])
        return self.run(x2, charge=False)

    def run(self, x2: torch.Tensor, charge: bool) -> torch.Tensor:
        k = self.k
        B = x2.shape[0]
        hit = self._plans.get(B)
        if hit is None:
            family, tile = self.plan(B)
            hit = self._plans[B] = (family, tile, bm_kernels.kernel_function(self.vt, family, tile))
        family, tile, fn = hit
        xn = x2.numpy() if x2.is_contiguous() else x2.contiguous().numpy()
        xa, xstride, xt, lw, xs, acc = self._f1, 0, self._f1, 0, self._f2, self._d2
        xq, limb, sxs = self._u1, 0, self._d1
        ibuf, vbuf, obuf = self._n1, self._f1, self._f1
        Bp = B
        if family == "rows":
            Bp = -(-B // tile) * tile
            nch = self.nfull_w + (1 if self.tail_w else 0)
            if self.vt in ("int8", "int4"):
                limb = nch * self.W
                xq = np.zeros(Bp * 3 * limb, dtype=np.uint8)
                sxs = np.zeros(Bp, dtype=np.float64)
                bm_kernels.quantize_x24(xn, xq, sxs, limb)
            elif self.vt == "bf16" and bm_kernels.BF16_DOT:
                limb = nch * self.W * 2  # bytes of one bf16 half of a row of x
                xq = np.empty(Bp * 2 * limb, dtype=np.uint8)
                bm_kernels.split_bf16(xn, xq, limb, Bp)
            else:
                xstride = nch * self.W
                xa = np.empty(Bp * xstride, dtype=np.float32)
                bm_kernels.arrange_chunks(xn, xa, self.W, self.g, Bp)
        elif family == "nnz":
            lw = 16 * tile
            xt = np.empty(k.cols * lw, dtype=np.float32)
            bm_kernels.arrange_lanes(xn, xt, lw)
            # per thread: a row's (column, value) list with 16 lanes of slack, its 16*NL sums
            parts = len(self.parts) - 1
            ibuf = np.empty(parts * self.cap, dtype=np.int32)
            vbuf = np.empty(parts * self.cap, dtype=np.float32)
            obuf = np.empty(parts * 64, dtype=np.float32)
        else:
            xs = xn
            acc = np.zeros((len(self.parts) - 1, B), dtype=np.float64)
        y = np.empty((Bp, k.rows), dtype=np.float32)
        xqstride = (2 if self.vt == "bf16" else 3) * limb
        args = (
            (Bp,) + self.fixed + (y, xa, xstride, xt, lw, xs, acc, xq, xqstride, limb, sxs, ibuf, vbuf, obuf)
        )
        if charge and not fn.signatures:
            t0 = time.perf_counter()
            run_ranges(fn, self.parts, args)
            k.compile_seconds += time.perf_counter() - t0
        else:
            run_ranges(fn, self.parts, args)
        return torch.from_numpy(y[:B] if Bp != B else y)
