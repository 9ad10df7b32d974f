"""The GPU path: sparse linear kernels written with numba-cuda.

Public contract (what the runtime calls)::

    ok, why = cuda_available()                  # never raises
    k = build_linear_kernel(packed, bias=b, activation="silu")
    y = k(x)                                    # x [..., cols] float32/float16 -> y [..., rows]

``packed`` is a :class:`sparsec.formats.PackedWeight` in the ``bitmask`` format (fp32, bf16,
fp16, int8 or int4 values), the ``nm`` format, or ``dense`` (run by cuBLAS through torch);
``bias`` is ``None`` or ``[rows]`` (torch or NumPy, any float dtype; kept in float32);
``activation`` is ``None``, ``"relu"``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"silu"``, fused
into the kernel's epilogue. Accumulation is float32 whatever the input dtype.

Without a GPU the kernels still run, slowly, under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported): that is how the tests check them.

Importing this package imports nothing from numba; the CUDA target is imported on the first
call that needs it (after the NumPy 2.5 shim in ``_compat``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsec.codegen.cuda.kernel import CudaLinearKernel
    from sparsec.formats.base import PackedWeight

__all__ = [
    "KERNEL_FORMATS",
    "ACTIVATION_NAMES",
    "DENSE_FROM_ROWS",
    "CudaLinearKernel",
    "CudaUnavailableError",
    "build_linear_kernel",
    "cuda_available",
]

#: Formats the CUDA target runs: sparse ones with sparsec's kernels, ``dense`` with cuBLAS
#: (through torch); other formats are refused by :func:`build_linear_kernel`.
KERNEL_FORMATS: tuple[str, ...] = ("bitmask", "nm", "dense")

#: Designs of the bitmask kernel; the first is the default (see ``build_linear_kernel``).
BITMASK_DESIGNS: tuple[str, ...] = ("lanes", "runs", "tiles", "mma")

#: Activations the epilogue can fuse (``None``: none).
ACTIVATION_NAMES: tuple[str, ...] = ("relu", "gelu", "gelu_tanh", "silu")

#: Oldest GPU generation served: Volta (independent thread scheduling makes ``syncwarp`` exact).
MIN_COMPUTE_CAPABILITY = (7, 0)

#: Rows of ``x`` from which a sparse layer's call runs as one cuBLAS product on its dense weight
#: (unpacked on first use and kept) instead of one sparse launch per 16 rows: four launches, each
#: reading the whole sparse weight, already move more bytes than a 75%-sparse fp16 layer's dense
#: weight holds, before their host cost. Prefill, not decoding.
DENSE_FROM_ROWS = 64


class CudaUnavailableError(RuntimeError):
    """The CUDA target was asked for but no usable GPU (or toolchain) is present."""


def cuda_available() -> tuple[bool, str]:
    """``(True, "")`` when CUDA kernels can run here, else ``(False, one-sentence reason)``.

    Under the CUDA simulator this is ``(True, <a note that it is the simulator>)``. Never
    raises: any failure while probing becomes the reason.
    """
    try:
        from sparsec.codegen.cuda._compat import cuda_module, is_simulator

        cuda = cuda_module()
        if is_simulator():
            return (
                True,
                "numba's CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1): kernels run as slow Python",
            )
    except Exception as exc:  # noqa: BLE001 - the probe must never raise
        return False, f"numba's CUDA target could not be imported ({type(exc).__name__}: {exc})"
    try:
        if not cuda.is_available():
            return False, "no CUDA driver or NVIDIA GPU is visible to numba-cuda"
        dev = cuda.get_current_device()
        cc = tuple(dev.compute_capability)
        if cc < MIN_COMPUTE_CAPABILITY:
            need = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
            return (
                False,
                f"the GPU {dev.name} has compute capability {cc[0]}.{cc[1]}; sparsec needs {need} or newer",
            )
    except Exception as exc:  # noqa: BLE001
        return False, f"the CUDA driver failed to initialise ({type(exc).__name__}: {exc})"
    try:
        from numba.cuda.cudadrv import nvvm

        if not nvvm.is_available():
            return (
                False,
                "numba-cuda cannot find NVVM (libnvvm); install the CUDA toolkit or numba-cuda[cu12]",
            )
    except Exception as exc:  # noqa: BLE001
        return False, f"numba-cuda cannot load NVVM (libnvvm) ({type(exc).__name__}: {exc})"
    return True, ""


def build_linear_kernel(
    packed: PackedWeight,
    bias: Any = None,
    activation: str | None = None,
    *,
    warps_per_block: int | None = None,
    design: str | None = None,
    dense_from: int | None = DENSE_FROM_ROWS,
) -> CudaLinearKernel:
    """Copy ``packed`` (and ``bias``) to the GPU and return a kernel computing ``act(x @ W^T + bias)``.

    ``warps_per_block``: rows per thread block of the sparse kernels (1 to 8; default 8 for the
    bitmask ``lanes`` design, 4 otherwise), a tuning knob that ``benchmarks/gpu_kernels.py
    --warps`` sweeps. ``design`` picks the bitmask kernel: ``"lanes"`` (default: ``x`` staged in
    shared memory, each lane walks its own transposed mask word), ``"runs"`` (the same, each lane
    walking all of its row's words in one loop: less lane imbalance, one scan a row),
    ``"tiles"`` (values split evenly over a warp through a shared column list) or ``"mma"``
    (tensor cores on fp16 tiles expanded from the mask, for batches of several rows; fp16 and
    int8 values only; ``warps_per_block`` is then its most column slices); other formats ignore
    it.

    ``dense_from``: from this many rows of ``x`` on, a call runs as one cuBLAS product on the
    dense weight, unpacked on the first such call and kept on the device (prefill); ``None``:
    always sparse launches, 16 rows each. Dense layers run on cuBLAS whatever the batch.

    Raises :class:`CudaUnavailableError` when there is no usable GPU (and no simulator),
    ``ValueError``/``TypeError`` for an unsupported format, value type, activation or a bias of
    the wrong shape. ``packed`` and ``bias`` are never modified. Kernels compile on first call.
    """
    if activation is not None and activation not in ACTIVATION_NAMES:
        known = ", ".join(ACTIVATION_NAMES)
        raise ValueError(
            f"unknown activation {activation!r} for a CUDA linear kernel; choose None or one of {known}"
        )
    if warps_per_block is not None and not (isinstance(warps_per_block, int) and 1 <= warps_per_block <= 8):
        raise ValueError(f"warps_per_block must be an integer from 1 to 8, got {warps_per_block!r}")
    if design is not None and design not in BITMASK_DESIGNS:
        raise ValueError(f"unknown bitmask kernel design {design!r}; choose one of {', '.join(BITMASK_DESIGNS)}")
    if dense_from is not None and not (isinstance(dense_from, int) and not isinstance(dense_from, bool)
                                       and dense_from >= 1):
        raise ValueError(f"dense_from must be None or a whole number of rows, at least 1; got {dense_from!r}")
    ok, why = cuda_available()
    if not ok:
        raise CudaUnavailableError(
            f"target='cuda' needs an NVIDIA GPU with a working driver: none was found ({why}); "
            "compile with target='cpu'"
        )
    from sparsec.codegen.cuda import build

    return build.build(packed, bias, activation, warps_per_block, design, dense_from)


def __getattr__(name: str):
    # CudaLinearKernel lives with numba-cuda code; import it only when asked for.
    if name == "CudaLinearKernel":
        from sparsec.codegen.cuda.kernel import CudaLinearKernel

        return CudaLinearKernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
