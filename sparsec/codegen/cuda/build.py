"""From a packed weight to a :class:`CudaLinearKernel`: per-format host preparation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sparsec.codegen.cuda import BITMASK_DESIGNS, DENSE_FROM_ROWS, KERNEL_FORMATS
from sparsec.codegen.cuda import bitmask as bitmask_kernels
from sparsec.codegen.cuda import bitmask_lanes as lane_kernels
from sparsec.codegen.cuda import bitmask_mma as mma_kernels
from sparsec.codegen.cuda import nm as nm_kernels
from sparsec.codegen.cuda.dense import DenseCudaLinear
from sparsec.codegen.cuda.kernel import CudaLinearKernel, KernelSpec
from sparsec.codegen.cuda.values import BATCH_BUCKETS
from sparsec.formats.base import PackedWeight


def _bias_array(bias: Any, rows: int) -> np.ndarray | None:
    if bias is None:
        return None
    if isinstance(bias, torch.Tensor):
        b = bias.detach().to("cpu", torch.float32).numpy()
    else:
        b = np.asarray(bias)
        if b.dtype.kind not in "fiu":
            raise TypeError(f"bias must be a float tensor or array, got dtype {b.dtype}")
        b = b.astype(np.float32)
    if b.shape != (rows,):
        raise ValueError(
            f"bias has shape {tuple(b.shape)} but the weight has {rows} rows; pass a [{rows}] bias"
        )
    if not np.isfinite(b).all():
        raise ValueError("bias holds NaN or Inf values; fix the model before compiling")
    return np.ascontiguousarray(b, dtype=np.float32).copy()


def _current_gpu() -> tuple[str, tuple[int, int]] | None:
    """``(name, compute capability)`` of the GPU kernels are built for; ``None`` under the
    simulator. Read from numba-cuda's current context, which is also what its compiler targets."""
    from sparsec.codegen.cuda.device import SIMULATOR

    if SIMULATOR:
        return None
    from numba.cuda.cudadrv import devices

    dev = devices.get_context().device
    return str(getattr(dev, "name", "?")), tuple(dev.compute_capability)


def _resident_blocks(threads: int, shared: int) -> int:
    """Blocks of ``threads`` threads using ``shared`` bytes that the whole GPU holds at once."""
    from sparsec.codegen.cuda.device import SIMULATOR, cuda

    if SIMULATOR:
        return 1 << 30  # no residency to model: one block per row group
    dev = cuda.get_current_device()
    per_sm = min(dev.MAX_THREADS_PER_MULTIPROCESSOR // threads,
                 dev.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR // (shared + 1024), 32)
    return dev.MULTIPROCESSOR_COUNT * max(1, per_sm)


def _bitmask_lanes_spec(packed: PackedWeight, activation: str | None, has_bias: bool,
                        warps: int | None, design: str = "lanes") -> KernelSpec:
    """The ``lanes`` and ``runs`` designs: the lane-word layout (``runs``: values in one run per
    lane and row, padded to whole words) and the same launch."""
    a = packed.arrays()  # type: ignore[attr-defined]
    prepared = lane_kernels.prepare_arrays(a.rows, a.cols, a.value_type, a.values, a.bitmask, a.row_offsets,
                                           a.scales, row_runs=design == "runs")
    arrays = (prepared.mask, prepared.words, prepared.row_offsets, prepared.scales)
    group_size = int(a.group_size) if a.value_type == "int4" else 1
    warps = warps or lane_kernels.WARPS_PER_BLOCK
    # "x-by-column": buckets that do not stage x take it as [cols, bucket] (see KernelSpec)
    key = (f"bitmask-{design}", a.value_type, a.cols, activation, has_bias, group_size, warps, "x-by-column")
    make_kernel = lane_kernels.make_runs_kernel if design == "runs" else lane_kernels.make_kernel

    def make(bucket: int):
        return make_kernel(a.value_type, a.cols, bucket, activation, has_bias, group_size, warps)

    # asked at every launch: the device is queried once per bucket
    resident: dict[int, int] = {}

    def grid_limit(bucket: int) -> int:
        if bucket not in resident:
            resident[bucket] = _resident_blocks(32 * warps, lane_kernels.shared_bytes(a.cols, bucket, warps))
        return resident[bucket]

    return KernelSpec(
        format_name="bitmask",
        value_type=a.value_type,
        rows=a.rows,
        cols=a.cols,
        arrays=arrays,
        make=make,
        rows_per_block=warps,
        threads_per_block=32 * warps,
        buckets=BATCH_BUCKETS,
        cache_key=key,
        grid_limit=grid_limit,
        x_layout=lambda bucket: "rows" if lane_kernels.stages_x(a.cols, bucket) else "by-column",
        pack_x=lane_kernels.x_by_column,
    )


def _bitmask_mma_spec(packed: PackedWeight, activation: str | None, has_bias: bool,
                      warps: int | None) -> KernelSpec:
    """The ``mma`` design: tensor cores on fp16 tiles expanded from the mask (fp16, int8 values)."""
    a = packed.arrays()  # type: ignore[attr-defined]
    mma_kernels.check_value_type(a.value_type)  # before the GPU check: the fix is in the model
    gpu = _current_gpu()
    if gpu is not None and gpu[1] < mma_kernels.MIN_COMPUTE_CAPABILITY:  # mma.sync.m16n8k16 is Ampere's
        need = ".".join(map(str, mma_kernels.MIN_COMPUTE_CAPABILITY))
        raise ValueError(f"the CUDA bitmask design 'mma' needs compute capability {need} or newer; the GPU "
                         f"{gpu[0]} has {gpu[1][0]}.{gpu[1][1]}: choose design 'lanes'")
    slices = warps or mma_kernels.MAX_SLICES
    prepared = mma_kernels.prepare_arrays(a.rows, a.cols, a.value_type, a.values, a.bitmask, a.scales, slices)
    used, _ = mma_kernels.column_slices(a.cols, slices)
    key = ("bitmask-mma", a.value_type, a.cols, activation, has_bias, slices)

    def make(bucket: int):
        return mma_kernels.make_kernel(a.value_type, a.cols, bucket, activation, has_bias, slices)

    return KernelSpec(
        format_name="bitmask",
        value_type=a.value_type,
        rows=a.rows,
        cols=a.cols,
        arrays=(prepared.mask, prepared.values, prepared.slice_offsets, prepared.scales),
        make=make,
        rows_per_block=mma_kernels.TILE_ROWS,
        threads_per_block=32 * used,
        buckets=mma_kernels.BATCH_BUCKETS,
        cache_key=key,
    )


def _bitmask_spec(packed: PackedWeight, activation: str | None, has_bias: bool, warps: int | None,
                  design: str | None = None) -> KernelSpec:
    design = design or BITMASK_DESIGNS[0]
    if design in ("lanes", "runs"):
        return _bitmask_lanes_spec(packed, activation, has_bias, warps, design)
    if design == "mma":
        return _bitmask_mma_spec(packed, activation, has_bias, warps)
    a = packed.arrays()  # type: ignore[attr-defined]
    arrays = bitmask_kernels.prepare_arrays(
        a.rows, a.cols, a.value_type, a.values, a.bitmask, a.row_offsets, a.scales
    )
    group_size = int(a.group_size) if a.value_type == "int4" else 1
    warps = warps or bitmask_kernels.WARPS_PER_BLOCK
    key = ("bitmask", a.value_type, a.cols, activation, has_bias, group_size, warps)

    def make(bucket: int):
        return bitmask_kernels.make_kernel(a.value_type, a.cols, bucket, activation, has_bias, group_size, warps)

    return KernelSpec(
        format_name="bitmask",
        value_type=a.value_type,
        rows=a.rows,
        cols=a.cols,
        arrays=(arrays.mask, arrays.words, arrays.row_offsets, arrays.scales),
        make=make,
        rows_per_block=warps,
        threads_per_block=32 * warps,
        buckets=BATCH_BUCKETS,
        cache_key=key,
    )


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a tensor of any dtype (bf16 included, which NumPy lacks), as uint8."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _nm_spec(packed: PackedWeight, activation: str | None, has_bias: bool, warps: int | None,
             design: str | None = None) -> KernelSpec:
    p = packed
    rows, cols, n, m, vt = p.rows, p.cols, int(p.n), int(p.m), p.value_type  # type: ignore[attr-defined]
    scales = None if p.scales is None else p.scales.detach().numpy()  # type: ignore[attr-defined]
    arrays = nm_kernels.prepare_arrays(
        rows,
        cols,
        n,
        m,
        vt,
        _tensor_bytes(p.values),
        p.indices.numpy(),
        scales,  # type: ignore[attr-defined]
    )
    group_size = int(p.group_size) if vt == "int4" else 1  # type: ignore[attr-defined]
    warps = warps or nm_kernels.WARPS_PER_BLOCK
    key = ("nm", vt, cols, n, m, activation, has_bias, group_size, warps)

    def make(bucket: int):
        return nm_kernels.make_kernel(vt, cols, n, m, bucket, activation, has_bias, group_size, warps)

    return KernelSpec(
        format_name="nm",
        value_type=vt,
        rows=rows,
        cols=cols,
        arrays=(arrays.positions, arrays.words, arrays.scales),
        make=make,
        rows_per_block=warps,
        threads_per_block=32 * warps,
        buckets=BATCH_BUCKETS,
        cache_key=key,
    )


_SPECS = {"bitmask": _bitmask_spec, "nm": _nm_spec}
assert tuple(_SPECS) + ("dense",) == KERNEL_FORMATS


def device() -> torch.device:
    """Where layers are built: the current CUDA device, or the CPU under the simulator."""
    from sparsec.codegen.cuda.device import SIMULATOR

    if SIMULATOR:
        return torch.device("cpu")
    from sparsec.codegen.cuda.device import cuda

    return torch.device("cuda", cuda.get_current_device().id)


def build(packed: PackedWeight, bias: Any, activation: str | None, warps_per_block: int | None = None,
          design: str | None = None, dense_from: int | None = DENSE_FROM_ROWS) -> CudaLinearKernel | DenseCudaLinear:
    """See :func:`sparsec.codegen.cuda.build_linear_kernel` (which checks the GPU first)."""
    if not isinstance(packed, PackedWeight):
        raise TypeError(
            f"expected a sparsec PackedWeight, got {type(packed).__name__}; pack the weight first"
        )
    name = getattr(packed, "format_name", None)
    if name == "dense":
        bias_host = _bias_array(bias, packed.rows)
        return DenseCudaLinear(packed, None if bias_host is None else torch.from_numpy(bias_host), activation,
                               device())
    make_spec = _SPECS.get(name)
    if make_spec is None:
        known = ", ".join(sorted(KERNEL_FORMATS))
        raise ValueError(f"no CUDA kernel for format {name!r}; the CUDA target supports: {known}")
    bias_host = _bias_array(bias, packed.rows)
    spec = make_spec(packed, activation, bias_host is not None, warps_per_block, design)
    spec.unpack = packed.unpack  # large batches: cuBLAS on the dense weight, made on first use
    return CudaLinearKernel(spec, bias_host, activation, dense_from)
