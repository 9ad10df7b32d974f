"""Fit ``select-format``'s CPU cost model to this machine's kernels (``sparsec tune``).

The CPU constants of :class:`~sparsec.passes.select_format.TargetModel` were fitted on one
machine; another CPU (more cores, no AVX-512, other memory) moves the points where sparsity
starts to pay. :func:`tune_cpu` measures, on random layers of ``shape``:

* torch's fp32 dense matmul (what the model calls ``dense``) at batch 1, as bytes per second
  (the model's ``bandwidth``), and at batch 16, as multiply-adds per cycle;
* sparsec's bitmask kernel with bf16 and int8 values at 50% and 90% sparsity, batch 1 and 16;

and fits the bitmask terms of each value type (``chunk_cycles``, ``chunk_cycles_per_token``,
``nnz_cycles_per_token``) to those four times by non-negative least squares. fp32 and fp16
values take bf16's constants and int4 takes int8's, as the defaults do. Timed layers rotate over
copies larger than twice the last-level cache, as in a model's decode step. On a machine shared
with other work, start the process with ``OMP_WAIT_POLICY=PASSIVE`` (torch reads it when it
loads, so setting it from Python later does nothing): spinning OpenMP threads made torch's dense
matmul 100 times slower there (a 512x1024 layer at batch 16: 36-40 ms against 0.27-0.39 ms).

The result is a JSON file (``format: sparsec-cost-model``, ``version``) holding the fitted
constants, every measurement and the machine; ``select-format{cost_model="FILE"}`` uses it::

    sparsec tune -o cost.json
    sparsec compile MODEL -p 'prune-magnitude{sparsity=0.7},select-format{cost_model="cost.json"},lower-cpu'
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsec.passes.select_format import COST_MODEL_FORMAT, COST_MODEL_VERSION

_SPARSITIES = (0.5, 0.9)
_BATCHES = (1, 16)
_FITTED_TYPES = ("bf16", "int8")
_SHARE = {"fp32": "bf16", "fp16": "bf16", "bf16": "bf16", "int8": "int8", "int4": "int8"}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def seconds_per_call(calls: list[Callable[[], Any]], clock: str, threads: int, min_seconds: float = 0.2,
                     min_rounds: int = 3, max_rounds: int = 100,
                     stat: Callable[[list[float]], float] = statistics.median) -> float:
    """``stat`` (the median) over rounds of the time one call takes; each round runs every call
    once (rotating over layer copies), for at least ``min_rounds`` and ``min_seconds``.
    ``clock="cpu"``: this process's CPU time divided by ``threads``, which on a machine shared
    with other work leaves out the time other processes held the cores."""
    for call in calls:
        call()
    rounds: list[float] = []
    start = time.perf_counter()
    while len(rounds) < min_rounds or (time.perf_counter() - start < min_seconds and len(rounds) < max_rounds):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        for call in calls:
            call()
        spent = (_cpu_seconds() - c0) / threads if clock == "cpu" else time.perf_counter() - t0
        rounds.append(spent / len(calls))
    return stat(rounds)


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin |a x - b|`` with ``x >= 0`` for a few unknowns: least squares, then refit without
    the columns whose coefficient came out negative, until none does."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0.0
            x[active] = sol
            return x
        active = [c for c, v in zip(active, sol) if v >= 0] if (sol >= 0).any() else []
    return x


def _pruned(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = max(1, round(w.shape[1] * (1 - sparsity)))
    idx = w.abs().topk(keep, dim=1).indices
    return w * torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)


def tune_cpu(shape: tuple[int, int] = (4096, 4096), clock: str = "wall", rotate: bool = True,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure and fit (see the module docstring); returns the cost-model document."""
    from sparsec.codegen.cpu import build_linear_kernel
    from sparsec.codegen.cpu.host import last_level_cache_bytes
    from sparsec.codegen.cpu.threads import cpu_threads
    from sparsec.formats import pack
    from sparsec.passes.select_format import WeightStats, default_models

    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    rows, cols = shape
    if rows < 16 or cols < 64:
        raise ValueError(f"shape {rows}x{cols} is too small to time; use at least 16x64 (default 4096x4096)")
    say = progress or (lambda _line: None)
    threads = cpu_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # torch's dense path gets the cores the kernels get
    try:
        base = default_models(threads)["cpu"]
        cycles_per_second = threads * base.clock
        llc = last_level_cache_bytes()
        gen = torch.Generator().manual_seed(0)
        dense = torch.randn(rows, cols, generator=gen)

        def copies_of(nbytes: int) -> int:
            return max(2, math.ceil(2 * llc / max(1, nbytes))) if rotate else 1

        measured: list[dict[str, Any]] = []
        weights = [dense] + [dense.clone() for _ in range(copies_of(dense.numel() * 4) - 1)]
        times = {}
        for batch in _BATCHES:
            x = torch.randn(batch, cols, generator=gen)
            times[batch] = seconds_per_call([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in weights],
                                            clock, threads)
            measured.append({"kind": "torch fp32 dense", "batch": batch, "seconds": times[batch]})
            say(f"torch fp32 dense {rows}x{cols} batch {batch}: {times[batch] * 1e6:.1f} us")
        del weights
        bandwidth = (rows * cols * 4 + 4 * (rows + cols)) / times[1]
        dense_fma = rows * cols * 16 / (times[16] * cycles_per_second)

        fitted: dict[str, dict[str, float]] = {}
        residuals: dict[str, float] = {}
        for vt in _FITTED_TYPES:
            a, b = [], []
            for sparsity in _SPARSITIES:
                w = _pruned(dense, sparsity)
                stats = WeightStats.of(w, (), ())
                packed = pack(w, "bitmask", vt)
                copies = [packed] + [packed.clone() for _ in range(copies_of(packed.nbytes()) - 1)]
                kernels = [build_linear_kernel(p) for p in copies]
                chunks = rows * math.ceil(cols / base.chunk_lanes[vt])
                for batch in _BATCHES:
                    x = torch.randn(batch, cols, generator=gen)
                    t = seconds_per_call([lambda k=k, x=x: k(x) for k in kernels], clock, threads)
                    measured.append({"kind": f"bitmask {vt}", "sparsity": sparsity, "batch": batch, "seconds": t})
                    say(f"bitmask {vt} {rows}x{cols} {sparsity:.0%} batch {batch}: {t * 1e6:.1f} us")
                    a.append([chunks, chunks * batch, stats.nnz * batch])
                    b.append(t * cycles_per_second)
                del kernels, copies
            coef = nonnegative_least_squares(np.array(a, dtype=float), np.array(b, dtype=float))
            fit = np.array(a, dtype=float) @ coef
            residuals[vt] = float(np.max(np.abs(fit - np.array(b)) / np.array(b)))
            fitted[vt] = {"chunk_cycles": float(coef[0]), "chunk_cycles_per_token": float(coef[1]),
                          "nnz_cycles_per_token": float(coef[2])}
        value_types = tuple(_SHARE)
        cpu = {
            "bandwidth": bandwidth,
            "threads": threads,
            "dense_fma_per_cycle": dense_fma,
            "chunk_cycles": {vt: fitted[_SHARE[vt]]["chunk_cycles"] for vt in value_types},
            "chunk_cycles_per_token": {vt: fitted[_SHARE[vt]]["chunk_cycles_per_token"] for vt in value_types},
            "nnz_cycles_per_token": {vt: fitted[_SHARE[vt]]["nnz_cycles_per_token"] for vt in value_types},
        }
        return {
            "format": COST_MODEL_FORMAT,
            "version": COST_MODEL_VERSION,
            "cpu": cpu,
            "fit": {"max_relative_error": residuals, "shape": [rows, cols], "clock": clock,
                    "layer_copies_exceed_llc": rotate, "llc_bytes": llc},
            "measured": measured,
            "machine": {"processor": platform.processor() or platform.machine(), "threads": threads,
                        "torch": torch.__version__, "load_average": os.getloadavg()[0]},
        }
    finally:
        torch.set_num_threads(previous_threads)


def write_cost_model(document: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``document`` as JSON atomically (a temporary file renamed into place)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, dest)
    return dest
