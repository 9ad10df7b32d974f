"""DeepSparse time per layer for one sparse Linear weight, for ``benchmarks/cpu_kernels.py``.

Runs under a Python that has DeepSparse installed, kept out of sparsec's own environment:
``deepsparse==1.8.0`` needs ``numpy<2``, sparsec's environment has numpy 2. Set it up once with

    python3.11 -m venv ~/.cache/sparsec/deepsparse-venv
    ~/.cache/sparsec/deepsparse-venv/bin/pip install deepsparse==1.8.0 "numpy<2" onnx

then ``python benchmarks/cpu_kernels.py --deepsparse-python ~/.cache/sparsec/deepsparse-venv/bin/python``.

It reads a float32 weight ``[rows, cols]`` from a ``.npy`` file (the benchmark's own masked
weight, so DeepSparse sees the same shape, sparsity and mask), builds an ONNX graph of
``--layers`` Linear layers ``y_i = x W_i^T`` (``Gemm`` with ``transB=1``, as torch exports
``nn.Linear``) that all read the same input ``x [batch, cols]``, and compiles it with
``deepsparse.compile_model`` for each batch size and core count asked. The copies ``W_i`` have the
weight's mask and values scaled by ``1 + i * 2^-12``, so that no two are equal (DeepSparse could
otherwise share one copy) and their bytes together exceed the last-level cache, as in the
benchmark's rotation. The layers are independent rather than chained because a non-square layer's
output cannot feed the next one. Each engine call runs all layers; its time is divided by the
layer count.

Prints one JSON object on stdout; DeepSparse's own log goes to stderr.

Clocks, per engine call (one call = all layers), median of rounds unless said:

* ``wall_s``: wall clock (``wall_min_s``: the best round);
* ``cpu_s``: this process's CPU time divided by the cores given to the engine. DeepSparse's
  threads wait for each other by spinning (measured here: about 0.1 voluntary context switches
  per layer per thread, with or without ``NM_ENABLE_SPINNING=0``), so on a machine shared with
  other jobs, where one of the threads is often preempted, the other's spinning is charged too:
  at 2 cores this clock overstates DeepSparse's time. At 1 core there is no one to wait for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no usage reports from the benchmark


def build_onnx(w, layers: int, path: str) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = w.shape
    inits, nodes, outputs = [], [], []
    for i in range(layers):
        wi = (w * np.float32(1.0 + i * 2.0**-12)).astype(np.float32)
        inits.append(numpy_helper.from_array(wi, f"w{i}"))
        nodes.append(helper.make_node("Gemm", ["x", f"w{i}"], [f"y{i}"], transB=1))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["batch", rows]))
    graph = helper.make_graph(
        nodes, "sparse_linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", cols])],
        outputs, inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_engine(engine, x, cores: int, min_seconds: float, min_rounds: int) -> dict:
    warm = time.perf_counter()
    for i in range(100):  # the first calls of an engine are slow: warm up for a while
        engine([x])
        if i >= 2 and time.perf_counter() - warm > min_seconds / 2:
            break
    walls, cpus = [], []
    start = time.perf_counter()
    while len(walls) < min_rounds or time.perf_counter() - start < min_seconds:
        t0, c0 = time.perf_counter(), cpu_seconds()
        engine([x])
        walls.append(time.perf_counter() - t0)
        cpus.append((cpu_seconds() - c0) / cores)
        if len(walls) >= 200:
            break
    return {
        "rounds": len(walls),
        "wall_s": statistics.median(walls),
        "wall_min_s": min(walls),
        "cpu_s": statistics.median(cpus),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weight", required=True, help=".npy file of a float32 [rows, cols] weight")
    ap.add_argument("--layers", type=int, default=4, help="copies of the layer in the graph")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--cores", default="2", help="core counts to compile for, e.g. 2,1")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="least timing per configuration")
    ap.add_argument("--min-rounds", type=int, default=5)
    args = ap.parse_args()

    import numpy as np

    w = np.ascontiguousarray(np.load(args.weight), dtype=np.float32)
    rows, cols = w.shape
    import deepsparse
    from deepsparse import compile_model

    out = {
        "deepsparse": deepsparse.__version__,
        "rows": rows,
        "cols": cols,
        "density": float(np.count_nonzero(w)) / w.size,
        "layers": args.layers,
        "results": [],
    }
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="sparsec-deepsparse-") as tmp:
        path = os.path.join(tmp, "layers.onnx")
        build_onnx(w, args.layers, path)
        del w
        for cores in (int(c) for c in args.cores.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                t0 = time.perf_counter()
                engine = compile_model(path, batch_size=batch, num_cores=cores)
                compile_s = time.perf_counter() - t0
                x = rng.standard_normal((batch, cols), dtype=np.float32)
                r = time_engine(engine, x, cores, args.min_seconds, args.min_rounds)
                per_layer = {k: v / args.layers for k, v in r.items() if k.endswith("_s")}
                out["results"].append({
                    "batch": batch,
                    "cores": cores,
                    "compile_s": round(compile_s, 2),
                    "rounds": r["rounds"],
                    "fraction_of_supported_ops": getattr(engine, "fraction_of_supported_ops", None),
                    **{f"{k}_per_layer": v for k, v in per_layer.items()},
                })
                print(f"# deepsparse {rows}x{cols} B={batch} cores={cores}: {per_layer}", file=sys.stderr)
                del engine
    print(json.dumps(out))


if __name__ == "__main__":
    main()
