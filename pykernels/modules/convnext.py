"""The ConvNeXt block (Liu et al. 2022, "A ConvNet for the 2020s") as a drop-in module built on pykernels' fused ops.

``x + drop_path(gamma * fc2(GELU(fc1(LayerNorm_C(dwconv7x7(x))))))`` where

* ``dwconv -> LayerNorm`` is one :func:`pykernels.functional.dwconv_ln` call: it reads ``x`` (NCHW or
  channels-last) through its strides and writes the (B, H, W, C) tensor the Linear layers want, so there is no
  permute copy in front of the MLP;
* ``fc2(GELU(fc1(.)))``, layer-scale, DropPath and the residual add are one :func:`pykernels.functional.mlp` call
  (fc1 + bias + GELU one GEMM call, gamma folded into fc2, the residual add fc2's epilogue; in training the hidden
  pre-activation is saved once and GELU recomputed in backward), with the DropPath mask drawn exactly as the
  original module draws it (timm / torchvision: ``bernoulli_``; Hugging Face and the reference implementations:
  ``floor(keep_prob + rand)``), so a converted block reproduces the original's training-mode output under the same
  ``torch.manual_seed``.

:meth:`ConvNeXtBlock.from_module` converts timm's ``ConvNeXtBlock`` (``conv_mlp`` False and True), torchvision's
``CNBlock``, Hugging Face's ``ConvNextLayer`` and the official / reference ``Block`` layout (``dwconv``, ``norm``,
``pwconv1``, ``act``, ``pwconv2``, ``gamma``, ``drop_path``); :func:`can_convert` tells ``pykernels.swap`` which
blocks it can stand in for (and :func:`unsupported_reasons` says why not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pykernels import functional as PF
from pykernels.modules._keys import keep_original_keys, rename_keys
from pykernels.modules.drop_path import DropPath
from pykernels.modules.dwconv_ln import check_kernel_size, conv_reasons

__all__ = ["ConvNeXtBlock", "ConvNeXtMlp", "can_convert", "unsupported_reasons"]


def _dwconv_ln_nhwc(x, weight, conv_bias, ln_weight, ln_bias, eps, backend):
    """(B, H, W, C) contiguous ``LayerNorm_C(dwconv(x))``: one fused pykernels op, forward and backward."""
    return PF.dwconv_ln(x, weight, conv_bias, ln_weight, ln_bias, eps, out_layout="nhwc", backend=backend)


class ConvNeXtMlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` over the last dim of a (B, H, W, C) tensor (timm's ``Mlp`` parameter names).

    Computed by :func:`pykernels.functional.mlp` (fc1 + bias + GELU as one GEMM call on packed weights in inference;
    the hidden pre-activation saved once in training). With ``conv=True`` the two layers are 1x1 ``nn.Conv2d``
    (timm's ``conv_mlp=True`` parameter shapes ``(out, in, 1, 1)``, so such a state_dict loads as is) but are still
    computed over the last dim of the channels-last tensor: no NCHW round trip.

    Args:
        dim: channels C (input and output).
        hidden_dim: hidden width (ConvNeXt: 4 * C).
        conv: store the layers as 1x1 convolutions instead of ``nn.Linear``.
        bias: bias in fc1 / fc2 (a pair for each).

    Shape:
        ``(..., C) -> (..., C)``.
    """

    def __init__(self, dim: int, hidden_dim: int, conv: bool = False, bias: bool | tuple[bool, bool] = True) -> None:
        super().__init__()
        bias1, bias2 = (bias, bias) if isinstance(bias, bool) else bias
        layer = (lambda i, o, b: nn.Conv2d(i, o, 1, bias=b)) if conv else (lambda i, o, b: nn.Linear(i, o, bias=b))
        self.fc1 = layer(dim, hidden_dim, bias1)
        self.act = nn.GELU()
        self.fc2 = layer(hidden_dim, dim, bias2)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, "gelu")

    def extra_repr(self) -> str:
        return "conv=True" if self.conv else ""


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022, "A ConvNet for the 2020s") with fused dwconv+LayerNorm and fused
    layer-scale + DropPath + residual.

    ``out = x + drop_path(gamma * mlp(norm(conv_dw(x))))`` with ``mlp = fc2(GELU(fc1(.)))``, norm over channels.

    Drop-in for ``timm.models.convnext.ConvNeXtBlock``: the same parameter names (``conv_dw``, ``norm``,
    ``mlp.fc1``, ``mlp.fc2``, ``gamma``), so a timm block's state_dict loads with ``strict=True`` (``conv_mlp=False``
    and, with ``conv_mlp=True`` here, ``conv_mlp=True``). :meth:`from_module` converts timm, torchvision, Hugging Face
    and reference ConvNeXt blocks with their weights, train/eval state, device and dtype.

    Args:
        dim: channels C.
        drop_path: stochastic-depth probability of the block (training only).
        layer_scale_init_value: initial value of ``gamma`` (C,); ``None`` or 0: no layer-scale (``gamma is None``).
        kernel_size: depthwise kernel size, odd, 3..13 (ConvNeXt: 7); "same" zero padding, stride 1.
        mlp_ratio: hidden width of the MLP is ``int(mlp_ratio * dim)``.
        eps: LayerNorm epsilon.
        conv_mlp: keep the MLP weights as 1x1 convolutions (timm's ``conv_mlp=True`` parameter shapes); the
            computation is the same channels-last ``linear`` either way.
        conv_bias: bias in the depthwise convolution.
        hidden_dim: hidden width of the MLP, overriding ``mlp_ratio``.
        backend: force a backend (``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``) for the fused dwconv + LayerNorm;
            None chooses. (The MLP and its epilogue are GEMM calls on the provider measured fastest: no backend.)

    Shape:
        ``forward(x (B, C, H, W)) -> (B, C, H, W)``. ``x`` may be NCHW-contiguous or channels-last; the output is
        channels-last in memory (as timm's block returns it): the next block then reads it without any copy.
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        kernel_size: int = 7,
        mlp_ratio: float = 4,
        eps: float = 1e-6,
        conv_mlp: bool = False,
        *,
        conv_bias: bool = True,
        hidden_dim: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        check_kernel_size(kernel_size)
        hidden_dim = int(mlp_ratio * dim) if hidden_dim is None else int(hidden_dim)
        if hidden_dim <= 0:
            raise ValueError(f"the MLP's hidden width must be positive, got {hidden_dim}")
        self.dim = dim
        self.backend = backend
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=conv_bias)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = ConvNeXtMlp(dim, hidden_dim, conv=conv_mlp)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value else None
        self.drop_path = DropPath(drop_path, backend=backend)

    @property
    def kernel_size(self) -> int:
        return self.conv_dw.kernel_size[0]

    @property
    def hidden_dim(self) -> int:
        return self.mlp.fc1.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (B, C, H, W), NCHW-contiguous or channels-last.

        Returns:
            (B, C, H, W), channels-last in memory, dtype ``promote_types(x, parameters)``.
        """
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(
                f"ConvNeXtBlock(dim={self.dim}) expects x of shape (B, {self.dim}, H, W), got {tuple(x.shape)}"
            )
        norm = self.norm
        y = _dwconv_ln_nhwc(
            x, self.conv_dw.weight, self.conv_dw.bias, norm.weight, norm.bias, norm.eps, self.backend
        )  # (B, H, W, C) contiguous
        # MLP + layer-scale + DropPath + residual as one fused op (functional.mlp): gamma is folded into fc2 and the
        # residual add is fc2's epilogue. The residual is read in (B, H, W, C) order: x.permute(0, 2, 3, 1) is a free
        # view of a channels-last x; an NCHW x is copied once - the same single transposition the original's permute
        # + add does. The result, viewed back as (B, C, H, W), is channels-last, so every following block reads it
        # as is. The DropPath mask is the original's under the same seed (the DropPath module's mode and rng).
        mlp, dp = self.mlp, self.drop_path
        out = PF.mlp(
            y,
            mlp.fc1.weight,
            mlp.fc1.bias,
            mlp.fc2.weight,
            mlp.fc2.bias,
            "gelu",
            gamma=self.gamma,
            shortcut=x.permute(0, 2, 3, 1),
            drop_prob=dp.drop_prob,
            training=dp.training,
            scale_by_keep=dp.scale_by_keep,
            mode=dp.mode,
            rng=dp.rng,
        )
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"kernel_size={self.kernel_size}", f"hidden_dim={self.hidden_dim}"]
        parts.append(f"eps={self.norm.eps:g}")
        if self.gamma is None:
            parts.append("layer_scale=False")
        if self.mlp.conv:
            parts.append("conv_mlp=True")
        if self.backend:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    # ---- conversion --------------------------------------------------------------------------------------------

    @classmethod
    def can_convert(cls, module: nn.Module) -> bool:
        """Whether :meth:`from_module` can stand in for ``module`` (see :func:`can_convert`)."""
        return can_convert(module)

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> ConvNeXtBlock:
        """A ``ConvNeXtBlock`` computing what ``module`` computes, with its weights (copied), train/eval state,
        ``requires_grad`` flags, device and dtype, and a DropPath that draws the same mask under the same seed.

        Accepts:

        * timm ``timm.models.convnext.ConvNeXtBlock`` with ``conv_mlp=False`` (LayerNorm + Linear MLP) or
          ``conv_mlp=True`` (LayerNorm2d + 1x1-conv MLP: the result keeps the 1x1 conv weights' shapes, computed
          as linear layers; see ``conv_mlp``);
        * torchvision ``torchvision.models.convnext.CNBlock`` (``block[0]`` conv, ``block[2]`` LayerNorm,
          ``block[3]`` / ``block[5]`` Linear, ``layer_scale`` (C, 1, 1), ``stochastic_depth``);
        * Hugging Face ``ConvNextLayer`` (``dwconv``, ``layernorm``, ``pwconv1``, ``act``, ``pwconv2``,
          ``layer_scale_parameter``, ``drop_path``);
        * the official / reference block layout (``dwconv``, ``norm``, ``pwconv1``, ``act``, ``pwconv2``,
          ``gamma``, ``drop_path``), e.g. facebookresearch/ConvNeXt's ``Block``;
        * a ``ConvNeXtBlock`` (copied).

        Raises:
            TypeError: ``module`` is not a ConvNeXt block of a known layout.
            ValueError: a known layout in a variant this block does not compute (the message lists why): GRN
                (ConvNeXt-V2), a non-identity shortcut / stride / dilation / ``out_chs != in_chs``, a non-GELU (or
                tanh-approximated GELU) activation, kernel sizes outside 3..13 or even, a norm inside the MLP,
                dropout inside the MLP, a norm that is not a LayerNorm over channels.
        """
        if isinstance(module, ConvNeXtBlock):
            parts = _Parts(
                "pykernels",
                module.conv_dw,
                module.norm,
                module.mlp.fc1,
                module.mlp.act,
                module.mlp.fc2,
                module.gamma,
                module.drop_path,
                module.mlp.conv,
            )
            backend = backend or module.backend
        else:
            parts = _parts(module)
            if parts is None:
                raise TypeError(
                    f"ConvNeXtBlock.from_module does not know {type(module).__module__}.{type(module).__name__}; "
                    "supported: timm ConvNeXtBlock, torchvision CNBlock, Hugging Face ConvNextLayer, blocks with the "
                    "official layout (dwconv, norm, pwconv1, act, pwconv2, gamma, drop_path), ConvNeXtBlock"
                )
        reasons = parts.reasons()
        if reasons:
            raise ValueError(
                f"ConvNeXtBlock cannot stand in for this {type(module).__name__} ({parts.source}): "
                + "; ".join(reasons)
            )
        return _build(cls, parts, module, backend)


# ---- the parts of a ConvNeXt block, whatever library it comes from ------------------------------------------------


@dataclass
class _Parts:
    source: str
    conv_dw: nn.Module
    norm: nn.Module
    fc1: nn.Module
    act: nn.Module
    fc2: nn.Module
    gamma: torch.Tensor | None
    drop_path: nn.Module | None
    conv_mlp: bool  # fc1 / fc2 are 1x1 convolutions
    problems: list[str] = field(default_factory=list)  # source-specific reasons not to convert

    @property
    def dim(self) -> int | None:
        conv = self.conv_dw
        return conv.in_channels if isinstance(conv, nn.Conv2d) else None

    def reasons(self) -> list[str]:
        """Why this block cannot be converted (empty: it can)."""
        reasons = list(self.problems)
        reasons += conv_reasons(self.conv_dw)
        dim = self.dim
        if dim is None:
            return reasons
        reasons += _norm_reasons(self.norm, dim)
        reasons += _mlp_reasons(self.fc1, self.fc2, dim, self.conv_mlp)
        reasons += _act_reasons(self.act)
        if self.gamma is not None and (not isinstance(self.gamma, torch.Tensor) or self.gamma.numel() != dim):
            reasons.append(f"layer-scale of shape {tuple(getattr(self.gamma, 'shape', ()))} is not per-channel ({dim})")
        if self.drop_path is not None and not isinstance(self.drop_path, nn.Identity):
            try:
                DropPath.from_module(self.drop_path)
            except TypeError:
                reasons.append(f"unknown drop-path layer {type(self.drop_path).__name__}")
        return reasons


_CHANNEL_LAST_NORMS = {
    "torch.nn.modules.normalization.LayerNorm",
    "timm.layers.norm.LayerNorm",
}
_CHANNEL_FIRST_NORMS = {
    "timm.layers.norm.LayerNorm2d",
    "torchvision.models.convnext.LayerNorm2d",
}


def _qualname(m) -> str:
    return f"{type(m).__module__}.{type(m).__name__}"


def _norm_reasons(norm: nn.Module, dim: int) -> list[str]:
    name = _qualname(norm)
    known = name in _CHANNEL_LAST_NORMS or name in _CHANNEL_FIRST_NORMS
    # Hugging Face's ConvNextLayerNorm and the official repo's LayerNorm carry a data_format; both compute F.layer_norm
    data_format = getattr(norm, "data_format", None)
    if data_format is not None and type(norm).__name__.endswith("LayerNorm"):
        known = True
    if not known:
        return [f"the norm is a {type(norm).__name__}, not a LayerNorm over channels"]
    reasons = []
    shape = tuple(getattr(norm, "normalized_shape", ()))
    if shape != (dim,):
        reasons.append(f"the LayerNorm normalises over {shape}, not the {dim} channels")
    if not isinstance(getattr(norm, "eps", None), float):
        reasons.append("the LayerNorm has no float eps")
    return reasons


def _mlp_reasons(fc1: nn.Module, fc2: nn.Module, dim: int, conv: bool) -> list[str]:
    reasons = []
    for name, layer, in_f in (("fc1", fc1, dim), ("fc2", fc2, None)):
        if conv:
            if type(layer) is not nn.Conv2d:
                reasons.append(f"{name} is a {type(layer).__name__}, not a 1x1 nn.Conv2d")
                continue
            if (tuple(layer.kernel_size), tuple(layer.stride), layer.groups, tuple(layer.dilation)) != (
                (1, 1),
                (1, 1),
                1,
                (1, 1),
            ) or (layer.padding != "same" and tuple(layer.padding) != (0, 0)):
                reasons.append(f"{name} is not a plain 1x1 convolution ({layer})")
            ins, outs = layer.in_channels, layer.out_channels
        else:
            if not isinstance(layer, nn.Linear):
                reasons.append(f"{name} is a {type(layer).__name__}, not an nn.Linear")
                continue
            ins, outs = layer.in_features, layer.out_features
        if name == "fc1" and ins != in_f:
            reasons.append(f"fc1 takes {ins} features, the block has {dim} channels")
        if name == "fc2" and outs != dim:
            reasons.append(f"fc2 gives {outs} features, the block has {dim} channels")
    if not reasons:
        hidden1 = fc1.out_channels if conv else fc1.out_features
        hidden2 = fc2.in_channels if conv else fc2.in_features
        if hidden1 != hidden2:
            reasons.append(f"fc1 gives {hidden1} features but fc2 takes {hidden2}")
    return reasons


def _act_reasons(act: nn.Module) -> list[str]:
    name = _qualname(act)
    if isinstance(act, nn.GELU):
        return [] if act.approximate == "none" else [f"GELU(approximate={act.approximate!r}) (only exact GELU)"]
    if name == "timm.layers.activations.GELU":
        return []
    if name == "transformers.activations.GELUActivation":
        fn = getattr(act, "act", None)
        if fn is nn.functional.gelu or getattr(fn, "__name__", "") == "_gelu_python":
            return []
    return [f"the activation is {type(act).__name__}, not exact GELU"]


def _dropout_reasons(*layers) -> list[str]:
    return [
        f"dropout p={layer.p} inside the MLP" for layer in layers if isinstance(layer, nn.Dropout) and layer.p > 0.0
    ]


def _is_timm_block(m: nn.Module) -> bool:
    return type(m).__name__ == "ConvNeXtBlock" and type(m).__module__.startswith("timm.")


def _is_torchvision_block(m: nn.Module) -> bool:
    return type(m).__name__ == "CNBlock" and type(m).__module__.startswith("torchvision.")


def _is_hf_layer(m: nn.Module) -> bool:
    return (
        type(m).__name__.startswith("ConvNext")
        and type(m).__module__.startswith("transformers.")
        and all(hasattr(m, n) for n in ("dwconv", "layernorm", "pwconv1", "pwconv2"))
    )


def _is_official_layout(m: nn.Module) -> bool:
    return (
        all(isinstance(getattr(m, n, None), nn.Module) for n in ("dwconv", "norm", "pwconv1", "act", "pwconv2"))
        and hasattr(m, "gamma")
        and hasattr(m, "drop_path")
    )


def _parts(m: nn.Module) -> _Parts | None:
    """The parts of a known ConvNeXt block layout, or None for anything else."""
    if isinstance(m, ConvNeXtBlock):
        return None
    if _is_timm_block(m):
        mlp = m.mlp
        conv_mlp = bool(getattr(m, "use_conv_mlp", False))
        problems = []
        if hasattr(mlp, "grn") or type(mlp).__name__ == "GlobalResponseNormMlp":
            problems.append("GRN in the MLP (ConvNeXt-V2)")
        if not isinstance(getattr(m, "shortcut", nn.Identity()), nn.Identity):
            problems.append(f"the shortcut is a {type(m.shortcut).__name__} (in_chs != out_chs, stride or dilation)")
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            problems.append(f"a {type(mlp.norm).__name__} inside the MLP")
        problems += _dropout_reasons(getattr(mlp, "drop1", None), getattr(mlp, "drop2", None))
        if not all(hasattr(mlp, n) for n in ("fc1", "act", "fc2")):
            problems.append(f"the MLP ({type(mlp).__name__}) has no fc1 / act / fc2")
            return _Parts(
                "timm", m.conv_dw, m.norm, nn.Identity(), nn.Identity(), nn.Identity(), None, None, conv_mlp, problems
            )
        norm_name = _qualname(m.norm)
        if conv_mlp and norm_name in _CHANNEL_LAST_NORMS:
            problems.append("a channels-last LayerNorm in a conv_mlp block (it would normalise over W)")
        if not conv_mlp and norm_name in _CHANNEL_FIRST_NORMS:
            problems.append("a channels-first LayerNorm2d in a conv_mlp=False block")
        return _Parts("timm", m.conv_dw, m.norm, mlp.fc1, mlp.act, mlp.fc2, m.gamma, m.drop_path, conv_mlp, problems)
    if _is_torchvision_block(m):
        block = m.block
        expected = ("Conv2d", "Permute", None, "Linear", None, "Linear", "Permute")
        names = [type(layer).__name__ for layer in block]
        if len(block) != 7 or any(e is not None and e != n for e, n in zip(expected, names)):
            return _Parts(
                "torchvision",
                block[0] if len(block) else nn.Identity(),
                nn.Identity(),
                nn.Identity(),
                nn.Identity(),
                nn.Identity(),
                None,
                None,
                False,
                [f"unexpected CNBlock.block layout {names}"],
            )
        problems = []
        if list(block[1].dims) != [0, 2, 3, 1] or list(block[6].dims) != [0, 3, 1, 2]:
            problems.append(f"unexpected permutations {block[1].dims} / {block[6].dims}")
        return _Parts(
            "torchvision",
            block[0],
            block[2],
            block[3],
            block[4],
            block[5],
            m.layer_scale,
            m.stochastic_depth,
            False,
            problems,
        )
    if _is_hf_layer(m):
        problems = []
        if hasattr(m, "grn"):
            problems.append("GRN (ConvNeXt-V2)")
        if getattr(m.layernorm, "data_format", "channels_last") != "channels_last":
            problems.append(f"layernorm data_format={m.layernorm.data_format!r}")
        return _Parts(
            "huggingface",
            m.dwconv,
            m.layernorm,
            m.pwconv1,
            getattr(m, "act", nn.Identity()),
            m.pwconv2,
            getattr(m, "layer_scale_parameter", None),
            getattr(m, "drop_path", None),
            False,
            problems,
        )
    if _is_official_layout(m):
        problems = []
        if hasattr(m, "grn"):
            problems.append("GRN (ConvNeXt-V2)")
        if getattr(m.norm, "data_format", "channels_last") != "channels_last":
            problems.append(f"norm data_format={m.norm.data_format!r}")
        gamma = m.gamma if isinstance(m.gamma, torch.Tensor) else None
        if m.gamma is not None and gamma is None:
            problems.append(f"gamma is a {type(m.gamma).__name__}, not a tensor")
        return _Parts(
            f"{type(m).__module__}.{type(m).__name__}",
            m.dwconv,
            m.norm,
            m.pwconv1,
            m.act,
            m.pwconv2,
            gamma,
            m.drop_path,
            False,
            problems,
        )
    return None


def unsupported_reasons(module: nn.Module) -> list[str]:
    """Why :meth:`ConvNeXtBlock.from_module` cannot convert ``module`` (empty when it can)."""
    if isinstance(module, ConvNeXtBlock):
        return []
    parts = _parts(module)
    if parts is None:
        return [f"{type(module).__name__} is not a known ConvNeXt block layout"]
    return parts.reasons()


def can_convert(module: nn.Module) -> bool:
    """Whether ``module`` is a ConvNeXt block (timm, torchvision, Hugging Face, official layout) that
    :meth:`ConvNeXtBlock.from_module` reproduces exactly in eval mode (False for a ``ConvNeXtBlock`` itself, so that
    ``pykernels.swap`` is idempotent)."""
    if isinstance(module, ConvNeXtBlock):
        return False
    parts = _parts(module)
    return parts is not None and not parts.reasons()


def _build(cls, parts: _Parts, module: nn.Module, backend: str | None) -> ConvNeXtBlock:
    conv, norm, fc1, fc2 = parts.conv_dw, parts.norm, parts.fc1, parts.fc2
    dim, k = conv.in_channels, conv.kernel_size[0]
    hidden = fc1.weight.shape[0]
    has_drop_path = parts.drop_path is not None and not isinstance(parts.drop_path, nn.Identity)
    drop = DropPath.from_module(parts.drop_path) if has_drop_path else DropPath(0.0)
    new = cls(
        dim,
        0.0,
        1.0 if parts.gamma is not None else None,
        k,
        eps=float(norm.eps),
        conv_mlp=parts.conv_mlp,
        conv_bias=conv.bias is not None,
        hidden_dim=hidden,
        backend=backend,
    )
    drop.backend = backend or drop.backend
    new.drop_path = drop
    affine = getattr(norm, "weight", None) is not None
    if not affine or getattr(norm, "bias", None) is None:
        new.norm = nn.LayerNorm(dim, eps=float(norm.eps), elementwise_affine=affine, bias=norm.bias is not None)
    new.mlp = ConvNeXtMlp(dim, hidden, parts.conv_mlp, (fc1.bias is not None, fc2.bias is not None))
    ref = conv.weight
    new = new.to(device=ref.device, dtype=ref.dtype)
    pairs = [
        (new.conv_dw.weight, conv.weight),
        (new.conv_dw.bias, conv.bias),
        (new.norm.weight, getattr(norm, "weight", None)),
        (new.norm.bias, getattr(norm, "bias", None)),
        (new.mlp.fc1.weight, fc1.weight),
        (new.mlp.fc1.bias, fc1.bias),
        (new.mlp.fc2.weight, fc2.weight),
        (new.mlp.fc2.bias, fc2.bias),
        (new.gamma, parts.gamma),
    ]
    with torch.no_grad():
        for dst, src in pairs:
            if dst is None:
                continue
            dst.copy_(src.reshape(dst.shape))
            if isinstance(src, torch.Tensor) and not src.requires_grad:
                dst.requires_grad_(False)
    if parts.source != "pykernels":
        keep_original_keys(new, module, pairs)  # the original's state_dict keys (torchvision, Hugging Face)
    else:
        rename_keys(new, getattr(module, "_pykernels_key_map", None) or {})
    new.train(module.training)
    if has_drop_path:
        new.drop_path.train(parts.drop_path.training)
    return new
