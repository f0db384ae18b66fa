"""The depthwise stage of an MBConv block (MobileNet-V2 / V3, EfficientNet; Sandler et al. 2018, Tan & Le 2019) in
plain PyTorch: the ``torch`` backend of ``pykernels::mbconv_se``, the test oracle and the benchmark baseline.

``out = act(BatchNorm(depthwise_conv(x) + conv_bias))`` with the SE squeeze (Hu et al. 2018) - the per-(b, c) sums
of ``out`` over the image - from the same values. BatchNorm uses the given running statistics, or (``batch_stats``)
the biased batch statistics of the conv output over (B, out_h, out_w), which it returns. The contract (shapes,
dtypes, padding) is in csrc/ops.cpp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pykernels._dtypes import compute_dtype

__all__ = ["ACTIVATIONS", "activation", "activation_grad", "mbconv_se", "mbconv_se_bwd", "mbconv_se_fwd"]

ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish")


def activation(y: torch.Tensor, act: str) -> torch.Tensor:
    """``act(y)`` for the names of :data:`ACTIVATIONS` (PyTorch's definitions)."""
    if act == "none":
        return y
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return F.relu6(y)
    if act == "silu":
        return F.silu(y)
    if act == "hardswish":
        return F.hardswish(y)
    raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTIVATIONS)}")


def activation_grad(y: torch.Tensor, act: str) -> torch.Tensor:
    """``d act(y) / dy`` as PyTorch's backward kernels compute it (0 at relu's kink, 0 at relu6's 0 and 6, the
    hardswish slope on [-3, 3])."""
    if act == "none":
        return torch.ones_like(y)
    if act == "relu":
        return (y > 0).to(y.dtype)
    if act == "relu6":
        return ((y > 0) & (y < 6)).to(y.dtype)
    if act == "silu":
        sig = torch.sigmoid(y)
        return sig * (1 + y * (1 - sig))
    if act == "hardswish":
        return torch.where(y < -3, torch.zeros_like(y), torch.where(y <= 3, y / 3 + 0.5, torch.ones_like(y)))
    raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTIVATIONS)}")


def _window(x: torch.Tensor, kernel: int, stride: int, pad_t: int, pad_l: int, out_h: int, out_w: int):
    """x zero-padded (or cropped) to exactly the rows / columns the conv reads: [-pad_t, (out_h - 1) * stride + k -
    pad_t) and likewise for columns; a negative pad crops."""
    rows = (out_h - 1) * stride + kernel
    cols = (out_w - 1) * stride + kernel
    pad_b = rows - pad_t - x.shape[2]
    pad_r = cols - pad_l - x.shape[3]
    return F.pad(x, (pad_l, pad_r, pad_t, pad_b))


def _conv(x, weight, conv_bias, stride, pad_t, pad_l, out_h, out_w, dtype):
    """(B, C, out_h, out_w) depthwise conv + conv_bias in ``dtype``."""
    k = weight.shape[-1]
    window = _window(x.to(dtype), k, stride, pad_t, pad_l, out_h, out_w)
    bias = None if conv_bias is None else conv_bias.to(dtype)
    return F.conv2d(window, weight.to(dtype), bias, stride=stride, groups=x.shape[1])


def mbconv_se(
    x,
    weight,
    conv_bias,
    bn_weight,
    bn_bias,
    mean,
    var,
    eps,
    stride,
    pad_t,
    pad_l,
    out_h,
    out_w,
    act,
    batch_stats,
    dtype=None,
):
    """(out (B, out_h, out_w, C), pooled (B, C), mean (C,), var (C,)) computed in ``dtype`` (the oracle: float64),
    differentiable (plain torch ops). ``mean`` / ``var``: the statistics used - the given ones, or the batch's."""
    dtype = dtype or compute_dtype(x.dtype)
    y0 = _conv(x, weight, conv_bias, stride, pad_t, pad_l, out_h, out_w, dtype)
    if batch_stats:
        mean = y0.mean((0, 2, 3))
        var = (y0 - mean[:, None, None]).square().mean((0, 2, 3))
    else:
        mean, var = mean.to(dtype), var.to(dtype)
    y = (y0 - mean[:, None, None]) * torch.rsqrt(var + eps)[:, None, None]
    if bn_weight is not None:
        y = y * bn_weight.to(dtype)[:, None, None]
    if bn_bias is not None:
        y = y + bn_bias.to(dtype)[:, None, None]
    z = activation(y, act)
    return z.permute(0, 2, 3, 1), z.sum((2, 3)), mean, var


def mbconv_se_fwd(
    x,
    weight,
    conv_bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    eps: float,
    stride: int,
    pad_t: int,
    pad_l: int,
    out_h: int,
    out_w: int,
    act: str,
    batch_stats: bool,
):
    """``torch`` backend of ``pykernels::mbconv_se_fwd`` (contract in csrc/ops.cpp)."""
    acc = compute_dtype(x.dtype)
    with torch.no_grad():
        out, pooled, mean, var = mbconv_se(
            x,
            weight,
            conv_bias,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            eps,
            stride,
            pad_t,
            pad_l,
            out_h,
            out_w,
            act,
            batch_stats,
            acc,
        )
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    empty = x.new_empty((0,), dtype=stats)
    return (
        out.to(x.dtype).contiguous(),
        pooled.to(stats).contiguous(),
        mean.to(stats).contiguous() if batch_stats else empty,
        var.to(stats).contiguous() if batch_stats else empty.clone(),
    )


def mbconv_se_bwd(
    grad_out,
    grad_pooled,
    x,
    weight,
    conv_bias,
    bn_weight,
    bn_bias,
    mean,
    var,
    eps: float,
    stride: int,
    pad_t: int,
    pad_l: int,
    act: str,
    batch_stats: bool,
    need_grad_x: bool,
    need_grad_params: bool,
):
    """``torch`` backend of ``pykernels::mbconv_se_bwd``: (grad_x, grad_weight, grad_conv_bias, grad_bn_weight,
    grad_bn_bias), explicit math (the conv recomputed from x)."""
    acc = compute_dtype(x.dtype)
    batch, channels, height, width = x.shape
    out_h, out_w = grad_out.shape[1], grad_out.shape[2]
    k = weight.shape[-1]
    wa = weight.to(acc)
    y0 = _conv(x, weight, conv_bias, stride, pad_t, pad_l, out_h, out_w, acc)
    rstd = torch.rsqrt(var.to(acc) + eps)[:, None, None]
    xhat = (y0 - mean.to(acc)[:, None, None]) * rstd
    gamma = bn_weight.to(acc)[:, None, None] if bn_weight is not None else torch.ones_like(rstd)
    y = xhat * gamma
    if bn_bias is not None:
        y = y + bn_bias.to(acc)[:, None, None]
    g = grad_out.to(acc).permute(0, 3, 1, 2)
    if grad_pooled is not None:
        g = g + grad_pooled.to(acc)[:, :, None, None]
    g = g * activation_grad(y, act)
    sum_g = g.sum((0, 2, 3))
    sum_g_xhat = (g * xhat).sum((0, 2, 3))
    if batch_stats:
        count = batch * out_h * out_w
        dy0 = rstd * gamma * (g - (sum_g / count)[:, None, None] - xhat * (sum_g_xhat / count)[:, None, None])
    else:
        dy0 = rstd * gamma * g
    empty = x.new_empty((0,))
    grad_x = empty
    if need_grad_x:
        window = _window(x, k, stride, pad_t, pad_l, out_h, out_w)
        gw = torch.nn.grad.conv2d_input(window.shape, wa, dy0, stride=stride, groups=channels)
        rows = (out_h - 1) * stride + k
        cols = (out_w - 1) * stride + k
        gx = F.pad(gw, (-pad_l, width + pad_l - cols, -pad_t, height + pad_t - rows))  # undo _window
        grad_x = torch.empty_like(x).copy_(gx)
    grads = [empty.new_empty((0,)) for _ in range(4)]
    if need_grad_params:
        window = _window(x.to(acc), k, stride, pad_t, pad_l, out_h, out_w)
        grads[0] = torch.nn.grad.conv2d_weight(window, wa.shape, dy0, stride=stride, groups=channels)
        grads[0] = grads[0].to(weight.dtype).contiguous()
        if conv_bias is not None:
            grads[1] = dy0.sum((0, 2, 3)).to(conv_bias.dtype)
        if bn_weight is not None:
            grads[2] = sum_g_xhat.to(bn_weight.dtype)
        if bn_bias is not None:
            grads[3] = sum_g.to(bn_bias.dtype)
    return (grad_x, *grads)
