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
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
from torch import nn

from pykernels import backends
from pykernels import functional as F
from pykernels.modules._keys import rename_keys
from pykernels.ops import attention as _attention_ops
from pykernels.ops import mlp as _mlp_ops

__all__ = [
    "FusedMHSA",
    "FusedMaskedMHSA",
    "FusedMultiheadAttention",
    "FusedViTAttention",
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


# attention layers whose maths FusedMHSA does not compute (yet): matched by class name, skipped with this reason
_WINDOW_ATTENTION = (
    "window attention (a relative-position bias per window and the shifted-window mask, computed inside the layer): "
    "FusedMHSA does not compute it yet"
)
KNOWN_UNSUPPORTED = {
    "WindowAttention": _WINDOW_ATTENTION,  # timm Swin
    "ShiftedWindowAttention": _WINDOW_ATTENTION,  # torchvision Swin
    "ShiftedWindowAttentionV2": _WINDOW_ATTENTION + " (with Swin-V2's cosine attention)",
    "SwinAttention": _WINDOW_ATTENTION,  # Hugging Face Swin
    "Swinv2Attention": _WINDOW_ATTENTION + " (with Swin-V2's cosine attention)",
    "DonutSwinAttention": _WINDOW_ATTENTION,
}


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
