"""torch.library ops of fused multi-head attention (FlashAttention-2, Dao 2023), the op behind :class:`FusedMHSA`.

Ops (namespace ``pykernels``):

* ``attention(q, k, v, bias?, key_padding_mask?, causal, scale, dropout_p, seed, backend?) -> (out, lse)`` -
  ``softmax(scale * q k^T + bias, masked) @ v`` per (batch, head). ``q`` (B, Nq, H, D), ``k`` / ``v`` (B, Nk, H, D)
  in any strides (``qkv.view(B, N, 3, H, D).unbind(2)`` is read without a copy); ``out`` (B, Nq, H * D)
  contiguous in q's dtype (the input of the output projection); ``lse`` (B, H, Nq) float32 logsumexp of the
  scores (not differentiable). ``key_padding_mask`` (B, Nk) bool, True = ignore that key.
* ``attention_backward(grad_out, q, k, v, out, lse, bias?, key_padding_mask?, causal, scale, dropout_p, seed,
  need_grad_bias, backend) -> (dq, dk, dv, dbias)`` - its backward; ``dbias`` is an empty (0,) tensor unless
  ``need_grad_bias`` (custom ops cannot return None).

Backends (see :mod:`pykernels.backends`):

* ``triton`` - ``pykernels.triton_kernels.attention``: never an Nq x Nk tensor in memory (except the dS buffer for
  a bias gradient). The automatic choice on CUDA (sm_80+); on CPU only when chosen explicitly under
  ``TRITON_INTERPRET=1``. Dropout: Philox stream seeded by ``seed``, regenerated in backward.

``seed`` is a one-element int64 tensor (read inside the op): :func:`pykernels.functional.attention` draws it with
``torch.randint`` from torch's generator, which ``torch.compile(fullgraph=True)`` traces without the graph break an
``int`` (``.item()``) would cause.

* ``torch`` - ``pykernels.reference.attention``: ATen's attention kernels (on CPU the fused flash kernel behind
  ``F.scaled_dot_product_attention``, with its fused backward); float64, dropout and a bias gradient take an
  explicit-math path. Query rows whose keys are all masked give 0 (as the Triton kernel), not NaN.

Autograd saves q, k, v, out, lse (and bias / key_padding_mask when given): nothing of size Nq x Nk.
"""

from __future__ import annotations

import torch

from pykernels import backends
from pykernels._dtypes import FLOAT_DTYPES
from pykernels.ops import _eager
from pykernels.reference import attention as _reference

# the Triton kernel's head dims: every multiple of 8 up to 256 (ViT-H 80, SigLIP2 72, ViT-g 88, 200 ...), padded inside
# the kernel to a power-of-two tile (16 ... 256) with masked loads. A head dim that is a multiple of 8 but not of 16
# compiles without register spills because the launchers pass (b, n, h) strides that are multiples of 8 elements and
# the kernels tell the compiler so (triton_kernels/attention.py: _strides8, _mult8): 16-byte vector loads; without it
# 72 and 200 spilled in the AOT gate. Other head dims (not a multiple of 8, or above 256) run on PyTorch's SDPA. And
# the float32 limit (wider float32 tiles spill registers: found by the same gate)
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
SUPPORTED_HEAD_DIMS = tuple(range(HEAD_DIM_MULTIPLE, MAX_HEAD_DIM + 1, HEAD_DIM_MULTIPLE))
FP32_MAX_HEAD_DIM = 64

# ---- argument rules ------------------------------------------------------------------------------------------------


def check_args(q, k, v, bias, key_padding_mask, dropout_p) -> None:
    """Raise TypeError / ValueError, saying what is supported, unless the arguments are a call attention computes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, N, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    if k.shape != (batch, n_k, heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k and v must be (B, Nk, H, D) = ({batch}, Nk, {heads}, {head_dim}); "
            f"got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one floating-point dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if bias is not None:
        if not bias.is_floating_point():
            raise ValueError(f"bias must be a floating-point tensor (additive); got {bias.dtype}")
        try:
            if bias.dim() > 4:
                raise RuntimeError
            torch.broadcast_shapes(bias.shape, (batch, heads, n_q, n_k))
        except RuntimeError as e:
            raise ValueError(
                f"bias {tuple(bias.shape)} is not broadcastable to (B, H, Nq, Nk) = {(batch, heads, n_q, n_k)}"
            ) from e
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, n_k) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be a (B, Nk) = ({batch}, {n_k}) bool tensor (True = ignore the key); got "
                f"{tuple(key_padding_mask.shape)} {key_padding_mask.dtype}"
            )
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")


# ---- backends ------------------------------------------------------------------------------------------------------


def head_dim_reasons(head_dim: int) -> list[str]:
    """Why the Triton kernel cannot take ``head_dim`` (empty: it can)."""
    if head_dim in SUPPORTED_HEAD_DIMS:
        return []
    return [
        f"head dim {head_dim} not supported by the Triton attention kernel (it takes every multiple of "
        f"{HEAD_DIM_MULTIPLE} from {HEAD_DIM_MULTIPLE} to {MAX_HEAD_DIM}: 16-byte aligned head-dim loads, tiles up to "
        f"{MAX_HEAD_DIM})"
    ]


def _triton_check(head_dim: int | None = None, dtypes=(), **_) -> list[str]:
    if head_dim is not None and head_dim_reasons(head_dim):
        return head_dim_reasons(head_dim)
    if head_dim is not None and head_dim > FP32_MAX_HEAD_DIM and torch.float32 in dtypes:
        return [
            f"float32 at head dim {head_dim}: the Triton kernel takes float32 up to head dim {FP32_MAX_HEAD_DIM} "
            "(wider float32 tiles spill registers); use float16 / bfloat16"
        ]
    return []


OP = backends.register_op(
    backends.Op(
        name="attention",
        specs={
            "triton": backends.KernelSpec(
                devices=frozenset({"cuda", "cpu"}),
                dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                min_capability=(8, 0),
                check=_triton_check,
            ),
            "torch": backends.KernelSpec(devices=frozenset({"cpu", "cuda"})),
        },
        gpu_priority=("triton", "torch"),
        cpu_priority=("torch",),
    )
)


_CPU_IS_TORCH = tuple(OP.cpu_priority) == ("torch",)  # every float dtype, any head dim (see attention_out_call)
_sdpa = torch.nn.functional.scaled_dot_product_attention


def select_backend(q: torch.Tensor, *others: torch.Tensor | None, backend: str | None = None) -> str:
    """The backend that runs attention on these tensors (explicit choice checked, else automatic)."""
    dtypes: list[torch.dtype] = [q.dtype]
    for t in others:
        if t is not None and t.is_floating_point():
            dtypes.append(t.dtype)
    return OP.select(q.device, dtypes, backend, head_dim=int(q.shape[-1]))


def _seed(seed: torch.Tensor, dropout_p: float) -> int:
    """The dropout seed for the kernels; without dropout no kernel reads it, and reading it (``.item()``) costs a
    device sync on CUDA and a few us anywhere."""
    return int(seed) if dropout_p > 0.0 else 0


# ---- pykernels::attention ------------------------------------------------------------------------------------------


@torch.library.custom_op("pykernels::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H*D), lse (B, H, Nq) fp32) of multi-head attention; see the module docstring."""
    return _fwd_body(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend)


def _fwd_body(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend=None):
    """The body of pykernels::attention (also run directly by :func:`attention_call`)."""
    fwd, _ = OP.kernels(select_backend(q, k, v, backend=backend))
    return fwd(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, _seed(seed, dropout_p))


def _fwd_fake(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend=None):
    batch, n_q, heads, head_dim = q.shape
    out = q.new_empty((batch, n_q, heads * head_dim))
    lse = q.new_empty((batch, heads, n_q), dtype=torch.float32)
    return out, lse


def _setup_context(ctx, inputs, output):
    q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.backend = backends.requested_backend(backend)  # the explicit choice in force now (docs/adding-an-op.md)
    ctx.need_grad_bias = bias is not None and ctx.needs_input_grad[3]
    ctx.args = (causal, scale, dropout_p, seed)
    ctx.save_for_backward(q, k, v, out, lse, bias, key_padding_mask)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, key_padding_mask = ctx.saved_tensors
    causal, scale, dropout_p, seed = ctx.args
    dq, dk, dv, dbias = attention_backward_call(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        bias,
        key_padding_mask,
        causal,
        scale,
        dropout_p,
        seed,
        ctx.need_grad_bias,
        ctx.backend,
    )
    return dq, dk, dv, (dbias if ctx.need_grad_bias else None), None, None, None, None, None, None


attention.register_fake(_fwd_fake)
attention.register_autograd(_backward, setup_context=_setup_context)
_Attention = _eager.autograd_function("_Attention", _fwd_body, _setup_context, _backward)


def attention_call(
    q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """pykernels::attention, in eager without the custom-op wrapper when nothing needs it (ops/_eager.py)."""
    route = _eager.route(q, k, v, bias, key_padding_mask, seed)
    if route == _eager.DIRECT:
        return _fwd_body(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend)
    if route == _eager.AUTOGRAD:
        return _Attention.apply(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend)
    return attention(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend)


def attention_out_call(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend=None) -> torch.Tensor:
    """The output of pykernels::attention alone. In eager inference (nothing needs a gradient, no dropout) the torch
    backend skips the logsumexp, which only backward reads (:func:`pykernels.reference.attention.attention_out`);
    everything else is :func:`attention_call`."""
    if dropout_p == 0.0 and _eager.route(q, k, v, bias, key_padding_mask, seed) == _eager.DIRECT:
        if _CPU_IS_TORCH and q.is_cpu and q.dtype in FLOAT_DTYPES and (bias is None or bias.dtype in FLOAT_DTYPES):
            if backends.automatic(backend):  # the automatic choice on CPU tensors is torch: no selection to run
                OP.kernels("torch")  # (what spy_kernels sees in the tests)
                batch, n_q, heads, head_dim = q.shape
                if bias is None and key_padding_mask is None and n_q and k.shape[1]:
                    # the torch backend's own call for an unmasked attention (reference._torch_forward), inlined
                    out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale)
                    return out.transpose(1, 2).reshape(batch, n_q, heads * head_dim).contiguous()
                return _reference.attention_out(q, k, v, bias, key_padding_mask, causal, scale)
        name = select_backend(q, k, v, backend=backend)
        fwd, _ = OP.kernels(name)
        if name == "torch":
            return _reference.attention_out(q, k, v, bias, key_padding_mask, causal, scale)
        return fwd(q, k, v, bias, key_padding_mask, causal, scale, 0.0, 0)[0]
    return attention_call(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, seed, backend)[0]


# ---- pykernels::attention_backward ---------------------------------------------------------------------------------


@torch.library.custom_op("pykernels::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor,
    need_grad_bias: bool,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias) of :func:`attention`; contiguous; dbias is (0,) unless ``need_grad_bias`` and bias."""
    return _bwd_body(
        grad_out, q, k, v, out, lse, bias, key_padding_mask, causal, scale, dropout_p, seed, need_grad_bias, backend
    )


def _bwd_body(
    grad_out, q, k, v, out, lse, bias, key_padding_mask, causal, scale, dropout_p, seed, need_grad_bias, backend=None
):
    """The body of pykernels::attention_backward."""
    need_grad_bias = need_grad_bias and bias is not None
    _, bwd = OP.kernels(select_backend(q, k, v, backend=backend))
    dq, dk, dv, dbias = bwd(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        bias,
        key_padding_mask,
        causal,
        scale,
        dropout_p,
        _seed(seed, dropout_p),
        need_grad_bias,
    )
    # contiguous outputs (the Triton launcher hands back three slices of one packed buffer for packed q, k, v:
    # custom-op outputs must not alias each other, and their strides must match the fake's). Costs one copy of
    # dq/dk/dv in that case; autograd's unbind backward stacks them into the qkv gradient anyway.
    dq, dk, dv = (t.contiguous() for t in (dq, dk, dv))
    if dbias is None:
        dbias = q.new_empty((0,))
    else:
        dbias = dbias.to(bias.dtype).contiguous()
    return dq, dk, dv, dbias


def _bwd_fake(
    grad_out, q, k, v, out, lse, bias, key_padding_mask, causal, scale, dropout_p, seed, need_grad_bias, backend=None
):
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if need_grad_bias and bias is not None:
        dbias = torch.empty_like(bias, memory_format=torch.contiguous_format)
    else:
        dbias = q.new_empty((0,))
    return dq, dk, dv, dbias


attention_backward.register_fake(_bwd_fake)


def attention_backward_call(
    grad_out, q, k, v, out, lse, bias, key_padding_mask, causal, scale, dropout_p, seed, need_grad_bias, backend=None
):
    """pykernels::attention_backward, in eager without the custom-op wrapper when nothing needs it."""
    args = (
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        bias,
        key_padding_mask,
        causal,
        scale,
        dropout_p,
        seed,
        need_grad_bias,
        backend,
    )
    if _eager.direct(grad_out, q, k, v, out, lse, bias, key_padding_mask, seed):
        return _bwd_body(*args)
    return attention_backward(*args)
