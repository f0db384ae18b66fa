"""Test configuration: Triton kernels run in the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before ``triton`` is first imported, which is why it happens here, at the top of
the first file pytest loads. On a GPU machine the Triton kernels run on the GPU (and the CPU tests still run).
"""

import os

import torch

if not torch.cuda.is_available() and os.environ.get("PYKERNELS_GPU_CHECK") != "1":  # the AOT gate needs real Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pykernels import backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS_BY_DEVICE = {"cpu": ("torch", "cpp", "triton"), "cuda": ("torch", "triton", "cuda")}


def device_backends():
    """(device, backend) pairs to test: every backend that has a kernel for the device type."""
    return [(d, b) for d in DEVICES for b in BACKENDS_BY_DEVICE[d]]


def require_backend(op: str, backend: str, device: str) -> None:
    """Skip (naming the missing capability) when ``backend`` cannot run ``op`` on ``device`` here."""
    reasons = backends.registered_ops()[op].backend_reasons(backend, torch.device(device))
    if reasons:
        pytest.skip(f"{backend} on {device} unavailable: " + "; ".join(reasons))


def spy_kernels(monkeypatch, ops_module) -> list[str]:
    """Records the backend name of every ``ops_module._kernels(name)`` lookup (which backend actually ran)."""
    ran: list[str] = []
    real = ops_module._kernels

    def spy(name):
        ran.append(name)
        return real(name)

    monkeypatch.setattr(ops_module, "_kernels", spy)
    return ran


def pytest_report_header(config):
    ok, why = backends.extension_status()
    return [
        f"pykernels: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, pykernels._C: {'loaded' if ok else why}"
    ]
