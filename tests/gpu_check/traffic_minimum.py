"""Minimum global-memory traffic and FLOPs of each op x direction: the yardsticks of the traffic counters.

``minimum_bytes(op, direction, **shapes_dtypes_flags) -> int``: every input read once, every output written once, plus
what the op saves for backward that is not already an input or output (a saved input costs nothing more: the forward
reads it anyway). Intermediate workspaces (partial sums, an fp32 ``dy``, attention's ``delta``) are not part of the
minimum: they are what a counter measures against it. Parameter-sized tensors (C or k*k*C values) are counted too;
they are small next to the activations.

``flops(op, direction, ...) -> int``: floating-point operations of the math (a multiply-add is 2), with the
conventions stated per op; for a time model, not for correctness.

Ops and their keyword arguments (element sizes in bytes: ``x_size`` for the activations' dtype, ``param_size`` for
parameters; sizes default to float16 activations and float32 parameters, the CUDA benchmark dtypes):

* ``drop_path_add``: ``numel`` (elements of branch / residual / out), ``batch``, ``channels`` (0: no gamma),
  ``has_residual``, ``has_scale``, ``need_grad_branch``, ``need_grad_gamma``.
* ``dwconv_ln``: ``batch, channels, height, width, ksize``, ``has_conv_bias, has_ln_weight, has_ln_bias``,
  ``need_grad_x, need_grad_params``.
* ``attention``: ``batch, heads, n_q, n_k, head_dim``, ``causal``, ``need_grad_q`` (and k, v; default all).
* ``mbconv_se``: ``batch, channels, height, width, out_h, out_w, ksize``, ``has_conv_bias, has_bn_weight,
  has_bn_bias``, ``batch_stats`` (training), ``need_grad_x, need_grad_params``, ``has_grad_pooled``.

Used by ``tests/gpu_check/traffic.py`` (Triton, interpreter) and meant for the CUDA-emulator counter as well; plain
functions of ints and bools, no torch / triton import.
"""

from __future__ import annotations

OPS = ("drop_path_add", "dwconv_ln", "attention", "mbconv_se")
DIRECTIONS = ("fwd", "bwd")
STAT_SIZE = 4  # float32 mean / rstd / var / logsumexp / pooled sums


def _check(op: str, direction: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")


# ---- drop_path_add ---------------------------------------------------------------------------------------------------


def _drop_path_add_bytes(
    direction: str,
    numel: int,
    batch: int,
    channels: int = 0,
    has_residual: bool = True,
    has_scale: bool = True,
    need_grad_branch: bool = True,
    need_grad_gamma: bool = True,
    x_size: int = 2,
    param_size: int = 4,
    scale_size: int | None = None,
    **_,
) -> int:
    """fwd: read branch (N), residual (N) if any, gamma (C), scale (B); write out (N). Saves scale, gamma and branch
    (inputs: nothing more to write).
    bwd: read grad_out (N), scale (B), gamma (C), and branch (N) when gamma needs a gradient; write grad_branch (N)
    when needed and grad_gamma (C). grad_residual is grad_out itself (no traffic)."""
    scale_size = x_size if scale_size is None else scale_size
    small = channels * param_size + (batch * scale_size if has_scale else 0)
    if direction == "fwd":
        return numel * x_size * (2 + int(has_residual)) + small
    need_grad_gamma = need_grad_gamma and channels > 0
    total = numel * x_size * (1 + int(need_grad_gamma) + int(need_grad_branch)) + small
    return total + (channels * param_size if need_grad_gamma else 0)


def _drop_path_add_flops(
    direction: str,
    numel: int,
    channels: int = 0,
    has_residual: bool = True,
    has_scale: bool = True,
    need_grad_branch: bool = True,
    need_grad_gamma: bool = True,
    **_,
) -> int:
    """fwd: one multiply by gamma, one by scale, one add per element (those present). bwd: grad_branch = two
    multiplies per element; grad_gamma = grad_out * scale * branch summed (3 per element)."""
    per = int(channels > 0) + int(has_scale)
    if direction == "fwd":
        return numel * (per + int(has_residual))
    total = numel * per if need_grad_branch else 0
    return total + (numel * (2 + int(has_scale)) if need_grad_gamma and channels > 0 else 0)


# ---- dwconv_ln -------------------------------------------------------------------------------------------------------


def _dwconv_ln_bytes(
    direction: str,
    batch: int,
    channels: int,
    height: int,
    width: int,
    ksize: int = 7,
    has_conv_bias: bool = True,
    has_ln_weight: bool = True,
    has_ln_bias: bool = True,
    need_grad_x: bool = True,
    need_grad_params: bool = True,
    x_size: int = 2,
    param_size: int = 4,
    **_,
) -> int:
    """fwd: read x (B C H W) and the parameters (weight C k k, conv_bias / ln_weight / ln_bias C each); write out
    (B H W C) and the saved mean, rstd (B H W float32 each). Saves x (an input), mean, rstd.
    bwd: read grad_out (B H W C), x, weight, conv_bias (the conv is recomputed), ln_weight, mean, rstd; write grad_x
    (need_grad_x) and grad_weight, grad_conv_bias, grad_ln_weight, grad_ln_bias (need_grad_params, those present).
    ln_bias is not read in backward (it does not enter any gradient)."""
    pixels = batch * height * width
    act = pixels * channels * x_size
    weight = channels * ksize * ksize * param_size
    vec = channels * param_size
    if direction == "fwd":
        params = weight + vec * (int(has_conv_bias) + int(has_ln_weight) + int(has_ln_bias))
        return act + params + act + 2 * pixels * STAT_SIZE
    reads = act + act + weight + vec * (int(has_conv_bias) + int(has_ln_weight)) + 2 * pixels * STAT_SIZE
    writes = act if need_grad_x else 0
    if need_grad_params:
        writes += weight + vec * (int(has_conv_bias) + int(has_ln_weight) + int(has_ln_bias))
    return reads + writes


def _dwconv_ln_flops(
    direction: str,
    batch: int,
    channels: int,
    height: int,
    width: int,
    ksize: int = 7,
    need_grad_x: bool = True,
    need_grad_params: bool = True,
    **_,
) -> int:
    """Per output element: conv 2 k^2 + bias 1, LayerNorm 8 (sum, centred square, sum, normalise 2, affine 2, +1 for
    the statistics' divisions spread over C). bwd: the conv recomputed (2 k^2 + 1) and normalised (2), the LayerNorm
    gradient 10 (g * w, two row sums with their products, the final combination), grad_x 2 k^2 (need_grad_x),
    grad_weight 2 k^2 plus 3 parameter sums (need_grad_params)."""
    elems = batch * channels * height * width
    taps = 2 * ksize * ksize
    if direction == "fwd":
        return elems * (taps + 1 + 8)
    per = taps + 1 + 2 + 10
    per += taps if need_grad_x else 0
    per += taps + 3 if need_grad_params else 0
    return elems * per


# ---- attention -------------------------------------------------------------------------------------------------------


def _attention_bytes(
    direction: str,
    batch: int,
    heads: int,
    n_q: int,
    head_dim: int,
    n_k: int | None = None,
    need_grad_q: bool = True,
    need_grad_k: bool = True,
    need_grad_v: bool = True,
    x_size: int = 2,
    **_,
) -> int:
    """fwd: read q (B Nq H D), k, v (B Nk H D); write out (B Nq H D) and the saved logsumexp (B H Nq float32). Saves
    q, k, v (inputs), out (output), lse.
    bwd: read grad_out, q, out (B Nq H D each), k, v (B Nk H D each), lse (B H Nq float32); write dq, dk, dv (those
    needed). rowsum(dO * O) (delta) is a workspace, not part of the minimum. No bias / key padding mask here (the
    benchmarks have none)."""
    n_k = n_q if n_k is None else n_k
    q_bytes = batch * n_q * heads * head_dim * x_size
    k_bytes = batch * n_k * heads * head_dim * x_size
    lse = batch * heads * n_q * STAT_SIZE
    if direction == "fwd":
        return q_bytes + 2 * k_bytes + q_bytes + lse
    reads = 3 * q_bytes + 2 * k_bytes + lse
    return reads + q_bytes * int(need_grad_q) + k_bytes * (int(need_grad_k) + int(need_grad_v))


def _attention_flops(
    direction: str, batch: int, heads: int, n_q: int, head_dim: int, n_k: int | None = None, causal: bool = False, **_
) -> int:
    """The GEMMs only (softmax not counted), FlashAttention's convention: fwd 4 B H Nq Nk D (S = QK^T, O = PV); bwd
    2.5x that (S recomputed, dV, dP, dQ, dK: 10 B H Nq Nk D); causal halves both."""
    n_k = n_q if n_k is None else n_k
    fwd = 4 * batch * heads * n_q * n_k * head_dim
    total = fwd if direction == "fwd" else fwd * 5 // 2
    return total // 2 if causal else total


# ---- mbconv_se -------------------------------------------------------------------------------------------------------


def _mbconv_se_bytes(
    direction: str,
    batch: int,
    channels: int,
    height: int,
    width: int,
    out_h: int,
    out_w: int,
    ksize: int = 3,
    has_conv_bias: bool = False,
    has_bn_weight: bool = True,
    has_bn_bias: bool = True,
    batch_stats: bool = True,
    need_grad_x: bool = True,
    need_grad_params: bool = True,
    has_grad_pooled: bool = True,
    x_size: int = 2,
    param_size: int = 4,
    **_,
) -> int:
    """fwd: read x (B C H W), weight (C k k), conv_bias / bn_weight / bn_bias (C, those present) and, in eval
    (not batch_stats), running_mean / running_var (C); write out (B Ho Wo C), pooled (B C float32) and, training,
    the batch mean / var (C float32 each, saved for backward).
    bwd: read grad_out (B Ho Wo C), grad_pooled (B C float32) if any, x, weight, conv_bias, bn_weight, bn_bias (those
    present: the forward is recomputed), mean, var (C float32); write grad_x (need_grad_x), grad_weight and the
    present parameters' grads (need_grad_params)."""
    x_bytes = batch * channels * height * width * x_size
    out_bytes = batch * out_h * out_w * channels * x_size
    weight = channels * ksize * ksize * param_size
    vec = channels * param_size
    params = weight + vec * (int(has_conv_bias) + int(has_bn_weight) + int(has_bn_bias))
    stats = 2 * channels * STAT_SIZE
    pooled = batch * channels * STAT_SIZE
    if direction == "fwd":
        return x_bytes + params + out_bytes + pooled + stats  # stats read (eval) or written (training)
    reads = out_bytes + (pooled if has_grad_pooled else 0) + x_bytes + params + stats
    writes = (x_bytes if need_grad_x else 0) + (params if need_grad_params else 0)
    return reads + writes


def _mbconv_se_flops(
    direction: str,
    batch: int,
    channels: int,
    out_h: int,
    out_w: int,
    ksize: int = 3,
    batch_stats: bool = True,
    need_grad_x: bool = True,
    need_grad_params: bool = True,
    **_,
) -> int:
    """Per output element: conv 2 k^2 + bias 1, BatchNorm 2 (training: +4 for the statistics), activation 4 (SiLU as
    x * sigmoid, the exp counted as one), SE squeeze 1. bwd: recompute (2 k^2 + 7), activation and BatchNorm
    gradients 12 (training: +4 for the two channel means), grad_x 2 k^2 (need_grad_x), grad_weight 2 k^2 plus 3
    parameter sums (need_grad_params). grad_x of a stride-2 conv touches each input once per tap it feeds: counted as
    2 k^2 per output element."""
    elems = batch * channels * out_h * out_w
    taps = 2 * ksize * ksize
    stats = 4 if batch_stats else 0
    if direction == "fwd":
        return elems * (taps + 1 + 2 + stats + 4 + 1)
    per = taps + 7 + 12 + stats
    per += taps if need_grad_x else 0
    per += taps + 3 if need_grad_params else 0
    return elems * per


_BYTES = {
    "drop_path_add": _drop_path_add_bytes,
    "dwconv_ln": _dwconv_ln_bytes,
    "attention": _attention_bytes,
    "mbconv_se": _mbconv_se_bytes,
}
_FLOPS = {
    "drop_path_add": _drop_path_add_flops,
    "dwconv_ln": _dwconv_ln_flops,
    "attention": _attention_flops,
    "mbconv_se": _mbconv_se_flops,
}


def minimum_bytes(op: str, direction: str, **shapes_dtypes_flags) -> int:
    """Minimum global-memory bytes of ``op`` in ``direction`` ('fwd' / 'bwd'); see each op's ``_<op>_bytes``
    docstring (``minimum_bytes.__doc__`` of :data:`OPS`' functions) for what is counted. Unknown keywords are
    ignored, so one dict of a case's shapes serves both functions."""
    _check(op, direction)
    return int(_BYTES[op](direction, **shapes_dtypes_flags))


def flops(op: str, direction: str, **shapes_dtypes_flags) -> int:
    """Floating-point operations of ``op`` in ``direction`` (conventions in each ``_<op>_flops`` docstring)."""
    _check(op, direction)
    return int(_FLOPS[op](direction, **shapes_dtypes_flags))


def describe(op: str, direction: str) -> str:
    """The docstrings of the byte and FLOP counts of ``op`` (what is counted)."""
    _check(op, direction)
    return f"{_BYTES[op].__doc__}\n{_FLOPS[op].__doc__}"
