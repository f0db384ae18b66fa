"""Regression tests for the defects a random differential test (seeded configurations of every op and backend
against float64 oracles) found: each failed before its fix."""

from __future__ import annotations

import pytest
import torch
from helpers import require_backend

from pykernels import functional as F
from pykernels.ops import attention as attention_ops

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("empty", ["queries", "keys", "batch"])
def test_attention_on_empty_sequences(dtype, empty):
    """Nq = 0 or Nk = 0 killed the process (SIGFPE in ATen's CPU flash kernel); B = 0 too. Empty outputs, zero
    gradients; with no key at all each query's output is 0 and its logsumexp -inf."""
    b, nq, nk = (0, 4, 4) if empty == "batch" else (2, 0 if empty == "queries" else 4, 0 if empty == "keys" else 4)
    q = torch.randn(b, nq, 3, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(b, nk, 3, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(b, nk, 3, 16, dtype=dtype, requires_grad=True)
    out = F.attention(q, k, v)
    assert out.shape == (b, nq, 3, 16) and not out.any()
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is not None and not g.any() and g.shape == t.shape for g, t in zip(grads, (q, k, v)))
    _, lse = attention_ops.attention(q, k, v, None, None, False, 0.25, 0.0, torch.zeros(1, dtype=torch.int64))
    assert lse.shape == (b, 3, nq) and (lse.numel() == 0 or torch.isneginf(lse).all())


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
def test_attention_one_dimensional_bias(dtype):
    """A (Nk,) additive bias raised IndexError in float64 (the explicit path handed SDPA a 1-D mask)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 16, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(5, dtype=torch.float64)
    want = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.25 + bias, -1)
    want = torch.einsum("bhqk,bkhd->bqhd", want, v)
    got = F.attention(q.to(dtype), k.to(dtype), v.to(dtype), bias=bias.to(dtype), scale=0.25)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
def test_attention_fully_masked_rows_have_neg_inf_logsumexp(dtype):
    """The torch backend gave lse 0.0 for a fully masked row in fp32 / fp16 / bf16 but -inf in float64 and on Triton
    (whose docstring says -inf); the output is 0 either way, and the backward stays finite."""
    q = torch.randn(2, 4, 3, 16, dtype=dtype, requires_grad=True)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True
    out, lse = attention_ops.attention(q, q, q, None, kpm, False, 0.25, 0.0, torch.zeros(1, dtype=torch.int64))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    assert not out[1].any()
    bias = torch.zeros(1, 1, 4, 4, dtype=dtype)
    bias[..., 2, :] = float("-inf")
    _, lse = attention_ops.attention(q, q, q, bias, None, False, 0.25, 0.0, torch.zeros(1, dtype=torch.int64))
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isfinite(lse[:, :, :2]).all()
    (grad,) = torch.autograd.grad(out.float().sum(), q)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("branch_dtype", [torch.bfloat16, torch.float16])
def test_triton_drop_path_narrow_branch_with_float64(branch_dtype):
    """Triton's drop_path_add with a bfloat16 branch and a float64 gamma / residual returned NaN or 0 for
    grad_branch (a direct float64 -> bfloat16 cast, wrong under the interpreter); it now casts as PyTorch does."""
    require_backend("drop_path_add", "triton", "cpu")
    branch = torch.tensor([[1.0, -2.5, 3.0], [0.5, 4.0, -1.0]]).to(branch_dtype).requires_grad_()
    gamma = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    outs = {}
    for backend in ("triton", "torch"):
        out = F.drop_path_add(residual, branch, 0.0, gamma, backend=backend)
        outs[backend] = (out, *torch.autograd.grad(out.sum(), (residual, branch, gamma)))
    for got, want in zip(outs["triton"], outs["torch"]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_single_channel_gamma_of_shape_1_c_1_1(backend):
    """A gamma of shape (1, C, 1, 1) was refused when C = 1 (the docstring promises (1, C, 1, 1))."""
    require_backend("drop_path_add", backend, "cpu")
    x, b = torch.randn(2, 1, 5, 7), torch.randn(2, 1, 5, 7)
    gamma = torch.randn(1, 1, 1, 1, requires_grad=True)
    out = F.drop_path_add(x, b, 0.0, gamma, backend=backend)
    torch.testing.assert_close(out, x + b * gamma, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), gamma)
    torch.testing.assert_close(grad, b.sum().reshape(1, 1, 1, 1), rtol=1e-5, atol=1e-5)
