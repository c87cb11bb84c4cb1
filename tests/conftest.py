"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.

Without a GPU every Triton kernel runs through the interpreter on the CPU (that is how CI tests them); with a
GPU the kernels run natively unless the caller already set TRITON_INTERPRET.
"""
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


@pytest.fixture
def seed(request) -> int:
    """A per-test seed: fresh inputs for every test, reproducible from the test's name (and SPECTRALKERN_SEED)."""
    base = int(os.environ.get("SPECTRALKERN_SEED", "0"))
    value = (zlib.crc32(request.node.nodeid.encode()) + base) % (2**31)
    torch.manual_seed(value)
    return value


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda:
            item.add_marker(skip_gpu)
