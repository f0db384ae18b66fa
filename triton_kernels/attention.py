"""Triton flash-attention kernels of ``FusedMHSA``: forward and backward, FlashAttention-2 style.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023), after the Triton
fused-attention tutorial. Per (batch, head), with ``S = scale * Q K^T + bias`` (masked entries at ``-inf``):

* forward: one program per block of ``BLOCK_M`` queries streams over key blocks with an online softmax (running max
  ``m`` and sum ``l``, fp32), accumulates ``P V`` in fp32 and stores ``O = acc / l`` and the logsumexp
  ``lse = m + log(l)``. Never an ``Nq x Nk`` tensor in memory.
* backward: ``delta = rowsum(dO * O)`` (``_attention_bwd_preprocess_kernel``); ``P = exp(S - lse)`` is recomputed;
  one program per key block accumulates ``dK, dV`` over all query blocks (``_attention_bwd_dkdv_kernel``), one program
  per query block accumulates ``dQ`` over all key blocks (``_attention_bwd_dq_kernel``). No atomics: deterministic.

Conventions:

* layouts: ``q`` (B, Nq, H, D), ``k`` / ``v`` (B, Nk, H, D) as arbitrary strided views (all four strides are kernel
  arguments), so ``q, k, v = (x @ W.T).view(B, N, 3, H, D).unbind(2)`` is read without a copy. ``out`` is written as a
  contiguous (B, Nq, H * D) tensor (the input of the output projection); ``lse`` is (B, H, Nq) fp32, natural log.
* causal: top-left, as ``F.scaled_dot_product_attention(is_causal=True)``: query ``i`` sees keys ``j <= i``
  (``tril(ones(Nq, Nk))``), also when ``Nq != Nk``.
* masking: ``key_padding_mask`` (B, Nk) bool, True = ignore that key (``nn.MultiheadAttention``). A query row whose
  keys are all masked (padding, or ``-inf`` bias) gets output 0, ``lse = -inf`` and zero gradients - not NaN as eager
  softmax would give.
* dropout: the keep mask of attention-probability ``(b, h, i, j)`` is ``tl.rand(seed, ((b*H + h)*Nq + i)*Nk + j) >=
  p`` (Philox, int64 offsets); the backward regenerates it from the same seed, no mask is stored. Kept probabilities
  are scaled by ``1 / (1 - p)``.
* precision: fp16 / bf16 inputs use tensor-core ``tl.dot`` with fp32 accumulation (P and dS are rounded to the input
  dtype before their matmuls, as in FlashAttention). fp32 inputs use ``input_precision="tf32x3"``: three tf32
  tensor-core products per dot (hi*hi + hi*lo + lo*hi), close to fp32 accuracy (like eager fp32 math, which does not
  use tf32 for matmuls by default) at about 3x the cost of plain tf32. Plain ``"ieee"`` (FMA, no tensor cores) was
  measured by the AOT gate to spill registers on every tile above 32x32 at head dim 64 and on every tile at 256.
  With tf32x3, fp32 on the 128- and 256-wide head tiles (head dims 80 to 256) still spills registers in the
  backward kernels on every tile, so fp32 inputs are limited to head dims <= 64 (the op's ``FP32_MAX_HEAD_DIM``:
  it routes larger ones to PyTorch's SDPA) - fp16 / bf16 (autocast) is the fast path at every head dim.
  The parameter ``input_precision`` exists since Triton 3.0 (``allow_tf32`` is the deprecated name).
* head dims: every multiple of 8 up to 256 (the op's ``SUPPORTED_HEAD_DIMS``, pykernels/ops/attention.py, which
  checks every argument); the tile is padded to ``BLOCK_D = next_power_of_2(D)`` with masks (no extra bytes move: the
  padded columns are masked loads, only the dot FLOPs of the padded tile are spent, e.g. 128 / 72 = 1.8x at D = 72).
  The launchers pass (b, n, h) strides that are multiples of 8 elements (``_strides8``; an odd view is copied first)
  and the kernels tell the compiler so (``_mult8``): 16-byte vector loads at head dims such as 72, 88, 200, whose
  strides the JIT does not mark (it marks multiples of 16 only) - without it every head-dim load was a 2-byte scalar
  load and the AOT gate measured register spills at 72 and 200.
* tiles: autotuned among the candidates that the AOT gate compiles without spills: ``GATED_CONFIGS`` for calls with
  a bias or a key padding mask (calibrated with both), plus the bigger ``PLAIN_GATED_CONFIGS`` tiles for calls
  without bias, mask or dropout (calibrated with causal on), minus ``PARTIAL8_SPILLS`` at head dims that are not
  multiples of 16.
* bias gradient: ``dS`` (the gradient of the scores) is materialised in a (B, H, Nq, Nk) fp32 buffer only when
  ``need_grad_bias`` and reduced over the bias's broadcast dims with torch (``sum_to_size``); that costs
  ``4 * B * H * Nq * Nk`` bytes of temporary memory (e.g. 20 MB for B=8, H=12, N=197).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import LN2, LOG2E, MAX_GRID_Y, interpreting

# the interpreter runs a program as numpy ops: one small fixed tile, no autotuning (it would time every config)
INTERPRETER_BLOCK_M = 32
INTERPRETER_BLOCK_N = 32

# ---- autotune configs ---------------------------------------------------------------------------------------------
# Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages). The forward and dQ kernels keep a BLOCK_M x D accumulator
# and stream key blocks; dK/dV keeps two BLOCK_N x D accumulators (+ the K, V tiles) and streams query blocks.
# Big tiles take 8 warps: a 128 x 64 forward tile at head dim 128 holds a 128 x 128 fp32 accumulator (64 registers a
# thread at 8 warps, 128 at 4: the AOT gate measured 584 B of spills with 4 warps, none with 8).
FWD_CONFIGS = (
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (128, 32, 8, 2),
    (128, 32, 4, 3),
    (64, 64, 8, 2),
    (64, 64, 4, 3),
    (64, 32, 8, 2),
    (64, 32, 4, 2),
    (32, 32, 4, 2),
    (32, 16, 4, 2),
)
DKDV_CONFIGS = (
    (64, 64, 8, 2),
    (32, 128, 8, 2),
    (32, 64, 8, 2),
    (32, 64, 4, 2),
    (16, 64, 8, 2),
    (16, 32, 4, 1),
    (16, 16, 4, 1),
)
DQ_CONFIGS = (
    (128, 64, 8, 2),
    (128, 32, 8, 2),
    (64, 64, 8, 2),
    (64, 64, 4, 2),
    (64, 32, 8, 2),
    (64, 32, 4, 2),
    (32, 32, 4, 1),
    (32, 16, 4, 1),
)
CONFIG_TABLES = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}
PREPROCESS_BLOCK_M = 64
PREPROCESS_NUM_WARPS = 4
# Which candidates compile without register spills, per (kernel, BLOCK_D, element size, dropout): measured with the
# AOT gate (tests/gpu_check) on sm_80 with the heaviest flags (bias + padding mask (+ dbias)), then checked on sm_90
# (rows that spill there removed); fp16 rows serve bf16 (element size 2). Empty / absent: no candidate is spill-free
# (fp32 at BLOCK_D >= 128, where the tf32x3 dots triple the operand registers): the smallest candidate is used.
# Calibrating: ``_aot_specs(filter_configs=False, ...)`` in tests/gpu_check/specs/attention.py lists every candidate.
GATED_CONFIGS: dict[tuple[str, int, int, bool], tuple[tuple[int, int, int, int], ...]] = {
    ("dkdv", 16, 2, False): ((32, 64, 8, 2), (32, 64, 4, 2), (16, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 16, 2, True): ((32, 64, 8, 2), (32, 64, 4, 2), (16, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 16, 4, False): ((16, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 16, 4, True): ((16, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 32, 2, False): ((32, 64, 8, 2), (16, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 32, 2, True): ((32, 64, 8, 2), (16, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 32, 4, False): ((16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 32, 4, True): ((16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 64, 2, False): ((16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 64, 2, True): ((16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 64, 4, False): ((16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 64, 4, True): ((16, 32, 4, 1), (16, 16, 4, 1)),
    # (32, 64, 8, 2) left out: 255 registers on sm_80 and sm_90; 16 x 64 streams the same bytes per FLOP at 221-241
    ("dkdv", 128, 2, False): ((16, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 128, 2, True): ((16, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 128, 4, False): (),
    ("dkdv", 128, 4, True): (),
    ("dkdv", 256, 2, False): ((16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 256, 2, True): ((16, 32, 4, 1), (16, 16, 4, 1)),
    ("dkdv", 256, 4, False): (),
    ("dkdv", 256, 4, True): (),
    ("dq", 16, 2, False): (
        (128, 32, 8, 2),
        (64, 64, 4, 2),
        (64, 32, 8, 2),
        (64, 32, 4, 2),
        (32, 32, 4, 1),
        (32, 16, 4, 1),
    ),
    ("dq", 16, 2, True): (
        (128, 32, 8, 2),
        (64, 64, 4, 2),
        (64, 32, 8, 2),
        (64, 32, 4, 2),
        (32, 32, 4, 1),
        (32, 16, 4, 1),
    ),
    ("dq", 16, 4, False): ((64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 16, 4, True): ((64, 32, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 32, 2, False): ((128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 32, 2, True): ((128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 16, 4, 1)),
    ("dq", 32, 4, False): ((128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 32, 4, True): ((128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    # (64, 32, 4, 2) left out at head dims 64 and 128: 255 registers on sm_80; its 8-warp twin takes 167-254
    ("dq", 64, 2, False): ((128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 64, 2, True): ((128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 64, 4, False): ((32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 64, 4, True): ((32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 128, 2, False): ((64, 32, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 128, 2, True): ((64, 32, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 128, 4, False): (),
    ("dq", 128, 4, True): (),
    ("dq", 256, 2, False): ((64, 32, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 256, 2, True): ((64, 32, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 256, 4, False): (),
    ("dq", 256, 4, True): (),
    ("fwd", 16, 2, False): ((128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 16, 2, True): ((64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 16, 4, False): (
        (128, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
        (32, 32, 4, 2),
        (32, 16, 4, 2),
    ),
    ("fwd", 16, 4, True): (
        (128, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
        (32, 32, 4, 2),
        (32, 16, 4, 2),
    ),
    ("fwd", 32, 2, False): ((128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 32, 2, True): ((128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 32, 4, False): ((128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 32, 4, True): ((128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 64, 2, False): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 64, 2, True): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 64, 4, False): ((64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 64, 4, True): ((64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    # 64 x 32 on 8 warps: 181 / 168 registers (239 / 236 with dropout) where 4 warps sat at 255 / 245
    ("fwd", 128, 2, False): ((64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 128, 2, True): ((64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 128, 4, False): ((32, 16, 4, 2),),  # (32, 32, 4, 2) spills on sm_90 only
    ("fwd", 128, 4, True): ((32, 16, 4, 2),),  # (32, 32, 4, 2) spills on sm_90 only
    # 64 x 32 on 8 warps: 254 / 224 registers (250 / 255 with dropout); 64 x 64 spills on sm_90
    ("fwd", 256, 2, False): ((64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 256, 2, True): ((64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fwd", 256, 4, False): (),
    ("fwd", 256, 4, True): (),
}

# Without bias, key padding mask and dropout (a plain ViT block; measured with causal on, the heavier case), these
# bigger tiles compile without spills too, per (kernel, BLOCK_D, element size); they join GATED_CONFIGS' rows
PLAIN_GATED_CONFIGS: dict[tuple[str, int, int], tuple[tuple[int, int, int, int], ...]] = {
    # head dim 128 (80 ... 128): forward 128 x 64 as FlashAttention-2 and Triton's tutorial (sm_80 255 causal / 192
    # not, sm_90 198); dK/dV 64 x 64 (174 / 252); dQ 128 x 32 (197 / 164) and 64 x 64 (168 / 180). 128 x 64 dQ and
    # 64 x 128 / 32 x 128 dK/dV spill on sm_80
    ("fwd", 128, 2): ((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2)),
    ("dkdv", 128, 2): ((64, 64, 8, 2), (32, 64, 8, 2)),
    ("dq", 128, 2): ((128, 32, 8, 2), (64, 64, 8, 2)),
    # head dim 64 (48, 64): dK/dV 64 x 64 (247 / 177) and 32 x 64 (255 / 123) where the masked class keeps 16 x 32;
    # dQ 128 x 64 (182 / 146). 32 x 128 dK/dV and 64 x 64 dQ on 4 warps spill on sm_80
    ("dkdv", 64, 2): ((64, 64, 8, 2), (32, 64, 8, 2)),
    ("dq", 64, 2): ((128, 64, 8, 2),),
    # head dim 256 (136 ... 256): dK/dV 32 x 64 (241 / 239) and 16 x 64 (223 / 208) on 8 warps; 4 warps spill
    ("dkdv", 256, 2): ((32, 64, 8, 2), (16, 64, 8, 2)),
    # forward 64 x 64 on 8 warps (255 / 196); 128 x 32 and 64 x 32 / 64 x 64 on 4 warps spill
    ("fwd", 256, 2): ((64, 64, 8, 2),),
}
# At a head dim that is a multiple of 8 but not of 16 (72, 88, 200) a few tiles at the 255 cap spill (the head-dim
# masks of the partly filled tile and the 8-element alignment cost a few registers; AOT gate): they are left out, per
# (kernel, BLOCK_D, element size, dropout), with or without bias / mask
PARTIAL8_SPILLS: dict[tuple[str, int, int, bool], tuple[tuple[int, int, int, int], ...]] = {
    # head dim 200 with dropout, masked: 64 x 32 w8 36 B (sm_80) / 20 B (sm_90), 32 x 32 4 B (sm_90)
    ("fwd", 256, 2, True): ((64, 32, 8, 2), (32, 32, 4, 2)),
    ("dkdv", 256, 2, False): ((32, 64, 8, 2),),  # head dim 200, plain: 4 B on sm_80
    ("dkdv", 256, 2, True): ((16, 16, 4, 1),),  # head dim 200 with dropout, masked: 4 B on sm_90 (16 x 32 does not)
    ("dkdv", 32, 2, True): ((32, 64, 8, 2),),  # head dim 24 with dropout, masked: 8 B on sm_80
}


def _smem_estimate(kernel: str, block_m: int, block_n: int, num_stages: int, block_d: int, elem: int) -> int:
    """Shared memory (bytes) of a config's software-pipelined tiles, an upper estimate of what Triton allocates."""
    if kernel == "fwd":  # Q + (K, V) per stage
        return (block_m * block_d + num_stages * 2 * block_n * block_d) * elem
    if kernel == "dq":  # Q, dO + (K, V) per stage
        return (2 * block_m * block_d + num_stages * 2 * block_n * block_d) * elem
    return (2 * block_n * block_d + num_stages * 2 * block_m * block_d) * elem  # dkdv: K, V + (Q, dO) per stage


def allowed_configs(
    kernel: str,
    block_d: int,
    elem: int,
    dropout: bool,
    smem_limit: int,
    masked: bool = True,
    head_dim: int | None = None,
) -> list[tuple]:
    """The candidates of ``kernel`` worth autotuning for a head-dim tile ``block_d`` and element size ``elem``: those
    the AOT gate found free of register spills whose shared memory fits ``smem_limit``; never empty (the smallest
    candidate is the fallback). ``masked``: a bias or a key padding mask is given (``GATED_CONFIGS``, measured with
    both); without them and without dropout the bigger tiles of ``PLAIN_GATED_CONFIGS`` join. ``head_dim`` (default
    ``block_d``): at a head dim that is not a multiple of 16 ``PARTIAL8_SPILLS`` are left out."""
    table = CONFIG_TABLES[kernel]
    gated = GATED_CONFIGS.get((kernel, block_d, elem, dropout))
    if not masked and not dropout and (kernel, block_d, elem) in PLAIN_GATED_CONFIGS:
        gated = (*(gated or ()), *PLAIN_GATED_CONFIGS[(kernel, block_d, elem)])
    if head_dim is not None and head_dim % 16 and gated:
        gated = tuple(c for c in gated if c not in PARTIAL8_SPILLS.get((kernel, block_d, elem, dropout), ()))
    kept = [
        c
        for c in table
        if (gated is None or c in gated) and _smem_estimate(kernel, c[0], c[1], c[3], block_d, elem) <= smem_limit
    ]
    if gated is None or not kept:
        kept = [min(table, key=lambda c: (c[0] * c[1], c[2]))]
    return kept


def _smem_limit(device: torch.device) -> int:
    try:
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)
    except Exception:  # noqa: BLE001 - no CUDA: a conservative sm_86-like limit
        return 99 * 1024


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        allowed = allowed_configs(
            kernel,
            args["BLOCK_D"],
            args["Q"].element_size(),
            bool(args["HAS_DROPOUT"]),
            _smem_limit(args["Q"].device),
            masked=bool(args.get("HAS_BIAS", True)) or bool(args.get("HAS_KPM", True)),
            head_dim=args.get("HEAD_DIM"),
        )
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return kept or configs[-1:]

    return prune


def _configs(table):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


_TUNE_KEY = ["N_Q", "N_K", "HEAD_DIM", "BLOCK_D", "HAS_BIAS", "HAS_KPM", "CAUSAL", "HAS_DROPOUT"]


# ---- device helpers -----------------------------------------------------------------------------------------------


@triton.jit
def _mult8(stride):
    # a stride the launcher guarantees to be a multiple of 8 elements (16 bytes at fp16), written so that the compiler
    # knows it and vectorises the head-dim loads when the head dim is a multiple of 8 but not of 16 (72, 88, 200: the
    # JIT marks only multiples of 16). (stride // 8) * 8 is exact for such a stride and costs two scalar ops;
    # tl.multiple_of on a kernel argument is dropped by the compiler (measured: no vector load at head dim 72)
    return (stride // 8) * 8


@triton.jit
def _dot(a, b, acc, FP32_TF32X3: tl.constexpr):
    # fp32 inputs: 3-pass tf32 on tensor cores (~fp32 accuracy); fp16 / bf16: tensor cores, fp32 accumulation
    if FP32_TF32X3:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _dropout_keep(seed, bh, rows, cols, N_Q, N_K, dropout_p):
    # Philox stream indexed by the flat (b*H + h, i, j) position of the attention probability: int64 offsets
    offsets = (bh * N_Q + rows.to(tl.int64))[:, None] * N_K + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _scores(
    q,
    k,
    bias_base,
    KPM,
    kpm_base,
    stride_biasm,
    stride_biasn,
    stride_kpmn,
    rows,
    cols,
    row_ok,
    col_ok,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32_TF32X3: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # S * log2(e) for a [BLOCK_M, BLOCK_N] tile (base-2 softmax), masked entries at -inf
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_TF32X3) * qk_scale
    if HAS_BIAS:
        bias_ptrs = bias_base + rows.to(tl.int64)[:, None] * stride_biasm + cols.to(tl.int64)[None, :] * stride_biasn
        bias = tl.load(bias_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        s += bias * LOG2E
    valid = col_ok[None, :]
    if HAS_KPM:
        padded = tl.load(KPM + kpm_base + cols.to(tl.int64) * stride_kpmn, mask=col_ok, other=1)
        valid = valid & (padded == 0)[None, :]
    if CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    return tl.where(valid, s, float("-inf"))


# ---- forward ------------------------------------------------------------------------------------------------------


@triton.jit
def _load_lse_delta(LSE, DELTA, bh, N_Q, rows, row_ok):
    """Backward: a query block's log2-domain logsumexp (-inf of a fully masked row -> +inf, so that P = 0 there) and
    delta = rowsum(dO * O)."""
    lse = tl.load(LSE + bh * N_Q + rows, mask=row_ok, other=float("inf")) * LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + bh * N_Q + rows, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _bwd_tile(
    q,
    k,
    v,
    do,
    lse,
    delta,
    bias_base,
    KPM,
    kpm_base,
    stride_biasm,
    stride_biasn,
    stride_kpmn,
    rows,
    cols,
    row_ok,
    col_ok,
    qk_scale,
    seed,
    bh,
    N_Q,
    N_K,
    dropout_p,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FP32_TF32X3: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Backward of one (query block, key block) tile, shared by the dK/dV and dQ kernels: (P after dropout, for dV;
    dS = P * (dP - delta), the gradient of the scores, for dK, dQ and the bias)."""
    # P = exp(S - lse) recomputed from the saved logsumexp
    s = _scores(
        q,
        k,
        bias_base,
        KPM,
        kpm_base,
        stride_biasm,
        stride_biasn,
        stride_kpmn,
        rows,
        cols,
        row_ok,
        col_ok,
        qk_scale,
        HAS_BIAS,
        HAS_KPM,
        CAUSAL,
        FP32_TF32X3,
        BLOCK_M,
        BLOCK_N,
    )
    p = tl.math.exp2(s - lse[:, None])
    # dP = dO V^T; with dropout, dV sees the dropped P and dP is masked and rescaled the same way
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_TF32X3)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, rows, cols, N_Q, N_K, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_dropped = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        p_dropped = p
    ds = p * (dp - delta[:, None])
    return p_dropped, ds


@triton.autotune(configs=_configs(FWD_CONFIGS), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def _attention_fwd_kernel(
    OUT,
    LSE,
    Q,
    K,
    V,
    BIAS,
    KPM,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    stride_kpmb,
    stride_kpmn,
    stride_ob,
    stride_on,
    H,
    N_Q,
    N_K,
    sm_scale,
    dropout_p,
    seed,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FP32_TF32X3: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program (query block, batch * head); int64 bases: batch * stride can pass 2**31
    # the launchers pass (b, n, h) strides that are multiples of 8 elements (_strides8): aligned vector loads
    stride_qb, stride_qn, stride_qh = _mult8(stride_qb), _mult8(stride_qn), _mult8(stride_qh)
    stride_kb, stride_kn, stride_kh = _mult8(stride_kb), _mult8(stride_kn), _mult8(stride_kh)
    stride_vb, stride_vn, stride_vh = _mult8(stride_vb), _mult8(stride_vn), _mult8(stride_vh)
    stride_ob, stride_on = _mult8(stride_ob), _mult8(stride_on)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    bias_base = BIAS + b * stride_biasb + h * stride_biash
    kpm_base = b * stride_kpmb
    qk_scale = sm_scale * LOG2E
    # online softmax state (base 2): running max, running sum, unnormalised output
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = N_K
    if CAUSAL:  # top-left causal: keys beyond the block's last query are all masked
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N_K
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
        )
        s = _scores(
            q,
            k,
            bias_base,
            KPM,
            kpm_base,
            stride_biasm,
            stride_biasn,
            stride_kpmn,
            rows,
            cols,
            row_ok,
            col_ok,
            qk_scale,
            HAS_BIAS,
            HAS_KPM,
            CAUSAL,
            FP32_TF32X3,
            BLOCK_M,
            BLOCK_N,
        )
        # rescale the running state to the new max; fully masked rows so far keep max -inf (use 0 as the shift)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # attention dropout: the softmax normaliser keeps every probability, the P V product only the kept ones
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows, cols, N_Q, N_K, dropout_p), p, 0.0)
        v = tl.load(
            v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
        )
        acc = _dot(p.to(v.dtype), v, acc, FP32_TF32X3)
        m_i = m_new
    # normalise; rows with every key masked (l = 0) give 0 output and lse = -inf
    empty = l_i == 0.0
    out_scale = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        out_scale = out_scale / (1.0 - dropout_p)
    out = acc * out_scale[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(LSE + bh * N_Q + rows, lse, mask=row_ok)
    o_ptrs = OUT + b * stride_ob + rows.to(tl.int64)[:, None] * stride_on + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---- backward -----------------------------------------------------------------------------------------------------


@triton.jit
def _attention_bwd_preprocess_kernel(
    DELTA,
    OUT,
    GRAD_OUT,
    stride_ob,
    stride_on,
    stride_oh,
    stride_od,
    stride_gb,
    stride_gn,
    stride_gh,
    stride_gd,
    H,
    N_Q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]  (= rowsum(P * dP), with dropout included)
    # the launchers pass (b, n, h) strides that are multiples of 8 elements (_strides8): aligned vector loads
    stride_ob, stride_on, stride_oh = _mult8(stride_ob), _mult8(stride_on), _mult8(stride_oh)
    stride_gb, stride_gn, stride_gh = _mult8(stride_gb), _mult8(stride_gn), _mult8(stride_gh)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    o = tl.load(
        OUT + b * stride_ob + h * stride_oh + rows64 * stride_on + offs_d[None, :] * stride_od, mask=mask, other=0.0
    ).to(tl.float32)
    do = tl.load(
        GRAD_OUT + b * stride_gb + h * stride_gh + rows64 * stride_gn + offs_d[None, :] * stride_gd,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + bh * N_Q + rows, tl.sum(o * do, 1), mask=rows < N_Q)


@triton.autotune(
    configs=_configs(DKDV_CONFIGS),
    key=_TUNE_KEY + ["NEED_DBIAS"],
    prune_configs_by={"early_config_prune": _pruner("dkdv")},
)
@triton.jit
def _attention_bwd_dkdv_kernel(
    DK,
    DV,
    DBIAS,
    Q,
    K,
    V,
    GRAD_OUT,
    LSE,
    DELTA,
    BIAS,
    KPM,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_gb,
    stride_gn,
    stride_gh,
    stride_gd,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dkd,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_dvd,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    stride_kpmb,
    stride_kpmn,
    H,
    N_Q,
    N_K,
    sm_scale,
    dropout_p,
    seed,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    FP32_TF32X3: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program (key block, batch * head): dK, dV of BLOCK_N keys accumulated over every query block
    # the launchers pass (b, n, h) strides that are multiples of 8 elements (_strides8): aligned vector loads
    stride_qb, stride_qn, stride_qh = _mult8(stride_qb), _mult8(stride_qn), _mult8(stride_qh)
    stride_kb, stride_kn, stride_kh = _mult8(stride_kb), _mult8(stride_kn), _mult8(stride_kh)
    stride_vb, stride_vn, stride_vh = _mult8(stride_vb), _mult8(stride_vn), _mult8(stride_vh)
    stride_gb, stride_gn, stride_gh = _mult8(stride_gb), _mult8(stride_gn), _mult8(stride_gh)
    stride_dkb, stride_dkn, stride_dkh = _mult8(stride_dkb), _mult8(stride_dkn), _mult8(stride_dkh)
    stride_dvb, stride_dvn, stride_dvh = _mult8(stride_dvb), _mult8(stride_dvn), _mult8(stride_dvh)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < N_K
    d_ok = offs_d < HEAD_DIM
    cols64 = cols.to(tl.int64)[:, None]
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + cols64 * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + cols64 * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
    )
    q_base = Q + b * stride_qb + h * stride_qh
    g_base = GRAD_OUT + b * stride_gb + h * stride_gh
    bias_base = BIAS + b * stride_biasb + h * stride_biash
    kpm_base = b * stride_kpmb
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # top-left causal: queries before the block's first key see none of its keys
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, N_Q, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < N_Q
        rows64 = rows.to(tl.int64)[:, None]
        qo_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows64 * stride_qn + offs_d[None, :] * stride_qd, mask=qo_mask, other=0.0)
        do = tl.load(g_base + rows64 * stride_gn + offs_d[None, :] * stride_gd, mask=qo_mask, other=0.0)
        lse, delta = _load_lse_delta(LSE, DELTA, bh, N_Q, rows, row_ok)
        p_dropped, ds = _bwd_tile(
            q,
            k,
            v,
            do,
            lse,
            delta,
            bias_base,
            KPM,
            kpm_base,
            stride_biasm,
            stride_biasn,
            stride_kpmn,
            rows,
            cols,
            row_ok,
            col_ok,
            qk_scale,
            seed,
            bh,
            N_Q,
            N_K,
            dropout_p,
            HAS_BIAS,
            HAS_KPM,
            CAUSAL,
            HAS_DROPOUT,
            FP32_TF32X3,
            BLOCK_M,
            BLOCK_N,
        )
        dv = _dot(tl.trans(p_dropped.to(do.dtype)), do, dv, FP32_TF32X3)
        if NEED_DBIAS:
            dbias_ptrs = DBIAS + bh * N_Q * N_K + rows64 * N_K + cols[None, :]
            tl.store(dbias_ptrs, ds, mask=row_ok[:, None] & col_ok[None, :])
        dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, FP32_TF32X3)
    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + h * stride_dkh + cols64 * stride_dkn + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b * stride_dvb + h * stride_dvh + cols64 * stride_dvn + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.autotune(configs=_configs(DQ_CONFIGS), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def _attention_bwd_dq_kernel(
    DQ,
    Q,
    K,
    V,
    GRAD_OUT,
    LSE,
    DELTA,
    BIAS,
    KPM,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_gb,
    stride_gn,
    stride_gh,
    stride_gd,
    stride_dqb,
    stride_dqn,
    stride_dqh,
    stride_dqd,
    stride_biasb,
    stride_biash,
    stride_biasm,
    stride_biasn,
    stride_kpmb,
    stride_kpmn,
    H,
    N_Q,
    N_K,
    sm_scale,
    dropout_p,
    seed,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FP32_TF32X3: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program (query block, batch * head): dQ of BLOCK_M queries accumulated over every key block
    # the launchers pass (b, n, h) strides that are multiples of 8 elements (_strides8): aligned vector loads
    stride_qb, stride_qn, stride_qh = _mult8(stride_qb), _mult8(stride_qn), _mult8(stride_qh)
    stride_kb, stride_kn, stride_kh = _mult8(stride_kb), _mult8(stride_kn), _mult8(stride_kh)
    stride_vb, stride_vn, stride_vh = _mult8(stride_vb), _mult8(stride_vn), _mult8(stride_vh)
    stride_gb, stride_gn, stride_gh = _mult8(stride_gb), _mult8(stride_gn), _mult8(stride_gh)
    stride_dqb, stride_dqn, stride_dqh = _mult8(stride_dqb), _mult8(stride_dqn), _mult8(stride_dqh)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    d_ok = offs_d < HEAD_DIM
    rows64 = rows.to(tl.int64)[:, None]
    qo_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows64 * stride_qn + offs_d[None, :] * stride_qd, mask=qo_mask, other=0.0
    )
    do = tl.load(
        GRAD_OUT + b * stride_gb + h * stride_gh + rows64 * stride_gn + offs_d[None, :] * stride_gd,
        mask=qo_mask,
        other=0.0,
    )
    lse, delta = _load_lse_delta(LSE, DELTA, bh, N_Q, rows, row_ok)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    bias_base = BIAS + b * stride_biasb + h * stride_biash
    kpm_base = b * stride_kpmb
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N_K
        cols64 = cols.to(tl.int64)[:, None]
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols64 * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols64 * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        _, ds = _bwd_tile(
            q,
            k,
            v,
            do,
            lse,
            delta,
            bias_base,
            KPM,
            kpm_base,
            stride_biasm,
            stride_biasn,
            stride_kpmn,
            rows,
            cols,
            row_ok,
            col_ok,
            qk_scale,
            seed,
            bh,
            N_Q,
            N_K,
            dropout_p,
            HAS_BIAS,
            HAS_KPM,
            CAUSAL,
            HAS_DROPOUT,
            FP32_TF32X3,
            BLOCK_M,
            BLOCK_N,
        )
        dq = _dot(ds.to(k.dtype), k, dq, FP32_TF32X3)
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + rows64 * stride_dqn + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty),
        mask=qo_mask,
    )


# ---- launchers ----------------------------------------------------------------------------------------------------


def _launch(kernel, grid_fn, interp: bool, *args, **kwargs):
    """Autotuned launch on GPU; under the interpreter the raw JIT function with the fixed small tile."""
    if interp:
        meta = {"BLOCK_M": INTERPRETER_BLOCK_M, "BLOCK_N": INTERPRETER_BLOCK_N}
        kernel.fn[grid_fn(meta)](*args, **kwargs, **meta)
    else:
        kernel[grid_fn](*args, **kwargs)


def _shapes(q, k):
    """(B, Nq, Nk, H, D). The arguments were checked by the op (pykernels/ops/attention.py: check_args and the Triton
    backend's head-dim and dtype rules); the launchers check only the kernels' own limits."""
    batch, n_q, heads, head_dim = q.shape
    return batch, n_q, k.shape[1], heads, head_dim


def _bias_args(bias, batch, heads, n_q, n_k, fallback):
    if bias is None:
        return fallback, (0, 0, 0, 0)
    full = bias.expand(batch, heads, n_q, n_k)  # a view: stride 0 on the broadcast dims
    return full, full.stride()


def _kpm_args(key_padding_mask, fallback):
    if key_padding_mask is None:
        return fallback, (0, 0)
    kpm = key_padding_mask.view(torch.uint8)  # same bytes, no copy
    return kpm, kpm.stride()


def _head_tile(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _strides8(t: torch.Tensor, copy: bool = True) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``t`` (B, N, H, D) and its four strides, with the (b, n, h) strides multiples of 8 elements, as the kernels
    assume (``_mult8``: 16-byte vector loads at head dims like 72 that are multiples of 8 but not of 16): a size-1
    dim's stride is passed as 0 (its index is always 0); any other layout (an odd offset view) is copied to contiguous
    (D must then be a multiple of 8, as the op's rule requires). ``copy=False`` (an output): raise instead."""
    strides = [0 if size == 1 else stride for size, stride in zip(t.shape[:3], t.stride()[:3], strict=True)]
    if any(s % 8 for s in strides) and not copy:
        raise ValueError(f"output strides {t.stride()} are not multiples of 8 elements")
    if any(s % 8 for s in strides):
        t = t.contiguous()
        strides = [0 if size == 1 else stride for size, stride in zip(t.shape[:3], t.stride()[:3], strict=True)]
        if any(s % 8 for s in strides):
            raise ValueError(f"head dim {t.shape[-1]} is not a multiple of 8 (the Triton attention kernels need it)")
    return t, (*strides, t.stride(3))


def _grid_bh(batch: int, heads: int) -> None:
    if batch * heads > MAX_GRID_Y:
        raise ValueError(f"batch * heads = {batch * heads} exceeds the grid limit {MAX_GRID_Y}")


def attention_fwd(q, k, v, bias=None, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0, seed=0):
    """Flash-attention forward (Triton).

    Args:
        q: (B, Nq, H, D) queries, any strides (e.g. a view of a packed (B, N, 3, H, D) qkv projection).
        k, v: (B, Nk, H, D) keys and values, any strides; same dtype as ``q`` (fp16, bf16 or fp32).
            D in ``pykernels.ops.attention.SUPPORTED_HEAD_DIMS``.
        bias: optional additive score bias broadcastable to (B, H, Nq, Nk), any float dtype and strides (broadcast
            dims read with stride 0): e.g. a (1, H, N, N) relative-position bias or a (B, 1, 1, Nk) mask-as-bias.
        key_padding_mask: optional (B, Nk) bool, True = ignore that key.
        causal: top-left causal mask (query i sees keys j <= i), as SDPA's ``is_causal=True``.
        scale: score scale, default ``1 / sqrt(D)``.
        dropout_p: attention-dropout probability (0 in eval).
        seed: integer Philox seed (draw it from torch's generator); the same seed must be given to the backward.

    Returns:
        out: (B, Nq, H * D) contiguous, dtype of ``q`` (rows whose keys are all masked are 0).
        lse: (B, H, Nq) float32 logsumexp of the (scaled, biased, masked) scores, natural log; -inf on fully
            masked rows.
    """
    batch, n_q, n_k, heads, head_dim = _shapes(q, k)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out = torch.empty((batch, n_q, heads * head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if n_k == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    _grid_bh(batch, heads)
    bias_t, bias_strides = _bias_args(bias, batch, heads, n_q, n_k, q)
    kpm_t, kpm_strides = _kpm_args(key_padding_mask, q)
    interp = interpreting(q)
    (q, q_strides), (k, k_strides), (v, v_strides) = _strides8(q), _strides8(k), _strides8(v)
    _launch(
        _attention_fwd_kernel,
        lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads),
        interp,
        out,
        lse,
        q,
        k,
        v,
        bias_t,
        kpm_t,
        *q_strides,
        *k_strides,
        *v_strides,
        *bias_strides,
        *kpm_strides,
        out.stride(0),
        out.stride(1),
        heads,
        n_q,
        n_k,
        scale,
        float(dropout_p),
        int(seed),
        HAS_BIAS=bias is not None,
        HAS_KPM=key_padding_mask is not None,
        CAUSAL=bool(causal),
        HAS_DROPOUT=dropout_p > 0.0,
        FP32_TF32X3=q.dtype == torch.float32,
        HEAD_DIM=head_dim,
        BLOCK_D=_head_tile(head_dim),
    )
    return out, lse


def _packed_views(q, k, v) -> bool:
    """Whether q, k, v are the three slices of one contiguous (B, N, 3, H, D) tensor (``qkv.unbind(2)``)."""
    if not (q.shape == k.shape == v.shape and q.stride() == k.stride() == v.stride()):
        return False
    batch, n, heads, head_dim = q.shape
    step = heads * head_dim * q.element_size()
    return (
        q.stride() == (n * 3 * heads * head_dim, 3 * heads * head_dim, head_dim, 1)
        and k.data_ptr() - q.data_ptr() == step
        and v.data_ptr() - k.data_ptr() == step
    )


def attention_bwd(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    bias=None,
    key_padding_mask=None,
    causal=False,
    scale=None,
    dropout_p=0.0,
    seed=0,
    need_grad_bias=False,
):
    """Flash-attention backward (Triton): recomputes P from ``lse``, regenerates the dropout mask from ``seed``.

    Args:
        grad_out: (B, Nq, H * D) or (B, Nq, H, D) gradient of ``out``, any strides.
        q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed: as given to :func:`attention_fwd`.
        out: (B, Nq, H * D) the forward output; lse: (B, H, Nq) the forward logsumexp.
        need_grad_bias: also return the bias gradient (needs a temporary (B, H, Nq, Nk) fp32 buffer).

    Returns:
        (dq, dk, dv, dbias): dq (B, Nq, H, D), dk / dv (B, Nk, H, D) in q's dtype - three slices of one fresh
        (B, N, 3, H, D) buffer when q, k, v are ``qkv.unbind(2)`` views of one packed tensor, else contiguous;
        dbias has ``bias``'s shape and dtype (summed over its broadcast dims), or None.
    """
    batch, n_q, n_k, heads, head_dim = _shapes(q, k)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if grad_out.dim() == 3:
        grad_out = grad_out.unflatten(-1, (heads, head_dim))  # always a view
    if out.dim() == 3:
        out = out.unflatten(-1, (heads, head_dim))
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"grad_out and out must be (B, Nq, H * D); got {tuple(grad_out.shape)}, {tuple(out.shape)}")
    if lse.shape != (batch, heads, n_q) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous (B, H, Nq) float32 tensor; got {tuple(lse.shape)} {lse.dtype}")
    if _packed_views(q, k, v):
        dq, dk, dv = torch.empty((batch, n_q, 3, heads, head_dim), dtype=q.dtype, device=q.device).unbind(2)
    else:
        dq, dk, dv = (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (k, v)),
        )
    need_grad_bias = need_grad_bias and bias is not None
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, (torch.zeros_like(bias) if need_grad_bias else None)
    _grid_bh(batch, heads)
    interp = interpreting(q)
    block_d = _head_tile(head_dim)
    (q, q_strides), (k, k_strides), (v, v_strides) = _strides8(q), _strides8(k), _strides8(v)
    (grad_out, g_strides), (out, o_strides) = _strides8(grad_out), _strides8(out)
    # delta = rowsum(dO * O)
    delta = torch.empty_like(lse)
    preprocess_block = INTERPRETER_BLOCK_M if interp else PREPROCESS_BLOCK_M
    _attention_bwd_preprocess_kernel[(triton.cdiv(n_q, preprocess_block), batch * heads)](
        delta,
        out,
        grad_out,
        *o_strides,
        *g_strides,
        heads,
        n_q,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=preprocess_block,
        num_warps=PREPROCESS_NUM_WARPS,
    )
    bias_t, bias_strides = _bias_args(bias, batch, heads, n_q, n_k, q)
    kpm_t, kpm_strides = _kpm_args(key_padding_mask, q)
    # dS buffer for the bias gradient; causal: the dK/dV programs skip the query blocks above the diagonal, whose
    # entries stay zero
    dbias_full = lse
    if need_grad_bias:
        alloc = torch.zeros if causal else torch.empty
        dbias_full = alloc((batch, heads, n_q, n_k), dtype=torch.float32, device=q.device)
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_KPM=key_padding_mask is not None,
        CAUSAL=bool(causal),
        HAS_DROPOUT=dropout_p > 0.0,
        FP32_TF32X3=q.dtype == torch.float32,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
    )
    scalars = (heads, n_q, n_k, scale, float(dropout_p), int(seed))
    qkv_strides = (*q_strides, *k_strides, *v_strides, *g_strides)
    # dK, dV (and dS for the bias gradient): one program per key block
    _launch(
        _attention_bwd_dkdv_kernel,
        lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * heads),
        interp,
        dk,
        dv,
        dbias_full,
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        bias_t,
        kpm_t,
        *qkv_strides,
        *_strides8(dk, copy=False)[1],
        *_strides8(dv, copy=False)[1],
        *bias_strides,
        *kpm_strides,
        *scalars,
        NEED_DBIAS=need_grad_bias,
        **flags,
    )
    # dQ: one program per query block
    _launch(
        _attention_bwd_dq_kernel,
        lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads),
        interp,
        dq,
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        bias_t,
        kpm_t,
        *qkv_strides,
        *_strides8(dq, copy=False)[1],
        *bias_strides,
        *kpm_strides,
        *scalars,
        **flags,
    )
    dbias = None
    if need_grad_bias:
        dbias = dbias_full.sum_to_size(bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias
