#!/usr/bin/env bash
# The one command to run on a GPU machine: the test suite with Triton kernels compiled natively (not through the
# interpreter, so the GPU-only tests run too), then the full benchmark suite.
#
#   bash benchmarks/run_gpu.sh                 # from anywhere; works on a checkout that is not pip-installed
#   bash benchmarks/run_gpu.sh --budget 12m [--dry-run] [--only STEP ...]   # the budgeted session (gpu_session.py)
#   OUT=/some/dir bash benchmarks/run_gpu.sh   # the device tool: everything packed into $OUT/gpu-results.tar.gz
#
# Steps: build the CUDA extension (csrc/) in place for sm_90, the test suite (the CUDA backend's tests included),
# compute-sanitizer memcheck over the CUDA backend's GPU tests, the full benchmark (cuda vs triton vs torch).
#
# Writes into benchmarks/results (or, with $OUT set, into gpu-results.tar.gz there, plus copies of the logs):
#   nvidia-smi.txt         the card as found (read-only query)
#   cuda.log               the CUDA extension's build, `spectralkern info`, then the compute-sanitizer report
#   gpu-tests.log          pytest output
#   bench.log              the benchmark's output; its last lines are the results table
#   <op>.jsonl             one JSON record per (op, case, provider), appended
#   ceilings.jsonl         the copy bandwidth and matmul rates measured in the same run, appended
#   <op>.png               time vs bytes per provider
# Knobs (environment):
#   SKIP_TESTS=1           benchmark only
#   BENCH_ARGS="..."       extra arguments for `python -m spectralkern.bench`, e.g. "--quick", "--ops spectral_filter"
#                          (the full suite of every op does not fit one 10-minute device call: split it by --ops) or
#                          "--providers spectralkern torch_bmm" (torch_compile's warm-up is most of the full run)
#   SPECTRALKERN_GIT_SHA   the commit to record when the tree travels without .git
#   SPECTRALKERN_CUDA_ARCHS  the extension's targets (default here: 90, the H100/H200)
#   SKIP_CUDA_BUILD=1      keep the extension already built in spectralkern/ (or none)
#   SKIP_SANITIZER=1       no compute-sanitizer pass
# Exit status: non-zero when the build, the tests, the sanitizer or the benchmark failed; all always run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# With --budget (and --dry-run, --only): the budgeted session instead — the headline picture in one call of at most
# the budget, 8 files in $OUT (benchmarks/gpu_session.py says what it runs).
for arg in "$@"; do
    if [[ "$arg" == --budget* || "$arg" == --dry-run || "$arg" == --only ]]; then
        exec "${PYTHON:-python3}" benchmarks/gpu_session.py "$@"
    fi
done
# The device tool brings back at most 8 files from $OUT: there, everything is written to a scratch folder and
# packed into $OUT/gpu-results.tar.gz at the end, with the three logs beside it for a quick read.
if [[ -n "${OUT:-}" ]]; then
    RESULTS="$(mktemp -d)"
    pack_results() {
        tar czf "$OUT/gpu-results.tar.gz" -C "$RESULTS" .
        cp "$RESULTS"/*.log "$OUT"/ 2>/dev/null || true
    }
    trap pack_results EXIT
else
    RESULTS="benchmarks/results"
fi
mkdir -p "$RESULTS"
PYTHON="${PYTHON:-python3}"

# This checkout, installed or not: the repository root goes first on the import path, so the extension built in
# place below (spectralkern/_C*.so + _build_info.json) is the one the tests and the benchmark load.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compile the kernels for the GPU

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: torch sees no CUDA device; this script is for a GPU machine" >&2
    exit 1
fi
nvidia-smi >"$RESULTS/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (see $RESULTS/nvidia-smi.txt)"

build_status=0
: >"$RESULTS/cuda.log"
if [[ "${SKIP_CUDA_BUILD:-0}" != 1 ]]; then
    echo "== CUDA extension build (log: $RESULTS/cuda.log)"
    SPECTRALKERN_CUDA_ARCHS="${SPECTRALKERN_CUDA_ARCHS:-90}" "$PYTHON" setup.py build_ext --inplace \
        >>"$RESULTS/cuda.log" 2>&1 || build_status=$?
    tail -n 3 "$RESULTS/cuda.log"
fi
"$PYTHON" -m spectralkern info 2>&1 | tee -a "$RESULTS/cuda.log"  # the archs it carries and whether it is live

tests_status=0
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    echo "== tests (log: $RESULTS/gpu-tests.log)"
    "$PYTHON" -m pytest tests -x -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu-tests.log" || tests_status=$?
fi

sanitizer_status=0
if [[ "${SKIP_SANITIZER:-0}" != 1 ]]; then
    echo "== compute-sanitizer memcheck over the CUDA backend's GPU tests (log: $RESULTS/cuda.log)"
    # Without torch's caching allocator every tensor is its own allocation, so memcheck sees out-of-bounds accesses
    # that would otherwise land inside a cached block. opcheck/compile are left out: inductor under memcheck is slow.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 50 \
        "$PYTHON" -m pytest tests/test_cuda_ext.py tests/test_cuda_adamw.py -m gpu -k "not opcheck_and_compile" \
        -q -rs -p no:cacheprovider \
        >>"$RESULTS/cuda.log" 2>&1 || sanitizer_status=$?
    tail -n 5 "$RESULTS/cuda.log"
fi

echo "== benchmarks (log: $RESULTS/bench.log)"
bench_status=0
# shellcheck disable=SC2086  # BENCH_ARGS is split on purpose
"$PYTHON" -m spectralkern.bench --out "$RESULTS" ${BENCH_ARGS:-} 2>&1 | tee "$RESULTS/bench.log" || bench_status=$?

echo "== exit status: CUDA build $build_status, tests $tests_status, compute-sanitizer $sanitizer_status," \
     "benchmark $bench_status; results in $RESULTS"
[[ $build_status == 0 && $tests_status == 0 && $sanitizer_status == 0 && $bench_status == 0 ]]
