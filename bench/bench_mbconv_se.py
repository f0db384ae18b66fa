"""Benchmark: the MBConv block with squeeze-excitation (EfficientNet, MobileNet-V3), block by block.

MBConv (Sandler et al. 2018; Tan & Le 2019): 1x1 expand + BN + act -> depthwise k x k + BN + act -> SE -> 1x1
project + BN -> DropPath + residual. Cases: EfficientNet-B0 block shapes at batch 32 (fp32 on CPU, fp16 on CUDA):
16 -> 24 stride 2 k3 at 112x112, 40 -> 40 k5 at 28x28, 112 -> 112 k5 at 14x14, 192 -> 320 k3 at 7x7 (expand ratio 6,
SE ratio 0.25, SiLU, channels-last input: what the previous block hands over), each as the eval forward and the train
forward + backward. Whole models (timm ``efficientnet_b0`` swapped by ``pykernels.swap``) are in ``bench_models.py``.

Providers (see ``bench/conftest.py``):

* ``eager``             - timm's ``InvertedResidual`` in eager PyTorch;
* ``pykernels``         - ``pykernels.FusedMBConvSE.from_module`` of it (same weights);
* ``compile-eager``     - ``torch.compile`` of the original;
* ``compile-pykernels`` - ``torch.compile`` of the pykernels version.

Train steps record the bytes autograd saves for backward (unique storages).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

SMOKE = os.environ.get("PYKERNELS_BENCH_SMOKE", "0") not in ("", "0")
PROVIDERS = ("eager", "pykernels", "compile-eager", "compile-pykernels")
DROP_PATH = 0.1


@dataclass(frozen=True)
class Case:
    id: str
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    size: int
    batch: int = 32


if SMOKE:
    CASES = (Case("smoke", 8, 8, 3, 1, 9, 2),)
else:
    CASES = (
        Case("16-24-s2-k3-112", 16, 24, 3, 2, 112),
        Case("40-40-k5-28", 40, 40, 5, 1, 28),
        Case("112-112-k5-14", 112, 112, 5, 1, 14),
        Case("192-320-k3-7", 192, 320, 3, 1, 7),
    )
CASES_BY_ID = {c.id: c for c in CASES}


def _timm_block(case: Case):
    from functools import partial

    from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

    se = partial(SqueezeExcite, rd_channels=max(1, round(case.in_ch * 0.25)))
    return InvertedResidual(
        case.in_ch,
        case.out_ch,
        case.kernel,
        stride=case.stride,
        exp_ratio=6,
        act_layer=torch.nn.SiLU,
        se_layer=se,
        drop_path_rate=DROP_PATH,
    )


def _randomize_bn(model) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)


def _backend(provider: str) -> str:
    if provider.endswith("pykernels"):
        from pykernels.ops.mbconv_se import OP

        name = OP.select(
            torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda"), [torch.float32]
        )
        return name if provider == "pykernels" else f"inductor + {name}"
    return "torch eager" if provider == "eager" else "inductor"


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def bench_mbconv_block(bench, device, case_id: str, provider: str, mode: str):
    import pykernels

    case = CASES_BY_ID[case_id]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    bench.seed(0)
    block = _timm_block(case)
    _randomize_bn(block)
    block = block.to(device=device, dtype=dtype)
    module = pykernels.FusedMBConvSE.from_module(block) if provider.endswith("pykernels") else block
    module.train(mode == "fwd_bwd")
    x = torch.randn(case.batch, case.in_ch, case.size, case.size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(mode == "fwd_bwd")
    bench.describe(
        op="mbconv_block",
        case=f"{case.id}-{mode}",
        provider=provider,
        model="EfficientNet-B0 block",
        shape=[case.batch, case.in_ch, case.size, case.size],
        out_ch=case.out_ch,
        kernel_size=case.kernel,
        stride=case.stride,
        dtype=str(dtype).removeprefix("torch."),
        backend=_backend(provider),
        step="eval forward" if mode == "fwd" else "train forward + backward",
    )
    if provider.startswith("compile-"):
        module = bench.compile(module, fullgraph=True)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                module(x)

        bench.run(step)
    else:
        params = [p for p in module.parameters() if p.requires_grad]
        grad_out = torch.randn_like(module(x).detach())

        def step():
            torch.autograd.grad(module(x), [x, *params], grad_out)

        bench.run(step, forward=lambda: module(x), inputs=[x, *params])
