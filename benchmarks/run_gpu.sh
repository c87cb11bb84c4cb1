#!/usr/bin/env bash
# The one command to run on a GPU machine: the test suite with Triton kernels compiled natively (not through the
# interpreter, so the GPU-only tests run too), then the full benchmark suite.
#
#   bash benchmarks/run_gpu.sh                 # from anywhere; works on a checkout that is not pip-installed
#   OUT=/some/dir bash benchmarks/run_gpu.sh   # results there instead of benchmarks/results
#
# Writes into ${OUT:-benchmarks/results} (six files, all flat):
#   nvidia-smi.txt         the card as found (read-only query)
#   gpu-tests.log          pytest output
#   bench.log              the benchmark's output; its last lines are the results table
#   <op>.jsonl             one JSON record per (op, case, provider), appended
#   ceilings.jsonl         the copy bandwidth and matmul rates measured in the same run, appended
#   <op>.png               time vs bytes per provider
# Knobs (environment):
#   SKIP_TESTS=1           benchmark only
#   BENCH_ARGS="..."       extra arguments for `python -m spectralkern.bench`, e.g. "--quick" or
#                          "--providers spectralkern torch_bmm" (torch_compile's warm-up is most of the full run)
#   SPECTRALKERN_GIT_SHA   the commit to record when the tree travels without .git
# Exit status: non-zero when the tests or the benchmark failed; both always run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
PYTHON="${PYTHON:-python3}"

# This checkout, installed or not: the repository root goes first on the import path. (Once csrc/ has CUDA code,
# build it here first: pip install -e . --no-deps --no-build-isolation.)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compile the kernels for the GPU

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: torch sees no CUDA device; this script is for a GPU machine" >&2
    exit 1
fi
nvidia-smi >"$RESULTS/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (see $RESULTS/nvidia-smi.txt)"

tests_status=0
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    echo "== tests (log: $RESULTS/gpu-tests.log)"
    "$PYTHON" -m pytest tests -x -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu-tests.log" || tests_status=$?
fi

echo "== benchmarks (log: $RESULTS/bench.log)"
bench_status=0
# shellcheck disable=SC2086  # BENCH_ARGS is split on purpose
"$PYTHON" -m spectralkern.bench --out "$RESULTS" ${BENCH_ARGS:-} 2>&1 | tee "$RESULTS/bench.log" || bench_status=$?

echo "== tests exit status $tests_status, benchmark exit status $bench_status; results in $RESULTS"
[[ $tests_status == 0 && $bench_status == 0 ]]
