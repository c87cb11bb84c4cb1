"""The package metadata a user installs against: no upper bound on torch, what the code imports is required."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def requirements(group: list[str]) -> dict[str, Requirement]:
    return {Requirement(line).name: Requirement(line) for line in group}


def test_torch_has_a_floor_and_no_upper_bound():
    """An upper bound would make pip downgrade (or refuse) a newer torch the user already has."""
    torch = requirements(PROJECT["dependencies"])["torch"]
    operators = {spec.operator for spec in torch.specifier}
    assert operators == {">="}, f"torch must only have a lower bound, got {torch}"
    for group in PROJECT["optional-dependencies"].values():
        assert "torch" not in requirements(group), "an extra must not constrain torch"


def test_safetensors_is_a_core_dependency():
    """Every adapter's save_* / load_* imports it (spectralkern/peft/_patching.py)."""
    assert "safetensors" in requirements(PROJECT["dependencies"])


def test_the_floor_script_installs_the_declared_floors():
    """scripts/check_floors.sh pins each package at the lower bound pyproject.toml declares; this keeps the two
    equal."""
    script = (ROOT / "scripts/check_floors.sh").read_text(encoding="utf-8")
    arrays = re.findall(r"^(?:hf|core)_floors=\((.*)\)$", script, flags=re.M)
    pins = dict(re.findall(r'"([a-z-]+)==([\d.]+)"', " ".join(arrays)))
    declared = {**requirements(PROJECT["dependencies"]), **requirements(PROJECT["optional-dependencies"]["finetune"])}
    assert set(pins) == {"torch", "numpy", "scipy", "tqdm", "safetensors", "transformers", "peft"}
    for name, pin in pins.items():
        floor = next(spec.version for spec in declared[name].specifier if spec.operator == ">=")
        assert Version(pin) == Version(floor), f"{name}: the script pins {pin}, pyproject.toml's floor is {floor}"
