"""AOT specs of triton_kernels/attention.py, read by the ahead-of-time gate (tests/gpu_check/aot.py); not used at
run time.

One dict per representative specialisation the launchers ``attention_fwd`` / ``attention_bwd`` compile on CUDA: the gate
compiles each for sm_80 and sm_90 without a GPU and fails on compile errors, register spills or shared memory over the
limit. Int arguments are specialised as the JIT does it for a ViT block: q, k, v = qkv.unbind(2) of a packed (B, N, 3,
H, D) projection (all strides multiples of 16, head-dim stride 1 -> constexpr), N = 197 (odd), a (1, H, N, N) bias
(batch stride 0, key stride 1), a (B, N) key padding mask; absent tensors are replaced by q (their strides 0).
Every autotune config that the prune filter keeps (``K.allowed_configs``, sm_80's shared memory) is compiled: with the
heaviest flags (bias + padding mask (+ dbias), dropout on and off; ``K.GATED_CONFIGS``) at head dims 64 / 80 / 128 /
256 in fp16, 64 / 128 in bf16 and 64 in fp32 (``pykernels.ops.attention.FP32_MAX_HEAD_DIM``; a (dtype, head dim) pair
where every candidate spills is marked xfail), and the bigger tiles kept without bias, mask and dropout
(``K.PLAIN_GATED_CONFIGS``) with causal on, at the same fp16 / bf16 head dims; the other flag combinations (causal,
bias, dropout) on the first kept config at head dim 64, fp16; every kept config with the heaviest flags at head dims
that are multiples of 8 but not of 16 (``PARTIAL8_HEAD_DIMS``: strides multiples of 8, not 16; masked loads of a
partly filled tile), and the first plain config at 72 and 200; the preprocessing kernel at ``PREPROCESS_HEAD_DIMS``
and every dtype. Calibrating the tables: compile every candidate with ``_aot_specs(heavy=..., filter_configs=False,
variations=False)`` (``aot.check`` on each) and keep the rows without spills.
"""

from __future__ import annotations

import itertools

import torch

from pykernels.ops import attention as ATTENTION_OP
from pykernels.triton_kernels import attention as K

# the op takes every multiple of 8 up to 256 (ATTENTION_OP.SUPPORTED_HEAD_DIMS); the gate compiles a sample: each
# power-of-two tile full (16 ... 256) and partly filled, multiples of 16 (48, 80, 96) and of 8 only (PARTIAL8_HEAD_DIMS)
PARTIAL8_HEAD_DIMS = (8, 24, 72, 88, 200)
PREPROCESS_HEAD_DIMS = (8, 16, 24, 32, 48, 64, 72, 80, 88, 96, 128, 200, 256)


def _aot_specs(heavy=None, filter_configs: bool = True, variations: bool = True) -> list[dict]:
    """The specs (arguments only for calibrating the configs: other heavy (dtype, head dim) pairs, no pruning)."""
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    ptr = {f16: "*fp16", bf16: "*bf16", f32: "*fp32"}
    tag = {f16: "f16", bf16: "bf16", f32: "f32"}
    sm80_smem = 163 * 1024

    def strides(prefix, head_dim, pinned_last=True):
        # (b, n, h, d) strides of a packed qkv slice / contiguous (B, N, H, D): b, n, h multiples of 16, d = 1
        div = [f"stride_{prefix}b", f"stride_{prefix}n"] + ([f"stride_{prefix}h"] if head_dim % 16 == 0 else [])
        sig = {f"stride_{prefix}{x}": "i32" for x in "bnh"}
        return sig, {f"stride_{prefix}d": 1}, div

    def common(dtype, head_dim, causal, bias, kpm, dropout, with_k=True):
        sig, const, div = {}, {}, []
        for prefix in ("q", "k", "v") if with_k else ("q",):
            s, c, d = strides(prefix, head_dim)
            sig.update(s), const.update(c), div.extend(d)
        if bias:  # (1, H, N, N) contiguous: b stride 0, h = N*N and m = N odd, n = 1
            sig.update(stride_biasb="i32", stride_biash="i32", stride_biasm="i32")
            const.update(stride_biasn=1)
            div.append("stride_biasb")
        else:
            sig.update({f"stride_bias{x}": "i32" for x in "bhmn"})
            div.extend(f"stride_bias{x}" for x in "bhmn")
        if kpm:
            sig.update(stride_kpmb="i32")
            const.update(stride_kpmn=1)
        else:
            sig.update(stride_kpmb="i32", stride_kpmn="i32")
            div.extend(("stride_kpmb", "stride_kpmn"))
        sig.update(H="i32", N_Q="i32", N_K="i32", sm_scale="fp32", dropout_p="fp32", seed="i32")
        if not dropout:
            div.append("seed")  # 0
        sig.update(Q=ptr[dtype], BIAS=ptr[dtype], KPM="*u8" if kpm else ptr[dtype])
        if with_k:
            sig.update(K=ptr[dtype], V=ptr[dtype])
        div.extend(("Q", "BIAS", "KPM") + (("K", "V") if with_k else ()))
        const.update(
            HAS_BIAS=bias,
            HAS_KPM=kpm,
            CAUSAL=causal,
            HAS_DROPOUT=dropout,
            FP32_TF32X3=dtype == f32,
            HEAD_DIM=head_dim,
            BLOCK_D=K._head_tile(head_dim),
        )
        return sig, const, div

    def label(cfg, dtype, head_dim, causal, bias, kpm, dropout, extra=""):
        m, n, w, s = cfg
        return (
            f"d{head_dim}/{tag[dtype]}/causal{causal:d}-bias{bias:d}-kpm{kpm:d}-drop{dropout:d}{extra}/"
            f"M{m}xN{n}-w{w}-s{s}"
        )

    def fwd(cfg, dtype, head_dim, causal, bias, kpm, dropout):
        sig, const, div = common(dtype, head_dim, causal, bias, kpm, dropout)
        sig.update(OUT=ptr[dtype], LSE="*fp32", stride_ob="i32", stride_on="i32")
        div.extend(("OUT", "LSE", "stride_ob", "stride_on"))
        return {
            "kernel": K._attention_fwd_kernel,
            "label": label(cfg, dtype, head_dim, causal, bias, kpm, dropout),
            "signature": sig,
            "constexprs": {**const, "BLOCK_M": cfg[0], "BLOCK_N": cfg[1]},
            "divisible_by_16": tuple(div),
            "num_warps": cfg[2],
            "num_stages": cfg[3],
        }

    def bwd_common(dtype, head_dim, causal, bias, kpm, dropout):
        sig, const, div = common(dtype, head_dim, causal, bias, kpm, dropout)
        s, c, d = strides("g", head_dim)
        sig.update(s, GRAD_OUT=ptr[dtype], LSE="*fp32", DELTA="*fp32")
        const.update(c)
        div.extend(d + ["GRAD_OUT", "LSE", "DELTA"])
        return sig, const, div

    def dkdv(cfg, dtype, head_dim, causal, bias, kpm, dropout, need_dbias):
        sig, const, div = bwd_common(dtype, head_dim, causal, bias, kpm, dropout)
        for prefix in ("dk", "dv"):
            s, c, d = strides(prefix, head_dim)
            sig.update(s), const.update(c), div.extend(d)
        sig.update(DK=ptr[dtype], DV=ptr[dtype], DBIAS="*fp32")
        div.extend(("DK", "DV", "DBIAS"))
        return {
            "kernel": K._attention_bwd_dkdv_kernel,
            "label": label(cfg, dtype, head_dim, causal, bias, kpm, dropout, f"-dbias{need_dbias:d}"),
            "signature": sig,
            "constexprs": {**const, "NEED_DBIAS": need_dbias, "BLOCK_M": cfg[0], "BLOCK_N": cfg[1]},
            "divisible_by_16": tuple(div),
            "num_warps": cfg[2],
            "num_stages": cfg[3],
        }

    def dq(cfg, dtype, head_dim, causal, bias, kpm, dropout):
        sig, const, div = bwd_common(dtype, head_dim, causal, bias, kpm, dropout)
        s, c, d = strides("dq", head_dim)
        sig.update(s, DQ=ptr[dtype])
        const.update(c)
        div.extend(d + ["DQ"])
        return {
            "kernel": K._attention_bwd_dq_kernel,
            "label": label(cfg, dtype, head_dim, causal, bias, kpm, dropout),
            "signature": sig,
            "constexprs": {**const, "BLOCK_M": cfg[0], "BLOCK_N": cfg[1]},
            "divisible_by_16": tuple(div),
            "num_warps": cfg[2],
            "num_stages": cfg[3],
        }

    def preprocess(dtype, head_dim):
        sig = {"DELTA": "*fp32", "OUT": ptr[dtype], "GRAD_OUT": ptr[dtype], "H": "i32", "N_Q": "i32"}
        const = {"HEAD_DIM": head_dim, "BLOCK_D": K._head_tile(head_dim), "BLOCK_M": K.PREPROCESS_BLOCK_M}
        div = ["DELTA", "OUT", "GRAD_OUT"]
        for prefix in ("o", "g"):
            s, c, d = strides(prefix, head_dim)
            sig.update(s), const.update(c), div.extend(d)
        return {
            "kernel": K._attention_bwd_preprocess_kernel,
            "label": f"d{head_dim}/{tag[dtype]}/M{K.PREPROCESS_BLOCK_M}",
            "signature": sig,
            "constexprs": const,
            "divisible_by_16": tuple(div),
            "num_warps": K.PREPROCESS_NUM_WARPS,
        }

    def kept(kernel, head_dim, dtype, dropout, masked=True):
        elem = torch.tensor([], dtype=dtype).element_size()
        if not filter_configs:
            return list(K.CONFIG_TABLES[kernel])
        return K.allowed_configs(
            kernel, K._head_tile(head_dim), elem, dropout, sm80_smem, masked=masked, head_dim=head_dim
        )

    def make(kernel, cfg, dtype, head_dim, causal, bias, kpm, dropout):
        if kernel == "fwd":
            return fwd(cfg, dtype, head_dim, causal, bias, kpm, dropout)
        if kernel == "dq":
            return dq(cfg, dtype, head_dim, causal, bias, kpm, dropout)
        return dkdv(cfg, dtype, head_dim, causal, bias, kpm, dropout, bias)

    specs = []
    heavy = heavy or [
        (f16, 64),
        (bf16, 64),
        (f16, 80),
        (f16, 128),
        (bf16, 128),
        (f16, 256),
        (f32, 64),
    ]
    for kernel in K.CONFIG_TABLES:
        # every kept config with the heaviest flags, with and without dropout
        for (dtype, head_dim), dropout in itertools.product(heavy, (True, False)):
            elem = torch.tensor([], dtype=dtype).element_size()
            for cfg in kept(kernel, head_dim, dtype, dropout):
                spec = make(kernel, cfg, dtype, head_dim, False, True, True, dropout)
                if filter_configs and not K.GATED_CONFIGS.get((kernel, K._head_tile(head_dim), elem, dropout)):
                    # no candidate is spill-free here: the launcher falls back to the smallest tile (correct, slow)
                    spec["xfail"] = (
                        f"{kernel} fp32 at head dim {head_dim}: every candidate tile spills registers "
                        "(tf32x3 dots); runs on the smallest tile, slowly - use fp16 / bf16 for speed"
                    )
                specs.append(spec)
        # every kept config without bias, padding mask and dropout (the bigger PLAIN_GATED_CONFIGS tiles), causal on
        for dtype, head_dim in heavy:
            if dtype == f32 or not filter_configs:
                continue
            masked_kept = kept(kernel, head_dim, dtype, False)
            for cfg in kept(kernel, head_dim, dtype, False, masked=False):
                if cfg not in masked_kept:
                    specs.append(make(kernel, cfg, dtype, head_dim, True, False, False, False))
        # the other flag combinations (causal, bias, dropout) on the first kept config, head dim 64
        for causal, bias, dropout in itertools.product((False, True), repeat=3):
            if variations and (causal, bias) != (False, True):
                specs.append(make(kernel, kept(kernel, 64, f16, dropout)[0], f16, 64, causal, bias, False, dropout))
    # head dims that are multiples of 8 but not of 16 (masked loads on every padded tile size; strides multiples of 8,
    # not 16): every kept config of each kernel with the heaviest flags (dropout on and off), fp16; at 72 and 200 also
    # the biggest plain tile (no bias / mask / dropout, causal)
    for head_dim in PARTIAL8_HEAD_DIMS if variations else ():
        for kernel, dropout in itertools.product(K.CONFIG_TABLES, (False, True)):
            for cfg in kept(kernel, head_dim, f16, dropout):
                specs.append(make(kernel, cfg, f16, head_dim, False, True, True, dropout))
            if head_dim in (72, 200) and not dropout:
                specs.append(
                    make(
                        kernel,
                        kept(kernel, head_dim, f16, False, masked=False)[0],
                        f16,
                        head_dim,
                        True,
                        False,
                        False,
                        False,
                    )
                )
    for dtype, head_dim in itertools.product((f16, bf16, f32), PREPROCESS_HEAD_DIMS if variations else ()):
        if dtype != f32 or head_dim <= ATTENTION_OP.FP32_MAX_HEAD_DIM:
            specs.append(preprocess(dtype, head_dim))
    return specs


AOT_SPECS = _aot_specs()
