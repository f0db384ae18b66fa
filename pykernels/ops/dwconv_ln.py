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
  is an empty (0,) tensor (custom ops cannot return None).
* ``dwconv_ln_fwd`` / ``dwconv_ln_bwd`` - the compiled C++/CUDA kernels (contract and schemas in csrc/ops.cpp),
  given fake implementations here so that they pass ``torch.library.opcheck`` and trace under ``torch.compile``.

Backends (see :mod:`pykernels.backends`): ``cuda`` (csrc/cuda/dwconv_ln.cu), ``triton``
(``pykernels.triton_kernels.dwconv_ln``), ``cpp`` (csrc/cpu/dwconv_ln.cpp), ``torch`` (``pykernels.reference``:
``F.conv2d`` + LayerNorm math in float32 / float64). All four share the signatures of the compiled ops.
On CUDA tensors the automatic order is ``cuda``, ``triton``, ``torch``: the CUDA kernel is written for exactly this
op (a fixed tile of pixels x all channels in shared memory) and has no JIT compile or autotuning on a new shape,
so the first call of each shape (ConvNeXt has four stages, each a new H x W x C) does not stall; Triton is the
choice when the extension was built without its CUDA part. On CPU: ``cpp``, then ``torch``.

Autograd saves x, the conv weight, the three (C,) parameters, mean and rstd - nothing else of size B*H*W*C: the
backward recomputes ``conv(x)`` rather than keeping it (ConvNeXt's activation memory is dominated by such tensors).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from pykernels import backends, reference

SUPPORTED_KERNEL_SIZES = (3, 5, 7, 9, 11, 13)
_NATIVE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})  # triton / cuda; cpp adds float64


# ---- backends ----------------------------------------------------------------------------------------------------


def _kernel_size_check(kernel_size: int | None = None, **_) -> list[str]:
    if kernel_size is not None and kernel_size not in SUPPORTED_KERNEL_SIZES:
        return [
            f"kernel size {kernel_size} not supported by the compiled / Triton dwconv_ln kernels "
            f"(supported: {', '.join(map(str, SUPPORTED_KERNEL_SIZES))})"
        ]
    return []


def _param_dtype_check(dtypes: Sequence[torch.dtype], param_dtypes: Sequence[torch.dtype] = (), **_) -> list[str]:
    x_dtype = dtypes[0]
    allowed = {x_dtype} if x_dtype == torch.float64 else {x_dtype, torch.float32}
    bad = sorted({str(d).replace("torch.", "") for d in param_dtypes if d not in allowed})
    if bad:
        return [
            f"parameter dtype {', '.join(bad)} with {str(x_dtype).replace('torch.', '')} x: the kernels take each "
            "parameter in x's dtype or float32 (float64 x: float64 parameters)"
        ]
    return []


def _compiled_check(**call) -> list[str]:
    return _kernel_size_check(**call) + _param_dtype_check(**call)


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


@functools.cache
def triton_module_status() -> tuple[bool, str]:
    """(``pykernels.triton_kernels.dwconv_ln`` importable, '' or the reason it is not)."""
    try:
        from pykernels.triton_kernels import dwconv_ln  # noqa: F401
    except Exception as exc:
        return False, f"pykernels.triton_kernels.dwconv_ln is not available ({type(exc).__name__}: {exc})"
    return True, ""


def compiled_schema_exists() -> bool:
    """Whether the loaded ``pykernels._C`` defines ``pykernels::dwconv_ln_fwd`` / ``_bwd`` (a build older than
    this op does not)."""
    return (
        backends.extension_status()[0]
        and hasattr(torch.ops.pykernels, "dwconv_ln_fwd")
        and hasattr(torch.ops.pykernels, "dwconv_ln_bwd")
    )


class _DWConvLNOp(backends.Op):
    """:class:`backends.Op` that also says when this op's own Triton module or compiled kernels are missing."""

    def backend_reasons(self, backend: str, device: torch.device | None = None) -> list[str]:
        reasons = super().backend_reasons(backend, device)
        if backend == "triton" and backends.triton_status()[0]:
            ok, why = triton_module_status()
            if not ok:
                reasons.append(why)
        elif backend in ("cpp", "cuda") and backends.extension_status()[0] and not compiled_schema_exists():
            generic = ("pykernels._C has no", "pykernels._C was built without")
            reasons = [r for r in reasons if not r.startswith(generic)]
            reasons.insert(
                0,
                "pykernels._C has no dwconv_ln kernels (built before csrc/ops.cpp defined pykernels::dwconv_ln_fwd); "
                "rebuild it with `pip install --no-build-isolation -e .`",
            )
        return reasons


OP = backends.register_op(
    _DWConvLNOp(
        name="dwconv_ln",
        specs={
            "triton": backends.KernelSpec(
                devices=frozenset({"cuda", "cpu"}), dtypes=_NATIVE_DTYPES, min_capability=(7, 0), check=_triton_check
            ),
            "cuda": backends.KernelSpec(
                devices=frozenset({"cuda"}),
                dtypes=_NATIVE_DTYPES,
                min_capability=(8, 0),
                compiled_op="dwconv_ln_fwd",
                check=_compiled_check,
            ),
            "cpp": backends.KernelSpec(devices=frozenset({"cpu"}), compiled_op="dwconv_ln_fwd", check=_compiled_check),
            "torch": backends.KernelSpec(devices=frozenset({"cpu", "cuda"}), check=_torch_check),
        },
        gpu_priority=("cuda", "triton", "torch"),
        cpu_priority=("cpp", "torch"),
    )
)


def _kernels(backend: str):
    """(fwd, bwd) callables of a backend, all with the signatures of the compiled ops."""
    if backend == "triton":
        from pykernels.triton_kernels import dwconv_ln as triton_dwconv_ln

        return triton_dwconv_ln.dwconv_ln_fwd, triton_dwconv_ln.dwconv_ln_bwd
    if backend in ("cpp", "cuda"):
        return torch.ops.pykernels.dwconv_ln_fwd.default, torch.ops.pykernels.dwconv_ln_bwd.default
    return reference.dwconv_ln_fwd, reference.dwconv_ln_bwd


def select_backend(
    x: torch.Tensor,
    weight: torch.Tensor,
    *params: torch.Tensor | None,
    grad_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> str:
    """The backend that runs dwconv_ln (or its backward, given ``grad_out``) on these tensors."""
    dtypes = [x.dtype] + ([grad_out.dtype] if grad_out is not None else [])
    param_dtypes = tuple(t.dtype for t in (weight, *params) if t is not None)
    return OP.select(x.device, dtypes, backend, kernel_size=int(weight.shape[-1]), param_dtypes=param_dtypes)


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when NCHW- or channels_last-contiguous (the kernels read both through strides), else a
    contiguous (NCHW) copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _distinct(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    """``outputs`` with each one that shares storage with an input or an earlier output, or is a slice of a larger
    buffer, cloned: custom-op outputs may not alias, and their strides / offsets must match the fake's. A launcher
    may hand back views of one buffer (e.g. three (C,) sums of one (3, C) tensor)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    result = []
    for t in outputs:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            part_of_a_buffer = t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size()
            if ptr in seen or part_of_a_buffer:
                t = t.clone(memory_format=torch.preserve_format)
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        result.append(t)
    return tuple(result)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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
    name = select_backend(x, weight, conv_bias, ln_weight, ln_bias, backend=backend)
    if x.numel() == 0:  # empty batch / image: nothing for a kernel to do
        name = "torch"
    fwd, _ = _kernels(name)
    out, mean, rstd = fwd(
        kernel_layout(x), weight.contiguous(), _contiguous(conv_bias), _contiguous(ln_weight), _contiguous(ln_bias),
        float(eps),
    )  # fmt: skip
    # contiguous / distinct: no-ops for kernels that keep the contract
    return _distinct(
        (out.contiguous(), mean.contiguous(), rstd.contiguous()), (x, weight, conv_bias, ln_weight, ln_bias)
    )


@dwconv_ln.register_fake
def _dwconv_ln_fake(x, weight, conv_bias, ln_weight, ln_bias, eps, backend=None):
    batch, channels, height, width = x.shape
    out = x.new_empty((batch, height, width, channels))
    mean = x.new_empty((batch, height, width), dtype=_stat_dtype(x))
    return out, mean, torch.empty_like(mean)


def _dwconv_ln_setup_context(ctx, inputs, output):
    x, weight, conv_bias, ln_weight, ln_bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # an explicit choice (argument, use_backend() block, PYKERNELS_BACKEND) is fixed now, so backward outside a
    # use_backend() block runs on the forward's backend; the automatic choice is made again when backward runs (it
    # picks the same backend). Not the resolved name: torch.compile bakes this string into the backward graph, and
    # its on-disk caches would replay it in a process where other backends are built.
    ctx.explicit_backend = backends.requested_backend(backend)
    ctx.need_grad_x = ctx.needs_input_grad[0]
    ctx.need_grad_params = any(ctx.needs_input_grad[1:5])
    # x, the parameters and two (B, H, W) statistics: the conv output is recomputed in backward, not kept
    ctx.save_for_backward(x, weight, conv_bias, ln_weight, ln_bias, mean, rstd)


def _dwconv_ln_backward(ctx, grad_out, grad_mean, grad_rstd):
    x, weight, conv_bias, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    if not (ctx.need_grad_x or ctx.need_grad_params):
        return None, None, None, None, None, None, None
    grads = dwconv_ln_backward(
        grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, ctx.need_grad_x, ctx.need_grad_params,
        ctx.explicit_backend,
    )  # fmt: skip
    grad_x = grads[0] if ctx.need_grad_x else None
    present = (weight, conv_bias, ln_weight, ln_bias)
    param_grads = [
        g if (p is not None and need) else None for g, p, need in zip(grads[1:], present, ctx.needs_input_grad[1:5])
    ]
    return grad_x, *param_grads, None, None


dwconv_ln.register_autograd(_dwconv_ln_backward, setup_context=_dwconv_ln_setup_context)


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
    dtype. Gradients not asked for, or of a None parameter, are empty (0,) tensors (x's dtype, or the parameter's).
    """
    if (grad_out.dtype == torch.float64) != (x.dtype == torch.float64):  # the kernels: float64 with float64 only
        grad_out = grad_out.to(_stat_dtype(x))
    name = select_backend(x, weight, conv_bias, ln_weight, ln_bias, grad_out=grad_out, backend=backend)
    if x.numel() == 0:
        name = "torch"
    x = kernel_layout(x)
    _, bwd = _kernels(name)
    grads = bwd(
        grad_out.contiguous(), x, weight.contiguous(), _contiguous(conv_bias), _contiguous(ln_weight),
        _contiguous(ln_bias), mean.contiguous(), rstd.contiguous(), need_grad_x, need_grad_params,
    )  # fmt: skip
    # one fresh tensor per output, with the fake's dtype and strides, whatever a kernel gives for "not computed"
    grad_x = grads[0] if need_grad_x else x.new_empty((0,))
    out = [grad_x]
    for grad, param in zip(grads[1:], (weight, conv_bias, ln_weight, ln_bias)):
        if param is None or not need_grad_params:
            out.append(x.new_empty((0,)) if param is None else param.new_empty((0,)))
        else:
            out.append(grad.to(param.dtype).contiguous())
    return _distinct(out, (grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd))


@dwconv_ln_backward.register_fake
def _dwconv_ln_backward_fake(
    grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params, backend=None
):
    x = kernel_layout(x)
    out = [torch.empty_like(x) if need_grad_x else x.new_empty((0,))]
    for param in (weight, conv_bias, ln_weight, ln_bias):
        if param is None:
            out.append(x.new_empty((0,)))
        elif not need_grad_params:
            out.append(param.new_empty((0,)))
        else:
            out.append(torch.empty_like(param, memory_format=torch.contiguous_format))
    return tuple(out)


# ---- fake implementations of the compiled kernels (their schemas live in csrc/ops.cpp) --------------------------


def _register_compiled_fakes() -> None:
    if not compiled_schema_exists():
        return

    @torch.library.register_fake("pykernels::dwconv_ln_fwd")
    def _fwd_fake(x, weight, conv_bias, ln_weight, ln_bias, eps):
        batch, channels, height, width = x.shape
        out = x.new_empty((batch, height, width, channels))
        mean = x.new_empty((batch, height, width), dtype=_stat_dtype(x))
        return out, mean, torch.empty_like(mean)

    @torch.library.register_fake("pykernels::dwconv_ln_bwd")
    def _bwd_fake(grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params):
        # the contract (csrc/ops.cpp) and the torch backend: an empty_like(x) gradient for x; parameter gradients in
        # their parameter's dtype; (0,) tensors of x's dtype for what is not computed
        grad_x = torch.empty_like(x) if need_grad_x else x.new_empty((0,))
        grads = [
            p.new_empty(p.shape) if (p is not None and need_grad_params) else x.new_empty((0,))
            for p in (weight, conv_bias, ln_weight, ln_bias)
        ]
        return (grad_x, *grads)


_register_compiled_fakes()
