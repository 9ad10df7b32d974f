"""Artifacts on disk: a directory that loads back into a working model without compiling.

Layout (``FORMAT_VERSION`` 2)::

    DIR/manifest.json        format version; sparsec/Python/torch/numba/llvmlite versions; target;
                             pipeline text; capture method and input names; per-layer formats;
                             the CPU the kernels were compiled for; the compile report; the
                             sha256 of every other file and of the manifest itself
    DIR/weights.safetensors  every packed layer's tensors (``kernel.<module>.<field>``) and the
                             tensors the graph reads (``graph.<attribute path>``)
    DIR/graph.json           the graph, node by node (see :mod:`sparsec.runtime.loader`)
    DIR/graph.py             the same graph as generated Python source, for reading and diffing
    DIR/tokenizer/           optional: the tokenizer's own files (JSON), for ``sparsec generate``
    DIR/kernels/             CPU targets: the kernels' relocatable object code (``*.o``) and the
                             generated kernel sources they were compiled from
                             (see :mod:`sparsec.codegen.cpu.aot`); CUDA: each kernel's PTX
                             (``*.sm_XY.ptx``) and cubin for the GPU it was compiled on
                             (``*.sm_XYa.cubin``), for every batch bucket and both input dtypes
                             (see :mod:`sparsec.codegen.cuda.aot`)

A CUDA artifact's manifest records, under ``kernels``, the GPU architecture (``arch``,
``compute_capability``), the numba-cuda version, a fingerprint of the kernel sources and, per
kernel, its cache key, bucket, input dtype, entry symbol and argument types as text. A model
compiled under numba's CUDA simulator has no GPU code and is refused.

Writes are atomic: the artifact is assembled in a temporary sibling directory and renamed into
place, so an interrupted save leaves either the previous artifact or none under ``DIR``, never a
half-written one. Reading the manifest (:func:`read_manifest`) verifies the manifest's own digest
(a hand edit is refused) and every file's checksum, and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
GRAPH = "graph.py"
GRAPH_JSON = "graph.json"
KERNEL_DIR = "kernels"
TOKENIZER_DIR = "tokenizer"


class ArtifactError(RuntimeError):
    """A missing, damaged, tampered or incompatible artifact; the message says which and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def host_cpu_features() -> list[str]:
    try:
        import llvmlite.binding as llvm

        return sorted(f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+"))
    except Exception:  # noqa: BLE001 - features are informative when llvmlite cannot tell
        return []


def versions() -> dict[str, str]:
    """The versions an artifact records (and :func:`~sparsec.runtime.loader.check_compatible` compares)."""
    import llvmlite
    import numba

    import sparsec

    return {"sparsec": sparsec.__version__, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "torch": torch.__version__, "numba": numba.__version__, "llvmlite": llvmlite.__version__}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def unwritable_reason(dest: str | os.PathLike, probe: bool = False) -> str | None:
    """Why the file or directory ``dest`` could not be created (or replaced) beside its siblings,
    or ``None``. Nothing is created, except with ``probe``: a temporary directory is made and
    removed in the nearest existing parent, which catches what permission bits do not (a
    read-only file system, a process that ignores them)."""
    parent = Path(dest).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    if probe:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".sparsec-probe-", dir=parent))
        except OSError as e:
            return f"{parent} is not writable ({e.strerror or e})"
    return None


def check_destination(dest: str | os.PathLike, probe: bool = False) -> None:
    """Refuse, before anything is compiled or written, an artifact path that :func:`save_artifact`
    would refuse or could not write (``probe``: see :func:`unwritable_reason`)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ArtifactError(f"{dest} exists and is not a directory; choose a new or empty directory")
    if dest.exists() and not (dest / MANIFEST).exists() and any(dest.iterdir()):
        raise ArtifactError(f"{dest} exists and is not a sparsec artifact; choose an empty or new directory")
    why = unwritable_reason(dest, probe=probe)
    if why is not None:
        raise ArtifactError(f"cannot write an artifact at {dest}: {why}; choose a writable location")


def save_artifact(compiled: Any, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``compiled`` (a :class:`~sparsec.runtime.compiled.CompiledModule`) to ``path``;
    ``tokenizer`` (a Hugging Face tokenizer, optional) is saved under ``tokenizer/`` as JSON files.

    A graph that cannot be described (an argument type or module the loader could not rebuild)
    is refused before anything is written. ``path`` is replaced only once the new artifact is
    complete; an existing artifact there is replaced, any other non-empty directory refused.
    """
    from safetensors.torch import save_file

    from sparsec.runtime.compiled import CompiledModule, KernelLinear
    from sparsec.runtime.loader import encode_graph

    if not isinstance(compiled, CompiledModule):
        raise ArtifactError(f"save needs a CompiledModule from sparsec.compile, got {type(compiled).__name__}")
    if compiled.target not in ("cpu", "cuda"):
        raise ArtifactError(f"artifacts hold CPU or CUDA kernel code; this model was compiled for "
                            f"{compiled.target!r}: compile it with target='cpu' or 'cuda' to save it")
    if compiled.target == "cuda":
        _check_cuda_savable()
    dest = Path(path)
    check_destination(dest)
    gm = compiled.graph_module
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    kernel_modules: dict[str, KernelLinear] = {}
    for name, module in gm.named_modules():
        if isinstance(module, KernelLinear):
            kernel_modules[name] = module
            packed = module.packed
            tensors.update(packed.tensors(f"kernel.{name}"))
            layers.append({"module": name, "layer": module.layer, "format": packed.format_name,
                           "value_type": packed.value_type, "shape": list(packed.shape),
                           "options": _jsonable(packed.options()), "nbytes": packed.nbytes(),
                           "activation": module.activation, "bias": module.bias is not None,
                           **module.kernel_options})
            if module.bias is not None:
                tensors[f"graph.{name}.bias"] = module.bias
    graph_desc, graph_tensors = encode_graph(gm, set(kernel_modules))
    tensors.update({f"graph.{k}": v for k, v in graph_tensors.items()})
    tensors = _independent(tensors)
    report = compiled.report.to_dict() if hasattr(compiled.report, "to_dict") else compiled.report
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "target": compiled.target,
        "pipeline": compiled.pipeline,
        "capture_method": compiled.method,
        "input_names": compiled.input_names,
        "constant_kwargs": {k: v for k, v in compiled.constant_kwargs.items()
                            if isinstance(v, (bool, int, float, str, type(None)))},
        "layers": layers,
        "model": _jsonable(getattr(compiled, "source_model", None)),
        "report": _jsonable(report),
        "notes": [f"dropped node {n}: torch.export's input guard (its code is generated at export)"
                  for n in graph_desc["dropped"]],
    }
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        raise ArtifactError(f"cannot write an artifact at {dest}: {e.strerror or e}; choose a writable "
                            f"location") from None
    try:
        os.chmod(tmp, default_mode(directory=True))  # not mkdtemp's private 0700
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / GRAPH_JSON).write_text(json.dumps(graph_desc))
        (tmp / GRAPH).write_text(gm.code)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        manifest["kernels"] = _write_kernels(compiled.target, layers, tmp / KERNEL_DIR,
                                             [m.kernel for m in kernel_modules.values()])
        manifest["cpu_features"] = manifest["kernels"].get("features", [])
        manifest["files"] = {p.relative_to(tmp).as_posix(): _sha256(p)
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        file_mode = default_mode(directory=False)
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, file_mode)
        _replace(tmp, dest)
    except OSError as e:
        raise ArtifactError(f"writing the artifact at {dest} failed: {e.strerror or e}; nothing was replaced, "
                            f"free space or choose another location") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def default_mode(directory: bool) -> int:
    """The permissions a new file (or directory) gets under this process's umask. ``mkstemp`` and
    ``mkdtemp`` make private ones (0600, 0700); what they become in place of the user's gets this."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _check_cuda_savable() -> None:
    """Refuse (before anything is written) a CUDA model that has no GPU code to store."""
    from sparsec.codegen.cuda._compat import is_simulator

    if is_simulator():
        raise ArtifactError("this model was compiled for 'cuda' under numba's CUDA simulator "
                            "(NUMBA_ENABLE_CUDASIM=1), which makes no GPU code to save; compile it on a machine "
                            "with an NVIDIA GPU to save it, or compile it with target='cpu'")


def _write_kernels(target: str, layers: list[dict], folder: Path, kernels: list[Any]) -> dict[str, Any]:
    if target == "cuda":
        from sparsec.codegen.cuda.aot import CudaAotError, export_kernels

        try:
            return export_kernels(kernels, folder)
        except CudaAotError as e:
            raise ArtifactError(str(e)) from None
    from sparsec.codegen.cpu.aot import DECODER_PREFIX, export_kernels
    from sparsec.codegen.cpu.kernel import kernel_modules

    # generated kernel modules are named "<format>_<value type>" (see sparsec.codegen.cpu.codecache);
    # a dense int8 layer also calls the bitmask int8 kernels
    keys = set().union(*(kernel_modules(x["format"], x["value_type"]) for x in layers))
    # and the batch-1 decode step of each value type, where this process compiled one
    keys |= {DECODER_PREFIX + k.split("_", 1)[1] for k in keys if k.startswith("bitmask_")}
    section = export_kernels(folder, generated_keys=keys)
    return {"mode": "object", **section}


def _replace(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``; an artifact already there is swapped out, not merged."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _independent(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses shared memory): a tensor
    seen before, or a view into one, is copied."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        if ptr is not None:
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, after checking its format version, its own
    digest and (``verify``) the presence and sha256 of every file it lists."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root} is not a sparsec artifact (no {MANIFEST}); "
                            f"compile one with `sparsec compile ... -o DIR`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is damaged: recompile it") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{mpath} has artifact format version {version!r}, this sparsec reads "
                            f"{FORMAT_VERSION}; recompile with this version")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ArtifactError(f"{mpath} does not match its own digest (manifest_sha256): it was edited by hand or "
                            f"damaged; recompile the artifact")
    if verify:
        files = manifest.get("files")
        required = {WEIGHTS, GRAPH_JSON}
        if not isinstance(files, dict) or not required <= set(files):
            raise ArtifactError(f"{mpath} does not list the checksums of {WEIGHTS} and {GRAPH_JSON}; the manifest "
                                f"was edited or damaged: recompile")
        for name, digest in files.items():
            fpath = root / name
            if not fpath.is_file():
                raise ArtifactError(f"{fpath} is missing; the artifact is incomplete: recompile it")
            if _sha256(fpath) != digest:
                raise ArtifactError(f"{fpath} does not match its sha256 in the manifest (damaged or modified); "
                                    f"recompile the artifact")
    return manifest
