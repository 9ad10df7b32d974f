"""CPU kernels against a float64 reference computed from the *unpacked* weights.

Tolerance: every output is checked against ``act(x @ W^T + b)`` in float64, where ``W`` is what
the packed weight unpacks to (so quantization error is not the kernel's). The kernels accumulate
in float32 (the AVX-512 paths) or float64 (portable, csr, nm); a float32 sum of ``n`` products has
error at most ``n * 2^-24 * sum|x_j w_j|``. With ``n <= 300`` columns here that bound is
``1.8e-5 * sum|x_j w_j|``; we allow ``3e-5 * (|x| @ |W|^T + |b|) + 1e-6`` per output. The
activations are 1-Lipschitz up to ~1.13 (gelu), inside that margin. Two kernels also round
``x`` on purpose, both inside that bound: bf16 at batch 1-4 splits it into two bf16 halves
(relative error at most ``2^-17`` a element, ``7.6e-6``), int8/int4 at batch 1-4 into 24-bit fixed
point (absolute error at most ``2^-24 * max|x_b|``; checked with an outlier below).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsec.codegen.cpu import available_kernels, build_linear_kernel
from sparsec.codegen.cpu.host import host_features
from sparsec.codegen.cpu.kernel import CpuLinearKernel, KernelError
from sparsec.codegen.cpu.partition import balanced_row_split
from sparsec.formats import VALUE_TYPES, pack

VECTOR = host_features().vector_bitmask
ACTS = [None, "relu", "gelu", "silu"]
_TORCH_ACT = {
    None: lambda t: t,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
}


def _weight(rows: int, cols: int, sparsity: float, seed: int, special_rows: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w = w * (torch.rand(rows, cols, generator=g) >= sparsity)
    if special_rows and rows >= 3:
        w[0] = 0.0  # an empty row
        w[1] = 0.0
        w[1, cols - 1] = 1.5  # a single kept value, in the last (possibly partial) chunk
    return w


def _check(kernel, packed, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> None:
    W = packed.unpack().double()
    x64 = x.double().reshape(-1, W.shape[1])
    b64 = bias.double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    ref = _TORCH_ACT[activation](x64 @ W.T + b64)
    scale = x64.abs() @ W.abs().T + b64.abs()
    y = kernel(x)
    assert y.dtype == torch.float32
    assert tuple(y.shape) == tuple(x.shape[:-1]) + (W.shape[0],)
    err = (y.double().reshape(ref.shape) - ref).abs()
    bound = 3e-5 * scale + 1e-6
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds the bound by {worst:.3g}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 300),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    value_type=st.sampled_from(VALUE_TYPES),
    batch=st.sampled_from([1, 2, 3, 4, 17, 70]),
    activation=st.sampled_from(ACTS),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bitmask_matches_float64_reference(
    rows, cols, sparsity, value_type, batch, activation, with_bias, seed
):
    w = _weight(rows, cols, sparsity, seed)
    packed = pack(w, "bitmask", value_type)
    g = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn(rows, generator=g) if with_bias else None
    kernel = build_linear_kernel(packed, bias=bias, activation=activation)
    assert (kernel.format_name, kernel.value_type) == ("bitmask", value_type)
    _check(kernel, packed, torch.randn(batch, cols, generator=g), bias, activation)


@pytest.mark.parametrize("value_type", VALUE_TYPES)
@pytest.mark.parametrize("vector", [True, False] if VECTOR else [False])
def test_bitmask_threads_and_every_batch_regime(value_type, vector):
    # 300 x 333 crosses the one-thread threshold, so rows are split over the threads by kept values
    w = _weight(300, 333, 0.75, seed=7)
    w[150:] *= torch.rand(150, 333) > 0.8  # uneven rows: the split must not be by row count
    packed = pack(w, "bitmask", value_type)
    bias = torch.randn(300)
    k = CpuLinearKernel(packed, bias, "silu", vector=vector)
    for batch in (1, 2, 3, 4, 5, 16, 17, 33, 64, 65):
        _check(k, packed, torch.randn(batch, 333), bias, "silu")


@pytest.mark.parametrize("group_size", [32, 64, 100, 128])
def test_bitmask_int4_group_sizes(group_size):
    # 64 | gs: every kernel; 16 | gs: the nnz kernel serves batch 1 too; else the portable one
    w = _weight(40, 250, 0.5, seed=group_size)
    packed = pack(w, "bitmask", "int4", group_size=group_size)
    k = build_linear_kernel(packed, activation="gelu")
    for batch in (1, 3, 20):
        _check(k, packed, torch.randn(batch, 250), None, "gelu")


def test_input_layouts_and_leading_dims():
    w = _weight(24, 80, 0.5, seed=3)
    packed = pack(w, "bitmask", "bf16")
    k = build_linear_kernel(packed)
    base = torch.randn(80, 2, 3)
    x = base.permute(1, 2, 0)  # [2, 3, 80], not contiguous
    assert not x.is_contiguous()
    _check(k, packed, x, None, None)
    _check(k, packed, torch.randn(80), None, None)  # a single vector, no batch dim
    assert k(torch.randn(0, 80)).shape == (0, 24)


@pytest.mark.parametrize(
    "fmt,options",
    [
        ("csr", {}),
        ("nm", {"n": 2, "m": 4}),
        ("nm", {"n": 3, "m": 8}),
        ("dense", {}),
        ("block", {"block_shape": "4x4"}),
    ],
)
@pytest.mark.parametrize("value_type", VALUE_TYPES)
def test_other_formats(fmt, options, value_type):
    rows, cols = 37, 96
    g = torch.Generator().manual_seed(11)
    w = torch.randn(rows, cols, generator=g)
    if fmt == "nm":
        n, m = options["n"], options["m"]
        top = w.abs().view(rows, cols // m, m).topk(n, dim=2).indices
        keep = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(2, top, True).view(rows, cols)
        w = w * keep
    elif fmt == "csr":
        w = w * (torch.rand(rows, cols, generator=g) > 0.9)
        w[3] = 0.0
    packed = pack(w, fmt, value_type, **options)
    bias = torch.randn(rows, generator=g)
    k = build_linear_kernel(packed, bias=bias, activation="relu")
    assert (k.format_name, k.value_type) == (fmt, value_type)
    for batch in (1, 3, 17, 70):
        _check(k, packed, torch.randn(batch, cols, generator=g), bias, "relu")


def test_available_kernels_cover_every_value_type():
    pairs = set(available_kernels())
    for fmt in ("bitmask", "csr", "nm", "dense"):
        for vt in VALUE_TYPES:
            assert (fmt, vt) in pairs


def test_compiled_functions_are_shared_across_shapes():
    first = build_linear_kernel(pack(_weight(33, 130, 0.5, seed=1), "bitmask", "int8"))
    again = build_linear_kernel(pack(_weight(65, 77, 0.9, seed=2), "bitmask", "int8"), activation="gelu")
    assert first.compile_seconds >= 0.0
    assert again.compile_seconds == 0.0


def test_bad_arguments_are_refused_clearly():
    w = _weight(8, 16, 0.5, seed=5)
    packed = pack(w, "bitmask", "fp32")
    before = {k: v.clone() for k, v in packed.tensors("w").items()}
    with pytest.raises(KernelError, match="unknown activation"):
        build_linear_kernel(packed, activation="tanh")
    with pytest.raises(KernelError, match=r"expected \(8,\)"):
        build_linear_kernel(packed, bias=torch.zeros(9))
    with pytest.raises(KernelError, match="PackedWeight"):
        build_linear_kernel(w)
    k = build_linear_kernel(packed)
    with pytest.raises(KernelError, match="float32"):
        k(torch.zeros(2, 16, dtype=torch.float64))
    with pytest.raises(KernelError, match=r"expected \[\.\.\., 16\]"):
        k(torch.zeros(2, 15))
    for name, t in packed.tensors("w").items():
        assert torch.equal(t, before[name]), f"{name} changed"


def test_balanced_split_equalizes_kept_values():
    counts = np.array([100] * 10 + [1] * 90)
    b = balanced_row_split(counts, 2)
    assert b[0] == 0 and b[-1] == 100
    left, right = counts[: b[1]].sum(), counts[b[1] :].sum()
    assert abs(int(left) - int(right)) <= 100
    assert b[1] < 10  # a split by rows would have put all the heavy rows on one side
    assert balanced_row_split(np.zeros(0, dtype=np.int64), 2).tolist() == [0, 0, 0]


@pytest.mark.parametrize("value_type", ["int8", "int4"])
def test_integer_kernels_bound_the_fixed_point_error(value_type):
    # int8/int4 batch-1..4 kernels round x to 24-bit fixed point per row (quantize_x24): the extra
    # error is at most max|x_b| * 2^-24 per element, i.e. 2^-24 * max|x_b| * sum_j |w_rj| per output
    w = _weight(64, 256, 0.5, seed=9)
    packed = pack(w, "bitmask", value_type)
    k = build_linear_kernel(packed)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    x[0, 17] = 3.0e4  # an outlier sets the fixed-point step for its row
    W = packed.unpack().double()
    ref = x.double() @ W.T
    fixed = 2.0**-23 * x.double().abs().amax(dim=1, keepdim=True) * W.abs().sum(dim=1)
    bound = 3e-5 * (x.double().abs() @ W.abs().T) + fixed + 1e-6
    err = (k(x).double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def test_one_kernel_serves_several_threads_at_once():
    from concurrent.futures import ThreadPoolExecutor

    w = _weight(96, 200, 0.75, seed=21)
    packed = pack(w, "bitmask", "fp16")
    k = build_linear_kernel(packed, activation="relu")
    xs = [torch.randn(b, 200, generator=torch.Generator().manual_seed(b)) for b in (1, 3, 17, 20, 33, 2)]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(k, xs * 3))
    for x, y in zip(xs * 3, outs):
        assert torch.equal(y, k(x))
    _check(k, packed, xs[2], None, "relu")
