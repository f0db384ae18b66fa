"""Small configurations of real models (random weights, no downloads) for the real-model matrix
(tests/test_model_matrix.py): timm, torchvision and Hugging Face, every family whose layers ``swap`` knows or must
leave alone. Each entry is ``(builder, input shape)`` (batch 4,
and 64 x 64 for the BatchNorm networks: at batch 2 and 32 x 32 their last BatchNorms normalise 2 values per channel,
where float32 rounding alone moves a training-mode output by 60%); layer-scales are set to O(1) by
:func:`unhide_branches` (the usual 1e-6 init would hide a wrong block)."""

from __future__ import annotations

import torch
from torch import nn


def _timm(name: str, **kwargs):
    import timm

    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # zero-initialised: the output would say nothing
    return model


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], stochastic_depth_prob=0.1
    )


def _hf(config_name: str, model_name: str, **config):
    def build():
        import transformers

        return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))

    return build


_VIT_LIKE = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)

_CONVNEXT_LIKE = dict(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, drop_path_rate=0.1)
_SWIN_LIKE = dict(
    image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, drop_path_rate=0.1
)

# name: (builder, input shape)
MODELS: dict[str, tuple] = {
    "timm_convnext_atto": (_timm("convnext_atto", drop_path_rate=0.1), (4, 3, 32, 32)),
    "timm_efficientnet_b0": (_timm("efficientnet_b0", drop_path_rate=0.1), (4, 3, 64, 64)),
    "timm_mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), (4, 3, 64, 64)),
    "timm_vit_tiny": (
        _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, drop_path_rate=0.1, init_values=1e-5),
        (4, 3, 32, 32),
    ),
    "timm_deit_tiny": (_timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), (4, 3, 32, 32)),
    "timm_swin_tiny": (
        _timm(
            "swin_tiny_patch4_window7_224", img_size=32, window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=16
        ),
        (4, 3, 32, 32),
    ),
    "tv_convnext_tiny": (lambda: __import__("torchvision").models.convnext_tiny(num_classes=10), (4, 3, 32, 32)),
    "tv_efficientnet_b0": (lambda: __import__("torchvision").models.efficientnet_b0(num_classes=10), (4, 3, 64, 64)),
    "tv_vit": (_tv_vit, (4, 3, 32, 32)),
    "tv_swin": (_tv_swin, (4, 3, 32, 32)),
    "hf_vit": (_hf("ViTConfig", "ViTModel", **_VIT_LIKE), (4, 3, 32, 32)),
    "hf_dinov2": (_hf("Dinov2Config", "Dinov2Model", drop_path_rate=0.1, **_VIT_LIKE), (4, 3, 32, 32)),
    "hf_swin": (_hf("SwinConfig", "SwinModel", **_SWIN_LIKE), (4, 3, 32, 32)),
    "hf_swinv2": (_hf("Swinv2Config", "Swinv2Model", **_SWIN_LIKE), (4, 3, 32, 32)),
    "hf_beit": (
        _hf("BeitConfig", "BeitModel", use_relative_position_bias=True, drop_path_rate=0.1, **_VIT_LIKE),
        (4, 3, 32, 32),
    ),
    "hf_data2vec_vision": (
        _hf("Data2VecVisionConfig", "Data2VecVisionModel", use_relative_position_bias=True, **_VIT_LIKE),
        (4, 3, 32, 32),
    ),
    "hf_clip_vision": (
        _hf("CLIPVisionConfig", "CLIPVisionModel", **_VIT_LIKE),
        (4, 3, 32, 32),
    ),
    "hf_convnext": (
        _hf("ConvNextConfig", "ConvNextModel", **_CONVNEXT_LIKE),
        (4, 3, 32, 32),
    ),
    "hf_convnextv2": (
        _hf("ConvNextV2Config", "ConvNextV2Model", **_CONVNEXT_LIKE),
        (4, 3, 32, 32),
    ),
    "hf_efficientnet": (
        _hf(
            "EfficientNetConfig",
            "EfficientNetModel",
            image_size=32,
            hidden_dim=640,
            width_coefficient=0.5,
            depth_coefficient=0.5,
        ),
        (4, 3, 64, 64),
    ),
    "hf_mobilenetv2": (
        _hf("MobileNetV2Config", "MobileNetV2Model", image_size=32, depth_multiplier=0.35),
        (4, 3, 64, 64),
    ),
}

_LAYER_SCALES = ("gamma", "layer_scale", "layer_scale_parameter", "lambda_1", "lambda_2", "lambda1", "scale")


@torch.no_grad()
def unhide_branches(model: nn.Module, seed: int = 0) -> nn.Module:
    """Layer-scales to U(0.5, 1) (the 1e-6 init would hide a wrong block), relative-position bias tables to N(0, 0.5)
    (zeros or std 0.02 at init would hide a dropped window / relative-position bias), BatchNorm statistics and affine
    params away from the identity (so a fold or a wrong statistic shows)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _LAYER_SCALES and p.dim() <= 1 or name.endswith(("ls1.gamma", "ls2.gamma")):
            p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
        elif leaf == "relative_position_bias_table":
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model's output (timm / torchvision: the tensor; HF: ``last_hidden_state``)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state
