"""pykernels.swap: the report (replaced / skipped with reasons), dry runs, idempotency, the probe verification of
structure-matched modules, and models it must leave working or convert exactly (Hugging Face Swin and BEiT used to
break: their window / relative-position biases were dropped by a structure match; both are now converted, a window
attention of another layout is skipped)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pykernels
from pykernels.swap import SwapReport

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")


def _tiny_swin():
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2
    )
    return transformers.SwinModel(config).eval()


def _tiny_beit():
    config = transformers.BeitConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        use_relative_position_bias=True,
    )
    return transformers.BeitModel(config).eval()


def _tiny_vit():
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.ViTModel(config).eval()


def test_beit_attention_with_relative_position_bias_is_swapped():
    """HF BEiT: the layer adds its relative-position bias to the additive mask it hands the attention (which
    FusedViTAttention takes as its score bias); k_proj has no bias (zeros in the packed one). Converted, verified,
    the same output, and the state_dict keys of the original both ways."""
    model = _tiny_beit()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()  # zeros at init would hide a dropped bias
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x).last_hidden_state
    swapped = copy.deepcopy(model)
    report = pykernels.swap(swapped, include=["attention"])
    assert [r.new for r in report.replaced] == ["FusedViTAttention"] * 2 and report.skipped == []
    with torch.no_grad():
        torch.testing.assert_close(swapped(x).last_hidden_state, want, rtol=1e-4, atol=1e-5)
    assert set(swapped.state_dict()) == set(model.state_dict())
    copy.deepcopy(model).load_state_dict(swapped.state_dict(), strict=True)
    swapped.load_state_dict(model.state_dict(), strict=True)


def test_hf_swin_window_attention_is_converted():
    """HF Swin attention shares ViT's layout but adds a window bias and the shift mask: FusedWindowAttention (not
    FusedViTAttention, which would drop them) takes it, after the probe with a mask; the same output, and the
    original's state_dict keys both ways."""
    model = _tiny_swin()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()  # zeros at init would hide a dropped bias
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x).last_hidden_state
    swapped = copy.deepcopy(model)
    report = pykernels.swap(swapped, include=["attention"])
    assert [r.new for r in report.replaced] == ["FusedHFWindowAttention"] * 2 and report.skipped == []
    with torch.no_grad():
        torch.testing.assert_close(swapped(x).last_hidden_state, want, rtol=1e-4, atol=1e-5)
    assert set(swapped.state_dict()) == set(model.state_dict())
    copy.deepcopy(model).load_state_dict(swapped.state_dict(), strict=True)
    swapped.load_state_dict(model.state_dict(), strict=True)


def test_swap_leaves_models_it_cannot_compute_working():
    """torchvision's video Swin (3-D windows): a window attention FusedWindowAttention does not compute is skipped,
    with the reason (never matched by structure), and the model computes what it computed before."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    model = SwinTransformer3d(
        patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 4, 4], num_classes=5
    ).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        want = model(x)
    report = pykernels.swap(model, include=["attention"])
    assert isinstance(report, SwapReport) and report.model is model
    assert report.replaced == [] and len(report.skipped) == 2
    assert all(s.kind == "attention" and "window attention" in s.reason for s in report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_structure_matched_attention_is_verified_then_replaced():
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x).last_hidden_state
    report = pykernels.swap(model, include=["attention"])
    assert [r.new for r in report.replaced] == ["FusedViTAttention"] * 2 and report.skipped == []
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, want, rtol=1e-4, atol=1e-5)


def test_a_failed_verification_skips_the_module():
    class LooksLikeViTAttention(nn.Module):
        """The ViT layout, different maths (no softmax)."""

        def __init__(self, dim=16, heads=2):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
            self.num_attention_heads, self.head_dim = heads, dim // heads

        def forward(self, hidden_states, attention_mask=None):
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
            return self.o_proj((q @ k.transpose(1, 2)) @ v), None

    model = nn.Sequential(LooksLikeViTAttention())
    report = pykernels.swap(model, include=["attention"])
    assert report.replaced == [] and "verification probe: outputs differ" in report.skipped[0].reason
    assert isinstance(model[0], LooksLikeViTAttention)
    report = pykernels.swap(model, include=["attention"], verify=False)  # on the user's word
    assert [r.new for r in report.replaced] == ["FusedViTAttention"]


def test_report_dry_run_and_idempotency():
    model = timm.create_model("efficientnet_b0", drop_path_rate=0.1)
    original = copy.deepcopy(model)
    dry = pykernels.swap(model, dry_run=True)
    assert len(dry.replaced) == 16 and dry.dry_run
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()], "a dry run changed the model"
    report = pykernels.swap(model)
    assert [r.path for r in report.replaced] == [r.path for r in dry.replaced] == model.pykernels_swapped
    text = str(report)
    assert "replaced 16" in text and "InvertedResidual -> FusedMBConvSE" in text and "blocks.1.0" in text
    again = pykernels.swap(model)
    assert again.replaced == [] and again.skipped == []
    original.load_state_dict(model.state_dict(), strict=True)  # the swapped model's state_dict loads both ways
    model.load_state_dict(original.state_dict(), strict=True)


def test_report_lists_refused_variants_with_reasons():
    from timm.models._efficientnet_blocks import InvertedResidual

    model = nn.Sequential(
        InvertedResidual(16, 16, 3, exp_ratio=4, dilation=2), InvertedResidual(16, 16, 3, exp_ratio=4)
    )
    report = pykernels.swap(model, include=["mbconv"])
    assert [r.path for r in report.replaced] == ["1"]
    assert report.skipped[0].path == "0" and "dilation" in report.skipped[0].reason
    assert "skipped" in str(report) and "dilation" in str(report)


def test_fused_vit_attention_refuses_what_changes_the_maths():
    """A cross-attention / KV-cache / rotary argument is never ignored: FusedViTAttention raises."""
    attention = pykernels.FusedMHSA.from_module(_tiny_vit().get_submodule("layers.0.attention"))
    x = torch.randn(1, 5, 32)
    for name in ("key_value_states", "past_key_values", "position_embeddings"):
        with pytest.raises(NotImplementedError, match=name):
            attention(x, **{name: x})
    assert attention(x)[0].shape == x.shape
