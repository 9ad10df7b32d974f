"""The tensor-core probe (``benchmarks/cuda_mma_probe.py``) agrees with float64 on the CUDA
simulator and compiles to ``mma.sync`` for sm_90 (the package's ``mma`` kernel is checked in
test_cuda_kernels.py and test_cuda_kernels_ptx.py).

The simulator emulates the ``mma`` from the PTX ISA's fragment layout, the same layout the
kernels build their fragments in, so it checks the probe's walk, offsets and reduction; that
the layout is the hardware's is checked by the probe itself on a GPU (every output against
float64 before timing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cuda_kernels_ptx import NVVM_HOME

ROOT = Path(__file__).parent.parent
PROBE = ROOT / "benchmarks" / "cuda_mma_probe.py"


def test_probe_agrees_with_float64_on_the_simulator() -> None:
    # Rows not a multiple of 16, columns not of 16 * slices, batch 12 (rows 12-15 of the tile unused).
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, str(PROBE), "--simulate", "--shapes", "17x96,40x200", "--batch", "12",
                           "--sparsity", "0.7"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "error ratio" in line]
    assert len(lines) == 4  # 2 shapes x 2 slice counts
    assert {line.split()[1] for line in lines} == {"gather"}


# The probe's main, called in a fresh process that then reports whether numba was imported.
_REFUSE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import cuda_mma_probe as probe

rc = probe.main(["--simulate", "--batch", "17"])
print("numba imported" if "numba" in sys.modules else "numba not imported")
sys.exit(rc)
"""


def test_probe_refuses_a_batch_over_one_tile_before_importing_numba() -> None:
    proc = subprocess.run([sys.executable, "-c", _REFUSE, str(ROOT / "benchmarks")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "--batch must be 1-16 (one 16-row tile), got 17"
    assert proc.stdout.strip() == "numba not imported"


# Runs in a fresh process without the simulator; with no device present, numba-cuda is pointed
# at sm_90 (see test_cuda_kernels_ptx.py).
_SCRIPT = r"""
import json, re, sys
from numba import cuda
from numba.cuda import types as T
import numba.cuda.dispatcher as dispatcher

class _Hopper:
    compute_capability = (9, 0)

dispatcher.get_current_device = lambda: _Hopper()
sys.path.insert(0, sys.argv[1])
import cuda_mma_probe as probe

probe.load_cuda()

def arr(dt, nd):
    return T.Array(dt, nd, "C")

def counts(ptx):
    count = lambda pat: len(re.findall(pat, ptx))
    return dict(mma=count(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32"),
                local=count(r"\.local"), f64=count(r"\.f64"), st16=count(r"st\.shared\.[ub]16"),
                v4=count(r"ld\.global\.v4\.[ub]32"))

out = {}
sig = (arr(T.float32, 2), arr(T.int32, 1), arr(T.uint16, 1), arr(T.uint16, 1), arr(T.int32, 2), T.int64, T.int64)
ptx, _ = cuda.compile_ptx(probe.build(8, 4096).py_func, sig, cc=(9, 0))
out["gather"] = counts(ptx)
print(json.dumps(out))
"""


@pytest.mark.skipif(NVVM_HOME is None, reason="needs libnvvm: set CUDA_HOME (see test_cuda_kernels_ptx.py)")
def test_probe_compiles_to_tensor_core_ptx() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", CUDA_HOME=NVVM_HOME, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(ROOT / "benchmarks")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    gather = out["gather"]
    assert gather["mma"] >= 2, "gather: no mma.sync for its two batch halves"
    assert gather["local"] == 0, "gather: local memory in use"
