"""Triton kernels of ``DWConvLayerNorm``: a depthwise k x k convolution fused with LayerNorm over channels.

ConvNeXt's block front (Liu et al. 2022, "A ConvNet for the 2020s"): ``out[b, h, w, :] = LayerNorm_C(dwconv_kxk(x)
[b, :, h, w] + conv_bias)``, stride 1, zero "same" padding ``k // 2``, odd ``k`` in 3..13.
Contract (shapes, dtypes, outputs) in csrc/ops.cpp; the launchers ``dwconv_ln_fwd`` / ``dwconv_ln_bwd`` have the
signatures of the compiled ``pykernels::dwconv_ln_fwd`` / ``dwconv_ln_bwd`` ops and of pykernels/reference/dwconv_ln.py;
the op (pykernels/ops/dwconv_ln.py) checks the arguments, the launchers only the kernels' own limits.

Tiling: a program owns a ``BLOCK_H x BLOCK_W`` tile of pixels of one image (flattened to ``BLOCK_P`` rows) times a
block of ``BLOCK_C`` channels. The k x k taps loop accumulates the conv in fp32 in registers, row-major over the
taps, then adds ``conv_bias``; ``k`` is a runtime argument (one compiled kernel serves k = 3..13, and ptxas keeps
the loops rolled: with a constexpr ``k`` the unrolled taps pushed chunked specialisations into register spills). ``x``
is read through its four strides (NCHW or channels-last in place, no copy). Offsets: the image base ``b * stride_b``
is int64 (``B * C * H * W`` may pass 2**31), offsets inside an image int32 (the launchers check ``< 2**31``).

* forward (``_dwconv_ln_fwd_kernel``): when ``next_pow2(C) <= SINGLE_PASS_MAX_CHANNELS`` the program holds every
  channel of its pixels in registers: conv, exact two-pass mean / biased variance, normalised store. The channel row
  is one ``next_pow2(C)`` tile, or three ``BLOCK_C = next_pow2(C) / 4`` tiles (``THIRDS``) when ``C <= 3 BLOCK_C``:
  ConvNeXt's C = 96 * 2^n fills 3 x 32 * 2^n lanes exactly instead of idling a quarter of a 128 * 2^n tile
  (``_channel_tiles``; Triton tiles are powers of two, three of them are not). Wider ``C`` is chunked:
  pass 1 computes the conv of each ``BLOCK_C`` chunk and merges the chunk's (mean, sum of squared deviations) into
  the pixel's running pair (Chan et al.'s parallel variance: no ``E[y^2] - E[y]^2`` cancellation); pass 2 recomputes
  the conv of each chunk and stores it normalised. Nothing unnormalised is ever written. ``mean`` / ``rstd`` (B, H,
  W) fp32; ``rstd = 1 / sqrt(var + eps)``.
* backward, three kernels and two torch sums (parameter grads deterministic: a fixed partition that depends on the
  shape only, partials reduced with ``Tensor.sum(0)``; no atomics):
  1. ``_dwconv_ln_bwd_dy_kernel``, same tiling as the forward (single pass or chunked in two passes): recomputes ``y``
     and ``xhat = (y - mean) * rstd``, ``dy = rstd * (gw - mean_c(gw) - xhat * mean_c(gw * xhat))`` with ``gw = g *
     ln_weight``, computed in fp32 and stored into a (B, H, W, C) workspace in x's dtype (fp16 / bf16 / fp32:
     ``dy_dtype``), and per-tile partial sums of ``g * xhat``, ``g`` and the fp32 ``dy`` (grad_ln_weight,
     grad_ln_bias, grad_conv_bias) into a (tiles, 3, C) fp32 buffer;
  2. ``_dwconv_ln_bwd_dx_kernel``: ``grad_x`` = the transposed depthwise conv of ``dy``, written in ``x``'s layout;
  3. ``_dwconv_ln_bwd_dw_kernel``: program = (pixel group, tap row ``i``, channel block); accumulates ``dy[p, c] *
     x[p + (i - r, j - r), c]`` for all ``j`` at once in a (BLOCK_P, next_pow2(k), BLOCK_C) register tile over the
     group's pixel tiles, and writes one (C, k, k) partial of ``grad_weight`` per group.
  The grad kernels load ``dy`` and accumulate in fp32. The transient workspace is ``B * H * W * C`` elements of x's
  dtype (dy: 2 bytes each for fp16 / bf16, half of an fp32 workspace; rounding dy to x's dtype is the rounding eager
  PyTorch's LayerNorm backward does to its grad_input) plus partial sums; what autograd saves stays ``x``, ``mean``,
  ``rstd``.

Tiles, warps and the chunking threshold come from the tables below (``_fwd_config``, ``_dx_config``, ``_dw_config``),
which the AOT gate's specs (tests/gpu_check/specs/dwconv_ln.py) follow; every launch passes ``maxnreg=MAXNREG`` (128:
two 8-warp programs per SM). fp16 / bf16 / fp32 inputs (parameters in x's dtype or fp32), fp32 accumulation; FMA
contraction is left on (``enable_fp_fusion`` default): the conv taps become fused multiply-adds, one rounding per tap
instead of two. Under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``) the launchers pick bigger tiles
(fewer, larger numpy programs) but the same chunking threshold and three-tile rows, so both paths are exercised
there too. No
``tl.dot``: bf16 runs in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_GRID_Y, interpreting

# no channel limit: C above SINGLE_PASS_MAX_CHANNELS (rounded up to a power of 2) runs the chunked two-pass path
SINGLE_PASS_MAX_CHANNELS = 1024
CHUNK_CHANNELS = 256  # BLOCK_C of the chunked path (ConvNeXt-L/XL: 1536 = 6 chunks, 2048 = 8)
TILE_ELEMENTS = 4096  # pixels x channels of one program's fp32 tile on GPU (16 per thread at 8 warps)
MAX_BLOCK_P = 64  # pixels per program on GPU (an 8 x 8 tile)
GPU_BLOCK_W = 8  # tile width on GPU: ConvNeXt maps (56, 28, 14, 7) waste <= 1/8 of a tile row
DX_MAX_BLOCK_C = 128
DX_MIN_BLOCK_C = 32  # grad_x channel blocks: 32 to 128 lanes, picked to pad C the least
MIN_THIRD_BLOCK_C = 8  # the smallest tile of a three-tile channel row (_channel_tiles)
DW_MAX_BLOCK_C = 32
DW_TARGET_PROGRAMS = 1024  # grad_weight partition: about this many programs, from the shape only (deterministic)
# the interpreter runs each program as numpy ops over its whole tile: big tiles, few programs
INTERP_TILE_ELEMENTS = 16384
INTERP_MAX_BLOCK_P = 256
INTERP_DW_GROUPS = 1
# Launch option: an explicit register budget for ptxas. Without one, ptxas picked its own target for some 8-warp
# chunked / dy specialisations (64 or 80 registers on sm_80) and spilled a few bytes (AOT gate); with 255 it took up to
# 255 (one program per SM). 128 = two 8-warp programs per SM, and no spills on any gated specialisation.
MAXNREG = 128


def _pad_taps(ksize: int) -> int:
    return triton.next_power_of_2(ksize)


# ---- device helpers ---------------------------------------------------------------------------------------------
# Offsets: each program's image base is an int64 scalar (b * batch stride: B * C * H * W may pass 2**31); offsets
# inside one image are int32 (the launchers check that an image spans < 2**31 elements).


@triton.jit
def _tile_pixels(tile, tiles_w, tiles_per_image, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # tile index -> (image b (int64), rows hh, columns ww) of its BLOCK_H x BLOCK_W pixels, flattened row-major
    b = (tile // tiles_per_image).to(tl.int64)
    t = tile % tiles_per_image
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    hh = (t // tiles_w) * BLOCK_H + p // BLOCK_W
    ww = (t % tiles_w) * BLOCK_W + p % BLOCK_W
    return b, hh, ww


@triton.jit
def _conv_tile(
    X_IMAGE,
    WEIGHT,
    CONV_BIAS,
    hh,
    ww,
    channels,
    C,
    H,
    W,
    stride_xc,
    stride_xh,
    stride_xw,
    ksize,
    HAS_CONV_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # y[p, c] = sum_{i, j} x[b, c, hh + i - r, ww + j - r] * weight[c, 0, i, j] (+ conv_bias[c]), fp32, taps in
    # row-major order; zero outside the image and for channels >= C. Pixels outside the image get values that are
    # never stored (their taps are still clamped to in-image addresses by the masks).
    pad = ksize // 2
    channel_ok = channels < C
    # offsets of the centre taps, built once; each tap adds a scalar shift
    centre = (hh * stride_xh + ww * stride_xw)[:, None] + (channels * stride_xc)[None, :]
    weight_ptrs = WEIGHT + channels * (ksize * ksize)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for i in range(ksize):
        h_in = hh + (i - pad)
        h_ok = (h_in >= 0) & (h_in < H)
        for j in range(ksize):
            w_in = ww + (j - pad)
            pixel_ok = h_ok & (w_in >= 0) & (w_in < W)
            shift = (i - pad) * stride_xh + (j - pad) * stride_xw
            x = tl.load(X_IMAGE + (centre + shift), mask=pixel_ok[:, None] & channel_ok[None, :], other=0.0)
            w = tl.load(weight_ptrs + (i * ksize + j), mask=channel_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    if HAS_CONV_BIAS:
        acc += tl.load(CONV_BIAS + channels, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _load_channel_vector(PTR, channels, C, HAS: tl.constexpr, DEFAULT: tl.constexpr):
    # a (C,) parameter as fp32 [BLOCK_C] (DEFAULT where absent / past C)
    if HAS:
        return tl.load(PTR + channels, mask=channels < C, other=DEFAULT).to(tl.float32)
    else:
        return tl.full(channels.shape, DEFAULT, tl.float32)


@triton.jit
def _store_normalised(
    deviation,
    channels,
    OUT_IMAGE,
    out_rows,
    pixel_ok,
    rstd,
    LN_WEIGHT,
    LN_BIAS,
    C,
    HAS_LN_WEIGHT: tl.constexpr,
    HAS_LN_BIAS: tl.constexpr,
):
    # out[p, c] = (y - mean) * rstd * ln_weight + ln_bias for the tile's channels, in OUT's dtype
    ln_w = _load_channel_vector(LN_WEIGHT, channels, C, HAS_LN_WEIGHT, 1.0)
    ln_b = _load_channel_vector(LN_BIAS, channels, C, HAS_LN_BIAS, 0.0)
    out = deviation * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
    out_mask = pixel_ok[:, None] & (channels < C)[None, :]
    tl.store(OUT_IMAGE + (out_rows + channels[None, :]), out.to(OUT_IMAGE.dtype.element_ty), mask=out_mask)


# ---- forward ----------------------------------------------------------------------------------------------------


@triton.jit
def _dwconv_ln_fwd_kernel(
    OUT,
    MEAN,
    RSTD,
    X,
    WEIGHT,
    CONV_BIAS,
    LN_WEIGHT,
    LN_BIAS,
    C,
    H,
    W,
    ksize,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    tiles_w,
    tiles_per_image,
    eps,
    HAS_CONV_BIAS: tl.constexpr,
    HAS_LN_WEIGHT: tl.constexpr,
    HAS_LN_BIAS: tl.constexpr,
    CHUNKED: tl.constexpr,
    THIRDS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # one program = BLOCK_H x BLOCK_W pixels of one image x all channels (in BLOCK_C chunks when CHUNKED)
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    b, hh, ww = _tile_pixels(tl.program_id(0), tiles_w, tiles_per_image, BLOCK_H, BLOCK_W)
    pixel_ok = (hh < H) & (ww < W)
    pixel = hh * W + ww  # in the image
    x_image = X + b * stride_xb
    out_image = OUT + b * H * W * C
    out_rows = (pixel * C)[:, None]
    lane = tl.arange(0, BLOCK_C)
    if CHUNKED:
        # pass 1: per chunk, exact (mean, M2) of the chunk, merged into the running pair (Chan et al.)
        mean = tl.zeros([BLOCK_P], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + lane
            y = _conv_tile(
                x_image,
                WEIGHT,
                CONV_BIAS,
                hh,
                ww,
                channels,
                C,
                H,
                W,
                stride_xc,
                stride_xh,
                stride_xw,
                ksize,
                HAS_CONV_BIAS,
                BLOCK_P,
                BLOCK_C,
            )
            count = tl.minimum(C - c0, BLOCK_C).to(tl.float32)
            chunk_mean = tl.sum(y, axis=1) / count
            deviation = tl.where((channels < C)[None, :], y - chunk_mean[:, None], 0.0)
            chunk_m2 = tl.sum(deviation * deviation, axis=1)
            seen = c0 * 1.0  # channels merged so far (every earlier chunk is full)
            total = seen + count
            delta = chunk_mean - mean
            mean += delta * (count / total)
            m2 += chunk_m2 + delta * delta * (seen * count / total)
        rstd = 1.0 / tl.sqrt_rn(m2 / C + eps)
        # pass 2: recompute each chunk's conv, normalise, store
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + lane
            y = _conv_tile(
                x_image,
                WEIGHT,
                CONV_BIAS,
                hh,
                ww,
                channels,
                C,
                H,
                W,
                stride_xc,
                stride_xh,
                stride_xw,
                ksize,
                HAS_CONV_BIAS,
                BLOCK_P,
                BLOCK_C,
            )
            ln_w = _load_channel_vector(LN_WEIGHT, channels, C, HAS_LN_WEIGHT, 1.0)
            ln_b = _load_channel_vector(LN_BIAS, channels, C, HAS_LN_BIAS, 0.0)
            out = (y - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
            out_mask = pixel_ok[:, None] & (channels < C)[None, :]
            tl.store(out_image + (out_rows + channels[None, :]), out.to(OUT.dtype.element_ty), mask=out_mask)
    else:
        # single pass: the whole channel row of each pixel stays in registers, as one BLOCK_C tile or (THIRDS) as
        # three tiles of channels [0, BLOCK_C), [BLOCK_C, 2 BLOCK_C), [2 BLOCK_C, 3 BLOCK_C) (C = 96 * 2^n: no
        # masked-off lane); y = 0 past C, so the sums see only real channels
        y0 = _conv_tile(
            x_image,
            WEIGHT,
            CONV_BIAS,
            hh,
            ww,
            lane,
            C,
            H,
            W,
            stride_xc,
            stride_xh,
            stride_xw,
            ksize,
            HAS_CONV_BIAS,
            BLOCK_P,
            BLOCK_C,
        )
        row_sum = tl.sum(y0, axis=1)
        if THIRDS:
            y1 = _conv_tile(
                x_image,
                WEIGHT,
                CONV_BIAS,
                hh,
                ww,
                BLOCK_C + lane,
                C,
                H,
                W,
                stride_xc,
                stride_xh,
                stride_xw,
                ksize,
                HAS_CONV_BIAS,
                BLOCK_P,
                BLOCK_C,
            )
            y2 = _conv_tile(
                x_image,
                WEIGHT,
                CONV_BIAS,
                hh,
                ww,
                2 * BLOCK_C + lane,
                C,
                H,
                W,
                stride_xc,
                stride_xh,
                stride_xw,
                ksize,
                HAS_CONV_BIAS,
                BLOCK_P,
                BLOCK_C,
            )
            row_sum += tl.sum(y1, axis=1) + tl.sum(y2, axis=1)
        mean = row_sum / C
        deviation0 = tl.where((lane < C)[None, :], y0 - mean[:, None], 0.0)
        row_m2 = tl.sum(deviation0 * deviation0, axis=1)
        if THIRDS:
            deviation1 = tl.where((BLOCK_C + lane < C)[None, :], y1 - mean[:, None], 0.0)
            deviation2 = tl.where((2 * BLOCK_C + lane < C)[None, :], y2 - mean[:, None], 0.0)
            row_m2 += tl.sum(deviation1 * deviation1, axis=1) + tl.sum(deviation2 * deviation2, axis=1)
        rstd = 1.0 / tl.sqrt_rn(row_m2 / C + eps)
        _store_normalised(
            deviation0, lane, out_image, out_rows, pixel_ok, rstd, LN_WEIGHT, LN_BIAS, C, HAS_LN_WEIGHT, HAS_LN_BIAS
        )
        if THIRDS:
            _store_normalised(
                deviation1,
                BLOCK_C + lane,
                out_image,
                out_rows,
                pixel_ok,
                rstd,
                LN_WEIGHT,
                LN_BIAS,
                C,
                HAS_LN_WEIGHT,
                HAS_LN_BIAS,
            )
            _store_normalised(
                deviation2,
                2 * BLOCK_C + lane,
                out_image,
                out_rows,
                pixel_ok,
                rstd,
                LN_WEIGHT,
                LN_BIAS,
                C,
                HAS_LN_WEIGHT,
                HAS_LN_BIAS,
            )
    stats_offset = b * H * W
    tl.store(MEAN + stats_offset + pixel, mean, mask=pixel_ok)
    tl.store(RSTD + stats_offset + pixel, rstd, mask=pixel_ok)


# ---- backward ---------------------------------------------------------------------------------------------------


@triton.jit
def _dy_chunk(
    GRAD_OUT_IMAGE, LN_WEIGHT, y, mean, rstd, g_rows, pixel_ok, channels, C, stride_gc, HAS_LN_WEIGHT: tl.constexpr
):
    # (xhat, g, gw) of one tile / chunk in fp32; g = 0 outside the image and past C
    xhat = (y - mean[:, None]) * rstd[:, None]
    g_mask = pixel_ok[:, None] & (channels < C)[None, :]
    g = tl.load(GRAD_OUT_IMAGE + (g_rows + (channels * stride_gc)[None, :]), mask=g_mask, other=0.0).to(tl.float32)
    if HAS_LN_WEIGHT:
        gw = g * _load_channel_vector(LN_WEIGHT, channels, C, True, 0.0)[None, :]
    else:
        gw = g
    return xhat, g, gw


@triton.jit
def _store_dy(
    xhat,
    g,
    gw,
    channels,
    DY_IMAGE,
    dy_rows,
    PARTIAL_ROW,
    pixel_ok,
    rstd,
    mean_gw,
    mean_gw_xhat,
    C,
    NEED_PARTIALS: tl.constexpr,
):
    # dy of one tile of channels (fp32, stored in DY's dtype) and, if NEED_PARTIALS, its sums over the tile's pixels
    # of g * xhat, g and the unrounded dy into PARTIAL_ROW[0:3, channels]
    channel_ok = channels < C
    dy = rstd[:, None] * (gw - mean_gw[:, None] - xhat * mean_gw_xhat[:, None])
    dy_mask = pixel_ok[:, None] & channel_ok[None, :]
    tl.store(DY_IMAGE + (dy_rows + channels[None, :]), dy.to(DY_IMAGE.dtype.element_ty), mask=dy_mask)
    if NEED_PARTIALS:
        tl.store(PARTIAL_ROW + channels, tl.sum(g * xhat, axis=0), mask=channel_ok)
        tl.store(PARTIAL_ROW + C + channels, tl.sum(g, axis=0), mask=channel_ok)
        tl.store(PARTIAL_ROW + 2 * C + channels, tl.sum(dy, axis=0), mask=channel_ok)


@triton.jit
def _dwconv_ln_bwd_dy_kernel(
    DY,
    PARTIAL,
    GRAD_OUT,
    X,
    WEIGHT,
    CONV_BIAS,
    LN_WEIGHT,
    MEAN,
    RSTD,
    C,
    H,
    W,
    ksize,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_gb,
    stride_gc,
    stride_gh,
    stride_gw,
    tiles_w,
    tiles_per_image,
    HAS_CONV_BIAS: tl.constexpr,
    HAS_LN_WEIGHT: tl.constexpr,
    NEED_PARTIALS: tl.constexpr,
    CHUNKED: tl.constexpr,
    THIRDS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # one program = one pixel tile x all channels: dy into the (B, H, W, C) workspace (x's dtype) and, if NEED_PARTIALS,
    # this tile's sums over its pixels of g * xhat, g, dy into PARTIAL[tile, 0:3, :]
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    tile = tl.program_id(0)
    b, hh, ww = _tile_pixels(tile, tiles_w, tiles_per_image, BLOCK_H, BLOCK_W)
    pixel_ok = (hh < H) & (ww < W)
    pixel = hh * W + ww
    x_image = X + b * stride_xb
    g_image = GRAD_OUT + b * stride_gb
    g_rows = (hh * stride_gh + ww * stride_gw)[:, None]
    dy_image = DY + b * H * W * C
    dy_rows = (pixel * C)[:, None]
    # rstd = 0 outside the image: xhat = 0 and dy = 0 there
    stats_offset = b * H * W
    mean = tl.load(MEAN + stats_offset + pixel, mask=pixel_ok, other=0.0)
    rstd = tl.load(RSTD + stats_offset + pixel, mask=pixel_ok, other=0.0)
    partial_row = PARTIAL + tile.to(tl.int64) * 3 * C
    lane = tl.arange(0, BLOCK_C)
    if CHUNKED:
        # pass 1: the per-pixel means over channels of gw and gw * xhat
        sum_gw = tl.zeros([BLOCK_P], dtype=tl.float32)
        sum_gw_xhat = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + lane
            y = _conv_tile(
                x_image,
                WEIGHT,
                CONV_BIAS,
                hh,
                ww,
                channels,
                C,
                H,
                W,
                stride_xc,
                stride_xh,
                stride_xw,
                ksize,
                HAS_CONV_BIAS,
                BLOCK_P,
                BLOCK_C,
            )
            xhat, g, gw = _dy_chunk(
                g_image, LN_WEIGHT, y, mean, rstd, g_rows, pixel_ok, channels, C, stride_gc, HAS_LN_WEIGHT
            )
            sum_gw += tl.sum(gw, axis=1)
            sum_gw_xhat += tl.sum(gw * xhat, axis=1)
        mean_gw = sum_gw / C
        mean_gw_xhat = sum_gw_xhat / C
        # pass 2: dy per chunk (conv recomputed), stores and partial sums
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + lane
            y = _conv_tile(
                x_image,
                WEIGHT,
                CONV_BIAS,
                hh,
                ww,
                channels,
                C,
                H,
                W,
                stride_xc,
                stride_xh,
                stride_xw,
                ksize,
                HAS_CONV_BIAS,
                BLOCK_P,
                BLOCK_C,
            )
            xhat, g, gw = _dy_chunk(
                g_image, LN_WEIGHT, y, mean, rstd, g_rows, pixel_ok, channels, C, stride_gc, HAS_LN_WEIGHT
            )
            _store_dy(
                xhat,
                g,
                gw,
                channels,
                dy_image,
                dy_rows,
                partial_row,
                pixel_ok,
                rstd,
                mean_gw,
                mean_gw_xhat,
                C,
                NEED_PARTIALS,
            )
    else:
        # single pass, one BLOCK_C tile or (THIRDS) three, as in the forward; gw = 0 past C, so the padded channels
        # drop out of both means
        y0 = _conv_tile(
            x_image,
            WEIGHT,
            CONV_BIAS,
            hh,
            ww,
            lane,
            C,
            H,
            W,
            stride_xc,
            stride_xh,
            stride_xw,
            ksize,
            HAS_CONV_BIAS,
            BLOCK_P,
            BLOCK_C,
        )
        xhat0, g0, gw0 = _dy_chunk(
            g_image, LN_WEIGHT, y0, mean, rstd, g_rows, pixel_ok, lane, C, stride_gc, HAS_LN_WEIGHT
        )
        sum_gw = tl.sum(gw0, axis=1)
        sum_gw_xhat = tl.sum(gw0 * xhat0, axis=1)
        if THIRDS:
            y1 = _conv_tile(
                x_image,
                WEIGHT,
                CONV_BIAS,
                hh,
                ww,
                BLOCK_C + lane,
                C,
                H,
                W,
                stride_xc,
                stride_xh,
                stride_xw,
                ksize,
                HAS_CONV_BIAS,
                BLOCK_P,
                BLOCK_C,
            )
            xhat1, g1, gw1 = _dy_chunk(
                g_image, LN_WEIGHT, y1, mean, rstd, g_rows, pixel_ok, BLOCK_C + lane, C, stride_gc, HAS_LN_WEIGHT
            )
            y2 = _conv_tile(
                x_image,
                WEIGHT,
                CONV_BIAS,
                hh,
                ww,
                2 * BLOCK_C + lane,
                C,
                H,
                W,
                stride_xc,
                stride_xh,
                stride_xw,
                ksize,
                HAS_CONV_BIAS,
                BLOCK_P,
                BLOCK_C,
            )
            xhat2, g2, gw2 = _dy_chunk(
                g_image, LN_WEIGHT, y2, mean, rstd, g_rows, pixel_ok, 2 * BLOCK_C + lane, C, stride_gc, HAS_LN_WEIGHT
            )
            sum_gw += tl.sum(gw1, axis=1) + tl.sum(gw2, axis=1)
            sum_gw_xhat += tl.sum(gw1 * xhat1, axis=1) + tl.sum(gw2 * xhat2, axis=1)
        mean_gw = sum_gw / C
        mean_gw_xhat = sum_gw_xhat / C
        _store_dy(
            xhat0,
            g0,
            gw0,
            lane,
            dy_image,
            dy_rows,
            partial_row,
            pixel_ok,
            rstd,
            mean_gw,
            mean_gw_xhat,
            C,
            NEED_PARTIALS,
        )
        if THIRDS:
            _store_dy(
                xhat1,
                g1,
                gw1,
                BLOCK_C + lane,
                dy_image,
                dy_rows,
                partial_row,
                pixel_ok,
                rstd,
                mean_gw,
                mean_gw_xhat,
                C,
                NEED_PARTIALS,
            )
            _store_dy(
                xhat2,
                g2,
                gw2,
                2 * BLOCK_C + lane,
                dy_image,
                dy_rows,
                partial_row,
                pixel_ok,
                rstd,
                mean_gw,
                mean_gw_xhat,
                C,
                NEED_PARTIALS,
            )


@triton.jit
def _dwconv_ln_bwd_dx_kernel(
    GRAD_X,
    DY,
    WEIGHT,
    C,
    H,
    W,
    ksize,
    stride_gxb,
    stride_gxc,
    stride_gxh,
    stride_gxw,
    tiles_w,
    tiles_per_image,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grad_x[b, c, h, w] = sum_{i, j} dy[b, h - i + r, w - j + r, c] * weight[c, 0, i, j]; program = pixel tile x
    # channel block (axis 1)
    pad = ksize // 2
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    b, hh, ww = _tile_pixels(tl.program_id(0), tiles_w, tiles_per_image, BLOCK_H, BLOCK_W)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    dy_image = DY + b * H * W * C
    centre = ((hh * W + ww) * C)[:, None] + channels[None, :]
    weight_ptrs = WEIGHT + channels * (ksize * ksize)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for i in range(ksize):
        h_src = hh - (i - pad)
        h_ok = (h_src >= 0) & (h_src < H)
        for j in range(ksize):
            w_src = ww - (j - pad)
            src_ok = h_ok & (w_src >= 0) & (w_src < W)
            shift = -((i - pad) * W + (j - pad)) * C
            dy = tl.load(dy_image + (centre + shift), mask=src_ok[:, None] & channel_ok[None, :], other=0.0)
            dy = dy.to(tl.float32)
            w = tl.load(weight_ptrs + (i * ksize + j), mask=channel_ok, other=0.0)
            acc += dy * w.to(tl.float32)[None, :]
    pixel_ok = (hh < H) & (ww < W)
    offsets = (hh * stride_gxh + ww * stride_gxw)[:, None] + (channels * stride_gxc)[None, :]
    grad_x = acc.to(GRAD_X.dtype.element_ty)
    tl.store(GRAD_X + b * stride_gxb + offsets, grad_x, mask=pixel_ok[:, None] & channel_ok[None, :])


@triton.jit
def _dwconv_ln_bwd_dw_kernel(
    PARTIAL_W,
    DY,
    X,
    C,
    H,
    W,
    ksize,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    tiles_w,
    tiles_per_image,
    num_tiles,
    tiles_per_group,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # program (group, tap row i, channel block): PARTIAL_W[group, c, i, j] = sum over the group's pixels p of
    # dy[p, c] * x[c, p + (i - r, j - r)], all j at once (BLOCK_K >= ksize lanes); accumulated elementwise in a
    # (BLOCK_P, BLOCK_K, BLOCK_C) tile, reduced over pixels once at the end
    pad = ksize // 2
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    group = tl.program_id(0)
    i = tl.program_id(1)
    channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    channel_offset = channels * stride_xc
    taps = tl.arange(0, BLOCK_K)
    tap_ok = taps < ksize
    acc = tl.zeros([BLOCK_P, BLOCK_K, BLOCK_C], dtype=tl.float32)
    tile_start = group * tiles_per_group
    tile_end = tl.minimum(tile_start + tiles_per_group, num_tiles)
    for tile in range(tile_start, tile_end):
        b, hh, ww = _tile_pixels(tile, tiles_w, tiles_per_image, BLOCK_H, BLOCK_W)
        pixel_ok = (hh < H) & (ww < W)
        dy_ptrs = DY + b * H * W * C + (((hh * W + ww) * C)[:, None] + channels[None, :])
        dy = tl.load(dy_ptrs, mask=pixel_ok[:, None] & channel_ok[None, :], other=0.0).to(tl.float32)
        h_in = hh + (i - pad)
        w_in = ww[:, None] + (taps - pad)[None, :]  # (BLOCK_P, BLOCK_K)
        in_ok = ((h_in >= 0) & (h_in < H))[:, None] & (w_in >= 0) & (w_in < W) & tap_ok[None, :]
        pixel_offset = (h_in * stride_xh)[:, None] + w_in * stride_xw
        x_ptrs = X + b * stride_xb + (pixel_offset[:, :, None] + channel_offset[None, None, :])
        x = tl.load(x_ptrs, mask=in_ok[:, :, None] & channel_ok[None, None, :], other=0.0)
        acc += dy[:, None, :] * x.to(tl.float32)
    partial = tl.sum(acc, axis=0)  # (BLOCK_K, BLOCK_C)
    out_offsets = (channels[None, :] * ksize + i) * ksize + taps[:, None]
    tl.store(
        PARTIAL_W + group.to(tl.int64) * C * ksize * ksize + out_offsets,
        partial,
        mask=tap_ok[:, None] & channel_ok[None, :],
    )


# ---- configs (followed by the AOT specs: tests/gpu_check/specs/dwconv_ln.py) -------------------------------------


def _warps_for(elements: int, per_thread: int = 16) -> int:
    # ~per_thread fp32 tile elements per thread at most, 1 to 8 warps (a power of two)
    return max(1, min(8, triton.next_power_of_2(triton.cdiv(elements, 32 * per_thread))))


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pixel_tile(block_p: int, height: int, width: int, interp: bool) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) with BLOCK_H * BLOCK_W == block_p (GPU: width 8; interpreter: fitted to the image)."""
    if interp:
        block_w = min(triton.next_power_of_2(width), block_p)
        block_h = min(triton.next_power_of_2(height), block_p // block_w)
        return block_h, block_w
    block_w = min(GPU_BLOCK_W, block_p)
    return block_p // block_w, block_w


def _channel_tiles(channels: int) -> tuple[int, bool]:
    """(BLOCK_C, THIRDS) of a single-pass row: ``3 * BLOCK_C`` lanes (THIRDS) when that is fewer than next_pow2(C).

    C = 96 * 2^n (ConvNeXt: 96, 192, 384, 768) runs as three tiles of 32 * 2^n channels with no masked-off lane,
    instead of one next_pow2(C) = 128 * 2^n tile with a quarter of its lanes idle; any C in (next_pow2(C) / 2,
    3 / 4 next_pow2(C)] takes the thirds (C = 40 -> 3 x 16 lanes, 48 -> 3 x 16), the rest one power-of-two tile.
    Tiles of fewer than MIN_THIRD_BLOCK_C channels stay one tile.
    """
    c_pad = triton.next_power_of_2(channels)
    if c_pad >= 4 * MIN_THIRD_BLOCK_C and 4 * channels <= 3 * c_pad:
        return c_pad // 4, True
    return c_pad, False


def _fwd_config(channels: int, interp: bool, backward: bool = False) -> tuple[int, int, bool, bool, int]:
    """(BLOCK_P, BLOCK_C, THIRDS, CHUNKED, num_warps) of the forward kernel (and of the dy kernel: ``backward``).

    GPU: single pass up to next_pow2(C) = SINGLE_PASS_MAX_CHANNELS, the row as one tile or three (``_channel_tiles``)
    with BLOCK_P (a power of two) * lanes <= TILE_ELEMENTS (at most 16 fp32 per thread); the chunked passes and the dy
    kernel, which keep more tiles alive, use half the tile (8 per thread at 8 warps; 16 per thread spilled or reached
    the 255-register cap on sm_80 in the AOT gate).
    """
    chunked = triton.next_power_of_2(channels) > SINGLE_PASS_MAX_CHANNELS
    block_c, thirds = (CHUNK_CHANNELS, False) if chunked else _channel_tiles(channels)
    lanes = 3 * block_c if thirds else block_c
    if interp:
        return (
            max(1, min(INTERP_MAX_BLOCK_P, _prev_power_of_2(INTERP_TILE_ELEMENTS // lanes))),
            block_c,
            thirds,
            chunked,
            4,
        )
    per_thread = 8 if (chunked or backward) else 16
    tile = TILE_ELEMENTS * per_thread // 16
    block_p = max(1, min(MAX_BLOCK_P, _prev_power_of_2(tile // lanes)))
    return block_p, block_c, thirds, chunked, _warps_for(block_p * lanes, per_thread)


def _dx_config(channels: int, interp: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the grad_x kernel.

    GPU: BLOCK_C is the power of two from DX_MIN_BLOCK_C to min(next_pow2(C), DX_MAX_BLOCK_C) (the widest on a tie)
    whose channel blocks pad C the least: C = 96 -> 32, 192 -> 64, 384 / 768 -> 128, no masked-off lane (where
    min(next_pow2(C), 128) idled 25% of them).
    """
    if interp:
        block_c = min(triton.next_power_of_2(channels), INTERP_TILE_ELEMENTS)
    else:
        widest = min(triton.next_power_of_2(channels), DX_MAX_BLOCK_C)
        candidates = [widest >> n for n in range(widest.bit_length()) if widest >> n >= min(widest, DX_MIN_BLOCK_C)]
        block_c = min(candidates, key=lambda bc: (triton.cdiv(channels, bc) * bc, -bc))
    tile, max_p = (INTERP_TILE_ELEMENTS, INTERP_MAX_BLOCK_P) if interp else (TILE_ELEMENTS, MAX_BLOCK_P)
    # the pixel tile of a min(next_pow2(C), DX_MAX_BLOCK_C) channel block (a narrower block takes fewer warps)
    block_p = max(1, min(max_p, tile // min(triton.next_power_of_2(channels), tile if interp else DX_MAX_BLOCK_C)))
    return block_p, block_c, _warps_for(block_p * block_c)


def _dw_config(channels: int, ksize: int, interp: bool) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_K, num_warps) of the grad_weight kernel."""
    block_k = _pad_taps(ksize)
    block_c = min(triton.next_power_of_2(channels), 512 if interp else DW_MAX_BLOCK_C)
    tile, max_p = (INTERP_TILE_ELEMENTS * 4, INTERP_MAX_BLOCK_P) if interp else (TILE_ELEMENTS, MAX_BLOCK_P)
    block_p = max(1, min(max_p, tile // (block_c * block_k)))
    return block_p, block_c, block_k, _warps_for(block_p * block_c * block_k)


# ---- launchers --------------------------------------------------------------------------------------------------


def dy_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """dtype of the backward's dy workspace: x's (fp16 / bf16 / fp32; the kernels accumulate in fp32 either way)."""
    return x_dtype if x_dtype in (torch.float16, torch.bfloat16) else torch.float32


def _check_image_span(name: str, t: torch.Tensor) -> None:
    # offsets inside one image are int32 in the kernels (the batch offset is int64)
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
    if max(span, t[0].numel() if t.shape[0] else 0) >= 2**31:
        raise ValueError(f"{name}: one image spans {span} >= 2**31 elements (int32 offsets inside an image)")


def _tiles(height: int, width: int, block_h: int, block_w: int) -> tuple[int, int]:
    tiles_w = triton.cdiv(width, block_w)
    return tiles_w, triton.cdiv(height, block_h) * tiles_w


def dwconv_ln_fwd(x, weight, conv_bias, ln_weight, ln_bias, eps: float):
    """Triton backend of ``pykernels::dwconv_ln_fwd``: ``LayerNorm_C(dwconv_kxk(x) + conv_bias)``.

    Args:
        x: (B, C, H, W) float32 / float16 / bfloat16, any strides (NCHW or channels-last read in place).
        weight: (C, 1, k, k), k odd in 3..13; conv_bias, ln_weight, ln_bias: (C,) or None. Each
            parameter in x's dtype or float32.
        eps: LayerNorm epsilon.

    Returns:
        (out (B, H, W, C) contiguous in x's dtype, mean (B, H, W) float32, rstd (B, H, W) float32).
    """
    ksize = weight.shape[-1]  # the arguments were checked by the op (pykernels/ops/dwconv_ln.py)
    _check_image_span("x", x)
    batch, channels, height, width = x.shape
    out = torch.empty((batch, height, width, channels), dtype=x.dtype, device=x.device)
    mean = torch.empty((batch, height, width), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if out.numel() == 0:
        return out, mean, rstd
    weight = weight.contiguous()
    interp = interpreting(x)
    block_p, block_c, thirds, chunked, num_warps = _fwd_config(channels, interp)
    block_h, block_w = _pixel_tile(block_p, height, width, interp)
    tiles_w, tiles_per_image = _tiles(height, width, block_h, block_w)
    _dwconv_ln_fwd_kernel[(batch * tiles_per_image,)](
        out,
        mean,
        rstd,
        x,
        weight,
        conv_bias if conv_bias is not None else weight,
        ln_weight if ln_weight is not None else weight,
        ln_bias if ln_bias is not None else weight,
        channels,
        height,
        width,
        ksize,
        *x.stride(),
        tiles_w,
        tiles_per_image,
        float(eps),
        HAS_CONV_BIAS=conv_bias is not None,
        HAS_LN_WEIGHT=ln_weight is not None,
        HAS_LN_BIAS=ln_bias is not None,
        CHUNKED=chunked,
        THIRDS=thirds,
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        BLOCK_C=block_c,
        num_warps=num_warps,
        maxnreg=MAXNREG,
    )
    return out, mean, rstd


def dwconv_ln_bwd(grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params):
    """Triton backend of ``pykernels::dwconv_ln_bwd`` (recomputes the conv; saves nothing of size B*H*W*C).

    Args:
        grad_out: (B, H, W, C), any float dtype and strides. x, weight, conv_bias, ln_weight, ln_bias: as in
            :func:`dwconv_ln_fwd` (conv_bias / ln_bias only for their presence and dtype). mean, rstd: (B, H, W)
            float32 from the forward. need_grad_x / need_grad_params: which outputs to compute.

    Returns:
        (grad_x (x's shape, dtype and layout), grad_weight (C, 1, k, k), grad_conv_bias, grad_ln_weight, grad_ln_bias
        (C,)), each parameter grad in its parameter's dtype; a (0,) tensor where not needed or the parameter is None.
    """
    ksize = weight.shape[-1]  # the arguments were checked by the op (pykernels/ops/dwconv_ln.py)
    _check_image_span("x", x)
    batch, channels, height, width = x.shape
    if tuple(grad_out.shape) != (batch, height, width, channels):
        raise ValueError(
            f"grad_out must be (B, H, W, C) = {(batch, height, width, channels)}; got {tuple(grad_out.shape)}"
        )
    _check_image_span("grad_out", grad_out)
    empty = x.new_empty((0,))
    grad_x = torch.empty_like(x) if need_grad_x else empty
    if not need_grad_params:
        grads = [empty] * 4
    else:
        grads = [
            torch.zeros_like(weight, memory_format=torch.contiguous_format),
            *(torch.zeros_like(p) if p is not None else empty for p in (conv_bias, ln_weight, ln_bias)),
        ]
    if not (need_grad_x or need_grad_params) or x.numel() == 0:
        if need_grad_x:
            grad_x.zero_()
        return (grad_x, *grads)
    weight = weight.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    interp = interpreting(x)
    device = x.device

    # 1. dy (workspace in x's dtype) and the per-tile partial sums of the LayerNorm / conv-bias grads
    block_p, block_c, thirds, chunked, num_warps = _fwd_config(channels, interp, backward=True)
    block_h, block_w = _pixel_tile(block_p, height, width, interp)
    tiles_w, tiles_per_image = _tiles(height, width, block_h, block_w)
    num_tiles = batch * tiles_per_image
    dy = torch.empty((batch, height, width, channels), dtype=dy_dtype(x.dtype), device=device)
    partial = torch.empty((num_tiles, 3, channels) if need_grad_params else (1,), dtype=torch.float32, device=device)
    _dwconv_ln_bwd_dy_kernel[(num_tiles,)](
        dy,
        partial,
        grad_out,
        x,
        weight,
        conv_bias if conv_bias is not None else weight,
        ln_weight if ln_weight is not None else weight,
        mean,
        rstd,
        channels,
        height,
        width,
        ksize,
        *x.stride(),
        grad_out.stride(0),
        grad_out.stride(3),
        grad_out.stride(1),
        grad_out.stride(2),
        tiles_w,
        tiles_per_image,
        HAS_CONV_BIAS=conv_bias is not None,
        HAS_LN_WEIGHT=ln_weight is not None,
        NEED_PARTIALS=need_grad_params,
        CHUNKED=chunked,
        THIRDS=thirds,
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        BLOCK_C=block_c,
        num_warps=num_warps,
        maxnreg=MAXNREG,
    )

    # 2. grad_x: transposed depthwise conv of dy, in x's layout
    if need_grad_x:
        block_p, block_c, num_warps = _dx_config(channels, interp)
        block_h, block_w = _pixel_tile(block_p, height, width, interp)
        tiles_w, tiles_per_image = _tiles(height, width, block_h, block_w)
        channel_blocks = triton.cdiv(channels, block_c)
        if channel_blocks > MAX_GRID_Y:
            raise ValueError(f"{channels} channels need {channel_blocks} channel blocks > {MAX_GRID_Y}")
        _dwconv_ln_bwd_dx_kernel[(batch * tiles_per_image, channel_blocks)](
            grad_x,
            dy,
            weight,
            channels,
            height,
            width,
            ksize,
            *grad_x.stride(),
            tiles_w,
            tiles_per_image,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            BLOCK_C=block_c,
            num_warps=num_warps,
            maxnreg=MAXNREG,
        )

    if need_grad_params:
        # 3. grad_weight: per-group partials over a shape-only partition, then an ordered torch sum
        block_p, block_c, block_k, num_warps = _dw_config(channels, ksize, interp)
        block_h, block_w = _pixel_tile(block_p, height, width, interp)
        tiles_w, tiles_per_image = _tiles(height, width, block_h, block_w)
        num_tiles = batch * tiles_per_image
        channel_blocks = triton.cdiv(channels, block_c)
        if interp:
            groups = min(num_tiles, INTERP_DW_GROUPS)
        else:
            groups = max(1, min(num_tiles, MAX_GRID_Y, triton.cdiv(DW_TARGET_PROGRAMS, ksize * channel_blocks)))
        tiles_per_group = triton.cdiv(num_tiles, groups)
        groups = triton.cdiv(num_tiles, tiles_per_group)
        partial_w = torch.empty((groups, channels, ksize, ksize), dtype=torch.float32, device=device)
        _dwconv_ln_bwd_dw_kernel[(groups, ksize, channel_blocks)](
            partial_w,
            dy,
            x,
            channels,
            height,
            width,
            ksize,
            *x.stride(),
            tiles_w,
            tiles_per_image,
            num_tiles,
            tiles_per_group,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            BLOCK_C=block_c,
            BLOCK_K=block_k,
            num_warps=num_warps,
            maxnreg=MAXNREG,
        )
        grads[0] = partial_w.sum(0).view(channels, 1, ksize, ksize).to(weight.dtype)
        sums = partial.sum(0)  # (3, C): g * xhat, g, dy
        if conv_bias is not None:
            grads[1] = sums[2].to(conv_bias.dtype)
        if ln_weight is not None:
            grads[2] = sums[0].to(ln_weight.dtype)
        if ln_bias is not None:
            grads[3] = sums[1].to(ln_bias.dtype)
    return (grad_x, *grads)
