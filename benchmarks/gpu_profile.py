"""Launch one CUDA sparse kernel a few times, for a profiler (Nsight Compute) to read.

``benchmarks/gpu_kernels.py`` says how fast each kernel is; this script exists to say why. It
builds one layer (random weight, the given shape, sparsity, value type and bitmask design),
checks its output against float64 once, then launches it ``--launches`` times back to back on
the same weights and prints the CUDA-event time of each. Under ``ncu`` the launches to profile
are chosen with ``--launch-skip``/``--launch-count`` (the first launch compiles, so skip it):

    ncu --clock-control none --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \\
        python benchmarks/gpu_profile.py --design lanes --value-type fp16

``--stage-x off`` builds the ``lanes`` kernel with ``x`` read from global memory instead of
shared memory (the same results), one of the variants whose time difference locates a cost
when no hardware counters are available.

Without a GPU it exits with status 2 and one sentence saying so.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="11008x4096", help="ROWSxCOLS (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--value-type", default="fp16", choices=["fp32", "bf16", "fp16", "int8", "int4"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--design", default="lanes", choices=["lanes", "runs", "tiles", "mma"])
    p.add_argument("--warps", type=int, default=None, help="rows (warps) per block (default: the design's)")
    p.add_argument("--stage-x", default="auto", choices=["auto", "off"],
                   help="lanes only: 'off' reads x from global memory even where it fits in shared memory")
    p.add_argument("--launches", type=int, default=8)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch

    if not torch.cuda.is_available():
        print("gpu_profile.py needs an NVIDIA GPU and a CUDA build of torch; none is available here",
              file=sys.stderr)
        return 2
    from sparsec.codegen.cuda import bitmask_lanes, build_linear_kernel
    from sparsec.formats import pack

    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen)
    drop = torch.rand(rows, cols, generator=gen).argsort(dim=1)[:, : round(args.sparsity * cols)]
    w.scatter_(1, drop, 0.0)
    packed = pack(w, "bitmask", args.value_type, **({"group_size": 128} if args.value_type == "int4" else {}))
    saved = bitmask_lanes.X_STAGE_BYTES
    if args.stage_x == "off":
        bitmask_lanes.X_STAGE_BYTES = 0  # every batch reads x from global memory
    try:
        kernel = build_linear_kernel(packed, warps_per_block=args.warps, design=args.design)
        x = torch.randn(args.batch, cols, generator=gen).half().cuda()
        y = kernel(x)  # compiles (outside the profiled launches)
    finally:
        bitmask_lanes.X_STAGE_BYTES = saved
    ref = x.double() @ packed.unpack().to("cuda", torch.float64).T
    scale = (x.double().abs() @ packed.unpack().to("cuda", torch.float64).abs().T).max().item()
    err = (y.double() - ref).abs().max().item() / max(scale, 1e-30)
    print(f"{args.design} {args.value_type} {rows}x{cols} {args.sparsity:.0%} batch {args.batch}: "
          f"max error {err:.2e} of the output scale; {kernel.nbytes() / 1e6:.1f} MB on the device")
    if not err < 1e-2:
        print("WRONG RESULT", file=sys.stderr)
        return 1
    for i in range(args.launches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernel(x)
        end.record()
        torch.cuda.synchronize()
        print(f"launch {i}: {start.elapsed_time(end) * 1e3:.1f} us (includes the host's launch cost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
