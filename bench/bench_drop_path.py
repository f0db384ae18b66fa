"""Benchmark: layer-scale + DropPath + residual add, train-mode forward + backward.

The residual join of ConvNeXt (``shortcut + drop_path(gamma * x)``, Liu et al. 2022) and of CaiT / DeiT-III style
ViTs with LayerScale (``x + drop_path(ls(attn(x)))``), with stochastic depth (Huang et al. 2016) in training.
Cases: ConvNeXt-T stage 1 ``(32, 96, 56, 56)`` fp32 with ``gamma`` ``(96, 1, 1)`` in NCHW and in channels-last, and
ViT-S tokens ``(64, 197, 384)`` fp32 with ``gamma`` ``(384,)``; ``drop_prob = 0.1``.

Providers (see ``bench/conftest.py``):

* ``eager``             - timm's composition ``shortcut + timm.layers.DropPath(p)(branch * gamma)``, train mode;
* ``pykernels``         - ``pykernels.functional.drop_path_add(shortcut, branch, p, gamma)``, automatic backend;
* ``compile-eager``     - ``torch.compile(fullgraph=True)`` of the eager composition;
* ``compile-pykernels`` - ``torch.compile(fullgraph=True)`` of the pykernels call (a ``torch.library`` custom op).

One timed step = forward + ``torch.autograd.grad(out, (shortcut, branch, gamma), grad_out)``.

Ideal bytes of one step (``B*...`` elements ``N``, element size ``s``; gamma and the per-sample mask are negligible):
forward reads shortcut and branch and writes out (``3 N s``); backward reads grad_out and branch and writes
grad_branch (``3 N s``; grad_shortcut is grad_out itself). Effective GB/s = ``6 N s`` / median step time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import timm.layers
import torch

import pykernels.functional as PF
from pykernels.ops.drop_path import select_backend

SMOKE = os.environ.get("PYKERNELS_BENCH_SMOKE", "0") not in ("", "0")  # tiny shapes (see bench/conftest.py)
DROP_PROB = 0.1
PROVIDERS = ("eager", "pykernels", "compile-eager", "compile-pykernels")
BYTES_FORMULA = "fwd: read shortcut+branch, write out; bwd: read grad_out+branch, write grad_branch (6 N s)"


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    shape: tuple[int, ...]
    layout: str  # "NCHW", "channels_last" or "BNC" (tokens)
    gamma_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


if SMOKE:
    CASES = (
        Case("convnext_t-s1-nchw", "smoke", (2, 8, 5, 5), "NCHW", (8, 1, 1)),
        Case("convnext_t-s1-channels_last", "smoke", (2, 8, 5, 5), "channels_last", (8, 1, 1)),
        Case("vit_s-tokens", "smoke", (2, 5, 16), "BNC", (16,)),
    )
else:
    CASES = (
        Case("convnext_t-s1-nchw", "ConvNeXt-T stage 1", (32, 96, 56, 56), "NCHW", (96, 1, 1)),
        Case("convnext_t-s1-channels_last", "ConvNeXt-T stage 1", (32, 96, 56, 56), "channels_last", (96, 1, 1)),
        Case("vit_s-tokens", "ViT-S/16 tokens", (64, 197, 384), "BNC", (384,)),
    )

CASES_BY_ID = {c.id: c for c in CASES}


def _make_inputs(case: Case, device: torch.device):
    def tensor(shape, requires_grad=True):
        t = torch.randn(shape, dtype=case.dtype, device=device)
        if case.layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(requires_grad)

    shortcut, branch = tensor(case.shape), tensor(case.shape)
    gamma = (0.1 * torch.rand(case.gamma_shape, dtype=case.dtype, device=device) + 0.05).requires_grad_()
    grad_out = tensor(case.shape, requires_grad=False)
    return shortcut, branch, gamma, grad_out


def _make_forward(provider: str):
    if provider.endswith("eager"):
        drop_path = timm.layers.DropPath(DROP_PROB).train()
        return lambda shortcut, branch, gamma: shortcut + drop_path(branch * gamma)
    return lambda shortcut, branch, gamma: PF.drop_path_add(shortcut, branch, DROP_PROB, gamma)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def bench_drop_path_add(bench, device, case_id: str, provider: str):
    case = CASES_BY_ID[case_id]
    bench.seed(0)
    shortcut, branch, gamma, grad_out = _make_inputs(case, device)
    numel = shortcut.numel()
    if provider.endswith("pykernels"):
        backend = select_backend(branch, shortcut, gamma)
    else:
        backend = "torch eager" if provider == "eager" else "inductor"
    bench.describe(
        op="drop_path_add",
        case=case.id,
        provider=provider,
        model=case.model,
        shape=list(case.shape),
        layout=case.layout,
        dtype=str(case.dtype).removeprefix("torch."),
        gamma_shape=list(case.gamma_shape),
        drop_prob=DROP_PROB,
        backend=backend,
        bytes_formula=BYTES_FORMULA,
        step="forward + backward",
    )

    forward_fn = _make_forward(provider)
    if provider.startswith("compile-"):
        forward_fn = bench.compile(forward_fn, fullgraph=True)
    inputs = (shortcut, branch, gamma)

    def forward():
        return forward_fn(shortcut, branch, gamma)

    def step():
        out = forward()
        torch.autograd.grad(out, inputs, grad_out)

    bench.run(step, forward=forward, inputs=inputs, ideal_bytes=6 * numel * shortcut.element_size())
