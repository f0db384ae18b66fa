"""torch.library ops of the depthwise k x k conv fused with LayerNorm over channels - the front of ConvNeXt's block
(Liu et al. 2022, "A ConvNet for the 2020s"): ``out = LayerNorm_C(dwconv_kxk(x) + conv_bias)``, one kernel that
convolves a tile of pixels across all channels and normalises them before writing (B, H, W, C).

Ops (namespace ``pykernels``):

* ``dwconv_ln(x, weight, conv_bias?, ln_weight?, ln_bias?, eps, backend?) -> (out, mean, rstd)`` - the
  autograd-aware op behind :func:`pykernels.functional.dwconv_ln` and :class:`pykernels.modules.dwconv_ln.
  DWConvLayerNorm`. ``x`` (B, C, H, W) NCHW- or channels_last-contiguous is read as it is (any other strides: one
  contiguous copy first); ``weight`` (C, 1, k, k), k odd in 3..13, stride 1, zero padding k // 2; ``out``
  (B, H, W, C) contiguous in x's dtype; ``mean`` / ``rstd`` (B, H, W) float32 (float64 for float64 x), not
  differentiable.
* ``dwconv_ln_backward(grad_out, x, weight, conv_bias?, ln_weight?, ln_bias?, mean, rstd, need_grad_x,
  need_grad_params, backend?) -> (grad_x, grad_weight, grad_conv_bias, grad_ln_weight, grad_ln_bias)`` - its
  backward; it recomputes the conv output from x. A gradient that is not asked for (or whose parameter is None)
  is an empty (0,) tensor of x's dtype (custom ops cannot return None).
* ``dwconv_ln_fwd`` / ``dwconv_ln_bwd`` - the kernels of every backend (contract and compiled schemas in
  csrc/ops.cpp).

On CUDA tensors the automatic order is ``cuda``, ``triton``, ``torch``: the CUDA kernel is written for exactly this
op (a fixed tile of pixels x all channels in shared memory) and has no JIT compile or autotuning on a new shape,
so the first call of each shape (ConvNeXt has four stages, each a new H x W x C) does not stall; Triton is the
choice when the extension was built without its CUDA part. On CPU: ``cpp``, then ``torch``.

Autograd saves x, the conv weight, the three (C,) parameters, mean and rstd - nothing else of size B*H*W*C: the
backward recomputes ``conv(x)`` rather than keeping it (ConvNeXt's activation memory is dominated by such tensors).

The argument rules (:func:`check_args`, :func:`kernel_size_reasons`) are here, once; csrc/dwconv_ln_args.h is the
compiled side's copy, and tests/test_dwconv_ln.py proves the two refuse the same calls with the same messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pykernels import backends
from pykernels._dtypes import compute_dtype, dtype_name
from pykernels.ops import _eager
from pykernels.ops._layout import distinct

# ---- argument rules ------------------------------------------------------------------------------------------------

SUPPORTED_KERNEL_SIZES = (3, 5, 7, 9, 11, 13)
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NATIVE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})  # triton / cuda; cpp adds float64


def kernel_size_reasons(kernel_size: int) -> list[str]:
    """Why the kernels cannot take a ``kernel_size`` x ``kernel_size`` depthwise conv (empty: they can)."""
    if kernel_size in SUPPORTED_KERNEL_SIZES:
        return []
    return [
        f"kernel size {kernel_size} not supported: dwconv_ln takes odd k from 3 to 13 "
        f"({', '.join(map(str, SUPPORTED_KERNEL_SIZES))}; stride 1, 'same' zero padding k // 2)"
    ]


def param_dtype_reason(name: str, param_dtype: torch.dtype, x_dtype: torch.dtype) -> str | None:
    """Each parameter is x's dtype or float32; float64 x takes float64 parameters."""
    if param_dtype == x_dtype or (param_dtype == torch.float32 and x_dtype != torch.float64):
        return None
    return (
        f"{name} is {dtype_name(param_dtype)} but x is {dtype_name(x_dtype)}: each parameter must be x's dtype or "
        f"float32 (float32 parameters with bfloat16 / float16 activations; float64 x needs float64 parameters); cast "
        f"one of them"
    )


def check_args(x, weight, conv_bias, ln_weight, ln_bias, eps) -> None:
    """Raise TypeError / ValueError, saying what is supported, unless the arguments are a call dwconv_ln computes."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be torch.Tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor (NCHW or channels_last), got shape {list(x.shape)}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {dtype_name(x.dtype)}")
    channels = x.shape[1]
    if channels == 0:
        raise ValueError("x has 0 channels: LayerNorm over channels needs C >= 1")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x must have H, W >= 1 (a convolution over an empty image), got shape {list(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"weight must be a depthwise conv weight of shape (C, 1, k, k) (nn.Conv2d(C, C, k, groups=C).weight), "
            f"got {list(weight.shape)}"
        )
    if weight.shape[0] != channels:
        raise ValueError(
            f"weight has {weight.shape[0]} channels but x has C = {channels} (x.shape[1]); a depthwise conv weight is "
            f"(C, 1, k, k)"
        )
    reasons = kernel_size_reasons(weight.shape[-1])
    if reasons:
        raise ValueError(reasons[0])
    for name, t in (("weight", weight), ("conv_bias", conv_bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if name != "weight" and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on one device")
        why = param_dtype_reason(name, t.dtype, x.dtype)
        if why:
            raise TypeError(why)
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {float(eps):g}")


# ---- backends ----------------------------------------------------------------------------------------------------


def _compiled_check(dtypes: Sequence[torch.dtype], kernel_size: int | None = None, param_dtypes=(), **_) -> list[str]:
    reasons = [] if kernel_size is None else kernel_size_reasons(kernel_size)
    bad = [d for d in param_dtypes if param_dtype_reason("parameter", d, dtypes[0])]
    if bad:
        reasons.append(
            f"parameter dtype {', '.join(sorted(map(dtype_name, bad)))} with {dtype_name(dtypes[0])} x: the kernels "
            "take each parameter in x's dtype or float32 (float64 x: float64 parameters)"
        )
    return reasons


def _triton_check(device: torch.device, dtypes: Sequence[torch.dtype], **call) -> list[str]:
    reasons = _compiled_check(dtypes=dtypes, **call)
    cap = backends.cuda_capability(device)
    if cap is not None and cap < (8, 0) and torch.bfloat16 in (*dtypes, *call.get("param_dtypes", ())):
        reasons.append(f"bfloat16 needs compute capability >= sm_80 in Triton, device has sm_{cap[0]}{cap[1]}")
    return reasons


def _torch_check(kernel_size: int | None = None, **_) -> list[str]:
    if kernel_size is not None and kernel_size % 2 == 0:
        return [f"kernel size {kernel_size} is even: 'same' zero padding k // 2 needs an odd kernel size"]
    return []


OP = backends.register_op(
    backends.Op(
        name="dwconv_ln",
        specs={
            "triton": backends.KernelSpec(
                devices=frozenset({"cuda", "cpu"}), dtypes=_NATIVE_DTYPES, min_capability=(7, 0), check=_triton_check
            ),
            "cuda": backends.KernelSpec(
                devices=frozenset({"cuda"}), dtypes=_NATIVE_DTYPES, min_capability=(8, 0), check=_compiled_check
            ),
            "cpp": backends.KernelSpec(devices=frozenset({"cpu"}), check=_compiled_check),
            "torch": backends.KernelSpec(devices=frozenset({"cpu", "cuda"}), check=_torch_check),
        },
        gpu_priority=("cuda", "triton", "torch"),
        cpu_priority=("cpp", "torch"),
    )
)


def select_backend(
    x: torch.Tensor,
    weight: torch.Tensor,
    *params: torch.Tensor | None,
    grad_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> str:
    """The backend that runs dwconv_ln (or its backward, given ``grad_out``) on these tensors; an empty x (nothing
    for a kernel to do) runs on ``torch``."""
    dtypes = [x.dtype] + ([grad_out.dtype] if grad_out is not None else [])
    param_dtypes = tuple(t.dtype for t in (weight, *params) if t is not None)
    name = OP.select(x.device, dtypes, backend, kernel_size=int(weight.shape[-1]), param_dtypes=param_dtypes)
    return "torch" if x.numel() == 0 else name


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when NCHW- or channels_last-contiguous (the kernels read both through strides), else a
    contiguous (NCHW) copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# ---- pykernels::dwconv_ln (forward, autograd) ---------------------------------------------------------------------


@torch.library.custom_op("pykernels::dwconv_ln", mutates_args=())
def dwconv_ln(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, W, C), mean (B, H, W), rstd (B, H, W)); see :func:`pykernels.functional.dwconv_ln`."""
    return _fwd_body(x, weight, conv_bias, ln_weight, ln_bias, eps, backend)


def _fwd_body(x, weight, conv_bias, ln_weight, ln_bias, eps, backend=None):
    """The body of pykernels::dwconv_ln (also run directly by :func:`dwconv_ln_call`)."""
    fwd, _ = OP.kernels(select_backend(x, weight, conv_bias, ln_weight, ln_bias, backend=backend))
    out, mean, rstd = fwd(
        kernel_layout(x),
        weight.contiguous(),
        _contiguous(conv_bias),
        _contiguous(ln_weight),
        _contiguous(ln_bias),
        float(eps),
    )
    return distinct((out, mean, rstd), (x, weight, conv_bias, ln_weight, ln_bias))


def _fwd_fake(x, weight, conv_bias, ln_weight, ln_bias, eps, backend=None):
    batch, channels, height, width = x.shape
    out = x.new_empty((batch, height, width, channels))
    mean = x.new_empty((batch, height, width), dtype=compute_dtype(x.dtype))
    return out, mean, torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    x, weight, conv_bias, ln_weight, ln_bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.backend = backends.requested_backend(backend)  # the explicit choice in force now (docs/adding-an-op.md)
    ctx.need_grad_x = ctx.needs_input_grad[0]
    ctx.need_grad_params = any(ctx.needs_input_grad[1:5])
    # x, the parameters and two (B, H, W) statistics: the conv output is recomputed in backward, not kept
    ctx.save_for_backward(x, weight, conv_bias, ln_weight, ln_bias, mean, rstd)


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    x, weight, conv_bias, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    if not (ctx.need_grad_x or ctx.need_grad_params):
        return None, None, None, None, None, None, None
    grads = dwconv_ln_backward_call(
        grad_out,
        x,
        weight,
        conv_bias,
        ln_weight,
        ln_bias,
        mean,
        rstd,
        ctx.need_grad_x,
        ctx.need_grad_params,
        ctx.backend,
    )
    grad_x = grads[0] if ctx.need_grad_x else None
    present = (weight, conv_bias, ln_weight, ln_bias)
    param_grads = [
        g if (p is not None and need) else None for g, p, need in zip(grads[1:], present, ctx.needs_input_grad[1:5])
    ]
    return grad_x, *param_grads, None, None


dwconv_ln.register_fake(_fwd_fake)
dwconv_ln.register_autograd(_backward, setup_context=_setup_context)
_DWConvLN = _eager.autograd_function("_DWConvLN", _fwd_body, _setup_context, _backward)


def dwconv_ln_call(
    x, weight, conv_bias, ln_weight, ln_bias, eps, backend=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pykernels::dwconv_ln, in eager without the custom-op wrapper when nothing needs it (ops/_eager.py)."""
    route = _eager.route(x, weight, conv_bias, ln_weight, ln_bias)
    if route == _eager.DIRECT:
        return _fwd_body(x, weight, conv_bias, ln_weight, ln_bias, eps, backend)
    if route == _eager.AUTOGRAD:
        return _DWConvLN.apply(x, weight, conv_bias, ln_weight, ln_bias, eps, backend)
    return dwconv_ln(x, weight, conv_bias, ln_weight, ln_bias, eps, backend)


# ---- pykernels::dwconv_ln_backward ----------------------------------------------------------------------------------


@torch.library.custom_op("pykernels::dwconv_ln_backward", mutates_args=())
def dwconv_ln_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_grad_x: bool,
    need_grad_params: bool,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_conv_bias, grad_ln_weight, grad_ln_bias) of :func:`dwconv_ln`.

    grad_x has x's kernel layout (NCHW or channels_last) and dtype; each parameter gradient its parameter's shape and
    dtype. Gradients not asked for, or of a None parameter, are empty (0,) tensors of x's dtype.
    """
    return _bwd_body(
        grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params, backend
    )


def _bwd_body(
    grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params, backend=None
):
    """The body of pykernels::dwconv_ln_backward."""
    if (grad_out.dtype == torch.float64) != (x.dtype == torch.float64):  # the kernels: float64 with float64 only
        grad_out = grad_out.to(compute_dtype(x.dtype))
    name = select_backend(x, weight, conv_bias, ln_weight, ln_bias, grad_out=grad_out, backend=backend)
    _, bwd = OP.kernels(name)
    x = kernel_layout(x)
    grads = bwd(
        grad_out.contiguous(),
        x,
        weight.contiguous(),
        _contiguous(conv_bias),
        _contiguous(ln_weight),
        _contiguous(ln_bias),
        mean.contiguous(),
        rstd.contiguous(),
        need_grad_x,
        need_grad_params,
    )
    return distinct(grads, (grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd))


def _bwd_fake(
    grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params, backend=None
):
    # the contract (csrc/ops.cpp): an empty_like(x) gradient for x; parameter gradients in their parameter's shape
    # and dtype; (0,) tensors of x's dtype for what is not computed
    x = kernel_layout(x)
    grad_x = torch.empty_like(x) if need_grad_x else x.new_empty((0,))
    grads = [
        p.new_empty(p.shape) if (p is not None and need_grad_params) else x.new_empty((0,))
        for p in (weight, conv_bias, ln_weight, ln_bias)
    ]
    return (grad_x, *grads)


dwconv_ln_backward.register_fake(_bwd_fake)


def dwconv_ln_backward_call(
    grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params, backend=None
):
    """pykernels::dwconv_ln_backward, in eager without the custom-op wrapper when nothing needs it."""
    args = (grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params, backend)
    if _eager.direct(grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd):
        return _bwd_body(*args)
    return dwconv_ln_backward(*args)


OP.register_compiled_fakes(_fwd_fake, _bwd_fake)
