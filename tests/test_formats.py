"""Property tests of every storage format x value type (pack, unpack, nbytes, tensors, validation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sparsec.formats import (
    VALUE_TYPES,
    BitmaskWeight,
    FormatError,
    format_class,
    pack,
    registered_formats,
)
from sparsec.formats.csr import narrowest_index_dtype
from sparsec.formats.values import pack_int4, unpack_int4

FORMATS = ("dense", "bitmask", "csr", "nm", "block")
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_weight(rows: int, cols: int, sparsity: float, seed: int, magnitude: float) -> torch.Tensor:
    """A random masked weight; with 3+ rows, row 0 is empty and row 1 fully dense."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(torch.float32) * magnitude
    keep = torch.rand(rows, cols, generator=g) >= sparsity
    if rows >= 3:
        keep[0] = False
        keep[1] = True
    return w * keep


def random_nm_weight(rows: int, groups: int, n: int, m: int, seed: int, magnitude: float) -> torch.Tensor:
    """A random N:M-sparse weight whose groups keep between 0 and n values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=g) * magnitude
    rank = torch.rand(rows, groups, m, generator=g).argsort(dim=2).argsort(dim=2)
    k = torch.randint(0, n + 1, (rows, groups, 1), generator=g)
    if rows and groups:
        k[0, 0] = n  # at least one full group
    return w * (rank < k).reshape(rows, groups * m)


@st.composite
def cases(draw, formats=FORMATS, value_types=VALUE_TYPES):
    fmt = draw(st.sampled_from(formats))
    value_type = draw(st.sampled_from(value_types))
    rows = draw(st.sampled_from([0, 1, 2, 3]) | st.integers(1, 13))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    options: dict[str, object] = {}
    if value_type == "int4":
        options["group_size"] = draw(st.sampled_from([1, 3, 8, 16, 128]))
    if fmt == "nm":
        m = draw(st.sampled_from([2, 4, 8, 16, 5]))
        n = draw(st.integers(1, m))
        options.update(n=n, m=m)
        w = random_nm_weight(rows, draw(st.integers(0, 9)), n, m, seed, magnitude)
    else:
        if fmt == "block":
            options["block_shape"] = draw(st.sampled_from([(1, 16), (4, 4), (2, 3), (1, 1), "8x1"]))
        cols = draw(st.sampled_from([1, 7, 8, 9, 33]) | st.integers(0, 41))
        sparsity = draw(st.sampled_from([0.0, 0.5, 0.75, 0.9, 1.0]) | st.floats(0.0, 1.0))
        w = random_weight(rows, cols, sparsity, seed, magnitude)
    return fmt, value_type, w, options


def per_value_scale(packed, cols: int) -> torch.Tensor:
    if packed.value_type == "int8":
        return packed.scales[:, None].expand(-1, cols)
    return packed.scales.repeat_interleave(packed.group_size, dim=1)[:, :cols]


def reference_scales(w: torch.Tensor, value_type: str, group_size: int) -> torch.Tensor:
    """float64 scales computed from the definition, independently of the code under test."""
    a = w.abs().to(torch.float64)
    if value_type == "int8":
        return a.amax(dim=1) / 127 if w.shape[1] else torch.zeros(w.shape[0], dtype=torch.float64)
    groups = math.ceil(w.shape[1] / group_size)
    out = torch.zeros(w.shape[0], groups, dtype=torch.float64)
    for gi in range(groups):
        out[:, gi] = a[:, gi * group_size : (gi + 1) * group_size].amax(dim=1) / 7
    return out


@SETTINGS
@given(cases())
def test_unpack_reproduces_the_weight(case):
    fmt, value_type, w, options = case
    before = w.clone()
    packed = pack(w, fmt, value_type, **options)
    assert torch.equal(w, before), "pack must not modify its input"
    out = packed.unpack()
    assert out.dtype == torch.float32 and out.shape == w.shape
    # Pruned positions come back exactly zero in every format and value type.
    assert torch.all(out[w == 0] == 0)
    if value_type in FLOAT_DTYPES:
        assert torch.equal(out, w.to(FLOAT_DTYPES[value_type]).to(torch.float32))
        return
    group_size = options.get("group_size", 128)
    ref = reference_scales(w, value_type, group_size)
    torch.testing.assert_close(packed.scales.to(torch.float64), ref, rtol=1e-6, atol=0)
    step = per_value_scale(packed, w.shape[1]).to(torch.float64)
    err = (out.to(torch.float64) - w.to(torch.float64)).abs()
    # Within half a quantization step (float32 rounding of w/scale and q*scale aside).
    assert torch.all(err <= step * 0.5 * (1 + 1e-5) + 1e-6 * w.abs().to(torch.float64))


@SETTINGS
@given(cases())
def test_nbytes_counts_every_stored_byte(case):
    fmt, value_type, w, options = case
    packed = pack(w, fmt, value_type, **options)
    tensors = packed.tensors("layer")
    assert packed.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    assert packed.bits_per_weight() == pytest.approx(8 * packed.nbytes() / max(1, w.numel()))


@SETTINGS
@given(cases())
def test_tensors_round_trip_through_safetensors(case):
    fmt, value_type, w, options = case
    packed = pack(w, fmt, value_type, **options)
    tensors = packed.tensors("model.layers.0.mlp.up_proj")
    assert all(k.startswith("model.layers.0.mlp.up_proj.") for k in tensors)
    loaded = st_load(st_save(tensors))
    again = format_class(fmt).from_tensors("model.layers.0.mlp.up_proj", loaded, **packed.options())
    assert again.value_type == value_type and again.shape == tuple(w.shape)
    assert torch.equal(again.unpack(), packed.unpack())
    assert again.nbytes() == packed.nbytes()
    assert again.options() == packed.options()


def _corruptions(tensors: dict[str, torch.Tensor]):
    """(description, name, mutated dict) for a missing tensor, a wrong dtype and a wrong shape."""
    for name, t in tensors.items():
        yield "missing", name, {k: v for k, v in tensors.items() if k != name}
        yield "dtype", name, {**tensors, name: t.to(torch.float64)}
        longer = torch.cat([t.reshape(-1), t.reshape(-1)[:1] if t.numel() else torch.zeros(1, dtype=t.dtype)])
        yield "shape", name, {**tensors, name: longer}


@settings(max_examples=15, deadline=None)
@given(cases())
def test_malformed_tensors_are_rejected_naming_the_tensor(case):
    fmt, value_type, w, options = case
    packed = pack(w, fmt, value_type, **options)
    cls = format_class(fmt)
    for what, name, broken in _corruptions(packed.tensors("p")):
        with pytest.raises(FormatError) as info:
            cls.from_tensors("p", broken, **packed.options())
        assert name in str(info.value), f"{what} {name}: {info.value}"


# -- the bitmask layout, byte for byte ------------------------------------------------------------


def test_bitmask_layout_matches_the_compressed_tensors_definition():
    w = random_weight(5, 21, 0.6, seed=3, magnitude=1.0)
    p = BitmaskWeight.pack(w, "fp32")
    t = p.tensors("m")
    mask = (w != 0).numpy()
    assert t["m.shape"].dtype == torch.int64 and t["m.shape"].tolist() == [5, 21]
    np.testing.assert_array_equal(t["m.bitmask"].numpy(), np.packbits(mask, axis=-1, bitorder="little"))
    assert torch.equal(t["m.compressed"], w[w != 0])
    counts = mask.sum(axis=1)
    np.testing.assert_array_equal(t["m.row_offsets"].numpy(), np.cumsum(counts) - counts)
    assert t["m.row_offsets"].dtype == torch.int64


def test_bitmask_arrays_give_kernels_the_raw_data():
    w = random_weight(6, 19, 0.5, seed=4, magnitude=1.0)
    for value_type in VALUE_TYPES:
        p = BitmaskWeight.pack(w, value_type, group_size=8)
        a = p.arrays()
        assert (a.rows, a.cols, a.value_type, a.group_size) == (6, 19, value_type, 8)
        assert a.bitmask.dtype == np.uint8 and a.row_offsets.dtype == np.int64
        if value_type == "bf16":
            # uint16 bit patterns: shifting into the top half of a float32 gives the value.
            decoded = (a.values.astype(np.uint32) << 16).view(np.float32)
            np.testing.assert_array_equal(decoded, p.compressed.to(torch.float32).numpy())
        else:
            np.testing.assert_array_equal(a.values, p.compressed.numpy())
        assert (a.scales is None) == (value_type not in ("int8", "int4"))


def test_int4_nibble_order_and_sign():
    levels = torch.tensor([1, -1, 7, -8, 3], dtype=torch.int8)
    packed = pack_int4(levels)
    assert packed.tolist() == [0x1 | (0xF << 4), 0x7 | (0x8 << 4), 0x3]
    assert torch.equal(unpack_int4(packed, 5), levels)


def test_int4_rows_may_start_mid_byte_in_bitmask():
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, -3.0, 0.0], [4.0, 5.0, 6.0]])
    p = BitmaskWeight.pack(w, "int4", group_size=128)
    assert p.row_offsets.tolist() == [0, 2, 3]
    assert p.compressed.numel() == 3  # six values, two a byte
    assert torch.all((p.unpack() - w).abs() <= per_value_scale(p, 3) / 2 + 1e-6)


def test_csr_uses_the_narrowest_index_types():
    assert narrowest_index_dtype(255) == torch.uint8
    assert narrowest_index_dtype(256) == torch.int16
    assert narrowest_index_dtype(40_000) == torch.int32
    w = random_weight(4, 300, 0.5, seed=5, magnitude=1.0)
    p = pack(w, "csr")
    assert p.indices.dtype == torch.int16 and p.indptr.dtype == torch.int16
    p = pack(w[:, :200], "csr")
    assert p.indices.dtype == torch.uint8


def test_nm_stores_n_values_and_compact_positions():
    w = random_nm_weight(8, 16, 2, 4, seed=6, magnitude=1.0)
    p = pack(w, "nm", "fp16", n=2, m=4)
    assert p.values.numel() == 8 * 16 * 2
    assert tuple(p.indices.shape) == (8, 16 * 2 * 2 // 8)  # 2 bits a position
    assert p.bits_per_weight() == pytest.approx(16 * 0.5 + 2 * 0.5 + 8 * 16 / (8 * 64))


# -- errors a user can cause ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: pack(w, "nm"), "not 2:4 sparse: row 1, columns 0..3 keep 4"),
        (lambda w: pack(w[:, :6], "nm", n=1, m=4), "divisible by 4"),
        (lambda w: pack(w, "nm", n=3, m=2), "n <= m"),
        (lambda w: pack(w, "bitmask", "int3"), "unknown value type 'int3'"),
        (lambda w: pack(w, "coo"), "unknown format 'coo'"),
        (lambda w: pack(w, "bitmask", block_shape=(4, 4)), "unknown option(s) block_shape"),
        (lambda w: pack(w, "block", block_shape="4by4"), "block_shape must be"),
        (lambda w: pack(w, "dense", "int4", group_size=0), "group_size must be a positive integer"),
        (lambda w: pack(w[None], "dense"), "2-D"),
        (lambda w: pack(w.to(torch.int32), "dense"), "floating-point"),
        (lambda w: pack(w * 1e6, "bitmask", "fp16"), "beyond the range of fp16"),
        (lambda w: pack(w, "bitmask", "int8", scales=torch.ones(3)), "must have shape (4,), got (3,)"),
        (lambda w: pack(w, "csr", "int8", scales=-torch.ones(4)), "finite and non-negative"),
        (lambda w: pack(w, "dense", "bf16", scales=torch.ones(4)), "scales apply to int8/int4"),
    ],
)
def test_bad_input_gives_a_clear_error(call, message):
    w = random_weight(4, 8, 0.0, seed=7, magnitude=1.0)
    with pytest.raises(FormatError) as info:
        call(w)
    assert message in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = random_weight(3, 5, 0.0, seed=8, magnitude=1.0)
    w[1, 2] = bad
    for fmt in FORMATS:
        with pytest.raises(FormatError, match="NaN or Inf"):
            format_class(fmt).pack(w)


def test_semantic_corruption_is_caught():
    w = random_weight(6, 20, 0.5, seed=9, magnitude=1.0)
    t = pack(w, "bitmask").tensors("x")
    flipped = t["x.bitmask"].clone()
    flipped[2, 0] ^= 1
    with pytest.raises(FormatError, match="x.row_offsets"):
        BitmaskWeight.from_tensors("x", {**t, "x.bitmask": flipped})
    padded = t["x.bitmask"].clone()
    padded[0, -1] |= 0x80  # column 23 of a 20-column row
    with pytest.raises(FormatError, match="x.bitmask.*past column 20"):
        BitmaskWeight.from_tensors("x", {**t, "x.bitmask": padded})

    c = pack(w, "csr").tensors("c")
    rev = c["c.indices"].clone()
    rev[:2] = rev[:2].flip(0)
    with pytest.raises(FormatError, match="c.indices.*strictly increase"):
        format_class("csr").from_tensors("c", {**c, "c.indices": rev})

    wn = random_nm_weight(3, 4, 2, 4, seed=10, magnitude=1.0)
    n = pack(wn, "nm").tensors("n")
    idx = n["n.indices"].clone()
    idx[0, 0] = 0b0000_0101  # positions 1, 1: not increasing
    with pytest.raises(FormatError, match="n.indices"):
        format_class("nm").from_tensors("n", {**n, "n.indices": idx})

    b = pack(random_weight(5, 6, 0.3, seed=11, magnitude=1.0), "block", block_shape=(4, 4))
    bt = b.tensors("b")
    vals = bt["b.values"].clone()
    vals[-1] = 1.0  # last block's bottom-right corner lies past the 5x6 edge
    with pytest.raises(FormatError, match="b.values.*padding"):
        format_class("block").from_tensors("b", {**bt, "b.values": vals}, **b.options())

    q = pack(w, "bitmask", "int4", group_size=8)
    with pytest.raises(FormatError, match="group_size the weight was packed with"):
        BitmaskWeight.from_tensors("q", q.tensors("q"), group_size=16)


def test_every_format_is_registered():
    assert set(FORMATS) <= set(registered_formats())


def test_the_example_in_docs_formats_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    blocks = text.split("```python\n")[1:]
    assert blocks, "docs/formats.md lost its example"
    for block in blocks:
        exec(compile(block.split("```")[0], "docs/formats.md", "exec"), {})
