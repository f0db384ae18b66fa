"""Benchmark: depthwise 7x7 conv + LayerNorm over channels (ConvNeXt's block front), and the whole ConvNeXt block.

ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s") starts every block with ``dwconv7x7 -> permute -> LayerNorm``.
Cases: every ConvNeXt-T stage at batch 32, fp32 on CPU (fp16 on CUDA): (C, H=W) = (96, 56), (192, 28), (384, 14),
(768, 7), NCHW input (timm's default), plus stage 1 with a channels-last input. Two steps each: the eval forward,
and the train forward + backward (gradients of x, conv weight and bias, LN weight and bias).

Providers (see ``bench/conftest.py``):

* ``eager``             - timm's composition: ``conv_dw(x)`` (``nn.Conv2d``, groups=C) ``-> .permute(0, 2, 3, 1) ->
  LayerNorm``, output (B, H, W, C) as timm's ``ConvNeXtBlock`` (conv_mlp=False) computes it;
* ``pykernels``         - ``pykernels.functional.dwconv_ln`` (automatic backend; recorded), output (B, H, W, C);
* ``compile-eager``     - ``torch.compile(fullgraph=True)`` of the eager composition;
* ``compile-pykernels`` - ``torch.compile(fullgraph=True)`` of the pykernels call.

The ``block`` cases time the whole block: timm's ``ConvNeXtBlock`` (eager and compiled) against
``pykernels.ConvNeXtBlock.from_module`` of it (same weights), drop_path 0.1 in train mode.

Ideal bytes (``N = B*C*H*W`` elements of size ``s``; parameters negligible): forward reads x and writes out
(``2 N s``); backward reads grad_out and x and writes grad_x (``3 N s``). Effective GB/s = ideal bytes / median time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn

SMOKE = os.environ.get("PYKERNELS_BENCH_SMOKE", "0") not in ("", "0")
PROVIDERS = ("eager", "pykernels", "compile-eager", "compile-pykernels")
KERNEL_SIZE = 7
EPS = 1e-6
DROP_PATH = 0.1
BYTES_FORMULA = "fwd: read x, write out (2 N s); bwd: read grad_out + x, write grad_x (3 N s)"


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    batch: int
    channels: int
    size: int
    layout: str = "NCHW"  # or "channels_last"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.size, self.size)


if SMOKE:
    CASES = (Case("s1", "smoke", 2, 8, 9), Case("s1-cl", "smoke", 2, 8, 9, "channels_last"))
    BLOCK_CASES = (Case("s1", "smoke", 2, 8, 9),)
else:
    CASES = (
        Case("s1", "ConvNeXt-T stage 1", 32, 96, 56),
        Case("s1-cl", "ConvNeXt-T stage 1", 32, 96, 56, "channels_last"),
        Case("s2", "ConvNeXt-T stage 2", 32, 192, 28),
        Case("s3", "ConvNeXt-T stage 3", 32, 384, 14),
        Case("s4", "ConvNeXt-T stage 4", 32, 768, 7),
    )
    BLOCK_CASES = tuple(c for c in CASES if c.layout == "NCHW")
CASES_BY_ID = {c.id: c for c in CASES}
BLOCK_CASES_BY_ID = {c.id: c for c in BLOCK_CASES}


class EagerDWConvLN(nn.Module):
    """timm's ConvNeXtBlock front (conv_mlp=False): conv_dw -> permute -> LayerNorm, output (B, H, W, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, KERNEL_SIZE, padding=KERNEL_SIZE // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=EPS)

    def forward(self, x):
        return self.norm(self.conv_dw(x).permute(0, 2, 3, 1))


class PykernelsDWConvLN(nn.Module):
    """The same parameters through ``pykernels.functional.dwconv_ln`` (one fused op, output (B, H, W, C))."""

    def __init__(self, eager: EagerDWConvLN):
        super().__init__()
        self.conv_dw, self.norm = eager.conv_dw, eager.norm

    def forward(self, x):
        import pykernels.functional as PF

        conv, norm = self.conv_dw, self.norm
        return PF.dwconv_ln(x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps)


def _input(case: Case, device, dtype, requires_grad: bool) -> torch.Tensor:
    x = torch.randn(case.shape, device=device, dtype=dtype)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def _backend(provider: str, x: torch.Tensor, conv: nn.Conv2d, norm: nn.LayerNorm) -> str:
    if provider.endswith("pykernels"):
        from pykernels.ops.dwconv_ln import select_backend

        name = select_backend(x, conv.weight, conv.bias, norm.weight, norm.bias)
        return name if provider == "pykernels" else f"inductor + {name}"
    return "torch eager" if provider == "eager" else "inductor"


def _run(bench, module: nn.Module, x: torch.Tensor, mode: str, ideal_bytes: dict[str, int]) -> None:
    params = [p for p in module.parameters() if p.requires_grad]
    if mode == "fwd":

        def step():
            with torch.no_grad():
                module(x)

        bench.run(step, ideal_bytes=ideal_bytes["fwd"])
    else:
        grad_out = torch.randn_like(module(x).detach())

        def step():
            torch.autograd.grad(module(x), [x, *params], grad_out)

        bench.run(step, forward=lambda: module(x), inputs=[x, *params], ideal_bytes=ideal_bytes["fwd_bwd"])


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def bench_dwconv_ln(bench, device, case_id: str, provider: str, mode: str):
    case = CASES_BY_ID[case_id]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    bench.seed(0)
    eager = EagerDWConvLN(case.channels).to(device=device, dtype=dtype)
    module = PykernelsDWConvLN(eager) if provider.endswith("pykernels") else eager
    module.train(mode == "fwd_bwd")
    x = _input(case, device, dtype, requires_grad=mode == "fwd_bwd")
    bench.describe(
        op="dwconv_ln",
        case=f"{case.id}-{mode}",
        provider=provider,
        model=case.model,
        shape=list(case.shape),
        layout=case.layout,
        dtype=str(dtype).removeprefix("torch."),
        kernel_size=KERNEL_SIZE,
        backend=_backend(provider, x, eager.conv_dw, eager.norm),
        bytes_formula=BYTES_FORMULA,
        step="eval forward" if mode == "fwd" else "train forward + backward",
    )
    if provider.startswith("compile-"):
        module = bench.compile(module, fullgraph=True)
    nbytes = x.numel() * x.element_size()
    _run(bench, module, x, mode, {"fwd": 2 * nbytes, "fwd_bwd": 5 * nbytes})


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [c.id for c in BLOCK_CASES])
def bench_convnext_block(bench, device, case_id: str, provider: str, mode: str):
    from timm.models.convnext import ConvNeXtBlock as TimmBlock

    import pykernels

    case = BLOCK_CASES_BY_ID[case_id]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    bench.seed(0)
    timm_block = TimmBlock(case.channels, drop_path=DROP_PATH, ls_init_value=1e-6).to(device=device, dtype=dtype)
    module = pykernels.ConvNeXtBlock.from_module(timm_block) if provider.endswith("pykernels") else timm_block
    module.train(mode == "fwd_bwd")
    x = _input(case, device, dtype, requires_grad=mode == "fwd_bwd")
    bench.describe(
        op="convnext_block",
        case=f"{case.id}-{mode}",
        provider=provider,
        model=case.model,
        shape=list(case.shape),
        layout=case.layout,
        dtype=str(dtype).removeprefix("torch."),
        kernel_size=KERNEL_SIZE,
        drop_path=DROP_PATH if mode == "fwd_bwd" else 0.0,
        backend=_backend(provider, x, timm_block.conv_dw, timm_block.norm),
        step="eval forward" if mode == "fwd" else "train forward + backward",
    )
    if provider.startswith("compile-"):
        module = bench.compile(module, fullgraph=True)
    nbytes = x.numel() * x.element_size()
    _run(bench, module, x, mode, {"fwd": 2 * nbytes, "fwd_bwd": 5 * nbytes})
