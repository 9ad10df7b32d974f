"""SIMD building blocks for Numba kernels: a 16-lane float vector type and LLVM intrinsics.

Numba has no vector types, so its loops over a bitmask decode one bit at a time. This module
gives kernels a first-class ``f32x16`` value (an LLVM ``<16 x float>`` held in a register) and
the handful of operations a bitmask kernel needs, each a few lines of LLVM IR:

* expand-loads: ``llvm.masked.expandload`` reads the next ``popcount(mask)`` packed values and
  spreads them over the lanes whose mask bit is set (``vexpandps``/``vpexpandw``/``vpexpandb``
  on AVX-512, a scalar sequence elsewhere), then converts them to float32 in registers;
* the usual arithmetic (``fma``, ``add``, broadcast, a horizontal sum);
* scalar helpers: unaligned mask loads, ``llvm.ctpop``, bf16/fp16 bit patterns to float32.

Layouts the expand-loads return (``x`` must be arranged to match; see ``arrange_x`` in
:mod:`sparsec.codegen.cpu.bitmask`): ``expand_f32x32`` and ``expand_f16x32`` give lanes in column
order; ``expand_bf16x32`` gives ``(even columns, odd columns)`` because a bf16 pair sits in one
32-bit lane and turns into two float32 by a shift and a mask; ``expand_i8x64`` and
``expand_i4x64`` give four vectors, vector ``k`` holding columns ``4*j + k``, because byte ``k`` of
a 32-bit lane sign-extends with two shifts.

Every intrinsic works on the raw data pointer of a C-contiguous numpy array with an element index
and does no bounds checks: callers guarantee the indices (the kernels in this package derive them
from validated packed weights). Nothing here allocates, so kernels built on it need no NRT.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from sparsec.codegen.cpu.host import host_features

# Host features decide, at import (= compile) time, which x86-specific intrinsics may be named;
# the generic LLVM intrinsics are legal on every target (LLVM scalarizes them where needed).
_HOST = host_features()
_HOST_HAS_AVX512 = _HOST.avx512
_HOST_HAS_VBMI = _HOST.avx512vbmi
_HOST_HAS_VBMI2 = _HOST.avx512vbmi2

_F32 = ir.FloatType()
_I1, _I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)


class F32x16Type(types.Type):
    """Numba type of a 16-lane float32 vector kept in one register."""

    def __init__(self) -> None:
        super().__init__(name="f32x16")


f32x16 = F32x16Type()


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _V16F)


class I32x16Type(types.Type):
    """Numba type of 16 int32 lanes (also viewed as 64 bytes) kept in one register."""

    def __init__(self) -> None:
        super().__init__(name="i32x16")


i32x16 = I32x16Type()


@register_model(I32x16Type)
class _I32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, ir.VectorType(ir.IntType(32), 16))


# --------------------------------------------------------------------------- IR helpers


def _fn(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _ptr(context, builder, arrty, arr, idx, idxty) -> ir.Value:
    """Pointer to element ``idx`` of a contiguous array (no bounds check)."""
    ary = context.make_array(arrty)(context, builder, value=arr)
    i = context.cast(builder, idx, idxty, types.int64)
    return builder.gep(ary.data, [i])


def _as(builder: ir.IRBuilder, ptr: ir.Value, elem: ir.Type) -> ir.Value:
    return builder.bitcast(ptr, elem.as_pointer())


def _mask(context, builder, value, valty, lanes: int) -> ir.Value:
    """The low ``lanes`` bits of an integer as an LLVM ``<lanes x i1>`` mask."""
    m = context.cast(builder, value, valty, types.uint64)
    if lanes < 64:
        m = builder.trunc(m, ir.IntType(lanes))
    return builder.bitcast(m, ir.VectorType(_I1, lanes))


def _first_lanes(builder: ir.IRBuilder, count: ir.Value, lanes: int) -> ir.Value:
    """``<lanes x i1>`` with the first ``count`` (0..lanes) lanes set, built with a shift."""
    wide = ir.IntType(lanes * 2) if lanes == 64 else _I64
    one = ir.Constant(wide, 1)
    c = builder.zext(count, wide) if count.type.width < wide.width else builder.trunc(count, wide)
    bits = builder.sub(builder.shl(one, c), one)
    bits = builder.trunc(bits, ir.IntType(lanes))
    return builder.bitcast(bits, ir.VectorType(_I1, lanes))


def _expandload(builder, ptr, mask, elem: ir.Type, lanes: int) -> ir.Value:
    vt = ir.VectorType(elem, lanes)
    suffix = {32: "f32", 16: "i16", 8: "i8"}[elem.width if isinstance(elem, ir.IntType) else 32]
    fn = _fn(builder, f"llvm.masked.expandload.v{lanes}{suffix}", vt, [elem.as_pointer(), mask.type, vt])
    return builder.call(fn, [_as(builder, ptr, elem), mask, ir.Constant(vt, None)])


def _maskedload(builder, ptr, mask, elem: ir.Type, lanes: int) -> ir.Value:
    vt = ir.VectorType(elem, lanes)
    suffix = "f32" if elem == _F32 else f"i{elem.width}"
    fn = _fn(builder, f"llvm.masked.load.v{lanes}{suffix}.p0", vt, [vt.as_pointer(), _I32, mask.type, vt])
    return builder.call(fn, [_as(builder, ptr, vt), ir.Constant(_I32, 1), mask, ir.Constant(vt, None)])


def _split4_sext(builder, v64: ir.Value, nibble: bool) -> list[ir.Value]:
    """64 byte lanes -> four float32 vectors, vector k = bytes 4j+k (sign-extended int8 or int4)."""
    words = builder.bitcast(v64, _V16I)
    out = []
    top = 4 if nibble else 8  # bits of the value kept at the top of the lane before the shift down
    for k in range(4):
        left = 32 - 8 * k - top
        w = builder.shl(words, ir.Constant(_V16I, [left] * 16)) if left else words
        w = builder.ashr(w, ir.Constant(_V16I, [32 - top] * 16))
        out.append(builder.sitofp(w, _V16F))
    return out


def _tuple(context, builder, sig, values: list[ir.Value]) -> ir.Value:
    return context.make_tuple(builder, sig.return_type, values)


# --------------------------------------------------------------------------- scalar intrinsics


def _make_load_bits(width: int):
    ity = ir.IntType(width)

    @intrinsic
    def load_bits(typingctx, arr, byte_index):
        """``width`` mask bits from byte ``byte_index`` of a uint8 array (unaligned load)."""

        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            v = builder.load(_as(builder, p, ity), align=1)
            return builder.zext(v, _I64) if width < 64 else v

        return types.uint64(arr, byte_index), codegen

    return load_bits


load_u16 = _make_load_bits(16)
load_u32 = _make_load_bits(32)
load_u64 = _make_load_bits(64)


@intrinsic
def ld(typingctx, arr, index):
    """``arr[index]`` with no bounds check and no negative-index wraparound (Numba's indexing
    spends a shift, two ands and a cmov per access on the latter)."""

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]))

    return arr.dtype(arr, index), codegen


@intrinsic
def popcount(typingctx, value):
    """Number of set bits of an integer (``llvm.ctpop``), as int64."""

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint64)
        return builder.call(_fn(builder, "llvm.ctpop.i64", _I64, [_I64]), [v])

    return types.int64(value), codegen


@intrinsic
def bf16_to_f32(typingctx, bits):
    """A bf16 bit pattern (any 16-bit integer) to float32: the bits are the top half of a float."""

    def codegen(context, builder, sig, args):
        v = builder.zext(builder.trunc(args[0], _I16), _I32)
        return builder.bitcast(builder.shl(v, ir.Constant(_I32, 16)), _F32)

    return types.float32(bits), codegen


@intrinsic
def f16_to_f32(typingctx, bits):
    """An IEEE half bit pattern (any 16-bit integer) to float32."""

    def codegen(context, builder, sig, args):
        h = builder.bitcast(builder.trunc(args[0], _I16), ir.HalfType())
        return builder.fpext(h, _F32)

    return types.float32(bits), codegen


# --------------------------------------------------------------------------- vector arithmetic


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V16F, None)

    return f32x16(), codegen


@intrinsic
def vbroadcast(typingctx, value):
    """All 16 lanes set to a scalar."""

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[0], sig.args[0], types.float32)
        v = builder.insert_element(ir.Constant(_V16F, ir.Undefined), s, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, ir.Constant(_V16F, ir.Undefined), ir.Constant(_V16I, [0] * 16))

    return f32x16(value), codegen


@intrinsic
def vload(typingctx, arr, index):
    """16 consecutive float32 from ``arr[index]`` (unaligned)."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load(_as(builder, p, _V16F), align=4)

    return f32x16(arr, index), codegen


@intrinsic
def vstore(typingctx, arr, index, vec):
    """Store 16 float32 at ``arr[index]`` (unaligned)."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        builder.store(args[2], _as(builder, p, _V16F), align=4)
        return context.get_dummy_value()

    return types.none(arr, index, vec), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane by lane, one rounding."""

    def codegen(context, builder, sig, args):
        return builder.call(_fn(builder, "llvm.fma.v16f32", _V16F, [_V16F] * 3), list(args))

    return f32x16(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f32x16(a, b), codegen


@intrinsic
def vmul(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return f32x16(a, b), codegen


@intrinsic
def vsum(typingctx, a):
    """Sum of the 16 lanes (tree order), as float32."""

    def codegen(context, builder, sig, args):
        fn = _fn(builder, "llvm.vector.reduce.fadd.v16f32", _F32, [_F32, _V16F])
        return builder.call(fn, [ir.Constant(_F32, -0.0), args[0]], fastmath=("reassoc",))

    return types.float32(a), codegen


# --------------------------------------------------------------------------- expand-loads


@intrinsic
def expand_f32x32(typingctx, arr, index, mask):
    """Next ``popcount(mask)`` float32 from ``arr[index]`` spread over 32 columns: (cols 0-15, 16-31)."""
    ret = types.UniTuple(f32x16, 2)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        m = context.cast(builder, args[2], sig.args[2], types.uint64)
        lo = builder.trunc(m, _I16)
        hi = builder.trunc(builder.lshr(m, ir.Constant(_I64, 16)), _I16)
        nlo = builder.call(_fn(builder, "llvm.ctpop.i16", _I16, [_I16]), [lo])
        p_hi = builder.gep(p, [builder.zext(nlo, _I64)])
        v0 = _expandload(builder, p, builder.bitcast(lo, ir.VectorType(_I1, 16)), _F32, 16)
        v1 = _expandload(builder, p_hi, builder.bitcast(hi, ir.VectorType(_I1, 16)), _F32, 16)
        return _tuple(context, builder, sig, [v0, v1])

    return ret(arr, index, mask), codegen


@intrinsic
def expand_bf16x32(typingctx, arr, index, mask):
    """Next ``popcount(mask)`` bf16 (as 16-bit ints) over 32 columns: (even cols, odd cols)."""
    ret = types.UniTuple(f32x16, 2)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = _expandload(builder, p, _mask(context, builder, args[2], sig.args[2], 32), _I16, 32)
        w = builder.bitcast(v, _V16I)
        even = builder.shl(w, ir.Constant(_V16I, [16] * 16))
        odd = builder.and_(w, ir.Constant(_V16I, [-65536] * 16))
        return _tuple(context, builder, sig, [builder.bitcast(even, _V16F), builder.bitcast(odd, _V16F)])

    return ret(arr, index, mask), codegen


@intrinsic
def expand_f16x32(typingctx, arr, index, mask):
    """Next ``popcount(mask)`` fp16 (as 16-bit ints) over 32 columns: (cols 0-15, 16-31)."""
    ret = types.UniTuple(f32x16, 2)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = _expandload(builder, p, _mask(context, builder, args[2], sig.args[2], 32), _I16, 32)
        h = builder.bitcast(v, ir.VectorType(ir.HalfType(), 32))
        undef = ir.Constant(h.type, ir.Undefined)
        halves = []
        for base in (0, 16):
            part = builder.shuffle_vector(h, undef, ir.Constant(_V16I, list(range(base, base + 16))))
            halves.append(builder.fpext(part, _V16F))
        return _tuple(context, builder, sig, halves)

    return ret(arr, index, mask), codegen


@intrinsic
def expand_i8x64(typingctx, arr, index, mask):
    """Next ``popcount(mask)`` int8 over 64 columns, as float32: vector k holds columns 4j+k."""
    ret = types.UniTuple(f32x16, 4)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = _expandload(builder, p, _mask(context, builder, args[2], sig.args[2], 64), _I8, 64)
        return _tuple(context, builder, sig, _split4_sext(builder, v, nibble=False))

    return ret(arr, index, mask), codegen


#: vpermb's gather for the nibble vector: byte j is loaded byte ``(j + odd) >> 1``, ``odd`` the
#: parity of the first nibble; that is ``j >> 1`` plus, when ``odd``, one for the odd ``j``
_NIBBLE_GATHER_BASE = [j >> 1 for j in range(64)]
_NIBBLE_GATHER_ODD = [j & 1 for j in range(64)]


def _nibbles64(context, builder, arrty, arr, nibty, nibble_index, m) -> ir.Value:
    """<64 x i8> whose byte j has value ``nibble_index + j`` of a packed int4 array in its low
    nibble (high nibble: junk). Reads exactly the bytes that hold the ``popcount(m)`` values.

    The bytes are read with a masked load, moved so that byte j's low nibble is value j (a byte
    permute, a 4-bit shift, a blend)."""
    ary = context.make_array(arrty)(context, builder, value=arr)
    nib = context.cast(builder, nibble_index, nibty, types.int64)
    count = builder.call(_fn(builder, "llvm.ctpop.i64", _I64, [_I64]), [m])
    odd = builder.and_(nib, ir.Constant(_I64, 1))
    nbytes = builder.lshr(builder.add(builder.add(count, odd), ir.Constant(_I64, 1)), ir.Constant(_I64, 1))
    p = builder.gep(ary.data, [builder.lshr(nib, ir.Constant(_I64, 1))])
    v64 = ir.VectorType(_I8, 64)
    raw = _maskedload(builder, p, _first_lanes(builder, nbytes, 64), _I8, 64)
    is_odd = builder.trunc(odd, _I1)
    # The permute index is computed, not selected between two constant tables: LLVM lowers such a
    # select to a branch, and the parity it tests is a coin flip per chunk and row. Measured
    # (4096x4096, 75%, batch 1, one thread): 1.60 ms with the branch, 1.22 ms without.
    odd_bytes = builder.shuffle_vector(
        builder.insert_element(ir.Constant(v64, None), builder.neg(builder.trunc(odd, _I8)), ir.Constant(_I32, 0)),
        ir.Constant(v64, ir.Undefined),
        ir.Constant(ir.VectorType(_I32, 64), [0] * 64),
    )
    idx = builder.add(
        ir.Constant(v64, _NIBBLE_GATHER_BASE), builder.and_(ir.Constant(v64, _NIBBLE_GATHER_ODD), odd_bytes)
    )
    if _HOST_HAS_VBMI:
        gathered = builder.call(_fn(builder, "llvm.x86.avx512.permvar.qi.512", v64, [v64, v64]), [raw, idx])
    else:
        gathered = _generic_gather(builder, raw, idx)
    w32 = ir.VectorType(_I16, 32)
    high = builder.bitcast(builder.lshr(builder.bitcast(gathered, w32), ir.Constant(w32, [4] * 32)), v64)
    # value j is the high nibble of its byte when (j + odd) is odd
    sel_even = ir.Constant(ir.VectorType(_I1, 64), [j % 2 == 1 for j in range(64)])
    sel_odd = ir.Constant(ir.VectorType(_I1, 64), [j % 2 == 0 for j in range(64)])
    take_high = builder.select(is_odd, sel_odd, sel_even)
    return builder.select(take_high, high, gathered)


@intrinsic
def expand_i4x64(typingctx, arr, nibble_index, mask):
    """Next ``popcount(mask)`` int4 values starting at nibble ``nibble_index`` of a uint8 array,
    spread over 64 columns as float32 (unscaled levels): vector k holds columns 4j+k."""
    ret = types.UniTuple(f32x16, 4)

    def codegen(context, builder, sig, args):
        m = context.cast(builder, args[2], sig.args[2], types.uint64)
        nibbles = _nibbles64(context, builder, sig.args[0], args[0], sig.args[1], args[1], m)
        expanded = _expand_reg(builder, nibbles, builder.bitcast(m, ir.VectorType(_I1, 64)))
        return _tuple(context, builder, sig, _split4_sext(builder, expanded, nibble=True))

    return ret(arr, nibble_index, mask), codegen


@intrinsic
def expand_i4x64_bytes(typingctx, arr, nibble_index, mask):
    """Like :func:`expand_i4x64`, but the 64 lanes stay signed bytes (zeros where the mask is
    clear), ready for :func:`vdpbusd`."""

    def codegen(context, builder, sig, args):
        m = context.cast(builder, args[2], sig.args[2], types.uint64)
        nibbles = _nibbles64(context, builder, sig.args[0], args[0], sig.args[1], args[1], m)
        e = _expand_reg(builder, nibbles, builder.bitcast(m, ir.VectorType(_I1, 64)))
        v64 = e.type
        # sign-extend 4 bits within a byte: ((n & 15) ^ 8) - 8; a cleared lane (0) stays 0
        low = builder.and_(e, ir.Constant(v64, [15] * 64))
        signed = builder.sub(builder.xor(low, ir.Constant(v64, [8] * 64)), ir.Constant(v64, [8] * 64))
        return builder.bitcast(signed, _V16I)

    return i32x16(arr, nibble_index, mask), codegen


def _generic_gather(builder, vec, idx):
    """Byte permute without VBMI: LLVM lowers an element-wise extract/insert sequence."""
    out = ir.Constant(vec.type, None)
    for j in range(64):
        e = builder.extract_element(vec, builder.extract_element(idx, ir.Constant(_I32, j)))
        out = builder.insert_element(out, e, ir.Constant(_I32, j))
    return out


def _expand_reg(builder, vec, mask):
    """Register form of expand: lanes of ``vec`` taken in order into the set lanes of ``mask``."""
    if _HOST_HAS_VBMI2:
        fn = _fn(builder, "llvm.x86.avx512.mask.expand.v64i8", vec.type, [vec.type, vec.type, mask.type])
        return builder.call(fn, [vec, ir.Constant(vec.type, None), mask])
    # Portable: spill to the stack and use the generic expandload, which LLVM scalarizes.
    slot = cgutils.alloca_once(builder, vec.type)
    builder.store(vec, slot)
    return _expandload(builder, builder.bitcast(slot, _I8.as_pointer()), mask, _I8, 64)


# --------------------------------------------------------------------------- decode to buffers


@intrinsic
def load_first_f32(typingctx, arr, index, count, kind):
    """The first ``count`` (0..16) values from ``arr[index]`` as float32 lanes, zeros after.

    ``kind`` (a literal int) says how the stored values read: 0 float32, 1 bf16 bits, 2 fp16 bits,
    3 int8, 4 int4 (``index`` counts nibbles). Only ``count`` elements are touched in memory.
    """
    if not isinstance(kind, types.IntegerLiteral):
        return None
    k = kind.literal_value

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        idx = context.cast(builder, args[1], sig.args[1], types.int64)
        n = context.cast(builder, args[2], sig.args[2], types.int64)
        if k == 4:
            odd = builder.and_(idx, ir.Constant(_I64, 1))
            nbytes = builder.lshr(
                builder.add(builder.add(n, odd), ir.Constant(_I64, 1)), ir.Constant(_I64, 1)
            )
            p = builder.gep(ary.data, [builder.lshr(idx, ir.Constant(_I64, 1))])
            raw = _maskedload(builder, p, _first_lanes(builder, nbytes, 16), _I8, 16)
            # Each value j: byte (j + odd) >> 1, shifted right by 4 when (j + odd) is odd.
            words = builder.zext(raw, _V16I)
            pos = builder.add(_splat_i32(builder, odd), ir.Constant(_V16I, list(range(16))))
            byte_of = builder.lshr(pos, ir.Constant(_V16I, [1] * 16))
            perm = (
                builder.call(
                    _fn(builder, "llvm.x86.avx512.permvar.si.512", _V16I, [_V16I, _V16I]), [words, byte_of]
                )
                if _HOST_HAS_AVX512
                else _generic_perm16(builder, words, byte_of)
            )
            shift = builder.shl(builder.and_(pos, ir.Constant(_V16I, [1] * 16)), ir.Constant(_V16I, [2] * 16))
            nibs = builder.lshr(perm, shift)
            lev = builder.ashr(
                builder.shl(nibs, ir.Constant(_V16I, [28] * 16)), ir.Constant(_V16I, [28] * 16)
            )
            lanes_on = builder.icmp_unsigned("<", ir.Constant(_V16I, list(range(16))), _splat_i32(builder, n))
            lev = builder.select(lanes_on, lev, ir.Constant(_V16I, None))
            return builder.sitofp(lev, _V16F)
        p = builder.gep(ary.data, [idx])
        mask = _first_lanes(builder, n, 16)
        if k == 0:
            return _maskedload(builder, p, mask, _F32, 16)
        if k == 3:
            return builder.sitofp(_maskedload(builder, p, mask, _I8, 16), _V16F)
        raw = _maskedload(builder, p, mask, _I16, 16)
        if k == 1:
            w = builder.shl(builder.zext(raw, _V16I), ir.Constant(_V16I, [16] * 16))
            return builder.bitcast(w, _V16F)
        return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), 16)), _V16F)

    return f32x16(arr, index, count, kind), codegen


def _splat_i32(builder, value64):
    v = builder.insert_element(ir.Constant(_V16I, None), builder.trunc(value64, _I32), ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_V16I, ir.Undefined), ir.Constant(_V16I, [0] * 16))


def _generic_perm16(builder, vec, idx):
    out = ir.Constant(vec.type, None)
    for j in range(16):
        e = builder.extract_element(vec, builder.extract_element(idx, ir.Constant(_I32, j)))
        out = builder.insert_element(out, e, ir.Constant(_I32, j))
    return out


@intrinsic
def store_column_indices(typingctx, out, index, first_col, mask):
    """Write the columns ``first_col + j`` of the set bits ``j`` of a 16-bit mask, in order, to
    ``out[index:]`` (int32). Writes all 16 lanes (the lanes past ``popcount(mask)`` are junk), so
    ``out`` needs 16 spare elements past the last index written.
    """

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        c0 = context.cast(builder, args[2], sig.args[2], types.int64)
        cols = builder.add(_splat_i32(builder, c0), ir.Constant(_V16I, list(range(16))))
        m = _mask(context, builder, args[3], sig.args[3], 16)
        if _HOST_HAS_AVX512:
            fn = _fn(builder, "llvm.x86.avx512.mask.compress.v16i32", _V16I, [_V16I, _V16I, m.type])
            packed = builder.call(fn, [cols, ir.Constant(_V16I, None), m])
            builder.store(packed, _as(builder, p, _V16I), align=4)
        else:
            fn = _fn(
                builder, "llvm.masked.compressstore.v16i32", ir.VoidType(), [_I32.as_pointer(), _V16I, m.type]
            )
            builder.call(fn, [_as(builder, p, _I32), cols, m])
        return context.get_dummy_value()

    return types.none(out, index, first_col, mask), codegen


# --------------------------------------------------------------------------- int8 dot products (VNNI)


@intrinsic
def vizero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V16I, None)

    return i32x16(), codegen


@intrinsic
def vload_bytes(typingctx, arr, index):
    """64 consecutive bytes from ``arr[index]`` (a 1-byte array), as 16 int32 lanes."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load(_as(builder, p, _V16I), align=1)

    return i32x16(arr, index), codegen


@intrinsic
def expand_i8x64_bytes(typingctx, arr, index, mask):
    """Next ``popcount(mask)`` int8 from ``arr[index]`` spread over 64 byte lanes (zeros elsewhere),
    left as bytes for :func:`vdpbusd`."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = _expandload(builder, p, _mask(context, builder, args[2], sig.args[2], 64), _I8, 64)
        return builder.bitcast(v, _V16I)

    return i32x16(arr, index, mask), codegen


@intrinsic
def vdpbusd(typingctx, acc, unsigned_bytes, signed_bytes):
    """``acc[i] += sum_k u[4i+k] * s[4i+k]`` over byte lanes, u unsigned and s signed
    (``vpdpbusd``: 64 multiply-adds in one instruction; exact, no saturation)."""

    def codegen(context, builder, sig, args):
        if _HOST.avx512vnni:
            fn = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I, [_V16I] * 3)
            return builder.call(fn, list(args))
        # Portable: widen, multiply, add pairs of pairs (LLVM picks what the target has).
        v64 = ir.VectorType(_I8, 64)
        w64 = ir.VectorType(_I32, 64)
        u = builder.zext(builder.bitcast(args[1], v64), w64)
        s_ = builder.sext(builder.bitcast(args[2], v64), w64)
        prod = builder.mul(u, s_)
        out = args[0]
        for k in range(4):
            part = builder.shuffle_vector(
                prod, ir.Constant(w64, ir.Undefined), ir.Constant(_V16I, list(range(k, 64, 4)))
            )
            out = builder.add(out, part)
        return out

    return i32x16(acc, unsigned_bytes, signed_bytes), codegen


@intrinsic
def vsum_i64(typingctx, v):
    """Sum of the 16 int32 lanes, widened to int64 first (no overflow)."""

    def codegen(context, builder, sig, args):
        wide = builder.sext(args[0], ir.VectorType(_I64, 16))
        fn = _fn(builder, "llvm.vector.reduce.add.v16i64", _I64, [ir.VectorType(_I64, 16)])
        return builder.call(fn, [wide])

    return types.int64(v), codegen


@intrinsic
def vones_bytes(typingctx):
    """64 byte lanes of 1 (``vdpbusd(acc, vones_bytes(), q)`` sums the signed bytes of ``q``)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_V16I, [0x01010101] * 16)

    return i32x16(), codegen


@intrinsic
def fold_limbs(typingctx, a0, a1, a2, qsum):
    """Float32 lanes of ``a0 + 256*a1 + 65536*(a2 - 128*qsum)``: the per-lane dot product of
    signed levels with the 24-bit fixed-point ``x`` (limb sums ``a0..a2``, offset ``2^23``
    removed exactly in int32 before converting)."""

    def codegen(context, builder, sig, args):
        d2 = builder.sub(args[2], builder.shl(args[3], ir.Constant(_V16I, [7] * 16)))
        f0, f1, f2 = (builder.sitofp(v, _V16F) for v in (args[0], args[1], d2))
        fma = _fn(builder, "llvm.fma.v16f32", _V16F, [_V16F] * 3)
        t = builder.call(fma, [f2, ir.Constant(_V16F, [256.0] * 16), f1])
        return builder.call(fma, [t, ir.Constant(_V16F, [256.0] * 16), f0])

    return f32x16(a0, a1, a2, qsum), codegen


@intrinsic
def prefetch(typingctx, arr, index, byte_offset):
    """Hint the cache line ``byte_offset`` bytes past ``arr[index]`` into L1 (``llvm.prefetch``;
    never faults, so running past the array's end is harmless)."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        off = context.cast(builder, args[2], sig.args[2], types.int64)
        raw = builder.gep(builder.bitcast(p, _I8.as_pointer()), [off])
        fn = _fn(builder, "llvm.prefetch.p0", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
        builder.call(fn, [raw, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(arr, index, byte_offset), codegen


@intrinsic
def load_tail(typingctx, arr, byte_index, nbytes):
    """The first ``nbytes`` (0..8) bytes at ``arr[byte_index]`` as a little-endian uint64, zeros
    above: the mask of a row's last, partial chunk, read without touching the bytes past it (a
    masked load, so it stays inline in a kernel's loop instead of a call)."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        n = context.cast(builder, args[2], sig.args[2], types.int64)
        v = _maskedload(builder, p, _first_lanes(builder, n, 8), _I8, 8)
        return builder.bitcast(v, _I64)

    return types.uint64(arr, byte_index, nbytes), codegen


# --------------------------------------------------------------------------- bf16 dot products


@intrinsic
def expand_bf16x32_raw(typingctx, arr, index, mask):
    """Next ``popcount(mask)`` bf16 (16-bit ints) spread over 32 lanes in column order, left as
    bf16 pairs for :func:`vdpbf16`."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = _expandload(builder, p, _mask(context, builder, args[2], sig.args[2], 32), _I16, 32)
        return builder.bitcast(v, _V16I)

    return i32x16(arr, index, mask), codegen


@intrinsic
def vdpbf16(typingctx, acc, a, b):
    """``acc[i] += a[2i]*b[2i] + a[2i+1]*b[2i+1]`` over bf16 pairs (``vdpbf16ps``: 32 products of
    bf16 values, exact in float32, accumulated in float32)."""

    def codegen(context, builder, sig, args):
        if _HOST.avx512bf16:
            fn = _fn(builder, "llvm.x86.avx512bf16.dpbf16ps.512", _V16F, [_V16F, _V16I, _V16I])
            return builder.call(fn, list(args))
        # Portable: widen both halves of every pair to float32 and use two FMAs.
        fma = _fn(builder, "llvm.fma.v16f32", _V16F, [_V16F] * 3)
        out = args[0]
        lo_a = builder.bitcast(builder.shl(args[1], ir.Constant(_V16I, [16] * 16)), _V16F)
        hi_a = builder.bitcast(builder.and_(args[1], ir.Constant(_V16I, [-65536] * 16)), _V16F)
        lo_b = builder.bitcast(builder.shl(args[2], ir.Constant(_V16I, [16] * 16)), _V16F)
        hi_b = builder.bitcast(builder.and_(args[2], ir.Constant(_V16I, [-65536] * 16)), _V16F)
        out = builder.call(fma, [hi_a, hi_b, out])
        return builder.call(fma, [lo_a, lo_b, out])

    return f32x16(acc, a, b), codegen


@intrinsic
def f32_to_bits(typingctx, value):
    """The IEEE bit pattern of a float32, as uint32."""

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        return builder.bitcast(v, _I32)

    return types.uint32(value), codegen
