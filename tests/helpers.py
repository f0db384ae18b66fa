"""Helpers shared by the test files (``from helpers import ...``; tests/ is on sys.path under pytest's default
import mode)."""

import pytest
import torch

from pykernels import backends

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


def spy_kernels(monkeypatch, op: backends.Op) -> list[str]:
    """Records the backend name of every ``op.kernels(name)`` lookup (which backend actually ran)."""
    ran: list[str] = []
    real = op.kernels

    def spy(name):
        ran.append(name)
        return real(name)

    monkeypatch.setattr(op, "kernels", spy)
    return ran
