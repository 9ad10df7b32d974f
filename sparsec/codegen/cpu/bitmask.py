"""Kernels for the ``bitmask`` format: ``y = act(x @ W^T + bias)`` straight from the packed bits.

Three kernel families, generated as Python source per value type (one module holds every family
and batch tile; a function compiles on first use and Numba caches it on disk). Shapes, the
activation and the batch size are run-time arguments, so a model's 200 layers of one value type
share a handful of compiled functions, not 200:

``rows`` (decode once, use for a few batch rows; batch 1 is the GEMV)
    Each thread walks its rows ``R`` at a time (independent offsets and accumulators keep the
    core busy while one row's popcount chain resolves). Per chunk of ``W`` columns and row: one
    mask load, one AVX-512 expand-load that spreads the packed values over the chunk's lanes,
    and a software prefetch far ahead on the row's streams. fp32/fp16 values turn into float32
    in registers and meet ``x`` in one FMA per 16 lanes, ``x`` laid out once per call to match
    the lane order of the decode (:func:`arrange_chunks`). bf16 values stay bf16 and meet ``x``
    split in two bf16 halves (:func:`split_bf16`) in two ``vdpbf16ps`` per 32 columns (with a
    16-bit shift to float32 instead on CPUs without AVX512-BF16). int8/int4 values stay bytes:
    ``x`` is turned once per call into a 24-bit fixed-point copy split in three byte limbs
    (:func:`quantize_x24`) and each 64-column chunk is three VNNI ``vpdpbusd`` (64 multiply-adds
    each) per batch row, an exact integer dot product. ``W`` is 32 for 16/32-bit values and 64 for
    int8/int4 (one 64-lane byte expand).
``nnz`` (several batch rows: work per kept value, not per column)
    A row is decoded into a short list of (column, float32 value) in L1, then every kept value is
    broadcast and multiplied into ``x^T[column, 0:16L]`` (batch in the vector lanes): the flops are
    the useful ones only, where the ``rows`` kernel multiplies the zeros of every chunk too.
``portable``
    Plain Numba loops over set bits, for CPUs without AVX-512 (VBMI2 expands) and for int4 group
    sizes the vector kernels do not handle. Same results up to float rounding.

Threads get contiguous row ranges of equal kept-value counts (:mod:`.partition`) and are
sparsec's own (:mod:`.threads`): every kernel is a ``nogil`` function of one row range that
writes into caller-provided buffers and allocates nothing (no NRT), so it can later be emitted as
object code that a loader threads itself.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from sparsec.codegen.cpu.codecache import generated_module
from sparsec.codegen.cpu.host import host_features
from sparsec.codegen.cpu.simd import bf16_to_f32, f32_to_bits

#: Per value type: (kind code of ``simd.load_first_f32``, chunk width W, mask loader, expand-load,
#: vectors per chunk, x layout group g: lanes of one vector are columns ``g*j + k``).
_VT = {
    "fp32": (0, 32, "load_u32", "expand_f32x32", 2, 1),
    "bf16": (1, 32, "load_u32", "expand_bf16x32", 2, 2),
    "fp16": (2, 32, "load_u32", "expand_f16x32", 2, 1),
    "int8": (3, 64, "load_u64", "expand_i8x64", 4, 4),
    "int4": (4, 64, "load_u64", "expand_i4x64", 4, 4),
}

ACTIVATIONS: tuple[str | None, ...] = (None, "relu", "gelu", "silu")


#: activation codes passed to the kernels at run time (one compiled kernel serves all four).
ACT_CODE: dict[str | None, int] = {None: 0, "relu": 1, "gelu": 2, "silu": 3}


@njit(nogil=True, cache=True)
def act(v, code):
    """The epilogue activation, in float64: 0 none, 1 relu, 2 exact (erf) gelu, 3 silu."""
    if code == 0:
        return v
    if code == 1:
        return v if v > 0.0 else 0.0
    if code == 2:
        return 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))
    return v / (1.0 + math.exp(-v))


@njit(nogil=True, cache=True)
def arrange_chunks(x, xa, W, g, Bp):
    """``x`` (float32 ``[B, cols]``) into ``xa`` (``[Bp, nch*W]`` flat) for the ``rows`` kernels:
    zero-padded to whole chunks and ``Bp`` rows, lane ``j`` of vector ``k`` of a chunk holding
    column ``g*j + k`` (``g`` = 1, 2 or 4: the lane order the value type's decode produces)."""
    B, cols = x.shape
    stride = xa.shape[0] // Bp
    per = W // g
    full = cols // W
    for b in range(Bp):
        out = xa[b * stride : (b + 1) * stride]
        if b >= B:
            out[:] = 0.0
            continue
        row = x[b]
        if g == 1:
            out[:cols] = row
            out[cols:] = 0.0
            continue
        for c in range(full):
            src = row[c * W : (c + 1) * W]
            dst = out[c * W : (c + 1) * W]
            for k in range(g):
                for j in range(per):
                    dst[k * per + j] = src[g * j + k]
        if full * W < stride:  # the partial last chunk
            dst = out[full * W :]
            dst[:] = 0.0
            for col in range(full * W, cols):
                j, k = divmod(col - full * W, g)
                dst[k * per + j] = row[col]


@njit(nogil=True, cache=True)
def _bf16_rne(bits):
    """The bf16 nearest (ties to even) to the float32 with IEEE bits ``bits`` (finite values)."""
    return (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@njit(nogil=True, cache=True)
def split_bf16(x, xq, limb, Bp):
    """Each float32 ``x`` as two bf16 (round to nearest even): ``hi = bf16(x)``,
    ``lo = bf16(x - hi)``, so ``hi + lo`` carries 16 significant bits (relative error at most
    ``2^-17``). Row ``b`` goes to the bytes ``xq[b*2*limb : ...]``: ``limb`` bytes of ``hi``
    then ``limb`` bytes of ``lo``, little-endian 16-bit words, zero-padded (rows >= B too)."""
    B, cols = x.shape
    words = xq.view(np.uint16)
    half = limb // 2
    for b in range(Bp):
        base = b * 2 * half
        for j in range(2 * half):
            words[base + j] = 0
        if b >= B:
            continue
        row = x[b]
        for j in range(cols):
            v = row[j]
            hi = _bf16_rne(f32_to_bits(v))
            lo = _bf16_rne(f32_to_bits(v - bf16_to_f32(hi)))
            words[base + j] = hi
            words[base + half + j] = lo


@njit(nogil=True, cache=True)
def arrange_lanes(x, xt, lw):
    """``x`` (float32 ``[B, cols]``) transposed into ``xt`` (``[cols, lw]`` flat, lanes >= B zero)
    for the ``nnz`` kernels: one batch row per vector lane."""
    B, cols = x.shape
    for c in range(cols):
        for b in range(lw):
            xt[c * lw + b] = x[b, c] if b < B else 0.0


#: 2^23 - 1: the largest magnitude of the 24-bit fixed-point copy of x the int8 kernels use.
X24_MAX = 8388607


@njit(nogil=True, cache=True, fastmath=True)
def quantize_x24(x, xq, sxs, limb):
    """Each row ``b`` of float32 ``x`` as 24-bit fixed point: ``X = round(x / s_b)`` with
    ``s_b = max|x[b]| / (2^23 - 1)``, stored offset by ``2^23`` (so non-negative) as three byte
    limbs ``xq[b*3*limb + k*limb + j]`` (low, middle, high byte). The error per element is at
    most ``max|x[b]| * 2^-24``, the spacing of float32 at the row's largest value."""
    B, cols = x.shape
    for b in range(B):
        row = x[b]
        m = 0.0
        for j in range(cols):
            m = max(m, abs(np.float64(row[j])))
        s = m / X24_MAX if m > 0.0 else 1.0
        sxs[b] = s
        inv = 1.0 / s
        base = b * 3 * limb
        lo = xq[base : base + cols]
        mid = xq[base + limb : base + limb + cols]
        hi = xq[base + 2 * limb : base + 2 * limb + cols]
        for j in range(cols):
            # |x * inv| <= 2^23 - 1, so adding 2^23 + 0.5 and truncating rounds to nearest
            u = np.int32(np.float64(row[j]) * inv + (X24_MAX + 1.5))
            lo[j] = u & 255
            mid[j] = (u >> 8) & 255
            hi[j] = u >> 16


# --------------------------------------------------------------------------- source generation
#
# Every generated kernel has the signature ``fn(r0, r1, t, B, <ARGS>)``: rows ``r0:r1`` of the
# layer, thread slot ``t`` (its scratch), ``B`` batch rows. One argument list for all families
# keeps the caller simple; a family ignores what it does not read.

ARGS = (
    # fixed per layer (bound once, see kernel.py)
    "vals, bm, nbytes, offs, scales, gstride, gs, bias, actc, nfull, tailbytes, nfull16, tail16, "
    "cap, rowsum, "
    # per call (so one kernel may run in several threads at once)
    "y, xa, xstride, xt, lw, xs, acc, xq, xqstride, limb, sxs, ibuf, vbuf, obuf"
)


def _add_row_start(add, i: int) -> None:
    """Source that starts row ``i`` of a block at ``r``: its row ``rr{i}``, value offset ``p{i}``
    and mask byte ``mb{i}``. The last block of a range repeats its last row instead of running
    past it: the repeats write the same value again, and one code path serves every row count."""
    add(f"rr{i} = min(r + {i}, r1 - 1)")
    add(f"p{i} = offs[rr{i}]")
    add(f"mb{i} = rr{i} * nbytes")


def _rows_block_vnni(vt: str, R: int, BT: int, indent: str) -> list[str]:
    """int8/int4 rows: ``x`` comes as three byte limbs of a 24-bit fixed-point copy (see
    :func:`quantize_x24`), so a 64-column chunk is one byte expand and three ``vpdpbusd`` per batch
    row: an exact integer dot product instead of 16 shift/convert/FMA instructions. int8 removes
    the limbs' ``2^23`` offset once per row (``rowsum``); int4 folds the integer sums into float32
    at every scale group, removing the offset with a fourth ``vpdpbusd`` that sums the levels."""
    int4 = vt == "int4"
    L: list[str] = []
    add = lambda s, ind="": L.append(indent + ind + s)  # noqa: E731

    def reset(ind: str) -> None:
        for i in range(R):
            if int4:
                add(f"qs{i} = vizero()", ind)
            for b in range(BT):
                for k in range(3):
                    add(f"a{i}_{b}_{k} = vizero()", ind)

    def fold(ind: str) -> None:
        for i in range(R):
            add(f"sc{i} = vbroadcast(scales[rr{i} * gstride + g])", ind)
            for b in range(BT):
                add(
                    f"f{i}_{b} = vfma(fold_limbs(a{i}_{b}_0, a{i}_{b}_1, a{i}_{b}_2, qs{i}), "
                    f"sc{i}, f{i}_{b})",
                    ind,
                )

    for i in range(R):
        _add_row_start(add, i)
        if int4:
            for b in range(BT):
                add(f"f{i}_{b} = vzero()")
    reset("")
    if int4:
        add("g = 0")
        add("gnext = gs")
        add("ones = vones_bytes()")

    def chunk(mask_expr: str, ind: str) -> None:
        if int4:
            # gs is a multiple of 64, so a chunk never straddles two scale groups
            add("if c * 64 >= gnext:", ind)
            fold(ind + "    ")
            reset(ind + "    ")
            add("    g += 1", ind)
            add("    gnext += gs", ind)
        for b in range(BT):
            for k in range(3):
                add(f"q{b}_{k} = vload_bytes(xq, (b0 + {b}) * xqstride + {k} * limb + c * 64)", ind)
        for i in range(R):
            add(f"m{i} = {mask_expr.format(i=i)}", ind)
            add(f"e{i} = {'expand_i4x64_bytes' if int4 else 'expand_i8x64_bytes'}(vals, p{i}, m{i})", ind)
            add(f"p{i} += popcount(m{i})", ind)
            if PREFETCH_BYTES:
                add(f"prefetch(vals, p{i}{' >> 1' if int4 else ''}, {PREFETCH_BYTES})", ind)
                add(f"prefetch(bm, mb{i} + c * 8, {PREFETCH_BYTES})", ind)
            if int4:
                add(f"qs{i} = vdpbusd(qs{i}, ones, e{i})", ind)
            for b in range(BT):
                for k in range(3):
                    add(f"a{i}_{b}_{k} = vdpbusd(a{i}_{b}_{k}, q{b}_{k}, e{i})", ind)

    # one loop body for every chunk (compile time): the last, partial chunk reads only its bytes
    add("for c in range(nfull + (tailbytes > 0)):")
    chunk("load_u64(bm, mb{i} + c * 8) if c < nfull else load_tail(bm, mb{i} + c * 8, tailbytes)", "    ")
    if int4:
        fold("")
    for i in range(R):
        for b in range(BT):
            if int4:
                add(
                    f"y[b0 + {b}, rr{i}] = act(np.float64(vsum(f{i}_{b})) * sxs[b0 + {b}] "
                    f"+ bias[rr{i}], actc)"
                )
                continue
            # sum q*(u0 + 256 u1 + 65536 u2) - 2^23 sum q, with 2^23 = 65536 * 128, all exact in int64
            add(
                f"dot = vsum_i64(a{i}_{b}_0) + 256 * vsum_i64(a{i}_{b}_1) + "
                f"65536 * (vsum_i64(a{i}_{b}_2) - 128 * rowsum[rr{i}])"
            )
            add(
                f"y[b0 + {b}, rr{i}] = act(np.float64(dot) * sxs[b0 + {b}] * scales[rr{i}] "
                f"+ bias[rr{i}], actc)"
            )
    return L


def _rows_block_bf16(R: int, BT: int, indent: str) -> list[str]:
    """bf16 rows with ``vdpbf16ps``: ``x`` comes as two bf16 halves (``hi + lo``, see
    :func:`split_bf16`), so a 32-column chunk is one word expand and two dot-product instructions
    per batch row; the shift/mask to float32 of the generic float path disappears."""
    L: list[str] = []
    add = lambda s, ind="": L.append(indent + ind + s)  # noqa: E731
    for i in range(R):
        _add_row_start(add, i)
        for b in range(BT):
            add(f"a{i}_{b}_0 = vzero()")
            add(f"a{i}_{b}_1 = vzero()")
    add("for c in range(nfull + (tailbytes > 0)):")
    ind = "    "
    for b in range(BT):
        add(f"h{b} = vload_bytes(xq, (b0 + {b}) * xqstride + c * 64)", ind)
        add(f"l{b} = vload_bytes(xq, (b0 + {b}) * xqstride + limb + c * 64)", ind)
    for i in range(R):
        add(
            f"m{i} = load_u32(bm, mb{i} + c * 4) if c < nfull else load_tail(bm, mb{i} + c * 4, tailbytes)",
            ind,
        )
        add(f"e{i} = expand_bf16x32_raw(vals, p{i}, m{i})", ind)
        add(f"p{i} += popcount(m{i})", ind)
        if PREFETCH_BYTES:
            add(f"prefetch(vals, p{i}, {PREFETCH_BYTES})", ind)
            add(f"prefetch(bm, mb{i} + c * 4, {PREFETCH_BYTES})", ind)
        for b in range(BT):
            add(f"a{i}_{b}_0 = vdpbf16(a{i}_{b}_0, e{i}, h{b})", ind)
            add(f"a{i}_{b}_1 = vdpbf16(a{i}_{b}_1, e{i}, l{b})", ind)
    for i in range(R):
        for b in range(BT):
            add(
                f"y[b0 + {b}, rr{i}] = act(np.float64(vsum(vadd(a{i}_{b}_0, a{i}_{b}_1))) "
                f"+ bias[rr{i}], actc)"
            )
    return L


def _rows_block(vt: str, R: int, BT: int, indent: str) -> list[str]:
    """Source for ``R`` rows in flight starting at ``r``, batch rows ``b0 .. b0+BT-1``."""
    if vt in ("int8", "int4"):
        return _rows_block_vnni(vt, R, BT, indent)
    if vt == "bf16" and BF16_DOT:
        return _rows_block_bf16(R, BT, indent)
    kind, W, loader, expander, K, _ = _VT[vt]
    int4_t = vt == "int4" and BT == 1  # int4 at batch 1: scale the chunk's dot product, not weights
    # one accumulator per vector of the chunk: the chunk's FMAs never wait on each other
    nacc = 1 if int4_t else K
    L: list[str] = []
    add = lambda s, ind="": L.append(indent + ind + s)  # noqa: E731
    for i in range(R):
        _add_row_start(add, i)
        for b in range(BT):
            for a in range(nacc):
                add(f"a{i}_{b}_{a} = vzero()")
    if vt == "int4":
        add("g = -1")
        add("gnext = 0")

    def chunk(mask_expr: str, ind: str) -> None:
        for b in range(BT):
            for k in range(K):
                add(f"x{b}_{k} = vload(xa, (b0 + {b}) * xstride + c * {W} + {16 * k})", ind)
        if vt == "int4":
            # gs is a multiple of W here, so a chunk never straddles two scale groups
            add(f"if c * {W} >= gnext:", ind)
            add("    g += 1", ind)
            add("    gnext += gs", ind)
        for i in range(R):
            add(f"m{i} = {mask_expr.format(i=i)}", ind)
            add(f"{', '.join(f'w{i}_{k}' for k in range(K))}, = {expander}(vals, p{i}, m{i})", ind)
            add(f"p{i} += popcount(m{i})", ind)
            if PREFETCH_BYTES:
                add(f"prefetch(vals, p{i}, {PREFETCH_BYTES})", ind)
                add(f"prefetch(bm, mb{i} + c * {W // 8}, {PREFETCH_BYTES})", ind)

            if vt == "int4":
                add(f"s{i} = vbroadcast(scales[rr{i} * gstride + g])", ind)
                if not int4_t:
                    for k in range(K):
                        add(f"w{i}_{k} = vmul(w{i}_{k}, s{i})", ind)
            for b in range(BT):
                if int4_t:
                    add(f"t4 = vmul(w{i}_0, x{b}_0)", ind)
                    for k in range(1, K):
                        add(f"t4 = vfma(w{i}_{k}, x{b}_{k}, t4)", ind)
                    add(f"a{i}_{b}_0 = vfma(t4, s{i}, a{i}_{b}_0)", ind)
                    continue
                for k in range(K):
                    a = k % nacc
                    add(f"a{i}_{b}_{a} = vfma(w{i}_{k}, x{b}_{k}, a{i}_{b}_{a})", ind)

    add("for c in range(nfull + (tailbytes > 0)):")
    chunk(
        f"{loader}(bm, mb{{i}} + c * {W // 8}) if c < nfull "
        f"else load_tail(bm, mb{{i}} + c * {W // 8}, tailbytes)",
        "    ",
    )
    for i in range(R):
        for b in range(BT):
            expr = f"a{i}_{b}_0"
            for a in range(1, nacc):
                expr = f"vadd({expr}, a{i}_{b}_{a})"
            scale = f" * scales[rr{i}]" if vt == "int8" else ""
            add(f"y[b0 + {b}, rr{i}] = act(np.float64(vsum({expr})){scale} + bias[rr{i}], actc)")
    return L


def rows_source(vt: str, BT: int) -> str:
    """``rows_{BT}``: decode each chunk once, FMA it into ``BT`` batch rows at a time.

    ``B`` must be a multiple of ``BT`` (the caller pads ``x`` and ``y``). Rows go 4 at a time at
    batch tile 1, 2 at tile 2 and 1 at tile 4, so about four accumulator chains are in flight.
    """
    # int4 keeps more live vectors per row (nibble unpack, level sums, float accumulators): half
    # the rows in flight measured best
    R = ROWS_IN_FLIGHT[BT] if vt != "int4" else max(1, ROWS_IN_FLIGHT[BT] // 2)
    body = [f"def rows_{BT}(r0, r1, t, B, {ARGS}):", f"    for b0 in range(0, B, {BT}):", "        r = r0"]
    body.append("        while r < r1:")
    body += _rows_block(vt, R, BT, "            ")
    body.append(f"            r += {R}")
    return "\n".join(body) + "\n"


def nnz_source(vt: str, NL: int) -> str:
    """``nnz_{NL}``: per row, decode (column, value) pairs into L1, then one broadcast-FMA per kept
    value and 16 batch rows (``NL`` vectors: ``B <= 16 * NL``)."""
    kind = _VT[vt][0]
    U = max(1, 4 // NL)  # independent accumulator sets: about four FMA chains in flight
    L = [
        f"def nnz_{NL}(r0, r1, t, B, {ARGS}):",
        "    base = t * cap",
        "    for r in range(r0, r1):",
        "        p = offs[r]",
        "        mb = r * nbytes",
        "        n = 0",
    ]
    if vt == "int4":
        L += ["        g = -1", "        gnext = 0"]

    def decode(mask_expr: str) -> None:
        ind = "            "
        L.append(ind + f"m = {mask_expr}")
        L.append(ind + "k = popcount(m)")
        L.append(ind + "store_column_indices(ibuf, base + n, c * 16, m)")
        L.append(ind + f"v = load_first_f32(vals, p, k, {kind})")
        if vt == "int4":
            L.append(ind + "if c * 16 >= gnext:")
            L.append(ind + "    g += 1")
            L.append(ind + "    gnext += gs")
            L.append(ind + "v = vmul(v, vbroadcast(scales[r * gstride + g]))")
        L.append(ind + "vstore(vbuf, base + n, v)")
        L.append(ind + "n += k")
        L.append(ind + "p += k")

    L.append("        for c in range(nfull16 + (tail16 > 0)):")
    decode("load_u16(bm, mb + c * 2) if c < nfull16 else load_tail(bm, mb + c * 2, tail16)")
    for u in range(U):  # pad to a multiple of U with zero values at column 0
        L += [f"        ibuf[base + n + {u}] = 0", f"        vbuf[base + n + {u}] = 0.0"]
    for u in range(U):
        for lane in range(NL):
            L.append(f"        a{u}_{lane} = vzero()")
    L.append(f"        for j in range(0, n, {U}):")
    for u in range(U):
        L.append(f"            bv = vbroadcast(ld(vbuf, base + j + {u}))")
        L.append(f"            ci = np.int64(ld(ibuf, base + j + {u})) * lw")
        for lane in range(NL):
            L.append(f"            a{u}_{lane} = vfma(bv, vload(xt, ci + {16 * lane}), a{u}_{lane})")
    for lane in range(NL):
        expr = f"a0_{lane}"
        for u in range(1, U):
            expr = f"vadd({expr}, a{u}_{lane})"
        L.append(f"        vstore(obuf, t * lw + {16 * lane}, {expr})")
    scale = " * scales[r]" if vt == "int8" else ""
    L += [
        "        for b in range(B):",
        f"            y[b, r] = act(np.float64(obuf[t * lw + b]){scale} + bias[r], actc)",
    ]
    return "\n".join(L) + "\n"


def portable_source(vt: str) -> str:
    """``portable``: walk each row's set bits, decode one value at a time, float64 accumulators."""
    deq = {
        "fp32": "np.float64(vals[p])",
        "bf16": "np.float64(bf16_to_f32(vals[p]))",
        "fp16": "np.float64(f16_to_f32(vals[p]))",
        "int8": "np.float64(vals[p])",
        "int4": "np.float64((((np.int64(vals[p >> 1]) >> (4 * (p & 1))) & 15) ^ 8) - 8)"
        " * scales[r * gstride + col // gs]",
    }[vt]
    scale = " * scales[r]" if vt == "int8" else ""
    return f"""def portable(r0, r1, t, B, {ARGS}):
    for r in range(r0, r1):
        for b in range(B):
            acc[t, b] = 0.0
        p = offs[r]
        for byte in range(nbytes):
            bits = np.int64(bm[r * nbytes + byte])
            while bits != 0:
                low = bits & -bits
                col = byte * 8 + popcount(low - 1)
                bits ^= low
                v = {deq}
                for b in range(B):
                    acc[t, b] += v * xs[b, col]
                p += 1
        for b in range(B):
            y[b, r] = act(acc[t, b]{scale} + bias[r], actc)
"""


def module_source(vt: str) -> str:
    """The whole generated module for one value type (every family; each compiles on first use)."""
    parts = [
        f'"""Generated by sparsec.codegen.cpu.bitmask for value type {vt}; do not edit."""',
        "import numpy as np",
        "from numba import njit",
        "from sparsec.codegen.cpu.simd import *  # noqa: F401,F403",
        "from sparsec.codegen.cpu.bitmask import act",
        f"_JIT = dict({', '.join(f'{k}={v!r}' for k, v in _JIT.items())}, cache=True)",
    ]
    for src in [rows_source(vt, bt) for bt in ROWS_TILES] + [nnz_source(vt, nl) for nl in NNZ_LANES]:
        parts.append("\n@njit(**_JIT)\n" + src)
    parts.append("\n@njit(**_JIT)\n" + portable_source(vt))
    return "\n".join(parts) + "\n"


ROWS_TILES: tuple[int, ...] = (1, 2, 4)
#: bf16 rows kernels use ``vdpbf16ps`` (AVX512-BF16) against ``x`` split in two bf16 halves:
#: measured 25-33% faster than widening the weights to float32 (1.21 vs 1.62 ns a chunk in L3)
BF16_DOT: bool = host_features().avx512bf16
#: software prefetch distance along each row's value and mask streams, in bytes (0: none). A row
#: is a short stream (a 4096-column row at 75% sparsity is ~1 KB of int8), too short for the
#: hardware prefetcher to lock on before it ends. Measured at 4096x4096, batch 1, CPU time (us)
#: for bf16 / int8 / fp16 at 75%: none 766 / ~590 / ~1540; 2 KiB 757 / 429 / 820; 16-32 KiB
#: 506-555 / 341-387 / 639-710 (a plateau from 8 KiB to 64 KiB).
PREFETCH_BYTES = 16384
#: rows decoded together per batch tile: enough independent offset chains and accumulators to
#: keep the core busy (8 rows at batch 1 measured no better than 4 on Zen 4)
ROWS_IN_FLIGHT: dict[int, int] = {1: 4, 2: 2, 4: 1}
NNZ_LANES: tuple[int, ...] = (1, 2, 4)
_JIT = dict(nogil=True, fastmath=True, boundscheck=False, error_model="numpy")


# --------------------------------------------------------------------------- compiled modules


def kernel_module(vt: str):
    """The generated module of value type ``vt`` (see :func:`.codecache.generated_module`)."""
    return generated_module(f"bitmask_{vt}", lambda: module_source(vt))


def kernel_function(vt: str, family: str, param: int = 0):
    """``rows_{BT}``, ``nnz_{NL}`` or ``portable`` of value type ``vt`` (a Numba dispatcher)."""
    mod = kernel_module(vt)
    return getattr(mod, family if family == "portable" else f"{family}_{param}")
