"""The transformer / ConvNeXt MLP with its residual epilogue, in plain PyTorch:
``shortcut + drop_path(gamma * fc2(act(fc1(x))))`` over the last dim.

:func:`mlp` is the differentiable formula - the tests' float64 oracle, and what :func:`pykernels.functional.mlp`
runs under ``torch.compile`` (plain ATen ops, which inductor fuses and partitions itself) and where its fused paths
do not apply (autocast, mixed dtypes). ``scale`` is the per-sample DropPath multiplier drawn beforehand
(:func:`pykernels.reference.draw_drop_path_scale`), so both paths apply the same mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTS = ("gelu", "gelu_tanh", "relu", "silu", "none")


def activation(h: torch.Tensor, act: str) -> torch.Tensor:
    """``act(h)`` out of place, for the names of :data:`ACTS` (PyTorch's definitions; gelu is the erf form)."""
    if act == "gelu":
        return F.gelu(h)
    if act == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if act == "relu":
        return F.relu(h)
    if act == "silu":
        return F.silu(h)
    if act == "none":
        return h
    raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTS)}")


def activation_out(h: torch.Tensor, act: str, out: torch.Tensor | None) -> torch.Tensor:
    """``act(h)`` written into ``out`` (a free buffer of h's shape and dtype; None: a new tensor)."""
    if out is None or act == "none":
        return activation(h, act)
    if act in ("gelu", "gelu_tanh"):
        approximate = "none" if act == "gelu" else "tanh"
        return torch.ops.aten.gelu.out(h, approximate=approximate, out=out)
    if act == "relu":
        return torch.clamp_min(h, 0, out=out)
    if act == "silu":
        return torch.ops.aten.silu.out(h, out=out)
    raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTS)}")


def activation_backward(grad: torch.Tensor, h: torch.Tensor, act: str) -> torch.Tensor:
    """``grad * act'(h)`` with ATen's backward kernels, written into ``grad`` (a temporary of the caller's)."""
    if act in ("gelu", "gelu_tanh"):
        approximate = "none" if act == "gelu" else "tanh"
        return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=grad)
    if act == "relu":
        return grad.masked_fill_(h <= 0, 0)
    if act == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=grad)
    if act == "none":
        return grad
    raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTS)}")


def mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    act: str = "gelu",
    gamma: torch.Tensor | None = None,
    shortcut: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
) -> torch.Tensor:
    """``shortcut + scale[b] * (gamma * fc2(act(fc1(LayerNorm(x)))))`` as timm computes it (``(y * gamma) * mask``,
    then the add; the LayerNorm only with ``norm``).

    Args:
        x: ``(..., K)``.
        fc1_weight: ``(H, K)`` (or a 1x1 conv's ``(H, K, 1, 1)``); fc1_bias ``(H,)`` or None.
        fc2_weight: ``(N, H)`` (or ``(N, H, 1, 1)``); fc2_bias ``(N,)`` or None.
        act: one of :data:`ACTS`.
        gamma: ``(N,)`` layer-scale or None.
        shortcut: ``(..., N)`` residual or None.
        scale: ``(B,)`` per-sample DropPath multipliers (B = x.shape[0]) or None.
        norm: ``(weight (K,) or None, bias (K,) or None, eps)`` of a LayerNorm over x's last dim applied first (the
            pre-norm of ViT blocks), or None.

    Returns:
        ``(..., N)``.
    """
    if norm is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm[0], norm[1], norm[2])
    y = F.linear(activation(F.linear(x, fc1_weight.flatten(1), fc1_bias), act), fc2_weight.flatten(1), fc2_bias)
    if gamma is not None:
        y = y * gamma
    if scale is not None:
        y = y * scale.view(-1, *([1] * (y.dim() - 1)))
    return y if shortcut is None else shortcut + y
