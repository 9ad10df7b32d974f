"""CUDA artifacts: GPU code saved per kernel, loaded back without compiling or unpickling.

Three levels, by what the machine has:

* everywhere: choosing between cubin and PTX for a GPU, the signature text, launching through
  :class:`~sparsec.codegen.cuda.aot.PrebuiltKernel` (argument matching, launch configurations);
* with libnvvm and NVRTC (``CUDA_HOME``, as in ``test_cuda_kernels_ptx.py``) and no GPU: the
  save half writes PTX and manifest entries for a bitmask layer, every bucket and both input
  dtypes, in a subprocess pointed at a Hopper GPU; an artifact holding that code is refused with
  one line when a file is damaged or missing, or when there is no GPU to load it on;
* on a real GPU: compile, save, load in a fresh process where every kernel compilation and
  every unpickling raises, and compare outputs (bit for bit: the same machine code runs on the
  same packed weights); the PTX path (a GPU other than the cubin's) to 1e-6 of the largest
  output, since the driver's JIT may schedule float operations differently from the linker's.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import glob  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import sparsec  # noqa: E402
from sparsec.codegen.cuda import aot  # noqa: E402
from sparsec.codegen.cuda._compat import is_simulator  # noqa: E402

#: Under the simulator ``numba.cuda.types`` is a stub: tests of numba-cuda's real types run in a
#: child process without it (``test_real_type_tests_run_without_the_simulator``).
_REAL_TYPES = ("test_signature_text_round_trips",
               "test_prebuilt_kernel_picks_the_saved_signature_and_takes_dispatcher_launch_configs")
_HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_real_types = pytest.mark.skipif(is_simulator() or not _HAVE_NUMBA_CUDA,
                                      reason="needs numba-cuda's real types (pip install 'sparsec[gpu]')")
from sparsec.runtime.artifact import MANIFEST, ArtifactError, manifest_digest, read_manifest, versions  # noqa: E402
from sparsec.runtime.compiled import TargetUnavailableError  # noqa: E402


def _real_gpu() -> bool:
    from sparsec.codegen.cuda import cuda_available

    ok, why = cuda_available()
    return ok and not why  # the simulator reports itself in ``why``


REAL_GPU = _real_gpu()
needs_gpu = pytest.mark.skipif(not REAL_GPU, reason="needs an NVIDIA GPU (not the simulator)")


def _nvvm_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        return None

    def has(lib: str) -> bool:
        return bool(glob.glob(os.path.join(home, "lib*", lib)) + glob.glob(os.path.join(home, "nvvm", "lib*", lib)))

    return home if has("libnvvm.so*") and has("libnvrtc.so*") else None


NVVM_HOME = _nvvm_home()


# --------------------------------------------------------------------------- everywhere


_ENTRY = {"cubin": "k.sm_90a.cubin", "cubin_arch": "sm_90a", "ptx": "k.sm_90.ptx", "ptx_arch": "sm_90"}


@pytest.mark.parametrize("cc, code", [((9, 0), "cubin"), ((10, 0), "ptx"), ((12, 0), "ptx")])
def test_cubin_on_its_own_gpu_and_ptx_on_newer_ones(cc, code):
    assert aot.choose_code(_ENTRY, cc) == code


@pytest.mark.parametrize("entry, cc", [(_ENTRY, (8, 0)), ({**_ENTRY, "ptx_arch": "sm_90a"}, (10, 0)),
                                       ({**_ENTRY, "ptx": None}, (12, 0))])
def test_a_gpu_that_no_saved_code_serves_is_refused_in_one_line(entry, cc):
    with pytest.raises(aot.CudaAotError) as info:
        aot.choose_code(entry, cc)
    message = str(info.value)
    assert "\n" not in message and f"sm_{cc[0]}{cc[1]}" in message and "recompile" in message


def test_ptx_only_entries_serve_their_gpu_and_newer():
    entry = {**_ENTRY, "cubin": None, "cubin_arch": None}
    assert aot.choose_code(entry, (9, 0)) == "ptx" and aot.choose_code(entry, (10, 3)) == "ptx"


@needs_real_types
def test_signature_text_round_trips():
    from numba.cuda import types

    sig = (types.Array(types.float16, 2, "C"), types.Array(types.float16, 2, "C"), types.int64, types.int64,
           types.Array(types.uint32, 2, "C"), types.Array(types.uint64, 1, "C"), types.Array(types.int64, 1, "C"),
           types.Array(types.float32, 2, "C"), types.Array(types.float32, 1, "C"))
    text = aot.signature_strings(sig)
    assert text[0] == "array(float16, 2d, C)" and text[2] == "int64"
    assert aot.parse_signature(json.loads(json.dumps(text))) == sig
    with pytest.raises(aot.CudaAotError, match="cannot be saved"):
        aot.signature_strings((types.Array(types.float32, 1, "C", readonly=True),))
    with pytest.raises(aot.CudaAotError, match="may hold"):
        aot.parse_signature(["array(object, 1d, C)"])


def test_real_type_tests_run_without_the_simulator():
    if not is_simulator():
        pytest.skip("the real-type tests ran directly in this process")
    if not _HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed (pip install 'sparsec[gpu]'); its types cannot be checked")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", PYTHONPATH=str(Path(sparsec.__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *(f"{__file__}::{name}" for name in _REAL_TYPES)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_cache_keys_round_trip_through_json():
    key = ("bitmask", "int4", 4096, None, True, 128, 4, 16)
    assert aot.key_from_json(json.loads(json.dumps(aot._jsonable_key(key)))) == key


class _FakeKernel:
    def __init__(self, argtypes):
        self.argument_types = argtypes


@needs_real_types
def test_prebuilt_kernel_picks_the_saved_signature_and_takes_dispatcher_launch_configs():
    from numba.cuda import types

    def sig(x):
        return (types.Array(x, 2, "C"), types.Array(x, 2, "C"), types.int64, types.Array(types.uint32, 1, "C"))

    k32, k16 = _FakeKernel(sig(types.float32)), _FakeKernel(sig(types.float16))
    pre = aot.PrebuiltKernel([k32, k16], label="demo")
    words = np.zeros(3, np.uint32)
    for dt, kern in ((np.float32, k32), (np.float16, k16)):
        x = np.zeros((2, 5), dt)
        assert pre.kernel_for_args((x, x, 2, words)) is kern
    with pytest.raises(TypeError, match="demo has no code for arguments"):
        pre.kernel_for_args((np.zeros((2, 5)), np.zeros((2, 5)), 2, words))  # float64
    with pytest.raises(TypeError, match="no code"):  # a strided view would be read as contiguous
        x = np.zeros((2, 10), np.float32)[:, ::2]
        pre.kernel_for_args((x, x, 2, words))
    launch = pre[7, 128]
    assert (launch.griddim, launch.blockdim, launch.stream, launch.sharedmem) == ((7, 1, 1), (128, 1, 1), 0, 0)
    launch = pre[(2, 3), 64, "s", 4096]
    assert (launch.griddim, launch.stream, launch.sharedmem) == ((2, 3, 1), "s", 4096)
    with pytest.raises(ValueError, match="k\\[grid, block"):
        pre[1]


# --------------------------------------------------------------------------- without a GPU: the save half

# A fresh process without the simulator, pointed at a Hopper GPU that is not there: numba-cuda
# compiles for it (NVVM needs no GPU); no cubin (that needs a linker), PTX only.
_EXPORT = textwrap.dedent(r"""
    import json, sys
    import numba.cuda.dispatcher as dispatcher
    from numba.cuda.cudadrv import devices

    class _Hopper:
        compute_capability = (9, 0)
        id = 0

    class _Context:
        device = _Hopper()

    dispatcher.get_current_device = lambda: _Hopper()
    devices.get_context = lambda devnum=None: _Context()
    import torch
    from sparsec.codegen.cuda import aot, build
    from sparsec.codegen.cuda.kernel import CudaLinearKernel
    from sparsec.formats import pack

    torch.manual_seed(0)
    w = torch.randn(24, 80)
    w[w.abs() < 0.7] = 0
    layer = CudaLinearKernel.__new__(CudaLinearKernel)  # its spec, without device copies
    layer._spec = build._bitmask_spec(pack(w, "bitmask", "fp16"), "silu", True, None, sys.argv[2] or None)
    section = aot.export_kernels([layer], sys.argv[1], cc=(9, 0), link=False)
    same = [aot.parse_signature(e["signature"]) == aot.launch_argtypes(layer, e["x_dtype"])
            for e in section["kernels"]]
    print(json.dumps({"section": section, "signatures_match": same,
                      "buckets": list(layer._spec.buckets), "key": list(layer._spec.cache_key)}))
""")


def _export(folder: Path, design: str = "") -> dict:
    """Run ``_EXPORT`` for the bitmask ``design`` (``""``: the default) into ``folder``."""
    if NVVM_HOME is None:
        pytest.skip("needs libnvvm and NVRTC: set CUDA_HOME (see test_cuda_kernels_ptx.py)")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", CUDA_HOME=NVVM_HOME,
               PYTHONPATH=str(Path(sparsec.__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-c", _EXPORT, str(folder), design], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_code") / "kernels"
    return _export(folder), folder


def test_export_writes_the_tensor_core_design_for_its_two_buckets(tmp_path):
    out = _export(tmp_path / "kernels", "mma")
    entries = out["section"]["kernels"]
    assert out["key"][0] == "bitmask-mma" and out["buckets"] == [8, 16]
    assert sorted((e["bucket"], e["x_dtype"]) for e in entries) == sorted(
        (b, dt) for b in (8, 16) for dt in aot.X_DTYPES)
    assert all(out["signatures_match"])
    for e in entries:  # x and y in the input's dtype; the mask one 64-bit word a chunk
        assert e["signature"][:2] == [f"array({e['x_dtype']}, 2d, C)"] * 2
        assert e["signature"][4] == "array(uint64, 1d, C)"
        assert "mma.sync.aligned.m16n8k16" in (tmp_path / "kernels" / e["ptx"]).read_text()


def test_export_writes_ptx_for_every_bucket_and_input_dtype(exported):
    from sparsec.codegen.cuda.values import BATCH_BUCKETS

    out, folder = exported
    section = out["section"]
    assert section["mode"] == aot.MODE and section["arch"] == "sm_90" and section["compute_capability"] == [9, 0]
    assert section["numba_cuda"] == aot.numba_cuda_version() and len(section["fingerprint"]) == 32
    assert tuple(out["buckets"]) == BATCH_BUCKETS
    entries = section["kernels"]
    assert sorted((e["bucket"], e["x_dtype"]) for e in entries) == sorted(
        (b, dt) for b in BATCH_BUCKETS for dt in aot.X_DTYPES)
    assert all(out["signatures_match"])
    for e in entries:
        assert e["key"] == out["key"] + [e["bucket"]]
        assert e["cubin"] is None and e["ptx_arch"] == "sm_90"
        ptx = (folder / e["ptx"]).read_text()
        assert ".target sm_90\n" in ptx + "\n" or ".target sm_90 " in ptx
        assert f".entry {e['entry']}(" in ptx
        assert e["signature"][0] == f"array({e['x_dtype']}, 2d, C)"
    assert sorted(p.name for p in folder.iterdir()) == sorted(e["ptx"] for e in entries)


def _assemble(section: dict, kernel_folder: Path, dest: Path) -> Path:
    """An artifact directory around exported GPU code (no layers): enough for the checks that
    run before any kernel is built."""
    from safetensors.torch import save_file

    dest.mkdir()
    shutil.copytree(kernel_folder, dest / "kernels")
    save_file({"graph.dummy": torch.zeros(1)}, str(dest / "weights.safetensors"))
    (dest / "graph.json").write_text("{}")
    manifest = {"format_version": 2, "versions": versions(), "target": "cuda", "pipeline": "lower-cuda",
                "capture_method": "symbolic_trace", "input_names": ["x"], "constant_kwargs": {}, "layers": [],
                "kernels": section,
                "files": {p.relative_to(dest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted(dest.rglob("*")) if p.is_file()}}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def _damage_first(path: Path, suffix: str, how: str) -> None:
    target = sorted((path / "kernels").glob(f"*{suffix}"))[0]
    if how == "remove":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes() + b"\n// edited")


@pytest.mark.parametrize("how, words", [("edit", ["sha256", "recompile"]), ("remove", ["missing", "recompile"])])
def test_damaged_or_missing_ptx_is_refused_in_one_line(exported, tmp_path, how, words):
    out, folder = exported
    path = _assemble(out["section"], folder, tmp_path / "art")
    read_manifest(path)  # intact
    _damage_first(path, ".ptx", how)
    with pytest.raises(ArtifactError) as info:
        sparsec.load(path)
    message = str(info.value)
    assert "\n" not in message and ".ptx" in message and all(w in message for w in words), message


@pytest.mark.skipif(REAL_GPU, reason="checks the refusal on a machine without a GPU")
def test_loading_gpu_code_without_a_gpu_is_refused_in_one_line(exported, tmp_path):
    out, folder = exported
    path = _assemble(out["section"], folder, tmp_path / "art")
    with pytest.raises(TargetUnavailableError) as info:
        sparsec.load(path)
    message = str(info.value)
    assert "\n" not in message and "needs an NVIDIA GPU" in message and "sm_90" in message, message


# --------------------------------------------------------------------------- on a GPU: the round trip


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.SiLU(), torch.nn.Linear(96, 96),
                                torch.nn.ReLU(), torch.nn.Linear(96, 24)).eval()
    return model, torch.randn(3, 48, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gpu_artifacts(tmp_path_factory):
    """Three models compiled for the GPU (bitmask fp16 and int8 kernels, and fp16 on the tensor-core
    design), saved; inputs of 3 and 21 rows (buckets 4, 16 and a second launch of 8; the tensor-core
    design: 8, 16 and 8) and the in-memory models' outputs."""
    if not REAL_GPU:
        pytest.skip("needs an NVIDIA GPU (not the simulator)")
    out = {}
    for name, pipeline in {"fp16": "prune-magnitude{sparsity=0.5},lower-cuda{value_type=fp16}",
                           "int8": "prune-magnitude{sparsity=0.75},lower-cuda{value_type=int8}",
                           "mma": "prune-magnitude{sparsity=0.75},lower-cuda{value_type=fp16,design=mma}"}.items():
        model, x = _mlp()
        compiled = sparsec.compile(model, x, pipeline, target="cuda")
        path = tmp_path_factory.mktemp("cuda_art") / name
        sparsec.save(compiled, path)
        xs = [torch.randn(n, 48, generator=torch.Generator().manual_seed(n)) for n in (3, 21)]
        with torch.no_grad():
            ys = [compiled(v).cpu() for v in xs]
        out[name] = (compiled, path, xs, ys)
    return out


_FRESH_PROCESS = textwrap.dedent("""
    import json, pickle, sys
    import torch
    from safetensors.torch import load_file, save_file

    def refuse(*args, **kwargs):
        raise AssertionError("loading an artifact must not unpickle")

    pickle.load = pickle.loads = torch.load = refuse
    from sparsec.codegen.cuda._compat import cuda_module

    cuda_module()
    import numba.cuda.dispatcher as dispatcher
    from numba.cuda.cudadrv import nvvm

    compiles = []

    def no_compile(*args, **kwargs):
        compiles.append(repr(args[:1]))
        raise AssertionError("loading an artifact compiled a kernel")

    dispatcher.CUDADispatcher.compile = dispatcher.CUDADispatcher._compile_for_args = no_compile
    dispatcher._Kernel.__init__ = no_compile
    nvvm.compile_ir = no_compile
    import sparsec

    report = {}
    for name, (path, inputs, outputs) in json.loads(sys.argv[1]).items():
        compiled = sparsec.load(path)
        xs = load_file(inputs)
        with torch.no_grad():
            ys = {k: compiled(v).cpu().contiguous() for k, v in xs.items()}
        save_file(ys, outputs)
        load = compiled.kernel_load
        report[name] = {"installed": load.installed, "present": load.present, "from_cubin": load.from_cubin,
                        "from_ptx": load.from_ptx, "arch": load.arch}
    report["compiles"] = compiles
    print(json.dumps(report))
""")


def _load_fresh(paths: dict[str, Path], inputs: dict[str, list[torch.Tensor]], tmp_path: Path):
    from safetensors.torch import load_file, save_file

    jobs = {}
    for name, path in paths.items():
        save_file({str(i): x for i, x in enumerate(inputs[name])}, tmp_path / f"{name}_in.safetensors")
        jobs[name] = [str(path), str(tmp_path / f"{name}_in.safetensors"), str(tmp_path / f"{name}_out.safetensors")]
    env = {**os.environ, "PYTHONPATH": str(Path(sparsec.__file__).parent.parent)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    outputs = {}
    for name in paths:
        saved = load_file(tmp_path / f"{name}_out.safetensors")
        outputs[name] = [saved[str(i)] for i in range(len(inputs[name]))]
    return report, outputs


@needs_gpu
def test_manifest_records_the_gpu_and_every_kernel(gpu_artifacts):
    from sparsec.codegen.cuda.device import cuda

    major, minor = cuda.get_current_device().compute_capability
    for compiled, path, _, _ in gpu_artifacts.values():
        manifest = read_manifest(path)
        section = manifest["kernels"]
        assert section["mode"] == aot.MODE and section["arch"] == f"sm_{major}{minor}"
        assert section["numba_cuda"] == aot.numba_cuda_version()
        layers = aot.cuda_kernels_of([k.kernel for k in compiled.kernels()])
        keys = {tuple(k._spec.cache_key) for k in layers}
        assert len(section["kernels"]) == len(keys) * len(layers[0]._spec.buckets) * len(aot.X_DTYPES)
        for e in section["kernels"]:
            assert e["cubin"] and f"kernels/{e['cubin']}" in manifest["files"]
            assert f"kernels/{e['ptx']}" in manifest["files"]


@needs_gpu
def test_fresh_process_loads_gpu_code_without_compiling_or_unpickling(gpu_artifacts, tmp_path):
    paths = {name: a[1] for name, a in gpu_artifacts.items()}
    report, outputs = _load_fresh(paths, {name: a[2] for name, a in gpu_artifacts.items()}, tmp_path)
    assert report["compiles"] == []
    for name, (_, _, _, ys) in gpu_artifacts.items():
        assert report[name]["installed"] > 0 and report[name]["from_ptx"] == 0
        assert report[name]["from_cubin"] > 0
        for y, y2 in zip(ys, outputs[name]):
            assert torch.equal(y2, y), f"{name}: loaded output differs by {(y2 - y).abs().max().item()}"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    for e in manifest["kernels"]["kernels"]:
        edit(e)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


@needs_gpu
def test_a_gpu_other_than_the_cubins_runs_the_ptx(gpu_artifacts, tmp_path):
    _, src, xs, ys = gpu_artifacts["fp16"]
    path = _copy(src, tmp_path / "other_gpu")
    _edit(path, lambda e: e.update(cubin_arch="sm_10a"))  # a cubin for some other GPU
    report, outputs = _load_fresh({"fp16": path}, {"fp16": xs}, tmp_path)
    assert report["compiles"] == [] and report["fp16"]["from_cubin"] == 0 and report["fp16"]["from_ptx"] > 0
    for y, y2 in zip(ys, outputs["fp16"]):
        assert float((y2 - y).abs().max()) <= 1e-6 * float(y.abs().max())


@needs_gpu
def test_a_gpu_no_saved_code_serves_is_refused(gpu_artifacts, tmp_path):
    _, src, _, _ = gpu_artifacts["fp16"]
    path = _copy(src, tmp_path / "future")
    _edit(path, lambda e: e.update(cubin_arch="sm_10a", ptx_arch="sm_999"))
    with pytest.raises(ArtifactError) as info:
        sparsec.load(path)
    message = str(info.value)
    assert "\n" not in message and "cannot run the artifact's GPU code" in message and "recompile" in message


@needs_gpu
@pytest.mark.parametrize("suffix, how, words", [(".cubin", "edit", ["sha256", "recompile"]),
                                                (".cubin", "remove", ["missing", "recompile"]),
                                                (".ptx", "edit", ["sha256", "recompile"])])
def test_damaged_gpu_code_is_refused(gpu_artifacts, tmp_path, suffix, how, words):
    _, src, _, _ = gpu_artifacts["int8"]
    path = _copy(src, tmp_path / "damaged")
    _damage_first(path, suffix, how)
    with pytest.raises(ArtifactError) as info:
        sparsec.load(path)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


@needs_gpu
def test_prebuilt_kernels_launch_like_dispatchers(gpu_artifacts, monkeypatch):
    compiled, path, _, _ = gpu_artifacts["fp16"]
    loaded = aot.load_kernels(read_manifest(path)["kernels"], path / "kernels", install=False)
    layer = aot.cuda_kernels_of([k.kernel for k in compiled.kernels()])[0]
    x = torch.randn(3, layer.cols, device="cuda")
    expected = layer(x)
    configs = []

    class WithSharedBytes:
        """Launches the saved kernel with the dynamic shared memory item given (0 bytes)."""

        def __init__(self, kern):
            self.kern = kern

        def __getitem__(self, config):
            configs.append(len(config))
            return self.kern[(*config, 0, 0)[:4]]

    def saved(bucket):
        kern = loaded.kernels[tuple(layer._spec.cache_key) + (bucket,)]
        assert isinstance(kern, aot.PrebuiltKernel)
        return WithSharedBytes(kern)

    monkeypatch.setattr(layer, "kernel_for", saved)
    assert torch.equal(layer(x), expected) and configs
