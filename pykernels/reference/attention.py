"""Multi-head attention in plain PyTorch: the ``torch`` backend of ``pykernels::attention`` (the CPU path, the CUDA
fallback) and the test oracle's building blocks.

ATen's attention kernels on (B, H, N, D) views (no copies), bias and padding mask combined into one additive
``attn_mask``:

* CPU, float32 / float16 / bfloat16, no dropout: ``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel
  behind ``F.scaled_dot_product_attention`` on CPU, i.e. timm's path), which returns the logsumexp, and its fused
  backward - except for a bias gradient, which takes the explicit path below.
* otherwise (CUDA fallback, float64, dropout): ``F.scaled_dot_product_attention`` forward, ``lse`` computed in float32
  in query chunks (never stored), and an explicit float32 backward (P recomputed; an Nq x Nk temporary, never saved).
  With ``dropout_p > 0`` the forward is explicit math too, with a keep mask drawn from a ``torch.Generator`` seeded by
  ``seed`` (so the op is a pure function of its inputs and the backward regenerates the same mask); its dropout stream
  differs from Triton's.

Query rows whose keys are all masked give 0 (as the Triton kernel), not NaN. ``attention_fwd`` / ``attention_bwd``
have the signatures of the Triton launchers (pykernels.triton_kernels.attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_fwd", "attention_bwd"]

_LSE_CHUNK_ELEMENTS = 1 << 22  # the lse of the explicit path: scores computed in query chunks of at most this many


def _additive_mask(bias, key_padding_mask, dtype, batch, n_k):
    """bias (broadcastable to (B, H, Nq, Nk)) + -inf where key_padding_mask: one SDPA attn_mask, or None."""
    mask = None
    if bias is not None:
        mask = bias.to(dtype)
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (Nk,) or (Nq, Nk): SDPA wants 4-D
    if key_padding_mask is not None:
        pad = torch.zeros((batch, 1, 1, n_k), dtype=dtype, device=key_padding_mask.device)
        pad = pad.masked_fill(key_padding_mask.view(batch, 1, 1, n_k), float("-inf"))
        mask = pad if mask is None else mask + pad
    return mask


_CPU_FLASH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _cpu_flash(q, dropout_p) -> bool:
    """Whether the torch backend runs ATen's fused CPU flash-attention kernel (it returns the logsumexp itself and has
    a fused backward): CPU tensors of these dtypes, no dropout (the kernel's own dropout is not reproducible in
    backward). float64 (gradcheck) and dropout take the explicit-math path."""
    return q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES and dropout_p == 0.0


def _sdpa_mask(bias, key_padding_mask, causal, dtype, batch, n_q, n_k):
    """(attn_mask 4-D or None, is_causal) for ATen's attention kernels: bias + padding folded into one additive mask,
    and the causal (top-left) mask folded into it too when there is one."""
    mask = _additive_mask(bias, key_padding_mask, dtype, batch, n_k)
    if mask is None:
        return None, causal
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if causal:
        tril = torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device).tril()
        mask = mask.masked_fill(~tril, float("-inf"))
    return mask, False


def _cpu_flash_forward(q, k, v, bias, key_padding_mask, causal, scale):
    """(out (B, Nq, H*D), lse (B, H, Nq) fp32) from ``aten._scaled_dot_product_flash_attention_for_cpu`` on
    (B, H, N, D) views; its output is (B, N, H, D) in memory, so the reshape to (B, Nq, H*D) is free."""
    batch, n_q, heads, head_dim = q.shape
    mask, is_causal = None, causal
    if bias is not None or key_padding_mask is not None:
        mask, is_causal = _sdpa_mask(bias, key_padding_mask, causal, q.dtype, batch, n_q, k.shape[1])
    out, lse = _FLASH_CPU(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal, attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2).reshape(batch, n_q, heads * head_dim), lse


def _cpu_flash_backward(grad_out, q, k, v, out, lse, bias, key_padding_mask, causal, scale):
    """(dq, dk, dv) as (B, N, H, D) from ATen's fused CPU flash-attention backward (P recomputed from lse)."""
    batch, n_q, heads, head_dim = q.shape
    mask, is_causal = _sdpa_mask(bias, key_padding_mask, causal, q.dtype, batch, n_q, k.shape[1])
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    g, o = (t.reshape(batch, n_q, heads, head_dim).transpose(1, 2) for t in (grad_out.to(q.dtype), out))
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, qt, kt, vt, o, lse, 0.0, is_causal, attn_mask=mask, scale=scale
    )
    return tuple(t.transpose(1, 2) for t in grads)


def _torch_forward(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed):
    """out (B, Nq, H*D) of the torch backend; differentiable (the backward re-runs it under autograd)."""
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views
    mask = _additive_mask(bias, key_padding_mask, q.dtype, batch, n_k)
    if dropout_p > 0.0:
        # explicit math with a keep mask from a generator seeded by ``seed``: reproducible in backward
        probs = _probs(q, k, bias, key_padding_mask, causal, scale)
        gen = torch.Generator(device=q.device).manual_seed(int(seed))
        keep = torch.rand(probs.shape, generator=gen, device=q.device) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
        out = torch.matmul(probs.to(q.dtype), vt)
    else:
        if mask is not None and causal:  # SDPA takes one or the other: fold the causal mask into attn_mask
            tril = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
            mask = mask.masked_fill(~tril, float("-inf"))
            causal = False
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal, scale=scale)
        if key_padding_mask is not None or bias is not None:
            out = out.nan_to_num(0.0)  # rows with every key masked: 0, as the Triton kernel
    return out.transpose(1, 2).reshape(batch, n_q, heads * head_dim)


@torch.no_grad()
def _torch_lse(q, k, bias, key_padding_mask, causal, scale):
    """(B, H, Nq) float32 logsumexp of the masked scores, in query chunks (no Nq x Nk tensor kept)."""
    batch, n_q, heads, _ = q.shape
    n_k = k.shape[1]
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    kt = k.transpose(1, 2).float()
    mask = _additive_mask(bias, key_padding_mask, torch.float32, batch, n_k)
    chunk = max(1, _LSE_CHUNK_ELEMENTS // max(1, batch * heads * n_k))
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        scores = torch.matmul(q[:, start:stop].transpose(1, 2).float(), kt.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + mask.expand(batch, heads, n_q, n_k)[:, :, start:stop]
        if causal:
            rows = torch.arange(start, stop, device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(n_k, device=q.device)[None, :] > rows, float("-inf"))
        lse[:, :, start:stop] = torch.logsumexp(scores, dim=-1)
    return lse


def _probs(q, k, bias, key_padding_mask, causal, scale):
    """(B, H, Nq, Nk) float32 attention probabilities (fully masked rows 0) - the torch backend's backward only."""
    batch, n_q = q.shape[:2]
    n_k = k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.transpose(1, 2).to(compute), k.transpose(1, 2).to(compute).transpose(-1, -2)) * scale
    mask = _additive_mask(bias, key_padding_mask, compute, batch, n_k)
    if mask is not None:
        scores = scores + mask
    if causal:
        tril = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~tril, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def _torch_backward(grad_out, q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, need_grad_bias):
    """(dq, dk, dv, dbias|None) of the torch backend, explicit math: P recomputed, dropout mask regenerated.

    (Autograd cannot be re-entered inside a custom op's implementation, which runs below the autograd key.)
    """
    batch, n_q, heads, head_dim = q.shape
    probs = _probs(q, k, bias, key_padding_mask, causal, scale)
    compute = probs.dtype
    d_out = grad_out.reshape(batch, n_q, heads, head_dim).transpose(1, 2).to(compute)  # (B, H, Nq, D)
    vt = v.transpose(1, 2).to(compute)
    if dropout_p > 0.0:
        gen = torch.Generator(device=q.device).manual_seed(int(seed))
        keep = torch.rand(probs.shape, generator=gen, device=q.device) >= dropout_p
        dropped = probs * keep / (1.0 - dropout_p)
        d_probs = torch.matmul(d_out, vt.transpose(-1, -2)) * keep / (1.0 - dropout_p)
    else:
        dropped = probs
        d_probs = torch.matmul(d_out, vt.transpose(-1, -2))
    dv = torch.matmul(dropped.transpose(-1, -2), d_out)
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    dq = torch.matmul(d_scores, k.transpose(1, 2).to(compute)) * scale
    dk = torch.matmul(d_scores.transpose(-1, -2), q.transpose(1, 2).to(compute)) * scale
    dbias = d_scores.sum_to_size(bias.shape) if need_grad_bias else None
    return tuple(t.transpose(1, 2).to(q.dtype) for t in (dq, dk, dv)) + (dbias,)


def attention_out(q, k, v, bias, key_padding_mask, causal: bool, scale: float) -> torch.Tensor:
    """out (B, Nq, H*D) alone, without dropout: eager inference, where no backward needs the logsumexp.
    ``F.scaled_dot_product_attention`` picks ATen's kernel (the fused flash kernel at ViT sizes, as
    :func:`attention_fwd`; the math kernel on tiny inputs, where the flash kernel's fixed cost is most of a call)."""
    batch, n_q, heads, head_dim = q.shape
    if n_q == 0 or k.shape[1] == 0:
        return q.new_zeros((batch, n_q, heads * head_dim))
    return _torch_forward(q, k, v, bias, key_padding_mask, causal, scale, 0.0, 0).contiguous()


def attention_fwd(q, k, v, bias, key_padding_mask, causal: bool, scale: float, dropout_p: float, seed: int):
    """(out (B, Nq, H*D) contiguous, lse (B, H, Nq) float32) of the torch backend. Query rows whose keys are all
    masked give out 0 and lse -inf (as the Triton kernel); no key at all (Nk = 0) is such a row."""
    batch, n_q, heads, head_dim = q.shape
    if n_q == 0 or k.shape[1] == 0:  # ATen's CPU flash kernel divides by zero there (SIGFPE)
        out = q.new_zeros((batch, n_q, heads * head_dim))
        return out, torch.full((batch, heads, n_q), float("-inf"), dtype=torch.float32, device=q.device)
    if _cpu_flash(q, dropout_p):
        out, lse = _cpu_flash_forward(q, k, v, bias, key_padding_mask, causal, scale)
        if bias is not None or key_padding_mask is not None:
            lse = _masked_rows_to_neg_inf(lse.contiguous(), bias, key_padding_mask)
        return out.contiguous(), lse.contiguous()
    out = _torch_forward(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed)
    return out.contiguous(), _torch_lse(q, k, bias, key_padding_mask, causal, scale)


def _masked_rows_to_neg_inf(lse, bias, key_padding_mask):
    """ATen's CPU flash kernel reports lse 0 for a row whose keys are all masked; the op's contract is -inf."""
    batch, heads, n_q = lse.shape
    dead = None
    if key_padding_mask is not None:
        dead = key_padding_mask.all(-1).view(batch, 1, 1).expand(batch, heads, n_q)
    if bias is not None:
        b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        rows = torch.isneginf(b4).all(-1).expand(batch, heads, n_q)
        dead = rows if dead is None else dead | rows
    return lse if dead is None else lse.masked_fill(dead, float("-inf"))


def attention_bwd(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    bias,
    key_padding_mask,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
    need_grad_bias: bool,
):
    """(dq, dk, dv as (B, N, H, D), dbias or None) of the torch backend."""
    if q.shape[1] == 0 or k.shape[1] == 0:  # nothing attends: every gradient is 0 (and ATen's kernel would divide by 0)
        dbias = torch.zeros_like(bias, dtype=torch.float32) if need_grad_bias else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    if _cpu_flash(q, dropout_p) and not need_grad_bias:
        lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # the value ATen's kernel gave those rows in forward
        dq, dk, dv = _cpu_flash_backward(grad_out, q, k, v, out, lse, bias, key_padding_mask, causal, scale)
        return dq, dk, dv, None
    return _torch_backward(grad_out, q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, need_grad_bias)
