"""Public functions of pykernels: each checks its arguments (with the rules of its op, ``pykernels.ops.<stem>``),
then calls the op.

:func:`attention` is multi-head attention without an Nq x Nk matrix in memory (FlashAttention-2, Dao 2023).

:func:`dwconv_ln` is the front of ConvNeXt's block (Liu et al. 2022, "A ConvNet for the 2020s"): a depthwise
k x k conv followed by LayerNorm over channels, fused into one kernel that writes (B, H, W, C).

DropPath (stochastic depth, Huang et al. 2016, "Deep Networks with Stochastic Depth") as used by timm, torchvision
and Hugging Face in ConvNeXt, ViT/DeiT, Swin and EfficientNet: each sample's residual branch is dropped with
probability ``drop_prob`` and kept samples are scaled by ``1 / keep_prob``. :func:`drop_path_add` fuses it with
layer-scale (CaiT / ConvNeXt's ``gamma``) and the residual add into one pass over memory.

:func:`mlp` is the transformer / ConvNeXt MLP ``fc2(act(fc1(x)))`` with that epilogue, one autograd node that saves
the hidden pre-activation once and runs each GEMM on the provider measured fastest for its shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pykernels import reference
from pykernels._dtypes import promote_dtypes
from pykernels.ops import attention as _attention_ops
from pykernels.ops import drop_path as _drop_path_ops
from pykernels.ops import dwconv_ln as _dwconv_ln_ops
from pykernels.ops import mbconv_se as _mbconv_se_ops
from pykernels.ops import mlp as _mlp_ops
from pykernels.ops.drop_path import channel_dim as _channel_dim
from pykernels.ops.drop_path import check_drop_args as _check_drop_args
from pykernels.ops.drop_path import check_tensor as _check_tensor

__all__ = ["attention", "drop_path", "drop_path_add", "drop_path_branch", "dwconv_ln", "mbconv_se", "mlp"]


def _draw(branch: torch.Tensor, gamma, drop_prob, training, scale_by_keep, mode, rng) -> torch.Tensor | None:
    """Per-sample scale (B,), or None when nothing is dropped (eval or drop_prob == 0: no RNG is drawn)."""
    if not training or drop_prob == 0.0:
        return None
    dtype = promote_dtypes(branch, gamma)  # timm draws in the dtype of gamma * branch
    return reference.draw_drop_path_scale(
        branch.shape[0],
        branch.dim(),
        drop_prob,
        dtype=dtype,
        device=branch.device,
        scale_by_keep=scale_by_keep,
        mode=mode,
        rng=rng,
    )


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
    channel_dim = 1
    if gamma is not None:
        _check_tensor("gamma", gamma, branch)
        channel_dim = _channel_dim(gamma, branch)  # a bad gamma fails before any random number is drawn
        if gamma.dim() != 1:
            gamma = gamma.reshape(-1)
    scale = _draw(branch, gamma, drop_prob, training, scale_by_keep, mode, rng) if training else None
    return _drop_path_ops.drop_path_add_call(residual, branch, scale, gamma, channel_dim, None, backend)


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
    return _drop_path_ops.drop_path_add_call(None, x, scale, None, 1, None, backend)


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
        return x.to(promote_dtypes(x, gamma), copy=True)
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
    return _drop_path_ops.drop_path_add_call(residual, branch, scale, gamma, channel_dim, None, backend)


# ---- dwconv_ln ---------------------------------------------------------------------------------------------------

_OUT_LAYOUTS = ("nhwc", "nchw")


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
    _dwconv_ln_ops.check_args(x, weight, conv_bias, ln_weight, ln_bias, eps)
    if out_layout not in _OUT_LAYOUTS:
        raise ValueError(f"out_layout must be 'nhwc' ((B, H, W, C)) or 'nchw' ((B, C, H, W) view), got {out_layout!r}")
    out, _, _ = _dwconv_ln_ops.dwconv_ln_call(x, weight, conv_bias, ln_weight, ln_bias, float(eps), backend)
    return out if out_layout == "nhwc" else out.permute(0, 3, 1, 2)


# ---- attention ---------------------------------------------------------------------------------------------------

_NO_SEED = torch.zeros((1,), dtype=torch.int64)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """``softmax(scale * q k^T + bias, masked) @ v`` per (batch, head), never an Nq x Nk matrix in memory (Triton).

    Args:
        q: ``(B, Nq, H, D)`` queries, any strides: ``qkv.view(B, N, 3, H, D).unbind(2)`` is read without a copy.
        k, v: ``(B, Nk, H, D)`` keys and values, q's dtype.
        bias: additive float score bias broadcastable to ``(B, H, Nq, Nk)`` (e.g. a relative-position bias); gets a
            gradient.
        key_padding_mask: ``(B, Nk)`` bool, True = ignore that key. Query rows with every key masked give 0.
        causal: top-left causal mask (query i sees keys j <= i), as SDPA's ``is_causal=True``.
        scale: score scale, default ``D ** -0.5``.
        dropout_p: dropout on the attention probabilities, in [0, 1); its mask comes from torch's generator
            (``torch.manual_seed`` reproduces it) and is regenerated in backward, never stored.
        backend: ``"triton"`` or ``"torch"``; None chooses (CUDA: triton for its head dims, else torch; CPU: torch).
            The Triton kernel takes head dims 8, 16, 24, 32, 48, 64, 80, 96, 128, 256 (float32 up to 64).

    Returns:
        ``(B, Nq, H, D)`` in q's dtype: a view of a contiguous ``(B, Nq, H * D)`` tensor (``.flatten(2)`` is free),
        the input of the output projection.
    """
    _attention_ops.check_args(q, k, v, bias, key_padding_mask, dropout_p)
    batch, n_q, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else float(scale)
    out = _attention_flat(q, k, v, bias, key_padding_mask, bool(causal), scale, float(dropout_p), backend)
    return out.view(batch, n_q, heads, head_dim)


def _attention_flat(q, k, v, bias, key_padding_mask, causal: bool, scale: float, dropout_p: float, backend):
    """:func:`attention` on checked arguments, as the op returns it: ``(B, Nq, H * D)`` contiguous (what
    :class:`pykernels.FusedMHSA` projects; its q, k, v are views of its own qkv projection, nothing to check)."""
    # the dropout seed: a one-element CPU tensor from torch's generator (no device sync, no graph break)
    seed = torch.randint(0, 2**31 - 1, (1,)) if dropout_p > 0.0 else _NO_SEED
    return _attention_ops.attention_out_call(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend)


# ---- mbconv_se ---------------------------------------------------------------------------------------------------


def mbconv_se(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    padding: int | tuple[int, int, int, int] | None = None,
    act: str = "silu",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(BatchNorm(depthwise_conv(x)))`` and the SE squeeze of it, in one pass over the expanded activation.

    The depthwise stage of an MBConv block: ``F.batch_norm(F.conv2d(F.pad(x, padding), weight, conv_bias, stride,
    groups=C), running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)`` followed by ``act``, with
    ``out.sum((2, 3))`` (what SE's average pool needs, times H * W) computed from the same values. Backward recomputes
    the conv from x: autograd keeps x, the parameters and the (C,) statistics only.

    Args:
        x: ``(B, C, H, W)`` NCHW- or channels_last-contiguous (other strides: one copy). float16, bfloat16, float32,
            float64 (float64 on ``cpp`` and ``torch``).
        weight: ``(C, 1, k, k)`` depthwise weight, k in 3, 5, 7.
        conv_bias, bn_weight, bn_bias: ``(C,)`` or None. Each parameter x's dtype or float32.
        running_mean, running_var: ``(C,)`` BatchNorm buffers: used when not ``training``; updated in place when
            ``training`` (as ``F.batch_norm``: ``running = (1 - momentum) * running + momentum * batch``, the
            unbiased batch variance), unless None.
        training: normalise with the batch's statistics (biased variance), as BatchNorm in training mode.
        momentum: BatchNorm's exponential average factor (``nn.BatchNorm2d`` passes ``1 / num_batches_tracked``
            for ``momentum=None``); None: no update.
        eps: BatchNorm epsilon.
        stride: 1 or 2.
        padding: ``(left, right, top, bottom)`` zero padding as ``F.pad`` takes it (asymmetric "same" padding of
            TensorFlow-ported models included), an int for all four sides, or None for ``k // 2``.
        act: ``"silu"``, ``"relu"``, ``"relu6"``, ``"hardswish"`` or ``"none"``.
        backend: ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"torch"``; None chooses (see :mod:`pykernels.backends`).

    Returns:
        ``out``: ``(B, C, H_out, W_out)`` in x's dtype, channels-last in memory (what a 1x1 projection wants), and
        ``pooled``: ``(B, C)`` float32 (float64 for float64 x) sums of ``out`` over ``(H_out, W_out)``.
    """
    kernel = weight.shape[-1] if isinstance(weight, torch.Tensor) and weight.dim() == 4 else 0
    if padding is None:
        padding = kernel // 2
    if isinstance(padding, int):
        padding = (padding,) * 4
    if len(padding) != 4 or any(not isinstance(p, int) for p in padding):
        raise ValueError(f"padding must be an int or (left, right, top, bottom) ints, got {padding!r}")
    pad_l, pad_r, pad_t, pad_b = padding
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        _mbconv_se_ops.check_args(
            x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, 0, 0, 1, 1, act, training
        )  # raises
    out_h = _mbconv_se_ops.output_size(x.shape[2], kernel, stride, pad_t, pad_b)
    out_w = _mbconv_se_ops.output_size(x.shape[3], kernel, stride, pad_l, pad_r)
    _mbconv_se_ops.check_args(
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
        training,
    )
    if training and x.shape[0] * out_h * out_w == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    out, pooled, mean, var = _mbconv_se_ops.mbconv_se_call(
        x,
        weight,
        conv_bias,
        bn_weight,
        bn_bias,
        None if training else running_mean,
        None if training else running_var,
        float(eps),
        int(stride),
        pad_t,
        pad_l,
        out_h,
        out_w,
        act,
        bool(training),
        backend,
    )
    count = x.shape[0] * out_h * out_w
    if training and momentum is not None and running_mean is not None and count > 0:  # no values: as F.batch_norm
        with torch.no_grad():
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * (count / max(count - 1, 1))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return out.permute(0, 3, 1, 2), pooled


# ---- mlp -----------------------------------------------------------------------------------------------------------


def mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    act: str = "gelu",
    *,
    gamma: torch.Tensor | None = None,
    shortcut: torch.Tensor | None = None,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    mode: str = "row",
    rng: str = "bernoulli",
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float | None = None,
) -> torch.Tensor:
    """``shortcut + drop_path(gamma * fc2(act(fc1(x))))`` over the last dim: the MLP of ViT / ConvNeXt blocks with
    its layer-scale + DropPath + residual epilogue (and optionally the pre-norm in front), as one autograd node (see
    :mod:`pykernels.ops.mlp`).

    Inference: fc1 + bias + activation as one GEMM call and fc2 + bias (+ gamma folded into the weight, + the
    residual) as another, each on the provider that was faster for its shape (oneDNN on packed weights or ATen; the
    packed copies are rebuilt whenever a weight changes). Training: saves x and fc1's output once and recomputes the
    activation in backward (eager keeps the hidden tensor twice, and fc2's output for gamma's gradient). The DropPath
    mask is timm's (or torchvision's / Hugging Face's, by ``mode`` / ``rng``) for the same ``torch.manual_seed``.
    Under ``torch.compile`` it is plain ATen ops.

    Args:
        x: ``(..., K)``, any float dtype (the fused paths need every tensor in x's dtype; others run plain ATen).
        fc1_weight: ``(H, K)`` (``nn.Linear``) or ``(H, K, 1, 1)`` (1x1 ``nn.Conv2d``, applied over the last dim).
        fc1_bias: ``(H,)`` or None.
        fc2_weight: ``(N, H)`` or ``(N, H, 1, 1)``.
        fc2_bias: ``(N,)`` or None.
        act: ``"gelu"`` (erf), ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or ``"none"``.
        gamma: ``(N,)`` layer-scale or None.
        shortcut: ``(..., N)`` residual added to the result, or None.
        drop_prob, training, scale_by_keep, mode, rng: DropPath of the branch, as :func:`drop_path_add` (the first
            dim of x is the sample dim); nothing is drawn unless ``training`` and ``drop_prob > 0``.
        ln_weight, ln_bias, ln_eps: with ``ln_eps`` not None, ``x`` is first normalised by
            ``F.layer_norm(x, (K,), ln_weight, ln_bias, ln_eps)`` (a pre-norm block's norm; weight / bias ``(K,)`` or
            None). Training then saves x instead of the normalised copy and recomputes the LayerNorm in backward.

    Returns:
        ``(..., N)`` contiguous, x's dtype (the fused paths) or PyTorch's promotion (the plain path).
    """
    norm = None if ln_eps is None else (ln_weight, ln_bias, float(ln_eps))
    _mlp_ops.check_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, shortcut, norm)
    _check_drop_args(drop_prob, mode, rng)
    scale = None
    if training and drop_prob > 0.0:
        if x.dim() < 2:
            raise ValueError(f"DropPath needs a sample dim and a feature dim, got x of shape {tuple(x.shape)}")
        out_shape = (*x.shape[:-1], fc2_weight.shape[0])
        dtype = promote_dtypes(x, gamma)  # what timm draws in: the dtype of gamma * branch
        scale = reference.draw_drop_path_scale(
            out_shape[0],
            len(out_shape),
            drop_prob,
            dtype=dtype,
            device=x.device,
            scale_by_keep=scale_by_keep,
            mode=mode,
            rng=rng,
        )
    return _mlp_ops.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, shortcut, scale, norm)
