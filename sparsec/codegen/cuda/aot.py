"""Ahead-of-time CUDA kernels: GPU code out of numba-cuda, launchable kernels back from it.

Saving (:func:`export_kernels`) takes the :class:`~sparsec.codegen.cuda.kernel.CudaLinearKernel`
objects of a model and writes, for every specialization they use (``KernelSpec.cache_key``),
every batch bucket and both input dtypes (float32 and float16), the kernel's code:

* ``cuda_NNNN.sm_XY.ptx``: PTX for the plain (not arch-specific) target of the GPU it was
  compiled for, which the driver compiles (JIT) for that GPU or any newer one;
* ``cuda_NNNN.sm_XYa.cubin`` (when a linker is present, so always on a GPU): the machine code
  numba-cuda loads on the GPU it was compiled on, with no JIT.

A bucket or dtype that the process never launched is compiled at save time, so that loading
never compiles. The manifest entry of each kernel holds what rebuilding it needs as plain JSON:
the cache key and bucket, the x dtype, the kernel's entry symbol, its argument types as numba type
strings (``array(float32, 2d, C)``, ``int64``) and the few launch properties numba keeps.

Loading (:func:`load_kernels`) rebuilds numba-cuda's own objects from those files, through the
same classmethods numba-cuda's cache uses (``CUDACodeLibrary._rebuild``, ``_Kernel._rebuild``) but
from sparsec's files instead of pickles: no Python function is typed, no LLVM or NVVM runs; each
kernel is loaded on the GPU at load time, so a driver that refuses the code is reported then.
Which code runs is decided per kernel for the current GPU (:func:`choose_code`): the cubin on
the compute capability it was built for, else the PTX where its target is not newer than the
GPU, else a one-line refusal. The kernels of one specialization and bucket are wrapped in a
:class:`PrebuiltKernel`, launched like a numba dispatcher, and installed in the kernel cache of
:mod:`sparsec.codegen.cuda.kernel`, which ``CudaLinearKernel.kernel_for`` reads first.

A kernel's code depends on sparsec's CUDA kernel sources and numba-cuda: both are recorded
(:func:`kernel_fingerprint`, the numba-cuda version) and an artifact from other ones is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from sparsec.codegen.cuda._compat import without_nrt

AOT_VERSION = 1
#: ``kernels.mode`` of a manifest whose CUDA kernels are stored as GPU code.
MODE = "gpu_code"
#: Input dtypes every kernel is saved for: the two ``CudaLinearKernel`` accepts.
X_DTYPES: tuple[str, ...] = ("float32", "float16")
#: Number types a saved signature may name (the kernels' arrays and scalars).
_NUMBER_TYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                 "uint32", "uint64", "bool_")
_ARRAY_RE = re.compile(r"array\((\w+), (\d+)d, ([CFA])\)")


class CudaAotError(RuntimeError):
    """GPU code that cannot be saved, read back or run here; the message (one line) says why."""


# --------------------------------------------------------------------------- versions


def numba_cuda_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("numba-cuda")
    except PackageNotFoundError:
        return "unknown"


@cache
def kernel_fingerprint() -> str:
    """Hash of this package's kernel sources (every ``*.py`` beside this module but this one).

    Saved GPU code is called with the arguments that the kernel classes of the loading sparsec
    pass, in their order, and was generated from those sources: another version of them refuses
    the artifact. Computed once per process, when first asked (before the save or load that
    needs it), so that one process always describes its kernels the same way.
    """
    h = hashlib.sha256()
    here = Path(__file__).parent
    for p in sorted(here.glob("*.py")):
        if p.name != Path(__file__).name:
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def arch_name(cc: tuple) -> str:
    """``(9, 0, "a")`` -> ``"sm_90a"``, ``(8, 6)`` -> ``"sm_86"``."""
    return f"sm_{cc[0]}{cc[1]}{cc[2] if len(cc) > 2 else ''}"


def parse_arch(name: str) -> tuple[int, int, str]:
    """``"sm_90a"`` -> ``(9, 0, "a")``; the last digit is the minor version."""
    m = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", name)
    if not m:
        raise CudaAotError(f"{name!r} is not a GPU architecture name (sm_XY)")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def device_code_key(cc: tuple[int, int]) -> tuple[int, int, str]:
    """The architecture numba-cuda builds for and looks code up under on a GPU of ``cc``
    (``sm_90a`` from Hopper on: numba-cuda targets the arch-specific variant there)."""
    major, minor = int(cc[0]), int(cc[1])
    return major, minor, "a" if (major, minor) >= (9, 0) else ""


# --------------------------------------------------------------------------- signatures


def signature_strings(argtypes: tuple) -> list[str]:
    """Numba argument types as strings that :func:`parse_signature` reads back.

    Only mutable aligned arrays and plain number types are accepted: the kernels take nothing
    else, and other types would not survive the string form.
    """
    from numba.cuda import types

    out = []
    for t in argtypes:
        text = str(t)
        if isinstance(t, types.Array):
            if t.mutable is False or not t.aligned or not _ARRAY_RE.fullmatch(text):
                raise CudaAotError(f"kernel argument type {text} cannot be saved (only mutable, aligned arrays)")
        elif text not in _NUMBER_TYPES:
            raise CudaAotError(f"kernel argument type {text} cannot be saved (only arrays and numbers)")
        out.append(text)
    return out


def parse_signature(strings: list[str]) -> tuple:
    """The numba types that :func:`signature_strings` wrote."""
    from numba.cuda import types

    out = []
    for s in strings:
        m = _ARRAY_RE.fullmatch(s) if isinstance(s, str) else None
        name = m.group(1) if m else s
        if name not in _NUMBER_TYPES:
            raise CudaAotError(f"kernel argument type {s!r} is not one an artifact may hold")
        number = getattr(types, name)
        out.append(types.Array(number, int(m.group(2)), m.group(3)) if m else number)
    return tuple(out)


def launch_argtypes(kernel: Any, x_dtype: str) -> tuple:
    """The numba types of ``CudaLinearKernel.launch``'s arguments for inputs of ``x_dtype``:
    ``(y, x, m, rows, *spec.arrays, bias)``; device copies of contiguous host arrays are typed
    as C-contiguous mutable arrays, as numba types them at a launch."""
    from numba.cuda import types
    from numba.np import numpy_support

    spec = kernel._spec
    xt = types.Array(getattr(types, x_dtype), 2, "C")

    def arr(a: np.ndarray):
        return types.Array(numpy_support.from_dtype(a.dtype), a.ndim, "C")

    # bias is always a float32 vector ([rows], or a 1-element placeholder without bias)
    return (xt, xt, types.int64, types.int64, *(arr(np.asarray(a)) for a in spec.arrays),
            types.Array(types.float32, 1, "C"))


# --------------------------------------------------------------------------- save


def cuda_kernels_of(kernels: list[Any]) -> list[Any]:
    """The objects among ``kernels`` that run sparsec's own CUDA kernels (not cuBLAS)."""
    return [k for k in kernels if getattr(k, "_spec", None) is not None and hasattr(k, "kernel_for")]


def export_kernels(kernels: list[Any], folder: str | os.PathLike, *, cc: tuple[int, int] | None = None,
                   link: bool = True) -> dict[str, Any]:
    """Write the GPU code of every specialization ``kernels`` use into ``folder``; return the
    manifest's ``kernels`` section (JSON-ready; file names relative to ``folder``).

    ``kernels``: :class:`~sparsec.codegen.cuda.kernel.CudaLinearKernel` objects (others, such as
    dense layers, are skipped). Every bucket of ``KernelSpec.buckets`` is written for float32 and
    float16 inputs, compiling what this process has not compiled yet. ``cc``: the compute
    capability to build for (default: the current GPU's). ``link``: also write the cubin (needs a
    linker, which a machine with a GPU has); ``False`` writes PTX only and compiles without
    loading anything on a GPU (for building GPU code on a machine without one).

    Raises :class:`CudaAotError` for a kernel whose code cannot stand alone (linked files, NRT,
    debug builds, captured device arrays).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if cc is None:
        from sparsec.codegen.cuda.device import cuda

        cc = tuple(cuda.get_current_device().compute_capability)
    cc = (int(cc[0]), int(cc[1]))
    key_cc = device_code_key(cc)
    entries: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for k in cuda_kernels_of(kernels):
        spec = k._spec
        for bucket in spec.buckets:
            full_key = tuple(spec.cache_key) + (bucket,)
            for x_dtype in X_DTYPES:
                if (full_key, x_dtype) in seen:
                    continue
                seen.add((full_key, x_dtype))
                dispatcher = k.kernel_for(bucket)
                argtypes = launch_argtypes(k, x_dtype)
                kern = _compiled(dispatcher, argtypes, link)
                entries.append(_write_kernel(kern, folder, len(entries), key_cc, link,
                                             {"key": _jsonable_key(full_key), "bucket": bucket,
                                              "x_dtype": x_dtype}))
    return {"mode": MODE, "aot_version": AOT_VERSION, "arch": arch_name(cc[:2]),
            "compute_capability": list(cc), "numba_cuda": numba_cuda_version(),
            "fingerprint": kernel_fingerprint(), "kernels": entries}


def _compiled(dispatcher: Any, argtypes: tuple, link: bool) -> Any:
    """The ``_Kernel`` of ``dispatcher`` for ``argtypes``, compiled now if needed."""
    kern = dispatcher.overloads.get(argtypes)
    if kern is not None:
        return kern
    if not hasattr(dispatcher, "py_func"):  # saved code (a loaded artifact) lacking this signature
        raise CudaAotError(f"kernel {dispatcher!r} has no code for argument types {signature_strings(argtypes)} "
                           f"and cannot compile any; recompile the model to save it")
    if link:  # on a GPU: compile as a launch would, so the process can use it too
        with without_nrt():
            return dispatcher.compile(argtypes)
    from numba.cuda.dispatcher import _Kernel

    # without a GPU: the same compilation, without loading the result on a device
    with without_nrt():
        return _Kernel(dispatcher.py_func, argtypes, **dispatcher.targetoptions)


def _write_kernel(kern: Any, folder: Path, index: int, key_cc: tuple, link: bool,
                  entry: dict[str, Any]) -> dict[str, Any]:
    lib = kern.library
    where = f"kernel {entry['key']} for {entry['x_dtype']} inputs"
    if lib._linking_files or lib.needs_cudadevrt or getattr(lib, "_lto", False):
        linked = sorted(str(f) for f in lib._linking_files) + (["cudadevrt"] if lib.needs_cudadevrt else []) \
            + (["LTO"] if getattr(lib, "_lto", False) else [])
        raise CudaAotError(f"{where} links other code ({', '.join(linked)}), which an artifact does not hold; "
                           f"it cannot be saved")
    if kern.debug:
        raise CudaAotError(f"{where} was compiled with debug=True, whose error reporting an artifact does not "
                           f"keep; compile without debug to save it")
    if any(getattr(o, "__cuda_array_interface__", None) is not None for o in lib.referenced_objects.values()):
        raise CudaAotError(f"{where} captures a device array, which an artifact cannot hold")
    # the plain target (not sm_90a): the driver can JIT it for this GPU and newer ones
    ptx = lib.get_asm_str(cc=key_cc[:2])
    target = re.search(r"^\s*\.target\s+(sm_\d+[a-z]?)", ptx, re.M)
    if target is None or f".entry {kern.entry_name}(" not in ptx.replace(".entry\t", ".entry "):
        raise CudaAotError(f"{where}: numba-cuda's PTX has no .target line or no entry {kern.entry_name}")
    ptx_arch = target.group(1)
    stem = f"cuda_{index:04d}"
    ptx_file = f"{stem}.{ptx_arch}.ptx"
    (folder / ptx_file).write_text(ptx)
    cubin_file = None
    cubin = _cubin_bytes(lib.get_cubin(cc=key_cc)) if link else None
    if cubin is not None:
        cubin_file = f"{stem}.{arch_name(key_cc)}.cubin"
        (folder / cubin_file).write_bytes(cubin)
    return {**entry, "entry": kern.entry_name, "name": lib.name,
            "signature": signature_strings(tuple(kern.argument_types)),
            "ptx": ptx_file, "ptx_arch": ptx_arch,
            "cubin": cubin_file, "cubin_arch": arch_name(key_cc) if cubin_file else None,
            "cooperative": bool(kern.cooperative), "max_registers": lib._max_registers,
            "nvvm_options": _jsonable_options(lib._nvvm_options),
            "shared_memory_carveout": kern.shared_memory_carveout,
            "launch_config_sensitive": bool(getattr(kern, "launch_config_sensitive", False)),
            "lineinfo": bool(kern.lineinfo)}


def _cubin_bytes(obj: Any) -> bytes | None:
    """The machine code in ``obj``; None when it holds PTX (a kernel loaded from PTX has no cubin)."""
    if getattr(obj, "code_type", "cubin") != "cubin":
        return None
    code = getattr(obj, "code", obj)  # cuda.core ObjectCode, or bytes from older numba-cuda
    if isinstance(code, (bytes, bytearray, memoryview)):
        return bytes(code)
    if isinstance(code, str) and os.path.isfile(code):
        return Path(code).read_bytes()
    raise CudaAotError(f"numba-cuda returned a cubin as {type(code).__name__}, which sparsec cannot save")


def _jsonable_key(key: tuple) -> list:
    out = []
    for v in key:
        if isinstance(v, tuple):
            out.append(_jsonable_key(v))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out.append(v)
        else:
            raise CudaAotError(f"kernel cache key {key!r} holds a {type(v).__name__}, which an artifact cannot store")
    return out


def key_from_json(key: list) -> tuple:
    """The cache key :func:`_jsonable_key` wrote (JSON lists back to tuples)."""
    return tuple(key_from_json(v) if isinstance(v, list) else v for v in key)


def _jsonable_options(options: dict) -> dict:
    return {str(k): v for k, v in options.items() if v is None or isinstance(v, (bool, int, float, str))}


# --------------------------------------------------------------------------- load


def choose_code(entry: dict[str, Any], cc: tuple[int, int]) -> str:
    """``"cubin"`` or ``"ptx"``: which of ``entry``'s code runs on a GPU of compute capability
    ``cc``. The cubin needs the exact architecture it was built for; PTX for a plain target
    ``sm_XY`` is JIT-compiled by the driver for any GPU of ``X.Y`` or newer (an arch-specific
    ``sm_XYa`` one only for ``X.Y``). Raises :class:`CudaAotError` when neither runs."""
    here = device_code_key(cc)
    if entry.get("cubin") and entry.get("cubin_arch") == arch_name(here):
        return "cubin"
    ptx_arch = entry.get("ptx_arch")
    if entry.get("ptx") and ptx_arch:
        major, minor, suffix = parse_arch(ptx_arch)
        if ((major, minor) <= tuple(cc[:2])) if not suffix else (major, minor) == tuple(cc[:2]):
            return "ptx"
    saved = " and ".join(x for x in (entry.get("cubin_arch"), ptx_arch and f"PTX for {ptx_arch}") if x)
    raise CudaAotError(f"this GPU ({arch_name(tuple(cc[:2]))}) cannot run the artifact's GPU code ({saved}); "
                       f"recompile the model on this machine")


def _prebuilt_library_class():
    from numba.cuda.codegen import CUDACodeLibrary

    class PrebuiltCodeLibrary(CUDACodeLibrary):
        """A code library holding saved code only: it hands the cubin or PTX chosen for a GPU to
        the driver, and refuses anything that would compile (it has no LLVM IR)."""

        _saved: dict[str, Any]

        def get_llvm_str(self):
            raise CudaAotError("a kernel loaded from an artifact has no LLVM IR")

        def get_asm_strs(self, cc=None):
            cc = self._ensure_cc(cc)
            choose_code(self._saved, cc[:2])  # refuses a GPU the PTX cannot serve
            return [self._saved["ptx_text"]]

        def get_cubin(self, cc=None):
            from cuda.core import ObjectCode

            cc = self._ensure_cc(cc)
            code = self._cubin_cache.get(cc)
            if code is None:
                if choose_code(self._saved, cc[:2]) == "cubin":
                    code = ObjectCode.from_cubin(self._saved["cubin_bytes"])
                else:  # the driver compiles PTX when it loads it
                    code = ObjectCode.from_ptx(self._saved["ptx_text"].encode())
                self._cubin_cache[cc] = code
            return code

    return PrebuiltCodeLibrary


def rebuild_kernel(entry: dict[str, Any], ptx: str, cubin: bytes | None) -> Any:
    """A numba-cuda ``_Kernel`` for ``entry`` (a manifest entry) from its saved code, typed with
    its saved signature; nothing is compiled (the driver JITs PTX when it loads it)."""
    from numba.cuda import types
    from numba.cuda.dispatcher import _Kernel

    lib_cls = _prebuilt_library_class()
    lib = lib_cls._rebuild(codegen=None, name=entry.get("name") or entry["entry"], entry_name=entry["entry"],
                           llvm_strs=[], ptx_cache={}, cubin_cache={}, linkerinfo_cache={},
                           max_registers=entry.get("max_registers"), nvvm_options=dict(entry.get("nvvm_options") or {}),
                           needs_cudadevrt=False, nrt=False, use_cooperative=bool(entry.get("cooperative")), lto=False)
    lib._saved = {**entry, "ptx_text": ptx, "cubin_bytes": cubin}
    signature = types.void(*parse_signature(entry["signature"]))
    return _Kernel._rebuild(cooperative=bool(entry.get("cooperative")), name=entry["entry"], signature=signature,
                            codelibrary=lib, debug=False, lineinfo=bool(entry.get("lineinfo")), call_helper=None,
                            extensions=[], shared_memory_carveout=entry.get("shared_memory_carveout"),
                            launch_config_sensitive=bool(entry.get("launch_config_sensitive")))


def _arg_key(value: Any, arrays_as_any: bool = False) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return type(value).__name__
    if arrays_as_any:
        return np.dtype(dtype).name, value.ndim, "A"
    flags = getattr(value, "flags", None)
    contiguous = True if flags is None else bool(flags["C_CONTIGUOUS"])
    return np.dtype(dtype).name, value.ndim, "C" if contiguous else "A"


def _type_key(t: Any) -> Any:
    from numba.cuda import types

    if isinstance(t, types.Array):
        return str(t.dtype), t.ndim, "C" if t.layout == "C" else "A"
    if isinstance(t, types.Boolean):
        return "bool"
    if isinstance(t, types.Integer):
        return "int"
    return str(t)


class PrebuiltKernel:
    """Saved kernels of one specialization and batch bucket, launched like a numba dispatcher:
    ``k[grid, block]``, ``k[grid, block, stream]`` or ``k[grid, block, stream, shared_bytes]``,
    then called with the kernel's arguments. The kernel whose saved argument types fit the
    arguments runs (arrays by dtype, dimensions and C-contiguity; Python ints as the integer
    parameters); arguments no saved kernel takes raise ``TypeError`` instead of compiling.
    """

    def __init__(self, kernels: list[Any], label: str = "") -> None:
        self.label = label
        self.overloads: dict[tuple, Any] = {}
        self._by_key: dict[tuple, Any] = {}
        for kern in kernels:
            self.overloads[tuple(kern.argument_types)] = kern
            self._by_key.setdefault(tuple(_type_key(t) for t in kern.argument_types), kern)

    def __repr__(self) -> str:
        return f"PrebuiltKernel({self.label or '?'}, {len(self.overloads)} signatures)"

    def __getitem__(self, config: Any) -> _Launch:
        from numba.cuda.errors import normalize_kernel_dimensions

        if not isinstance(config, tuple) or len(config) not in (2, 3, 4):
            raise ValueError("launch a kernel as k[grid, block], k[grid, block, stream] or "
                             "k[grid, block, stream, shared_bytes]")
        griddim, blockdim = normalize_kernel_dimensions(config[0], config[1])
        stream = config[2] if len(config) > 2 else 0
        shared = int(config[3]) if len(config) > 3 else 0
        return _Launch(self, griddim, blockdim, stream, shared)

    def kernel_for_args(self, args: tuple) -> Any:
        kern = self._by_key.get(tuple(_arg_key(a) for a in args))
        if kern is None:
            kern = self._by_key.get(tuple(_arg_key(a, arrays_as_any=True) for a in args))
        if kern is None:
            got = ", ".join(str(_arg_key(a)) for a in args)
            raise TypeError(f"the saved kernel {self.label} has no code for arguments ({got}); an artifact only "
                            f"runs the argument types it was saved with")
        return kern


@dataclass
class _Launch:
    kernel: PrebuiltKernel
    griddim: tuple
    blockdim: tuple
    stream: Any
    sharedmem: int

    def __call__(self, *args: Any) -> None:
        from numba.cuda.cudadrv.driver import _to_core_stream

        kern = self.kernel.kernel_for_args(args)
        kern.launch(args, self.griddim, self.blockdim, _to_core_stream(self.stream), self.sharedmem)


@dataclass
class LoadedCudaKernels:
    """What :func:`load_kernels` did: ``kernels`` (cache key with bucket -> the rebuilt
    :class:`PrebuiltKernel`), ``installed`` of them put in the kernel cache, ``present`` ones this
    process already had (kept), and per saved kernel which code serves this GPU
    (``from_cubin`` / ``from_ptx``)."""

    arch: str = ""
    installed: int = 0
    present: int = 0
    from_cubin: int = 0
    from_ptx: int = 0
    kernels: dict = field(default_factory=dict)

    @property
    def keys(self) -> set:
        return set(self.kernels)


def check_section(section: dict[str, Any]) -> None:
    """Refuse a ``kernels`` section written by another kernel code or numba-cuda (one line)."""
    if section.get("aot_version") != AOT_VERSION:
        raise CudaAotError(f"the artifact's GPU code has format {section.get('aot_version')!r}, this sparsec reads "
                           f"{AOT_VERSION}; recompile the model")
    if section.get("numba_cuda") != numba_cuda_version():
        raise CudaAotError(f"the artifact's GPU code was built with numba-cuda {section.get('numba_cuda')} (this "
                           f"environment has {numba_cuda_version()}); recompile the model in this environment")
    if section.get("fingerprint") != kernel_fingerprint():
        raise CudaAotError("the artifact's GPU code was built from different CUDA kernel code than this sparsec's; "
                           "recompile the model with this version")


def load_kernels(section: dict[str, Any], folder: str | os.PathLike, cc: tuple[int, int] | None = None,
                 install: bool = True) -> LoadedCudaKernels:
    """Rebuild every kernel of ``section`` (from :func:`export_kernels`) from the files in
    ``folder`` for the current GPU (or ``cc``) and, with ``install``, put each specialization
    and bucket in the kernel cache (keeping any this process already holds).

    The caller has checked the files' checksums. Raises :class:`CudaAotError` (one line) for
    another kernel code or numba-cuda, or a GPU that neither the cubin nor the PTX serves.
    Compiles nothing: each kernel is loaded on the GPU here, where the driver JIT-compiles PTX
    (only when the cubin does not fit this GPU); a driver that refuses the code is reported then.
    """
    check_section(section)
    folder = Path(folder)
    if cc is None:
        from sparsec.codegen.cuda.device import cuda

        cc = tuple(cuda.get_current_device().compute_capability)
    cc = (int(cc[0]), int(cc[1]))
    out = LoadedCudaKernels(arch=arch_name(cc))
    grouped: dict[tuple, list[Any]] = {}
    for entry in section.get("kernels", []):
        which = choose_code(entry, cc)
        try:
            ptx = (folder / entry["ptx"]).read_text()
            cubin = (folder / entry["cubin"]).read_bytes() if which == "cubin" else None
        except (OSError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CudaAotError(f"GPU code of kernel {entry.get('key')} cannot be read ({e}); the artifact is "
                               f"damaged: recompile it") from None
        kern = rebuild_kernel(entry, ptx, cubin)
        try:
            # load it on the GPU now (the driver JITs PTX here), so that a driver that cannot take
            # the code is refused at load, not at the model's first call
            kern.bind()
        except Exception as e:  # noqa: BLE001 - the driver's errors have no common base class
            what = f"cubin for {entry.get('cubin_arch')}" if which == "cubin" else f"PTX for {entry.get('ptx_arch')}"
            detail = " ".join(str(e).split())[:300]
            raise CudaAotError(f"the GPU driver could not load the artifact's {what} ({type(e).__name__}: {detail}); "
                               f"update the driver or recompile the model on this machine") from None
        if which == "cubin":
            out.from_cubin += 1
        else:
            out.from_ptx += 1
        grouped.setdefault(key_from_json(entry["key"]), []).append(kern)
    from sparsec.codegen.cuda.kernel import install_kernel  # imports numba-cuda: only when loading

    for key, kernels in grouped.items():
        out.kernels[key] = PrebuiltKernel(kernels, label="/".join(map(str, key)))
        if not install:
            continue
        if install_kernel(key, out.kernels[key]):
            out.installed += 1
        else:
            out.present += 1
    return out


def missing_kernels(kernels: list[Any], keys: set) -> list[str]:
    """The specializations (as text) that ``kernels`` launch and ``keys`` lacks."""
    missing = []
    for k in cuda_kernels_of(kernels):
        for bucket in k._spec.buckets:
            key = tuple(k._spec.cache_key) + (bucket,)
            if key not in keys:
                missing.append("/".join(map(str, key)))
    return sorted(set(missing))

