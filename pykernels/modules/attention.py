"""Fused multi-head self-attention (ViT, Dosovitskiy et al. 2021; FlashAttention-2, Dao 2023) as drop-in modules.

* :class:`FusedMHSA` - timm's ``vision_transformer.Attention`` layout (``qkv`` and ``proj`` Linears: its state_dict
  loads as is, ``strict=True``): ``proj(attention(qkv(x)))`` with the attention in one pykernels op that reads the
  packed qkv projection without a copy and never stores an N x N matrix (Triton backend). In inference the qkv and
  proj GEMMs run on the provider of :mod:`pykernels.gemm` measured fastest for their shape (oneDNN on packed
  weights, or ATen).
* :class:`FusedViTAttention` - what :meth:`FusedMHSA.from_module` returns for Hugging Face's ``ViTAttention``:
  the same module with HF's call signature ``forward(hidden_states, attention_mask=None, **kwargs) ->
  (out, None)``.
* :class:`FusedMultiheadAttention` - drop-in for ``nn.MultiheadAttention`` (its call signature and return value).
* :class:`FusedWindowAttention` - Swin / Swin-V2 window attention (Liu et al. 2021, 2022): the relative-position
  bias (Swin-V2: the continuous position bias MLP and cosine attention) and the shifted-window mask as the
  attention op's additive bias; drop-in for timm's ``WindowAttention``, with :class:`FusedShiftedWindowAttention`
  (torchvision's ``ShiftedWindowAttention(V2)``: partition, shift and mask inside) and
  :class:`FusedHFWindowAttention` (Hugging Face's Swin family) for the other call signatures.
"""

from __future__ import annotations

import copy
import inspect
import math
import re

import torch
from torch import nn

from pykernels import backends
from pykernels import functional as F
from pykernels.modules._keys import rename_keys
from pykernels.ops import attention as _attention_ops
from pykernels.ops import mlp as _mlp_ops

__all__ = [
    "FusedHFWindowAttention",
    "FusedMHSA",
    "FusedMaskedMHSA",
    "FusedMultiheadAttention",
    "FusedShiftedWindowAttention",
    "FusedViTAttention",
    "FusedWindowAttention",
    "can_convert",
    "unsupported_reasons",
]


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)``: in inference on the GEMM provider measured fastest for the shape, on weights packed once (and
    repacked whenever they change); with autograd (or under torch.compile, autocast) the plain ``nn.Linear``."""
    if type(layer) is not nn.Linear:
        return layer(x)
    return _mlp_ops.linear(x, layer.weight, layer.bias)


class FusedMHSA(nn.Module):
    """Multi-head self-attention ``proj(softmax(q k^T * scale + bias) v)`` with a fused attention kernel.

    Drop-in for ``timm.models.vision_transformer.Attention`` (same parameter names ``qkv`` / ``proj``, so its
    state_dict loads with ``strict=True``; use :meth:`from_module` to convert one, or Hugging Face's
    ``ViTAttention`` / ``nn.MultiheadAttention``).

    Args:
        dim: embedding size C.
        num_heads: number of heads H; ``dim % num_heads == 0``, head dim ``D = dim // num_heads``.
        qkv_bias: bias in the qkv projection.
        attn_drop: dropout probability on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        causal: top-left causal mask (token i attends to tokens j <= i).
        scale: score scale, default ``D ** -0.5``.
        backend: ``"triton"`` or ``"torch"``; None chooses (CUDA: triton for supported head dims, else torch;
            CPU: torch). The Triton kernel supports head dims 8, 16, 24, 32, 48, 64, 80, 96, 128, 256.

    Shape:
        ``forward(x (B, N, C), attn_bias=None, key_padding_mask=None) -> (B, N, C)``; ``attn_bias`` additive,
        broadcastable to (B, H, N, N); ``key_padding_mask`` (B, N) bool, True = ignore that key.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        causal: bool = False,
        scale: float | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= float(attn_drop) < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        if backend is not None:
            backends.requested_backend(backend)  # a known name
            why = _attention_ops.head_dim_reasons(self.head_dim) if backend == "triton" else []
            if why:
                raise ValueError(f"backend='triton' (dim {dim} / {num_heads} heads): {why[0]}")
        self.scale = float(scale) if scale is not None else self.head_dim**-0.5
        self.attn_drop = float(attn_drop)
        self.causal = bool(causal)
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool | None = None,
    ) -> torch.Tensor:
        """The attention part alone: ``(B, N, C) -> (B, N, C)`` before the output projection."""
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, N, C); got {tuple(x.shape)}")
        batch, n, channels = x.shape
        if channels != self.dim:
            raise ValueError(f"x has {channels} channels, {type(self).__name__} was built for dim={self.dim}")
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = ignore), got {key_padding_mask.dtype}")
        qkv = _linear(x, self.qkv).view(batch, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # (B, N, H, D) strided views of the packed projection: no copy
        dropout_p = self.attn_drop if self.training else 0.0
        causal = self.causal if causal is None else causal
        if attn_bias is None and key_padding_mask is None and 0.0 <= dropout_p < 1.0:
            # q, k, v: views of our own projection, nothing else to check
            return F._attention_flat(q, k, v, None, None, bool(causal), self.scale, float(dropout_p), self.backend)
        out = F.attention(q, k, v, attn_bias, key_padding_mask, causal, self.scale, dropout_p, self.backend)
        return out.flatten(2)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Args:
            x: (B, N, C) tokens.
            attn_bias: additive float score bias broadcastable to (B, H, N, N) (e.g. relative-position bias).
            key_padding_mask: (B, N) bool, True = ignore that key.
            attn_mask: timm's / SDPA's mask (keyword only, what timm's ``Block`` passes): bool with True = may
                attend, or additive float; combined with ``attn_bias``.
            is_causal: causal for this call (or-ed with the module's ``causal``).

        Returns:
            (B, N, C).
        """
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                    ~attn_mask, float("-inf")
                )
            attn_bias = attn_mask if attn_bias is None else attn_bias + attn_mask
        causal = self.causal or bool(is_causal)
        return self.proj_drop(_linear(self.attention(x, attn_bias, key_padding_mask, causal), self.proj))

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_heads={self.num_heads}", f"head_dim={self.head_dim}"]
        if not math.isclose(self.scale, self.head_dim**-0.5):
            parts.append(f"scale={self.scale:g}")
        if self.attn_drop:
            parts.append(f"attn_drop={self.attn_drop:g}")
        if self.causal:
            parts.append("causal=True")
        if self.backend:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    # ---- conversion --------------------------------------------------------------------------------------------

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> FusedMHSA:
        """A fused module with ``module``'s weights, heads, scale, dropout and train/eval state.

        Accepts:

        * timm ``vision_transformer.Attention`` (and subclasses with the same layout) -> :class:`FusedMHSA`;
          ``qk_norm``, ``scale_norm``, ``gated`` or ``attn_head_dim``/``dim_out`` variants are refused;
        * Hugging Face ``ViTAttention`` (``q_proj``/``k_proj``/``v_proj``/``o_proj``) -> :class:`FusedViTAttention`
          (HF's call signature; ``qkv.weight = cat(q, k, v)``, ``proj = o_proj``);
        * ``nn.MultiheadAttention`` (either ``batch_first``) -> :class:`FusedMultiheadAttention`;
        * the reference classes this project started from: ``SelfAttention`` (``qkv`` packed as timm's, output
          Linear ``out``) -> :class:`FusedMHSA`, and ``MHSA`` (``qkv`` + ``proj``, ``forward(x, mask)`` with a 0/1
          mask) -> :class:`FusedMaskedMHSA` (the same call signature);
        * a ``FusedMHSA`` (copied).
        """
        if isinstance(module, nn.MultiheadAttention):
            new = FusedMultiheadAttention._from_mha(module, backend)
        elif isinstance(module, FusedMHSA):
            new = copy.deepcopy(module)
            new.backend = backend or module.backend
        elif _is_timm_attention(module):
            new = _from_timm(cls if cls is not FusedMultiheadAttention else FusedMHSA, module, backend)
        elif _is_hf_vit_attention(module):
            new = _from_hf_vit(module, backend)
        elif _seeds_kind(module) == "SelfAttention":
            new = _from_packed(FusedMHSA, module.qkv, module.out, module.num_heads, backend)
        elif _seeds_kind(module) == "MHSA":
            new = _from_packed(FusedMaskedMHSA, module.qkv, module.proj, module.nh, backend)
        else:
            raise TypeError(
                f"FusedMHSA.from_module does not know {type(module).__module__}.{type(module).__name__}; supported: "
                "timm vision_transformer.Attention, Hugging Face ViTAttention, nn.MultiheadAttention, the reference "
                "SelfAttention / MHSA classes, FusedMHSA"
            )
        new.train(module.training)
        return new


def is_candidate(module: nn.Module) -> bool:
    """Whether ``module`` is an attention layer of a kind :meth:`FusedMHSA.from_module` knows (it may still refuse a
    variant: :func:`unsupported_reasons`)."""
    if isinstance(module, FusedMHSA):
        return False
    return (
        isinstance(module, nn.MultiheadAttention)
        or _is_timm_attention(module)
        or _seeds_kind(module) is not None
        or _is_hf_vit_attention(module)
        or type(module).__name__ in KNOWN_UNSUPPORTED  # reported as skipped, with the reason
        or _WINDOW_NAME.search(type(module).__name__) is not None
        or _is_hf_window_self_half(module)
        or _is_hf_relpos_self_half(module)
    )


def is_structural_match(module: nn.Module) -> bool:
    """Matched by its attribute layout rather than its exact class (Hugging Face's many ``*Attention`` classes share
    ViT's layout but not always its maths): ``pykernels.swap`` verifies such a conversion on a probe input."""
    return _is_hf_vit_attention(module) and not isinstance(module, nn.MultiheadAttention)


def unsupported_reasons(module: nn.Module) -> list[str]:
    """Why :meth:`FusedMHSA.from_module` cannot stand in for ``module`` (empty when it can)."""
    if isinstance(module, nn.MultiheadAttention):
        reasons = []
        if not module._qkv_same_embed_dim:
            reasons.append("kdim / vdim differ from embed_dim")
        if module.bias_k is not None:
            reasons.append("add_bias_kv=True")
        if module.add_zero_attn:
            reasons.append("add_zero_attn=True")
        return reasons
    if _is_timm_attention(module):
        return _timm_unsupported(module)
    if _seeds_kind(module) is not None:
        return []
    if type(module).__name__ in KNOWN_UNSUPPORTED:
        return [KNOWN_UNSUPPORTED[type(module).__name__]]
    if _is_hf_window_self_half(module):
        return [_WINDOW_SELF_HALF]
    if _is_hf_relpos_self_half(module):
        return [_RELPOS_SELF_HALF]
    if _WINDOW_NAME.search(type(module).__name__):
        return [_WINDOW_ATTENTION]
    if _is_hf_vit_attention(module):
        heads = _hf_heads(module)
        dim = module.q_proj.in_features
        if heads is None:
            return ["no num_attention_heads / num_heads attribute"]
        if heads * module.head_dim != dim:
            return [f"heads x head_dim = {heads} x {module.head_dim} != hidden size {dim}"]
        shapes = {tuple(module.get_submodule(n).weight.shape) for n in ("q_proj", "k_proj", "v_proj")}
        if shapes != {(dim, dim)} or tuple(_hf_out_proj(module).weight.shape) != (dim, dim):
            return ["q / k / v / output projections are not all hidden size -> hidden size"]
        if getattr(module, "is_causal", False):
            return ["causal attention"]
        if getattr(module, "is_decoder", False):
            return ["a decoder's attention (causal / cross-attention / KV cache)"]
        extra = _hf_forward_extras(module)
        if extra:
            return [
                f"its forward takes {', '.join(extra)} (cross-attention, a KV cache or rotary positions): "
                "FusedViTAttention computes self-attention with an additive mask only"
            ]
        return []
    return [f"{type(module).__name__} is not a known attention layout"]


# forward parameters of Hugging Face attention layers that change what is computed (cross-attention, KV caches, rotary
# or other position inputs): a layer whose forward takes one is not converted, and FusedViTAttention refuses them
_HF_MATHS_KWARGS = (
    "key_value_states",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "past_key_value",
    "past_key_values",
    "cache_position",
    "position_embeddings",
    "position_ids",
    "position_bias",
    "rotary_pos_emb",
    "alibi",
    "layer_past",
)


def _hf_forward_extras(module: nn.Module) -> list[str]:
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in params if name in _HF_MATHS_KWARGS]


def can_convert(module: nn.Module) -> bool:
    """Whether :meth:`FusedMHSA.from_module` can stand in for ``module`` (for ``pykernels.swap``)."""
    return is_candidate(module) and not unsupported_reasons(module)


def _is_timm_attention(m: nn.Module) -> bool:
    """timm's plain ViT ``Attention`` only (not Swin's WindowAttention & co, whose extra bias would be lost)."""
    cls = type(m)
    return cls.__name__ == "Attention" and cls.__module__ in ("timm.layers.attention", "timm.models.vision_transformer")


def _seeds_kind(m: nn.Module) -> str | None:
    """ "SelfAttention" / "MHSA" for the reference classes this project started from (matched by name and layout:
    a packed (3, H, D) ``qkv`` Linear C -> 3C and a C -> C output Linear), else None."""
    name = type(m).__name__
    if name == "SelfAttention":
        heads, head_dim, out = getattr(m, "num_heads", None), getattr(m, "head_dim", None), getattr(m, "out", None)
    elif name == "MHSA":
        heads, head_dim, out = getattr(m, "nh", None), getattr(m, "dk", None), getattr(m, "proj", None)
    else:
        return None
    qkv = getattr(m, "qkv", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear) and isinstance(heads, int)):
        return None
    dim = qkv.in_features
    ok = heads * head_dim == dim and qkv.out_features == 3 * dim and (out.in_features, out.out_features) == (dim, dim)
    return name if ok else None


def _from_packed(cls, qkv: nn.Linear, out: nn.Linear, heads: int, backend: str | None) -> FusedMHSA:
    """A ``cls`` with these packed-qkv and output Linears (scale head_dim ** -0.5, no dropout: as the references)."""
    dim = qkv.in_features
    new = cls(dim, heads, qkv.bias is not None, 0.0, 0.0, False, None, backend)
    if out.bias is None:
        new.proj = nn.Linear(dim, dim, bias=False)
    new = new.to(qkv.weight)
    with torch.no_grad():
        new.qkv.load_state_dict(qkv.state_dict())
        new.proj.load_state_dict(out.state_dict())
    return new


def _hf_out_proj(m: nn.Module) -> nn.Linear | None:
    """The output Linear of a Hugging Face attention layer: ``o_proj`` (ViT, BEiT, Dinov2, ...) or ``out_proj``
    (CLIP, SigLIP)."""
    for name in ("o_proj", "out_proj"):
        layer = getattr(m, name, None)
        if isinstance(layer, nn.Linear):
            return layer
    return None


def _hf_out_name(m: nn.Module) -> str:
    return "o_proj" if isinstance(getattr(m, "o_proj", None), nn.Linear) else "out_proj"


def _hf_heads(m: nn.Module) -> int | None:
    heads = getattr(m, "num_attention_heads", getattr(m, "num_heads", None))
    return heads if isinstance(heads, int) else None


def _is_hf_vit_attention(m: nn.Module) -> bool:
    """Hugging Face's attention layout: separate ``q_proj`` / ``k_proj`` / ``v_proj`` Linears, an output Linear
    (``o_proj`` or ``out_proj``) and a ``head_dim``; the call ``forward(hidden_states, attention_mask=None, **kw)``."""
    return (
        all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))
        and _hf_out_proj(m) is not None
        and hasattr(m, "head_dim")
    )


# attention layers whose maths FusedMHSA does not compute: matched by class name, skipped with this reason. Swin /
# Swin-V2 window attention of the layouts FusedWindowAttention knows is converted by it (pykernels.swap tries that
# converter first); a window attention of any other layout (timm's DaViT WindowAttention, another version's Swin
# classes) is refused here rather than matched by structure: its relative-position bias and shift mask would be lost
_WINDOW_ATTENTION = (
    "window attention of a layout FusedWindowAttention does not know (it converts timm Swin / Swin-V2 "
    "WindowAttention, torchvision ShiftedWindowAttention(V2), Hugging Face Swin / Swin-V2 / Donut / MaskFormer / "
    "Swin2SR / CLAP audio window attention); FusedMHSA would drop its relative-position bias and shift mask"
)
_WINDOW_NAME = re.compile(r"(WindowAttention|WindowAttentionGlobal|WindowAttention3d|Swin\w*Attention)$")
KNOWN_UNSUPPORTED = {"WindowAttention": _WINDOW_ATTENTION}  # timm DaViT's (timm Swin's: FusedWindowAttention)
_WINDOW_SELF_HALF = (
    "the attention half (query / key / value, no output projection) of a Hugging Face window-attention layer: "
    "converted with its parent *Attention (self + output) as FusedHFWindowAttention, not alone"
)


def _has_qkv_linears(m: nn.Module) -> bool:
    """``query`` / ``key`` / ``value`` Linears: the attention half of Hugging Face's older self / output layout."""
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("query", "key", "value"))


def _is_hf_window_self_half(m: nn.Module) -> bool:
    """HF ``*SwinSelfAttention``-style modules: query / key / value Linears and a window position bias."""
    return (
        type(m).__module__.startswith("transformers.")
        and _has_qkv_linears(m)
        and (hasattr(m, "relative_position_bias_table") or hasattr(m, "logit_scale"))
        and hasattr(m, "window_size")
    )


_RELPOS_SELF_HALF = (
    "the attention half (query / key / value, no output projection) of a Hugging Face BEiT-family layer: converted "
    "with its parent *Attention (self + output) as FusedHFRelPosAttention, not alone"
)


def _is_hf_relpos_self_half(m: nn.Module) -> bool:
    """HF ``Data2VecVisionSelfAttention``-style modules: query / key / value Linears and has_relative_position_bias."""
    return (
        type(m).__module__.startswith("transformers.")
        and _has_qkv_linears(m)
        and hasattr(m, "has_relative_position_bias")
    )


def _dropout_p(mod) -> float:
    if isinstance(mod, nn.Dropout):
        return float(mod.p)
    return float(mod or 0.0) if isinstance(mod, (int, float)) else 0.0


def _timm_unsupported(m: nn.Module) -> list[str]:
    dim = m.qkv.in_features
    unsupported = []
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(m, name, nn.Identity()), nn.Identity):
            unsupported.append(f"{name}={type(getattr(m, name)).__name__}")
    if getattr(m, "gate", None) is not None:
        unsupported.append("gated=True")
    if m.qkv.out_features != 3 * dim or m.proj.in_features != dim or m.proj.out_features != dim:
        unsupported.append(f"attn_dim/dim_out != dim (qkv {dim}->{m.qkv.out_features}, proj {m.proj})")
    if dim % m.num_heads:
        unsupported.append(f"dim {dim} not a multiple of num_heads {m.num_heads}")
    return unsupported


def _from_timm(cls, m: nn.Module, backend: str | None) -> FusedMHSA:
    dim = m.qkv.in_features
    unsupported = _timm_unsupported(m)
    if unsupported:
        raise TypeError(f"FusedMHSA cannot stand in for this timm Attention: {', '.join(unsupported)}")
    new = cls(
        dim,
        m.num_heads,
        m.qkv.bias is not None,
        _dropout_p(getattr(m, "attn_drop", None)),
        _dropout_p(getattr(m, "proj_drop", None)),
        False,
        float(getattr(m, "scale", (dim // m.num_heads) ** -0.5)),
        backend,
    )
    if m.proj.bias is None:
        new.proj = nn.Linear(dim, dim, bias=False)
    new = new.to(m.qkv.weight)
    new.load_state_dict({k: v for k, v in m.state_dict().items() if k.split(".")[0] in ("qkv", "proj")})
    return new


def _from_hf_vit(m: nn.Module, backend: str | None) -> FusedViTAttention:
    """Hugging Face attention -> FusedViTAttention: ``qkv.weight = cat(q, k, v)``, ``proj = o_proj / out_proj``. A
    projection without a bias (BEiT's ``k_proj``) gets zeros in the packed bias when another has one; for ``k`` that
    slice's gradient is 0 (a key bias adds the same ``q . b_k`` to every score of a query row)."""
    reasons = unsupported_reasons(m)
    if reasons:
        raise TypeError(f"FusedViTAttention cannot stand in for this {type(m).__name__}: {'; '.join(reasons)}")
    dim = m.q_proj.in_features
    heads = _hf_heads(m)
    out_proj = _hf_out_proj(m)
    projections = (m.q_proj, m.k_proj, m.v_proj)
    has_bias = any(p.bias is not None for p in projections)
    dropout = getattr(m, "attention_dropout", getattr(m, "dropout", 0.0))
    new = FusedViTAttention(
        dim,
        heads,
        has_bias,
        float(dropout) if isinstance(dropout, (int, float)) else _dropout_p(dropout),
        0.0,
        False,
        float(getattr(m, "scaling", getattr(m, "scale", m.head_dim**-0.5))),
        backend,
    )
    if out_proj.bias is None:
        new.proj = nn.Linear(dim, dim, bias=False)
    new = new.to(m.q_proj.weight)
    new.use_hf_state_dict_keys(_hf_out_name(m), tuple(p.bias is not None for p in projections))
    with torch.no_grad():
        new.qkv.weight.copy_(torch.cat([p.weight for p in projections], 0))
        if has_bias:
            biases = [p.bias if p.bias is not None else p.weight.new_zeros(dim) for p in projections]
            new.qkv.bias.copy_(torch.cat(biases))
        new.proj.weight.copy_(out_proj.weight)
        if out_proj.bias is not None:
            new.proj.bias.copy_(out_proj.bias)
    return new


class FusedMaskedMHSA(FusedMHSA):
    """:class:`FusedMHSA` with the call signature of the reference ``MHSA``: ``forward(x, mask=None)`` where ``mask``
    (broadcastable to (B, H, N, N)) is 0 where a score is masked; those scores get ``-1e9``, as the reference's
    ``masked_fill(mask == 0, -1e9)`` (added to the score rather than replacing it: the same softmax unless a whole
    row is masked, where the reference averages every value uniformly and this averages them almost uniformly)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        bias = None
        if mask is not None:
            dtype = x.dtype if x.is_floating_point() else torch.float32
            bias = torch.zeros(mask.shape, dtype=dtype, device=x.device).masked_fill(mask == 0, -1e9)
        return super().forward(x, bias)


class FusedViTAttention(FusedMHSA):
    """:class:`FusedMHSA` with Hugging Face ``ViTAttention``'s call signature (what ``from_module`` returns for it).

    ``forward(hidden_states (B, N, C), attention_mask=None, **kwargs) -> (out (B, N, C), None)``: the attention
    weights are never materialised, so ``output_attentions=True`` raises. ``attention_mask``: an additive float mask
    broadcastable to (B, H, N, N), or a bool mask with True = attend (HF's SDPA convention).
    """

    # the original's parameter names in state_dict(): (output Linear name, which of q / k / v had a bias); None: the
    # packed names qkv / proj
    _hf_keys: tuple[str, tuple[bool, bool, bool]] | None = None

    def use_hf_state_dict_keys(self, out_name: str = "o_proj", biases: tuple[bool, bool, bool] = (True,) * 3) -> None:
        """Save and load with the Hugging Face module's keys (``q_proj`` / ``k_proj`` / ``v_proj`` and ``o_proj`` or
        ``out_proj``; a bias only where the original had one), so the swapped model's state_dict loads into the
        original with ``strict=True`` and back. ``from_module`` turns this on; a checkpoint with the packed keys
        (``qkv`` / ``proj``) still loads."""
        if self._hf_keys is None:
            self.register_state_dict_post_hook(_hf_attention_state_dict_hook)
            self.register_load_state_dict_pre_hook(_hf_attention_load_hook)
        self._hf_keys = (out_name, tuple(biases))

    def forward(self, hidden_states, attention_mask=None, **kwargs):  # noqa: D102
        if kwargs.get("output_attentions"):
            raise NotImplementedError("FusedViTAttention does not compute attention weights (output_attentions=True)")
        given = [k for k in _HF_MATHS_KWARGS if kwargs.get(k) is not None]
        if given:  # never a silently different result
            raise NotImplementedError(
                f"FusedViTAttention computes self-attention with an additive mask; it was called with {given}"
            )
        bias = attention_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=hidden_states.dtype, device=bias.device).masked_fill(
                ~bias, float("-inf")
            )
        return super().forward(hidden_states, bias), None


def _hf_attention_state_dict_hook(module, state_dict, prefix, local_metadata):
    """qkv / proj -> q_proj / k_proj / v_proj / (o_proj | out_proj), as the Hugging Face module's state_dict."""
    if module._hf_keys is None:
        return
    out_name, biases = module._hf_keys
    weight = state_dict.pop(prefix + "qkv.weight")
    bias = state_dict.pop(prefix + "qkv.bias", None)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        state_dict[prefix + f"{name}.weight"] = weight.chunk(3)[i].clone()  # no shared storage (safetensors)
        if bias is not None and biases[i]:
            state_dict[prefix + f"{name}.bias"] = bias.chunk(3)[i].clone()
    for leaf in ("weight", "bias"):
        if prefix + f"proj.{leaf}" in state_dict:
            state_dict[prefix + f"{out_name}.{leaf}"] = state_dict.pop(prefix + f"proj.{leaf}")


def _hf_attention_load_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """q_proj / k_proj / v_proj / (o_proj | out_proj) in a checkpoint -> qkv / proj (zeros for an absent bias)."""
    if module._hf_keys is None or prefix + "q_proj.weight" not in state_dict:
        return
    out_name, biases = module._hf_keys
    names = ("q_proj", "k_proj", "v_proj")
    weights = [state_dict.pop(prefix + f"{n}.weight") for n in names]
    state_dict[prefix + "qkv.weight"] = torch.cat(weights, 0)
    if module.qkv.bias is not None:
        parts = [state_dict.pop(prefix + f"{n}.bias", None) for n in names]
        parts = [p if p is not None else w.new_zeros(w.shape[0]) for p, w in zip(parts, weights)]
        state_dict[prefix + "qkv.bias"] = torch.cat(parts, 0)
    for leaf in ("weight", "bias"):
        if prefix + f"{out_name}.{leaf}" in state_dict:
            state_dict[prefix + f"proj.{leaf}"] = state_dict.pop(prefix + f"{out_name}.{leaf}")


class FusedMultiheadAttention(FusedMHSA):
    """Drop-in for ``nn.MultiheadAttention`` (self-attention fused; what ``from_module`` returns for it).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (out, weights or None)`` as ``nn.MultiheadAttention``.
    The fused kernel runs when ``query is key is value`` (self-attention), ``need_weights=False``, the input is
    batched, ``is_causal=False``, and the masks are bool (``key_padding_mask``) or float/bool (``attn_mask``,
    (L, S) or (B * H, L, S)). Everything else (need_weights=True, cross-attention, unbatched input, is_causal,
    float key_padding_mask) runs ``F.multi_head_attention_forward`` with the same weights - the reference, never a
    silently different result. Parameters are named ``qkv`` / ``proj`` (= ``in_proj_*`` / ``out_proj``).

    Args:
        embed_dim, num_heads, dropout, bias, batch_first: as ``nn.MultiheadAttention`` (no kdim/vdim,
            add_bias_kv, add_zero_attn).
        backend: as :class:`FusedMHSA`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(embed_dim, num_heads, bias, dropout, 0.0, False, None, backend)
        if not bias:
            self.proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.batch_first = batch_first

    # what nn.Transformer*Layer reads from its self_attn: False keeps them off their fused fast path (which would
    # call torch._transformer_encoder_layer_fwd with in_proj_* directly) and on this module's forward
    _qkv_same_embed_dim = False

    @property
    def embed_dim(self) -> int:
        return self.dim

    @property
    def in_proj_weight(self) -> nn.Parameter:
        return self.qkv.weight

    @property
    def in_proj_bias(self) -> nn.Parameter | None:
        return self.qkv.bias

    @property
    def out_proj(self) -> nn.Linear:
        return self.proj

    @classmethod
    def _from_mha(cls, m: nn.MultiheadAttention, backend: str | None) -> FusedMultiheadAttention:
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise TypeError(
                "FusedMultiheadAttention supports nn.MultiheadAttention without kdim/vdim, add_bias_kv, add_zero_attn"
            )
        new = cls(m.embed_dim, m.num_heads, m.dropout, m.in_proj_bias is not None, m.batch_first, backend)
        new = new.to(m.in_proj_weight)
        # nn.MultiheadAttention's state_dict keys (in_proj_weight / in_proj_bias / out_proj.*)
        keys = {"qkv.weight": "in_proj_weight", "qkv.bias": "in_proj_bias", "proj.weight": "out_proj.weight"}
        keys["proj.bias"] = "out_proj.bias"
        rename_keys(new, {own: (orig, tuple(p.shape)) for own, p in new.named_parameters() if (orig := keys.get(own))})
        with torch.no_grad():
            new.qkv.weight.copy_(m.in_proj_weight)
            if m.in_proj_bias is not None:
                new.qkv.bias.copy_(m.in_proj_bias)
            new.proj.weight.copy_(m.out_proj.weight)
            if m.out_proj.bias is not None:
                new.proj.bias.copy_(m.out_proj.bias)
        return new

    def _reference(self, query, key, value, key_padding_mask, need_weights, attn_mask, average, is_causal):
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = nn.functional.multi_head_attention_forward(
            query,
            key,
            value,
            self.dim,
            self.num_heads,
            self.qkv.weight,
            self.qkv.bias,
            None,
            None,
            False,
            self.attn_drop,
            self.proj.weight,
            self.proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average,
            is_causal=is_causal,
        )
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        fused = (
            query is key
            and key is value
            and not need_weights
            and not is_causal
            and query.dim() == 3
            and (key_padding_mask is None or key_padding_mask.dtype == torch.bool)
            and (attn_mask is None or attn_mask.dim() in (2, 3))
        )
        if not fused:
            return self._reference(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        x = query if self.batch_first else query.transpose(0, 1)
        batch, n, _ = x.shape
        bias = None
        if attn_mask is not None:
            bias = attn_mask
            if bias.dtype == torch.bool:  # True = not allowed to attend
                bias = torch.zeros(bias.shape, dtype=x.dtype, device=bias.device).masked_fill(bias, float("-inf"))
            if bias.dim() == 3:
                bias = bias.view(batch, self.num_heads, n, n)
        out = _linear(self.attention(x, bias, key_padding_mask), self.proj)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", batch_first={self.batch_first}"


# ---- Swin / Swin-V2 window attention ---------------------------------------------------------------------------------


def _swin_relative_coords_table(window_size: tuple[int, int], pretrained: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Swin-V2's log-spaced relative coordinates ``(1, 2 Wh - 1, 2 Ww - 1, 2)``, the input of the position MLP (as
    timm's ``swin_transformer_v2``)."""
    wh, ww = window_size
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(-(wh - 1), wh, dtype=torch.float32),
            torch.arange(-(ww - 1), ww, dtype=torch.float32),
            indexing="ij",
        )
    )
    table = coords.permute(1, 2, 0).contiguous().unsqueeze(0)
    ref = pretrained if pretrained[0] > 0 else window_size
    table[..., 0] /= max(ref[0] - 1, 1)
    table[..., 1] /= max(ref[1] - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def _swin_relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """``(N, N)`` index into the ``((2 Wh - 1) (2 Ww - 1), H)`` bias table of each (query, key) pair of a window."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


class FusedWindowAttention(nn.Module):
    """Swin / Swin-V2 window attention (Liu et al. 2021, 2022) on the fused attention op.

    ``proj(softmax(s(q, k) + B_rel + M) v)`` over the tokens of each window, where ``B_rel`` (H, N, N) is the
    relative-position bias of the window (Swin: a learned table indexed by the relative offset; Swin-V2:
    ``16 * sigmoid(cpb_mlp(log-spaced coordinates))``) and ``M`` the shifted-window mask of each window, and the
    score ``s`` is ``q k^T * scale`` (Swin) or Swin-V2's cosine attention ``cos(q, k) * exp(min(logit_scale,
    log 100))`` per head (the per-head scale is folded into the normalised q; the key has no bias, as in Swin-V2).

    Drop-in for timm's ``swin_transformer.WindowAttention`` and ``swin_transformer_v2.WindowAttention`` (the same
    call signature and state_dict; :meth:`from_module` converts those, torchvision's ``ShiftedWindowAttention`` /
    ``ShiftedWindowAttentionV2`` -> :class:`FusedShiftedWindowAttention` and Hugging Face's Swin / Swin-V2 /
    Donut / MaskFormer / Swin2SR window attention -> :class:`FusedHFWindowAttention`).

    Memory: without a mask the bias is (1, H, N, N) and broadcasts over the windows. With a mask (nW, N, N) the
    bias of every window of every image, ``B_rel + M`` as one (B * nW, H, N, N) tensor, is materialised (the
    attention op takes one bias broadcastable to (batch, H, N, N), and window w of image b is batch row b * nW + w)
    - what timm's fused path materialises too, and less than its eager path, which holds the scores and
    probabilities (B * nW, H, N, N) each. The attention itself never stores an N x N matrix on the Triton backend
    (except the bias gradient, which is (B * nW, H, N, N) as in eager).

    Args:
        dim: channels C of x.
        num_heads: heads H.
        window_size: (Wh, Ww) (or an int); N = Wh * Ww tokens per window.
        head_dim: channels per head (default ``dim // num_heads``); the attention width is ``H * head_dim``.
        qkv_bias, proj_bias: biases of the projections.
        attn_drop: dropout on the attention probabilities (training only). proj_drop: after the projection.
        cosine: Swin-V2's cosine attention with ``logit_scale`` (H, 1, 1) and the continuous position bias MLP
            ``cpb_mlp`` (2 -> 512 -> H), instead of ``relative_position_bias_table``.
        pretrained_window_size: Swin-V2's coordinate normalisation (0: the window size).
        scale: score scale of the non-cosine attention (default ``head_dim ** -0.5``).
        mask_repeats: how many times the layer adds its mask (Hugging Face's Swin-V2 adds it twice: -200 where the
            original adds -100); 1 elsewhere.
        backend: ``"triton"`` / ``"torch"`` / None, as :class:`FusedMHSA`.

    Shape:
        ``forward(x (B * nW, N, C), mask=None (nW, N, N)) -> (B * nW, N, C)``; the windows of one image are
        consecutive in x (timm's ``window_partition``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        cosine: bool = False,
        pretrained_window_size: int | tuple[int, int] = 0,
        scale: float | None = None,
        mask_repeats: int = 1,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if (
            dim <= 0
            or num_heads <= 0
            or (head_dim is None and dim % num_heads)
            or (head_dim is not None and head_dim <= 0)
        ):
            raise ValueError(
                f"dim ({dim}) must be a positive multiple of num_heads ({num_heads}), or head_dim > 0 given"
            )
        head_dim = head_dim or dim // num_heads
        if not 0.0 <= float(attn_drop) < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}")
        window = tuple(window_size) if isinstance(window_size, (tuple, list)) else (window_size, window_size)
        if len(window) != 2 or min(window) <= 0:
            raise ValueError(f"window_size must be a positive int or (Wh, Ww); got {window_size}")
        if backend is not None:
            backends.requested_backend(backend)
            why = _attention_ops.head_dim_reasons(head_dim) if backend == "triton" else []
            if why:
                raise ValueError(f"backend='triton' (head dim {head_dim}): {why[0]}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window_size = (int(window[0]), int(window[1]))
        self.window_area = self.window_size[0] * self.window_size[1]
        self.cosine = bool(cosine)
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.attn_drop = float(attn_drop)
        self.mask_repeats = int(mask_repeats)
        self.backend = backend
        attn_dim = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        if self.cosine:
            pretrained = (
                tuple(pretrained_window_size)
                if isinstance(pretrained_window_size, (tuple, list))
                else (pretrained_window_size,) * 2
            )
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
            self.cpb_mlp = nn.Sequential(
                nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
            )
            self.register_buffer(
                "relative_coords_table", _swin_relative_coords_table(self.window_size, pretrained), persistent=False
            )
        else:
            table = torch.empty((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
            self.relative_position_bias_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))
        self.register_buffer(
            "relative_position_index", _swin_relative_position_index(self.window_size), persistent=False
        )

    # ---- the maths -------------------------------------------------------------------------------------------

    def position_bias(self) -> torch.Tensor:
        """The relative-position bias ``(H, N, N)`` of a window (Swin-V2: ``16 * sigmoid`` of the MLP's table)."""
        n = self.window_area
        if self.cosine:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        else:
            table = self.relative_position_bias_table
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    def window_bias(self, windows: int, mask: torch.Tensor | None) -> torch.Tensor:
        """The score bias of ``windows`` windows: (1, H, N, N) without a mask, else ``B_rel + M`` per window as
        (windows, H, N, N) (mask (nW, N, N) repeated over the images: window w of image b is row b * nW + w)."""
        bias = self.position_bias().unsqueeze(0)
        if mask is None:
            return bias
        n = self.window_area
        if mask.dim() != 3 or tuple(mask.shape[1:]) != (n, n) or mask.shape[0] == 0 or windows % mask.shape[0]:
            raise ValueError(
                f"mask must be (nW, N, N) with N = {n} and nW dividing the {windows} windows of x; "
                f"got {tuple(mask.shape)}"
            )
        if not mask.is_floating_point():
            raise ValueError(f"mask must be an additive float tensor (0 / -100 or -inf), got {mask.dtype}")
        num_windows = mask.shape[0]
        if self.mask_repeats != 1:
            mask = mask * self.mask_repeats
        bias = bias + mask.unsqueeze(1)  # (nW, H, N, N)
        return bias.unsqueeze(0).expand(windows // num_windows, -1, -1, -1, -1).reshape(windows, self.num_heads, n, n)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.cosine and self.qkv.bias is not None:  # Swin-V2: no key bias (its slice is neither used nor trained)
            q_bias, _, v_bias = self.qkv.bias.chunk(3)
            return _mlp_ops.linear(x, self.qkv.weight, torch.cat((q_bias, torch.zeros_like(q_bias), v_bias)))
        return _linear(x, self.qkv)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} expects x of shape (B * nW, N, C); got {tuple(x.shape)}")
        if x.shape[2] != self.dim:
            raise ValueError(f"x has {x.shape[2]} channels, {type(self).__name__} was built for dim={self.dim}")
        if x.shape[1] != self.window_area:
            raise ValueError(
                f"x has {x.shape[1]} tokens per window, the window {self.window_size} has {self.window_area}"
            )

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention before the output projection: ``(B * nW, N, C) -> (B * nW, N, H * head_dim)``."""
        self._check(x)
        windows, n, _ = x.shape
        q, k, v = self._qkv(x).view(windows, n, 3, self.num_heads, self.head_dim).unbind(2)  # (B nW, N, H, D) views
        scale = self.scale
        if self.cosine:
            logit_scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp().view(self.num_heads, 1)
            q = nn.functional.normalize(q, dim=-1) * logit_scale.to(q.dtype)
            k = nn.functional.normalize(k, dim=-1)
            scale = 1.0
        dropout_p = self.attn_drop if self.training else 0.0
        bias = self.window_bias(windows, mask)
        if self._aten_training(x, bias):
            # training on CPU with a learned bias: ATen's autograd through SDPA, exactly timm's fused path - the op's
            # torch backend recomputes the probabilities for the bias gradient (0.7-1.0x timm's step on Swin-T)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            sdpa = nn.functional.scaled_dot_product_attention
            out = sdpa(qt, kt, vt, attn_mask=bias, dropout_p=dropout_p, scale=scale)
            return out.transpose(1, 2).flatten(2)
        out = F.attention(q, k, v, bias, None, False, scale, dropout_p, self.backend)
        return out.flatten(2)

    def _aten_training(self, x: torch.Tensor, bias: torch.Tensor) -> bool:
        """A CPU training call under the automatic backend whose bias needs a gradient (the relative-position table)."""
        return (
            self.training
            and x.device.type == "cpu"
            and torch.is_grad_enabled()
            and bias.requires_grad
            and not self.backend
            and backends.requested_backend() is None
            and not torch.compiler.is_compiling()
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: (B * nW, N, C) windows of tokens, the nW windows of each image consecutive.
            mask: (nW, N, N) additive shifted-window mask (0 / -100), or None.

        Returns:
            (B * nW, N, C).
        """
        return self.proj_drop(_linear(self.attend(x, mask), self.proj))

    def explicit(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, head_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same maths in plain PyTorch with the probabilities (what ``output_attentions=True`` / a ``head_mask``
        need): ``(forward's output, probabilities (B * nW, H, N, N))``; ``head_mask`` multiplies the
        probabilities (broadcastable to them), after dropout, as Hugging Face does."""
        self._check(x)
        windows, n, _ = x.shape
        q, k, v = self._qkv(x).view(windows, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.cosine:
            logit_scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            scores = nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(k, dim=-1).transpose(-2, -1)
            scores = scores * logit_scale
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale
        scores = scores + self.window_bias(windows, mask)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        probs = nn.functional.dropout(probs, self.attn_drop, self.training)
        if head_mask is not None:
            probs = probs * head_mask
        out = (probs @ v).transpose(1, 2).reshape(windows, n, -1)
        return self.proj_drop(_linear(out, self.proj)), probs

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_heads={self.num_heads}", f"window_size={self.window_size}"]
        if self.head_dim * self.num_heads != self.dim:
            parts.append(f"head_dim={self.head_dim}")
        if self.cosine:
            parts.append("cosine=True")
        elif not math.isclose(self.scale, self.head_dim**-0.5):
            parts.append(f"scale={self.scale:g}")
        if self.attn_drop:
            parts.append(f"attn_drop={self.attn_drop:g}")
        if self.mask_repeats != 1:
            parts.append(f"mask_repeats={self.mask_repeats}")
        if self.backend:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    # ---- conversion --------------------------------------------------------------------------------------------

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> FusedWindowAttention:
        """A fused module with ``module``'s weights, buffers, heads, window, dropout and train/eval state; its
        state_dict has the original's keys and shapes (and loads the original's, or its own packed ones).

        Accepts timm ``swin_transformer.WindowAttention`` / ``swin_transformer_v2.WindowAttention`` ->
        :class:`FusedWindowAttention`; torchvision ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` ->
        :class:`FusedShiftedWindowAttention`; Hugging Face ``SwinAttention`` (``q_proj`` ... ``o_proj`` +
        ``relative_position_bias``, transformers 5) and the ``self`` / ``output`` layout of ``SwinAttention``
        (transformers 4), ``DonutSwinAttention``, ``MaskFormerSwinAttention``, ``Swinv2Attention``,
        ``Swin2SRAttention`` -> :class:`FusedHFWindowAttention`; a ``FusedWindowAttention`` (copied).
        """
        if isinstance(module, FusedWindowAttention):
            new = copy.deepcopy(module)
            new.backend = backend or module.backend
            return new
        layout = window_layout(module)
        if layout is None:
            raise TypeError(
                f"FusedWindowAttention.from_module does not know {type(module).__module__}.{type(module).__name__}; "
                "supported: timm Swin / Swin-V2 WindowAttention, torchvision ShiftedWindowAttention(V2), Hugging Face "
                "Swin / Swin-V2 / Donut / MaskFormer / Swin2SR attention"
            )
        reasons = window_unsupported_reasons(module)
        if reasons:
            raise TypeError(
                f"FusedWindowAttention cannot stand in for this {type(module).__name__}: {'; '.join(reasons)}"
            )
        new = _WINDOW_CONVERTERS[layout](module, backend)
        new.train(module.training)
        return new


class FusedShiftedWindowAttention(FusedWindowAttention):
    """:class:`FusedWindowAttention` with torchvision ``ShiftedWindowAttention(V2)``'s call: ``forward(x (B, H, W, C))
    -> (B, H, W, C)`` pads H, W to multiples of the window, rolls by ``-shift_size`` (no shift along an axis the
    window covers), partitions, attends with the shifted-window mask (-100 between the regions the roll brought
    together, built as torchvision does), and reverses all of it. State_dict as torchvision's (its buffers
    ``relative_position_index`` and, for V2, ``relative_coords_table`` are persistent there, and here)."""

    def __init__(self, dim: int, num_heads: int, window_size, shift_size=(0, 0), **kwargs) -> None:
        super().__init__(dim, num_heads, window_size, **kwargs)
        shift = tuple(shift_size) if isinstance(shift_size, (tuple, list)) else (shift_size, shift_size)
        self.shift_size = (int(shift[0]), int(shift[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, H, W, C={self.dim}); got {tuple(x.shape)}")
        batch, height, width, channels = x.shape
        wh, ww = self.window_size
        pad_r, pad_b = (ww - width % ww) % ww, (wh - height % wh) % wh
        x = nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pad_h, pad_w = height + pad_b, width + pad_r
        shift = [0 if wh >= pad_h else self.shift_size[0], 0 if ww >= pad_w else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        num_windows = (pad_h // wh) * (pad_w // ww)
        x = x.view(batch, pad_h // wh, wh, pad_w // ww, ww, channels).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch * num_windows, wh * ww, channels)
        mask = _tv_shift_mask(pad_h, pad_w, (wh, ww), shift, x) if sum(shift) > 0 else None
        x = super().forward(x, mask)
        x = x.view(batch, pad_h // wh, pad_w // ww, wh, ww, channels).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, pad_h, pad_w, channels)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :height, :width, :].contiguous()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shift_size={self.shift_size}"


def _tv_shift_mask(pad_h: int, pad_w: int, window, shift, like: torch.Tensor) -> torch.Tensor:
    """torchvision's shifted-window mask (nW, N, N): 0 within a region of the rolled map, -100 across (the same
    slices, in the same order, as ``torchvision.models.swin_transformer.shifted_window_attention``)."""
    wh, ww = window
    regions = like.new_zeros((pad_h, pad_w))
    h_slices = ((0, -wh), (-wh, -shift[0]), (-shift[0], None))
    w_slices = ((0, -ww), (-ww, -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            regions[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    regions = regions.view(pad_h // wh, wh, pad_w // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    mask = regions.unsqueeze(1) - regions.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class FusedHFWindowAttention(FusedWindowAttention):
    """:class:`FusedWindowAttention` with Hugging Face's call signature (what ``from_module`` returns for HF's Swin,
    Swin-V2, Donut, MaskFormer and Swin2SR window attention).

    ``forward(hidden_states (B * nW, N, C), attention_mask=None (nW, N, N), ...)`` takes the original's other
    arguments by the same names and positions and returns what it returns: ``(out, weights)`` for transformers 5's
    ``SwinAttention``, ``(out,)`` or ``(out, weights)`` (with ``output_attentions``) for the ``self`` / ``output``
    layout. When the weights are asked for (``output_attentions=True``, as an argument or in the model's config)
    or a ``head_mask`` is given, the same maths runs in plain PyTorch (:meth:`FusedWindowAttention.explicit`) and
    returns them: never a silently missing result. Otherwise the weights are not computed (None), as HF's SDPA path.
    """

    # the original's positional parameters after hidden_states, and whether it always returns (out, weights)
    _hf_arg_names: tuple[str, ...] = ("attention_mask",)
    _hf_pair = True
    _hf_config = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: D102
        if len(args) > len(self._hf_arg_names):
            raise TypeError(
                f"{type(self).__name__}.forward takes at most {len(self._hf_arg_names) + 1} positional "
                f"arguments ({len(args) + 1} given)"
            )
        named = dict(zip(self._hf_arg_names, args))
        named.update(kwargs)
        mask = named.get("attention_mask")
        head_mask = named.get("head_mask")
        want_weights = named.get("output_attentions")
        if want_weights is None:
            want_weights = bool(getattr(self._hf_config, "output_attentions", False))
        if want_weights or head_mask is not None:
            out, weights = self.explicit(hidden_states, mask, head_mask)
        else:
            out, weights = super().forward(hidden_states, mask), None
        if self._hf_pair:
            return out, weights
        return (out, weights) if want_weights else (out,)


# ---- recognising and converting the originals -------------------------------------------------------------------

_HF_OLD_LAYOUT = {  # Hugging Face classes of the ``self`` (query / key / value) + ``output`` (dense) layout
    "SwinAttention",
    "DonutSwinAttention",
    "MaskFormerSwinAttention",
    "Swinv2Attention",
    "Swin2SRAttention",
    "ClapAudioAttention",
}


def window_layout(m: nn.Module) -> str | None:
    """Which window-attention layout ``m`` is, matched by exact class (library module and name) and checked
    attributes: ``"timm"``, ``"timm_v2"``, ``"torchvision"``, ``"hf"`` (transformers 5's SwinAttention),
    ``"hf_self_output"``; None for anything else."""
    cls = type(m)
    name, where = cls.__name__, cls.__module__
    if name == "WindowAttention" and where == "timm.models.swin_transformer":
        return "timm" if hasattr(m, "relative_position_bias_table") and isinstance(m.qkv, nn.Linear) else None
    if name == "WindowAttention" and where == "timm.models.swin_transformer_v2":
        return "timm_v2" if hasattr(m, "logit_scale") and isinstance(m.qkv, nn.Linear) else None
    if (
        name in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")
        and where == "torchvision.models.swin_transformer"
    ):
        return "torchvision"
    if not where.startswith("transformers.models."):
        return None
    if name == "SwinAttention" and isinstance(getattr(m, "relative_position_bias", None), nn.Module):
        return "hf" if _is_hf_vit_attention(m) else None
    if name in _HF_OLD_LAYOUT and isinstance(getattr(m, "self", None), nn.Module):
        s = m.self
        has_qkv = _has_qkv_linears(s)
        has_bias = hasattr(s, "relative_position_bias_table") or hasattr(s, "logit_scale")
        if has_qkv and has_bias and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear):
            return "hf_self_output"
    return None


def window_geometry(m: nn.Module) -> tuple[int, tuple[int, int]]:
    """(channels C, window (Wh, Ww)) of a window attention :func:`window_layout` knows."""
    layout = window_layout(m)
    if layout in ("timm", "timm_v2", "torchvision"):
        dim, window = m.qkv.in_features, m.window_size
    elif layout == "hf":
        dim, window = m.q_proj.in_features, m.relative_position_bias.window_size
    elif layout == "hf_self_output":
        dim, window = m.self.query.in_features, m.self.window_size
    else:
        raise TypeError(f"{type(m).__name__} is not a known window-attention layout")
    window = tuple(window) if isinstance(window, (tuple, list)) else (window, window)
    return dim, (int(window[0]), int(window[1]))


def is_window_candidate(m: nn.Module) -> bool:
    """Whether ``m`` is a window attention :meth:`FusedWindowAttention.from_module` knows (it may refuse a variant:
    :func:`window_unsupported_reasons`)."""
    return not isinstance(m, FusedWindowAttention) and window_layout(m) is not None


def window_unsupported_reasons(m: nn.Module) -> list[str]:
    """Why :meth:`FusedWindowAttention.from_module` cannot stand in for ``m`` (empty when it can)."""
    layout = window_layout(m)
    if layout is None:
        return [f"{type(m).__name__} is not a known window-attention layout"]
    reasons = []
    if layout == "timm_v2" and m.k_bias is not None and bool(m.k_bias.any()):
        reasons.append("a non-zero k_bias buffer (Swin-V2 has no key bias)")
    if layout == "hf_self_output" and hasattr(m.self, "logit_scale") and m.self.key.bias is not None:
        reasons.append("Swin-V2 cosine attention with a key bias")
    return reasons


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src)


def _set_buffer(new: nn.Module, name: str, owner: nn.Module, src_name: str) -> None:
    """``new.<name>`` = a copy of ``owner.<src_name>``, persistent in ``new``'s state_dict iff it is in owner's."""
    tensor = getattr(owner, src_name)
    new.register_buffer(name, tensor.detach().clone(), persistent=src_name not in owner._non_persistent_buffers_set)


def _position_params(new: FusedWindowAttention, owner: nn.Module, cpb_name: str = "cpb_mlp") -> None:
    """The relative-position parameters and buffers of ``owner`` (table, or logit_scale + the MLP + coordinates)."""
    _set_buffer(new, "relative_position_index", owner, "relative_position_index")
    if new.cosine:
        _copy_into(new.logit_scale, owner.logit_scale.reshape(new.logit_scale.shape))
        new.cpb_mlp = copy.deepcopy(getattr(owner, cpb_name))
        _set_buffer(new, "relative_coords_table", owner, "relative_coords_table")
    else:
        _copy_into(new.relative_position_bias_table, owner.relative_position_bias_table)


def _from_timm_window(m: nn.Module, backend: str | None) -> FusedWindowAttention:
    cosine = hasattr(m, "logit_scale")
    heads = m.num_heads
    attn_dim = m.qkv.out_features // 3
    qkv_bias = m.q_bias is not None if cosine else m.qkv.bias is not None
    new = FusedWindowAttention(
        m.qkv.in_features,
        heads,
        m.window_size,
        head_dim=attn_dim // heads,
        qkv_bias=qkv_bias,
        proj_bias=m.proj.bias is not None,
        attn_drop=_dropout_p(m.attn_drop),
        proj_drop=_dropout_p(m.proj_drop),
        cosine=cosine,
        scale=None if cosine else float(m.scale),
        backend=backend,
    ).to(m.qkv.weight)
    _copy_into(new.qkv.weight, m.qkv.weight)
    if qkv_bias:
        _copy_into(new.qkv.bias, torch.cat((m.q_bias, m.k_bias, m.v_bias)) if cosine else m.qkv.bias)
    new.proj.load_state_dict(m.proj.state_dict())
    _position_params(new, m)
    if cosine and qkv_bias:  # timm's q_bias / v_bias parameters (k_bias: a non-persistent zero buffer)
        _keep_window_keys(new, lambda key: _split_key(key, "qkv.bias", ("q_bias", None, "v_bias")) or key)
    return new


def _from_tv_window(m: nn.Module, backend: str | None) -> FusedShiftedWindowAttention:
    cosine = hasattr(m, "logit_scale")
    new = FusedShiftedWindowAttention(
        m.qkv.in_features,
        m.num_heads,
        tuple(m.window_size),
        tuple(m.shift_size),
        qkv_bias=m.qkv.bias is not None,
        proj_bias=m.proj.bias is not None,
        attn_drop=float(m.attention_dropout),
        proj_drop=float(m.dropout),
        cosine=cosine,
        backend=backend,
    ).to(m.qkv.weight)
    new.qkv.load_state_dict(m.qkv.state_dict())  # V2: the key slice of the bias is kept, unused (as torchvision)
    new.proj.load_state_dict(m.proj.state_dict())
    _position_params(new, m)
    return new


def _from_hf_window(m: nn.Module, backend: str | None) -> FusedHFWindowAttention:
    if window_layout(m) == "hf":  # transformers 5: q_proj / k_proj / v_proj / o_proj + relative_position_bias
        owner, projections, out = m.relative_position_bias, (m.q_proj, m.k_proj, m.v_proj), m.o_proj
        heads, head_dim, scale = m.num_attention_heads, m.head_dim, float(m.scaling)
        attn_drop, proj_drop, cosine, mask_repeats = float(m.attention_dropout), 0.0, False, 1
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "o_proj", "pos": "relative_position_bias."}
    else:  # self (query / key / value, the position bias) + output (dense, dropout)
        owner = m.self
        projections, out = (owner.query, owner.key, owner.value), m.output.dense
        heads, head_dim = owner.num_attention_heads, owner.attention_head_size
        cosine = hasattr(owner, "logit_scale")
        scale = None if cosine else head_dim**-0.5
        attn_drop, proj_drop = _dropout_p(owner.dropout), _dropout_p(getattr(m.output, "dropout", None))
        mask_repeats = _hf_mask_repeats(type(owner))
        names = {"q": "self.query", "k": "self.key", "v": "self.value", "out": "output.dense", "pos": "self."}
    window = tuple(owner.window_size) if isinstance(owner.window_size, (tuple, list)) else (owner.window_size,) * 2
    has_bias = [p.bias is not None for p in projections]
    new = FusedHFWindowAttention(
        projections[0].in_features,
        heads,
        window,
        head_dim=head_dim,
        qkv_bias=any(has_bias),
        proj_bias=out.bias is not None,
        attn_drop=attn_drop,
        proj_drop=proj_drop,
        cosine=cosine,
        scale=scale,
        mask_repeats=mask_repeats,
        backend=backend,
    ).to(projections[0].weight)
    with torch.no_grad():
        new.qkv.weight.copy_(torch.cat([p.weight for p in projections]))
        if any(has_bias):
            new.qkv.bias.copy_(
                torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projections])
            )
    new.proj.load_state_dict(out.state_dict())
    _position_params(new, owner, "continuous_position_bias_mlp")
    new._hf_config = getattr(m, "config", None)
    new._hf_pair = window_layout(m) == "hf"
    new._hf_arg_names = _hf_positional_names(m)

    def rename(key: str):
        q, k, v = (names[x] if has else None for x, has in zip("qkv", has_bias))
        for leaf in ("weight", "bias"):
            if key == f"qkv.{leaf}":
                parts = (q, k, v) if leaf == "bias" else (names["q"], names["k"], names["v"])
                return _split_key(key, key, tuple(p and f"{p}.{leaf}" for p in parts))
            if key == f"proj.{leaf}":
                return f"{names['out']}.{leaf}"
        if key.startswith("cpb_mlp."):
            return names["pos"] + "continuous_position_bias_mlp." + key[len("cpb_mlp.") :]
        return names["pos"] + key

    _keep_window_keys(new, rename)
    return new


def _hf_positional_names(m: nn.Module) -> tuple[str, ...]:
    try:
        params = list(inspect.signature(type(m).forward).parameters.values())[2:]  # after self, hidden_states
    except (TypeError, ValueError):
        return ("attention_mask",)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def _hf_mask_repeats(cls: type) -> int:
    """How many times a Hugging Face ``*SelfAttention.forward`` adds its window mask: Swin-V2 and Swin2SR add it
    twice (``scores.view(...) + mask`` and again ``+ mask``: -200 across regions, which matters once a head's
    logit scale approaches 100); read from the source, 1 where it cannot be read."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return 1
    return max(1, source.count("attention_mask.unsqueeze(1).unsqueeze(0)"))


_WINDOW_CONVERTERS = {
    "timm": _from_timm_window,
    "timm_v2": _from_timm_window,
    "torchvision": _from_tv_window,
    "hf": _from_hf_window,
    "hf_self_output": _from_hf_window,
}


# ---- the original's state_dict keys -------------------------------------------------------------------------------


def _split_key(key: str, own: str, parts: tuple[str | None, str | None, str | None]):
    """For ``key == own``: the packed q / k / v tensor saved as its three chunks under ``parts`` (None: that chunk
    is not in the original's state_dict); else None."""
    return tuple((name, i) for i, name in enumerate(parts) if name is not None) if key == own else None


def _keep_window_keys(new: nn.Module, rename) -> None:
    """Save (and load) ``new``'s state_dict under the original's keys: ``rename(own key)`` is the original key, or
    a tuple of ``(original key, chunk)`` for a packed q / k / v tensor split into its 3 chunks."""
    mapping = {}
    for key in nn.Module.state_dict(new):
        orig = rename(key)
        parts = ((orig, None),) if isinstance(orig, str) else tuple(orig)
        if parts != ((key, None),):
            mapping[key] = parts
    new._window_key_map = mapping
    new.register_state_dict_post_hook(_window_save_hook)
    new.register_load_state_dict_pre_hook(_window_load_hook)


def _window_save_hook(module, state_dict, prefix, local_metadata) -> None:
    for own, parts in module._window_key_map.items():
        if prefix + own not in state_dict:
            continue
        tensor = state_dict.pop(prefix + own)
        if parts[0][1] is None:
            state_dict[prefix + parts[0][0]] = tensor
        else:
            chunks = tensor.chunk(3)
            for name, i in parts:
                state_dict[prefix + name] = chunks[i].clone()  # no shared storage (safetensors)


def _window_load_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for own, parts in module._window_key_map.items():
        if prefix + own in state_dict or not all(prefix + name in state_dict for name, _ in parts):
            continue
        if parts[0][1] is None:
            state_dict[prefix + own] = state_dict.pop(prefix + parts[0][0])
            continue
        chunks = dict((i, state_dict.pop(prefix + name)) for name, i in parts)
        first = next(iter(chunks.values()))
        state_dict[prefix + own] = torch.cat([chunks[i] if i in chunks else torch.zeros_like(first) for i in range(3)])


# ---- Hugging Face's self / output attention layout with a relative-position bias (BEiT family) -------------------


def is_hf_relpos_candidate(m: nn.Module) -> bool:
    """Hugging Face's older BEiT-family layout (``Data2VecVisionAttention``; ``BeitAttention`` before transformers 5):
    ``attention`` holding ``query`` / ``key`` / ``value`` Linears, ``num_attention_heads``, ``attention_head_size``
    and ``has_relative_position_bias``, and ``output`` holding ``dense``."""
    if isinstance(m, FusedHFRelPosAttention):
        return False
    s, o = getattr(m, "attention", None), getattr(m, "output", None)
    return (
        isinstance(s, nn.Module)
        and isinstance(o, nn.Module)
        and _has_qkv_linears(s)
        and isinstance(getattr(o, "dense", None), nn.Linear)
        and hasattr(s, "num_attention_heads")
        and hasattr(s, "attention_head_size")
        and hasattr(s, "has_relative_position_bias")
        and isinstance(getattr(s, "dropout", None), nn.Dropout)
    )


def hf_relpos_unsupported_reasons(m: nn.Module) -> list[str]:
    s = m.attention
    reasons = []
    if s.num_attention_heads * s.attention_head_size != s.query.out_features:
        reasons.append("query width is not heads x head size")
    if s.has_relative_position_bias and not hasattr(getattr(s, "config", None), "patch_size"):
        reasons.append("relative-position bias without config.patch_size (the window is derived from it)")
    return reasons


class FusedHFRelPosAttention(nn.Module):
    """Hugging Face's BEiT-family attention (``Data2VecVisionAttention``; ``BeitAttention`` before transformers 5) on
    the fused attention op: ``output.dense(softmax(q k^T / sqrt(d) + B_rel [+ B_shared]) v)``.

    The original's ``attention`` (query / key / value Linears, the ``relative_position_bias`` module) and ``output``
    submodules are kept as they are, so ``state_dict()`` has the original's keys and shapes and loads both ways, and the
    relative-position bias (H, N, N) is computed by the original's own module (interpolation included), then passed to
    :func:`pykernels.functional.attention` as an additive bias together with the shared bias the encoder may pass.
    ``output_attentions=True`` runs the original class's own forward (the weights are materialised there only).
    """

    def __init__(self, module: nn.Module, backend: str | None = None):
        super().__init__()
        self.attention = module.attention
        self.output = module.output
        self.backend = backend
        self._original_forward = type(module).forward

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> FusedHFRelPosAttention:
        if not is_hf_relpos_candidate(module):
            raise TypeError(f"{type(module).__name__} is not a Hugging Face self / output attention with query / key")
        problems = hf_relpos_unsupported_reasons(module)
        if problems:
            raise ValueError(f"{type(module).__name__}: " + "; ".join(problems))
        return cls(module, backend).train(module.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        relative_position_bias: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        resolution: tuple[int, int] | None = None,
    ):
        """Returns ``(out, None)`` as the SDPA original (``(out, weights)`` with ``output_attentions=True``)."""
        if output_attentions:
            return self._original_forward(
                self, hidden_states, True, relative_position_bias, interpolate_pos_encoding, resolution
            )
        s = self.attention
        batch, n, _ = hidden_states.shape
        heads, head_dim = s.num_attention_heads, s.attention_head_size
        q, k, v = (_linear(hidden_states, p).view(batch, n, heads, head_dim) for p in (s.query, s.key, s.value))
        bias = None
        if s.has_relative_position_bias:
            if resolution is None:
                raise ValueError("a relative-position bias needs resolution=(height, width) of the image")
            height, width = resolution
            window = (height // s.config.patch_size, width // s.config.patch_size)
            bias = s.relative_position_bias(window, interpolate_pos_encoding, dim_size=n)
        if relative_position_bias is not None:
            bias = relative_position_bias if bias is None else bias + relative_position_bias
        dropout_p = s.dropout.p if self.training else 0.0
        out = F.attention(q, k, v, bias, None, False, head_dim**-0.5, dropout_p, self.backend)
        return self.output(out.flatten(2), hidden_states), None
