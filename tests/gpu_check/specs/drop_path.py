"""AOT specs of triton_kernels/drop_path.py, read by the ahead-of-time gate (tests/gpu_check/aot.py); not used at run
time.

One dict per specialisation the launchers ``drop_path_add_fwd`` / ``drop_path_add_bwd`` compile on CUDA (their
non-interpreter branches): the gate compiles each for sm_80 and sm_90 without a GPU and fails on compile errors,
register spills or shared memory over the limit. Keep it in step with the launchers (block sizes, num_warps, options,
dtype rules). Int args are specialised as the JIT does it at run time: "a16" = sizes and strides multiples of 16,
16-byte aligned inputs (56x56x96 maps, 196x768 tokens); "odd" = none of that (13x13 maps, C=200, inputs that are
offset views); value 1 -> constexpr.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton.language as tl

from pykernels.triton_kernels import drop_path as K


def _aot_specs() -> list[dict]:
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
        acc = K._acc_dtype(branch, out, *present)
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
            "kernel": K._drop_path_add_fwd_kernel,
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
            "num_warps": K.FWD_NUM_WARPS,
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
        acc_torch = K.compute_dtype(grad_out, branch, gamma)
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
            "kernel": K._drop_path_add_bwd_kernel,
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
            "num_warps": K.BWD_NUM_WARPS,
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
