"""The CUDA kernels compile to Hopper PTX with the properties their design relies on.

The simulator checks what the kernels compute, not the GPU code path (shuffles, the 16-byte
vector load intrinsic, bit reinterpretations). This test compiles that path with NVVM for
``sm_90`` without needing a GPU, and checks the PTX: one ``ld.global.v2.u64`` per value load,
``shfl.sync`` for the warp collectives, no local memory (accumulators stay in registers) and
no double-precision instruction; in the lane-word designs at batch 16, ``x`` read a column's
batch values at a time in 16-byte loads; in the tensor-core design, ``mma.sync`` and ``x`` in
16-byte loads.

It needs libnvvm: set ``CUDA_HOME`` to a CUDA toolkit, or to the ``nvidia/cu13`` folder of the
``nvidia-nvvm`` and ``nvidia-cuda-nvrtc`` wheels unpacked together. Skipped otherwise. The
``lanes`` bitmask design reads values 4 bytes a lane instead, and ``x`` from shared memory.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest


def _nvvm_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        return None
    found = glob.glob(os.path.join(home, "lib*", "libnvvm.so*")) + glob.glob(
        os.path.join(home, "nvvm", "lib*", "libnvvm.so*")
    )
    return home if found else None


NVVM_HOME = _nvvm_home()

# Runs in a fresh process without the simulator. numba-cuda compiles device functions for the
# current device's compute capability; with no device present, the probe is pointed at sm_90.
_SCRIPT = r"""
import json, re, sys
from numba import cuda
from numba.cuda import types as T
import numba.cuda.dispatcher as dispatcher

class _Hopper:
    compute_capability = (9, 0)

dispatcher.get_current_device = lambda: _Hopper()

from sparsec.codegen.cuda import bitmask, bitmask_lanes, bitmask_mma, nm

def arr(dt, nd):
    return T.Array(dt, nd, "C")

out = []
cases = [("bitmask", vt, b) for vt in ("fp32", "bf16", "fp16", "int8", "int4") for b in (1, 16)]
cases += [("lanes", vt, b) for vt in ("fp32", "bf16", "fp16", "int8", "int4") for b in (1, 16)]
cases += [("runs", vt, b) for vt in ("fp16", "int8", "int4") for b in (1, 16)]
cases += [("nm", vt, b) for vt in ("fp16", "int4") for b in (1, 16)]
cases += [("mma", vt, b) for vt in ("fp16", "int8") for b in (8, 16)] + [("mma-f32x", "fp16", 16)]
for fmt, vt, batch in cases:
    X = arr(T.float32 if fmt == "mma-f32x" else T.float16, 2)
    if fmt.startswith("mma"):
        k = bitmask_mma.make_kernel(vt, 4096, batch, "silu", True)
        sig = (X, X, T.int64, T.int64, arr(T.uint64, 1), arr(T.uint16 if vt == "fp16" else T.int8, 1),
               arr(T.int32, 1), arr(T.float32, 2), arr(T.float32, 1))
    elif fmt == "bitmask":
        k = bitmask.make_kernel(vt, 4096, batch, "silu", True, 128)
        sig = (X, X, T.int64, T.int64, arr(T.uint64, 2), arr(T.uint64, 1), arr(T.int64, 1),
               arr(T.float32, 2), arr(T.float32, 1))
    elif fmt == "lanes":
        k = bitmask_lanes.make_kernel(vt, 4096, batch, "silu", True, 128)
        sig = (X, X, T.int64, T.int64, arr(T.uint32, 2), arr(T.uint32, 1), arr(T.int32, 1),
               arr(T.float32, 2), arr(T.float32, 1))
    elif fmt == "runs":
        k = bitmask_lanes.make_runs_kernel(vt, 4096, batch, "silu", True, 128)
        sig = (X, X, T.int64, T.int64, arr(T.uint32, 2), arr(T.uint32, 1), arr(T.int32, 1),
               arr(T.float32, 2), arr(T.float32, 1))
    else:
        k = nm.make_kernel(vt, 4096, 2, 4, batch, "gelu", True, 128)
        sig = (X, X, T.int64, T.int64, arr(T.uint32, 2), arr(T.uint64, 1), arr(T.float32, 2),
               arr(T.float32, 1))
    ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0))
    count = lambda pat: len(re.findall(pat, ptx))
    out.append(dict(fmt=fmt, vt=vt, batch=batch, v2=count(r"ld\.global\.v2\.u64"),
                    shfl=count(r"shfl\.sync"), local=count(r"\.local"), f64=count(r"\.f64"),
                    lds=count(r"ld\.shared\.f32"), u64=count(r"\.[us]64\s"),
                    v4=count(r"ld\.global\.v4\.[ub]32"), u16=count(r"ld\.global\.u16"),
                    mma=count(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32"),
                    v4f=count(r"ld\.global\.v4\.f32"), st16=count(r"st\.shared\.[ub]16"),
                    target="sm_90" in ptx, lto=k.targetoptions.get("lto")))
print(json.dumps(out))
"""


@pytest.mark.skipif(NVVM_HOME is None, reason="needs libnvvm: set CUDA_HOME (see the module docstring)")
def test_kernels_compile_to_sm90_ptx() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", CUDA_HOME=NVVM_HOME)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 35
    for r in results:
        name = f"{r['fmt']}/{r['vt']}/batch {r['batch']}"
        assert r["target"], name
        if r["fmt"].startswith("mma"):
            # tensor cores: an mma.sync a 16-column step and 8-row batch half (4 steps a chunk;
            # the float32-x kernel twice, hi and lo), the tile filled by 2-byte shared stores,
            # a lane's 16 columns of x in 16-byte loads (fp16: 2 a half, float32: 4)
            halves = 1 if r["batch"] == 8 else 2
            assert r["mma"] >= 4 * halves * (2 if r["fmt"] == "mma-f32x" else 1), f"{name}: {r['mma']} mma.sync"
            assert r["st16"] >= 1, f"{name}: the tile is not written with 2-byte shared stores"
            if r["fmt"] == "mma-f32x":
                assert r["v4f"] >= 4, f"{name}: x is not read in 16-byte loads"
            else:
                assert r["v4"] >= 2 * halves, f"{name}: x is not read in 16-byte loads"
            assert r["local"] == 0 and r["f64"] == 0 and r["lto"] is False, name
            continue
        if r["fmt"] in ("lanes", "runs"):
            # batch 1 keeps x in shared memory (4096 float32), batch 16 cannot (256 KiB)
            assert (r["lds"] >= 1) == (r["batch"] == 1), f"{name}: x staging is not as designed"
            if r["batch"] == 16:  # x by column: a value's 16 fp16 batch values in two 16-byte loads
                assert r["v4"] >= 2 and r["u16"] == 0, f"{name}: x is not read in vector loads"
        if r["fmt"] not in ("lanes", "runs"):
            assert r["v2"] >= 1, f"{name}: values are not read with a 16-byte load"
        assert r["shfl"] >= 5, f"{name}: warp collectives do not use shuffles"
        assert r["local"] == 0, f"{name}: local memory in use (accumulators spilled?)"
        assert r["f64"] == 0, f"{name}: double-precision instructions emitted"
        # numba-cuda enables LTO wherever nvJitLink is installed; artifacts need plain PTX
        assert r["lto"] is False, f"{name}: compiled with link-time optimization"
