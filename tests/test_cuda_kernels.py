"""CUDA sparse kernels against float64 references.

Runs on a real GPU when one is present, else under numba's CUDA simulator (set before numba is
imported, here as in the suite's conftest), with small shapes because the simulator runs every
GPU thread as a Python thread.

Tolerance: the kernels accumulate in float32, so each output may differ from the float64
reference by at most ``TOL * sum_k |w_k x_k|`` (plus half an fp16 ulp of the result when the
output is fp16). The reference uses the packed weight's own dequantized values
(``packed.unpack()``), so quantization error is not part of the comparison.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparsec.codegen.cuda import (  # noqa: E402
    BITMASK_DESIGNS,
    CudaUnavailableError,
    build_linear_kernel,
    cuda_available,
)
from sparsec.formats import pack  # noqa: E402

MMA_VALUE_TYPES = ("fp16", "int8")  # what the tensor-core design runs (bitmask_mma.VALUE_TYPES)

USABLE, WHY = cuda_available()
if USABLE:
    from sparsec.codegen.cuda._compat import is_simulator
    from sparsec.codegen.cuda.device import cuda

    SIMULATED = is_simulator()
    if not SIMULATED and not torch.cuda.is_available():
        USABLE, WHY = False, "a GPU is present but torch has no CUDA support to hand it tensors"
ON_GPU = USABLE and not SIMULATED
pytestmark = pytest.mark.skipif(not USABLE, reason=f"no CUDA target: {WHY}")

TOL = 2e-6
ACTS = {
    None: lambda v: v,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
}


def sparse_weight(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    """Random weight with about ``density`` kept, plus an empty row and a fully dense row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    if rows >= 3:
        w[1] = 0.0
        w[2] = torch.randn(cols, generator=g)
    return w


def run(kernel, x: torch.Tensor) -> torch.Tensor:
    if ON_GPU:
        return kernel(x.cuda()).cpu()
    return kernel(x)


def tolerance(design: str | None, cols: int) -> float:
    """The relative tolerance of a kernel: ``TOL``, except for the tensor-core design on a GPU,
    whose ``mma`` may truncate where an IEEE add rounds (about one float32 ulp a 16-column step);
    the simulator emulates it with IEEE arithmetic, so there the tight bound holds."""
    if design == "mma" and ON_GPU:
        return TOL * max(1.0, cols / 64)
    return TOL


def check(y: torch.Tensor, packed, x: torch.Tensor, bias=None, activation=None, tol: float = TOL) -> None:
    w = packed.unpack().double()
    xd = x.double()
    pre = xd @ w.T
    if bias is not None:
        pre = pre + bias.double()
    ref = ACTS[activation](pre)
    magnitude = xd.abs() @ w.abs().T + (bias.double().abs() if bias is not None else 0.0)
    bound = tol * magnitude + 1e-7
    if y.dtype == torch.float16:
        bound = bound + ref.abs() * 2.0**-11 + 2.0**-24
    assert y.shape == ref.shape
    err = (y.double() - ref).abs()
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, (
        f"max error {err.max().item():.3g} over bound {bound.flatten()[err.argmax()].item():.3g}"
    )


@pytest.mark.parametrize("design", BITMASK_DESIGNS)
@pytest.mark.parametrize("value_type", ["fp32", "bf16", "fp16", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 5, 12])  # 12: bucket 16, x read by column (not staged)
def test_bitmask_value_types(value_type: str, batch: int, design: str) -> None:
    # rows not a multiple of the rows a block, cols not a multiple of 8, 32 or 64.
    w = sparse_weight(9, 77, 0.4, seed=batch)
    options = {"group_size": 16} if value_type == "int4" else {}
    packed = pack(w, "bitmask", value_type, **options)
    x = torch.randn(batch, 77, generator=torch.Generator().manual_seed(7))
    if design == "mma" and value_type not in MMA_VALUE_TYPES:
        expected = (f"the CUDA bitmask design 'mma' takes fp16 or int8 values, not {value_type}; "
                    "quantize to one of those or choose design 'lanes'")
        with pytest.raises(ValueError, match=expected):
            build_linear_kernel(packed, design=design)
        return
    kernel = build_linear_kernel(packed, design=design)
    check(run(kernel, x), packed, x, tol=tolerance(design, 77))


@pytest.mark.parametrize("design", ["lanes", "runs"])
@pytest.mark.parametrize("batch", [3, 12])  # buckets 4 and 16, neither staged at 3100 columns
def test_lane_designs_read_fp16_x_by_column(design: str, batch: int) -> None:
    # x by column, [cols, bucket] fp16: a column's batch values are one row of 8 or 32 bytes,
    # read a vector at a time on a GPU; the rows past ``batch`` are the launcher's zeros.
    w = sparse_weight(5, 3100, 0.25, seed=batch)
    packed = pack(w, "bitmask", "fp16")
    kernel = build_linear_kernel(packed, design=design)
    assert kernel.x_layout_for(batch) == "by-column"
    x = torch.randn(batch, 3100, generator=torch.Generator().manual_seed(batch)).half()
    y = run(kernel, x)
    assert y.dtype == torch.float16
    check(y, packed, x)


@pytest.mark.parametrize("value_type", ["fp32", "bf16", "fp16", "int8", "int4"])
def test_lane_layout_is_a_permutation_of_the_stored_bytes(value_type: str) -> None:
    # 1100 columns: a full tile and a partial one; the permutation must be undone exactly.
    from sparsec.codegen.cuda import bitmask_lanes

    w = sparse_weight(6, 1100, 0.3, seed=21)
    packed = pack(w, "bitmask", value_type, **({"group_size": 32} if value_type == "int4" else {}))
    a = packed.arrays()
    lanes = bitmask_lanes.prepare_arrays(a.rows, a.cols, a.value_type, a.values, a.bitmask, a.row_offsets,
                                         a.scales)
    dense = np.unpackbits(a.bitmask, axis=1, count=a.cols, bitorder="little").astype(bool)
    tiles = lanes.mask.shape[1] // 32
    bits = np.unpackbits(lanes.mask.view(np.uint8).reshape(6, tiles, 32, 4), axis=3, bitorder="little")
    back = bits.reshape(6, tiles, 32, 32).transpose(0, 1, 3, 2).reshape(6, tiles * 1024)
    assert np.array_equal(back[:, : a.cols].astype(bool), dense) and not back[:, a.cols :].any()
    nnz = int(dense.sum())
    stored = bitmask_lanes._value_elements(a.values, value_type, nnz)
    permuted = bitmask_lanes._value_elements(lanes.words.view(np.uint8), value_type, nnz)
    assert sorted(stored.tolist()) == sorted(permuted.tolist())  # same values, only reordered
    assert np.array_equal(lanes.row_offsets, a.row_offsets.astype(np.int32))
    # Row 0's first tile: lane-major order is column order of (col % 32, col // 32).
    cols0 = np.flatnonzero(dense[0, :1024])
    lane_order = cols0[np.lexsort((cols0 // 32, cols0 % 32))]
    rank = {c: i for i, c in enumerate(cols0)}
    assert np.array_equal(permuted[: cols0.size], stored[[rank[c] for c in lane_order]])


@pytest.mark.parametrize("value_type", ["fp32", "bf16", "int8", "int4"])
def test_row_run_layout_pads_lane_runs_of_the_stored_values(value_type: str) -> None:
    # The ``runs`` layout: the lane-word mask; each row's values run lane by lane across all of
    # its tiles, each lane's run padded with zeros to whole 32-bit words (1100 columns: two tiles).
    from sparsec.codegen.cuda import bitmask_lanes
    from sparsec.codegen.cuda.values import VALUES_PER_U32

    w = sparse_weight(6, 1100, 0.3, seed=22)
    packed = pack(w, "bitmask", value_type, **({"group_size": 32} if value_type == "int4" else {}))
    a = packed.arrays()
    runs = bitmask_lanes.prepare_arrays(a.rows, a.cols, a.value_type, a.values, a.bitmask, a.row_offsets,
                                        a.scales, row_runs=True)
    lanes = bitmask_lanes.prepare_arrays(a.rows, a.cols, a.value_type, a.values, a.bitmask, a.row_offsets,
                                         a.scales)
    assert np.array_equal(runs.mask, lanes.mask)
    dense = np.unpackbits(a.bitmask, axis=1, count=a.cols, bitorder="little").astype(bool)
    nnz = int(dense.sum())
    per_word = VALUES_PER_U32[value_type]
    stored = bitmask_lanes._value_elements(a.values, value_type, nnz)
    permuted = bitmask_lanes._value_elements(runs.words.view(np.uint8), value_type, runs.words.size * per_word)
    at = 0
    for r in range(6):
        assert runs.row_offsets[r] == at and at % per_word == 0
        cols_r = np.flatnonzero(dense[r])
        rank = {c: i for i, c in enumerate(cols_r)}
        for lane in range(32):
            mine = cols_r[cols_r % 32 == lane]  # column order is (tile, j) order for one lane
            expect = stored[[int(a.row_offsets[r]) + rank[c] for c in mine]]
            padded = -(-mine.size // per_word) * per_word
            assert np.array_equal(permuted[at : at + mine.size], expect)
            assert not permuted[at + mine.size : at + padded].any()
            at += padded
    assert at <= permuted.size < at + per_word + 1


def test_unknown_bitmask_design_is_refused() -> None:
    packed = pack(sparse_weight(4, 16, 0.5, seed=1), "bitmask", "fp16")
    expected = "unknown bitmask kernel design 'fast'; choose one of lanes, runs, tiles, mma"
    with pytest.raises(ValueError, match=expected):
        build_linear_kernel(packed, design="fast")


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "gelu_tanh"])
def test_bitmask_bias_and_activation(activation: str) -> None:
    w = sparse_weight(6, 40, 0.5, seed=3)
    packed = pack(w, "bitmask", "fp16")
    bias = torch.randn(6)
    x = torch.randn(2, 40)
    kernel = build_linear_kernel(packed, bias=bias, activation=activation)
    check(run(kernel, x), packed, x, bias, activation)


def test_bitmask_several_tiles_and_int8_bias() -> None:
    # 2100 columns: two 2048-column tiles, the second one partial; rows span two blocks.
    w = sparse_weight(5, 2100, 0.2, seed=11)
    packed = pack(w, "bitmask", "int8")
    bias = torch.randn(5)
    x = torch.randn(3, 2100)
    check(run(build_linear_kernel(packed, bias=bias), x), packed, x, bias)


@pytest.mark.parametrize("fmt", ["bitmask", "bitmask-runs", "bitmask-tiles", "bitmask-mma", "nm"])
@pytest.mark.parametrize("warps", [1, 3, 8])
def test_rows_per_block_is_a_tuning_knob_that_keeps_results(fmt: str, warps: int) -> None:
    # 10 rows: a partial last block for every block size; 2100 columns: two or three tiles
    # (mma: warps are column slices; 1100 columns, 18 chunks split 1, 3 or 8 ways, as slow a
    # walk for one warp on the simulator as it gets)
    design = fmt.split("-")[1] if fmt.startswith("bitmask-") else None
    cols = 1100 if design == "mma" else 2100
    w = sparse_weight(10, cols, 0.3, seed=warps) if fmt != "nm" else nm_weight(10, cols, 2, 4, seed=warps)
    packed = pack(w, fmt.split("-")[0], "fp16", **({"n": 2, "m": 4} if fmt == "nm" else {}))
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(warps))
    kernel = build_linear_kernel(packed, warps_per_block=warps, design=design)
    check(run(kernel, x), packed, x, tol=tolerance(design, cols))


def test_rows_per_block_outside_its_range_is_refused() -> None:
    packed = pack(sparse_weight(4, 16, 0.5, seed=1), "bitmask", "fp16")
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match="warps_per_block must be an integer from 1 to 8"):
            build_linear_kernel(packed, warps_per_block=bad)


def test_bitmask_int4_group_straddles_tile_and_fp16_input() -> None:
    w = sparse_weight(4, 2090, 0.3, seed=5)
    packed = pack(w, "bitmask", "int4", group_size=100)
    x = torch.randn(1, 2090).half()
    y = run(build_linear_kernel(packed, activation="relu"), x)
    assert y.dtype == torch.float16
    check(y, packed, x, activation="relu")


def test_leading_dims_and_batches_above_sixteen() -> None:
    w = sparse_weight(5, 33, 0.5, seed=2)
    packed = pack(w, "bitmask", "bf16")
    x = torch.randn(2, 9, 33)  # 18 rows: one launch of 16, one of 2
    y = run(build_linear_kernel(packed), x)
    assert y.shape == (2, 9, 5)
    check(y.reshape(18, 5), packed, x.reshape(18, 33))


@pytest.mark.parametrize("design", ["lanes", "mma"])
def test_large_batches_run_as_one_dense_product(design: str) -> None:
    # From dense_from rows on, one cuBLAS product on the dense weight, made on first use and
    # kept; below it, sparse launches of 16 rows, and no dense copy.
    w = sparse_weight(12, 96, 0.3, seed=51)
    packed = pack(w, "bitmask", "int8")
    bias = torch.randn(12, generator=torch.Generator().manual_seed(52))
    kernel = build_linear_kernel(packed, bias=bias, activation="gelu", design=design, dense_from=20)
    sparse_bytes = kernel.nbytes()
    x = torch.randn(2, 12, 96, generator=torch.Generator().manual_seed(53))  # 24 rows
    assert not kernel.runs_dense(19) and kernel.runs_dense(24)
    check(run(kernel, x[0, :16]), packed, x[0, :16], bias, "gelu", tol=tolerance(design, 96))
    assert kernel.nbytes() == sparse_bytes  # no dense copy for a sparse call
    y = run(kernel, x)
    assert y.shape == (2, 12, 12)
    check(y.reshape(24, 12), packed, x.reshape(24, 96), bias, "gelu")
    assert kernel.nbytes() == sparse_bytes + 12 * 96 * 4  # the float32 dense weight, kept
    run(kernel, x)
    assert kernel.nbytes() == sparse_bytes + 12 * 96 * 4  # made once


def test_dense_from_default_none_and_bad_values() -> None:
    from sparsec.codegen.cuda import DENSE_FROM_ROWS

    packed = pack(sparse_weight(5, 40, 0.5, seed=54), "bitmask", "fp16")
    assert build_linear_kernel(packed).dense_from == DENSE_FROM_ROWS == 64
    never = build_linear_kernel(packed, dense_from=None)
    x = torch.randn(40, 40, generator=torch.Generator().manual_seed(55))
    assert not never.runs_dense(40)
    check(run(never, x), packed, x)  # three sparse launches: 16, 16 and 8 rows
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="dense_from must be None or a whole number of rows, at least 1"):
            build_linear_kernel(packed, dense_from=bad)


@pytest.mark.skipif(ON_GPU, reason="NumPy inputs are a simulator convenience")
def test_numpy_input_gives_numpy_output() -> None:
    w = sparse_weight(4, 20, 0.5, seed=4)
    packed = pack(w, "bitmask", "fp32")
    x = np.random.default_rng(0).standard_normal((2, 20)).astype(np.float16)
    y = build_linear_kernel(packed)(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float16
    check(torch.from_numpy(y), packed, torch.from_numpy(x))


@settings(max_examples=6, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 150),
    density=st.floats(0.0, 1.0),
    value_type=st.sampled_from(["fp32", "bf16", "fp16", "int8", "int4"]),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    design=st.sampled_from(BITMASK_DESIGNS),
)
def test_bitmask_random_shapes(rows, cols, density, value_type, batch, seed, design) -> None:
    if design == "mma" and value_type not in MMA_VALUE_TYPES:
        value_type = "fp16"  # the types it refuses are checked in test_bitmask_value_types
    w = sparse_weight(rows, cols, density, seed)
    options = {"group_size": 8} if value_type == "int4" else {}
    packed = pack(w, "bitmask", value_type, **options)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed + 1))
    check(run(build_linear_kernel(packed, design=design), x), packed, x, tol=tolerance(design, cols))


def nm_weight(rows: int, cols: int, n: int, m: int, seed: int) -> torch.Tensor:
    """Random N:M-sparse weight (largest N of every M kept), with one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).view(rows, cols // m, m)
    keep = w.abs().topk(n, dim=2).indices
    w = (w * torch.zeros_like(w, dtype=torch.bool).scatter_(2, keep, True)).view(rows, cols)
    if rows >= 2:
        w[1] = 0.0
    return w


@pytest.mark.parametrize("value_type", ["fp32", "bf16", "fp16", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 6])
def test_nm_2_4_value_types(value_type: str, batch: int) -> None:
    # 9 rows (not a multiple of 4), 76 columns: 38 values a row, so rows start mid-piece.
    w = nm_weight(9, 76, 2, 4, seed=batch)
    options = {"group_size": 12} if value_type == "int4" else {}
    packed = pack(w, "nm", value_type, n=2, m=4, **options)
    x = torch.randn(batch, 76, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(9)
    y = run(build_linear_kernel(packed, bias=bias, activation="gelu"), x)
    check(y, packed, x, bias, "gelu")


@pytest.mark.parametrize(("n", "m", "value_type"), [(4, 8, "fp16"), (4, 8, "int4"), (1, 4, "int8")])
def test_nm_other_patterns(n: int, m: int, value_type: str) -> None:
    # 4:8 stores 3-bit positions, which straddle 32-bit words.
    w = nm_weight(5, 96, n, m, seed=n * m)
    options = {"group_size": 32} if value_type == "int4" else {}
    packed = pack(w, "nm", value_type, n=n, m=m, **options)
    x = torch.randn(3, 96).half()
    check(run(build_linear_kernel(packed), x), packed, x)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 8)])
@pytest.mark.parametrize("fmt", ["bitmask", "bitmask-mma", "nm"])
def test_degenerate_layers_give_activation_of_bias(shape, fmt) -> None:
    # No rows, no columns, or an all-zero weight: y = act(bias) exactly, shape [batch, rows].
    bias = torch.linspace(-1.0, 1.0, shape[0])
    mma = fmt == "bitmask-mma"
    packed = pack(torch.zeros(shape), fmt.split("-")[0], "int8" if mma else "int4")
    kernel = build_linear_kernel(packed, bias=bias, activation="relu", design="mma" if mma else None)
    y = run(kernel, torch.randn(2, shape[1]))
    assert y.shape == (2, shape[0])
    assert torch.equal(y, torch.relu(bias).expand(2, -1))


# -- the tensor-core design --------------------------------------------------------------------


@pytest.mark.parametrize(("value_type", "x_dtype"), [
    ("fp16", torch.float16), ("fp16", torch.float32), ("int8", torch.float32),
])
@pytest.mark.parametrize(("rows", "cols", "batch"), [
    (17, 200, 16),  # two row tiles, the second partial; a partial last chunk (x loads clamped)
    (16, 576, 9),  # 9 chunks in 5 slices of 2: one whole padding chunk; bucket 16, 9 rows used
    (5, 256, 8),  # whole chunks (x in 16-byte loads on a GPU), bucket 8: one mma a step
    (3, 77, 1),  # odd columns: x element by element
])
def test_mma_design(value_type: str, x_dtype: torch.dtype, rows: int, cols: int, batch: int) -> None:
    w = sparse_weight(rows, cols, 0.3, seed=rows + cols)
    packed = pack(w, "bitmask", value_type)
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(cols))
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)).to(x_dtype)
    kernel = build_linear_kernel(packed, bias=bias, activation="silu", design="mma")
    y = run(kernel, x)
    assert y.dtype == x_dtype and y.shape == (batch, rows)
    check(y, packed, x, bias, "silu", tol=tolerance("mma", cols))


def test_mma_design_keeps_float32_x_to_float32_accuracy() -> None:
    # float32 x enters the fp16 mma as hi + lo parts. With hi alone (x rounded to fp16) the
    # error would be about 2^-12 of each product: the same bound must then fail, so the test
    # can tell the two apart.
    w = sparse_weight(16, 512, 0.5, seed=31)
    packed = pack(w, "bitmask", "fp16")
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(32))
    check(run(build_linear_kernel(packed, design="mma"), x), packed, x, tol=tolerance("mma", 512))
    rounded = (x.half().double() @ packed.unpack().double().T).float()
    with pytest.raises(AssertionError, match="max error"):
        check(rounded, packed, x, tol=tolerance("mma", 512))


def test_mma_layout_keeps_the_stored_bits_values_and_order() -> None:
    from sparsec.codegen.cuda import bitmask_mma

    w = sparse_weight(20, 200, 0.3, seed=41)
    packed = pack(w, "bitmask", "int8")
    a = packed.arrays()
    slices, per_slice = bitmask_mma.column_slices(200, 8)
    assert (slices, per_slice) == (4, 1)
    laid = bitmask_mma.prepare_arrays(a.rows, a.cols, "int8", a.values, a.bitmask, a.scales, 8)
    cols_p = bitmask_mma.padded_cols(200, 8)
    assert laid.mask.dtype == np.uint64 and laid.mask.size == 32 * cols_p // 64 + 1 and laid.mask[-1] == 0
    bits = np.unpackbits(laid.mask[:-1].view(np.uint8).reshape(32, cols_p // 8), axis=1, bitorder="little")
    dense = np.unpackbits(a.bitmask, axis=1, count=200, bitorder="little")
    assert np.array_equal(bits[:20, :200], dense) and not bits[20:].any() and not bits[:, 200:].any()
    nnz = int(dense.sum())
    # the stored values in stored order, 8 int8 a 64-bit word, then zeros to two words past the last
    assert laid.values.dtype == np.uint64 and laid.values.size == nnz // 8 + 2
    as_bytes = laid.values.view(np.int8)
    assert np.array_equal(as_bytes[:nnz], np.asarray(a.values).reshape(-1).view(np.int8)[:nnz])
    assert not as_bytes[nnz:].any()
    counts = bits.reshape(32, slices, cols_p // slices).sum(axis=2)
    starts = np.concatenate(([0], np.cumsum(counts.reshape(-1))[:-1])).reshape(32, slices)
    assert np.array_equal(laid.slice_offsets.reshape(32, slices), starts)
    assert np.array_equal(laid.scales[:, 0], np.asarray(a.scales, dtype=np.float32).reshape(-1))


@pytest.mark.skipif(ON_GPU, reason="stands in a pre-Ampere GPU for the simulator")
def test_mma_design_refuses_a_gpu_without_its_mma_in_one_line(monkeypatch) -> None:
    from sparsec.codegen.cuda import build

    monkeypatch.setattr(build, "_current_gpu", lambda: ("Tesla T4", (7, 5)))
    packed = pack(sparse_weight(4, 64, 0.5, seed=1), "bitmask", "fp16")
    expected = ("the CUDA bitmask design 'mma' needs compute capability 8.0 or newer; the GPU Tesla T4 has "
                "7.5: choose design 'lanes'")
    with pytest.raises(ValueError, match=expected):
        build_linear_kernel(packed, design="mma")


@pytest.mark.parametrize(("cols", "expected"), [(1, (1, 1)), (576, (5, 2)), (4096, (8, 8)), (11008, (8, 22))])
def test_mma_column_slices_pad_as_little_as_eight_warps_allow(cols: int, expected: tuple[int, int]) -> None:
    from sparsec.codegen.cuda import bitmask_mma

    assert bitmask_mma.column_slices(cols) == expected


# -- bad inputs: one clear error each, nothing modified ------------------------------------------


def test_bad_inputs_are_refused_and_leave_data_unchanged() -> None:
    w = sparse_weight(4, 24, 0.5, seed=9)
    packed = pack(w, "bitmask", "fp16")
    before = {k: v.clone() for k, v in packed.tensors("w").items()}
    bias = torch.randn(4)
    bias_before = bias.clone()
    kernel = build_linear_kernel(packed, bias=bias)
    x = torch.randn(2, 24)
    x_before = x.clone()
    run(kernel, x)
    assert torch.equal(x, x_before) and torch.equal(bias, bias_before)
    assert all(torch.equal(v, before[k]) for k, v in packed.tensors("w").items())

    with pytest.raises(ValueError, match=r"last dimension is 24"):
        kernel(torch.randn(2, 25))
    with pytest.raises(TypeError, match="float32 or float16"):
        kernel(torch.randn(2, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        build_linear_kernel(packed, activation="tanh")
    with pytest.raises(ValueError, match=r"pass a \[4\] bias"):
        build_linear_kernel(packed, bias=torch.randn(5))
    with pytest.raises(TypeError, match="PackedWeight"):
        build_linear_kernel(w)
    with pytest.raises(ValueError, match="no CUDA kernel for format 'csr'"):
        build_linear_kernel(pack(w, "csr", "fp32"))


# -- device helpers ------------------------------------------------------------------------------


def test_warp_scan_and_reduce_match_numpy() -> None:
    from sparsec.codegen.cuda.device import warp_reduce_sum, warp_scan

    # The simulator finds ``cuda`` among the kernel's module globals, so it is imported there.
    @cuda.jit
    def collectives(values, excl, totals, sums):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        iscratch = cuda.shared.array((2, 32), np.int32)
        fscratch = cuda.shared.array((2, 32), np.float32)
        before, total = warp_scan(np.int32(values[tid]), lane, iscratch[warp])
        s = warp_reduce_sum(np.float32(values[tid]) * np.float32(0.5), lane, fscratch[warp])
        excl[tid] = before
        totals[tid] = total
        sums[tid] = s

    values = np.random.default_rng(1).integers(0, 65, size=64).astype(np.int32)
    excl = np.zeros(64, np.int32)
    totals = np.zeros(64, np.int32)
    sums = np.zeros(64, np.float32)
    d = [cuda.to_device(a) for a in (values, excl, totals, sums)]
    collectives[1, 64](*d)
    excl, totals, sums = (a.copy_to_host() for a in d[1:])
    for wp in range(2):
        v = values[32 * wp : 32 * wp + 32]
        assert np.array_equal(excl[32 * wp : 32 * wp + 32], np.cumsum(v) - v)
        assert (totals[32 * wp : 32 * wp + 32] == v.sum()).all()
        assert np.allclose(sums[32 * wp : 32 * wp + 32], 0.5 * v.sum(), rtol=1e-6)


def test_numpy_row_stack_shim(monkeypatch) -> None:
    from sparsec.codegen.cuda._compat import apply_numpy_shims

    monkeypatch.delattr(np, "row_stack", raising=False)
    assert apply_numpy_shims() is True
    assert np.row_stack is np.vstack
    assert apply_numpy_shims() is False


@pytest.mark.skipif(ON_GPU, reason="checks the message given when no GPU is present")
def test_no_gpu_without_simulator_is_one_clear_error() -> None:
    code = (
        "import torch\n"
        "from sparsec.formats import pack\n"
        "from sparsec.codegen.cuda import build_linear_kernel, cuda_available, CudaUnavailableError\n"
        "ok, why = cuda_available()\n"
        "assert not ok and why, (ok, why)\n"
        "try:\n"
        "    build_linear_kernel(pack(torch.eye(4), 'bitmask', 'fp16'))\n"
        "except CudaUnavailableError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["NUMBA_ENABLE_CUDASIM"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert msg.startswith("target='cuda' needs an NVIDIA GPU with a working driver: none was found (")
    assert msg.endswith("compile with target='cpu'") and "\n" not in msg


def test_unavailable_error_is_runtime_error() -> None:
    assert issubclass(CudaUnavailableError, RuntimeError)
