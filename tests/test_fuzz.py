"""Differential fuzzing: seeded random configurations of every op and backend against float64 oracles written here
from the formulas (independently of ``pykernels.reference``), forward and every gradient.

Each case draws shapes (size-1 and odd sizes, empty batches), dtypes (fp32 / fp16 / bf16 / fp64 and mixes where the
op takes them), layouts (NCHW / channels-last / strided token views), masks and biases from its own seeded
generator, so a failure names a case that reproduces alone (``-k "attention-torch-17"``). Tolerances scale with the
dtype's precision and with the size of the values compared (the largest reference value of each tensor).

``make test`` runs a short slice (``PYKERNELS_FUZZ_CASES``, default 6 per op and backend); ``make fuzz`` runs
``PYKERNELS_FUZZ_CASES=400``. Triton runs under the interpreter here (slow: a third of the cases).
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from helpers import device_backends, require_backend

from pykernels import functional as F
from pykernels.ops import drop_path as drop_path_ops

CASES = int(os.environ.get("PYKERNELS_FUZZ_CASES", "6"))
EPS = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _cases(op: str):
    params = []
    for device, backend in device_backends():
        n = CASES if backend != "triton" or device == "cuda" else max(1, CASES // 3)
        params += [pytest.param(device, backend, i, id=f"{op}-{backend}-{device}-{i}") for i in range(n)]
    return params


def _seed(op: str, backend: str, i: int) -> int:
    return sum(map(ord, f"{op}/{backend}")) * 100_003 + i


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0):
    """|got - want| <= eps(dtype) * factor * (max |want| + 1), elementwise max."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().item() + 1.0
    err = (got.double() - want).abs().max().item()
    assert err <= EPS[dtype] * factor * scale, f"{what}: max error {err:.3g}, allowed {EPS[dtype] * factor * scale:.3g}"


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _grads(out, inputs, grad_out):
    present = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, present, grad_out, allow_unused=True)
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, present)]


def _dtype_for(backend, rng, allowed=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    choices = [d for d in allowed if not (backend == "triton" and d == torch.float64)]
    return rng.choice(choices)


# ---- drop_path_add: residual + gamma * branch * scale[b] ---------------------------------------------------------


@pytest.mark.parametrize("device,backend,i", _cases("drop_path_add"))
def test_drop_path_add(device, backend, i):
    require_backend("drop_path_add", backend, device)
    rng = random.Random(_seed("drop_path_add", backend, i))
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    dtype = _dtype_for(backend, rng)
    layout = rng.choice(["nchw", "channels_last", "tokens"])
    b = rng.choice([0, 1, 2, 3, 5])
    if layout == "tokens":
        shape, channel_dim = (b, rng.randint(1, 9), rng.randint(1, 33)), 2
    else:
        shape, channel_dim = (b, rng.randint(1, 17), rng.randint(1, 7), rng.randint(1, 7)), 1
    c = shape[channel_dim]

    def make(s):
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        return t.to(device=device, dtype=dtype)

    residual, branch = make(shape), make(shape)
    if layout == "channels_last":
        residual, branch = (t.contiguous(memory_format=torch.channels_last) for t in (residual, branch))
    gamma = make((c,)) if rng.random() < 0.7 else None
    scale = None
    if rng.random() < 0.7:
        keep = (torch.rand(b, generator=gen) > 0.3).double()
        scale = (keep / 0.7).to(device=device, dtype=dtype)
    with_residual = rng.random() < 0.85
    residual, branch, gamma = _leaves(residual if with_residual else None, branch, gamma)
    out = drop_path_ops.drop_path_add(residual, branch, scale, gamma, channel_dim, None, backend)
    # oracle
    shape_g = [1] * len(shape)
    shape_g[channel_dim] = c
    r64, b64 = (None if t is None else t.detach().double().requires_grad_() for t in (residual, branch))
    g64 = None if gamma is None else gamma.detach().double().requires_grad_()
    want = b64
    if g64 is not None:
        want = want * g64.view(shape_g)
    if scale is not None:
        want = want * scale.double().view((b,) + (1,) * (len(shape) - 1))
    if r64 is not None:
        want = want + r64
    _check(out, want.detach(), dtype, "out")
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    got = _grads(out, [residual, branch, gamma], grad_out.to(device=device, dtype=out.dtype))
    ref = _grads(want, [r64, b64, g64], grad_out)
    reduction = math.sqrt(math.prod(shape) / c + 1)  # gamma's gradient sums over every value of its channel
    for g, w in zip(got, ref):
        _check(g, w, dtype, "grad", factor=4 * reduction)


# ---- dwconv_ln: LayerNorm_C(depthwise conv(x) + bias) ---------------------------------------------------------------


def _dwconv_ln_oracle(x, w, cb, lw, lb, eps):
    c, k = w.shape[0], w.shape[-1]
    y = torch.nn.functional.conv2d(x, w, cb, padding=k // 2, groups=c).permute(0, 2, 3, 1)
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    out = (y - mean) / torch.sqrt(var + eps)
    if lw is not None:
        out = out * lw
    if lb is not None:
        out = out + lb
    return out


@pytest.mark.parametrize("device,backend,i", _cases("dwconv_ln"))
def test_dwconv_ln(device, backend, i):
    require_backend("dwconv_ln", backend, device)
    rng = random.Random(_seed("dwconv_ln", backend, i))
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    dtype = _dtype_for(backend, rng)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) and rng.random() < 0.5 else dtype
    b, c, h, w_ = rng.choice([0, 1, 2]), rng.randint(1, 40), rng.randint(1, 9), rng.randint(1, 9)
    k = rng.choice([3, 5, 7])
    x = torch.randn(b, c, h, w_, generator=gen, dtype=torch.float64)
    params = [torch.randn(c, 1, k, k, generator=gen, dtype=torch.float64) * 0.3]
    params += [torch.randn(c, generator=gen, dtype=torch.float64) if rng.random() < 0.8 else None for _ in range(3)]
    eps = rng.choice([1e-6, 1e-5])
    xd = x.to(device=device, dtype=dtype)
    if rng.random() < 0.5:
        xd = xd.contiguous(memory_format=torch.channels_last)
    leaves = _leaves(xd, *(None if p is None else p.to(device=device, dtype=param_dtype) for p in params))
    out = F.dwconv_ln(*leaves, eps=eps, backend=backend)
    ref_leaves = [None if t is None else t.detach().double().cpu().requires_grad_() for t in leaves]
    want = _dwconv_ln_oracle(*ref_leaves, eps)
    # LayerNorm over C amplifies the conv's rounding by 1/std(y): bounded here by the random weights (factor 8)
    _check(out.cpu(), want.detach(), dtype, "out", factor=8)
    grad_out = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got = _grads(out, leaves, grad_out.to(device=device, dtype=out.dtype))
    ref = _grads(want, ref_leaves, grad_out)
    reduction = math.sqrt(max(1, b * h * w_))
    for g, r in zip(got, ref):
        _check(g.cpu(), r, dtype, "grad", factor=16 * reduction)


# ---- attention: softmax(scale q k^T + bias, masks) v --------------------------------------------------------------


@pytest.mark.parametrize("device,backend,i", _cases("attention"))
def test_attention(device, backend, i):
    require_backend("attention", backend, device)
    rng = random.Random(_seed("attention", backend, i))
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    allowed = (torch.float32, torch.float64) if backend == "triton" and device == "cpu" else None
    dtype = _dtype_for(backend, rng, allowed) if allowed else _dtype_for(backend, rng)
    head_dim = rng.choice([16, 32, 64]) if backend == "triton" else rng.choice([8, 16, 24, 64])
    b, h, nq = rng.choice([1, 2]), rng.randint(1, 3), rng.randint(1, 20)
    nk = nq if rng.random() < 0.6 else rng.randint(1, 20)
    q, k, v = (torch.randn(b, n, h, head_dim, generator=gen, dtype=torch.float64) for n in (nq, nk, nk))
    bias = torch.randn(1, h, nq, nk, generator=gen, dtype=torch.float64) if rng.random() < 0.4 else None
    kpm = None
    if rng.random() < 0.3:
        kpm = torch.rand(b, nk, generator=gen) < 0.3
    causal = nq == nk and rng.random() < 0.3
    scale = rng.choice([None, 0.1])
    leaves = _leaves(*(t.to(device=device, dtype=dtype) for t in (q, k, v)))
    bias_leaf = None if bias is None else bias.to(device=device, dtype=dtype).requires_grad_()
    out = F.attention(
        *leaves, bias_leaf, None if kpm is None else kpm.to(device), causal=causal, scale=scale, backend=backend
    )
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in leaves)
    b64 = None if bias_leaf is None else bias_leaf.detach().double().cpu().requires_grad_()
    s = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * (head_dim**-0.5 if scale is None else scale)
    if b64 is not None:
        s = s + b64
    masked = torch.zeros(b, 1, nq, nk, dtype=torch.bool)
    if kpm is not None:
        masked = masked | kpm.view(b, 1, 1, nk)
    if causal:
        masked = masked | torch.ones(nq, nk, dtype=torch.bool).triu(1)
    s = s.masked_fill(masked, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a fully masked row gives 0
    want = torch.einsum("bhqk,bkhd->bqhd", p, v64)
    _check(out.cpu(), want.detach(), dtype, "out", factor=4)
    grad_out = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got = _grads(out, [*leaves, bias_leaf], grad_out.to(device=device, dtype=out.dtype))
    ref = _grads(want, [q64, k64, v64, b64], grad_out)
    for g, r in zip(got, ref):
        _check(g.cpu(), r, dtype, "grad", factor=16 * math.sqrt(max(nq, nk)))


# ---- mbconv_se: act(BatchNorm(depthwise conv(pad(x)))) and its spatial sums ----------------------------------------

_MBCONV_ACTS = {
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
    "relu6": lambda t: t.clamp(0.0, 6.0),
    "hardswish": torch.nn.functional.hardswish,
    "none": lambda t: t,
}


@pytest.mark.parametrize("device,backend,i", _cases("mbconv_se"))
def test_mbconv_se(device, backend, i):
    require_backend("mbconv_se", backend, device)
    rng = random.Random(_seed("mbconv_se", backend, i))
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    dtype = _dtype_for(backend, rng)
    training = rng.random() < 0.5
    b, c, h, w_ = rng.choice([1, 2, 3]), rng.randint(1, 40), rng.randint(1, 11), rng.randint(1, 11)
    if training and b * h * w_ < 4:
        b = 2  # batch statistics over very few values: BatchNorm's own conditioning, not the kernel's
        h, w_ = max(h, 2), max(w_, 2)
    k, stride = rng.choice([3, 5, 7]), rng.choice([1, 2])
    pad = rng.choice([None, (k // 2 - 1 + k % 2, k // 2, k // 2 - 1 + k % 2, k // 2)])
    act = rng.choice(list(_MBCONV_ACTS))
    x = torch.randn(b, c, h, w_, generator=gen, dtype=torch.float64)
    weight = torch.randn(c, 1, k, k, generator=gen, dtype=torch.float64) * 0.3
    conv_bias = torch.randn(c, generator=gen, dtype=torch.float64) if rng.random() < 0.3 else None
    bn_w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    bn_b = torch.randn(c, generator=gen, dtype=torch.float64) * 0.2
    rm = torch.randn(c, generator=gen, dtype=torch.float64) * 0.1
    rv = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    xd = x.to(device=device, dtype=dtype)
    if rng.random() < 0.5:
        xd = xd.contiguous(memory_format=torch.channels_last)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    leaves = _leaves(xd, *(None if t is None else t.to(device=device, dtype=param_dtype) for t in (weight, conv_bias)))
    bn = _leaves(bn_w.to(device=device, dtype=param_dtype), bn_b.to(device=device, dtype=param_dtype))
    stats = [t.to(device=device, dtype=param_dtype, copy=True) for t in (rm, rv)]  # updated in place by the op
    out, pooled = F.mbconv_se(
        leaves[0],
        leaves[1],
        leaves[2],
        bn[0],
        bn[1],
        *stats,
        training=training,
        momentum=0.1,
        eps=1e-5,
        stride=stride,
        padding=pad,
        act=act,
        backend=backend,
    )
    r = [None if t is None else t.detach().double().cpu().requires_grad_() for t in (*leaves, *bn)]
    xr = torch.nn.functional.pad(r[0], pad if pad is not None else (k // 2,) * 4)
    y = torch.nn.functional.conv2d(xr, r[1], r[2], stride=stride, groups=c)
    rm64, rv64 = rm.clone(), rv.clone()
    y = torch.nn.functional.batch_norm(y, rm64, rv64, r[3], r[4], training=training, momentum=0.1, eps=1e-5)
    want = _MBCONV_ACTS[act](y)
    want_pooled = want.sum((2, 3))
    factor = 8 * (4 if training else 1)
    _check(out.cpu(), want.detach(), dtype, "out", factor=factor)
    _check(pooled.cpu(), want_pooled.detach(), dtype, "pooled", factor=factor * want.shape[2] * want.shape[3])
    if training:
        _check(stats[0].cpu(), rm64, param_dtype, "running_mean", factor=8)
        _check(stats[1].cpu(), rv64, param_dtype, "running_var", factor=8)
    g1 = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    g2 = torch.randn(want_pooled.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(
        (out.double().cpu() * g1).sum() + (pooled.double().cpu() * g2).sum(),
        [t for t in (*leaves, *bn) if t is not None],
    )
    ref = torch.autograd.grad((want * g1).sum() + (want_pooled * g2).sum(), [t for t in r if t is not None])
    reduction = math.sqrt(b * want.shape[2] * want.shape[3]) * k
    for g, w in zip(got, ref):
        _check(g.cpu(), w, dtype, "grad", factor=32 * reduction * (4 if training else 1))


# ---- the fused MLP: shortcut + gamma * fc2(act(fc1(LN(x)))) ---------------------------------------------------------

_ACTS = {
    "gelu": lambda t: torch.nn.functional.gelu(t),
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}


@pytest.mark.parametrize("i", range(CASES * 2))
def test_mlp(i):
    rng = random.Random(_seed("mlp", "cpu", i))
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    dtype = rng.choice([torch.float32, torch.float64])
    tokens = rng.choice([(0, 3), (1, 1), (2, 7), (3, 50), (64,)])
    c, hidden, out_c = rng.randint(1, 48), rng.randint(1, 96), None
    act = rng.choice(list(_ACTS))
    norm = rng.random() < 0.4
    residual = rng.random() < 0.5
    if residual:
        out_c = c
    else:
        out_c = rng.randint(1, 48)
    x = torch.randn(*tokens, c, generator=gen, dtype=torch.float64)
    w1 = torch.randn(hidden, c, generator=gen, dtype=torch.float64) / math.sqrt(c)
    b1 = torch.randn(hidden, generator=gen, dtype=torch.float64) if rng.random() < 0.8 else None
    w2 = torch.randn(out_c, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
    b2 = torch.randn(out_c, generator=gen, dtype=torch.float64) if rng.random() < 0.8 else None
    gamma = torch.rand(out_c, generator=gen, dtype=torch.float64) + 0.5 if rng.random() < 0.5 else None
    lw = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5 if norm else None
    lb = torch.randn(c, generator=gen, dtype=torch.float64) if norm else None
    training = rng.random() < 0.5
    tensors = [x, w1, b1, w2, b2, gamma, lw, lb]
    leaves = _leaves(*(None if t is None else t.to(dtype) for t in tensors))
    xl, w1l, b1l, w2l, b2l, gl, lwl, lbl = leaves
    with torch.set_grad_enabled(True):
        out = F.mlp(
            xl,
            w1l,
            b1l,
            w2l,
            b2l,
            act,
            gamma=gl,
            shortcut=xl if residual else None,
            training=training,
            ln_weight=lwl,
            ln_bias=lbl,
            ln_eps=1e-6 if norm else None,
        )
    r = _leaves(*tensors)
    xr, w1r, b1r, w2r, b2r, gr, lwr, lbr = r
    hin = torch.nn.functional.layer_norm(xr, (c,), lwr, lbr, 1e-6) if norm else xr
    y = torch.nn.functional.linear(_ACTS[act](torch.nn.functional.linear(hin, w1r, b1r)), w2r, b2r)
    if gr is not None:
        y = y * gr
    want = y + xr if residual else y
    _check(out, want.detach(), dtype, "out", factor=4 * math.sqrt(hidden))
    grad_out = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got = _grads(out, leaves, grad_out.to(dtype))
    ref = _grads(want, r, grad_out)
    rows = max(1, math.prod(tokens))
    for g, w in zip(got, ref):
        _check(g, w, dtype, "grad", factor=16 * math.sqrt(hidden * rows))
