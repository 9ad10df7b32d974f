"""Device helpers every CUDA kernel here uses: warp collectives, wide loads, bit decoding.

Each helper has two implementations chosen once, when this module is imported:

* on a GPU, warp collectives are shuffles (``shfl.sync``), ``warp_sync`` is ``bar.warp.sync``,
  ``load_u64x2`` is one 16-byte ``ld.global.v2.u64`` and the bit reinterpretations are LLVM
  bitcasts (no instructions at all);
* under the CUDA simulator, which has no shuffles, no ``syncwarp`` and runs kernels as Python,
  warp collectives go through a per-warp shared-memory ``scratch`` row and ``syncthreads``,
  and the bit reinterpretations go through NumPy views.

Contract shared by both (the simulator path needs it, the shuffle path is correct under it):
every thread of the *block* calls a collective the same number of times, in the same order,
with ``lane = threadIdx.x % 32`` and ``scratch`` the calling warp's own row of a shared array
(int32 for :func:`warp_scan`, float32 for :func:`warp_reduce_sum`; 32 elements). On a GPU
``scratch`` is never touched and the shared array is optimised away.
"""

from __future__ import annotations

import math

import numpy as np

from sparsec.codegen.cuda._compat import cuda_module, is_simulator

cuda = cuda_module()
SIMULATOR: bool = is_simulator()

#: All 32 lanes take part in every collective.
FULL_MASK = 0xFFFFFFFF
WARP = 32


def jit_kernel(fn):
    """``@cuda.jit`` for sparsec's kernels, compiled to self-contained PTX.

    numba-cuda turns on link-time optimization whenever nvJitLink is installed; its code then
    needs that linker at load time, and an artifact stores plain PTX and cubin. The kernels link
    nothing else, so LTO has nothing to optimise across: it is switched off. (The simulator's
    ``jit`` takes no ``lto`` option.)
    """
    return cuda.jit(fn) if SIMULATOR else cuda.jit(fn, lto=False)


_F32_HALF = np.float32(0.5)
_F32_ONE = np.float32(1.0)
_F32_ZERO = np.float32(0.0)
_F32_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))
_F32_SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
_F32_GELU_C = np.float32(0.044715)

if SIMULATOR:

    @cuda.jit(device=True)
    def warp_sync():
        """Make this warp's shared-memory writes visible to its other lanes."""
        cuda.syncthreads()

    @cuda.jit(device=True)
    def warp_scan(value, lane, scratch):
        """``(exclusive prefix sum, warp total)`` of an int32 ``value`` over the 32 lanes."""
        scratch[lane] = value
        cuda.syncthreads()
        step = 1
        while step < WARP:
            other = scratch[lane - step] if lane >= step else 0
            cuda.syncthreads()
            scratch[lane] += other
            cuda.syncthreads()
            step *= 2
        inclusive = int(scratch[lane])
        total = int(scratch[WARP - 1])
        cuda.syncthreads()
        return inclusive - int(value), total

    @cuda.jit(device=True)
    def warp_reduce_sum(value, lane, scratch):
        """Sum of a float32 ``value`` over the 32 lanes, returned to every lane."""
        scratch[lane] = value
        cuda.syncthreads()
        total = np.float32(0.0)
        for i in range(WARP):
            total += scratch[i]
        cuda.syncthreads()
        return np.float32(total)

    @cuda.jit(device=True)
    def load_u64x2(words, pair):
        """Words ``2*pair`` and ``2*pair+1`` of a uint64 array (one 16-byte load on a GPU)."""
        return words[2 * pair], words[2 * pair + 1]

    @cuda.jit(device=True)
    def bits_to_f32(bits):
        """The float32 whose IEEE bits are the low 32 bits of ``bits``."""
        return np.array([int(bits) & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0]

    @cuda.jit(device=True)
    def half_bits_to_f32(bits):
        """The fp16 value whose bits are the low 16 bits of ``bits``, widened to float32."""
        return np.float32(np.array([int(bits) & 0xFFFF], dtype=np.uint16).view(np.float16)[0])

    def make_load_row(width: int):
        """Device function ``load_row(x, row)``: ``x[row, 0:width]`` of a C-contiguous 2-D
        float16/float32 array ``[rows, width]`` as a tuple of ``width`` float32 (see the GPU
        version for the loads it makes)."""

        @cuda.jit(device=True)
        def load_row(x, row):
            return tuple(np.float32(x[row, k]) for k in range(width))

        return load_row

else:
    from llvmlite import ir

    try:  # numba-cuda (the NVIDIA-maintained target) has its own type system
        from numba.cuda import types
        from numba.cuda.extending import intrinsic
    except ImportError:  # numba's built-in CUDA target
        from numba.core import types
        from numba.core.extending import intrinsic

    @intrinsic
    def _u32_as_f32(typingctx, bits):
        if bits != types.uint32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def _u32_half_to_f32(typingctx, bits):
        if bits != types.uint32:
            return None

        def codegen(context, builder, signature, args):
            half = builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType())
            return builder.fpext(half, ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def _load_u64x2(typingctx, words, pair):
        if not (isinstance(words, types.Array) and words.dtype == types.uint64 and words.ndim == 1):
            return None
        if not isinstance(pair, types.Integer):
            return None
        result = types.UniTuple(types.uint64, 2)

        def codegen(context, builder, signature, args):
            arrty, idxty = signature.args
            arr = context.make_array(arrty)(context, builder, args[0])
            index = context.cast(builder, args[1], idxty, types.intp)
            first = builder.gep(arr.data, [builder.mul(index, ir.Constant(index.type, 2))])
            vec_t = ir.VectorType(ir.IntType(64), 2)
            # The buffer is allocated 256-byte aligned and indexed in 16-byte pairs, so the
            # vector load may claim 16-byte alignment: that is what makes it one ld.v2.u64.
            vec = builder.load(builder.bitcast(first, vec_t.as_pointer()), align=16)
            lo = builder.extract_element(vec, ir.Constant(ir.IntType(32), 0))
            hi = builder.extract_element(vec, ir.Constant(ir.IntType(32), 1))
            return context.make_tuple(builder, result, [lo, hi])

        return result(words, pair), codegen

    def make_load_row(width: int):
        """Device function ``load_row(x, row)``: ``x[row, 0:width]`` of a C-contiguous 2-D
        float16/float32 array ``[rows, width]`` as a tuple of ``width`` float32.

        ``width`` is a power of two (a batch bucket): the row is read in vector loads of up to
        16 bytes (a 16-row fp16 bucket: two ``ld.global.v4.u32``, where indexing element by
        element gave sixteen 2-byte loads, each touching its own cache line in every lane). The
        caller guarantees the layout: rows ``width`` elements apart, the base 16-byte aligned
        (torch's allocations are), so every vector is aligned to its own size.
        """
        if width < 1 or width & (width - 1):
            raise ValueError(f"load_row needs a power-of-two width, got {width}")

        @intrinsic
        def _load_row(typingctx, x, row):
            if not (isinstance(x, types.Array) and x.ndim == 2 and x.dtype in (types.float16, types.float32)):
                return None
            if not isinstance(row, types.Integer):
                return None
            result = types.UniTuple(types.float32, width)

            def codegen(context, builder, signature, args):
                arrty, rowty = signature.args
                arr = context.make_array(arrty)(context, builder, args[0])
                index = context.cast(builder, args[1], rowty, types.intp)
                itemsize = 2 if arrty.dtype == types.float16 else 4
                lanes = min(width, 16 // itemsize)  # elements a vector load takes
                element = ir.HalfType() if itemsize == 2 else ir.FloatType()
                vec_t = ir.VectorType(element, lanes)
                first = builder.gep(arr.data, [builder.mul(index, ir.Constant(index.type, width))])
                values = []
                for start in range(0, width, lanes):
                    at = builder.gep(first, [ir.Constant(index.type, start)])
                    vec = builder.load(builder.bitcast(at, vec_t.as_pointer()), align=lanes * itemsize)
                    for k in range(lanes):
                        v = builder.extract_element(vec, ir.Constant(ir.IntType(32), k))
                        values.append(builder.fpext(v, ir.FloatType()) if itemsize == 2 else v)
                return context.make_tuple(builder, result, values)

            return result(x, row), codegen

        @cuda.jit(device=True, inline=True)
        def load_row(x, row):
            return _load_row(x, row)

        return load_row

    @cuda.jit(device=True, inline=True)
    def warp_sync():
        """Make this warp's shared-memory writes visible to its other lanes."""
        cuda.syncwarp(FULL_MASK)

    @cuda.jit(device=True, inline=True)
    def warp_scan(value, lane, scratch):
        """``(exclusive prefix sum, warp total)`` of an int32 ``value`` over the 32 lanes."""
        inclusive = np.int32(value)
        step = 1
        while step < WARP:
            other = cuda.shfl_up_sync(FULL_MASK, inclusive, step)
            if lane >= step:
                inclusive = np.int32(inclusive + other)  # stay 32-bit: one shuffle a step
            step *= 2
        total = cuda.shfl_sync(FULL_MASK, inclusive, WARP - 1)
        return np.int32(inclusive - value), total

    @cuda.jit(device=True, inline=True)
    def warp_reduce_sum(value, lane, scratch):
        """Sum of a float32 ``value`` over the 32 lanes, returned to every lane."""
        step = WARP // 2
        while step > 0:
            value += cuda.shfl_xor_sync(FULL_MASK, value, step)
            step //= 2
        return value

    @cuda.jit(device=True, inline=True)
    def load_u64x2(words, pair):
        """Words ``2*pair`` and ``2*pair+1`` of a uint64 array (one 16-byte load on a GPU)."""
        return _load_u64x2(words, pair)

    @cuda.jit(device=True, inline=True)
    def bits_to_f32(bits):
        """The float32 whose IEEE bits are the low 32 bits of ``bits``."""
        return _u32_as_f32(np.uint32(bits))

    @cuda.jit(device=True, inline=True)
    def half_bits_to_f32(bits):
        """The fp16 value whose bits are the low 16 bits of ``bits``, widened to float32."""
        return _u32_half_to_f32(np.uint32(bits))


# ---------------------------------------------------------------------------------------------
# Activations fused into the epilogue (float32 in, float32 out; constants are float32 so no
# double-precision instruction is emitted on the GPU).


@cuda.jit(device=True)
def act_relu(v):
    return v if v > _F32_ZERO else _F32_ZERO


@cuda.jit(device=True)
def act_silu(v):
    return v / (_F32_ONE + math.exp(-v))


@cuda.jit(device=True)
def act_gelu(v):
    """GELU with the exact erf form (``torch.nn.functional.gelu`` default)."""
    return _F32_HALF * v * (_F32_ONE + math.erf(v * _F32_INV_SQRT2))


@cuda.jit(device=True)
def act_gelu_tanh(v):
    """GELU, tanh approximation (``approximate='tanh'``, GPT-2's ``gelu_new``)."""
    inner = _F32_SQRT_2_OVER_PI * (v + _F32_GELU_C * v * v * v)
    return _F32_HALF * v * (_F32_ONE + math.tanh(inner))


@cuda.jit(device=True)
def act_none(v):
    return v


#: Activation name (as the runtime passes it) -> device function.
ACTIVATIONS = {
    None: act_none,
    "relu": act_relu,
    "silu": act_silu,
    "gelu": act_gelu,
    "gelu_tanh": act_gelu_tanh,
}


def make_epilogue(batch: int, value_type: str, has_bias: bool, activation: str | None):
    """Device function ``finish(y, acc, m, row, live, lane, scales, bias, scratch)`` ending a row.

    For each batch row ``b < m`` it sums the lanes' partial results ``acc[b]`` (a collective:
    every warp of the block calls it, live or not, see the module docstring), and lane 0 of a
    live warp applies the int8 row scale, the bias and the activation and stores ``y[b, row]``.
    ``scratch`` is the warp's float32 row for the simulator's reduction.
    """
    per_row_scale = value_type == "int8"
    act = ACTIVATIONS[activation]

    @cuda.jit(device=True, inline=True)
    def finish(y, acc, m, row, live, lane, scales, bias, scratch):
        for b in range(batch):
            s = warp_reduce_sum(acc[b], lane, scratch)
            if live and lane == 0 and b < m:
                if per_row_scale:
                    s *= scales[row, 0]
                if has_bias:
                    s += bias[row]
                y[b, row] = act(s)

    return finish
