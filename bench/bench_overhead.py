"""Benchmark: per-call overhead of every pykernels op and module on tiny CPU tensors, against eager PyTorch.

At small batch (and on any GPU) the Python and dispatch work around a kernel is the whole cost of a call. Each case
calls its op ``CALLS`` times per timed step on tensors of a few hundred elements, so the report's median step time in
**ms equals the time of one call in us**; the difference between the two providers is pykernels' overhead per call
(target: at most 3 us over eager). Cases (fp32, CPU by default; ``PYKERNELS_BENCH_DEVICE=cuda`` runs them on a GPU):

* ``drop_path_add-eval``  - ``x + g * y`` vs ``functional.drop_path_add(x, y, 0.1, g, training=False)``, (8, 16);
* ``drop_path-train``     - timm's ``DropPath(0.1)`` vs ``pykernels.DropPath(0.1)``, train mode, (8, 16);
* ``drop_path_add-grad``  - forward + backward of ``x + DropPath(g * y)`` (timm) vs ``drop_path_add``, (8, 16),
  everything requiring grad (the autograd route);
* ``dwconv_ln``           - ``layer_norm(conv2d(x).permute)`` vs ``functional.dwconv_ln``, (1, 8, 4, 4), k = 7;
* ``mbconv_se``           - ``silu(batch_norm(conv2d(x)))`` + its spatial sum vs ``functional.mbconv_se``, (1, 8, 4, 4),
  k = 3, running statistics;
* ``attention``           - ``F.scaled_dot_product_attention`` on (B, H, N, D) views vs ``functional.attention``,
  (1, 4, 8, 8) as (B, N, H, D): both take the same (B, N, H, D) tensors and give a (B, N, H, D) result (eager
  transposes inside the timed call; until 2026-11-29 it was handed pre-transposed views and skipped three transposes);
* ``mhsa``                - timm's ``vision_transformer.Attention(64, 8 heads)`` vs ``FusedMHSA.from_module`` of it,
  x (1, 4, 64);
* ``convnext_block``      - timm's ``ConvNeXtBlock(16)`` vs ``pykernels.ConvNeXtBlock.from_module``, (1, 16, 4, 4);
* ``mbconv_block``        - timm's ``InvertedResidual(16, 16, k3, SE)`` vs ``FusedMBConvSE.from_module``, (1, 16, 4, 4).

Modules and the eval op cases run under ``torch.no_grad()`` (inference), the ``-grad`` case with autograd. Every case
runs with one intra-op thread: on tensors this small no kernel splits its work, and on a shared machine OpenMP's
wake-ups of idle threads would otherwise be most of what is measured (eager's conv2d: 30x slower with 2 threads on a
loaded 2-core CPU). Providers: ``eager`` and ``pykernels`` (see ``bench/conftest.py``; ``torch.compile`` has no
per-call Python to measure).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as TF

import pykernels
import pykernels.functional as PF

SMOKE = os.environ.get("PYKERNELS_BENCH_SMOKE", "0") not in ("", "0")
CALLS = 10 if SMOKE else 1000  # calls per timed step: the median step in ms is the time of one call in us
PROVIDERS = ("eager", "pykernels")


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    shape: tuple[int, ...]
    grad: bool = False  # forward + backward with autograd; else under torch.no_grad()


CASES = (
    Case("drop_path_add-eval", "x + g * y, layer-scale g (16,)", (8, 16)),
    Case("drop_path-train", "DropPath(0.1) module, train mode", (8, 16)),
    Case("drop_path_add-grad", "x + DropPath(0.1)(g * y), forward + backward", (8, 16), grad=True),
    Case("dwconv_ln", "depthwise 7x7 conv + LayerNorm over C", (1, 8, 4, 4)),
    Case("mbconv_se", "depthwise 3x3 conv + BatchNorm (running stats) + SiLU + SE squeeze", (1, 8, 4, 4)),
    Case("attention", "attention core, 4 heads of 8, (B, N, H, D)", (1, 4, 8, 8)),
    Case("mhsa", "timm vision_transformer.Attention(64, num_heads=8)", (1, 4, 64)),
    Case("convnext_block", "timm ConvNeXtBlock(16), layer-scale", (1, 16, 4, 4)),
    Case("mbconv_block", "timm InvertedResidual(16, 16, k3, exp 6, SE 0.25)", (1, 16, 4, 4)),
)
CASES_BY_ID = {c.id: c for c in CASES}


def _mbconv_block():
    from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

    se = partial(SqueezeExcite, rd_channels=4)
    return InvertedResidual(16, 16, 3, exp_ratio=6, act_layer=torch.nn.SiLU, se_layer=se)


def _make(case: Case, provider: str, device: torch.device):
    """(a callable doing one call of the case, the backend pykernels chose or the eager provider's name)."""
    eager = provider == "eager"
    randn = partial(torch.randn, device=device)
    if case.id.startswith("drop_path_add"):
        x, y, g = randn(case.shape), randn(case.shape), randn(case.shape[-1])
        if case.id == "drop_path_add-eval":
            return (lambda: x + g * y) if eager else (lambda: PF.drop_path_add(x, y, 0.1, g, training=False))
        x, y, g = (t.requires_grad_() for t in (x, y, g))
        drop = timm.layers.DropPath(0.1).train()
        fwd = (lambda: x + drop(g * y)) if eager else (lambda: PF.drop_path_add(x, y, 0.1, g))
        return lambda: fwd().sum().backward()
    if case.id == "drop_path-train":
        x = randn(case.shape)
        module = (timm.layers.DropPath(0.1) if eager else pykernels.DropPath(0.1)).train()
        return lambda: module(x)
    if case.id == "dwconv_ln":
        c = case.shape[1]
        x, w, b, lw, lb = randn(case.shape), randn(c, 1, 7, 7), randn(c), randn(c), randn(c)
        if eager:
            return lambda: TF.layer_norm(
                TF.conv2d(x, w, b, padding=3, groups=c).permute(0, 2, 3, 1), (c,), lw, lb, 1e-6
            )
        return lambda: PF.dwconv_ln(x, w, b, lw, lb, 1e-6)
    if case.id == "mbconv_se":
        c = case.shape[1]
        x, w, bw, bb, rm = randn(case.shape), randn(c, 1, 3, 3), randn(c), randn(c), randn(c)
        rv = torch.rand(c, device=device) + 0.5
        if eager:

            def eager_mbconv():
                z = TF.silu(TF.batch_norm(TF.conv2d(x, w, None, 1, 1, groups=c), rm, rv, bw, bb, False, 0.1, 1e-5))
                return z, z.sum((2, 3))

            return eager_mbconv
        return lambda: PF.mbconv_se(x, w, None, bw, bb, rm, rv)
    if case.id == "attention":
        q, k, v = randn(3, *case.shape).unbind(0)
        if eager:  # from the same (B, N, H, D) views to a (B, N, H, D) result, as pykernels is timed
            return lambda: TF.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
        return lambda: PF.attention(q, k, v)
    x = randn(case.shape)
    if case.id == "mhsa":
        module = timm.models.vision_transformer.Attention(case.shape[-1], num_heads=8)
        if not eager:
            module = pykernels.FusedMHSA.from_module(module)
    elif case.id == "convnext_block":
        module = timm.models.convnext.ConvNeXtBlock(case.shape[1], ls_init_value=0.5)
        if not eager:
            module = pykernels.ConvNeXtBlock.from_module(module)
    else:
        module = _mbconv_block()
        if not eager:
            module = pykernels.FusedMBConvSE.from_module(module)
    module = module.to(device).eval()
    return lambda: module(x)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def bench_overhead(bench, device, case_id: str, provider: str):
    case = CASES_BY_ID[case_id]
    bench.seed(0)
    call = _make(case, provider, device)
    threads = torch.get_num_threads()
    bench.describe(
        op="overhead",
        case=case.id,
        provider=provider,
        what=case.what,
        shape=list(case.shape),
        dtype="float32",
        calls_per_step=CALLS,
        intra_op_threads=1,
        step=f"{CALLS} calls" + (" (forward + backward)" if case.grad else " under torch.no_grad()"),
    )

    def step():
        with torch.enable_grad() if case.grad else torch.no_grad():
            for _ in range(CALLS):
                call()

    torch.set_num_threads(1)
    try:
        bench.run(step, warmup=3, min_rounds=10, max_rounds=200)
    finally:
        torch.set_num_threads(threads)
