"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.

Without a GPU every Triton kernel runs through the interpreter on the CPU (that is how CI tests them); with a
GPU the kernels run natively unless the caller already set TRITON_INTERPRET.
"""
import logging
import os
import zlib

import pytest

try:
    import torch
    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    import _bf16_interpreter  # tests/ is on sys.path (pytest's rootdir-relative conftest import)

    try:
        _bf16_interpreter.install()  # bf16 on values, fp32-accumulated dots: the interpreter runs the GPU paths
    except ImportError:  # triton is not installed (it ships for Linux x86_64 only)
        pass


# Fresh inputs every run, reproducible: the run's base seed is printed in pytest's header;
# SPECTRALKERN_SEED=<that number> replays a run.
_BASE_SEED = int(os.environ.get("SPECTRALKERN_SEED", str(int.from_bytes(os.urandom(4), "little") % 10**6)))


def pytest_report_header(config):
    return f"spectralkern: SPECTRALKERN_SEED={_BASE_SEED}"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Hypothesis draws its examples from the same base seed (unless --hypothesis-seed is given), so
    SPECTRALKERN_SEED replays those too."""
    if config.getoption("hypothesis_seed", default=None) is None and hasattr(config.option, "hypothesis_seed"):
        config.option.hypothesis_seed = str(_BASE_SEED)


@pytest.fixture(autouse=True)
def clean_logger():
    """Every test leaves the ``spectralkern`` logger as it found it (``spectralkern.cli.main`` installs a handler)."""
    logger = logging.getLogger("spectralkern")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture
def torch_backend_one_thread(monkeypatch):
    """The torch backend on one CPU thread for the test (CPU-path tests whose timing-sensitive choices assume it)."""
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seed(request) -> int:
    """A per-test seed derived from the run's base seed and the test's id; torch's RNG is seeded with it."""
    value = (zlib.crc32(request.node.nodeid.encode()) + _BASE_SEED) % (2**31)
    torch.manual_seed(value)
    return value


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda:
            item.add_marker(skip_gpu)
