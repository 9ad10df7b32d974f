"""Artifacts: save, load in a fresh process without compiling or unpickling, refuse damage.

Numerics: a loaded artifact runs the same machine code on the same packed weights as the model
that was saved, so its outputs must equal the saved model's bit for bit (tolerance 0).
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.runtime.artifact import MANIFEST, WEIGHTS, ArtifactError, manifest_digest, read_manifest
from sparsec.runtime.loader import GraphCodecError, decode_graph, encode_graph


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory):
    """A tiny Llama compiled with 50% bitmask bf16 kernels, saved; plus an input and its output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    compiled = sparsec.compile(model, {"input_ids": ids}, "prune-magnitude{sparsity=0.5},lower-cpu{value_type=bf16}")
    path = tmp_path_factory.mktemp("art") / "llama"
    sparsec.save(compiled, path)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = compiled(input_ids=x).logits
    return compiled, path, x, y


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    """A symbolically traced MLP (GELU/ReLU stay torch.nn modules) with int8 CSR kernels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 96),
                                torch.nn.ReLU(), torch.nn.Linear(96, 24)).eval()
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(3))
    compiled = sparsec.compile(model, (x,), "prune-magnitude{sparsity=0.75},lower-cpu{format=csr,value_type=int8}")
    path = tmp_path_factory.mktemp("art") / "mlp"
    sparsec.save(compiled, path)
    x2 = torch.randn(7, 48, generator=torch.Generator().manual_seed(4))
    return compiled, path, x2, compiled(x2)


_FRESH_PROCESS = textwrap.dedent("""
    import json, pickle, sys, time
    import torch
    from safetensors.torch import load_file, save_file

    def refuse(*args, **kwargs):
        raise AssertionError("loading an artifact must not unpickle")

    pickle.load = pickle.loads = torch.load = refuse
    import numba.core.dispatcher as dispatcher

    compiles = []

    def no_compile(self, *args, **kwargs):
        compiles.append(self.py_func.__qualname__)
        raise AssertionError(f"loading an artifact compiled {self.py_func.__qualname__}")

    dispatcher.Dispatcher._compile_for_args = no_compile
    dispatcher.Dispatcher.compile = no_compile
    import sparsec

    jobs = json.loads(sys.argv[1])
    report = {}
    for name, (path, inputs, outputs, kwarg) in jobs.items():
        compiled = sparsec.load(path)
        x = load_file(inputs)["x"]
        with torch.no_grad():
            y = compiled(**{kwarg: x}) if kwarg else compiled(x)
        y = y.logits if hasattr(y, "logits") else y
        save_file({"y": y.contiguous()}, outputs)
        report[name] = {"installed": compiled.kernel_load.installed, "present": compiled.kernel_load.present,
                        "layers": len(compiled.report.layers), "seconds": compiled.load_seconds}
    report["compiles"] = compiles
    print(json.dumps(report))
""")


def test_fresh_process_loads_without_compiling_or_unpickling(llama_artifact, mlp_artifact, tmp_path):
    from safetensors.torch import load_file, save_file

    jobs = {}
    for name, (_, path, x, _) in {"llama": llama_artifact, "mlp": mlp_artifact}.items():
        save_file({"x": x}, tmp_path / f"{name}_in.safetensors")
        jobs[name] = [str(path), str(tmp_path / f"{name}_in.safetensors"), str(tmp_path / f"{name}_out.safetensors"),
                      "input_ids" if name == "llama" else None]
    env = {**os.environ, "PYTHONPATH": str(Path(sparsec.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, json.dumps(jobs)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["compiles"] == []
    assert report["llama"]["present"] == 0  # the first load links every kernel it uses
    for name, (compiled, _, _, y) in {"llama": llama_artifact, "mlp": mlp_artifact}.items():
        assert report[name]["installed"] > 0
        assert report[name]["layers"] == len(compiled.report.layers)
        y2 = load_file(tmp_path / f"{name}_out.safetensors")["y"]
        assert torch.equal(y2, y), f"{name}: loaded output differs by {(y2 - y).abs().max().item()}"


def test_manifest_records_versions_kernels_and_checksums(llama_artifact):
    compiled, path, _, _ = llama_artifact
    manifest = read_manifest(path)
    assert manifest["format_version"] == 2
    assert set(manifest["versions"]) >= {"sparsec", "python", "torch", "numba", "llvmlite"}
    assert manifest["pipeline"] == compiled.pipeline
    assert [x["format"] for x in manifest["layers"]].count("bitmask") == 14
    kernels = manifest["kernels"]
    assert kernels["mode"] == "object" and kernels["skipped"] == []
    # the bf16 bitmask kernel module generated for this model and the functions it exports, and
    # the model's batch-1 decode step (compiled by sparsec.compile for a Llama)
    modules = sorted(m["module"].rsplit("_", 1)[0] for m in kernels["generated_modules"].values())
    assert modules == ["sparsec_bitmask_bf16", "sparsec_decoder_bf16"]
    assert sum(k["generated"] == "bitmask_bf16" for k in kernels["kernels"]) >= 2
    assert [k["qualname"] for k in kernels["kernels"] if k["generated"] == "decoder_bf16"] == ["step"]
    for k in kernels["kernels"]:
        assert f"kernels/{k['object']}" in manifest["files"]
        assert "numba_parallel_for" not in k["undefined"]  # sparsec threads the kernels itself
    from sparsec.codegen.cpu.aot import missing_cpu_features

    assert "avx2" in kernels["features"] and missing_cpu_features(kernels["features"]) == []
    assert (path / "graph.py").read_text().startswith("\n\n\ndef forward")


def test_load_in_the_same_process_matches(mlp_artifact):
    compiled, path, x, y = mlp_artifact
    loaded = sparsec.load(path)
    assert torch.equal(loaded(x), y)
    assert [k.layer for k in loaded.kernels()] == [k.layer for k in compiled.kernels()]
    assert loaded.report.pipeline == compiled.pipeline


def test_graph_round_trips_structurally(mlp_artifact):
    compiled, _, _, _ = mlp_artifact
    gm = compiled.graph_module
    kernels = {name: m for name, m in gm.named_children() if name.startswith("sparsec_kernel")}
    desc, tensors = encode_graph(gm, set(kernels))
    back = decode_graph(json.loads(json.dumps(desc)), {f"graph.{k}": v for k, v in tensors.items()}, kernels)
    assert back.code == gm.code

    def called(g):
        return [(n.target, type(g.get_submodule(n.target)).__name__) for n in g.graph.nodes if n.op == "call_module"]

    assert called(back) == called(gm)
    assert ("1", "GELU") in called(back)


def test_graph_json_may_only_call_allowed_functions(mlp_artifact):
    compiled, _, _, _ = mlp_artifact
    gm = compiled.graph_module
    kernels = {name: m for name, m in gm.named_children() if name.startswith("sparsec_kernel")}
    desc, tensors = encode_graph(gm, set(kernels))
    desc["nodes"].insert(1, {"op": "call_function", "name": "bad", "target": {"function": ["os", "system"]},
                             "args": ["true"], "kwargs": {"dict": {}}})
    with pytest.raises(GraphCodecError, match="may only call functions of"):
        decode_graph(desc, {f"graph.{k}": v for k, v in tensors.items()}, kernels)


def test_save_refuses_a_graph_it_cannot_describe_and_writes_nothing(mlp_artifact, tmp_path):
    import copy

    from sparsec.runtime.compiled import CompiledModule

    compiled, _, _, _ = mlp_artifact
    gm = copy.deepcopy(compiled.graph_module)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        gm.graph.call_function(operator.add, (out.args[0], 1 + 2j))
    gm.recompile()
    odd = CompiledModule(gm, method=compiled.method, input_names=compiled.input_names,
                         constant_kwargs=compiled.constant_kwargs, target="cpu", pipeline=compiled.pipeline)
    with pytest.raises(GraphCodecError, match="node add .*argument of type complex"):
        sparsec.save(odd, tmp_path / "odd")
    assert not (tmp_path / "odd").exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- damaged artifacts


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(src, dest)
    return dest


def _edit_manifest(path: Path, edit, reseal: bool = True) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    if reseal:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _set(keys: tuple, value):
    def edit(manifest):
        d = manifest
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _truncate_weights(path: Path) -> None:
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])


def _remove_kernel(path: Path) -> None:
    next((path / "kernels").glob("*.o")).unlink()


def _missing_feature() -> str:
    import llvmlite.binding as ll

    return next(k for k, v in sorted(ll.get_host_cpu_features().items()) if not v)


@pytest.mark.parametrize("damage, words", [
    (_truncate_weights, ["weights.safetensors", "sha256", "recompile"]),
    (_remove_kernel, ["kernels/", "missing", "recompile"]),
    (lambda p: _edit_manifest(p, _set(("pipeline",), "lower-cpu"), reseal=False), ["edited by hand", "recompile"]),
    (lambda p: (p / MANIFEST).write_text("{not json"), ["not valid JSON", "recompile"]),
    (lambda p: _edit_manifest(p, _set(("format_version",), 1)), ["format version 1", "reads 2"]),
    (lambda p: _edit_manifest(p, _set(("versions", "numba"), "0.1.0")), ["numba 0.1.0", "this environment has",
                                                                         "recompile"]),
    (lambda p: _edit_manifest(p, _set(("versions", "torch"), "1.0.0")), ["torch 1.0.0", "recompile"]),
    (lambda p: _edit_manifest(p, _set(("kernels", "fingerprint"), "0" * 32)), ["different CPU kernel code",
                                                                                 "recompile"]),
    (lambda p: _edit_manifest(p, lambda m: m["kernels"]["features"].append(_missing_feature())),
     ["lacks", "recompile the model on this machine"]),
    (lambda p: _edit_manifest(p, lambda m: m["layers"][0].update(design="runs")), ["kernel design 'runs'",
                                                                                    "target 'cpu'", "recompile"]),
    (lambda p: _edit_manifest(p, lambda m: m["layers"][0].update(dense_from=32)), ["dense_from 32",
                                                                                    "target 'cpu'", "recompile"]),
])
def test_damaged_artifacts_are_refused_and_left_alone(llama_artifact, tmp_path, damage, words):
    _, src, _, _ = llama_artifact
    path = _copy(src, tmp_path)
    damage(path)
    before = _snapshot(path)
    with pytest.raises(ArtifactError) as info:
        sparsec.load(path)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    assert _snapshot(path) == before


def test_missing_feature_message_names_the_feature(llama_artifact, tmp_path):
    _, src, _, _ = llama_artifact
    path = _copy(src, tmp_path)
    feature = _missing_feature()
    _edit_manifest(path, lambda m: m["kernels"]["features"].append(feature))
    with pytest.raises(ArtifactError, match=feature):
        sparsec.load(path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a sparsec artifact"):
        sparsec.load(tmp_path)
    with pytest.raises(ArtifactError, match="loaded from a directory path .* got NoneType"):
        sparsec.load(None)


# --------------------------------------------------------------------------- atomic saves


def _fail_midway(monkeypatch):
    import sparsec.codegen.cpu.aot as aot

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(aot, "export_kernels", boom)


def test_interrupted_save_leaves_no_artifact(mlp_artifact, tmp_path, monkeypatch):
    compiled, _, _, _ = mlp_artifact
    _fail_midway(monkeypatch)
    with pytest.raises(ArtifactError, match=r"failed: disk full \(simulated\); nothing was replaced"):
        sparsec.save(compiled, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_keeps_the_previous_artifact(mlp_artifact, tmp_path, monkeypatch):
    compiled, src, x, y = mlp_artifact
    path = _copy(src, tmp_path)
    before = _snapshot(path)
    _fail_midway(monkeypatch)
    with pytest.raises(ArtifactError, match="simulated"):
        sparsec.save(compiled, path)
    monkeypatch.undo()
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    assert torch.equal(sparsec.load(path)(x), y)


def test_save_replaces_an_artifact_and_refuses_other_directories(mlp_artifact, tmp_path):
    compiled, src, x, y = mlp_artifact
    path = _copy(src, tmp_path)
    sparsec.save(compiled, path)
    assert torch.equal(sparsec.load(path)(x), y)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a sparsec artifact"):
        sparsec.save(compiled, other)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ArtifactError, match="CompiledModule"):
        sparsec.save(torch.nn.Linear(2, 2), tmp_path / "x")


def test_save_where_nothing_can_be_written_is_one_line_and_writes_nothing(mlp_artifact, tmp_path, monkeypatch):
    compiled, _, _, _ = mlp_artifact
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    with pytest.raises(ArtifactError, match=r"cannot write an artifact at .*a-file/art: .*a-file is a file, not a "
                                            r"directory; choose a writable location"):
        sparsec.save(compiled, blocker / "art")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        sparsec.save(compiled, blocker)
    assert blocker.read_text() == "mine"

    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)  # a directory the process may not write in
    with pytest.raises(ArtifactError, match=r"cannot write an artifact at .*: Permission denied; choose a writable"):
        sparsec.save(compiled, tmp_path / "art")
    from sparsec.runtime.artifact import check_destination

    with pytest.raises(ArtifactError, match=r"is not writable \(Permission denied\)"):
        check_destination(tmp_path / "art", probe=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
