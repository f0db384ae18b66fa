"""pykernels.gemm: both providers compute act(x W^T + b) (and the SE-scaled form) alike; the choice is made once per
shape by measurement and recorded; packed weights serve any row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pykernels import gemm
from pykernels.reference.mbconv_se import activation

ACTS = ["none", "relu", "relu6", "silu", "hardswish"]


@pytest.mark.parametrize("act", ACTS)
def test_providers_agree_with_the_formula(act):
    torch.manual_seed(0)
    x, w, b = torch.randn(300, 40), torch.randn(24, 40) * 0.2, torch.randn(24)
    want = activation(F.linear(x.double(), w.double(), b.double()), act)
    packed = gemm.prepack(w, 300)
    for name, run in gemm._RUN.items():
        if name == "onednn" and packed is None:
            continue
        got = run(x.clone(), w, b, act, packed if name == "onednn" else None)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)
    got = gemm.linear_act(x, w, b, act, packed)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    key = (300, 40, 24, act, torch.float32, "cpu", torch.get_num_threads())
    assert gemm.choices()[key] in gemm.PROVIDERS


def test_packed_weight_serves_other_row_counts():
    packed = gemm.prepack(torch.randn(16, 8), 100)
    if packed is None:
        pytest.skip("oneDNN is not available in this torch build")
    w = torch.randn(16, 8)
    packed = gemm.prepack(w, 100)
    for rows in (1, 7, 100, 1000):
        x = torch.randn(rows, 8)
        torch.testing.assert_close(gemm._onednn(x, w, None, "silu", packed), F.silu(F.linear(x, w)))


@pytest.mark.parametrize("act", ["none", "silu"])
def test_scaled_linear_matches_scaling_first(act):
    torch.manual_seed(0)
    z, s = torch.randn(4, 50, 32), torch.rand(4, 32)
    w, b = torch.randn(8, 32) * 0.2, torch.randn(8)
    want = activation(F.linear((z * s[:, None, :]).double(), w.double(), b.double()), act)
    for name, run in gemm._SCALED.items():
        torch.testing.assert_close(run(z.clone(), s, w, b, act, None).double(), want, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(gemm.scaled_linear_act(z.clone(), s, w, b, act).double(), want, rtol=1e-5, atol=1e-5)
    assert any(k[0] == "scaled" and k[1:4] == (4, 50, 32) for k in gemm.choices())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_scaled_linear_with_residual(bias):
    """``other + (z * s) W^T + b`` (MBConv's projection with the skip connection in the GEMM's epilogue) on both
    scaled forms and through the chooser; ``other`` is left as it was; an activation with a residual is refused."""
    torch.manual_seed(1)
    z, s = torch.randn(3, 20, 16), torch.rand(3, 16)
    w, b = torch.randn(16, 16) * 0.2, (torch.randn(16) if bias else None)
    other = torch.randn(3, 20, 16)
    kept = other.clone()
    want = other.double() + F.linear((z * s[:, None, :]).double(), w.double(), None if b is None else b.double())
    for name, run in gemm._SCALED.items():
        got = run(z.clone(), s, w, b, "none", None, other)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)
    got = gemm.scaled_linear_act(z.clone(), s, w, b, "none", gemm.prepack(w, 60), other)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(other, kept)
    with pytest.raises(ValueError, match="act='none'"):
        gemm.scaled_linear_act(z.clone(), s, w, b, "silu", None, other)
