"""``CudaLinearKernel``: one packed weight on the GPU, callable like a linear layer.

The object owns the weight's device arrays (repacked once at build time) and a cache of
compiled kernels, one per batch bucket (1, 2, 4, 8, 16), compiled on first use. Calling it
takes ``x`` of shape ``[..., cols]`` and returns ``[..., rows]`` of the same kind and dtype:

* on a GPU, ``x`` is a CUDA ``torch.Tensor`` (float32 or float16) on the device the weight was
  built on; the kernel runs on torch's current stream of that device, so it is ordered with the
  surrounding torch work, and no synchronisation is added;
* under the CUDA simulator, ``x`` is a CPU ``torch.Tensor`` or a NumPy array.

Batches of 17 rows up to ``dense_from - 1`` run as consecutive launches of 16. From
``dense_from`` rows on (a prompt's prefill, say; default ``DENSE_FROM_ROWS``) one cuBLAS
product on the dense weight replaces them: each sparse launch reads the whole weight again and
costs a numba launch on the host, while cuBLAS reads the dense weight once. The dense weight is
unpacked on the first such call and kept (in ``x``'s dtype): the layer's dense bytes on the
device, the price of fast prefill; ``dense_from=None`` never makes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparsec.codegen.cuda import DENSE_FROM_ROWS
from sparsec.codegen.cuda._compat import without_nrt
from sparsec.codegen.cuda.device import SIMULATOR, cuda

_X_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


@dataclass
class KernelSpec:
    """What a format's module hands over to build a :class:`CudaLinearKernel`."""

    format_name: str
    value_type: str
    rows: int
    cols: int
    #: Host arrays in kernel layout, passed after ``(y, x, m, rows)`` in this order.
    arrays: tuple[np.ndarray, ...]
    #: ``make(batch_bucket) -> @cuda.jit kernel`` with the epilogue already baked in.
    make: Callable[[int], Any]
    #: Rows per block and threads per block of every launch.
    rows_per_block: int
    threads_per_block: int
    buckets: tuple[int, ...]
    cache_key: tuple = field(default=())
    #: ``grid_limit(bucket)``: the most blocks worth launching (kernels whose blocks loop over
    #: row groups stop at what the GPU holds at once); ``None``: one block per row group.
    grid_limit: Callable[[int], int] | None = None
    #: ``x_layout(bucket)``: how that bucket's kernel takes ``x``, one of :data:`X_LAYOUTS`;
    #: ``None``: every bucket takes ``x`` as given (``"rows"``).
    x_layout: Callable[[int], str] | None = None
    #: ``pack_x(x, bucket)``: ``x [m, cols]`` (a torch tensor on the kernel's device, float32 or
    #: float16) in the bucket's layout, where that is not ``"rows"``; torch ops only, so that
    #: on a GPU they run on the launch's stream.
    pack_x: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    #: ``unpack()``: the dense float32 weight ``[rows, cols]`` on the host, for calls with
    #: ``dense_from`` rows or more; ``None``: such calls run as sparse launches too.
    unpack: Callable[[], torch.Tensor] | None = None


#: How a kernel takes ``x``: ``rows``: ``[m, cols]`` as given; ``by-column``: ``[cols, bucket]``
#: in ``x``'s dtype, zero-padded past ``m`` (a column's batch values side by side).
X_LAYOUTS: tuple[str, ...] = ("rows", "by-column")


# Compiled kernels are shared by every layer with the same specialization (same format, value
# type, cols, batch bucket, activation, ...): a model has few distinct ones.
_KERNEL_CACHE: dict[tuple, Any] = {}


def install_kernel(key: tuple, kern: Any) -> bool:
    """Serve launches of specialization ``key`` (``KernelSpec.cache_key + (bucket,)``) with
    ``kern`` (launched as ``kern[grid, block, stream](*args)``) unless one is cached already.

    Returns True if installed. Loaded artifacts use this to put prebuilt kernels where
    :meth:`CudaLinearKernel.kernel_for` finds them, so no layer compiles its own.
    """
    if key in _KERNEL_CACHE:
        return False
    _KERNEL_CACHE[key] = kern
    return True


class CudaLinearKernel:
    """``y = act(x @ W^T + bias)`` for one packed weight, computed by a CUDA kernel.

    Build with :func:`sparsec.codegen.cuda.build_linear_kernel`; the packed weight and bias the
    caller passed are not modified (they are copied to the device).
    """

    def __init__(self, spec: KernelSpec, bias: np.ndarray | None, activation: str | None,
                 dense_from: int | None = DENSE_FROM_ROWS) -> None:
        self.format_name = spec.format_name
        self.value_type = spec.value_type
        self.rows = spec.rows
        self.cols = spec.cols
        self.activation = activation
        self.has_bias = bias is not None
        self._spec = spec
        bias_host = bias if bias is not None else np.zeros(1, dtype=np.float32)
        self._device_args = tuple(cuda.to_device(a) for a in spec.arrays) + (cuda.to_device(bias_host),)
        self._bias_host = bias
        self.dense_from = dense_from if spec.unpack is not None else None
        self._dense: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}  # x dtype -> (W, bias)
        self.device_index = None if SIMULATOR else cuda.get_current_device().id
        self._streams: dict[int, Any] = {}

    def __repr__(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return (
            f"CudaLinearKernel({self.format_name}/{self.value_type}, rows={self.rows}, cols={self.cols}"
            f"{act}, bias={self.has_bias})"
        )

    def replicate(self) -> CudaLinearKernel:
        """Another kernel object for the same weight with its own device copy (benchmarks
        rotate over copies so that the weights they read are not in L2)."""
        bias = None if not self.has_bias else self._device_args[-1].copy_to_host()
        return CudaLinearKernel(self._spec, bias, self.activation, self.dense_from)

    def nbytes(self) -> int:
        """Bytes this layer holds on the device: its repacked weight arrays and bias, and the
        dense weight once a call of ``dense_from`` rows has made it."""
        dense = sum(w.numel() * w.element_size() for w, _ in self._dense.values())
        return int(sum(a.nbytes for a in self._device_args)) + dense

    def kernel_for(self, bucket: int):
        """The compiled (or lazily compiling) kernel for batch bucket ``bucket``."""
        key = self._spec.cache_key + (bucket,)
        kern = _KERNEL_CACHE.get(key)
        if kern is None:
            kern = self._spec.make(bucket)
            _KERNEL_CACHE[key] = kern
        return kern

    def bucket_for(self, m: int) -> int:
        """The batch bucket that runs ``m`` (<= 16) rows."""
        return next(b for b in self._spec.buckets if m <= b)

    def x_layout_for(self, m: int) -> str:
        """How a launch for ``m`` rows takes ``x``: one of :data:`X_LAYOUTS`."""
        return "rows" if self._spec.x_layout is None else self._spec.x_layout(self.bucket_for(m))

    def launch(self, y, x, m: int, stream: Any = 0) -> None:
        """Run on ``m`` (<= 16) rows: ``y`` ``[m, rows]`` and ``x`` device arrays, ``x`` in the
        layout :meth:`x_layout_for` names (``[m, cols]`` for ``"rows"``)."""
        bucket = self.bucket_for(m)
        grid = max(1, math.ceil(self.rows / self._spec.rows_per_block))
        if self._spec.grid_limit is not None:
            grid = max(1, min(grid, self._spec.grid_limit(bucket)))
        kern = self.kernel_for(bucket)
        with without_nrt():  # the first launch of a signature compiles it
            kern[grid, self._spec.threads_per_block, stream](y, x, m, self.rows, *self._device_args)

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            return self._call_torch(x)
        if isinstance(x, np.ndarray):
            if not SIMULATOR:
                raise TypeError(
                    "x is a host NumPy array but this kernel runs on the GPU; pass a CUDA torch.Tensor"
                )
            return self._call_host(x)
        raise TypeError(
            f"x must be a torch.Tensor (or a NumPy array under the simulator), got {type(x).__name__}"
        )

    # -- helpers -------------------------------------------------------------------------------

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) == 0 or shape[-1] != self.cols:
            raise ValueError(
                f"x has shape {tuple(shape)} but this layer takes [..., {self.cols}] (its weight is "
                f"{self.rows} x {self.cols}); pass inputs whose last dimension is {self.cols}"
            )

    def _call_host(self, x: np.ndarray) -> np.ndarray:
        if x.dtype not in (np.float32, np.float16):
            raise TypeError(
                f"x must be float32 or float16, got {x.dtype}; convert it with x.astype(np.float32)"
            )
        self._check_shape(x.shape)
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(math.prod(lead), self.cols))
        y2 = np.empty((x2.shape[0], self.rows), dtype=x.dtype)
        if self.rows == 0 or x2.shape[0] == 0:
            return y2.reshape(*lead, self.rows)
        if self.runs_dense(x2.shape[0]):
            return self._dense_product(torch.from_numpy(x2)).numpy().reshape(*lead, self.rows)
        if self.cols == 0:  # the kernel reads no column; give it a valid one-column array
            x2 = np.zeros((x2.shape[0], 1), dtype=x.dtype)
        for s in range(0, x2.shape[0], self._spec.buckets[-1]):
            chunk = x2[s : s + self._spec.buckets[-1]]
            out = y2[s : s + chunk.shape[0]]
            m = chunk.shape[0]
            if self.x_layout_for(m) != "rows":  # the GPU path's torch packing, on the CPU
                chunk = self._spec.pack_x(torch.from_numpy(chunk), self.bucket_for(m)).numpy()
            self.launch(out, chunk, m)
        return y2.reshape(*lead, self.rows)

    def _call_torch(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _X_DTYPES:
            raise TypeError(
                f"x must be float32 or float16, got {x.dtype}; convert it with x.float() or x.half()"
            )
        self._check_shape(tuple(x.shape))
        if SIMULATOR:
            if x.device.type != "cpu":
                raise ValueError(f"under the CUDA simulator x must be a CPU tensor, got one on {x.device}")
            out = self._call_host(x.detach().contiguous().numpy())
            return torch.from_numpy(out)
        if x.device.type != "cuda" or x.device.index != self.device_index:
            raise ValueError(
                f"x is on {x.device} but this layer's weight is on cuda:{self.device_index}; "
                f"move x there with x.to('cuda:{self.device_index}')"
            )
        lead = x.shape[:-1]
        x2 = x.detach().reshape(math.prod(lead), self.cols)
        if not x2.is_contiguous() or x2.data_ptr() % 16:  # kernels read x in aligned vector loads
            x2 = x2.clone(memory_format=torch.contiguous_format)
        m_total = x2.shape[0]
        if self.runs_dense(m_total):
            return self._dense_product(x2).reshape(*lead, self.rows)
        y2 = torch.empty((m_total, self.rows), dtype=x.dtype, device=x.device)
        if self.rows == 0 or m_total == 0:  # nothing to compute; zero-size arrays have no pointer
            return y2.reshape(*lead, self.rows)
        if self.cols == 0:  # the kernel reads no column; give it a valid one-column array
            x2 = x2.new_zeros((m_total, 1))
        stream = self._stream_for(torch.cuda.current_stream(x.device).cuda_stream)
        step = self._spec.buckets[-1]
        for s in range(0, m_total, step):
            xs, ys = x2[s : s + step], y2[s : s + step]
            m = xs.shape[0]
            if self.x_layout_for(m) != "rows":  # a few small torch ops on the same stream
                xs = self._spec.pack_x(xs, self.bucket_for(m))
            # sync=False: torch's stream order already covers these tensors, and the default
            # (synchronising the exporter's stream on every call) would stall the CPU.
            self.launch(cuda.as_cuda_array(ys, sync=False), cuda.as_cuda_array(xs, sync=False), m, stream)
        return y2.reshape(*lead, self.rows)

    def runs_dense(self, m: int) -> bool:
        """Whether a call on ``m`` rows runs as one cuBLAS product on the dense weight."""
        return self.dense_from is not None and m >= self.dense_from and self.rows > 0

    def _dense_product(self, x2: torch.Tensor) -> torch.Tensor:
        """``act(x2 @ W^T + bias)`` on cuBLAS (:func:`~sparsec.codegen.cuda.dense.cublas_linear`)
        with the dense weight, made on first use in ``x2``'s dtype on its device."""
        from sparsec.codegen.cuda.dense import cublas_linear

        dense = self._dense.get(x2.dtype)
        if dense is None:
            weight = self._spec.unpack().to(device=x2.device, dtype=x2.dtype).contiguous()
            bias = None if self._bias_host is None else torch.from_numpy(self._bias_host).to(x2.device)
            dense = self._dense[x2.dtype] = (weight, bias)
        return cublas_linear(x2, *dense, self.activation)

    def _stream_for(self, handle: int):
        stream = self._streams.get(handle)
        if stream is None:
            stream = cuda.external_stream(handle) if handle else cuda.default_stream()
            self._streams[handle] = stream
        return stream
