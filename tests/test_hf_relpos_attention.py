"""FusedHFRelPosAttention: Hugging Face's BEiT-family self / output attention (Data2VecVision) on the fused op."""

from __future__ import annotations

import copy

import pytest
import torch

import pykernels
from pykernels.modules.attention import FusedHFRelPosAttention

transformers = pytest.importorskip("transformers")


def _model(shared: bool, dtype=torch.float64):
    config = transformers.Data2VecVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        use_relative_position_bias=not shared,
        use_shared_relative_position_bias=shared,
        drop_path_rate=0.0,  # training mode below must be deterministic
        layer_scale_init_value=1.0,  # O(1): the usual 0.1 would shrink a wrong attention's effect
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.Data2VecVisionModel(config).to(dtype)
    with torch.no_grad():  # HF initialises the tables to zeros, which would hide a dropped bias
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer-bias", "shared-bias"])
def test_swapped_data2vec_matches_with_every_gradient(shared):
    model = _model(shared)
    swapped = copy.deepcopy(model)
    report = pykernels.swap(swapped, include=["attention"])
    assert [type(m) for m in swapped.modules() if isinstance(m, FusedHFRelPosAttention)] and len(report.replaced) == 2
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    outs = []
    for m in (model, swapped):
        m.train()  # dropout is 0 in this config: training mode, deterministic
        out = m(pixel_values=x).last_hidden_state
        grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
        outs.append((out, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # the bias is used: another table (a fresh model: HF caches the bias it computed) changes the swapped output
    other = _model(shared)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "relative_position_bias_table" in name:
                p.add_(torch.randn_like(p))  # a uniform shift would not change the softmax
    other_swapped = copy.deepcopy(other)
    pykernels.swap(other_swapped, include=["attention"])
    with torch.no_grad():
        out_other = other_swapped.eval()(pixel_values=x).last_hidden_state
        torch.testing.assert_close(out_other, other.eval()(pixel_values=x).last_hidden_state, rtol=1e-10, atol=1e-12)
    assert (out_other - outs[1][0]).abs().max() > 1e-3


def test_state_dict_both_ways_output_attentions_and_swapping_twice():
    model = _model(False, torch.float32).eval()
    swapped = copy.deepcopy(model)
    pykernels.swap(swapped, include=["attention"])
    assert set(swapped.state_dict()) == set(model.state_dict())
    model.load_state_dict(swapped.state_dict(), strict=True)
    swapped.load_state_dict(model.state_dict(), strict=True)
    assert len(pykernels.swap(swapped, include=["attention"]).replaced) == 0
    layer = swapped.encoder.layer[0].attention
    assert isinstance(layer, FusedHFRelPosAttention)
    h = torch.randn(2, 17, 32)
    out, weights = layer(h, output_attentions=True, resolution=(32, 32))
    plain, none = layer(h, resolution=(32, 32))
    assert none is None and torch.allclose(out, plain, atol=1e-5)
    with pytest.raises(ValueError, match="resolution"):
        layer(h)
