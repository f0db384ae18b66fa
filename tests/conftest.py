"""Test configuration: Triton kernels run in the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before ``triton`` is first imported, which is why it happens here, at the top of
the first file pytest loads. On a GPU machine the Triton kernels run on the GPU (and the CPU tests still run).
Helpers the test files share live in helpers.py.
"""

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("PYKERNELS_GPU_CHECK") != "1":  # the AOT gate needs real Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pykernels import backends  # noqa: E402


def pytest_report_header(config):
    ok, why = backends.extension_status()
    return [
        f"pykernels: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, pykernels._C: {'loaded' if ok else why}"
    ]


@pytest.fixture(scope="module")
def one_thread_per_xdist_worker():
    """One intra-op thread per xdist worker for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``):
    two workers with two OpenMP threads each on 2 cores wait on each other, and float32 reductions whose order depends
    on the thread count make comparisons of long computations (whole models, training steps) machine-dependent."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
