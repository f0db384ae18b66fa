"""GEMM providers of the fused blocks' inference paths: ``act(x @ W^T + b)`` for 1x1 convolutions on channels-last
activations (MBConv's expand / project), with the provider chosen per shape by measurement.

Two providers compute the same thing:

* ``aten``   - ``F.linear`` (``aten::addmm``: the bias is first copied into the output, then a BLAS GEMM), then the
  activation in place;
* ``onednn`` - ``torch.ops.mkldnn._linear_pointwise`` with the bias and the activation fused as oneDNN post-ops, on
  weights reordered once into oneDNN's blocked layout (re-packed whenever the caller's weights change).

Which one is faster depends on the CPU, the thread count and the shape; so the first call of each (M, K, N,
activation, dtype, threads) times both a few times and keeps the faster one for the process (never a choice by CPU
vendor name: no machine gets slower than ``aten``). A provider that cannot run a call (oneDNN without bfloat16
support, a CUDA tensor) is not chosen. :func:`choices` lists the decisions (``python -m pykernels info`` prints them).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

__all__ = ["choices", "linear_act", "prepack", "scaled_linear_act"]

PROVIDERS = ("aten", "onednn")
_ONEDNN_ACT = {
    "none": ("none", []),
    "relu": ("relu", []),
    "relu6": ("hardtanh", [0.0, 6.0]),
    "silu": ("swish", []),
    "hardswish": ("hardswish", []),
}
_CHOICES: dict[tuple, str] = {}
_TIMING_REPEATS = 3


def _onednn_available(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def prepack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """``weight`` (N, K) reordered for oneDNN (a hint of ``rows`` = M), or None where oneDNN cannot take it."""
    if not _onednn_available(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    except RuntimeError:
        return None


def _inplace_act(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return y
    if act == "relu":
        return y.relu_()
    if act == "relu6":
        return y.clamp_(0.0, 6.0)
    if act == "silu":
        return F.silu(y, inplace=True)
    if act == "hardswish":
        return F.hardswish(y, inplace=True)
    raise ValueError(f"unknown activation {act!r}")


def _aten(x, weight, bias, act, packed):
    return _inplace_act(F.linear(x, weight, bias), act)


def _onednn(x, weight, bias, act, packed):
    name, scalars = _ONEDNN_ACT[act]
    return torch.ops.mkldnn._linear_pointwise(x, weight if packed is None else packed, bias, name, scalars, "")


_RUN = {"aten": _aten, "onednn": _onednn}


def _time(fn) -> float:
    times = []
    for _ in range(_TIMING_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _choose(key: tuple, x, weight, bias, act, packed) -> str:
    timings = {"aten": float("inf")} if _onednn_available(x) else {"aten": 0.0}
    for name, run in _RUN.items():
        if name == "onednn" and not _onednn_available(x):
            continue
        try:
            run(x, weight, bias, act, packed)  # warm-up (oneDNN creates its primitive here)
            timings[name] = _time(lambda run=run: run(x, weight, bias, act, packed))
        except RuntimeError:  # e.g. oneDNN without bfloat16 support on this CPU
            continue
    best = min(timings, key=timings.get)
    _CHOICES[key] = best
    return best


def linear_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(x @ weight^T + bias)`` for a 2-D contiguous ``x`` (M, K) on the faster provider for its shape (inference
    only: no autograd). ``packed``: :func:`prepack` of ``weight`` (the oneDNN provider reorders it otherwise)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return _aten(x, weight, bias, act, packed)
    key = (x.shape[0], x.shape[1], weight.shape[0], act, x.dtype, x.device.type, torch.get_num_threads())
    provider = _CHOICES.get(key) or _choose(key, x, weight, bias, act, packed)
    return _RUN[provider](x, weight, bias, act, packed)


def choices() -> dict[tuple, str]:
    """The provider chosen for each (M, K, N, activation, dtype, device, threads) seen so far in this process."""
    return dict(_CHOICES)


# ---- act((z * s[b, k]) @ W^T + b): a per-sample input scale (the SE gate before MBConv's projection) -----------------


def _scale_then_gemm(z, s, weight, bias, act, packed):
    z.mul_(s[:, None, :])  # one pass over z (the caller's temporary)
    return linear_act(z.view(-1, z.shape[2]), weight, bias, act, packed).view(z.shape[0], z.shape[1], -1)


def _per_sample_weights(z, s, weight, bias, act, packed):
    # W diag(s_b) per sample: no pass over z, B GEMMs in one baddbmm
    scaled = weight[None, :, :] * s[:, None, :]  # (B, N, K)
    out = (
        torch.baddbmm(bias[None, None, :], z, scaled.transpose(1, 2))
        if bias is not None
        else torch.bmm(z, scaled.transpose(1, 2))
    )
    return _inplace_act(out, act)


_SCALED = {"scale-then-gemm": _scale_then_gemm, "per-sample-weights": _per_sample_weights}


def scaled_linear_act(
    z: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act((z * s[:, None, :]) @ weight^T + bias)`` for ``z`` (B, M, K) contiguous (inference only; ``z`` may be
    overwritten), ``s`` (B, K): either one pass scaling z then one GEMM, or W diag(s_b) per sample in one batched
    GEMM - whichever was faster for this shape (measured at its first call, as :func:`linear_act`)."""
    if z.device.type != "cpu" or torch.compiler.is_compiling():
        return _per_sample_weights(z, s, weight, bias, act, packed)
    key = ("scaled", *z.shape, weight.shape[0], act, z.dtype, torch.get_num_threads())
    provider = _CHOICES.get(key)
    if provider is None:
        timings = {}
        for name, run in _SCALED.items():
            trial = z.clone()
            run(trial, s, weight, bias, act, packed)  # warm-up (and the inner GEMM's own provider choice)
            timings[name] = _time(lambda run=run: run(z.clone(), s, weight, bias, act, packed))
        provider = _CHOICES[key] = min(timings, key=timings.get)
    return _SCALED[provider](z, s, weight, bias, act, packed)
