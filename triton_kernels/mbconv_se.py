"""Triton kernels of ``mbconv_se``: the depthwise stage of an MBConv block with the squeeze of its SE layer.

MobileNet-V2 / V3 (Sandler et al. 2018, Howard et al. 2019) and EfficientNet (Tan & Le 2019): ``z = act(BatchNorm(
dwconv_kxk(x) + conv_bias))`` and the squeeze-excitation input ``pooled[b, c] = sum_{i, j} z[b, i, j, c]`` (Hu et al.
2018) from the same pass. Depthwise ``k`` in {3, 5, 7}, stride 1 or 2, zero padding ``pad_t`` / ``pad_l`` on top / left
and whatever ``out_h`` / ``out_w`` imply on bottom / right (asymmetric "same" padding included). BatchNorm with the
running statistics, or (``batch_stats``) with the biased batch statistics of the conv output, which the forward
returns. Activations ``none``, ``relu``, ``relu6``, ``silu``, ``hardswish`` (a string constexpr ``ACT``) with
PyTorch's definitions and derivative conventions (pykernels/reference/mbconv_se.py: ``activation_grad``).
Contract (shapes, dtypes, outputs) in csrc/ops.cpp; the launchers ``mbconv_se_fwd`` / ``mbconv_se_bwd`` have the
signatures of the compiled ``pykernels::mbconv_se_fwd`` / ``mbconv_se_bwd`` ops; the op (pykernels/ops/mbconv_se.py)
checks the arguments, the launchers only the kernels' own limits.

Tiling: BatchNorm is per channel, so a program owns a ``BLOCK_H x BLOCK_W`` tile of output pixels of one image
(flattened to ``BLOCK_P``) times one block of ``BLOCK_C`` channels (grid axis 1). The forward-family kernels (stats,
apply, reduce, dy) hold (BLOCK_C, BLOCK_P) tiles, pixels on the last axis: Triton's coalescing orders a tile's
threads along the axis on which x's addresses are visibly contiguous - channels for channels-last x, pixels for NCHW
x at stride 1 - and, where none is (NCHW at stride 2), along the last axis, the pixels: so threads always run along
x's contiguous axis. The tables give channels-last x wide channel blocks and NCHW x wide pixel tiles. The k x k taps
loop accumulates the conv in fp32 in registers, row-major over the taps (u, then v), then adds ``conv_bias``; ``k``
is a runtime argument (loops stay rolled; one compile serves k = 3, 5, 7), the stride a constexpr (``STRIDE``: 1 or
2). ``x`` is read through its four strides (NCHW or channels-last in place, no copy). Offsets: the image base ``b *
stride_b`` is int64 (``B * C * H * W`` may pass 2**31), offsets inside one image int32 (the launchers check ``<
2**31``).
Every reduction is a fixed-order sum over a fixed partition that depends on the shape only: per-tile partials in fp32
buffers reduced by ``Tensor.sum`` (no atomics), so results are bitwise reproducible.

* forward:
  1. (``batch_stats``) ``_mbconv_se_fwd_stats_kernel``: each tile's per-channel (mean, M2 = sum of squared deviations
     from the tile mean) of the conv output into a (tiles, 2, C) buffer; ``_merge_tile_stats`` combines them in torch
     with Chan et al.'s formula, ``M2 = sum_t M2_t + sum_t n_t (mean_t - mean)^2`` (every term >= 0: no ``E[y^2] -
     E[y]^2`` cancellation), the tile counts ``n_t`` from the geometry;
  2. ``_mbconv_se_fwd_kernel``: recomputes the conv, normalises with the (running or batch) statistics, applies the
     activation, stores ``out`` (B, out_h, out_w, C) and each tile's per-channel sum of ``z`` (fp32, before rounding)
     into a (B, tiles, C) buffer, summed over tiles into ``pooled``.
* backward (recomputes the conv; nothing of activation size is saved besides ``x``):
  1. (``batch_stats``) ``_mbconv_se_bwd_reduce_kernel``: per-tile sums of ``g`` and ``g * xhat``, ``g = (grad_out +
     grad_pooled) * act'(y)``, into a (tiles, 2, C) buffer; summed in torch (the means ``dy0`` needs);
  2. ``_mbconv_se_bwd_dy_kernel``: ``dy0 = rstd * bn_weight * g`` (running) or ``rstd * bn_weight * (g - mean(g) -
     xhat * mean(g * xhat))`` (batch) into an fp32 (B, out_h, out_w, C) workspace, and (``need_grad_params``) per-tile
     sums of ``g``, ``g * xhat``, ``dy0`` (grad_bn_bias, grad_bn_weight, grad_conv_bias) into a (tiles, 3, C) buffer;
  3. ``_mbconv_se_bwd_dx_kernel``: ``grad_x`` = the transposed strided depthwise conv of ``dy0`` as a gather, written
     in ``x``'s layout. Stride 2 is split into its 4 phases (the parity of the input row and column): inside a phase
     the taps that reach an output pixel are every other one, the same for the whole tile, so no tap is masked
     out for parity; a program owns a tile of one phase;
  4. ``_mbconv_se_bwd_dw_kernel``: program = (pixel-tile group, tap row u, channel block); accumulates ``dy0[p, c] *
     x[c, window(p) + (u, v)]`` for all v at once in a (BLOCK_P, next_pow2(k), BLOCK_C) register tile over the
     group's tiles and writes one (C, k, k) partial of ``grad_weight`` per group (summed in torch).
  Workspace: ``4 * B * out_h * out_w * C`` bytes (dy0) plus the partial sums.

Tiles and warps come from ``_fwd_config`` / ``_dy_config`` / ``_dx_config`` / ``_dw_config`` (GPU branches followed
by the AOT specs in tests/gpu_check/specs/mbconv_se.py); every launch passes ``maxnreg=MAXNREG``. Small integers
that carry no useful specialisation (k, paddings, spatial sizes, tile counts) are ``do_not_specialize``: the JIT would
pin each one that happens to be 1 (k = 3's padding, a 7 x 7 map's single tile column) into a separate compile.
fp16 / bf16 / fp32 inputs, parameters in x's dtype or fp32, statistics converted to fp32 by the launchers, fp32
accumulation. Under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``) the launchers pick bigger tiles
(fewer, larger numpy programs). No ``tl.dot``: bf16 runs in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_GRID_Y, interpreting

GPU_BLOCK_W = 8  # tile width on GPU: EfficientNet / MobileNet maps (112, 56, 28, 14, 7) waste <= 1/8 of a row
MAX_BLOCK_P = 64  # output pixels per program on GPU (an 8 x 8 tile)
TILE_ELEMENTS = 4096  # pixels x channels of one program's fp32 tile on GPU (16 per thread at 8 warps)
MIN_BLOCK_C = 16  # channel blocks below 16 lanes would each be one more compiled specialisation; C < 16 is masked
FWD_MAX_BLOCK_C = 64  # forward / dy programs, channels-last x: up to 64 channels (128 B of an fp16 pixel) x 64 pixels
CL_BLOCK_P = 64
NCHW_BLOCK_C = 8  # forward / dy programs, NCHW x: 8 channels x 256 pixels (32 x 8), 8 fp32 per thread
NCHW_BLOCK_P = 256
NCHW_PER_THREAD = 8
BWD_SPLIT = 2  # the backward reduce / dy kernels: half the forward's pixels, 8 fp32 per thread
DX_MAX_BLOCK_C = 128
DW_MAX_BLOCK_C = 32
DW_TILE_ELEMENTS = 2048  # (pixels, taps, channels) of the grad_weight accumulator: 8 fp32 per thread at 8 warps
DW_TARGET_PROGRAMS = 1024  # grad_weight partition: about this many programs, from the shape only (deterministic)
# the interpreter runs each program as numpy ops over its whole tile: big tiles, few programs
INTERP_TILE_ELEMENTS = 16384
INTERP_MAX_BLOCK_P = 256
INTERP_MAX_BLOCK_C = 512
INTERP_DW_GROUPS = 1
# An explicit register budget for ptxas (as in dwconv_ln): two 8-warp programs per SM, no spills on any gated
# specialisation (tests/gpu_check/specs/mbconv_se.py).
MAXNREG = 128
# integer arguments the JIT must not pin to constexpr 1 (see the module docstring)
_UNSPECIALISED = (
    "H",
    "W",
    "out_h",
    "out_w",
    "ksize",
    "pad_t",
    "pad_l",
    "tiles_w",
    "tiles_per_image",
    "num_tiles",
    "tiles_per_group",
)

# ---- device helpers ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_pixels(tile, tiles_w, tiles_per_image, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # tile index -> (image b (int64), rows, columns) of its BLOCK_H x BLOCK_W pixels, flattened row-major
    b = (tile // tiles_per_image).to(tl.int64)
    t = tile % tiles_per_image
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    rows = (t // tiles_w) * BLOCK_H + p // BLOCK_W
    cols = (t % tiles_w) * BLOCK_W + p % BLOCK_W
    return b, rows, cols


@triton.jit
def _channel_vector(PTR, channels, C, HAS: tl.constexpr, DEFAULT: tl.constexpr):
    # a (C,) vector as fp32 [BLOCK_C] (DEFAULT where absent / past C)
    if HAS:
        return tl.load(PTR + channels, mask=channels < C, other=DEFAULT).to(tl.float32)
    else:
        return tl.full(channels.shape, DEFAULT, tl.float32)


@triton.jit
def _conv_tile(
    X_IMAGE,
    WEIGHT,
    CONV_BIAS,
    oh,
    ow,
    pixel_ok,
    channels,
    C,
    H,
    W,
    stride_xc,
    stride_xh,
    stride_xw,
    ksize,
    pad_t,
    pad_l,
    HAS_CONV_BIAS: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # y0[p, c] = sum_{u, v} x[b, c, oh * S - pad_t + u, ow * S - pad_l + v] * weight[c, 0, u, v] (+ conv_bias[c]),
    # fp32, taps row-major; x = 0 outside the image. Pixels outside the output (pixel_ok false) and channels >= C
    # load nothing: their values are the bias, never stored nor summed.
    channel_ok = channels < C
    h0 = oh * STRIDE - pad_t  # the window's top-left input pixel
    w0 = ow * STRIDE - pad_l
    # offsets of the windows' top-left taps, built once; each tap adds a scalar shift
    corner = (channels * stride_xc)[:, None] + (h0 * stride_xh + w0 * stride_xw)[None, :]
    weight_rows = channels * (ksize * ksize)  # int32 offsets (64-bit pointers per channel would cost 2 registers)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for u in range(ksize):
        h_in = h0 + u
        h_ok = pixel_ok & (h_in >= 0) & (h_in < H)
        for v in range(ksize):
            w_in = w0 + v
            tap_ok = h_ok & (w_in >= 0) & (w_in < W)
            x = tl.load(
                X_IMAGE + (corner + (u * stride_xh + v * stride_xw)),
                mask=channel_ok[:, None] & tap_ok[None, :],
                other=0.0,
            )
            w = tl.load(WEIGHT + (weight_rows + (u * ksize + v)), mask=channel_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[:, None]
    if HAS_CONV_BIAS:
        acc += tl.load(CONV_BIAS + channels, mask=channel_ok, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _activation(y, ACT: tl.constexpr):
    # PyTorch's definitions (NaN propagates: the comparisons that clamp are false for NaN)
    if ACT == "relu":
        z = tl.where(y < 0.0, 0.0, y)
    elif ACT == "relu6":
        z = tl.where(y < 0.0, 0.0, tl.where(y > 6.0, 6.0, y))
    elif ACT == "silu":
        z = y / (1.0 + tl.exp(-y))
    elif ACT == "hardswish":
        z = y * tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    else:
        z = y
    return z


@triton.jit
def _activation_backward(grad, y, ACT: tl.constexpr):
    # grad * act'(y) with PyTorch's conventions: relu' = 0 at 0, relu6' = 0 at 0 and 6, the hardswish slope on [-3, 3]
    if ACT == "relu":
        g = tl.where(y > 0.0, grad, 0.0)
    elif ACT == "relu6":
        g = tl.where((y > 0.0) & (y < 6.0), grad, 0.0)
    elif ACT == "silu":
        sig = 1.0 / (1.0 + tl.exp(-y))
        g = grad * (sig * (1.0 + y * (1.0 - sig)))
    elif ACT == "hardswish":
        g = tl.where(y < -3.0, 0.0, tl.where(y <= 3.0, grad * (y / 3.0 + 0.5), grad))
    else:
        g = grad
    return g


@triton.jit
def _normalize(
    y0, MEAN, VAR, BN_WEIGHT, BN_BIAS, channels, C, eps, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr
):
    # (xhat, y, rstd, bn_weight) of a tile: xhat = (y0 - mean) * rstd, y = xhat * bn_weight + bn_bias; statistics fp32
    channel_ok = channels < C
    mean = tl.load(MEAN + channels, mask=channel_ok, other=0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.load(VAR + channels, mask=channel_ok, other=1.0) + eps)
    gamma = _channel_vector(BN_WEIGHT, channels, C, HAS_BN_WEIGHT, 1.0)
    beta = _channel_vector(BN_BIAS, channels, C, HAS_BN_BIAS, 0.0)
    xhat = (y0 - mean[:, None]) * rstd[:, None]
    y = xhat * gamma[:, None] + beta[:, None]
    return xhat, y, rstd, gamma


@triton.jit
def _grad_tile(
    GRAD_OUT,
    GRAD_POOLED,
    b,
    oh,
    ow,
    valid,
    channels,
    C,
    y,
    stride_gb,
    stride_gh,
    stride_gw,
    stride_gc,
    HAS_GRAD_POOLED: tl.constexpr,
    ACT: tl.constexpr,
):
    # g = (grad_out + grad_pooled[b, c]) * act'(y) in fp32; 0 outside the output and past C
    offsets = (channels * stride_gc)[:, None] + (oh * stride_gh + ow * stride_gw)[None, :]
    grad = tl.load(GRAD_OUT + b * stride_gb + offsets, mask=valid, other=0.0).to(tl.float32)
    if HAS_GRAD_POOLED:
        grad += tl.load(GRAD_POOLED + b * C + channels, mask=channels < C, other=0.0)[:, None]
    return tl.where(valid, _activation_backward(grad, y, ACT), 0.0)


# ---- forward ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _mbconv_se_fwd_stats_kernel(
    PARTIAL,
    X,
    WEIGHT,
    CONV_BIAS,
    C,
    H,
    W,
    out_h,
    out_w,
    ksize,
    pad_t,
    pad_l,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    tiles_w,
    tiles_per_image,
    HAS_CONV_BIAS: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program (pixel tile, channel block): PARTIAL[tile, 0, c] = mean of the tile's conv outputs, PARTIAL[tile, 1, c]
    # = their sum of squared deviations from it (exact two-pass over the tile in registers)
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    tile = tl.program_id(0)
    b, oh, ow = _tile_pixels(tile, tiles_w, tiles_per_image, BLOCK_H, BLOCK_W)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel_ok = (oh < out_h) & (ow < out_w)
    y0 = _conv_tile(
        X + b * stride_xb,
        WEIGHT,
        CONV_BIAS,
        oh,
        ow,
        pixel_ok,
        channels,
        C,
        H,
        W,
        stride_xc,
        stride_xh,
        stride_xw,
        ksize,
        pad_t,
        pad_l,
        HAS_CONV_BIAS,
        STRIDE,
        BLOCK_P,
        BLOCK_C,
    )
    count = tl.sum(pixel_ok.to(tl.float32), axis=0)  # >= 1: every tile starts inside the output
    tile_mean = tl.sum(tl.where(pixel_ok[None, :], y0, 0.0), axis=1) / count
    deviation = tl.where(pixel_ok[None, :], y0 - tile_mean[:, None], 0.0)
    m2 = tl.sum(deviation * deviation, axis=1)
    row = PARTIAL + tile.to(tl.int64) * 2 * C
    channel_ok = channels < C
    tl.store(row + channels, tile_mean, mask=channel_ok)
    tl.store(row + C + channels, m2, mask=channel_ok)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _mbconv_se_fwd_kernel(
    OUT,
    PARTIAL_POOLED,
    X,
    WEIGHT,
    CONV_BIAS,
    BN_WEIGHT,
    BN_BIAS,
    MEAN,
    VAR,
    C,
    H,
    W,
    out_h,
    out_w,
    ksize,
    pad_t,
    pad_l,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    tiles_w,
    tiles_per_image,
    eps,
    HAS_CONV_BIAS: tl.constexpr,
    HAS_BN_WEIGHT: tl.constexpr,
    HAS_BN_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program (pixel tile, channel block): z = act(BN(conv)) stored to OUT (B, out_h, out_w, C); the tile's sum of z
    # over its pixels to PARTIAL_POOLED[b, tile in image, c] (tile = b * tiles_per_image + tile in image)
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    tile = tl.program_id(0)
    b, oh, ow = _tile_pixels(tile, tiles_w, tiles_per_image, BLOCK_H, BLOCK_W)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel_ok = (oh < out_h) & (ow < out_w)
    y0 = _conv_tile(
        X + b * stride_xb,
        WEIGHT,
        CONV_BIAS,
        oh,
        ow,
        pixel_ok,
        channels,
        C,
        H,
        W,
        stride_xc,
        stride_xh,
        stride_xw,
        ksize,
        pad_t,
        pad_l,
        HAS_CONV_BIAS,
        STRIDE,
        BLOCK_P,
        BLOCK_C,
    )
    _, y, _, _ = _normalize(y0, MEAN, VAR, BN_WEIGHT, BN_BIAS, channels, C, eps, HAS_BN_WEIGHT, HAS_BN_BIAS)
    z = _activation(y, ACT)
    valid = (channels < C)[:, None] & pixel_ok[None, :]
    out_offsets = channels[:, None] + ((oh * out_w + ow) * C)[None, :]
    tl.store(OUT + b * out_h * out_w * C + out_offsets, z.to(OUT.dtype.element_ty), mask=valid)
    # the SE squeeze: fp32 sums of z (before the rounding to x's dtype)
    pooled = tl.sum(tl.where(valid, z, 0.0), axis=1)
    tl.store(PARTIAL_POOLED + tile.to(tl.int64) * C + channels, pooled, mask=channels < C)


# ---- backward ---------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _mbconv_se_bwd_reduce_kernel(
    PARTIAL,
    GRAD_OUT,
    GRAD_POOLED,
    X,
    WEIGHT,
    CONV_BIAS,
    BN_WEIGHT,
    BN_BIAS,
    MEAN,
    VAR,
    C,
    H,
    W,
    out_h,
    out_w,
    ksize,
    pad_t,
    pad_l,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_gb,
    stride_gh,
    stride_gw,
    stride_gc,
    tiles_w,
    tiles_per_image,
    eps,
    HAS_CONV_BIAS: tl.constexpr,
    HAS_BN_WEIGHT: tl.constexpr,
    HAS_BN_BIAS: tl.constexpr,
    HAS_GRAD_POOLED: tl.constexpr,
    ACT: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program (pixel tile, channel block), batch statistics only: PARTIAL[tile, 0:2, c] = the tile's sums of g and
    # g * xhat (their totals / N are the means in dy0)
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    tile = tl.program_id(0)
    b, oh, ow = _tile_pixels(tile, tiles_w, tiles_per_image, BLOCK_H, BLOCK_W)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    pixel_ok = (oh < out_h) & (ow < out_w)
    y0 = _conv_tile(
        X + b * stride_xb,
        WEIGHT,
        CONV_BIAS,
        oh,
        ow,
        pixel_ok,
        channels,
        C,
        H,
        W,
        stride_xc,
        stride_xh,
        stride_xw,
        ksize,
        pad_t,
        pad_l,
        HAS_CONV_BIAS,
        STRIDE,
        BLOCK_P,
        BLOCK_C,
    )
    xhat, y, _, _ = _normalize(y0, MEAN, VAR, BN_WEIGHT, BN_BIAS, channels, C, eps, HAS_BN_WEIGHT, HAS_BN_BIAS)
    valid = channel_ok[:, None] & pixel_ok[None, :]
    g = _grad_tile(
        GRAD_OUT,
        GRAD_POOLED,
        b,
        oh,
        ow,
        valid,
        channels,
        C,
        y,
        stride_gb,
        stride_gh,
        stride_gw,
        stride_gc,
        HAS_GRAD_POOLED,
        ACT,
    )
    row = PARTIAL + tile.to(tl.int64) * 2 * C
    tl.store(row + channels, tl.sum(g, axis=1), mask=channel_ok)
    tl.store(row + C + channels, tl.sum(g * xhat, axis=1), mask=channel_ok)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _mbconv_se_bwd_dy_kernel(
    DY,
    PARTIAL,
    GRAD_OUT,
    GRAD_POOLED,
    X,
    WEIGHT,
    CONV_BIAS,
    BN_WEIGHT,
    BN_BIAS,
    MEAN,
    VAR,
    MEAN_G,
    MEAN_G_XHAT,
    C,
    H,
    W,
    out_h,
    out_w,
    ksize,
    pad_t,
    pad_l,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_gb,
    stride_gh,
    stride_gw,
    stride_gc,
    tiles_w,
    tiles_per_image,
    eps,
    HAS_CONV_BIAS: tl.constexpr,
    HAS_BN_WEIGHT: tl.constexpr,
    HAS_BN_BIAS: tl.constexpr,
    HAS_GRAD_POOLED: tl.constexpr,
    ACT: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    NEED_PARTIALS: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program (pixel tile, channel block): dy0 into the fp32 (B, out_h, out_w, C) workspace DY and, if NEED_PARTIALS,
    # the tile's sums of g, g * xhat and dy0 into PARTIAL[tile, 0:3, c]
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    tile = tl.program_id(0)
    b, oh, ow = _tile_pixels(tile, tiles_w, tiles_per_image, BLOCK_H, BLOCK_W)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    pixel_ok = (oh < out_h) & (ow < out_w)
    y0 = _conv_tile(
        X + b * stride_xb,
        WEIGHT,
        CONV_BIAS,
        oh,
        ow,
        pixel_ok,
        channels,
        C,
        H,
        W,
        stride_xc,
        stride_xh,
        stride_xw,
        ksize,
        pad_t,
        pad_l,
        HAS_CONV_BIAS,
        STRIDE,
        BLOCK_P,
        BLOCK_C,
    )
    xhat, y, rstd, gamma = _normalize(y0, MEAN, VAR, BN_WEIGHT, BN_BIAS, channels, C, eps, HAS_BN_WEIGHT, HAS_BN_BIAS)
    valid = channel_ok[:, None] & pixel_ok[None, :]
    g = _grad_tile(
        GRAD_OUT,
        GRAD_POOLED,
        b,
        oh,
        ow,
        valid,
        channels,
        C,
        y,
        stride_gb,
        stride_gh,
        stride_gw,
        stride_gc,
        HAS_GRAD_POOLED,
        ACT,
    )
    scale = rstd * gamma
    if BATCH_STATS:
        # the batch statistics' own gradient: dy0 = rstd * gamma * (g - mean(g) - xhat * mean(g * xhat))
        mean_g = tl.load(MEAN_G + channels, mask=channel_ok, other=0.0)
        mean_g_xhat = tl.load(MEAN_G_XHAT + channels, mask=channel_ok, other=0.0)
        dy = tl.where(valid, scale[:, None] * (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]), 0.0)
    else:
        dy = scale[:, None] * g
    dy_offsets = channels[:, None] + ((oh * out_w + ow) * C)[None, :]
    tl.store(DY + b * out_h * out_w * C + dy_offsets, dy, mask=valid)
    if NEED_PARTIALS:
        row = PARTIAL + tile.to(tl.int64) * 3 * C
        tl.store(row + channels, tl.sum(g, axis=1), mask=channel_ok)
        tl.store(row + C + channels, tl.sum(g * xhat, axis=1), mask=channel_ok)
        tl.store(row + 2 * C + channels, tl.sum(dy, axis=1), mask=channel_ok)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _mbconv_se_bwd_dx_kernel(
    GRAD_X,
    DY,
    WEIGHT,
    C,
    H,
    W,
    out_h,
    out_w,
    ksize,
    pad_t,
    pad_l,
    stride_gxb,
    stride_gxc,
    stride_gxh,
    stride_gxw,
    tiles_w,
    tiles_per_image,
    STRIDE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grad_x[b, c, h, w] = sum over the taps (u, v) with h = i * S - pad_t + u, w = j * S - pad_l + v for an output
    # pixel (i, j) of dy0[b, i, j, c] * weight[c, 0, u, v] (a gather). Program = (image, phase, tile of the phase's
    # sub-grid) x channel block: the phase (ph, pw) = (h % S, w % S) is the same for the whole tile, so the taps that
    # reach an output pixel are u = u0, u0 + S, ... with u0 = (ph + pad_t) % S (likewise v), and for tap number tu the
    # output row is i = (ph + pad_t - u0) / S + r - tu (r: the pixel's row in the sub-grid). tiles_per_image counts
    # the tiles of one phase.
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    b = (pid // (STRIDE * STRIDE * tiles_per_image)).to(tl.int64)
    phase = (pid // tiles_per_image) % (STRIDE * STRIDE)
    t = pid % tiles_per_image
    ph = phase // STRIDE
    pw = phase % STRIDE
    p = tl.arange(0, BLOCK_P)
    r = (t // tiles_w) * BLOCK_H + p // BLOCK_W  # row / column in the phase's sub-grid
    q = (t % tiles_w) * BLOCK_W + p % BLOCK_W
    hh = ph + STRIDE * r
    ww = pw + STRIDE * q
    u0 = (ph + pad_t) % STRIDE
    v0 = (pw + pad_l) % STRIDE
    taps_h = (ksize - u0 + STRIDE - 1) // STRIDE
    taps_w = (ksize - v0 + STRIDE - 1) // STRIDE
    i0 = (ph + pad_t - u0) // STRIDE + r  # output row / column of the first tap
    j0 = (pw + pad_l - v0) // STRIDE + q
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    pixel_ok = (hh < H) & (ww < W)
    dy_image = DY + b * out_h * out_w * C
    first = ((i0 * out_w + j0) * C)[:, None] + channels[None, :]
    weight_ptrs = WEIGHT + channels * (ksize * ksize)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for tu in range(taps_h):
        i = i0 - tu
        i_ok = pixel_ok & (i >= 0) & (i < out_h)
        u = u0 + STRIDE * tu
        for tv in range(taps_w):
            j = j0 - tv
            src_ok = i_ok & (j >= 0) & (j < out_w)
            shift = -(tu * out_w + tv) * C
            dy = tl.load(dy_image + (first + shift), mask=src_ok[:, None] & channel_ok[None, :], other=0.0)
            w = tl.load(weight_ptrs + (u * ksize + v0 + STRIDE * tv), mask=channel_ok, other=0.0)
            acc += dy * w.to(tl.float32)[None, :]
    offsets = (hh * stride_gxh + ww * stride_gxw)[:, None] + (channels * stride_gxc)[None, :]
    tl.store(
        GRAD_X + b * stride_gxb + offsets,
        acc.to(GRAD_X.dtype.element_ty),
        mask=pixel_ok[:, None] & channel_ok[None, :],
    )


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _mbconv_se_bwd_dw_kernel(
    PARTIAL_W,
    DY,
    X,
    C,
    H,
    W,
    out_h,
    out_w,
    ksize,
    pad_t,
    pad_l,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    tiles_w,
    tiles_per_image,
    num_tiles,
    tiles_per_group,
    STRIDE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # program (group, tap row u, channel block): PARTIAL_W[group, c, u, v] = sum over the group's output pixels p of
    # dy0[p, c] * x[c, window(p) + (u, v)], all v at once (BLOCK_K >= ksize lanes); accumulated elementwise in a
    # (BLOCK_P, BLOCK_K, BLOCK_C) tile, reduced over pixels once at the end
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    group = tl.program_id(0)
    u = tl.program_id(1)
    channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    channel_offset = channels * stride_xc
    taps = tl.arange(0, BLOCK_K)
    tap_ok = taps < ksize
    acc = tl.zeros([BLOCK_P, BLOCK_K, BLOCK_C], dtype=tl.float32)
    tile_start = group * tiles_per_group
    tile_end = tl.minimum(tile_start + tiles_per_group, num_tiles)
    for tile in range(tile_start, tile_end):
        b, oh, ow = _tile_pixels(tile, tiles_w, tiles_per_image, BLOCK_H, BLOCK_W)
        pixel_ok = (oh < out_h) & (ow < out_w)
        dy_ptrs = DY + b * out_h * out_w * C + (((oh * out_w + ow) * C)[:, None] + channels[None, :])
        dy = tl.load(dy_ptrs, mask=pixel_ok[:, None] & channel_ok[None, :], other=0.0)
        h_in = oh * STRIDE - pad_t + u
        w_in = (ow * STRIDE - pad_l)[:, None] + taps[None, :]  # (BLOCK_P, BLOCK_K)
        in_ok = (pixel_ok & (h_in >= 0) & (h_in < H))[:, None] & (w_in >= 0) & (w_in < W) & tap_ok[None, :]
        pixel_offset = (h_in * stride_xh)[:, None] + w_in * stride_xw
        x_ptrs = X + b * stride_xb + (pixel_offset[:, :, None] + channel_offset[None, None, :])
        x = tl.load(x_ptrs, mask=in_ok[:, :, None] & channel_ok[None, None, :], other=0.0)
        acc += dy[:, None, :] * x.to(tl.float32)
    partial = tl.sum(acc, axis=0)  # (BLOCK_K, BLOCK_C)
    out_offsets = (channels[None, :] * ksize + u) * ksize + taps[:, None]
    tl.store(
        PARTIAL_W + group.to(tl.int64) * C * ksize * ksize + out_offsets,
        partial,
        mask=tap_ok[:, None] & channel_ok[None, :],
    )


# ---- configs (followed by the AOT specs: tests/gpu_check/specs/mbconv_se.py) -------------------------------------


def _warps_for(elements: int, per_thread: int = 16) -> int:
    # ~per_thread fp32 tile elements per thread, 1 to 8 warps
    return max(1, min(8, elements // (32 * per_thread)))


def _block_c(channels: int, gpu_max: int, interp: bool) -> int:
    if interp:
        return min(triton.next_power_of_2(channels), INTERP_MAX_BLOCK_C)
    return max(MIN_BLOCK_C, min(triton.next_power_of_2(channels), gpu_max))


def _pixel_tile(block_p: int, height: int, width: int, interp: bool) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) with BLOCK_H * BLOCK_W == block_p (GPU: width 8; interpreter: fitted to the map)."""
    if interp:
        block_w = min(triton.next_power_of_2(width), block_p)
        block_h = min(triton.next_power_of_2(height), block_p // block_w)
        return block_h, block_w
    block_w = min(GPU_BLOCK_W, block_p)
    return block_p // block_w, block_w


def _fwd_config(channels: int, channels_last: bool, interp: bool, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the forward-family kernels (stats, apply; ``backward``: reduce, dy).

    GPU, channels-last x: 64 pixels x 16 / 32 / 64 channels, 16 fp32 per thread (threads run along channels). NCHW x:
    256 pixels (32 x 8) x 8 channels, 8 fp32 per thread (threads run along pixels, so each one holds several
    channels of the tile and loads their weights at every tap: few channels per tile and per thread; at 16 per
    thread fp32 specialisations reached the 128-register cap on sm_90). The backward kernels, which keep xhat, g and
    dy alive beside the conv, take half the pixels at 8 fp32 per thread.
    """
    if interp:
        block_c = min(triton.next_power_of_2(channels), INTERP_MAX_BLOCK_C)
        return max(1, min(INTERP_MAX_BLOCK_P, INTERP_TILE_ELEMENTS // block_c)), block_c, 4
    if channels_last:
        block_c, block_p = max(MIN_BLOCK_C, min(triton.next_power_of_2(channels), FWD_MAX_BLOCK_C)), CL_BLOCK_P
    else:
        block_c, block_p = NCHW_BLOCK_C, NCHW_BLOCK_P
    per_thread = 16 if channels_last else NCHW_PER_THREAD
    if backward:
        block_p, per_thread = block_p // BWD_SPLIT, 8
    return block_p, block_c, _warps_for(block_p * block_c, per_thread)


def _dy_config(channels: int, channels_last: bool, interp: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the backward reduce / dy kernels."""
    return _fwd_config(channels, channels_last, interp, backward=True)


def _dx_config(channels: int, interp: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the grad_x kernel."""
    block_c = _block_c(channels, DX_MAX_BLOCK_C, interp)
    tile, max_p = (INTERP_TILE_ELEMENTS, INTERP_MAX_BLOCK_P) if interp else (TILE_ELEMENTS, MAX_BLOCK_P)
    block_p = max(1, min(max_p, tile // block_c))
    return block_p, block_c, 4 if interp else _warps_for(block_p * block_c)


def _dw_config(channels: int, ksize: int, interp: bool) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_K, num_warps) of the grad_weight kernel."""
    block_k = triton.next_power_of_2(ksize)
    block_c = _block_c(channels, DW_MAX_BLOCK_C, interp)
    tile, max_p = (INTERP_TILE_ELEMENTS * 4, INTERP_MAX_BLOCK_P) if interp else (DW_TILE_ELEMENTS, MAX_BLOCK_P)
    block_p = max(1, min(max_p, tile // (block_c * block_k)))
    return block_p, block_c, block_k, 4 if interp else _warps_for(block_p * block_c * block_k, per_thread=8)


def _dw_groups(num_tiles: int, ksize: int, channel_blocks: int, interp: bool) -> tuple[int, int]:
    """(groups, tiles_per_group) of the grad_weight partition: from the shape only (deterministic)."""
    if interp:
        groups = min(num_tiles, INTERP_DW_GROUPS)
    else:
        groups = max(1, min(num_tiles, MAX_GRID_Y, triton.cdiv(DW_TARGET_PROGRAMS, ksize * channel_blocks)))
    tiles_per_group = triton.cdiv(num_tiles, groups)
    return triton.cdiv(num_tiles, tiles_per_group), tiles_per_group


# ---- launchers --------------------------------------------------------------------------------------------------


def _check_image_span(name: str, t: torch.Tensor) -> None:
    # offsets inside one image are int32 in the kernels (the batch offset is int64)
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
    if max(span, t[0].numel() if t.shape[0] else 0) >= 2**31:
        raise ValueError(f"{name}: one image spans {span} >= 2**31 elements (int32 offsets inside an image)")


def _grid(num_tiles: int, channels: int, block_c: int) -> tuple[int, int]:
    channel_blocks = triton.cdiv(channels, block_c)
    if channel_blocks > MAX_GRID_Y:
        raise ValueError(f"{channels} channels need {channel_blocks} channel blocks > {MAX_GRID_Y}")
    if num_tiles >= 2**31:
        raise ValueError(f"{num_tiles} pixel tiles >= 2**31 programs")
    return num_tiles, channel_blocks


def _tiles(height: int, width: int, block_h: int, block_w: int) -> tuple[int, int]:
    """(tiles_w, tiles_per_image) of a height x width map cut into block_h x block_w tiles."""
    tiles_w = triton.cdiv(width, block_w)
    return tiles_w, triton.cdiv(height, block_h) * tiles_w


def _tile_counts(out_h: int, out_w: int, block_h: int, block_w: int, device) -> torch.Tensor:
    """(tiles_per_image, 1) float32: the output pixels of each tile (border tiles are partial)."""
    rows = (out_h - block_h * torch.arange(triton.cdiv(out_h, block_h), device=device)).clamp_(max=block_h)
    cols = (out_w - block_w * torch.arange(triton.cdiv(out_w, block_w), device=device)).clamp_(max=block_w)
    return (rows[:, None] * cols[None, :]).reshape(-1, 1).to(torch.float32)


def _merge_tile_stats(partial: torch.Tensor, counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var) from per-tile (mean, M2) partials (B, tiles, 2, C) and counts (tiles, 1): Chan
    et al.'s parallel merge, ``M2 = sum_t M2_t + sum_t n_t (mean_t - mean)^2`` (no ``E[y^2] - E[y]^2``)."""
    tile_mean, tile_m2 = partial[:, :, 0], partial[:, :, 1]
    mean = (tile_mean * counts).sum((0, 1)) / total
    m2 = tile_m2.sum((0, 1)) + (counts * (tile_mean - mean).square()).sum((0, 1))
    return mean, m2 / total


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
    """Triton backend of ``pykernels::mbconv_se_fwd``: ``z = act(BatchNorm(dwconv(x) + conv_bias))`` and its SE sums.

    Args:
        x: (B, C, H, W) float16 / bfloat16 / float32, NCHW or channels-last (any strides, read in place).
        weight: (C, 1, k, k), k in {3, 5, 7}; conv_bias, bn_weight, bn_bias: (C,) or None; running_mean, running_var:
            (C,) (used unless batch_stats). Each in x's dtype or float32.
        eps, stride (1 or 2), pad_t, pad_l, out_h, out_w, act, batch_stats: as in csrc/ops.cpp.

    Returns:
        (out (B, out_h, out_w, C) contiguous in x's dtype, pooled (B, C) float32, mean (C,), var (C,) float32: the
        batch statistics, or (0,) unless batch_stats).
    """
    ksize = weight.shape[-1]  # the arguments were checked by the op (pykernels/ops/mbconv_se.py)
    _check_image_span("x", x)
    batch, channels, height, width = x.shape
    device = x.device
    out = torch.empty((batch, out_h, out_w, channels), dtype=x.dtype, device=device)
    _check_image_span("out", out)
    empty = torch.empty((0,), dtype=torch.float32, device=device)
    if batch == 0:
        stats = torch.full((channels,), float("nan"), device=device) if batch_stats else empty
        pooled = torch.zeros((0, channels), dtype=torch.float32, device=device)
        return out, pooled, stats, stats.clone()
    weight = weight.contiguous()
    interp = interpreting(x)
    block_p, block_c, num_warps = _fwd_config(channels, x.stride(1) == 1, interp)
    block_h, block_w = _pixel_tile(block_p, out_h, out_w, interp)
    tiles_w, tiles_per_image = _tiles(out_h, out_w, block_h, block_w)
    grid = _grid(batch * tiles_per_image, channels, block_c)
    conv_bias_arg = conv_bias if conv_bias is not None else weight
    geometry = (channels, height, width, out_h, out_w, ksize, pad_t, pad_l, *x.stride(), tiles_w, tiles_per_image)
    launch = dict(STRIDE=stride, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps)
    if batch_stats:
        # pass 1: per-tile (mean, M2), merged in torch
        partial = torch.empty((batch, tiles_per_image, 2, channels), dtype=torch.float32, device=device)
        _mbconv_se_fwd_stats_kernel[grid](
            partial, x, weight, conv_bias_arg, *geometry, HAS_CONV_BIAS=conv_bias is not None, **launch, maxnreg=MAXNREG
        )
        counts = _tile_counts(out_h, out_w, block_h, block_w, device)
        mean, var = _merge_tile_stats(partial, counts, batch * out_h * out_w)
    else:
        mean, var = running_mean.float().contiguous(), running_var.float().contiguous()
    # pass 2: normalise, activate, store; per-tile SE sums
    partial_pooled = torch.empty((batch, tiles_per_image, channels), dtype=torch.float32, device=device)
    _mbconv_se_fwd_kernel[grid](
        out,
        partial_pooled,
        x,
        weight,
        conv_bias_arg,
        bn_weight if bn_weight is not None else weight,
        bn_bias if bn_bias is not None else weight,
        mean,
        var,
        *geometry,
        float(eps),
        HAS_CONV_BIAS=conv_bias is not None,
        HAS_BN_WEIGHT=bn_weight is not None,
        HAS_BN_BIAS=bn_bias is not None,
        ACT=act,
        **launch,
        maxnreg=MAXNREG,
    )
    pooled = partial_pooled.sum(1)
    if not batch_stats:
        return out, pooled, empty, empty.clone()
    return out, pooled, mean, var


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
    """Triton backend of ``pykernels::mbconv_se_bwd`` (recomputes the conv from x).

    Args:
        grad_out: (B, out_h, out_w, C), any float dtype and strides. grad_pooled: (B, C) float32 contiguous or None.
        x, weight, conv_bias, bn_weight, bn_bias: as in :func:`mbconv_se_fwd`. mean, var: (C,) the statistics the
        forward used (running, or the batch's it returned). need_grad_x / need_grad_params: which outputs to compute.

    Returns:
        (grad_x (x's shape, dtype and layout), grad_weight (C, 1, k, k), grad_conv_bias, grad_bn_weight, grad_bn_bias
        (C,)), each parameter grad in its parameter's dtype; a (0,) tensor of x's dtype where not needed or the
        parameter is None.
    """
    ksize = weight.shape[-1]  # the arguments were checked by the op (pykernels/ops/mbconv_se.py)
    _check_image_span("x", x)
    _check_image_span("grad_out", grad_out)
    batch, channels, height, width = x.shape
    out_h, out_w = grad_out.shape[1], grad_out.shape[2]
    device = x.device
    empty = x.new_empty((0,))
    grad_x = torch.empty_like(x) if need_grad_x else empty
    grads = [empty.new_empty((0,)) for _ in range(4)]
    if need_grad_params:
        grads[0] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        for i, p in enumerate((conv_bias, bn_weight, bn_bias), start=1):
            if p is not None:
                grads[i] = torch.zeros_like(p)
    if not (need_grad_x or need_grad_params) or batch == 0:
        if need_grad_x:
            grad_x.zero_()
        return (grad_x, *grads)
    weight = weight.contiguous()
    mean, var = mean.float().contiguous(), var.float().contiguous()
    if grad_pooled is not None:
        grad_pooled = grad_pooled.float().contiguous()  # the op's already: a no-op
    interp = interpreting(x)
    total = batch * out_h * out_w

    # 1. dy0 (fp32 workspace) and the per-tile partial sums of the parameter grads; with batch statistics first the
    #    means of g and g * xhat that dy0 needs
    block_p, block_c, num_warps = _dy_config(channels, x.stride(1) == 1, interp)
    block_h, block_w = _pixel_tile(block_p, out_h, out_w, interp)
    tiles_w, tiles_per_image = _tiles(out_h, out_w, block_h, block_w)
    num_tiles = batch * tiles_per_image
    grid = _grid(num_tiles, channels, block_c)
    tensors = (
        grad_out,
        grad_pooled if grad_pooled is not None else mean,
        x,
        weight,
        conv_bias if conv_bias is not None else weight,
        bn_weight if bn_weight is not None else weight,
        bn_bias if bn_bias is not None else weight,
        mean,
        var,
    )
    g_strides = (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3))
    geometry = (channels, height, width, out_h, out_w, ksize, pad_t, pad_l, *x.stride(), *g_strides)
    geometry += (tiles_w, tiles_per_image, float(eps))
    flags = dict(
        HAS_CONV_BIAS=conv_bias is not None,
        HAS_BN_WEIGHT=bn_weight is not None,
        HAS_BN_BIAS=bn_bias is not None,
        HAS_GRAD_POOLED=grad_pooled is not None,
        ACT=act,
    )
    launch = dict(STRIDE=stride, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps)
    if batch_stats:
        partial = torch.empty((num_tiles, 2, channels), dtype=torch.float32, device=device)
        _mbconv_se_bwd_reduce_kernel[grid](partial, *tensors, *geometry, **flags, **launch, maxnreg=MAXNREG)
        mean_g, mean_g_xhat = partial.sum(0) / total
    else:
        mean_g = mean_g_xhat = mean  # unused
    dy = torch.empty((batch, out_h, out_w, channels), dtype=torch.float32, device=device)
    partial = torch.empty((num_tiles, 3, channels) if need_grad_params else (1,), dtype=torch.float32, device=device)
    _mbconv_se_bwd_dy_kernel[grid](
        dy,
        partial,
        *tensors,
        mean_g,
        mean_g_xhat,
        *geometry,
        **flags,
        BATCH_STATS=batch_stats,
        NEED_PARTIALS=need_grad_params,
        **launch,
        maxnreg=MAXNREG,
    )

    # 2. grad_x: transposed strided depthwise conv of dy0 (gather, per stride phase), in x's layout
    if need_grad_x:
        block_p, block_c, num_warps = _dx_config(channels, interp)
        sub_h, sub_w = triton.cdiv(height, stride), triton.cdiv(width, stride)  # one phase's rows / columns
        block_h, block_w = _pixel_tile(block_p, sub_h, sub_w, interp)
        tiles_w, tiles_per_phase = _tiles(sub_h, sub_w, block_h, block_w)
        _mbconv_se_bwd_dx_kernel[_grid(batch * stride * stride * tiles_per_phase, channels, block_c)](
            grad_x,
            dy,
            weight,
            channels,
            height,
            width,
            out_h,
            out_w,
            ksize,
            pad_t,
            pad_l,
            *grad_x.stride(),
            tiles_w,
            tiles_per_phase,
            STRIDE=stride,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            BLOCK_C=block_c,
            num_warps=num_warps,
            maxnreg=MAXNREG,
        )

    if need_grad_params:
        # 3. grad_weight: per-group partials over a shape-only partition, then an ordered torch sum
        block_p, block_c, block_k, num_warps = _dw_config(channels, ksize, interp)
        block_h, block_w = _pixel_tile(block_p, out_h, out_w, interp)
        tiles_w, tiles_per_image = _tiles(out_h, out_w, block_h, block_w)
        dw_tiles = batch * tiles_per_image
        _, channel_blocks = _grid(dw_tiles, channels, block_c)
        groups, tiles_per_group = _dw_groups(dw_tiles, ksize, channel_blocks, interp)
        partial_w = torch.empty((groups, channels, ksize, ksize), dtype=torch.float32, device=device)
        _mbconv_se_bwd_dw_kernel[(groups, ksize, channel_blocks)](
            partial_w,
            dy,
            x,
            channels,
            height,
            width,
            out_h,
            out_w,
            ksize,
            pad_t,
            pad_l,
            *x.stride(),
            tiles_w,
            tiles_per_image,
            dw_tiles,
            tiles_per_group,
            STRIDE=stride,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            BLOCK_C=block_c,
            BLOCK_K=block_k,
            num_warps=num_warps,
            maxnreg=MAXNREG,
        )
        grads[0] = partial_w.sum(0).view(channels, 1, ksize, ksize).to(weight.dtype)
        sums = partial.sum(0)  # (3, C): g, g * xhat, dy0
        if conv_bias is not None:
            grads[1] = sums[2].to(conv_bias.dtype)
        if bn_weight is not None:
            grads[2] = sums[1].to(bn_weight.dtype)
        if bn_bias is not None:
            grads[3] = sums[0].to(bn_bias.dtype)
    return (grad_x, *grads)
