"""Artifacts on disk: a directory with a JSON manifest, safetensors weights and the graph source.

Layout (``FORMAT_VERSION`` 1)::

    DIR/manifest.json        format version, sparsec/torch/numba versions, target and its CPU
                             features, pipeline text, per-layer formats, the compile report,
                             and the sha256 of every other file
    DIR/weights.safetensors  every packed layer's tensors (prefixed by the layer name) and the
                             remaining parameters and buffers of the graph
    DIR/graph.py             the graph's generated Python source, for reading and diffing

Writes are atomic: the artifact is assembled in a temporary sibling directory and renamed into
place, so an interrupted save never leaves a half-written artifact under ``DIR``. Reading the
manifest (:func:`read_manifest`) verifies every checksum and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
GRAPH = "graph.py"


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
    import numba

    import sparsec

    return {"sparsec": sparsec.__version__, "torch": torch.__version__, "numba": numba.__version__}


def save_artifact(compiled: Any, path: str | os.PathLike) -> Path:
    """Write ``compiled`` (a :class:`~sparsec.runtime.compiled.CompiledModule`) to ``path``."""
    from safetensors.torch import save_file

    from sparsec.runtime.compiled import KernelLinear

    dest = Path(path)
    if dest.exists() and not (dest / MANIFEST).exists() and any(dest.iterdir()):
        raise ArtifactError(f"{dest} exists and is not a sparsec artifact; choose an empty or new directory")
    gm = compiled.graph_module
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    kernel_modules = set()
    for name, module in gm.named_modules():
        if isinstance(module, KernelLinear):
            kernel_modules.add(name)
            packed = module.packed
            tensors.update({k: v.contiguous() for k, v in packed.tensors(f"kernel.{name}").items()})
            layers.append({"module": name, "layer": module.layer, "format": packed.format_name,
                           "value_type": packed.value_type, "shape": list(packed.shape),
                           "nbytes": packed.nbytes(), "activation": module.activation,
                           "bias": module.bias is not None})
    seen: set[int] = set()
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        tensors[f"graph.{name}"] = t.detach().contiguous()
    report = compiled.report.to_dict() if compiled.report is not None else None
    manifest = {
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "target": compiled.target,
        "cpu_features": host_cpu_features() if compiled.target == "cpu" else [],
        "pipeline": compiled.pipeline,
        "capture_method": compiled.method,
        "input_names": compiled.input_names,
        "constant_kwargs": {k: v for k, v in compiled.constant_kwargs.items()
                            if isinstance(v, (bool, int, float, str, type(None)))},
        "layers": layers,
        "report": _jsonable(report),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / GRAPH).write_text(gm.code)
        manifest["files"] = {f: _sha256(tmp / f) for f in (WEIGHTS, GRAPH)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


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
    """The manifest of the artifact at ``path``, after checking its version and every checksum."""
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
    if verify:
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != {WEIGHTS, GRAPH}:
            raise ArtifactError(f"{mpath} does not list the checksums of {WEIGHTS} and {GRAPH}; the manifest "
                                f"was edited or damaged: recompile")
        for name, digest in files.items():
            fpath = root / name
            if not fpath.is_file():
                raise ArtifactError(f"{fpath} is missing; the artifact is incomplete: recompile it")
            if _sha256(fpath) != digest:
                raise ArtifactError(f"{fpath} does not match its sha256 in the manifest (damaged or modified); "
                                    f"recompile the artifact")
    return manifest
