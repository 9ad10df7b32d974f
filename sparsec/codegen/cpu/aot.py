"""Ahead-of-time CPU kernels: compiled machine code saved as object files, linked back without
compiling.

The CPU kernels are Numba functions (:mod:`.bitmask`, :mod:`.loops`) that the kernel classes in
:mod:`.kernel` call through Numba dispatchers. :func:`export_kernels` writes, for every entry
function those classes call (a dispatcher with compiled signatures that no other exported function
links in), the relocatable object code of each compiled signature: the nopython function, the
functions it calls, and Numba's CPython wrapper around it. :func:`load_kernels` links those
objects into a fresh process with llvmlite's MCJIT (``add_object_file`` on an engine built from an
empty module; no IR is parsed or optimized, no code is generated) and installs each wrapper in
its dispatcher's table of compiled signatures, so the kernel classes run unchanged and find every
signature already compiled. Nothing is unpickled.

What a loading process must provide, and how it is checked before linking:

* the same CPU kernel code: :func:`codegen_fingerprint` (a hash of this package's kernel
  sources, the CPU model name and the numba/llvmlite/Python versions) must match, since the
  kernel classes pass arguments positionally to the saved machine code;
* a CPU with every feature the code was compiled for (:func:`compiled_cpu`);
* every symbol the objects leave undefined: Numba's runtime helpers (NRT, ``numba_*``, exception
  classes), registered here without compiling anything, and the C library / CPython API of the
  process. Each one is looked up before linking: an unresolved symbol inside MCJIT would abort
  the process instead of raising.

Object files come from the object Numba's JIT produced for the kernel when it is still held in
memory (a kernel compiled in this process); for a kernel Numba loaded from its own disk cache
(which keeps no object code) from the optimized LLVM module Numba keeps for linking, run through
Numba's target machine (code generation only); failing both, from compiling a private copy of
the same function for the same signature.

Limitations: kernels are threaded by sparsec's own pool (:mod:`.threads`), not Numba's parallel
runtime, so no scheduler symbols are needed; a kernel that used ``parallel=True`` would leave
``numba_parallel_for`` undefined and be refused at load. Object files are ELF (Linux).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import struct
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: version of the ``kernels`` section this module writes and reads.
AOT_VERSION = 1

#: codecache keys of the generated decode-step modules (:mod:`.decoder`), and the one function
#: of theirs that Python calls
DECODER_PREFIX = "decoder_"
DECODER_ENTRY = "step"


class AotError(RuntimeError):
    """Kernel object code that cannot be saved or linked here; the message says why and what to do."""


# --------------------------------------------------------------------------- fingerprints


def codegen_fingerprint() -> str:
    """Hash of the CPU kernel sources and of the toolchain whose ABI the object code depends on.

    Object code saved by one sparsec is only called correctly by kernel classes that pass the same
    arguments in the same order, so any change to the kernel sources refuses old artifacts. The
    sources are those :mod:`.codecache` hashed when this process generated its first kernel
    module (close to when it imported the kernel code), not the files as they are when saving:
    a save must describe the code that compiled its kernels even if the files changed since.
    """
    import llvmlite
    import numba

    from sparsec.codegen.cpu.codecache import _fingerprint

    h = hashlib.sha256(_fingerprint().encode())
    h.update(f"numba {numba.__version__} llvmlite {llvmlite.__version__}".encode())
    h.update(f"python {sys.version_info.major}.{sys.version_info.minor} {sys.implementation.name}".encode())
    return h.hexdigest()[:32]


def compiled_cpu() -> dict[str, Any]:
    """The CPU model and features Numba compiles for in this process (``cpu_name``, ``features``:
    the sorted ``+feature`` names of its target machine)."""
    import llvmlite.binding as ll
    from numba.core import codegen as nb_codegen
    from numba.core import config

    name = config.CPU_NAME or ll.get_host_cpu_name()
    flat = config.CPU_FEATURES if config.CPU_FEATURES is not None else nb_codegen.get_host_cpu_features()
    features = sorted(f[1:] for f in flat.split(",") if f.startswith("+"))
    return {"cpu_name": name, "features": features}


def missing_cpu_features(required: list[str]) -> list[str]:
    """Features in ``required`` this CPU does not have (as LLVM names them)."""
    import llvmlite.binding as ll

    host = ll.get_host_cpu_features()
    return sorted(f for f in required if not host.get(f, False))


# --------------------------------------------------------------------------- numba types as JSON


def _encode_type(t: Any) -> dict | None:
    from numba.core import types

    if isinstance(t, types.Array) and isinstance(t.dtype, (types.Integer, types.Float, types.Boolean)):
        return {"array": str(t.dtype), "ndim": t.ndim, "layout": t.layout, "readonly": not t.mutable,
                "aligned": bool(t.aligned)}
    if isinstance(t, (types.Integer, types.Float, types.Boolean)):
        return {"scalar": str(t)}
    return None


def _scalar(name: str) -> Any:
    import numpy as np
    from numba.np.numpy_support import from_dtype

    return from_dtype(np.dtype("bool" if name == "bool" else name))


def _decode_type(d: dict) -> Any:
    from numba.core import types

    if "array" in d:
        return types.Array(_scalar(d["array"]), int(d["ndim"]), str(d["layout"]), readonly=bool(d["readonly"]),
                           aligned=bool(d["aligned"]))
    return _scalar(d["scalar"])


# --------------------------------------------------------------------------- ELF symbols


def undefined_symbols(obj: bytes) -> list[str]:
    """Names an ELF64 little-endian relocatable object references but does not define."""
    if obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1:
        raise AotError("kernel object code is not ELF64 little-endian; ahead-of-time kernels need Linux x86-64")
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    names: set[str] = set()
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sh[6]]
        str_off = strtab[4]
        for k in range(sh[5] // sh[9]):
            st_name, st_info, _other, st_shndx, _value, _size = struct.unpack_from("<IBBHQQ", obj, sh[4] + k * sh[9])
            if st_shndx != 0 or st_name == 0 or (st_info >> 4) == 0:  # defined, unnamed or local
                continue
            end = obj.index(b"\0", str_off + st_name)
            names.add(obj[str_off + st_name:end].decode())
    return sorted(names)


# --------------------------------------------------------------------------- export


@dataclass
class ExportedKernel:
    """One compiled signature of one kernel function, as the manifest records it."""

    module: str           # the function's module (generated modules: see ``generated``)
    generated: str | None  # codecache key of a generated module, else None
    qualname: str
    argtypes: list[dict]
    wrapper: str          # symbol of Numba's CPython wrapper
    env: str              # symbol of the wrapper's environment pointer
    object: str           # file name under the artifact's kernel folder
    sha256: str
    undefined: list[str]
    source: str           # "jit" (the object that ran), "emitted" (from the optimized module Numba
                          # cached), "recompiled" (a private copy, same code) or "artifact"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _kernel_modules() -> list[tuple[Any, str | None]]:
    """Every loaded module holding CPU kernel functions: this package's modules and the generated
    ones, with the codecache key of the latter."""
    from sparsec.codegen.cpu import codecache

    out: list[tuple[Any, str | None]] = []
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith("sparsec.codegen.cpu.") and name != __name__:
            out.append((mod, None))
    for key, mod in list(codecache._MODULES.items()):
        out.append((mod, key))
    return out


def _entry_overloads() -> list[tuple[Any, str | None, Any, tuple, Any]]:
    """``(module, key, dispatcher, signature, compile result)`` of every compiled kernel function
    that Python code calls: those whose code no other compiled kernel links in."""
    from numba.core.registry import CPUDispatcher

    found: dict[int, tuple[Any, str | None, Any]] = {}
    for mod, key in _kernel_modules():
        for value in list(vars(mod).values()):
            # a function belongs to the module that defines it, not to those that import it
            if (isinstance(value, CPUDispatcher) and value.overloads and id(value) not in found
                    and value.py_func.__module__ == mod.__name__):
                found[id(value)] = (mod, key, value)

    def walk(lib, into: set[int]) -> None:
        for dep in getattr(lib, "_linking_libraries", ()):
            if id(dep) not in into:
                into.add(id(dep))
                walk(dep, into)

    # A decode step (:mod:`.decoder`) links the kernels it calls into its own code; that must not
    # hide those kernels' Python-called signatures from export. The step is exported as an entry
    # of its own (its object code carries its private copies of those kernels); the decoder
    # module's helpers are only ever linked into it.
    in_decoder = {id(d) for _, key, d in found.values() if key is not None and key.startswith(DECODER_PREFIX)}
    linked: set[int] = set()  # libraries linked into another exported kernel
    in_steps: set[int] = set()  # libraries linked into a decode step
    for _, _, disp in found.values():
        for cres in list(disp.overloads.values()):
            walk(cres.library, in_steps if id(disp) in in_decoder else linked)
    out = []
    for mod, key, disp in found.values():
        if id(disp) in in_decoder:
            if disp.py_func.__name__ == DECODER_ENTRY:
                out += [(mod, key, disp, sig, cres) for sig, cres in list(disp.overloads.items())]
            continue
        for sig, cres in list(disp.overloads.items()):
            if id(cres.library) not in linked:
                out.append((mod, key, disp, sig, cres))
    return out


def _object_code(disp, sig: tuple, cres) -> tuple[bytes, Any, str]:
    """Object code of ``cres`` and the fndesc naming its symbols."""
    import llvmlite.binding as ll
    from numba.core.registry import CPUDispatcher

    if isinstance(cres, _LinkedOverload):  # linked from an artifact: save the same object again
        return cres.object_code, cres, "artifact"
    lib = cres.library
    if getattr(lib, "_object_caching_enabled", False) and getattr(lib, "_compiled_object", None):
        return bytes(lib._compiled_object), cres.fndesc, "jit"
    shared = getattr(lib, "_shared_module", None)
    if shared is not None and any(not f.is_declaration for f in shared.functions):
        # Numba loaded this one from its disk cache and handed the object to its engine, keeping
        # the optimized module (its functions made linkonce_odr) for linking into other code:
        # generate machine code from that module with Numba's target machine. No Python-level
        # compiling or optimizing, only LLVM's code generator.
        module = ll.parse_bitcode(shared.as_bitcode())
        return bytes(lib._codegen._tm.emit_object(module)), cres.fndesc, "emitted"
    # Neither: compile a private copy of the same function (same options, no disk cache).
    copy = CPUDispatcher(disp.py_func, locals=dict(disp.locals), targetoptions=dict(disp.targetoptions))
    copy.compile(sig)
    fresh = copy.overloads[sig]
    module = ll.parse_bitcode(fresh.library._final_module.as_bitcode())
    return bytes(fresh.library._codegen._tm.emit_object(module)), fresh.fndesc, "recompiled"


def export_kernels(directory: str | os.PathLike, generated_keys: set[str] | None = None) -> dict[str, Any]:
    """Write the object code of the compiled CPU kernel entries into ``directory`` (created) and
    return the manifest section that :func:`load_kernels` reads.

    ``generated_keys``: export the generated kernel modules of these codecache keys only
    (``None``: every one this process compiled); the helpers of this package's own modules are
    always exported. Kernels that cannot be exported (an argument type other than arrays and
    numbers) are listed under ``"skipped"`` with the reason: those compile on first use after
    loading.
    """
    from numba.core import types

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    kernels: list[dict] = []
    skipped: list[dict] = []
    generated: dict[str, dict] = {}
    entries = [e for e in _entry_overloads() if e[1] is None or generated_keys is None or e[1] in generated_keys]
    for index, (mod, key, disp, sig, cres) in enumerate(
            sorted(entries, key=lambda e: (e[0].__name__, e[2].py_func.__qualname__, str(e[3])))):
        qualname = disp.py_func.__qualname__
        argtypes = [_encode_type(t) for t in sig]
        if any(a is None for a in argtypes) or cres.objectmode or cres.signature.return_type != types.none:
            skipped.append({"module": mod.__name__, "qualname": qualname, "signature": str(sig),
                            "reason": "arguments other than arrays and numbers, or a return value"})
            continue
        if [_decode_type(a) for a in argtypes] != list(sig):
            skipped.append({"module": mod.__name__, "qualname": qualname, "signature": str(sig),
                            "reason": "argument types do not round-trip through their description"})
            continue
        obj, fndesc, how = _object_code(disp, sig, cres)
        fname = f"k{index:03d}_{qualname}.o"
        (folder / fname).write_bytes(obj)
        kernels.append(asdict(ExportedKernel(
            module=mod.__name__, generated=key, qualname=qualname, argtypes=argtypes,
            wrapper=fndesc.llvm_cpython_wrapper_name, env=fndesc.env_name, object=fname,
            sha256=_sha256(obj), undefined=undefined_symbols(obj), source=how)))
        if key is not None and key not in generated:
            src = Path(mod.__file__).read_text()
            sname = f"{mod.__name__}.py"
            (folder / sname).write_text(src)
            generated[key] = {"module": mod.__name__, "file": sname, "sha256": _sha256(src.encode())}
    return {
        "aot_version": AOT_VERSION,
        "fingerprint": codegen_fingerprint(),
        **compiled_cpu(),
        "kernels": kernels,
        "generated_modules": generated,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- load

_LOCK = threading.Lock()
#: engines linked in this process, kept alive for as long as the process runs (the dispatchers
#: hold wrappers whose machine code lives in them).
_ENGINES: list[Any] = []


def _register_runtime_symbols() -> None:
    """Make Numba's runtime helpers resolvable by a fresh MCJIT engine, the way Numba registers
    them for its own (no code is compiled: these are C functions of Numba's extension modules)."""
    import llvmlite.binding as ll
    from numba import _helperlib
    from numba.core import base, intrinsics
    from numba.core.runtime import (
        _nrt_python,
        nrt,  # noqa: F401 - sets up NRT's allocator on import
    )

    base._load_global_helpers()
    for py_name, addr in _nrt_python.c_helpers.items():
        c_name = py_name if py_name.startswith("_") else "NRT_" + py_name
        if not ll.address_of_symbol(c_name):
            ll.add_symbol(c_name, addr)
    for fname in intrinsics.INTR_MATH:
        if fname in _helperlib.c_helpers and not ll.address_of_symbol(fname):
            ll.add_symbol(fname, _helperlib.c_helpers[fname])


class LoadedKernels:
    """What :func:`load_kernels` installed: ``installed`` signatures, ``present`` ones that this
    process had compiled already (left as they were), and the seconds linking took."""

    def __init__(self) -> None:
        self.installed = 0
        self.present = 0
        self.link_seconds = 0.0


def _kernel_module(entry: dict, folder: Path, section: dict) -> Any:
    key = entry["generated"]
    if key is None:
        return importlib.import_module(entry["module"])
    from sparsec.codegen.cpu.codecache import generated_module

    info = section["generated_modules"][key]
    src = (folder / info["file"]).read_text()
    if _sha256(src.encode()) != info["sha256"]:
        raise AotError(f"{folder / info['file']} does not match its sha256 in the manifest; the artifact is "
                       f"damaged: recompile it")
    return generated_module(key, lambda: src)


def check_loadable(section: dict, folder: str | os.PathLike) -> None:
    """Everything :func:`load_kernels` verifies before linking; raises :class:`AotError`."""
    folder = Path(folder)
    if section.get("aot_version") != AOT_VERSION:
        raise AotError(f"kernel section version {section.get('aot_version')!r}, this sparsec reads {AOT_VERSION}; "
                       f"recompile the artifact with this version")
    fp = codegen_fingerprint()
    if section.get("fingerprint") != fp:
        raise AotError("the artifact's kernels were compiled by different CPU kernel code, for another CPU model, or "
                       "with other numba/llvmlite/Python versions than this environment has; recompile the model "
                       "with this environment")
    missing = missing_cpu_features(list(section.get("features", [])))
    if missing:
        raise AotError(f"the artifact's kernels were compiled for a {section.get('cpu_name')} CPU and use "
                       f"{', '.join(missing)}, which this CPU lacks; recompile the model on this machine "
                       f"(or compile it where NUMBA_CPU_NAME=generic gives portable kernels)")
    for entry in section.get("kernels", []):
        path = folder / entry["object"]
        if not path.is_file():
            raise AotError(f"{path} is missing; the artifact is incomplete: recompile it")


def load_kernels(section: dict, folder: str | os.PathLike) -> LoadedKernels:
    """Link the object files of ``section`` (from :func:`export_kernels`) found in ``folder`` and
    install each one in its kernel function's dispatcher. Compiles nothing.

    Raises :class:`AotError` for other kernel code or toolchain versions, a CPU without the
    features the code uses, a missing or modified object file, or a symbol this process cannot
    provide. A signature this process already compiled keeps its own code.
    """
    import time

    import llvmlite.binding as ll
    from numba import _dynfunc
    from numba.core.environment import Environment

    t0 = time.perf_counter()
    folder = Path(folder)
    check_loadable(section, folder)
    out = LoadedKernels()
    with _LOCK:
        _register_runtime_symbols()
        todo = []
        for entry in section.get("kernels", []):
            mod = _kernel_module(entry, folder, section)
            disp = getattr(mod, entry["qualname"], None)
            if disp is None or not hasattr(disp, "_insert"):
                raise AotError(f"{entry['module']}.{entry['qualname']} is not a kernel function in this sparsec; "
                               f"recompile the artifact")
            sig = tuple(_decode_type(a) for a in entry["argtypes"])
            if sig in disp.overloads:
                out.present += 1
                continue
            data = (folder / entry["object"]).read_bytes()
            if _sha256(data) != entry["sha256"]:
                raise AotError(f"{folder / entry['object']} does not match its sha256 in the manifest (damaged or "
                               f"modified); recompile the artifact")
            for name in entry["undefined"]:
                if not ll.address_of_symbol(name):
                    raise AotError(f"kernel object {entry['object']} needs the symbol {name!r}, which this process "
                                   f"does not provide; recompile the model in this environment")
            todo.append((entry, mod, disp, sig, data))
        if not todo:
            out.link_seconds = time.perf_counter() - t0
            return out
        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        target = ll.Target.from_default_triple()
        tm = target.create_target_machine(reloc="static", codemodel="jitdefault", jit=True)
        engine = ll.create_mcjit_compiler(ll.parse_assembly(""), tm)
        objects = []
        for *_, data in todo:
            obj = ll.ObjectFileRef.from_data(data)
            engine.add_object_file(obj)
            objects.append(obj)
        engine.finalize_object()
        keep = (engine, tm, objects)
        _ENGINES.append(keep)
        for entry, mod, disp, sig, data in todo:
            addr = engine.get_function_address(entry["wrapper"])
            env_addr = engine.get_global_value_address(entry["env"])
            if not addr or not env_addr:
                raise AotError(f"kernel object {entry['object']} does not define {entry['qualname']}'s wrapper; "
                               f"the artifact is damaged: recompile it")
            env = Environment(vars(mod))
            import ctypes

            ctypes.c_void_p.from_address(env_addr).value = id(env)
            fn = _dynfunc.make_function(mod, entry["qualname"], f"sparsec ahead-of-time {entry['qualname']}",
                                        addr, env, (keep, env))
            disp._insert([t._code for t in sig], fn, False)
            disp.overloads[sig] = _LinkedOverload(sig, fn, data, entry["wrapper"], entry["env"])
            out.installed += 1
    out.link_seconds = time.perf_counter() - t0
    return out


class _LinkedOverload:
    """Stands in a dispatcher's ``overloads`` for a signature linked from object code, so code
    that asks which signatures exist (``dispatcher.signatures``) sees it compiled. It carries no
    LLVM library: a Numba function compiled later that *calls* such a kernel from nopython code
    is not supported (sparsec's kernels are only called from Python)."""

    objectmode = False
    library = None
    lifted = ()
    fndesc = None

    def __init__(self, args: tuple, entry_point: Any, object_code: bytes, wrapper: str, env: str) -> None:
        from numba.core import types
        from numba.core.typing import signature

        self.signature = signature(types.none, *args)
        self.entry_point = entry_point
        self.object_code = object_code
        # the names export_kernels records (a fndesc's attributes)
        self.llvm_cpython_wrapper_name = wrapper
        self.env_name = env
