"""The documentation: the site builds with warnings as errors, every public name is in its API reference, and every
```python block of the README and of docs/ runs.

Examples run on the CPU with the torch backend (what a user without a GPU gets; the Triton interpreter that
conftest.py turns on would make them minutes long). The blocks of one page share one namespace and run in order,
in a temporary working directory. A block that cannot run on a CPU is preceded by a comment
``<!-- skip: why -->`` and is only compiled.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import spectralkern

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")
SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.+?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int           # 1-based line of the opening fence
    code: str
    skip: str | None    # the reason given in a <!-- skip: ... --> comment right above the fence

    def where(self) -> str:
        return f"{_relative(self.path)}:{self.line}"


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, dedented (a block inside a list item is indented)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, indent = i, match["indent"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{_relative(path)}:{i + 1}: a code fence is never closed")
        if match["lang"] == "python":
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.match(before)
            body = [line[len(indent):] if line.startswith(indent) else line for line in lines[start + 1:end]]
            blocks.append(Block(path, start + 1, textwrap.dedent("\n".join(body)) + "\n",
                                skip["reason"] if skip else None))
        i = end + 1
    return blocks


def run_page(page: Path) -> dict:
    """Compile every block of the page, run those not skipped in order in one namespace; returns the namespace."""
    import torch

    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        # Padding with the page's lines so that tracebacks point into the page.
        code = compile("\n" * block.line + block.code, str(block.path), "exec")
        if block.skip is None:
            exec(code, namespace)  # noqa: S102 - running the documented examples is the point
    return namespace


@pytest.fixture
def docs_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a distributed example that failed half-way
        dist.destroy_process_group()


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=_relative)
def test_page_examples_run(page: Path, docs_env):
    run_page(page)


def test_skip_comments_give_a_reason_and_are_rare():
    """A skipped block must say why; the skips are listed here so that a new one is a visible decision."""
    skipped = [b for p in PAGES for b in python_blocks(p) if b.skip is not None]
    total = sum(len(python_blocks(p)) for p in PAGES)
    for block in skipped:
        assert len(block.skip) >= 8, f"{block.where()}: give the reason a block cannot run on CPU"
    assert len(skipped) <= total // 3, [b.where() for b in skipped]


def test_the_runner_shares_a_namespace_skips_marked_blocks_and_reports_the_line(tmp_path, docs_env):
    page = tmp_path / "page.md"
    page.write_text("text\n\n- item:\n\n  ```python\n  x = 1\n  ```\n\n<!-- skip: needs CUDA -->\n```python\n"
                    "y = torch.ones(1, device='cuda')\n```\n\n```bash\nls\n```\n\n```python\nz = x + 1\n```\n",
                    encoding="utf-8")
    assert [(b.line, b.code, b.skip) for b in python_blocks(page)] == [
        (5, "x = 1\n", None), (10, "y = torch.ones(1, device='cuda')\n", "needs CUDA"), (18, "z = x + 1\n", None)]
    assert run_page(page)["z"] == 2
    page.write_text("```python\nx = 1\n```\n\n```python\nx.missing\n```\n", encoding="utf-8")
    with pytest.raises(AttributeError) as failure:
        run_page(page)
    assert failure.traceback[-1].lineno + 1 == 6  # the failing line of the page (pytest counts from 0)
    page.write_text("<!-- skip: needs CUDA -->\n```python\nx = (\n```\n", encoding="utf-8")
    with pytest.raises(SyntaxError):  # a skipped block is still compiled
        run_page(page)


# ---- the site --------------------------------------------------------------------------------------------------

# Import points documented in the pages that are neither the package nor a subpackage.
ON_DEMAND_MODULES = ("spectralkern.integrations.hf", "spectralkern.optim.checkpoint",
                     "spectralkern.ops.coeff_attention")


def public_modules() -> dict[str, list[str]]:
    """``__all__`` of the package, of each public subpackage, and of the on-demand import points. (The modules
    inside a subpackage export to their package; what the package does not re-export is internal to it.)"""
    found = {"spectralkern": list(spectralkern.__all__)}
    names = [info.name for info in pkgutil.walk_packages(spectralkern.__path__, prefix="spectralkern.")
             if info.ispkg and not any(part.startswith("_") for part in info.name.split("."))]
    for name in [*names, *ON_DEMAND_MODULES]:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional dependency (transformers) that is not installed here
            continue
        if hasattr(module, "__all__"):
            found[name] = list(module.__all__)
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (
        "mkdocs build --strict failed (a page missing from mkdocs.yml's nav, a broken link or anchor, a "
        "docstring griffe cannot parse):\n" + result.stdout[-4000:] + result.stderr[-8000:])
    return out


def test_site_builds_strictly(site):
    assert (site / "index.html").is_file()
    assert (site / "api" / "spectralkern" / "index.html").is_file()


def test_every_public_name_is_in_the_api_reference(site):
    """A name of a public module's ``__all__`` is documented when the API reference renders it under that module
    or under a package above it that re-exports it (``spectralkern.peft.SMoAConfig`` for peft/smoa.py's)."""
    anchors = set()
    for page in (site / "api").rglob("*.html"):
        anchors |= set(re.findall(r'id="(spectralkern[\w.]*)"', page.read_text(encoding="utf-8")))
    missing = []
    for module, names in public_modules().items():
        parts = module.split(".")
        owners = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        missing += [f"{module}.{name}" for name in names
                    if not name.startswith("__") and not any(f"{owner}.{name}" in anchors for owner in owners)]
    assert not missing, ("public names missing from the API reference (give them a docstring and list their module "
                         f"in docs/api/): {missing}")
