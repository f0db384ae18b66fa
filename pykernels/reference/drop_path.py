"""DropPath fused with layer-scale and the residual add, in plain PyTorch: the ``torch`` backend of
``pykernels::drop_path_add``, the test oracle and the benchmark baseline.

DropPath / stochastic depth comes from "Deep Networks with Stochastic Depth" (Huang et al., 2016); the
per-sample mask is drawn exactly as timm's ``timm.layers.drop_path`` draws it (``bernoulli_(keep_prob)`` on a
``(B, 1, ..., 1)`` tensor of the branch's dtype, then ``div_(keep_prob)``), so that under the same
``torch.manual_seed`` pykernels and timm drop the same samples and scale them by the same value.
"""

from __future__ import annotations

import torch

from pykernels._dtypes import compute_dtype, promote_dtypes

__all__ = [
    "draw_drop_path_scale",
    "drop_path",
    "drop_path_add",
    "drop_path_add_fwd",
    "drop_path_add_bwd",
]


def draw_drop_path_scale(
    batch: int,
    ndim: int,
    drop_prob: float,
    *,
    dtype: torch.dtype,
    device: torch.device,
    scale_by_keep: bool = True,
    mode: str = "row",
    rng: str = "bernoulli",
) -> torch.Tensor:
    """Per-sample DropPath multipliers: ``mask / keep_prob`` (or the bare mask), shape ``(batch,)``.

    Args:
        batch: the batch size B (size of dim 0).
        ndim: number of dims of the tensor the mask is for (the draw uses timm's ``(B, 1, ..., 1)`` shape).
        drop_prob: probability of dropping a sample, in [0, 1].
        dtype, device: of the draw (timm draws in the branch's dtype, on its device).
        scale_by_keep: divide kept samples by ``keep_prob`` (timm default) - not when ``keep_prob == 0``.
        mode: ``"row"`` one draw per sample; ``"batch"`` one draw for the whole batch (torchvision's modes).
        rng: ``"bernoulli"`` - ``empty(shape).bernoulli_(keep_prob)`` as timm and torchvision draw it;
            ``"uniform"`` - ``floor(keep_prob + rand(shape))`` as Hugging Face's and the seeds' ``drop_path`` draw it.

    Returns:
        ``(batch,)`` tensor of ``dtype``: 0 for dropped samples, ``1/keep_prob`` (or 1) for kept ones.
    """
    keep_prob = 1.0 - drop_prob
    shape = (batch,) + (1,) * (ndim - 1) if mode == "row" else (1,) * ndim
    if rng == "bernoulli":
        scale = torch.empty(shape, dtype=dtype, device=device).bernoulli_(keep_prob)
    elif rng == "uniform":
        scale = (keep_prob + torch.rand(shape, dtype=dtype, device=device)).floor_()
    else:
        raise ValueError(f"rng must be 'bernoulli' (timm, torchvision) or 'uniform' (Hugging Face), got {rng!r}")
    if keep_prob > 0.0 and scale_by_keep:
        scale.div_(keep_prob)
    scale = scale.reshape(-1)
    return scale if mode == "row" else scale.expand(batch)  # row: already (batch,)


def drop_path(
    x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> torch.Tensor:
    """timm's ``drop_path`` as eager PyTorch ops (benchmark baseline)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


def _bcast(vec: torch.Tensor | None, like: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Reshape a per-``dim`` vector (C,) or per-sample vector (B,) to broadcast against ``like``."""
    if vec is None:
        return None
    shape = [1] * like.dim()
    shape[dim] = -1
    return vec.reshape(shape)


def drop_path_add(
    residual: torch.Tensor | None,
    branch: torch.Tensor,
    scale: torch.Tensor | None,
    gamma: torch.Tensor | None,
    channel_dim: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``residual + (branch * gamma[c]) * scale[b]`` computed in ``dtype`` (the oracle; float64 in tests)."""
    dtype = dtype or compute_dtype(*(t.dtype for t in (residual, branch, gamma) if t is not None))
    out = branch.to(dtype)
    if gamma is not None:
        out = out * _bcast(gamma.to(dtype), branch, channel_dim)
    if scale is not None:
        out = out * _bcast(scale.to(dtype), branch, 0)
    if residual is not None:
        out = out + residual.to(dtype)
    return out


# ---- the `torch` backend: same signatures as the compiled and Triton kernels ------------------------------------


def drop_path_add_fwd(residual, branch, scale, gamma, channel_dim: int, out_dtype: torch.dtype | None = None):
    """``torch`` backend of ``pykernels::drop_path_add_fwd`` (see csrc/ops.cpp for the contract)."""
    out_dtype = out_dtype or promote_dtypes(branch, gamma, residual)
    acc = compute_dtype(branch.dtype, out_dtype, *(t.dtype for t in (residual, gamma) if t is not None))
    out = torch.empty_like(branch, dtype=out_dtype)
    return out.copy_(drop_path_add(residual, branch, scale, gamma, channel_dim, acc))


def drop_path_add_bwd(grad_out, branch, scale, gamma, channel_dim: int, need_grad_branch: bool):
    """``torch`` backend of ``pykernels::drop_path_add_bwd``: (grad_branch, grad_gamma)."""
    acc = compute_dtype(grad_out.dtype, branch.dtype, gamma.dtype)
    g = grad_out.to(acc)
    if scale is not None:
        g = g * _bcast(scale.to(acc), g, 0)
    reduce_dims = [d for d in range(g.dim()) if d != channel_dim]
    grad_gamma = (g * branch.to(acc)).sum(reduce_dims).to(gamma.dtype)
    if need_grad_branch:
        grad_branch = torch.empty_like(grad_out, dtype=branch.dtype)
        grad_branch.copy_(drop_path_add(None, grad_out, scale, gamma, channel_dim, acc))
    else:
        grad_branch = grad_out.new_empty((0,), dtype=branch.dtype)
    return grad_branch, grad_gamma
