"""Depthwise k x k conv + LayerNorm over channels (ConvNeXt's block front, Liu et al. 2022) in plain PyTorch: the
``torch`` backend of ``pykernels::dwconv_ln``, the test oracle and the benchmark baseline."""

from __future__ import annotations

import torch

from pykernels._dtypes import compute_dtype

__all__ = ["dwconv_ln", "dwconv_ln_fwd", "dwconv_ln_bwd"]


def dwconv_ln(x, weight, conv_bias, ln_weight, ln_bias, eps: float, dtype: torch.dtype | None = None):
    """``LayerNorm_C(depthwise_conv(x) + conv_bias)`` as (B, H, W, C), computed in ``dtype`` (the oracle: float64).

    x (B, C, H, W) any layout; weight (C, 1, k, k); conv_bias / ln_weight / ln_bias (C,) or None.
    Differentiable (plain torch ops). Returns (out (B, H, W, C), mean (B, H, W), rstd (B, H, W)) in ``dtype``.
    """
    dtype = dtype or compute_dtype(x.dtype)
    channels, k = x.shape[1], weight.shape[-1]
    conv_b = None if conv_bias is None else conv_bias.to(dtype)
    y = torch.nn.functional.conv2d(x.to(dtype), weight.to(dtype), conv_b, padding=k // 2, groups=channels)
    y = y.permute(0, 2, 3, 1)
    mean = y.mean(-1)
    var = (y - mean[..., None]).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    out = (y - mean[..., None]) * rstd[..., None]
    if ln_weight is not None:
        out = out * ln_weight.to(dtype)
    if ln_bias is not None:
        out = out + ln_bias.to(dtype)
    return out, mean, rstd


def dwconv_ln_fwd(x, weight, conv_bias, ln_weight, ln_bias, eps: float):
    """``torch`` backend of ``pykernels::dwconv_ln_fwd`` (contract in csrc/ops.cpp): (out, mean, rstd)."""
    acc = compute_dtype(x.dtype)
    out, mean, rstd = dwconv_ln(x, weight, conv_bias, ln_weight, ln_bias, eps, acc)
    return out.to(x.dtype).contiguous(), mean.contiguous(), rstd.contiguous()


def dwconv_ln_bwd(grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params):
    """``torch`` backend of ``pykernels::dwconv_ln_bwd``: (grad_x, grad_weight, grad_conv_bias, grad_ln_weight,
    grad_ln_bias), explicit math (y recomputed; mean / rstd from the forward)."""
    acc = compute_dtype(x.dtype)
    channels, k = x.shape[1], weight.shape[-1]
    pad = k // 2
    xa, wa = x.to(acc), weight.to(acc)
    y = torch.nn.functional.conv2d(
        xa, wa, None if conv_bias is None else conv_bias.to(acc), padding=pad, groups=channels
    ).permute(0, 2, 3, 1)
    xhat = (y - mean.to(acc)[..., None]) * rstd.to(acc)[..., None]
    g = grad_out.to(acc)
    gw = g * ln_weight.to(acc) if ln_weight is not None else g
    a = gw.mean(-1, keepdim=True)
    b = (gw * xhat).mean(-1, keepdim=True)
    dy = rstd.to(acc)[..., None] * (gw - a - xhat * b)  # (B, H, W, C)
    dy_nchw = dy.permute(0, 3, 1, 2)
    empty = x.new_empty((0,))
    grad_x = empty
    if need_grad_x:
        gx = torch.nn.functional.conv_transpose2d(dy_nchw, wa, padding=pad, groups=channels)
        grad_x = torch.empty_like(x).copy_(gx)
    grads = [empty, empty, empty, empty]
    if need_grad_params:
        gwt = torch.nn.grad.conv2d_weight(xa, wa.shape, dy_nchw, padding=pad, groups=channels)
        grads[0] = gwt.to(weight.dtype).contiguous()
        if conv_bias is not None:
            grads[1] = dy.sum((0, 1, 2)).to(conv_bias.dtype)
        if ln_weight is not None:
            grads[2] = (g * xhat).sum((0, 1, 2)).to(ln_weight.dtype)
        if ln_bias is not None:
            grads[3] = g.sum((0, 1, 2)).to(ln_bias.dtype)
    return (grad_x, *grads)
