"""Test configuration: Triton kernels run in the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before ``triton`` is first imported, which is why it happens here, at the top of
the first file pytest loads. On a GPU machine the Triton kernels run on the GPU (and the CPU tests still run).
Helpers the test files share live in helpers.py.
"""

import os

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
