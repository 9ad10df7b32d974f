"""Device helpers every CUDA kernel here uses: warp collectives, wide loads, bit decoding,
the tensor-core ``mma``.

Each helper has two implementations chosen once, when this module is imported:

* on a GPU, warp collectives are shuffles (``shfl.sync``), ``warp_sync`` is ``bar.warp.sync``,
  ``load_u64x2`` is one 16-byte ``ld.global.v2.u64``, ``mma_f16`` is one ``mma.sync`` (inline
  PTX) and the bit reinterpretations are LLVM bitcasts (no instructions at all);
* under the CUDA simulator, which has no shuffles, no ``syncwarp`` and runs kernels as Python,
  warp collectives go through a per-warp shared-memory ``scratch`` row and ``syncthreads``
  (``mma_f16``: two scratch tiles, from the PTX ISA's fragment layout), and the bit
  reinterpretations go through NumPy views.

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
#: float32 ``x`` enters an fp16 ``mma`` as ``hi = fp16(x)`` and ``lo = fp16((x - hi) * LO_SCALE)``:
#: the scale keeps ``lo``'s 11 bits out of fp16's subnormals; products of ``lo`` are scaled back.
LO_SCALE = 2048.0
#: Elements of ``x`` one ``load_x_run`` reads: a lane's share of a 64-column chunk.
X_RUN = 16

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

    @cuda.jit(device=True)
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, lane, sa, sb):
        """``d = A @ B + c`` on one warp's ``m16n8k16`` fragments (see the GPU version), emulated
        through the warp's float32 scratch tiles ``sa [16, 16]`` and ``sb [16, 8]``."""
        g, t = lane // 4, lane % 4
        k = 2 * t
        for reg, row, col in ((a0, g, k), (a1, g + 8, k), (a2, g, k + 8), (a3, g + 8, k + 8)):
            sa[row, col] = half_bits_to_f32(reg)
            sa[row, col + 1] = half_bits_to_f32(int(reg) >> 16)
        for reg, kk in ((b0, k), (b1, k + 8)):
            sb[kk, g] = half_bits_to_f32(reg)
            sb[kk + 1, g] = half_bits_to_f32(int(reg) >> 16)
        cuda.syncthreads()
        out = []
        for row, col, c in ((g, k, c0), (g, k + 1, c1), (g + 8, k, c2), (g + 8, k + 1, c3)):
            acc = np.float32(c)
            for kk in range(16):
                acc = np.float32(acc + sa[row, kk] * sb[kk, col])
            out.append(acc)
        cuda.syncthreads()
        return out[0], out[1], out[2], out[3]

    @cuda.jit(device=True)
    def store_half(words, start, offset, value):
        """Bits ``value & 0xFFFF`` into 16-bit element ``start + offset`` of the uint32 or uint64
        array ``words``."""
        words.view(np.uint16)[int(start) + int(offset)] = np.uint16(int(value) & 0xFFFF)

    def _half_bits(value) -> int:
        """The bits of ``value`` rounded to fp16."""
        return int(np.array([value], dtype=np.float16).view(np.uint16)[0])

    @cuda.jit(device=True)
    def int_to_half_bits(value):
        """The fp16 bits (in a uint32) of a small integer (exact for ``|value| <= 2048``)."""
        return np.uint32(_half_bits(int(value)))

    def make_load_x_run(cols: int, vector: bool):
        """Device function ``load_x_run(x, row_start, col)``; see the GPU version."""

        @cuda.jit(device=True)
        def load_x_run(x, row_start, col):
            split = x.dtype == np.float32
            flat = x.reshape(-1)
            his, los = [], []
            for p in range(X_RUN // 2):
                hi = lo = 0
                for k in range(2):
                    c = int(col) + 2 * p + k
                    v = np.float32(flat[int(row_start) + (c if vector else min(c, cols - 1))])
                    h = np.float16(v)
                    hi |= _half_bits(h) << (16 * k)
                    if split:
                        lo |= _half_bits(np.float16((v - np.float32(h)) * np.float32(LO_SCALE))) << (16 * k)
                his.append(np.uint32(hi))
                los.append(np.uint32(lo))
            return tuple(his + los)

        return load_x_run

    @cuda.jit(device=True)
    def splits_x(x):
        """Whether ``x`` is float32 (``load_x_run`` gives it a ``lo`` part)."""
        return x.dtype == np.float32

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

    @intrinsic
    def _mma_f16(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        if any(v != types.uint32 for v in (a0, a1, a2, a3, b0, b1)):
            return None
        if any(v != types.float32 for v in (c0, c1, c2, c3)):
            return None
        result = types.UniTuple(types.float32, 4)

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
            asm = ir.InlineAsm(
                fnty,
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                side_effect=False,
            )
            out = builder.call(asm, args)
            return context.make_tuple(builder, result, [builder.extract_value(out, i) for i in range(4)])

        return result(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), codegen

    @intrinsic
    def _store_half(typingctx, words, start, offset, value):
        if not (isinstance(words, types.Array) and words.dtype in (types.uint32, types.uint64) and words.ndim == 1):
            return None
        if not (isinstance(start, types.Integer) and isinstance(offset, types.Integer) and value == types.uint32):
            return None

        def codegen(context, builder, signature, args):
            arrty = signature.args[0]
            arr = context.make_array(arrty)(context, builder, args[0])
            i16, i64 = ir.IntType(16), ir.IntType(64)
            # start and offset widen apart, so the lane's part (start) is computed once
            start = builder.zext(context.cast(builder, args[1], signature.args[1], types.uint32), i64)
            offset = builder.zext(context.cast(builder, args[2], signature.args[2], types.uint32), i64)
            row = builder.gep(builder.bitcast(arr.data, i16.as_pointer()), [start])
            builder.store(builder.trunc(args[3], i16), builder.gep(row, [offset]))
            return context.get_dummy_value()

        return types.none(words, start, offset, value), codegen

    @intrinsic
    def _int_to_half_bits(typingctx, value):
        if not isinstance(value, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            wide = context.cast(builder, args[0], signature.args[0], types.int32)
            half = builder.sitofp(wide, ir.HalfType())
            return builder.zext(builder.bitcast(half, ir.IntType(16)), ir.IntType(32))

        return types.uint32(value), codegen

    @cuda.jit(device=True, inline=True)
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, lane, sa, sb):
        """``d = A @ B + c`` for one warp: ``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32``.

        ``a0..a3`` (uint32, two fp16 each) are the lane's A fragment of the 16 x 16 tile in the
        PTX ISA's layout (``g = lane // 4``, ``t = lane % 4``: ``a0`` row ``g`` columns ``2t,
        2t + 1``; ``a1`` row ``g + 8``; ``a2``/``a3`` the same rows, columns + 8); ``b0``/``b1``
        its B fragment of the 16 x 8 tile (``b0`` rows ``2t, 2t + 1`` of column ``g``, ``b1``
        rows + 8); ``c0..c3`` float32 accumulators (``c0``/``c1`` row ``g`` columns ``2t``,
        ``2t + 1``; ``c2``/``c3`` row ``g + 8``). Returns ``(d0, d1, d2, d3)`` in ``c``'s layout.
        Every lane of the warp calls it together. ``lane``, ``sa``, ``sb``: the simulator's
        scratch, unused here."""
        return _mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    @cuda.jit(device=True, inline=True)
    def store_half(words, start, offset, value):
        """Bits ``value & 0xFFFF`` into 16-bit element ``start + offset`` of the uint32 or uint64
        array ``words`` (one 2-byte store)."""
        _store_half(words, start, offset, np.uint32(value))

    @cuda.jit(device=True, inline=True)
    def int_to_half_bits(value):
        """The fp16 bits (in a uint32) of a small integer (exact for ``|value| <= 2048``)."""
        return _int_to_half_bits(value)

    def _pack_halves(builder, first, second):
        """Two LLVM ``half`` values as one i32: ``first`` in the low 16 bits."""
        i16, i32 = ir.IntType(16), ir.IntType(32)
        low = builder.zext(builder.bitcast(first, i16), i32)
        high = builder.zext(builder.bitcast(second, i16), i32)
        return builder.or_(low, builder.shl(high, ir.Constant(i32, 16)))

    def _split_halves(builder, values):
        """float32 ``values`` (two) as ``(hi, lo)`` fp16 pairs, as ``LO_SCALE`` says."""
        f16, f32 = ir.HalfType(), ir.FloatType()
        his = [builder.fptrunc(v, f16) for v in values]
        los = [builder.fptrunc(builder.fmul(builder.fsub(v, builder.fpext(h, f32)), ir.Constant(f32, LO_SCALE)), f16)
               for v, h in zip(values, his)]
        return _pack_halves(builder, *his), _pack_halves(builder, *los)

    def make_load_x_run(cols: int, vector: bool):
        """Device function ``load_x_run(x, row_start, col)``: the ``X_RUN`` (16) elements of a
        C-contiguous ``x [m, cols]`` (read flat) from ``row_start + col`` on, as a 16-tuple of
        uint32: 8 fp16 pairs ``hi`` (the first element of a pair in the low half), then 8 pairs
        ``lo``.

        fp16 ``x``: ``hi`` holds its bits, ``lo`` is 0. float32 ``x``: ``hi = fp16(x)`` and ``lo =
        fp16((x - hi) * LO_SCALE)``, about 22 bits of ``x`` between them.

        ``vector``: the run lies inside the row and ``row_start + col`` is a multiple of 16
        elements from a 16-byte aligned base (the caller's guarantee: ``cols`` a multiple of
        64); it is read in 16-byte loads (two for fp16, four for float32). Otherwise element by
        element, each column clamped to the row's last (``cols - 1``).
        """
        last = cols - 1

        @intrinsic
        def _load_x_run(typingctx, x, row_start, col):
            if not (isinstance(x, types.Array) and x.ndim == 2 and x.dtype in (types.float16, types.float32)):
                return None
            if not (isinstance(row_start, types.Integer) and isinstance(col, types.Integer)):
                return None
            result = types.UniTuple(types.uint32, X_RUN)

            def codegen(context, builder, signature, args):
                arrty = signature.args[0]
                arr = context.make_array(arrty)(context, builder, args[0])
                i32, i64 = ir.IntType(32), ir.IntType(64)
                half = arrty.dtype == types.float16
                element = ir.HalfType() if half else ir.FloatType()
                start = builder.zext(context.cast(builder, args[1], signature.args[1], types.uint32), i64)
                column = context.cast(builder, args[2], signature.args[2], types.uint32)
                row = builder.gep(arr.data, [start])
                if vector:
                    first = builder.gep(row, [builder.zext(column, i64)])
                    per_load = 8 if half else 4
                    # fp16: the words themselves are the pairs (a <8 x half> load would be split
                    # into 8-byte loads); float32: four floats a load
                    vec_t = ir.VectorType(i32 if half else element, 4)
                    words, values = [], []
                    for k in range(0, X_RUN, per_load):
                        at = builder.bitcast(builder.gep(first, [ir.Constant(i64, k)]), vec_t.as_pointer())
                        vec = builder.load(at, align=16)
                        parts = [builder.extract_element(vec, ir.Constant(i32, j)) for j in range(4)]
                        (words if half else values).extend(parts)
                    if half:
                        return context.make_tuple(builder, result, words + [ir.Constant(i32, 0)] * len(words))
                else:
                    values = []
                    for k in range(X_RUN):
                        c = builder.add(column, ir.Constant(i32, k))
                        c = builder.select(builder.icmp_unsigned("<", c, ir.Constant(i32, last)), c,
                                           ir.Constant(i32, last))
                        values.append(builder.load(builder.gep(row, [builder.zext(c, i64)])))
                pairs = [values[k : k + 2] for k in range(0, X_RUN, 2)]
                if half:
                    his = [_pack_halves(builder, *pair) for pair in pairs]
                    los = [ir.Constant(i32, 0)] * len(pairs)
                else:
                    his, los = zip(*(_split_halves(builder, pair) for pair in pairs))
                return context.make_tuple(builder, result, [*his, *los])

            return result(x, row_start, col), codegen

        @cuda.jit(device=True, inline=True)
        def load_x_run(x, row_start, col):
            return _load_x_run(x, row_start, col)

        return load_x_run

    @intrinsic
    def _splits_x(typingctx, x):
        if not isinstance(x, types.Array):
            return None

        def codegen(context, builder, signature, args):
            return ir.Constant(ir.IntType(1), int(signature.args[0].dtype == types.float32))

        return types.boolean(x), codegen

    @cuda.jit(device=True, inline=True)
    def splits_x(x):
        """Whether ``x`` is float32 (``load_x_run`` gives it a ``lo`` part): a compile-time
        constant, so the branches it guards fold away for fp16 ``x``."""
        return _splits_x(x)

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


def make_output(value_type: str, has_bias: bool, activation: str | None):
    """Device function ``output(s, row, scales, bias)``: a row's float32 sum ``s`` as stored,
    the int8 row scale, then the bias, then the activation applied (every epilogue's order)."""
    per_row_scale = value_type == "int8"
    act = ACTIVATIONS[activation]

    @cuda.jit(device=True, inline=True)
    def output(s, row, scales, bias):
        if per_row_scale:
            s *= scales[row, 0]
        if has_bias:
            s += bias[row]
        return act(s)

    return output


def make_epilogue(batch: int, value_type: str, has_bias: bool, activation: str | None):
    """Device function ``finish(y, acc, m, row, live, lane, scales, bias, scratch)`` ending a row.

    For each batch row ``b < m`` it sums the lanes' partial results ``acc[b]`` (a collective:
    every warp of the block calls it, live or not, see the module docstring), and lane 0 of a
    live warp applies the int8 row scale, the bias and the activation and stores ``y[b, row]``.
    ``scratch`` is the warp's float32 row for the simulator's reduction.
    """
    output = make_output(value_type, has_bias, activation)

    @cuda.jit(device=True, inline=True)
    def finish(y, acc, m, row, live, lane, scales, bias, scratch):
        for b in range(batch):
            s = warp_reduce_sum(acc[b], lane, scratch)
            if live and lane == 0 and b < m:
                y[b, row] = output(s, row, scales, bias)

    return finish
