"""Generated kernel modules, written to a cache directory so Numba can cache them on disk.

Kernels are generated as Python source (one module per format and value type). Numba's
``cache=True`` only works for functions that live in an importable file, so each generated
module is written once under ``$SPARSEC_CACHE_DIR`` (default ``~/.cache/sparsec``) and imported
from there; a second process then loads the compiled machine code instead of compiling again.

The file name carries a hash of the generated source *and* of the code generators and intrinsics
that shaped it (Numba's cache is keyed by file and cannot see a change in what that file imports),
so editing this package never serves stale machine code.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType

import numba

from sparsec.codegen.cpu.host import host_features

_MODULES: dict[str, ModuleType] = {}
#: the files whose text decides what generated kernels compile to
_GENERATOR_FILES = ("bitmask.py", "loops.py", "simd.py", "host.py", "codecache.py", "sync.py")
_LOCK = threading.Lock()


def cache_dir() -> str:
    root = os.environ.get("SPARSEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparsec"
    )
    return os.path.join(root, "cpu-kernels")


@functools.cache
def _fingerprint() -> str:
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _GENERATOR_FILES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    h.update(numba.__version__.encode())
    h.update(host_features().name.encode())
    return h.hexdigest()[:16]


def generated_module(key: str, source: Callable[[], str]) -> ModuleType:
    """Import (writing it first if needed) the module whose text ``source()`` returns; one per
    ``key`` and process. Writes are atomic, so concurrent processes never read half a file."""
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        src = source()
        tag = hashlib.sha256((src + _fingerprint()).encode()).hexdigest()[:16]
        name = f"sparsec_{key}_{tag}"
        path = os.path.join(cache_dir(), name + ".py")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(src)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        # Numba's disk cache re-imports a function's module by name when it loads one.
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _MODULES[key] = mod
        return mod
