"""torch.library ops of DropPath fused with layer-scale and the residual add (stochastic depth, Huang et al. 2016).

Ops (namespace ``pykernels``):

* ``drop_path_add(residual?, branch, scale?, gamma?, channel_dim, out_dtype?, backend?) -> out`` - the
  autograd-aware op behind :func:`pykernels.functional.drop_path_add` and :class:`pykernels.DropPath`:
  ``out = residual + (branch * gamma[c]) * scale[b]``, dispatched to a backend at run time.
* ``drop_path_add_backward(grad_out, branch, scale?, gamma, channel_dim, need_grad_branch, backend?)
  -> (grad_branch, grad_gamma)`` - its backward when ``gamma`` needs a gradient (one fused pass). Without a
  gamma gradient, ``grad_branch`` is the forward op itself applied to ``grad_out``.
* ``drop_path_add_fwd`` / ``drop_path_add_bwd`` - the kernels of every backend (compiled schemas in csrc/ops.cpp).

The mask is not stored: backward keeps ``scale`` (B values), ``gamma`` (C values) and, only when gamma needs a
gradient, ``branch``. The argument rules (what :func:`pykernels.functional.drop_path_add` accepts) are here, once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pykernels import backends
from pykernels._dtypes import promote_dtypes
from pykernels.ops import _eager
from pykernels.ops._layout import as_dense_rows, conform_rows

# ---- argument rules ------------------------------------------------------------------------------------------------

MODES = ("row", "batch")
RNGS = ("bernoulli", "uniform")


def check_drop_args(drop_prob: float, mode: str = "row", rng: str = "bernoulli") -> None:
    """Raise ValueError unless ``drop_prob`` in [0, 1], ``mode`` in :data:`MODES` and ``rng`` in :data:`RNGS`."""
    if not 0.0 <= float(drop_prob) <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
    if mode not in MODES:
        raise ValueError(f"mode must be 'row' (one draw per sample) or 'batch' (one draw per batch), got {mode!r}")
    if rng not in RNGS:
        raise ValueError(f"rng must be 'bernoulli' (timm, torchvision) or 'uniform' (Hugging Face), got {rng!r}")


def check_tensor(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Raise unless ``t`` is a floating-point tensor (on ``like``'s device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but branch is on {like.device}; put them on one device")


def channel_dim(gamma: torch.Tensor, branch: torch.Tensor) -> int:
    """The dim of ``branch`` that a per-channel ``gamma`` scales, by broadcasting rules: (C,) -> last dim,
    (C, 1, 1) or (1, C, 1, 1) -> dim -3 (NCHW). Raises ValueError for any other gamma."""
    if gamma.dim() == 1 and branch.dim() >= 2 and gamma.shape[0] == branch.shape[-1]:
        return branch.dim() - 1  # (C,): the common case, what the general rules below give it
    if gamma.numel() == 1 and 1 <= branch.dim() - gamma.dim() and branch.shape[branch.dim() - gamma.dim()] == 1:
        return branch.dim() - gamma.dim()  # C = 1: (1, 1, 1) is NCHW's (C, 1, 1), not a per-W scale
    if gamma.dim() == branch.dim() == 4 and gamma.shape[0] == 1 and gamma.shape[2:] == (1, 1):
        if gamma.shape[1] == branch.shape[1]:
            return 1  # (1, C, 1, 1), C = 1 included
    shape = list(gamma.shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    trailing = 0
    while len(shape) > 1 and shape[-1] == 1:
        shape.pop()
        trailing += 1
    dim = branch.dim() - 1 - trailing
    if len(shape) != 1 or dim < 1 or branch.shape[dim] != shape[0]:
        raise ValueError(
            f"gamma must be a per-channel layer-scale that broadcasts over one non-batch dim of branch: (C,) for "
            f"channels-last or (B, N, C) tokens, (C, 1, 1) or (1, C, 1, 1) for NCHW; got gamma {tuple(gamma.shape)} "
            f"for branch {tuple(branch.shape)}"
        )
    return dim


# ---- backends ------------------------------------------------------------------------------------------------------


def _native_dtype_check(dtypes: Sequence[torch.dtype], **_) -> list[str]:
    if torch.float64 in dtypes and any(d != torch.float64 for d in dtypes):
        return ["float64 cannot be mixed with other dtypes in the compiled kernels (f16/bf16/f32 mixes, or all f64)"]
    return []


OP = backends.register_op(
    backends.Op(
        name="drop_path_add",
        stem="drop_path",
        specs={
            "triton": backends.KernelSpec(devices=frozenset({"cuda", "cpu"}), min_capability=(7, 0)),
            "cuda": backends.KernelSpec(devices=frozenset({"cuda"}), min_capability=(8, 0), check=_native_dtype_check),
            "cpp": backends.KernelSpec(devices=frozenset({"cpu"}), check=_native_dtype_check),
            "torch": backends.KernelSpec(devices=frozenset({"cpu", "cuda"})),
        },
        gpu_priority=("triton", "cuda", "torch"),
        cpu_priority=("cpp", "torch"),
    )
)


def select_backend(
    branch: torch.Tensor, *others: torch.Tensor | None, out_dtype: torch.dtype | None = None, backend: str | None = None
) -> str:
    """The backend that runs drop_path_add on these tensors (explicit choice checked, else automatic)."""
    dtypes = [branch.dtype]
    for t in others:
        if t is not None:
            dtypes.append(t.dtype)
    if out_dtype:
        dtypes.append(out_dtype)
    return OP.select(branch.device, dtypes, backend)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# ---- tiny CPU tensors: ATen's own arithmetic -----------------------------------------------------------------------

#: The most elements of ``branch`` that the eager routes (``drop_path_add_call``: no autograd, or the op's
#: autograd.Function) compute with ATen's elementwise ops instead of a backend's kernel. Below it the boxed call of a
#: compiled kernel costs more than the two or three passes of ATen's ``mul`` / ``add`` over a few KB; the values are
#: the same bits (see :func:`small_aten`).
SMALL_NUMEL = 4096
_F32, _F64 = torch.float32, torch.float64


def small_aten(residual, branch, scale, gamma, out_dtype=None, backend=None) -> bool:
    """Whether an eager call computes ``residual + (branch * gamma[c]) * scale[b]`` with ATen's ``mul`` / ``add``:
    CPU tensors of at most :data:`SMALL_NUMEL` elements, every tensor (and the output) float32, or every one float64,
    ``branch`` contiguous (or, without a residual, a broadcast scalar such as the gradient of a ``sum()``: contiguous
    output on both paths), and the automatic backend choice in force (an explicit ``backend=`` / ``use_backend`` /
    ``PYKERNELS_BACKEND`` always runs its kernel).

    The result is bit-identical to the ``cpp`` and ``torch`` backends': they compute in the tensors' own dtype there,
    rounding each multiply and add on its own (the extension is built with ``-ffp-contract=off``) in the same order,
    ``(branch * gamma) * scale + residual``, which is what these ATen calls do. Not for the custom op itself, whose
    output strides are its fake's (``torch.compile`` and ``opcheck`` see those)."""
    dtype = branch.dtype
    return (
        (dtype is _F32 or dtype is _F64)
        and (residual is None or residual.dtype is dtype)
        and (gamma is None or gamma.dtype is dtype)
        and (scale is None or scale.dtype is dtype)
        and (out_dtype is None or out_dtype is dtype)
        and branch.numel() <= SMALL_NUMEL
        and branch.is_cpu
        and (branch.is_contiguous() or residual is None and not any(branch.stride()))
        and backends.automatic(backend)
    )


def _aten_fwd(residual, branch, scale, gamma, channel_dim):
    """``residual + (branch * gamma[c]) * scale[b]`` as ATen ops, in the kernels' order (see :func:`small_aten`)."""
    rest = branch.dim() - 1
    if gamma is not None:
        out = torch.mul(branch, gamma if channel_dim == rest else gamma.view((-1,) + (1,) * (rest - channel_dim)))
        if scale is not None:
            out.mul_(scale.view((-1,) + (1,) * rest))
    elif scale is not None:
        out = torch.mul(branch, scale.view((-1,) + (1,) * rest))
    elif residual is not None:
        return torch.add(branch, residual)
    else:
        return branch.clone(memory_format=torch.contiguous_format)
    if residual is not None:
        out.add_(residual)
    return out


# ---- pykernels::drop_path_add (forward, autograd) ---------------------------------------------------------------


@torch.library.custom_op("pykernels::drop_path_add", mutates_args=())
def drop_path_add(
    residual: torch.Tensor | None,
    branch: torch.Tensor,
    scale: torch.Tensor | None,
    gamma: torch.Tensor | None,
    channel_dim: int,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``residual + (branch * gamma[c]) * scale[b]``; see :func:`pykernels.functional.drop_path_add`."""
    return _fwd_body(residual, branch, scale, gamma, channel_dim, out_dtype, backend)


def _fwd_body(residual, branch, scale, gamma, channel_dim, out_dtype=None, backend=None):
    """The body of pykernels::drop_path_add (also run directly by :func:`drop_path_add_call`)."""
    out_dtype = out_dtype or promote_dtypes(branch, gamma, residual)
    fwd, _ = OP.kernels(select_backend(branch, residual, gamma, out_dtype=out_dtype, backend=backend))
    branch = as_dense_rows(branch)
    residual = None if residual is None else conform_rows(residual, branch)
    return fwd(residual, branch, _contiguous(scale), _contiguous(gamma), channel_dim, out_dtype)


def _fwd_fake(residual, branch, scale, gamma, channel_dim, out_dtype=None, backend=None):
    out_dtype = out_dtype or promote_dtypes(branch, gamma, residual)
    return torch.empty_like(as_dense_rows(branch), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    residual, branch, scale, gamma, channel_dim, out_dtype, backend = inputs
    ctx.need_grad_residual = residual is not None and ctx.needs_input_grad[0]
    ctx.need_grad_branch = ctx.needs_input_grad[1]
    ctx.need_grad_gamma = gamma is not None and ctx.needs_input_grad[3]
    # what backward needs: B scale values, C gamma values, and branch only for gamma's gradient
    ctx.save_for_backward(scale, gamma, branch if ctx.need_grad_gamma else None)
    ctx.channel_dim = channel_dim
    # the explicit choice in force now (docs/adding-an-op.md); the automatic one is read without os.environ
    ctx.backend = None if backends.automatic(backend) else backends.requested_backend(backend)
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.branch_dtype = branch.dtype


def _backward(ctx, grad):
    scale, gamma, branch = ctx.saved_tensors
    grad_residual = grad_branch = grad_gamma = None
    if ctx.need_grad_residual:
        grad_residual = grad if grad.dtype == ctx.residual_dtype else grad.to(ctx.residual_dtype)
    if ctx.need_grad_gamma:
        grad_branch, grad_gamma = drop_path_add_backward_call(
            grad, branch, scale, gamma, ctx.channel_dim, ctx.need_grad_branch, ctx.backend
        )
        if not ctx.need_grad_branch:
            grad_branch = None
    elif ctx.need_grad_branch:
        # d out / d branch = gamma[c] * scale[b]: the forward op itself (differentiable again: double backward works)
        grad_branch = drop_path_add_call(None, grad, scale, gamma, ctx.channel_dim, ctx.branch_dtype, ctx.backend)
    return grad_residual, grad_branch, None, grad_gamma, None, None, None


def _fwd_eager(residual, branch, scale, gamma, channel_dim, out_dtype=None, backend=None):
    """The forward of the eager routes: :func:`_fwd_body`, or ATen's arithmetic on tiny tensors (same values)."""
    if small_aten(residual, branch, scale, gamma, out_dtype, backend):
        return _aten_fwd(residual, branch, scale, gamma, channel_dim)
    return _fwd_body(residual, branch, scale, gamma, channel_dim, out_dtype, backend)


drop_path_add.register_fake(_fwd_fake)
drop_path_add.register_autograd(_backward, setup_context=_setup_context)
_DropPathAdd = _eager.autograd_function("_DropPathAdd", _fwd_eager, _setup_context, _backward)


def drop_path_add_call(residual, branch, scale, gamma, channel_dim, out_dtype=None, backend=None) -> torch.Tensor:
    """pykernels::drop_path_add, in eager without the custom-op wrapper when nothing needs it (ops/_eager.py)."""
    route = _eager.route(residual, branch, scale, gamma)
    if route == _eager.DIRECT:
        if small_aten(residual, branch, scale, gamma, out_dtype, backend):
            return _aten_fwd(residual, branch, scale, gamma, channel_dim)
        return _fwd_body(residual, branch, scale, gamma, channel_dim, out_dtype, backend)
    if route == _eager.AUTOGRAD:
        return _DropPathAdd.apply(residual, branch, scale, gamma, channel_dim, out_dtype, backend)
    return drop_path_add(residual, branch, scale, gamma, channel_dim, out_dtype, backend)


# ---- pykernels::drop_path_add_backward --------------------------------------------------------------------------


@torch.library.custom_op("pykernels::drop_path_add_backward", mutates_args=())
def drop_path_add_backward(
    grad_out: torch.Tensor,
    branch: torch.Tensor,
    scale: torch.Tensor | None,
    gamma: torch.Tensor,
    channel_dim: int,
    need_grad_branch: bool,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_branch, grad_gamma) of ``drop_path_add``; grad_branch is an empty (0,) tensor unless need_grad_branch."""
    return _bwd_body(grad_out, branch, scale, gamma, channel_dim, need_grad_branch, backend)


def _bwd_body(grad_out, branch, scale, gamma, channel_dim, need_grad_branch, backend=None):
    """The body of pykernels::drop_path_add_backward."""
    _, bwd = OP.kernels(select_backend(grad_out, branch, gamma, backend=backend))
    grad_out = as_dense_rows(grad_out)
    branch = conform_rows(branch, grad_out)
    return bwd(grad_out, branch, _contiguous(scale), gamma.contiguous(), channel_dim, need_grad_branch)


def _bwd_fake(grad_out, branch, scale, gamma, channel_dim, need_grad_branch, backend=None):
    if need_grad_branch:
        grad_branch = torch.empty_like(as_dense_rows(grad_out), dtype=branch.dtype)
    else:
        grad_branch = grad_out.new_empty((0,), dtype=branch.dtype)
    return grad_branch, gamma.new_empty((gamma.numel(),))


drop_path_add_backward.register_fake(_bwd_fake)


def drop_path_add_backward_call(grad_out, branch, scale, gamma, channel_dim, need_grad_branch, backend=None):
    """pykernels::drop_path_add_backward, in eager without the custom-op wrapper when nothing needs it."""
    if _eager.direct(grad_out, branch, scale, gamma):
        return _bwd_body(grad_out, branch, scale, gamma, channel_dim, need_grad_branch, backend)
    return drop_path_add_backward(grad_out, branch, scale, gamma, channel_dim, need_grad_branch, backend)


OP.register_compiled_fakes(_fwd_fake, _bwd_fake)
