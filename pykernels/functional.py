"""Public functions of pykernels.

:func:`dwconv_ln` is the front of ConvNeXt's block (Liu et al. 2022, "A ConvNet for the 2020s"): a depthwise
k x k conv followed by LayerNorm over channels, fused into one kernel that writes (B, H, W, C).

DropPath (stochastic depth, Huang et al. 2016, "Deep Networks with Stochastic Depth") as used by timm, torchvision
and Hugging Face in ConvNeXt, ViT/DeiT, Swin and EfficientNet: each sample's residual branch is dropped with
probability ``drop_prob`` and kept samples are scaled by ``1 / keep_prob``. :func:`drop_path_add` fuses it with
layer-scale (CaiT / ConvNeXt's ``gamma``) and the residual add into one pass over memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pykernels import reference
from pykernels.ops import drop_path as _drop_path_ops
from pykernels.ops import dwconv_ln as _dwconv_ln_ops

__all__ = ["drop_path", "drop_path_add", "drop_path_branch", "dwconv_ln"]

_RNGS = ("bernoulli", "uniform")
_MODES = ("row", "batch")


def _check_drop_args(drop_prob: float, mode: str, rng: str) -> None:
    if not 0.0 <= float(drop_prob) <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'row' (one draw per sample) or 'batch' (one draw per batch), got {mode!r}")
    if rng not in _RNGS:
        raise ValueError(f"rng must be 'bernoulli' (timm, torchvision) or 'uniform' (Hugging Face), got {rng!r}")


def _check_tensor(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but branch is on {like.device}; put them on one device")


def _channel_dim(gamma: torch.Tensor, branch: torch.Tensor) -> int:
    """The dim of ``branch`` that a per-channel ``gamma`` scales, by broadcasting rules: (C,) -> last dim,
    (C, 1, 1) or (1, C, 1, 1) -> dim -3 (NCHW)."""
    if gamma.numel() == 1 and 1 <= branch.dim() - gamma.dim() and branch.shape[branch.dim() - gamma.dim()] == 1:
        return branch.dim() - gamma.dim()  # C = 1: (1, 1, 1) is NCHW's (C, 1, 1), not a per-W scale
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
            f"channels-last or (B, N, C) tokens, (C, 1, 1) for NCHW; got gamma {tuple(gamma.shape)} for branch "
            f"{tuple(branch.shape)}"
        )
    return dim


def _draw(branch: torch.Tensor, gamma, drop_prob, training, scale_by_keep, mode, rng) -> torch.Tensor | None:
    """Per-sample scale (B,), or None when nothing is dropped (eval or drop_prob == 0: no RNG is drawn)."""
    if not training or drop_prob == 0.0:
        return None
    dtype = reference.promote_dtypes(branch, gamma)  # timm draws in the dtype of gamma * branch
    return reference.draw_drop_path_scale(
        branch.shape[0], branch.dim(), drop_prob, dtype=dtype, device=branch.device,
        scale_by_keep=scale_by_keep, mode=mode, rng=rng,
    )  # fmt: skip


def drop_path_add(
    residual: torch.Tensor,
    branch: torch.Tensor,
    drop_prob: float = 0.0,
    gamma: torch.Tensor | None = None,
    training: bool = True,
    scale_by_keep: bool = True,
    backend: str | None = None,
    *,
    mode: str = "row",
    rng: str = "bernoulli",
) -> torch.Tensor:
    """``residual + drop_path(gamma * branch)`` in one pass (forward and backward).

    Equals timm's ``shortcut + DropPath(drop_prob)(branch * gamma)`` - the same mask for the same
    ``torch.manual_seed``, bit-identical in float32 - while reading each input once and storing only the
    per-sample scale (B values) for backward.

    Args:
        residual: the shortcut, shape ``(B, ...)`` - NCHW, channels-last or (B, N, C) tokens, any float dtype.
        branch: the residual branch's output, same shape as ``residual``.
        drop_prob: probability of dropping a sample's branch, in [0, 1]. 1 drops every branch (no division by 0).
        gamma: optional per-channel layer-scale: ``(C,)`` scales the last dim (channels-last, tokens),
            ``(C, 1, 1)`` (or ``(1, C, 1, 1)``) the channel dim of NCHW tensors. Gets a gradient.
        training: when False (or ``drop_prob == 0``) nothing is dropped and no random number is drawn.
        scale_by_keep: divide kept samples by ``keep_prob`` (timm's default).
        backend: ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``; None chooses (see :mod:`pykernels.backends`).
        mode: ``"row"`` drops per sample; ``"batch"`` drops the whole batch at once (torchvision's mode).
        rng: ``"bernoulli"`` draws as timm/torchvision do; ``"uniform"`` as Hugging Face's ``drop_path`` does.

    Returns:
        ``(B, ...)`` tensor, dtype ``promote_types(residual, branch, gamma)``, in branch's memory layout.
    """
    _check_tensor("branch", branch)
    _check_tensor("residual", residual, branch)
    if residual.shape != branch.shape:
        raise ValueError(
            f"residual and branch must have the same shape, got {tuple(residual.shape)} and {tuple(branch.shape)}"
        )
    if branch.dim() < 2:
        raise ValueError(f"branch must have a batch dim and at least one more dim, got shape {tuple(branch.shape)}")
    _check_drop_args(drop_prob, mode, rng)
    if gamma is not None:
        _check_tensor("gamma", gamma, branch)
        _channel_dim(gamma, branch)  # a bad gamma fails before any random number is drawn
    scale = _draw(branch, gamma, drop_prob, training, scale_by_keep, mode, rng)
    return _fused(residual, branch, scale, gamma, backend)


def drop_path(
    x: torch.Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    backend: str | None = None,
    *,
    mode: str = "row",
    rng: str = "bernoulli",
) -> torch.Tensor:
    """timm's ``drop_path``: ``x * mask[b] / keep_prob``; returns ``x`` itself when not training or drop_prob == 0.

    Args:
        x: ``(B, ...)`` float tensor, any layout.
        drop_prob, training, scale_by_keep, backend, mode, rng: as in :func:`drop_path_add`
            (note ``training=False`` by default, as in timm).

    Returns:
        ``(B, ...)`` tensor of x's dtype.
    """
    _check_tensor("x", x)
    _check_drop_args(drop_prob, mode, rng)
    scale = _draw(x, None, drop_prob, training, scale_by_keep, mode, rng)
    if scale is None:
        return x
    return _drop_path_ops.drop_path_add(None, x, scale, None, 1, None, backend)


def drop_path_branch(
    x: torch.Tensor,
    branch_fn: Callable[[torch.Tensor], torch.Tensor],
    drop_prob: float = 0.0,
    gamma: torch.Tensor | None = None,
    training: bool = True,
    scale_by_keep: bool = True,
    backend: str | None = None,
    *,
    rng: str = "bernoulli",
) -> torch.Tensor:
    """``x + drop_path(gamma * branch_fn(x))`` that runs ``branch_fn`` only on the samples it keeps.

    Stochastic depth that saves compute: with ``drop_prob=0.2`` a block's branch runs on ~80% of the batch,
    forward and backward. The mask is the one :func:`drop_path_add` would draw under the same seed when
    ``branch_fn`` keeps x's dtype (the draw happens before the branch runs, in ``promote_types(x, gamma)``).

    Exact when ``branch_fn`` treats samples independently (LayerNorm-based blocks: ConvNeXt, ViT, Swin), up to
    the float rounding of a smaller batch. **Not** exact for branches that mix samples - BatchNorm in training
    mode (MBConv / EfficientNet) normalises with the statistics of the kept sub-batch instead of the whole batch.
    The number of kept samples is data-dependent: under ``torch.compile`` this is a graph break.

    Args:
        x: ``(B, ...)`` input of the block, also the residual.
        branch_fn: the residual branch, mapping ``(b, ...)`` to ``(b, ...)`` of the same shape as its input.
        drop_prob, gamma, training, scale_by_keep, backend, rng: as in :func:`drop_path_add` (row mode).

    Returns:
        ``(B, ...)`` tensor, dtype ``promote_types(x, branch output, gamma)``.
    """
    _check_tensor("x", x)
    _check_drop_args(drop_prob, "row", rng)
    if not training or drop_prob == 0.0:
        return drop_path_add(x, branch_fn(x), 0.0, gamma, training=False, backend=backend)
    scale = _draw(x, gamma, drop_prob, training, scale_by_keep, "row", rng)
    kept = scale.nonzero().squeeze(1)
    if kept.numel() == x.shape[0]:
        return _fused(x, branch_fn(x), scale, gamma, backend)
    if kept.numel() == 0:  # nothing runs; the dtype is still what the fused add would give (branch dtype unknown)
        return x.to(reference.promote_dtypes(x, gamma), copy=True)
    x_kept = x.index_select(0, kept)
    out_kept = _fused(x_kept, branch_fn(x_kept), scale.index_select(0, kept), gamma, backend)
    return x.to(out_kept.dtype).index_copy(0, kept, out_kept)


def _fused(residual, branch, scale, gamma, backend):
    if residual.shape != branch.shape:
        raise ValueError(
            f"branch_fn must keep the shape of its input: {tuple(residual.shape)} -> {tuple(branch.shape)}"
        )
    channel_dim = 1
    if gamma is not None:
        channel_dim = _channel_dim(gamma, branch)
        gamma = gamma.reshape(-1)
    return _drop_path_ops.drop_path_add(residual, branch, scale, gamma, channel_dim, None, backend)


# ---- dwconv_ln ---------------------------------------------------------------------------------------------------

_OUT_LAYOUTS = ("nhwc", "nchw")
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_dwconv_ln_args(x, weight, conv_bias, ln_weight, ln_bias, eps, out_layout) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be torch.Tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor (NCHW or channels_last), got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    channels = x.shape[1]
    if channels == 0:
        raise ValueError("x has 0 channels: LayerNorm over channels needs C >= 1")
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"weight must be a depthwise conv weight of shape (C, 1, k, k) (nn.Conv2d(C, C, k, groups=C).weight), "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] != channels:
        raise ValueError(
            f"weight has {weight.shape[0]} channels but x has C = {channels} (x.shape[1]); a depthwise conv weight is "
            f"(C, 1, k, k)"
        )
    k = weight.shape[-1]
    if k % 2 == 0 or k not in _dwconv_ln_ops.SUPPORTED_KERNEL_SIZES:
        raise ValueError(
            f"kernel size {k} not supported: dwconv_ln takes odd k from 3 to 13 "
            f"({', '.join(map(str, _dwconv_ln_ops.SUPPORTED_KERNEL_SIZES))}; stride 1, 'same' zero padding k // 2)"
        )
    for name, t in (("weight", weight), ("conv_bias", conv_bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if name != "weight" and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on one device")
        if t.dtype != x.dtype and (t.dtype != torch.float32 or x.dtype == torch.float64):
            raise TypeError(
                f"{name} is {_dtype_name(t.dtype)} but x is {_dtype_name(x.dtype)}: each parameter must be x's dtype "
                f"or float32 (float32 parameters with bfloat16 / float16 activations; float64 x needs float64 "
                f"parameters); cast one of them"
            )
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if out_layout not in _OUT_LAYOUTS:
        raise ValueError(f"out_layout must be 'nhwc' ((B, H, W, C)) or 'nchw' ((B, C, H, W) view), got {out_layout!r}")


def dwconv_ln(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_layout: str = "nhwc",
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm_C(depthwise_conv_kxk(x) + conv_bias)`` in one kernel: ConvNeXt's ``dwconv -> permute -> norm``.

    Equals ``F.layer_norm(F.conv2d(x, weight, conv_bias, padding=k // 2, groups=C).permute(0, 2, 3, 1), (C,),
    ln_weight, ln_bias, eps)`` computed in float32 (float64 for float64 x). Backward recomputes the conv output, so
    autograd keeps only x, the parameters and two (B, H, W) statistics.

    Args:
        x: ``(B, C, H, W)`` input, NCHW- or channels_last-contiguous (read as it is; other strides are copied once).
            float16, bfloat16, float32, or float64 (float64 on the ``cpp`` and ``torch`` backends only).
        weight: ``(C, 1, k, k)`` depthwise conv weight (``nn.Conv2d(C, C, k, groups=C).weight``), k odd in 3..13;
            stride 1, zero padding ``k // 2`` (output H x W = input H x W).
        conv_bias: ``(C,)`` conv bias or None.
        ln_weight: ``(C,)`` LayerNorm weight or None (no scale).
        ln_bias: ``(C,)`` LayerNorm bias or None.
        eps: LayerNorm epsilon (timm's ConvNeXt: 1e-6; torch's default 1e-5).
        out_layout: ``"nhwc"`` returns ``(B, H, W, C)`` contiguous (what the next ``nn.Linear`` wants);
            ``"nchw"`` returns the same memory as a ``(B, C, H, W)`` view (channels_last memory format), for
            timm's ``conv_mlp=True`` blocks and ``LayerNorm2d`` users.
        backend: ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"torch"``; None chooses (see :mod:`pykernels.backends`).

    Each parameter is x's dtype or float32 (float32 parameters with bfloat16 / float16 activations is the
    mixed-precision case; float64 x takes float64 parameters); gradients come back in each tensor's own dtype.

    Returns:
        ``(B, H, W, C)`` tensor (or its ``(B, C, H, W)`` permuted view for ``out_layout="nchw"``) of x's dtype.
    """
    _check_dwconv_ln_args(x, weight, conv_bias, ln_weight, ln_bias, eps, out_layout)
    out, _, _ = _dwconv_ln_ops.dwconv_ln(x, weight, conv_bias, ln_weight, ln_bias, float(eps), backend)
    return out if out_layout == "nhwc" else out.permute(0, 3, 1, 2)
