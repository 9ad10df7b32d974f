"""The tensor-core probe (``benchmarks/cuda_mma_probe.py``): both of its kernels agree with
float64 on the CUDA simulator, and compile to ``mma.sync`` for sm_90.

The simulator emulates the ``mma`` from the PTX ISA's fragment layout, the same layout the
kernels build their fragments in, so it checks the kernels' walk, offsets and reduction; that
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


def test_probe_kernels_agree_with_float64_on_the_simulator() -> None:
    # Rows not a multiple of 16, columns not of 64, batch 12 (rows 12-15 of the tile unused).
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, str(PROBE), "--simulate", "--shapes", "17x96,40x200", "--batch", "12",
                           "--sparsity", "0.7"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "error ratio" in line]
    assert len(lines) == 8  # 2 shapes x 2 slice counts x 2 kernels
    assert {line.split()[1] for line in lines} == {"gather", "scatter"}


def test_probe_refuses_a_kernel_it_does_not_have() -> None:
    proc = subprocess.run([sys.executable, str(PROBE), "--simulate", "--kernels", "fast"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "--kernels: unknown fast; choose from gather, scatter"


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
out = {}
for name, mask in (("gather", T.uint16), ("scatter", T.uint32)):
    a = lambda dt, nd: T.Array(dt, nd, "C")
    sig = (a(T.float32, 2), a(T.int32, 1), a(mask, 1), a(T.uint16, 1), a(T.int32, 2), T.int64, T.int64)
    ptx, _ = cuda.compile_ptx(probe.build(name, False, 8, 4096).py_func, sig, cc=(9, 0))
    out[name] = dict(mma=len(re.findall(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32", ptx)),
                     local=len(re.findall(r"\.local", ptx)), st16=len(re.findall(r"st\.shared\.u16", ptx)))
print(json.dumps(out))
"""


@pytest.mark.skipif(NVVM_HOME is None, reason="needs libnvvm: set CUDA_HOME (see test_cuda_kernels_ptx.py)")
def test_probe_kernels_compile_to_tensor_core_ptx() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", CUDA_HOME=NVVM_HOME, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(ROOT / "benchmarks")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("gather", "scatter"):
        assert out[name]["mma"] >= 2, f"{name}: no mma.sync for its two batch halves"
        assert out[name]["local"] == 0, f"{name}: local memory in use"
    assert out["scatter"]["st16"] >= 1, "scatter: the tile is not written with 2-byte shared stores"
