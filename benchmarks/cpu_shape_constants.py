"""Would specializing the CPU batch-1 kernel on the layer's shape pay? Measured, not assumed.

sparsec's bitmask kernels take the shape as run-time arguments, so one compiled function serves
every layer of a value type. This script builds, for one layer, a second copy of the ``rows_1``
kernel whose column count, tail and mask-row length are constants of its source (LLVM folds them),
checks that both give bit-identical outputs, and times both on the same arguments, interleaved,
on one thread (CPU time of this process, median of rounds):

* streaming: rotating over enough copies of the layer that they exceed the last-level cache;
* in cache: the same copy over and over.

    python benchmarks/cpu_shape_constants.py --values int8,bf16,int4

Prints one line per value type and case with both times and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from sparsec.codegen.cpu import bitmask as bmk
from sparsec.codegen.cpu import build_linear_kernel
from sparsec.codegen.cpu.host import last_level_cache_bytes
from sparsec.formats import pack


def masked_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """A random weight with exactly ``round(cols * (1 - sparsity))`` kept values per row."""
    g = torch.Generator().manual_seed(seed)
    keep = int(round(cols * (1 - sparsity)))
    idx = torch.rand(rows, cols, generator=g).argsort(dim=1)[:, :keep]
    mask = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, idx, True)
    return torch.randn(rows, cols, generator=g) * mask


def rotating_copies(w: torch.Tensor, vt: str) -> list:
    """Bound bitmask kernels (``_impl``) for copies of ``w`` packed as ``vt``, enough of them that
    their bytes exceed twice the last-level cache (the first is the packed weight itself)."""
    packed = pack(w, "bitmask", vt)
    copies = max(2, -(-2 * last_level_cache_bytes() // packed.nbytes()))
    return [build_linear_kernel(packed if i == 0 else packed.clone())._impl for i in range(copies)]


def specialized_rows_1(vt: str, nfull: int, tailbytes: int, nbytes: int):
    """``rows_1`` of value type ``vt`` with the three shape arguments rebound as constants."""
    src = bmk.rows_source(vt, 1).split("\n")
    consts = [f"    nfull = {nfull}", f"    tailbytes = {tailbytes}", f"    nbytes = {nbytes}"]
    body = "\n".join([src[0].replace("def rows_1(", "def rows_1_const(")] + consts + src[1:])
    header = bmk.module_source(vt).split("\n@njit")[0]  # imports and the jit options
    path = os.path.join(tempfile.mkdtemp(prefix="sparsec-shape-"), f"shape_const_{vt}.py")
    with open(path, "w") as f:
        f.write(header + "\n@njit(**_JIT)\n" + body)
    spec = importlib.util.spec_from_file_location(f"shape_const_{vt}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.rows_1_const


def batch1_args(impl, vt: str, x: np.ndarray):
    """The ``rows_1`` argument tuple for one layer and one input row, as the runtime builds it."""
    nch = impl.nfull_w + (1 if impl.tail_w else 0)
    xa, xstride, xq, limb, sxs = impl._f1, 0, impl._u1, 0, impl._d1
    if vt in ("int8", "int4"):
        limb = nch * impl.W
        xq, sxs = np.zeros(3 * limb, dtype=np.uint8), np.zeros(1)
        bmk.quantize_x24(x, xq, sxs, limb)
    elif vt == "bf16" and bmk.BF16_DOT:
        limb = nch * impl.W * 2
        xq = np.empty(2 * limb, dtype=np.uint8)
        bmk.split_bf16(x, xq, limb, 1)
    else:
        xstride = nch * impl.W
        xa = np.empty(xstride, dtype=np.float32)
        bmk.arrange_chunks(x, xa, impl.W, impl.g, 1)
    y = np.empty((1, impl.k.rows), dtype=np.float32)
    xqstride = (2 if vt == "bf16" else 3) * limb
    per_call = (y, xa, xstride, impl._f1, 0, impl._f2, impl._d2, xq, xqstride, limb, sxs)
    return (1,) + impl.fixed + per_call + (impl._n1, impl._f1, impl._f1), y


def cpu_seconds(fn, arg_sets, rows: int, calls: int) -> float:
    t0 = time.process_time()
    for i in range(calls):
        fn(0, rows, 0, *arg_sets[i % len(arg_sets)])
    return (time.process_time() - t0) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--values", default="int8,bf16,int4")
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows, cols = (int(v) for v in args.shape.split("x"))
    w = masked_weight(rows, cols, args.sparsity)
    x = np.random.default_rng(0).standard_normal((1, cols)).astype(np.float32)
    llc = last_level_cache_bytes()
    print(f"# {args.shape}, {args.sparsity:.0%} sparse, batch 1, one thread, CPU time; LLC {llc >> 20} MiB")
    print(f"{'values':6} {'case':9} {'generic us':>11} {'constant us':>12} {'generic/constant':>17}")
    for vt in args.values.split(","):
        impls = rotating_copies(w, vt)
        im = impls[0]
        generic = bmk.kernel_function(vt, "rows", 1)
        const = specialized_rows_1(vt, im.nfull_w, im.tail_w, im.nbytes)
        sets = [batch1_args(i, vt, x) for i in impls]
        generic(0, rows, 0, *sets[0][0])
        y_generic = sets[0][1].copy()
        const(0, rows, 0, *sets[0][0])
        if not np.array_equal(y_generic, sets[0][1]):
            raise SystemExit(f"{vt}: the shape-constant kernel's output differs from the generic one")
        cases = (("streaming", [s for s, _ in sets], 4 * len(sets)), ("in cache", [sets[0][0]], 30))
        for case, arg_sets, calls in cases:
            times = {"generic": [], "constant": []}
            for _ in range(args.rounds):
                for name, fn in (("generic", generic), ("constant", const)):
                    times[name].append(cpu_seconds(fn, arg_sets, rows, calls))
            g, c = statistics.median(times["generic"]), statistics.median(times["constant"])
            print(f"{vt:6} {case:9} {g * 1e6:11.1f} {c * 1e6:12.1f} {g / c:17.3f}")


if __name__ == "__main__":
    main()
