"""Importing numba's CUDA target safely, and knowing whether it is the simulator.

Every module of this package gets ``numba.cuda`` through :func:`cuda_module`, so two facts hold
everywhere:

* numba-cuda 0.30.x registers an overload of ``np.row_stack`` while importing its CUDA target;
  NumPy 2.5 removed that alias, so the import fails there with an ``AttributeError``. The alias
  is restored (as ``np.vstack``, which it always was) before the first import, and only when it
  is missing.
* ``NUMBA_ENABLE_CUDASIM=1`` swaps ``numba.cuda`` for a pure-Python simulator. It has no warp
  shuffles, no ``syncwarp`` and no LLVM intrinsics, so device helpers pick their implementation
  from :func:`is_simulator` when they are defined.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np


def apply_numpy_shims() -> bool:
    """Restore ``np.row_stack`` when this NumPy lacks it; True if the shim was applied."""
    if hasattr(np, "row_stack"):
        return False
    np.row_stack = np.vstack  # type: ignore[attr-defined]
    return True


def is_simulator() -> bool:
    """True when ``numba.cuda`` is the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` at its import).

    Decided by the imported module itself, not by re-reading the variable: numba fixes its
    choice at the first import, and a later change of the environment does not undo it.
    """
    cuda = cuda_module()
    return ".simulator" in getattr(cuda.jit, "__module__", "")


def cuda_module() -> ModuleType:
    """``numba.cuda`` (the real target or the simulator), imported after the NumPy shim."""
    apply_numpy_shims()
    from numba import cuda

    return cuda


class without_nrt:
    """Context in which numba-cuda compiles kernels without its runtime library (NRT).

    Some GPU images enable NRT for every kernel (``NUMBA_CUDA_ENABLE_NRT=1``); sparsec's kernels
    allocate nothing, and compiled with NRT they would link its code as a separate file, which
    an artifact's PTX cannot carry. Launches compile on first use, so kernels are launched (and
    exported) inside this context; it only flips a flag, cheap beside a launch.
    """

    _config = None  # numba-cuda's config module, found on first use

    def __enter__(self) -> None:
        config = without_nrt._config
        if config is None:
            try:
                from numba.cuda.core import config
            except ImportError:  # an older numba-cuda layout
                from numba.core import config
            without_nrt._config = config
        self._saved = getattr(config, "CUDA_ENABLE_NRT", False)
        config.CUDA_ENABLE_NRT = False

    def __exit__(self, *exc: object) -> None:
        without_nrt._config.CUDA_ENABLE_NRT = self._saved
