"""The transformer MLP ``fc2(act(fc1(x)))`` (ViT, Dosovitskiy et al. 2021; MLP-Mixer; the MLP of ConvNeXt-style
blocks) as a drop-in module on :func:`pykernels.functional.mlp`: fc1 + bias + activation as one GEMM call on packed
weights in inference, the hidden pre-activation saved once in training (see :mod:`pykernels.ops.mlp`).

:class:`FusedMlp` stands in for timm's ``Mlp`` (``use_conv`` False and True), torchvision's ``MLPBlock`` / two-layer
``MLP`` and Hugging Face's ``ViTMLP`` / ``Dinov2MLP`` (and, verified by ``swap`` on a probe, other HF ``*MLP`` classes
of that layout: ``SwinMLP``, ``BeitMLP``, ``CLIPMLP`` with a GELU). :meth:`FusedMlp.from_module` keeps the original's
own submodules, under their own names (``fc1`` / ``act`` / ``drop1`` / ``norm`` / ``fc2`` / ``drop2``, torchvision's
``0`` ... ``4``, HF's ``fc1`` / ``activation_fn`` / ``fc2``): the state_dict keys do not change, and an optimizer built
before the swap still holds the parameters the model trains. Variants it does not compute - a norm between the two
layers, an activation outside :data:`pykernels.ops.mlp.ACTS`, other layer types - are refused with the reasons
(:func:`unsupported_reasons`). Dropout with p > 0 is computed by the original layers in training mode (the fused path
has no dropout; in eval dropout is the identity and the fused path runs).

Inside a pre-norm block whose forward is known to be ``x + ... mlp(norm(x))`` (timm's ViT ``Block``, torchvision's
``EncoderBlock``, Hugging Face's ``ViTLayer`` / ``Dinov2Layer``), ``pykernels.swap`` also hands the LayerNorm to the
FusedMlp (:func:`adopt_prenorm`): the block's norm becomes a :class:`MlpPreNorm` - the same parameters under the same
name, an identity forward - and the FusedMlp normalises inside its fused op, so training saves the LayerNorm's input
alone (eager keeps it and the normalised copy fc1 reads).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pykernels import functional as PF
from pykernels.ops import mlp as _mlp_ops

__all__ = [
    "FusedMlp",
    "MlpPreNorm",
    "act_name",
    "adopt_prenorm",
    "can_convert",
    "is_candidate",
    "prenorm_name",
    "unsupported_reasons",
]


def act_name(act: nn.Module) -> str | None:
    """The fused MLP's name for an activation module (``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"``,
    ``"none"``), or None when it is not one it computes exactly."""
    cls = type(act)
    qual = f"{cls.__module__}.{cls.__name__}"
    if cls is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if cls in (nn.ReLU,):
        return "relu"
    if cls is nn.SiLU:
        return "silu"
    if cls is nn.Identity:
        return "none"
    if qual == "timm.layers.activations.GELU":
        return "gelu"
    if qual == "timm.layers.activations.GELUTanh":
        return "gelu_tanh"
    if qual == "timm.layers.activations.Swish":
        return "silu"
    if qual == "transformers.activations.GELUActivation":
        return "gelu" if getattr(act, "act", None) is nn.functional.gelu else None
    if qual == "transformers.activations.GELUTanh":
        fn = getattr(act, "act", None)
        ok = getattr(fn, "func", None) is nn.functional.gelu and getattr(fn, "keywords", {}) == {"approximate": "tanh"}
        return "gelu_tanh" if ok else None
    if qual == "transformers.activations.SiLUActivation":
        return "silu"
    return None


# ---- the layouts it knows: (child names in call order, the roles fc1 / act / fc2 / norm / drops) --------------------

_TIMM = {"fc1": "fc1", "act": "act", "fc2": "fc2", "norm": "norm", "drops": ("drop1", "drop2")}
_TORCHVISION = {"fc1": "0", "act": "1", "fc2": "3", "norm": None, "drops": ("2", "4")}
_HF = {"fc1": "fc1", "act": "activation_fn", "fc2": "fc2", "norm": None, "drops": ()}


def _source(m: nn.Module) -> str | None:
    cls = type(m)
    if cls.__name__ == "Mlp" and cls.__module__.startswith("timm."):
        return "timm"
    if cls.__module__.startswith("torchvision.") and cls.__name__ in ("MLPBlock", "MLP"):
        return "torchvision" if isinstance(m, nn.Sequential) else None
    if cls.__module__.startswith("transformers.") and (cls.__name__ in HF_EXACT or _hf_layout(m)):
        return "huggingface"
    return None


# Hugging Face MLP classes known to compute fc2(act(fc1(x))) exactly; other transformers classes of the same layout
# (fc1, activation_fn, fc2 and nothing else: SwinMLP, BeitMLP, CLIPMLP, ...) are matched by structure, and
# ``pykernels.swap`` verifies them on a probe input before replacing them (:func:`is_structural_match`)
HF_EXACT = ("ViTMLP", "Dinov2MLP")


def _hf_layout(m: nn.Module) -> bool:
    return type(m).__name__.endswith("MLP") and set(dict(m.named_children())) == {"fc1", "activation_fn", "fc2"}


def is_structural_match(module: nn.Module) -> bool:
    """A Hugging Face MLP matched by its layout rather than its exact class (``swap`` verifies it on a probe)."""
    return _source(module) == "huggingface" and type(module).__name__ not in HF_EXACT


_LAYOUTS = {"timm": _TIMM, "torchvision": _TORCHVISION, "huggingface": _HF}


def is_candidate(module: nn.Module) -> bool:
    """Whether ``module`` is an MLP of a layout :meth:`FusedMlp.from_module` knows (it may still refuse a variant)."""
    return not isinstance(module, FusedMlp) and _source(module) is not None


def _layer_reasons(name: str, layer, conv: bool) -> list[str]:
    if conv:
        if type(layer) is not nn.Conv2d:
            return [f"{name} is a {type(layer).__name__}, not a 1x1 nn.Conv2d"]
        plain = (tuple(layer.kernel_size), tuple(layer.stride), layer.groups, tuple(layer.dilation)) == (
            (1, 1),
            (1, 1),
            1,
            (1, 1),
        )
        if not plain or (layer.padding != "same" and tuple(layer.padding) != (0, 0)) or layer.padding_mode != "zeros":
            return [f"{name} is not a plain 1x1 convolution ({layer})"]
        return []
    if not isinstance(layer, nn.Linear):
        return [f"{name} is a {type(layer).__name__}, not an nn.Linear"]
    return []


def _reasons(module: nn.Module, source: str) -> list[str]:
    layout = _LAYOUTS[source]
    children = dict(module.named_children())
    if source == "torchvision":
        names = [type(c).__name__ for c in module]
        if len(names) != 5 or not (
            isinstance(module[0], nn.Linear)
            and isinstance(module[2], nn.Dropout)
            and isinstance(module[3], nn.Linear)
            and isinstance(module[4], nn.Dropout)
        ):
            return [f"a torchvision MLP of layout {names}, not [Linear, activation, Dropout, Linear, Dropout]"]
    missing = [layout[r] for r in ("fc1", "act", "fc2") if layout[r] not in children]
    if missing:
        return [f"no {', '.join(missing)} submodule"]
    fc1, act, fc2 = (children[layout[r]] for r in ("fc1", "act", "fc2"))
    conv = isinstance(fc1, nn.Conv2d)
    reasons = _layer_reasons("fc1", fc1, conv) + _layer_reasons("fc2", fc2, conv)
    if not reasons and fc1.weight.shape[0] != fc2.weight.shape[1]:
        reasons.append(f"fc1 gives {fc1.weight.shape[0]} features but fc2 takes {fc2.weight.shape[1]}")
    if act_name(act) is None:
        reasons.append(
            f"the activation is {type(act).__name__}, not one the fused MLP computes exactly "
            f"({', '.join(_mlp_ops.ACTS)})"
        )
    norm = children.get(layout["norm"]) if layout["norm"] else None
    if norm is not None and not isinstance(norm, nn.Identity):
        reasons.append(f"a {type(norm).__name__} between fc1 and fc2")
    for name in layout["drops"]:
        drop = children.get(name)
        if drop is not None and not isinstance(drop, (nn.Dropout, nn.Identity)):
            reasons.append(f"{name} is a {type(drop).__name__}, not nn.Dropout")
    extra = set(children) - {layout["fc1"], layout["act"], layout["fc2"], layout["norm"], *layout["drops"]}
    if extra:
        reasons.append(f"unknown submodules {sorted(extra)}")
    return reasons


def unsupported_reasons(module: nn.Module) -> list[str]:
    """Why :meth:`FusedMlp.from_module` cannot stand in for ``module`` (empty when it can)."""
    if isinstance(module, FusedMlp):
        return []
    source = _source(module)
    if source is None:
        return [
            f"{type(module).__name__} is not a known MLP layout (timm Mlp, torchvision MLPBlock / MLP, Hugging Face "
            "*MLP with fc1 / activation_fn / fc2)"
        ]
    return _reasons(module, source)


def can_convert(module: nn.Module) -> bool:
    """Whether :meth:`FusedMlp.from_module` computes what ``module`` computes (False for a ``FusedMlp`` itself, so
    that ``pykernels.swap`` is idempotent)."""
    return is_candidate(module) and not unsupported_reasons(module)


class FusedMlp(nn.Module):
    """``fc2(act(fc1(x)))`` over the last dim with a fused GEMM + activation, as :func:`pykernels.functional.mlp`.

    Drop-in for ``timm.layers.Mlp`` (same submodules and parameter names, so its state_dict loads with
    ``strict=True``); :meth:`from_module` converts timm's ``Mlp``, torchvision's ``MLPBlock`` and Hugging Face's
    ``ViTMLP`` / ``Dinov2MLP`` keeping their submodules (and state_dict keys).

    Args:
        in_features: K.
        hidden_features: H (default K).
        out_features: N (default K).
        act: ``"gelu"`` (erf), ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or ``"none"``.
        bias: bias in fc1 / fc2 (a pair for each).
        drop: dropout after the activation and after fc2 (a pair for each); training mode with p > 0 runs the
            layers one by one (as timm does).
        use_conv: 1x1 ``nn.Conv2d`` layers on ``(B, C, H, W)`` inputs (timm's ``use_conv=True``), computed on the
            channels-last view.

    Shape:
        ``(..., K) -> (..., N)``; with ``use_conv``: ``(B, K, H, W) -> (B, N, H, W)`` (channels-last in memory).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act: str = "gelu",
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        use_conv: bool = False,
    ) -> None:
        super().__init__()
        reasons = _mlp_ops.act_reasons(act)
        if reasons:
            raise ValueError(reasons[0])
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        bias1, bias2 = (bias, bias) if isinstance(bias, bool) else bias
        drop1, drop2 = (drop, drop) if isinstance(drop, (int, float)) else drop
        layer = (lambda i, o, b: nn.Conv2d(i, o, 1, bias=b)) if use_conv else (lambda i, o, b: nn.Linear(i, o, bias=b))
        self.fc1 = layer(in_features, hidden_features, bias1)
        self.act = _ACT_MODULES[act]()
        self.drop1 = nn.Dropout(drop1)
        self.norm = nn.Identity()
        self.fc2 = layer(hidden_features, out_features, bias2)
        self.drop2 = nn.Dropout(drop2)
        self._set_layout("timm", act, use_conv)

    def _set_layout(self, source: str, act: str, use_conv: bool) -> None:
        layout = _LAYOUTS[source]
        self._source = source
        self._fc1, self._act, self._fc2 = layout["fc1"], layout["act"], layout["fc2"]
        self.act_name = act
        self.use_conv = use_conv
        self.set_prenorm(None)

    def set_prenorm(self, norm: MlpPreNorm | None) -> None:
        """Normalise the input with ``norm`` (a block's :class:`MlpPreNorm`, owned - and saved in the state_dict -
        by the block) before fc1, inside the fused op; None: no norm. See :func:`adopt_prenorm`."""
        object.__setattr__(self, "_prenorm", norm)  # a reference, not a submodule: the block owns it

    @property
    def fc1_layer(self) -> nn.Module:
        return self._modules[self._fc1]

    @property
    def fc2_layer(self) -> nn.Module:
        return self._modules[self._fc2]

    def _dropout_in_training(self) -> bool:
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self._modules.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: ``(..., K)`` (``(B, K, H, W)`` with ``use_conv``).

        Returns:
            ``(..., N)`` (``(B, N, H, W)``, channels-last in memory, with ``use_conv``).
        """
        norm = self._prenorm
        if self._dropout_in_training():
            if norm is not None:
                x = nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            for module in self._modules.values():  # the original's forward: its children in order
                x = module(x)
            return x
        fc1, fc2 = self.fc1_layer, self.fc2_layer
        if norm is not None:
            return PF.mlp(
                x,
                fc1.weight,
                fc1.bias,
                fc2.weight,
                fc2.bias,
                self.act_name,
                ln_weight=norm.weight,
                ln_bias=norm.bias,
                ln_eps=norm.eps,
            )
        if self.use_conv:
            if x.dim() != 4:
                raise ValueError(f"FusedMlp(use_conv=True) expects x of shape (B, C, H, W), got {tuple(x.shape)}")
            out = PF.mlp(x.permute(0, 2, 3, 1), fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.act_name)
            return out.permute(0, 3, 1, 2)
        return PF.mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.act_name)

    def extra_repr(self) -> str:
        parts = [f"act={self.act_name!r}"]
        if self._prenorm is not None:
            parts.append("prenorm=True")
        if self.use_conv:
            parts.append("use_conv=True")
        if self._source != "timm":
            parts.append(f"layout={self._source!r}")
        return ", ".join(parts)

    @classmethod
    def can_convert(cls, module: nn.Module) -> bool:
        """Whether :meth:`from_module` can stand in for ``module`` (see :func:`can_convert`)."""
        return can_convert(module)

    @classmethod
    def from_module(cls, module: nn.Module) -> FusedMlp:
        """A ``FusedMlp`` computing what ``module`` computes, built from ``module``'s own submodules (shared, not
        copied: the parameters, their ``requires_grad``, device and dtype are the original's, and so are the
        state_dict keys), in ``module``'s train/eval state.

        Accepts timm ``Mlp`` (``use_conv`` False / True; ``norm`` Identity), torchvision ``MLPBlock`` / ``MLP``
        ``[Linear, activation, Dropout, Linear, Dropout]``, Hugging Face ``ViTMLP`` / ``Dinov2MLP`` (and other
        ``*MLP`` classes made of ``fc1`` / ``activation_fn`` / ``fc2`` alone), and a
        ``FusedMlp`` (deep-copied). Activations: exact GELU, tanh-GELU, ReLU, SiLU, Identity.

        Raises:
            TypeError: not a known MLP layout.
            ValueError: a known layout in a variant the fused MLP does not compute (the message lists why).
        """
        if isinstance(module, FusedMlp):
            return copy.deepcopy(module)
        source = _source(module)
        if source is None:
            raise TypeError(
                f"FusedMlp.from_module does not know {type(module).__module__}.{type(module).__name__}; supported: "
                "timm Mlp, torchvision MLPBlock / MLP, Hugging Face ViTMLP / Dinov2MLP (or an *MLP of fc1 / "
                "activation_fn / fc2), FusedMlp"
            )
        reasons = _reasons(module, source)
        if reasons:
            raise ValueError(
                f"FusedMlp cannot stand in for this {type(module).__name__} ({source}): " + "; ".join(reasons)
            )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in module.named_children():
            new.add_module(name, child)
        layout = _LAYOUTS[source]
        act = act_name(module.get_submodule(layout["act"]))
        new._set_layout(source, act, isinstance(new._modules[layout["fc1"]], nn.Conv2d))
        if hasattr(module, "config"):  # Hugging Face modules carry their config
            new.config = module.config
        new.train(module.training)
        return new


_ACT_MODULES = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "none": nn.Identity,
}


class MlpPreNorm(nn.LayerNorm):
    """A block's LayerNorm that the following :class:`FusedMlp` computes inside its fused op (see
    :func:`adopt_prenorm`): the original's parameters (the same ``nn.Parameter`` objects, under the same name, so the
    state_dict and an existing optimizer are unchanged), and an identity forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x

    @classmethod
    def wrap(cls, norm: nn.LayerNorm) -> MlpPreNorm:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = tuple(norm.normalized_shape)
        new.eps = norm.eps
        new.elementwise_affine = norm.elementwise_affine
        new.weight = norm.weight
        new.bias = norm.bias
        new.train(norm.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + ", computed by the following FusedMlp"


# (module, class) of blocks whose forward is x + ... mlp(norm(x)), with the name of that norm
_PRENORM_BLOCKS = {
    ("timm.models.vision_transformer", "Block"): "norm2",
    ("torchvision.models.vision_transformer", "EncoderBlock"): "ln_2",
    ("transformers.models.vit.modeling_vit", "ViTLayer"): "layernorm_after",
    ("transformers.models.dinov2.modeling_dinov2", "Dinov2Layer"): "norm2",
}
_PLAIN_LAYER_NORMS = {"torch.nn.modules.normalization.LayerNorm", "timm.layers.norm.LayerNorm"}


def prenorm_name(block: nn.Module, mlp_name: str, mlp: nn.Module) -> str | None:
    """The name of ``block``'s norm that :func:`adopt_prenorm` would move into ``mlp`` (the FusedMlp standing in for
    ``block.<mlp_name>``), or None."""
    norm_name = _PRENORM_BLOCKS.get((type(block).__module__, type(block).__name__))
    if norm_name is None or mlp_name != "mlp" or not isinstance(mlp, FusedMlp) or mlp.use_conv:
        return None
    if mlp._prenorm is not None:
        return None
    norm = getattr(block, norm_name, None)
    if f"{type(norm).__module__}.{type(norm).__name__}" not in _PLAIN_LAYER_NORMS:
        return None
    if tuple(norm.normalized_shape) != (mlp.fc1_layer.weight.shape[1],):
        return None
    return norm_name


def adopt_prenorm(block: nn.Module, mlp_name: str, mlp: nn.Module) -> str | None:
    """If ``block`` is a pre-norm block of a known class whose forward feeds ``norm(x)`` to its ``mlp`` - now the
    FusedMlp ``mlp`` - and nothing else, move the norm into the FusedMlp: ``block.<norm>`` becomes a
    :class:`MlpPreNorm` (same parameters, identity forward) that ``mlp`` applies inside its fused op. Returns the
    norm's name, or None when nothing was changed (another block, another norm, a conv MLP)."""
    norm_name = prenorm_name(block, mlp_name, mlp)
    if norm_name is None or getattr(block, mlp_name, None) is not mlp:
        return None
    deferred = MlpPreNorm.wrap(getattr(block, norm_name))
    setattr(block, norm_name, deferred)
    mlp.set_prenorm(deferred)
    return norm_name
