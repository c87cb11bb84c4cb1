#!/usr/bin/env bash
# The lowest supported versions: a fresh virtual environment with the floors of pyproject.toml's ranges, then a
# smoke subset of the tests. Not part of .ci/run (the torch floor alone is a multi-GB download); run it by hand
# before changing a floor or after a dependency release (docs/installation.md, "Lowest supported versions").
#
#   bash scripts/check_floors.sh hf     # transformers / peft / safetensors floors on the torch already pinned
#                                       # by the README (2.13.0): no CUDA packages, runs on a CPU machine
#   bash scripts/check_floors.sh all    # also the torch / numpy / scipy floors (PyPI's torch 2.5 wheel pulls
#                                       # its CUDA 12 libraries, ~3 GB)
#
# VENV (default: a temporary folder) chooses where the environment goes; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-hf}
shift || true
# Keep these in step with pyproject.toml: each is the lower bound written there.
hf_floors=("transformers==5.4.0" "peft==0.21.0" "safetensors==0.4.3" "tqdm==4.60.0")
core_floors=("torch==2.5.0" "numpy==1.24.0" "scipy==1.11.0")
case $mode in
    hf) floors=("torch==2.13.0" "${hf_floors[@]}") ;;
    all) floors=("${core_floors[@]}" "${hf_floors[@]}") ;;
    *) echo "usage: $0 hf|all [pytest args]" >&2; exit 2 ;;
esac

venv=${VENV:-$(mktemp -d)/floors}
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${floors[@]}"
# The package itself without touching the pins, then the test tools it does not pin.
python -m pip install -q --no-deps -e .
python -m pip install -q "pytest>=8" "hypothesis>=6.100" "networkx>=3.0" "expecttest>=0.2" "pygsp>=0.5" \
    "triton>=3.1; platform_system == 'Linux' and platform_machine == 'x86_64'"
python -m pip check
python - <<'PY'
import importlib.metadata as md
for name in ("torch", "numpy", "scipy", "transformers", "peft", "safetensors", "tqdm", "triton"):
    try:
        print(f"{name:<13}{md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:<13}not installed")
PY
# The smoke subset: every layer once, the adapters on real HF models, the Trainer integration.
python -m pytest -q -p no:cacheprovider \
    tests/test_graph.py tests/test_basis.py tests/test_optim.py tests/test_smoa.py tests/test_fourier_moe.py \
    tests/test_coeff_tuning.py tests/test_finetune.py -k "not distributed" "$@"
