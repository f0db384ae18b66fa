"""The reference modules this project was created from (../shared/seeds/), copied verbatim (reformatted only), for
the drop-in parity tests: DropPath and ConvNeXtBlock (003_8d8ded4205e85488.txt), SelfAttention
(003_8d8ded4205e85488.txt), MHSA (002_ee3eb2434317a6c3.txt), FusedMBConv and SEModule (003_8d8ded4205e85488.txt,
"EfficientNet V2")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Drop paths (Stochastic Depth) per sample.

    Randomly drops entire residual blocks during training.
    """

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x

        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
        random_tensor.floor_()

        output = x.div(keep_prob) * random_tensor
        return output


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block - modernized ResNet (2022)."""

    def __init__(self, dim, drop_path=0.0, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # Expand
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)  # Contract
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones((dim)), requires_grad=True)  # noqa: UP034
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)

        x = input + self.drop_path(x)
        return x


class SelfAttention(nn.Module):  # 003_8d8ded4205e85488.txt, "Self-Attention Pattern"
    """Scaled dot-product attention."""

    def __init__(self, embed_dim, num_heads=8):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.qkv = nn.Linear(embed_dim, embed_dim * 3)
        self.out = nn.Linear(embed_dim, embed_dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (self.head_dim**-0.5)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.out(x)
        return x


class MHSA(nn.Module):  # 002_ee3eb2434317a6c3.txt, Transformers section
    def __init__(self, d_model, n_heads):
        super().__init__()
        assert d_model % n_heads == 0
        self.nh = n_heads
        self.dk = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, mask=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)

        def split(t):
            return t.view(B, T, self.nh, self.dk).transpose(1, 2)

        q, k, v = map(split, (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / (self.dk**0.5)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)
        w = scores.softmax(dim=-1)
        attn = w @ v
        attn = attn.transpose(1, 2).contiguous().view(B, T, D)
        return self.proj(attn)


class FusedMBConv(nn.Module):  # 003_8d8ded4205e85488.txt, "EfficientNet V2"
    """Fused-MBConv block for EfficientNet V2."""

    def __init__(self, in_channels, out_channels, expand_ratio=4, stride=1):
        super().__init__()
        hidden_dim = in_channels * expand_ratio

        # Fused expand + depthwise conv
        self.fused = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 3, stride, 1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.SiLU(),  # Swish activation
        )

        # Squeeze-and-Excitation
        self.se = SEModule(hidden_dim, reduction=4)

        # Project
        self.project = nn.Sequential(
            nn.Conv2d(hidden_dim, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels)
        )

        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x):
        identity = x
        x = self.fused(x)
        x = self.se(x)
        x = self.project(x)
        if self.skip:
            x = x + identity
        return x


class SEModule(nn.Module):  # 003_8d8ded4205e85488.txt
    """Squeeze-and-Excitation block."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        w = F.adaptive_avg_pool2d(x, 1)
        w = F.relu(self.fc1(w))
        w = torch.sigmoid(self.fc2(w))
        return x * w
