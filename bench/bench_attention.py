"""Benchmark: multi-head self-attention blocks (qkv Linear -> attention -> proj Linear), forward and forward+backward.

ViT-S/B shapes (Dosovitskiy et al. 2021; B=32, N=197 tokens, H=6/12 heads, D=64) and long sequences (N=1024, 4096),
fp16 on CUDA, fp32 on CPU (where only the ViT-S and N=1024 cases run: the rest take minutes per step on 2 cores).

Providers (same weights everywhere):

* ``eager``           - timm's ``timm.models.vision_transformer.Attention`` (``F.scaled_dot_product_attention``): the
  baseline the ratios are taken against;
* ``eager-explicit``  - the textbook / seed-style module: ``softmax(q @ k^T * scale) @ v`` with permute copies;
* ``nn-mha``          - ``nn.MultiheadAttention(batch_first=True)`` called with ``need_weights=False``;
* ``pykernels``       - ``pykernels.FusedMHSA.from_module(timm_attention)``, automatic backend;
* ``compile-eager``   - ``torch.compile(fullgraph=True)`` of timm's module.

TFLOP/s count the attention core only (the Linears excluded): ``4 * B * H * N * N * D`` for the forward and
``3.5x`` that for forward + backward (the backward does 2.5x the forward's matmul work, FlashAttention's convention).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import pykernels
from pykernels.ops.attention import OP as ATTENTION_OP

SMOKE = os.environ.get("PYKERNELS_BENCH_SMOKE", "0") not in ("", "0")
PROVIDERS = ("eager", "eager-explicit", "nn-mha", "pykernels", "compile-eager")
FLOPS_FORMULA = "attention core only: fwd 4*B*H*N*N*D; fwd+bwd 3.5x fwd (Linears excluded)"


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    batch: int
    tokens: int
    heads: int
    head_dim: int = 64
    gpu_only: bool = False

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


if SMOKE:
    CASES = (Case("vit_s", "smoke", 2, 9, 2, 16),)
else:
    CASES = (
        Case("vit_s", "ViT-S/16", 32, 197, 6),
        Case("vit_b", "ViT-B/16", 32, 197, 12, gpu_only=True),
        Case("long_1024", "N=1024", 2, 1024, 6),
        Case("long_4096", "N=4096", 2, 4096, 12, gpu_only=True),
    )
CASES_BY_ID = {c.id: c for c in CASES}


class ExplicitAttention(nn.Module):
    """The textbook / seed-style self-attention: explicit scores, softmax, and permute copies."""

    def __init__(self, timm_attention: nn.Module):
        super().__init__()
        self.qkv, self.proj = timm_attention.qkv, timm_attention.proj
        self.num_heads = timm_attention.num_heads
        self.scale = timm_attention.scale

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MHAWrapper(nn.Module):
    def __init__(self, timm_attention: nn.Module):
        super().__init__()
        dim = timm_attention.qkv.in_features
        self.mha = nn.MultiheadAttention(dim, timm_attention.num_heads, batch_first=True)
        with torch.no_grad():
            self.mha.in_proj_weight.copy_(timm_attention.qkv.weight)
            self.mha.in_proj_bias.copy_(timm_attention.qkv.bias)
            self.mha.out_proj.weight.copy_(timm_attention.proj.weight)
            self.mha.out_proj.bias.copy_(timm_attention.proj.bias)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def _module(provider: str, timm_attention: nn.Module) -> nn.Module:
    if provider == "eager-explicit":
        return ExplicitAttention(timm_attention)
    if provider == "nn-mha":
        return MHAWrapper(timm_attention)
    if provider == "pykernels":
        return pykernels.FusedMHSA.from_module(timm_attention)
    return timm_attention


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def bench_attention(bench, device, case_id: str, provider: str, mode: str):
    from timm.models.vision_transformer import Attention

    case = CASES_BY_ID[case_id]
    if case.gpu_only and device.type != "cuda":
        pytest.skip(f"{case.id} runs only on CUDA (minutes per step on a CPU)")
    if SMOKE and provider.startswith("compile-"):
        pytest.skip("smoke mode skips torch.compile providers")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    bench.seed(0)
    timm_attention = Attention(case.dim, num_heads=case.heads, qkv_bias=True).to(device=device, dtype=dtype)
    module = _module(provider, timm_attention).to(device=device, dtype=dtype).train(mode == "fwd_bwd")
    x = torch.randn(case.batch, case.tokens, case.dim, device=device, dtype=dtype, requires_grad=mode == "fwd_bwd")
    if provider == "pykernels":
        backend = ATTENTION_OP.select(device, [dtype], None, head_dim=case.head_dim)
    else:
        backend = {"eager": "SDPA", "eager-explicit": "torch eager", "nn-mha": "torch MHA", "compile-eager": "inductor"}
        backend = backend[provider]
    core_flops = 4 * case.batch * case.heads * case.tokens * case.tokens * case.head_dim
    bench.describe(
        op="attention",
        case=f"{case.id}-{mode}",
        provider=provider,
        model=case.model,
        shape=[case.batch, case.tokens, case.heads, case.head_dim],
        dtype=str(dtype).removeprefix("torch."),
        backend=backend,
        flops_formula=FLOPS_FORMULA,
        step="forward" if mode == "fwd" else "forward + backward",
    )
    if provider.startswith("compile-"):
        module = bench.compile(module, fullgraph=True)
    grad_out = torch.randn(case.batch, case.tokens, case.dim, device=device, dtype=dtype)
    params = [p for p in module.parameters() if p.requires_grad]

    def forward():
        return module(x)

    if mode == "fwd":

        def step():
            with torch.no_grad():
                module(x)

        bench.run(step, flops=core_flops)
    else:

        def step():
            torch.autograd.grad(module(x), [x, *params], grad_out)

        bench.run(step, forward=forward, inputs=[x, *params], flops=3.5 * core_flops)
