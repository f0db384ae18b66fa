"""torch.library ops of DropPath fused with layer-scale and the residual add (stochastic depth, Huang et al. 2016).

Ops (namespace ``pykernels``):

* ``drop_path_add(residual?, branch, scale?, gamma?, channel_dim, out_dtype?, backend?) -> out`` - the
  autograd-aware op behind :func:`pykernels.functional.drop_path_add` and :class:`pykernels.DropPath`:
  ``out = residual + (branch * gamma[c]) * scale[b]``, dispatched to a backend at run time.
* ``drop_path_add_backward(grad_out, branch, scale?, gamma, channel_dim, need_grad_branch, backend?)
  -> (grad_branch, grad_gamma)`` - its backward when ``gamma`` needs a gradient (one fused pass). Without a
  gamma gradient, ``grad_branch`` is the forward op itself applied to ``grad_out``.
* ``drop_path_add_fwd`` / ``drop_path_add_bwd`` - the compiled C++/CUDA kernels (schemas in csrc/ops.cpp),
  given fake implementations here so that they pass ``torch.library.opcheck`` too.

Both public ops are Python custom ops with fake implementations, so ``torch.compile(fullgraph=True)`` sees one
opaque node per op; the backend is chosen inside the op, when it runs (see :mod:`pykernels.backends`).
The mask is not stored: backward keeps ``scale`` (B values), ``gamma`` (C values) and, only when gamma needs a
gradient, ``branch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pykernels import backends, reference
from pykernels.ops._layout import as_dense_rows, conform_rows

# ---- backends ----------------------------------------------------------------------------------------------------


def _native_dtype_check(dtypes: Sequence[torch.dtype], **_) -> list[str]:
    if torch.float64 in dtypes and any(d != torch.float64 for d in dtypes):
        return ["float64 cannot be mixed with other dtypes in the compiled kernels (f16/bf16/f32 mixes, or all f64)"]
    return []


OP = backends.register_op(
    backends.Op(
        name="drop_path_add",
        specs={
            "triton": backends.KernelSpec(devices=frozenset({"cuda", "cpu"}), min_capability=(7, 0)),
            "cuda": backends.KernelSpec(
                devices=frozenset({"cuda"}),
                min_capability=(8, 0),
                compiled_op="drop_path_add_fwd",
                check=_native_dtype_check,
            ),
            "cpp": backends.KernelSpec(
                devices=frozenset({"cpu"}), compiled_op="drop_path_add_fwd", check=_native_dtype_check
            ),
            "torch": backends.KernelSpec(devices=frozenset({"cpu", "cuda"})),
        },
        gpu_priority=("triton", "cuda", "torch"),
        cpu_priority=("cpp", "torch"),
    )
)


def _kernels(backend: str):
    """(fwd, bwd) callables of a backend, all with the signatures of the compiled ops."""
    if backend == "triton":
        from pykernels.triton_kernels import drop_path as triton_drop_path

        return triton_drop_path.drop_path_add_fwd, triton_drop_path.drop_path_add_bwd
    if backend in ("cpp", "cuda"):
        return torch.ops.pykernels.drop_path_add_fwd.default, torch.ops.pykernels.drop_path_add_bwd.default
    return reference.drop_path_add_fwd, reference.drop_path_add_bwd


def select_backend(
    branch: torch.Tensor, *others: torch.Tensor | None, out_dtype: torch.dtype | None = None, backend: str | None = None
) -> str:
    """The backend that runs drop_path_add on these tensors (explicit choice checked, else automatic)."""
    dtypes = [branch.dtype] + [t.dtype for t in others if t is not None] + ([out_dtype] if out_dtype else [])
    return OP.select(branch.device, dtypes, backend)


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
    out_dtype = out_dtype or reference.promote_dtypes(branch, gamma, residual)
    name = select_backend(branch, residual, gamma, out_dtype=out_dtype, backend=backend)
    branch = as_dense_rows(branch)
    if residual is not None:
        residual = conform_rows(residual, branch)
    if scale is not None:
        scale = scale.contiguous()
    if gamma is not None:
        gamma = gamma.contiguous()
    fwd, _ = _kernels(name)
    return fwd(residual, branch, scale, gamma, channel_dim, out_dtype)


@drop_path_add.register_fake
def _drop_path_add_fake(residual, branch, scale, gamma, channel_dim, out_dtype=None, backend=None):
    out_dtype = out_dtype or reference.promote_dtypes(branch, gamma, residual)
    return torch.empty_like(as_dense_rows(branch), dtype=out_dtype)


def _drop_path_add_setup_context(ctx, inputs, output):
    residual, branch, scale, gamma, channel_dim, out_dtype, backend = inputs
    ctx.need_grad_residual = residual is not None and ctx.needs_input_grad[0]
    ctx.need_grad_branch = ctx.needs_input_grad[1]
    ctx.need_grad_gamma = gamma is not None and ctx.needs_input_grad[3]
    # what backward needs: B scale values, C gamma values, and branch only for gamma's gradient
    ctx.save_for_backward(scale, gamma, branch if ctx.need_grad_gamma else None)
    ctx.channel_dim = channel_dim
    ctx.backend = backend
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.branch_dtype = branch.dtype


def _drop_path_add_backward(ctx, grad):
    scale, gamma, branch = ctx.saved_tensors
    grad_residual = grad_branch = grad_gamma = None
    if ctx.need_grad_residual:
        grad_residual = grad if grad.dtype == ctx.residual_dtype else grad.to(ctx.residual_dtype)
    if ctx.need_grad_gamma:
        grad_branch, grad_gamma = drop_path_add_backward(
            grad, branch, scale, gamma, ctx.channel_dim, ctx.need_grad_branch, ctx.backend
        )
        if not ctx.need_grad_branch:
            grad_branch = None
    elif ctx.need_grad_branch:
        # d out / d branch = gamma[c] * scale[b]: the forward op itself (differentiable again: double backward works)
        grad_branch = drop_path_add(None, grad, scale, gamma, ctx.channel_dim, ctx.branch_dtype, ctx.backend)
    return grad_residual, grad_branch, None, grad_gamma, None, None, None


drop_path_add.register_autograd(_drop_path_add_backward, setup_context=_drop_path_add_setup_context)


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
    name = select_backend(grad_out, branch, gamma, backend=backend)
    grad_out = as_dense_rows(grad_out)
    branch = conform_rows(branch, grad_out)
    if scale is not None:
        scale = scale.contiguous()
    _, bwd = _kernels(name)
    return bwd(grad_out, branch, scale, gamma.contiguous(), channel_dim, need_grad_branch)


@drop_path_add_backward.register_fake
def _drop_path_add_backward_fake(grad_out, branch, scale, gamma, channel_dim, need_grad_branch, backend=None):
    if need_grad_branch:
        grad_branch = torch.empty_like(as_dense_rows(grad_out), dtype=branch.dtype)
    else:
        grad_branch = grad_out.new_empty((0,), dtype=branch.dtype)
    return grad_branch, gamma.new_empty((gamma.numel(),))


# ---- fake implementations of the compiled kernels (their schemas live in csrc/ops.cpp) --------------------------


def _register_compiled_fakes() -> None:
    if not backends.extension_status()[0]:
        return

    @torch.library.register_fake("pykernels::drop_path_add_fwd")
    def _fwd_fake(residual, branch, scale, gamma, channel_dim, out_dtype=None):
        out_dtype = out_dtype or reference.promote_dtypes(branch, gamma, residual)
        return torch.empty_like(branch, dtype=out_dtype)

    @torch.library.register_fake("pykernels::drop_path_add_bwd")
    def _bwd_fake(grad_out, branch, scale, gamma, channel_dim, need_grad_branch):
        if need_grad_branch:
            grad_branch = torch.empty_like(grad_out, dtype=branch.dtype)
        else:
            grad_branch = grad_out.new_empty((0,), dtype=branch.dtype)
        return grad_branch, gamma.new_empty((gamma.numel(),))


_register_compiled_fakes()
