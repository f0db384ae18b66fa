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

from pykernels.reference import compute_dtype, promote_dtypes

MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y
FWD_NUM_WARPS = 4
# the backward tile holds 2048 elements: 8 warps keep fp64 accumulation / unaligned addresses free of register
# spills on sm_80 and sm_90 (4 warps spilled; the gate in tests/gpu_check checks it)
BWD_NUM_WARPS = 8


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
    tl.store(OUT + b * R + r, value.to(OUT.dtype.element_ty), mask=in_row)


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
                tl.store(gb_ptrs, grad_branch.to(GRAD_BRANCH.dtype.element_ty), mask=mask)
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
                    tl.store(gb_ptrs, grad_branch.to(GRAD_BRANCH.dtype.element_ty), mask=mask)
        partial = tl.sum(acc, axis=1)
    tl.store(PARTIAL + pid_m * C + channel, partial, mask=channel_ok)


def _acc_dtype(*dtypes: torch.dtype):
    return tl.float64 if compute_dtype(*dtypes) == torch.float64 else tl.float32


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


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
    block = min(triton.next_power_of_2(row), 16384 if _interpreting(branch) else 1024)
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
    interp = _interpreting(grad_out)
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


# ==== AOT_SPECS: read by the ahead-of-time gate (tests/gpu_check/aot.py); not used at run time =====================
# One dict per specialisation the launchers above compile on CUDA (their non-interpreter branches): the gate compiles
# each for sm_80 and sm_90 without a GPU and fails on compile errors, register spills or shared memory over the
# limit. Keep it in step with the launchers (block sizes, num_warps, options, dtype rules). Int args are specialised
# as the JIT does it at run time: "a16" = sizes and strides multiples of 16, 16-byte aligned inputs (56x56x96 maps,
# 196x768 tokens); "odd" = none of that (13x13 maps, C=200, inputs that are offset views); value 1 -> constexpr.


def _aot_specs() -> list[dict]:
    import functools
    import itertools

    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    ptr = {f16: "*fp16", bf16: "*bf16", f32: "*fp32", f64: "*fp64"}
    acc_label = {tl.float32: "acc32", tl.float64: "acc64"}
    specs = []

    def ints(shape, **values):  # name -> "D" (multiple of 16 in "a16"), "1" (JIT pins it: constexpr), "" (plain)
        sig = {k: "i32" for k, v in values.items() if v != "1"}
        div = tuple(k for k, v in values.items() if v == "D" or (v == "a16" and shape == "a16"))
        return sig, {k: 1 for k, v in values.items() if v == "1"}, div

    # forward: (branch, residual, scale, gamma, out) dtypes; out None = promoted as drop_path_add_fwd does. "f32>bf16"
    # is the forward kernel computing grad_branch of "bf16+f32" (fp32 grad in, scale in bf16, bf16 out).
    fwd_dtypes = {
        "f16": (f16, f16, f16, f16, None),
        "bf16": (bf16, bf16, bf16, bf16, None),
        "f32": (f32, f32, f32, f32, None),
        "f64": (f64, f64, f64, f64, None),
        "bf16+f32": (bf16, f32, bf16, f32, None),  # AMP: bf16 branch, fp32 residual stream and layer-scale
        "f32>bf16": (f32, f32, bf16, f32, bf16),
        "f16+f64": (f16, f64, f16, f64, None),  # float64 accumulation of half inputs
    }

    def fwd(has_res, has_scale, has_gamma, dtypes, shape, block):
        branch, residual, scale, gamma, out = fwd_dtypes[dtypes]
        # absent tensors are replaced by branch in the launch: its dtype and alignment
        residual, scale, gamma = (
            t if on else branch for t, on in ((residual, has_res), (scale, has_scale), (gamma, has_gamma))
        )
        present = [t for t, on in ((residual, has_res), (gamma, has_gamma)) if on]
        out = out or functools.reduce(torch.promote_types, present, branch)
        acc = _acc_dtype(branch, out, *present)
        int_sig, pinned, int_div = ints(
            shape,
            R="a16",
            C="a16" if has_gamma else "1",
            CHANNEL_STRIDE=("1" if shape == "a16" else "") if has_gamma else "1",  # a16: channels innermost
            stride_residual_b="a16" if has_res else "D",  # 0 without residual
            stride_branch_b="a16",
            batch_offset="D",  # 0 below 65536 samples
        )
        aligned = {"OUT": True, "RESIDUAL": shape == "a16", "BRANCH": shape == "a16"}
        aligned.update(SCALE=has_scale or aligned["BRANCH"], GAMMA=has_gamma or aligned["BRANCH"])
        return {
            "kernel": _drop_path_add_fwd_kernel,
            "label": f"res{has_res:d}-scale{has_scale:d}-gamma{has_gamma:d}/{dtypes}/{acc_label[acc]}/{shape}/B{block}",
            "signature": {
                "OUT": ptr[out],
                "RESIDUAL": ptr[residual],
                "BRANCH": ptr[branch],
                "SCALE": ptr[scale],
                "GAMMA": ptr[gamma],
                **int_sig,
            },
            "constexprs": {
                **pinned,
                "HAS_RESIDUAL": has_res,
                "HAS_SCALE": has_scale,
                "HAS_GAMMA": has_gamma,
                "ACC_DTYPE": acc,
                "BLOCK": block,
            },
            "divisible_by_16": (*(k for k, on in aligned.items() if on), *int_div),
            "num_warps": FWD_NUM_WARPS,
            "options": {"enable_fp_fusion": False},
        }

    flags = list(itertools.product((False, True), repeat=3))
    # every flag combination x dtype mix x shape class at the GPU block (1024 = min(next_pow2(row), 1024) for rows >=
    # 1024), then the smaller blocks the launcher picks for short rows, on the heaviest mixes
    for (res, sc, gm), dtypes, shape in itertools.product(flags, fwd_dtypes, ("a16", "odd")):
        if gm or shape == "a16" or dtypes == "f16":  # without gamma, "odd" only changes R and alignment
            specs.append(fwd(res, sc, gm, dtypes, shape, 1024))
    for dtypes, block in itertools.product(("bf16", "f16+f64"), (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)):
        specs.append(fwd(True, True, True, dtypes, "odd", block))

    # backward: (grad_out, branch, gamma) dtypes; scale and grad_branch have the branch's dtype, PARTIAL the acc dtype
    bwd_dtypes = {
        "f16": (f16, f16, f16),
        "bf16": (bf16, bf16, bf16),
        "f32": (f32, f32, f32),
        "f64": (f64, f64, f64),
        "bf16+f32": (f32, bf16, f32),
        "f16+f64": (f64, f16, f64),
    }

    def bwd(has_scale, need_grad_branch, innermost, dtypes, shape, block_m, block_c, block_i):
        grad_out, branch, gamma = bwd_dtypes[dtypes]
        acc_torch = compute_dtype(grad_out, branch, gamma)
        acc = tl.float64 if acc_torch == f64 else tl.float32
        int_sig, pinned, int_div = ints(
            shape,
            M="a16",
            OUTER="a16" if innermost else ("1" if shape == "a16" else ""),  # NCHW: 1; (B, T, C, H, W): T
            C="a16",
            CHANNEL_STRIDE="1" if innermost else "a16",
            stride_grad_out_b="a16",
            stride_branch_b="a16",
            rows_per_program="",
        )
        layout = "cl" if innermost else "nchw"
        # fresh outputs, scale and gamma are aligned; the placeholder for an absent scale is grad_out
        aligned = {"GRAD_BRANCH": True, "PARTIAL": True, "GRAD_OUT": shape == "a16", "BRANCH": shape == "a16"}
        aligned.update(SCALE=has_scale or aligned["GRAD_OUT"], GAMMA=True)
        return {
            "kernel": _drop_path_add_bwd_kernel,
            "label": f"scale{has_scale:d}-gradb{need_grad_branch:d}/{layout}/{dtypes}/{acc_label[acc]}/{shape}/"
            f"M{block_m}xC{block_c}xI{block_i}",
            "signature": {
                "GRAD_BRANCH": ptr[branch],
                "PARTIAL": ptr[acc_torch],
                "GRAD_OUT": ptr[grad_out],
                "BRANCH": ptr[branch],
                "SCALE": ptr[branch if has_scale else grad_out],
                "GAMMA": ptr[gamma],
                **int_sig,
            },
            "constexprs": {
                **pinned,
                "HAS_SCALE": has_scale,
                "NEED_GRAD_BRANCH": need_grad_branch,
                "CHANNELS_INNERMOST": innermost,
                "ACC_DTYPE": acc,
                "BLOCK_M": block_m,
                "BLOCK_C": block_c,
                "BLOCK_I": block_i,
            },
            "divisible_by_16": (*(k for k, on in aligned.items() if on), *int_div),
            "num_warps": BWD_NUM_WARPS,
            "options": {"enable_fp_fusion": False},
        }

    # tiles (BLOCK_M, BLOCK_C, BLOCK_I) as drop_path_add_bwd picks them on GPU: channels innermost -> BLOCK_C =
    # min(next_pow2(C), 128), BLOCK_M = 2048 // BLOCK_C; NCHW -> BLOCK_I = min(next_pow2(H*W), 256), BLOCK_C =
    # min(next_pow2(C), 2048 // BLOCK_I). Typical tiles for every flag x dtype mix, small-C / small-map tiles on
    # the heaviest mixes.
    typical = {True: (16, 128, 1), False: (1, 8, 256)}  # C >= 128 tokens / channels-last; H*W >= 256 NCHW
    edge = {True: ((32, 64, 1), (512, 4, 1), (2048, 1, 1)), False: ((1, 32, 64), (1, 4, 256), (1, 1024, 2))}
    for sc, ngb, innermost, dtypes in itertools.product((False, True), (False, True), (True, False), bwd_dtypes):
        specs.append(bwd(sc, ngb, innermost, dtypes, "a16", *typical[innermost]))
    for innermost, dtypes in itertools.product((True, False), ("bf16+f32", "f16+f64")):
        specs.append(bwd(True, True, innermost, dtypes, "odd", *typical[innermost]))
        for tile in edge[innermost]:
            specs.append(bwd(True, True, innermost, dtypes, "odd", *tile))
    # mixes that collapse without residual / gamma (bf16+f32 -> bf16) are compiled once, under the first label
    unique = {}
    for spec in specs:
        parts = (spec["signature"], spec["constexprs"], dict.fromkeys(spec["divisible_by_16"]))
        unique.setdefault((spec["kernel"].__name__, *(repr(sorted(p.items())) for p in parts)), spec)
    return list(unique.values())


AOT_SPECS = _aot_specs()
