"""Triton kernels of DropPath (stochastic depth, Huang et al. 2016) fused with layer-scale and the residual add.

Forward:  ``out[b, r] = residual[b, r] + (branch[b, r] * gamma[c(r)]) * scale[b]``
Backward: ``grad_branch = (grad_out * gamma[c]) * scale[b]`` (the forward kernel again, without residual) and
``grad_gamma[c] = sum_{b, r: c(r)=c} grad_out * branch * scale[b]`` fused with it in one pass.

Tensors are seen as rows: element ``r`` of sample ``b`` of tensor ``t`` is at ``t + b * stride_b(t) + r``, where ``r``
runs over a dense row of ``R = numel / B`` elements in the output's layout (NCHW, channels-last or (B, N, C)
tokens); the channel of ``r`` is ``(r // CS) % C`` with ``CS`` the channel stride (1 when channels are innermost).
The Python layer (pykernels/ops/drop_path.py) guarantees that layout. The launchers below have the same
signatures as the compiled ``pykernels::drop_path_add_fwd`` / ``drop_path_add_bwd`` ops (contract in csrc/ops.cpp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pykernels._dtypes import compute_dtype, promote_dtypes

from ._common import MAX_GRID_Y, interpreting

FWD_NUM_WARPS = 4
# the backward tile holds 2048 elements: 8 warps keep fp64 accumulation / unaligned addresses free of register
# spills on sm_80 and sm_90 (4 warps spilled; the gate in tests/gpu_check checks it)
BWD_NUM_WARPS = 8


@triton.jit
def _narrow(value, DTYPE: tl.constexpr):
    """``value`` (accumulated in float32 or float64) in the output's DTYPE: a float64 value goes to bfloat16 through
    float32, as PyTorch casts it (c10's constructor takes a float; a direct float64 -> bfloat16 cast computes wrong
    values under the Triton interpreter); float16 is one direct rounding (through float32 it spills a register on
    sm_90 at float64 accumulation; the two differ only at float32 halfway points, within float16's rounding)."""
    if DTYPE == tl.bfloat16:
        return value.to(tl.float32).to(DTYPE)
    return value.to(DTYPE)


@triton.jit
def _drop_path_add_fwd_kernel(
    OUT,
    RESIDUAL,
    BRANCH,
    SCALE,
    GAMMA,
    R,
    C,
    CHANNEL_STRIDE,
    stride_residual_b,
    stride_branch_b,
    batch_offset,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # one program = BLOCK consecutive elements of one sample's row; grid = (cdiv(R, BLOCK), batch chunk)
    b = (tl.program_id(1) + batch_offset).to(tl.int64)
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_row = r < R
    value = tl.load(BRANCH + b * stride_branch_b + r, mask=in_row, other=0.0).to(ACC_DTYPE)
    # layer-scale: per-channel multiplier, channel = (r // CS) % C
    if HAS_GAMMA:
        channel = (r // CHANNEL_STRIDE) % C
        value = value * tl.load(GAMMA + channel, mask=in_row, other=0.0).to(ACC_DTYPE)
    # drop path: per-sample multiplier mask[b] / keep_prob
    if HAS_SCALE:
        value = value * tl.load(SCALE + b).to(ACC_DTYPE)
    # residual add
    if HAS_RESIDUAL:
        value = value + tl.load(RESIDUAL + b * stride_residual_b + r, mask=in_row, other=0.0).to(ACC_DTYPE)
    tl.store(OUT + b * R + r, _narrow(value, OUT.dtype.element_ty), mask=in_row)


@triton.jit
def _drop_path_add_bwd_kernel(
    GRAD_BRANCH,
    PARTIAL,
    GRAD_OUT,
    BRANCH,
    SCALE,
    GAMMA,
    M,
    OUTER,
    C,
    CHANNEL_STRIDE,
    stride_grad_out_b,
    stride_branch_b,
    rows_per_program,
    HAS_SCALE: tl.constexpr,
    NEED_GRAD_BRANCH: tl.constexpr,
    CHANNELS_INNERMOST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # A row r of a sample splits as (outer o, channel c, inner i): r = (o * C + c) * CS + i. The M = B * OUTER
    # (sample, outer) pairs are split into chunks of rows_per_program; program (pid_c, pid_m) handles BLOCK_C
    # channels of one chunk and writes its partial grad_gamma sums to PARTIAL[pid_m, channels].
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    channel = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    gamma = tl.load(GAMMA + channel, mask=channel_ok, other=0.0).to(ACC_DTYPE)
    m_start = pid_m * rows_per_program
    m_end = tl.minimum(m_start + rows_per_program, M)
    if CHANNELS_INNERMOST:
        # channels-last / tokens: tile [BLOCK_M pixels, BLOCK_C channels], channels contiguous in memory
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC_DTYPE)
        for m0 in range(m_start, m_end, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            m_ok = m < m_end
            sample = (m // OUTER).to(tl.int64)
            row = (m % OUTER).to(tl.int64) * C
            mask = m_ok[:, None] & channel_ok[None, :]
            go_ptrs = GRAD_OUT + (sample * stride_grad_out_b + row)[:, None] + channel[None, :]
            x_ptrs = BRANCH + (sample * stride_branch_b + row)[:, None] + channel[None, :]
            grad_out = tl.load(go_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            branch = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            if HAS_SCALE:
                scale = tl.load(SCALE + sample, mask=m_ok, other=0.0).to(ACC_DTYPE)[:, None]
                acc += (grad_out * scale) * branch
                if NEED_GRAD_BRANCH:
                    grad_branch = (grad_out * gamma[None, :]) * scale
            else:
                acc += grad_out * branch
                if NEED_GRAD_BRANCH:
                    grad_branch = grad_out * gamma[None, :]
            if NEED_GRAD_BRANCH:
                # grad_branch has grad_out's dense layout: batch stride R = OUTER * C
                gb_ptrs = GRAD_BRANCH + (sample * OUTER * C + row)[:, None] + channel[None, :]
                tl.store(gb_ptrs, _narrow(grad_branch, GRAD_BRANCH.dtype.element_ty), mask=mask)
        partial = tl.sum(acc, axis=0)
    else:
        # NCHW-like: tile [BLOCK_C channels, BLOCK_I inner positions], inner positions contiguous in memory
        acc = tl.zeros([BLOCK_C, BLOCK_I], dtype=ACC_DTYPE)
        for m in range(m_start, m_end):
            sample = (m // OUTER).to(tl.int64)
            row = (m % OUTER).to(tl.int64) * C * CHANNEL_STRIDE
            if HAS_SCALE:
                scale = tl.load(SCALE + sample).to(ACC_DTYPE)
            for i0 in range(0, CHANNEL_STRIDE, BLOCK_I):
                inner = i0 + tl.arange(0, BLOCK_I)
                mask = channel_ok[:, None] & (inner < CHANNEL_STRIDE)[None, :]
                offs = row + channel[:, None].to(tl.int64) * CHANNEL_STRIDE + inner[None, :]
                grad_out = tl.load(GRAD_OUT + sample * stride_grad_out_b + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                branch = tl.load(BRANCH + sample * stride_branch_b + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                if HAS_SCALE:
                    acc += (grad_out * scale) * branch
                    if NEED_GRAD_BRANCH:
                        grad_branch = (grad_out * gamma[:, None]) * scale
                else:
                    acc += grad_out * branch
                    if NEED_GRAD_BRANCH:
                        grad_branch = grad_out * gamma[:, None]
                if NEED_GRAD_BRANCH:
                    gb_ptrs = GRAD_BRANCH + sample * OUTER * C * CHANNEL_STRIDE + offs
                    tl.store(gb_ptrs, _narrow(grad_branch, GRAD_BRANCH.dtype.element_ty), mask=mask)
        partial = tl.sum(acc, axis=1)
    tl.store(PARTIAL + pid_m * C + channel, partial, mask=channel_ok)


def _acc_dtype(*dtypes: torch.dtype):
    return tl.float64 if compute_dtype(*dtypes) == torch.float64 else tl.float32


def _channel_info(t: torch.Tensor, gamma: torch.Tensor | None, channel_dim: int) -> tuple[int, int]:
    if gamma is None:
        return 1, 1
    return t.shape[channel_dim], t.stride(channel_dim) if t.shape[channel_dim] > 1 else 1


def drop_path_add_fwd(residual, branch, scale, gamma, channel_dim: int, out_dtype: torch.dtype | None = None):
    """Triton backend of ``pykernels::drop_path_add_fwd``: ``residual + (branch * gamma[c]) * scale[b]``."""
    out_dtype = out_dtype or promote_dtypes(branch, gamma, residual)
    out = torch.empty_like(branch, dtype=out_dtype)
    batch = branch.shape[0]
    if out.numel() == 0:
        return out
    row = out.numel() // batch
    channels, channel_stride = _channel_info(out, gamma, channel_dim)
    acc = _acc_dtype(branch.dtype, out_dtype, *(t.dtype for t in (residual, gamma) if t is not None))
    # the interpreter runs a program as numpy ops: fewer, bigger programs are much faster there
    block = min(triton.next_power_of_2(row), 16384 if interpreting(branch) else 1024)
    for batch_offset in range(0, batch, MAX_GRID_Y):
        grid = (triton.cdiv(row, block), min(batch - batch_offset, MAX_GRID_Y))
        _drop_path_add_fwd_kernel[grid](
            out,
            residual if residual is not None else branch,
            branch,
            scale if scale is not None else branch,
            gamma if gamma is not None else branch,
            row,
            channels,
            channel_stride,
            residual.stride(0) if residual is not None else 0,
            branch.stride(0),
            batch_offset,
            HAS_RESIDUAL=residual is not None,
            HAS_SCALE=scale is not None,
            HAS_GAMMA=gamma is not None,
            ACC_DTYPE=acc,
            BLOCK=block,
            num_warps=FWD_NUM_WARPS,
            enable_fp_fusion=False,  # keep (x * gamma) * scale + residual as separate roundings, like eager
        )
    return out


def drop_path_add_bwd(grad_out, branch, scale, gamma, channel_dim: int, need_grad_branch: bool):
    """Triton backend of ``pykernels::drop_path_add_bwd``: (grad_branch, grad_gamma) in one pass."""
    batch = grad_out.shape[0]
    channels = grad_out.shape[channel_dim]
    grad_branch = (
        torch.empty_like(grad_out, dtype=branch.dtype)
        if need_grad_branch
        else grad_out.new_empty((0,), dtype=branch.dtype)
    )
    acc_torch = compute_dtype(grad_out.dtype, branch.dtype, gamma.dtype)
    if grad_out.numel() == 0:
        return grad_branch, torch.zeros(gamma.numel(), dtype=gamma.dtype, device=gamma.device)
    row = grad_out.numel() // batch
    channel_stride = grad_out.stride(channel_dim) if channels > 1 else 1
    innermost = channel_stride == 1
    outer = row // (channels * channel_stride)
    rows = batch * outer
    interp = interpreting(grad_out)
    if innermost:
        block_c = min(triton.next_power_of_2(channels), 128)
        block_m = max(1, (16384 if interp else 2048) // block_c)
        block_i = 1
    else:
        block_i = min(triton.next_power_of_2(channel_stride), 4096 if interp else 256)
        block_c = max(1, min(triton.next_power_of_2(channels), (16384 if interp else 2048) // block_i))
        block_m = 1
    channel_blocks = triton.cdiv(channels, block_c)
    if interp:
        target_programs = 2
    else:
        target_programs = 4 * torch.cuda.get_device_properties(grad_out.device).multi_processor_count
    m_programs = max(1, min(rows, MAX_GRID_Y, triton.cdiv(target_programs, channel_blocks)))
    rows_per_program = triton.cdiv(rows, m_programs)
    m_programs = triton.cdiv(rows, rows_per_program)
    partial = torch.empty((m_programs, channels), dtype=acc_torch, device=grad_out.device)
    _drop_path_add_bwd_kernel[(channel_blocks, m_programs)](
        grad_branch,
        partial,
        grad_out,
        branch,
        scale if scale is not None else grad_out,
        gamma,
        rows,
        outer,
        channels,
        channel_stride,
        grad_out.stride(0),
        branch.stride(0),
        rows_per_program,
        HAS_SCALE=scale is not None,
        NEED_GRAD_BRANCH=need_grad_branch,
        CHANNELS_INNERMOST=innermost,
        ACC_DTYPE=tl.float64 if acc_torch == torch.float64 else tl.float32,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        BLOCK_I=block_i,
        num_warps=BWD_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return grad_branch, partial.sum(0).to(gamma.dtype)
