"""torch.library ops of the depthwise stage of an MBConv block (MobileNet-V2 / V3, Sandler et al. 2018, Howard et al.
2019; EfficientNet, Tan & Le 2019) with the squeeze of its squeeze-excitation layer (Hu et al. 2018):
``out = act(BatchNorm(depthwise_conv(x) + conv_bias))`` and ``pooled = out.sum((H, W))`` from the same pass, so the
SE layer never reads the expanded activation again.

Ops (namespace ``pykernels``):

* ``mbconv_se(x, weight, conv_bias?, bn_weight?, bn_bias?, running_mean?, running_var?, eps, stride, pad_t, pad_l,
  out_h, out_w, act, batch_stats, backend?) -> (out, pooled, mean, var)`` - the autograd-aware op behind
  :func:`pykernels.functional.mbconv_se` and :class:`pykernels.FusedMBConvSE`. ``x`` (B, C, H, W) NCHW- or
  channels_last-contiguous is read as it is; ``out`` is (B, out_h, out_w, C) contiguous (the channels-last input of
  the projection), ``pooled`` (B, C) float32 sums (differentiable), ``mean`` / ``var`` the batch statistics
  (``batch_stats``; not differentiable: their gradient is part of the op's backward) or (0,).
* ``mbconv_se_backward(...)`` - its backward; it recomputes the conv from x.
* ``mbconv_se_fwd`` / ``mbconv_se_bwd`` - the kernels of every backend (contract in csrc/ops.cpp).

Autograd saves x, the parameters and the (C,) statistics used: nothing else of activation size (eager saves the
conv output, the BatchNorm output and the activation output).

Argument rules: :func:`check_args`, once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pykernels import backends
from pykernels._dtypes import compute_dtype, dtype_name
from pykernels.ops import _eager
from pykernels.ops._layout import distinct
from pykernels.reference.mbconv_se import ACTIVATIONS

# ---- argument rules ------------------------------------------------------------------------------------------------

SUPPORTED_KERNEL_SIZES = (3, 5, 7)
SUPPORTED_STRIDES = (1, 2)
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NATIVE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})  # triton / cuda; cpp adds float64


def kernel_size_reasons(kernel_size) -> list[str]:
    """Why the kernels cannot take a ``kernel_size`` depthwise conv (empty: they can)."""
    if kernel_size in SUPPORTED_KERNEL_SIZES:
        return []
    return [f"kernel size {kernel_size} not supported: mbconv_se takes k in {{3, 5, 7}} (square, dilation 1)"]


def stride_reasons(stride) -> list[str]:
    if stride in SUPPORTED_STRIDES:
        return []
    return [f"stride {stride} not supported: mbconv_se takes stride 1 or 2 (the same along H and W)"]


def activation_reasons(act) -> list[str]:
    if act in ACTIVATIONS:
        return []
    return [f"activation {act!r} not supported: mbconv_se takes {', '.join(ACTIVATIONS)}"]


def output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    """Output length of a conv over ``size`` inputs padded by ``pad_before`` / ``pad_after``."""
    return (size + pad_before + pad_after - kernel) // stride + 1


def _param_dtype_reason(name: str, param_dtype: torch.dtype, x_dtype: torch.dtype) -> str | None:
    if param_dtype == x_dtype or (param_dtype == torch.float32 and x_dtype != torch.float64):
        return None
    return (
        f"{name} is {dtype_name(param_dtype)} but x is {dtype_name(x_dtype)}: each parameter must be x's dtype or "
        f"float32 (float64 x needs float64 parameters)"
    )


def check_args(
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
) -> None:
    """Raise TypeError / ValueError, saying what is supported, unless the arguments are a call mbconv_se computes."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be torch.Tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor (NCHW or channels_last), got shape {list(x.shape)}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {dtype_name(x.dtype)}")
    batch, channels, height, width = x.shape
    if channels == 0 or height == 0 or width == 0:
        raise ValueError(f"x must have C, H, W >= 1, got shape {list(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"weight must be a depthwise conv weight of shape (C, 1, k, k) (nn.Conv2d(C, C, k, groups=C).weight), "
            f"got {list(weight.shape)}"
        )
    if weight.shape[0] != channels:
        raise ValueError(f"weight has {weight.shape[0]} channels but x has C = {channels} (x.shape[1])")
    kernel = weight.shape[-1]
    reasons = kernel_size_reasons(kernel) + stride_reasons(stride) + activation_reasons(act)
    if reasons:
        raise ValueError(reasons[0])
    for name, pad, size, out in (("top", pad_t, height, out_h), ("left", pad_l, width, out_w)):
        if not 0 <= pad < kernel:
            raise ValueError(f"padding {name} = {pad} must be in [0, k) = [0, {kernel})")
        if out < 1 or (out - 1) * stride - pad >= size:
            raise ValueError(
                f"output size {out} along {'H' if name == 'top' else 'W'} does not fit the input ({size}) with stride "
                f"{stride} and padding {name} {pad}: every output window must start inside the image"
            )
    params = (
        ("conv_bias", conv_bias),
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    )
    for name, t in (("weight", weight), *params):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if name != "weight" and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on one device")
        why = _param_dtype_reason(name, t.dtype, x.dtype)
        if why:
            raise TypeError(why)
    if not batch_stats and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are needed unless batch_stats=True (BatchNorm in training)")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {float(eps):g}")


# ---- backends ------------------------------------------------------------------------------------------------------


def _compiled_check(dtypes: Sequence[torch.dtype], param_dtypes=(), **_) -> list[str]:
    bad = [d for d in param_dtypes if _param_dtype_reason("parameter", d, dtypes[0])]
    if bad:
        return [
            f"parameter dtype {', '.join(sorted(map(dtype_name, bad)))} with {dtype_name(dtypes[0])} x: the kernels "
            "take each parameter in x's dtype or float32 (float64 x: float64 parameters)"
        ]
    return []


OP = backends.register_op(
    backends.Op(
        name="mbconv_se",
        specs={
            "triton": backends.KernelSpec(
                devices=frozenset({"cuda", "cpu"}), dtypes=_NATIVE_DTYPES, min_capability=(8, 0), check=_compiled_check
            ),
            "cuda": backends.KernelSpec(
                devices=frozenset({"cuda"}), dtypes=_NATIVE_DTYPES, min_capability=(8, 0), check=_compiled_check
            ),
            "cpp": backends.KernelSpec(devices=frozenset({"cpu"}), check=_compiled_check),
            "torch": backends.KernelSpec(devices=frozenset({"cpu", "cuda"})),
        },
        gpu_priority=("cuda", "triton", "torch"),
        cpu_priority=("cpp", "torch"),
    )
)


def select_backend(x: torch.Tensor, *params: torch.Tensor | None, backend: str | None = None) -> str:
    """The backend that runs mbconv_se on these tensors; an empty batch runs on ``torch``."""
    param_dtypes = tuple(t.dtype for t in params if t is not None)
    name = OP.select(x.device, [x.dtype], backend, param_dtypes=param_dtypes)
    return "torch" if x.numel() == 0 else name


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when NCHW- or channels_last-contiguous (the kernels read both), else a channels_last copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return compute_dtype(x.dtype)


# ---- pykernels::mbconv_se (forward, autograd) -----------------------------------------------------------------------


@torch.library.custom_op("pykernels::mbconv_se", mutates_args=())
def mbconv_se(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    stride: int,
    pad_t: int,
    pad_l: int,
    out_h: int,
    out_w: int,
    act: str,
    batch_stats: bool,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, out_h, out_w, C), pooled (B, C), mean, var); see :func:`pykernels.functional.mbconv_se`."""
    return _fwd_body(
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
        backend,
    )


def _fwd_body(
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
    backend=None,
):
    """The body of pykernels::mbconv_se (also run directly by :func:`mbconv_se_call`)."""
    params = (weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
    fwd, _ = OP.kernels(select_backend(x, *params, backend=backend))
    outputs = fwd(
        kernel_layout(x),
        weight.contiguous(),
        *(_contiguous(t) for t in params[1:]),
        float(eps),
        stride,
        pad_t,
        pad_l,
        out_h,
        out_w,
        act,
        batch_stats,
    )
    return distinct(outputs, (x, *params))


def _fwd_fake(
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
    backend=None,
):
    batch, channels = x.shape[:2]
    out = x.new_empty((batch, out_h, out_w, channels))
    stats = _stat_dtype(x)
    pooled = x.new_empty((batch, channels), dtype=stats)
    mean = x.new_empty((channels,) if batch_stats else (0,), dtype=stats)
    return out, pooled, mean, torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, pad_t, pad_l, *_ = inputs
    act, batch_stats, backend = inputs[13], inputs[14], inputs[15]
    _, _, batch_mean, batch_var = output
    ctx.mark_non_differentiable(batch_mean, batch_var)
    ctx.backend = backends.requested_backend(backend)  # the explicit choice in force now (docs/adding-an-op.md)
    ctx.args = (float(eps), stride, pad_t, pad_l, act, batch_stats)
    ctx.need_grad_x = ctx.needs_input_grad[0]
    ctx.need_grad_params = any(ctx.needs_input_grad[1:5])
    # the statistics the forward used; running ones cloned (C values): a later training step updates them in place
    mean, var = (batch_mean, batch_var) if batch_stats else (running_mean.clone(), running_var.clone())
    ctx.save_for_backward(x, weight, conv_bias, bn_weight, bn_bias, mean, var)


def _backward(ctx, grad_out, grad_pooled, grad_mean, grad_var):
    x, weight, conv_bias, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    none = (None,) * 16
    if not (ctx.need_grad_x or ctx.need_grad_params):
        return none
    eps, stride, pad_t, pad_l, act, batch_stats = ctx.args
    grads = mbconv_se_backward_call(
        grad_out,
        grad_pooled,
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
        act,
        batch_stats,
        ctx.need_grad_x,
        ctx.need_grad_params,
        ctx.backend,
    )
    grad_x = grads[0] if ctx.need_grad_x else None
    present = (weight, conv_bias, bn_weight, bn_bias)
    param_grads = [
        g if (p is not None and need) else None for g, p, need in zip(grads[1:], present, ctx.needs_input_grad[1:5])
    ]
    return grad_x, *param_grads, *none[5:]


mbconv_se.register_fake(_fwd_fake)
mbconv_se.register_autograd(_backward, setup_context=_setup_context)
_MBConvSE = _eager.autograd_function("_MBConvSE", _fwd_body, _setup_context, _backward)


def mbconv_se_call(
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
    backend=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """pykernels::mbconv_se, in eager without the custom-op wrapper when nothing needs it (ops/_eager.py)."""
    args = (
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
        backend,
    )
    route = _eager.route(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
    if route == _eager.DIRECT:
        return _fwd_body(*args)
    if route == _eager.AUTOGRAD:
        return _MBConvSE.apply(*args)
    return mbconv_se(*args)


# ---- pykernels::mbconv_se_backward ----------------------------------------------------------------------------------


@torch.library.custom_op("pykernels::mbconv_se_backward", mutates_args=())
def mbconv_se_backward(
    grad_out: torch.Tensor,
    grad_pooled: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    stride: int,
    pad_t: int,
    pad_l: int,
    act: str,
    batch_stats: bool,
    need_grad_x: bool,
    need_grad_params: bool,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias) of :func:`mbconv_se` (contract in
    csrc/ops.cpp)."""
    return _bwd_body(
        grad_out,
        grad_pooled,
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
        act,
        batch_stats,
        need_grad_x,
        need_grad_params,
        backend,
    )


def _bwd_body(
    grad_out,
    grad_pooled,
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
    act,
    batch_stats,
    need_grad_x,
    need_grad_params,
    backend=None,
):
    """The body of pykernels::mbconv_se_backward."""
    if (grad_out.dtype == torch.float64) != (x.dtype == torch.float64):  # the kernels: float64 with float64 only
        grad_out = grad_out.to(_stat_dtype(x))
    if grad_pooled is not None:
        grad_pooled = grad_pooled.to(_stat_dtype(x)).contiguous()
    params = (weight, conv_bias, bn_weight, bn_bias)
    _, bwd = OP.kernels(select_backend(x, *params, backend=backend))
    x = kernel_layout(x)
    grads = bwd(
        grad_out.contiguous(),
        grad_pooled,
        x,
        weight.contiguous(),
        *(_contiguous(t) for t in params[1:]),
        mean.contiguous(),
        var.contiguous(),
        eps,
        stride,
        pad_t,
        pad_l,
        act,
        batch_stats,
        need_grad_x,
        need_grad_params,
    )
    return distinct(grads, (grad_out, grad_pooled, x, *params, mean, var))


def _bwd_fake(
    grad_out,
    grad_pooled,
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
    act,
    batch_stats,
    need_grad_x,
    need_grad_params,
    backend=None,
):
    x = kernel_layout(x)
    grad_x = torch.empty_like(x) if need_grad_x else x.new_empty((0,))
    grads = [
        p.new_empty(p.shape) if (p is not None and need_grad_params) else x.new_empty((0,))
        for p in (weight, conv_bias, bn_weight, bn_bias)
    ]
    return (grad_x, *grads)


mbconv_se_backward.register_fake(_bwd_fake)


def mbconv_se_backward_call(
    grad_out,
    grad_pooled,
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
    act,
    batch_stats,
    need_grad_x,
    need_grad_params,
    backend=None,
):
    """pykernels::mbconv_se_backward, in eager without the custom-op wrapper when nothing needs it."""
    args = (
        grad_out,
        grad_pooled,
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
        act,
        batch_stats,
        need_grad_x,
        need_grad_params,
        backend,
    )
    if _eager.direct(grad_out, grad_pooled, x, weight, conv_bias, bn_weight, bn_bias, mean, var):
        return _bwd_body(*args)
    return mbconv_se_backward(*args)


OP.register_compiled_fakes(_fwd_fake, _bwd_fake)
