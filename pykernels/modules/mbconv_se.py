"""MBConv / Fused-MBConv blocks with squeeze-excitation (MobileNet-V2, Sandler et al. 2018; MobileNet-V3, Howard et al.
2019; EfficientNet, Tan & Le 2019; EfficientNet-V2, Tan & Le 2021; SE, Hu et al. 2018) as drop-in modules.

:class:`FusedMBConvSE` computes the block ``x + drop_path(BN(project(SE(act(BN(dwconv(act(BN(expand(x)))))))))``:

* the depthwise stage (conv -> BatchNorm -> activation) and the SE squeeze (the per-(b, c) sums the SE pool needs)
  are one :func:`pykernels.functional.mbconv_se` pass, which saves only its input for backward;
* the 1x1 expand / project convolutions run as GEMMs on the channels-last activation (``F.linear`` on a free view:
  no NCHW round trip); in eval mode their BatchNorms are folded into the weights, refolded whenever a weight or a
  running statistic changes (an optimizer step, ``load_state_dict``: tracked by tensor versions);
* the SE excitation runs on the pooled (B, C) values; its scale is applied to the depthwise output in place (eval)
  or by a recomputing projection (training: the scaled tensor is never saved);
* DropPath and the residual add are one :func:`pykernels.functional.drop_path_add` pass.

In training mode every BatchNorm behaves as ``nn.BatchNorm2d``: batch statistics (biased variance to normalise,
unbiased for ``running_var``), ``momentum`` (``None``: cumulative average over ``num_batches_tracked``), the running
statistics and ``num_batches_tracked`` updated in place.

:meth:`FusedMBConvSE.from_module` converts, keeping the original's submodules (so its ``state_dict`` keys do not
change): timm ``InvertedResidual``, ``DepthwiseSeparableConv``, ``EdgeResidual``; torchvision ``MBConv``,
``FusedMBConv``, MobileNet-V3 ``InvertedResidual``; Hugging Face ``EfficientNetBlock`` and
``MobileNetV2InvertedResidual``; the seeds' ``FusedMBConv``.
Variants it does not compute are refused with the reasons (:func:`unsupported_reasons`), never computed differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF
from torch import nn

from pykernels import functional as PF
from pykernels import gemm
from pykernels.modules.drop_path import DropPath
from pykernels.ops import mbconv_se as _ops
from pykernels.reference.mbconv_se import activation as _activation
from pykernels.reference.mbconv_se import activation_grad as _activation_grad

__all__ = ["FusedMBConvSE", "SqueezeExcite", "can_convert", "unsupported_reasons"]

GATES = ("sigmoid", "hard_sigmoid")


# ---- activations and gates, whatever library they come from ----------------------------------------------------------

_ACT_BY_CLASS = {
    "torch.nn.modules.activation.SiLU": "silu",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.ReLU6": "relu6",
    "torch.nn.modules.activation.Hardswish": "hardswish",
    "torch.nn.modules.linear.Identity": "none",
    "timm.layers.activations.Swish": "silu",
    "timm.layers.activations.HardSwish": "hardswish",
    "transformers.activations.SiLUActivation": "silu",
}
_GATE_BY_CLASS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.Hardsigmoid": "hard_sigmoid",
    "timm.layers.activations.Sigmoid": "sigmoid",
    "timm.layers.activations.HardSigmoid": "hard_sigmoid",
}


def _qualname(m) -> str:
    return f"{type(m).__module__}.{type(m).__name__}"


def _act_name(m) -> str | None:
    """The pykernels name of an activation module (None: not one mbconv_se computes)."""
    if m is None:
        return "none"
    return _ACT_BY_CLASS.get(_qualname(m))


def _gate_name(m) -> str | None:
    if m is torch.sigmoid or m is TF.sigmoid:
        return "sigmoid"
    return _GATE_BY_CLASS.get(_qualname(m))


def _gate(x: torch.Tensor, gate: str) -> torch.Tensor:
    return torch.sigmoid(x) if gate == "sigmoid" else TF.hardsigmoid(x)


# ---- SqueezeExcite ---------------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) with timm's layout: ``x * gate(conv_expand(act(conv_reduce(mean(x)))))``.

    Drop-in for timm's ``SqueezeExcite`` (parameter names ``conv_reduce``, ``conv_expand``: its state_dict loads
    with ``strict=True``), torchvision's ``SqueezeExcitation``, Hugging Face's ``EfficientNetSqueezeExciteLayer`` and
    the seeds' ``SEModule`` (:meth:`from_module`). Inside :class:`FusedMBConvSE` the squeeze comes from the fused
    depthwise pass and only :meth:`scale` runs.

    Args:
        channels: C.
        rd_channels: the reduced width (timm / torchvision / HF round it differently: give it explicitly).
        act: activation between the two 1x1 convs (``"relu"``, ``"silu"``, ``"relu6"``, ``"hardswish"``).
        gate: ``"sigmoid"`` or ``"hard_sigmoid"`` (MobileNet-V3).

    Shape:
        ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, rd_channels: int, act: str = "relu", gate: str = "sigmoid") -> None:
        super().__init__()
        if act not in _ops.ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(_ops.ACTIVATIONS)}, got {act!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.act = act
        self.gate = gate

    def scale(self, mean: torch.Tensor) -> torch.Tensor:
        """The (B, C) gate values from the (B, C) spatial means."""
        return _se_scale(mean, self.conv_reduce, self.conv_expand, self.act, self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x.mean((2, 3))).to(x.dtype)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"act={self.act!r}, gate={self.gate!r}"

    @classmethod
    def from_module(cls, module: nn.Module) -> SqueezeExcite:
        """A ``SqueezeExcite`` with ``module``'s weights (timm ``SqueezeExcite``, torchvision ``SqueezeExcitation``,
        Hugging Face ``EfficientNetSqueezeExciteLayer``, the seeds' ``SEModule``)."""
        parts, problems = _se_parts(module)
        if parts is None or problems:
            raise ValueError(
                f"SqueezeExcite cannot stand in for {type(module).__name__}: "
                + "; ".join(problems or ["not a known squeeze-excitation layout"])
            )
        reduce, expand, act, gate = parts
        new = cls(reduce.in_channels, reduce.out_channels, act, gate).to(reduce.weight)
        new.conv_reduce.load_state_dict(reduce.state_dict())
        new.conv_expand.load_state_dict(expand.state_dict())
        new.train(module.training)
        return new


def _se_scale(mean, reduce: nn.Conv2d, expand: nn.Conv2d, act: str, gate: str) -> torch.Tensor:
    w1 = reduce.weight.flatten(1)
    w2 = expand.weight.flatten(1)
    hidden = _activation(TF.linear(mean.to(w1.dtype), w1, reduce.bias), act)
    return _gate(TF.linear(hidden, w2, expand.bias), gate)


def _se_parts(m: nn.Module, check: bool = True):
    """((reduce conv, expand conv, act name, gate name), problems) of a known SE layout, or (None, []); ``check=False``
    (every forward) leaves the problems out."""
    name = type(m).__name__
    if isinstance(m, SqueezeExcite):
        return (m.conv_reduce, m.conv_expand, m.act, m.gate), []
    if name == "SqueezeExcite" and hasattr(m, "conv_reduce"):  # timm
        parts = (m.conv_reduce, m.conv_expand, _act_name(m.act1), _gate_name(m.gate))
    elif name == "SqueezeExcitation" and hasattr(m, "fc1"):  # torchvision
        parts = (m.fc1, m.fc2, _act_name(m.activation), _gate_name(m.scale_activation))
    elif name == "EfficientNetSqueezeExciteLayer":  # Hugging Face
        parts = (m.reduce, m.expand, _act_name(m.act_reduce), _gate_name(m.act_expand))
    elif name == "SEModule" and {n for n, _ in m.named_children()} == {"fc1", "fc2"}:  # the seeds: relu, sigmoid
        parts = (m.fc1, m.fc2, "relu", "sigmoid")
    elif name == "SEModule" and all(hasattr(m, a) for a in ("fc1", "bn", "act", "fc2", "gate")):  # timm.layers
        parts = (m.fc1, m.fc2, _act_name(m.act), _gate_name(m.gate))
        if not check:
            return parts, []
        problems = []
        if getattr(m, "add_maxpool", False):
            problems.append("the SE squeeze adds a max-pool (timm SEModule add_maxpool=True)")
        if not isinstance(m.bn, nn.Identity):
            problems.append(f"a {type(m.bn).__name__} inside the SE layer")
        return parts, problems + _se_part_problems(m, parts)
    else:
        return None, []
    return parts, _se_part_problems(m, parts) if check else []


def _se_part_problems(m: nn.Module, parts) -> list[str]:
    problems = []
    reduce, expand, act, gate = parts
    for label, conv in (("reduce", reduce), ("expand", expand)):
        if type(conv) is not nn.Conv2d or tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
            problems.append(f"the SE {label} layer is not a plain 1x1 nn.Conv2d")
    if act is None:
        layer = next((getattr(m, a) for a in ("act1", "activation", "act", "act_reduce") if hasattr(m, a)), None)
        problems.append(f"SE activation {type(layer).__name__}")
    if gate is None:
        problems.append("SE gate is neither sigmoid nor hard-sigmoid")
    return problems


# ---- padding rules -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Padding:
    """How a conv pads: ``static`` (left, right, top, bottom), or ``tf_same`` (TensorFlow's "SAME": asymmetric and
    input-size dependent at stride 2, timm's ``Conv2dSame``)."""

    kind: str
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)

    def resolve(self, height: int, width: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
        if self.kind == "static":
            return self.pads

        def same(size):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            return total // 2, total - total // 2

        top, bottom = same(height)
        left, right = same(width)
        return left, right, top, bottom


def _conv_padding(conv: nn.Conv2d, pad_module: nn.Module | None = None) -> tuple[_Padding | None, list[str]]:
    """The padding of ``conv`` (after an optional ``nn.ZeroPad2d`` in front of it, Hugging Face's stride-2 layout)."""
    problems = []
    k = conv.kernel_size[0]
    if _qualname(conv) in ("timm.layers.conv2d_same.Conv2dSame", "timm.layers.conv2d_same.Conv2dSameExport"):
        return _Padding("tf_same"), problems
    if (
        type(conv) is not nn.Conv2d
        and _qualname(conv) != "transformers.models.efficientnet.modeling_efficientnet.EfficientNetDepthwiseConv2d"
    ):
        return None, [f"the conv is a {type(conv).__name__}, not an nn.Conv2d"]
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode {conv.padding_mode!r} (only zeros)")
    if conv.padding == "same":
        pads = (k // 2,) * 4
    elif conv.padding == "valid":
        pads = (0, 0, 0, 0)
    else:
        ph, pw = conv.padding
        pads = (pw, pw, ph, ph)
    if pad_module is not None:
        if not isinstance(pad_module, nn.ZeroPad2d):
            return None, [f"padding layer {type(pad_module).__name__} (only nn.ZeroPad2d)"]
        extra = tuple(pad_module.padding)
        pads = tuple(a + b for a, b in zip(pads, extra))
    return _Padding("static", pads), problems


# ---- the parts of an MBConv block, whatever library it comes from ---------------------------------------------------

_ROLES = ("exp_conv", "exp_bn", "dw_conv", "dw_bn", "se", "proj_conv", "proj_bn", "drop_path", "dropout")


@dataclass
class _Layout:
    """Where a block keeps its parts (paths of its submodules) and how it computes (static configuration)."""

    source: str
    kind: str  # "ir" (expand 1x1 + depthwise), "ds" (depthwise only), "er" (regular k x k expand: Fused-MBConv)
    paths: dict[str, str]
    act: str | None
    proj_act: str | None = "none"
    padding: _Padding | None = None
    stride: int = 1
    kernel: int = 3
    has_skip: bool = False
    se: tuple | None = None  # (act, gate) when there is an SE layer
    problems: list[str] = field(default_factory=list)


def _get(module: nn.Module, path: str | None):
    return None if path is None else module.get_submodule(path)


def _bn_problems(bn, label: str) -> list[str]:
    if bn is None:
        return [f"no BatchNorm after the {label} conv"]
    if not isinstance(bn, nn.BatchNorm2d):
        return [f"the {label} norm is a {type(bn).__name__}, not a BatchNorm2d"]
    problems = []
    drop = getattr(bn, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        problems.append(f"dropout inside the {label} BatchNormAct")
    if not bn.affine:
        problems.append(f"the {label} BatchNorm has no affine parameters")
    return problems


def _dw_problems(conv, channels_in: int | None = None) -> list[str]:
    if not isinstance(conv, nn.Conv2d):
        return [f"the depthwise conv is a {type(conv).__name__}"]
    problems = []
    c = conv.in_channels
    if not (conv.groups == c == conv.out_channels):
        problems.append(f"the depthwise conv is not depthwise (groups={conv.groups}, channels={c})")
    k = conv.kernel_size
    if k[0] != k[1]:
        problems.append(f"kernel {tuple(k)} is not square")
    else:
        problems += _ops.kernel_size_reasons(k[0])
    s = conv.stride
    if s[0] != s[1]:
        problems.append(f"stride {tuple(s)} differs along H and W")
    else:
        problems += _ops.stride_reasons(s[0])
    if tuple(conv.dilation) != (1, 1):
        problems.append(f"dilation {tuple(conv.dilation)} (only 1)")
    return problems


def _pointwise_problems(conv, label: str) -> list[str]:
    if not isinstance(conv, nn.Conv2d):
        return [f"the {label} layer is a {type(conv).__name__}, not a 1x1 nn.Conv2d"]
    if (tuple(conv.kernel_size), tuple(conv.stride), conv.groups, tuple(conv.dilation)) != ((1, 1), (1, 1), 1, (1, 1)):
        return [f"the {label} conv is not a plain 1x1 convolution ({conv})"]
    if conv.padding not in ("same", "valid") and tuple(conv.padding) != (0, 0):
        return [f"the {label} conv pads ({conv.padding})"]
    return []


def _regular_conv_problems(conv, label: str) -> list[str]:
    if not isinstance(conv, nn.Conv2d):
        return [f"the {label} layer is a {type(conv).__name__}, not an nn.Conv2d"]
    problems = []
    if conv.groups != 1:
        problems.append(f"the {label} conv is grouped (groups={conv.groups})")
    if tuple(conv.dilation) != (1, 1):
        problems.append(f"dilation {tuple(conv.dilation)} (only 1)")
    if conv.stride[0] != conv.stride[1] or conv.stride[0] not in (1, 2):
        problems.append(f"stride {tuple(conv.stride)} (1 or 2)")
    return problems


def _timm_layout(m: nn.Module) -> _Layout | None:
    name = type(m).__name__
    if not type(m).__module__.startswith("timm.") or name not in (
        "InvertedResidual",
        "DepthwiseSeparableConv",
        "EdgeResidual",
    ):
        return None
    problems = []
    if getattr(m, "conv_s2d", None) is not None:
        problems.append("space-to-depth (s2d) stem")
    if not isinstance(getattr(m, "aa", nn.Identity()), nn.Identity):
        problems.append("anti-aliasing layer (aa)")
    se = getattr(m, "se", nn.Identity())
    se_cfg = None
    if not isinstance(se, nn.Identity):
        parts, se_problems = _se_parts(se)
        if parts is None:
            problems.append(f"SE layer {type(se).__name__}")
        else:
            problems += se_problems
            se_cfg = parts[2:]
    if name == "InvertedResidual":
        paths = dict(
            exp_conv="conv_pw", exp_bn="bn1", dw_conv="conv_dw", dw_bn="bn2", proj_conv="conv_pwl", proj_bn="bn3"
        )
        kind, dw, exp_bn, proj_bn = "ir", m.conv_dw, m.bn1, m.bn3
        problems += _pointwise_problems(m.conv_pw, "expand")
    elif name == "DepthwiseSeparableConv":
        paths = dict(dw_conv="conv_dw", dw_bn="bn1", proj_conv="conv_pw", proj_bn="bn2")
        kind, dw, exp_bn, proj_bn = "ds", m.conv_dw, m.bn1, m.bn2
    else:
        paths = dict(exp_conv="conv_exp", exp_bn="bn1", proj_conv="conv_pwl", proj_bn="bn2")
        kind, dw, exp_bn, proj_bn = "er", m.conv_exp, m.bn1, m.bn2
        problems += _regular_conv_problems(m.conv_exp, "expand")
    if se_cfg is not None:
        paths["se"] = "se"
    if not isinstance(getattr(m, "drop_path", nn.Identity()), nn.Identity):
        paths["drop_path"] = "drop_path"
    problems += _pointwise_problems(_get(m, paths["proj_conv"]), "project")
    if kind != "er":
        problems += _dw_problems(dw)
    padding, pad_problems = _conv_padding(dw)
    problems += pad_problems
    bns = ((exp_bn, "first"), (proj_bn, "project"), (_get(m, paths.get("dw_bn")), "depthwise"))
    for bn, label in bns:
        if bn is not None or label != "depthwise" or kind == "ir":
            problems += _bn_problems(bn, label)
    act = _act_name(getattr(_get(m, paths.get("dw_bn") or paths["exp_bn"]), "act", None))
    if kind == "ir" and _act_name(getattr(m.bn1, "act", None)) != act:
        problems.append("the expand and depthwise activations differ")
    proj_act = _act_name(getattr(proj_bn, "act", None))
    if act is None or proj_act is None:
        problems.append("an activation other than ReLU / ReLU6 / SiLU / Hardswish")
    k = dw.kernel_size[0]
    return _Layout(
        f"timm {name}", kind, paths, act, proj_act, padding, dw.stride[0], k, bool(m.has_skip), se_cfg, problems
    )


def _cna(block: nn.Module):
    """(conv, bn, act) of a torchvision Conv2dNormActivation (act None when it has none), or None."""
    if type(block).__name__ != "Conv2dNormActivation":
        return None
    layers = list(block)
    conv, bn = layers[0], layers[1] if len(layers) > 1 else None
    act = layers[2] if len(layers) > 2 else None
    return conv, bn, act


def _torchvision_layout(m: nn.Module) -> _Layout | None:
    name = type(m).__name__
    if not type(m).__module__.startswith("torchvision.") or name not in ("MBConv", "FusedMBConv", "InvertedResidual"):
        return None
    layers = list(m.block)
    problems = []
    se_cfg = None
    paths: dict[str, str] = {}
    cnas = [(i, _cna(layer)) for i, layer in enumerate(layers)]
    ses = [i for i, layer in enumerate(layers) if type(layer).__name__ == "SqueezeExcitation"]
    if any(c is None for i, c in cnas if i not in ses):
        return _Layout(f"torchvision {name}", "ir", {}, None, problems=[f"unexpected block layout {layers}"])
    convs = [(i, c) for i, c in cnas if c is not None]
    if ses:
        parts, se_problems = _se_parts(layers[ses[0]])
        problems += se_problems
        se_cfg = parts[2:] if parts else None
        paths["se"] = f"block.{ses[0]}"
    if name == "FusedMBConv":
        kind = "er"
        (i0, (conv0, bn0, act0)) = convs[0]
        paths.update(exp_conv=f"block.{i0}.0", exp_bn=f"block.{i0}.1")
        problems += _regular_conv_problems(conv0, "expand")
        dw = conv0
        if len(convs) > 1:
            i1 = convs[1][0]
            paths.update(proj_conv=f"block.{i1}.0", proj_bn=f"block.{i1}.1")
            problems += _pointwise_problems(convs[1][1][0], "project")
        act = _act_name(act0)
        proj_act = _act_name(convs[1][1][2]) if len(convs) > 1 else "none"
    else:
        dw_index = next((i for i, (conv, _, _) in convs if conv.groups > 1 and conv.groups == conv.in_channels), None)
        if dw_index is None:
            return _Layout(f"torchvision {name}", "ir", {}, None, problems=["no depthwise conv in the block"])
        before = [(i, c) for i, c in convs if i < dw_index]
        after = [(i, c) for i, c in convs if i > dw_index]
        kind = "ir" if before else "ds"
        if before:
            i0, (conv0, _, act0) = before[0]
            paths.update(exp_conv=f"block.{i0}.0", exp_bn=f"block.{i0}.1")
            problems += _pointwise_problems(conv0, "expand")
        dw, _, act_dw = layers[dw_index]
        paths.update(dw_conv=f"block.{dw_index}.0", dw_bn=f"block.{dw_index}.1")
        problems += _dw_problems(dw)
        act = _act_name(act_dw)
        if before and _act_name(before[0][1][2]) != act:
            problems.append("the expand and depthwise activations differ")
        i1, (conv1, _, act1) = after[-1]
        paths.update(proj_conv=f"block.{i1}.0", proj_bn=f"block.{i1}.1")
        problems += _pointwise_problems(conv1, "project")
        proj_act = _act_name(act1)
    for role in ("exp_bn", "dw_bn", "proj_bn"):
        if role in paths:
            problems += _bn_problems(_get(m, paths[role]), role.split("_")[0])
    if act is None or proj_act is None:
        problems.append("an activation other than ReLU / ReLU6 / SiLU / Hardswish")
    padding, pad_problems = _conv_padding(dw)
    problems += pad_problems
    has_skip = bool(getattr(m, "use_res_connect", False))
    if has_skip and hasattr(m, "stochastic_depth"):
        paths["drop_path"] = "stochastic_depth"
    return _Layout(
        f"torchvision {name}",
        kind,
        paths,
        act,
        proj_act,
        padding,
        dw.stride[0],
        dw.kernel_size[0],
        has_skip,
        se_cfg,
        problems,
    )


def _hf_layout(m: nn.Module) -> _Layout | None:
    if type(m).__name__ != "EfficientNetBlock" or not type(m).__module__.startswith("transformers."):
        return None
    problems = []
    paths = {}
    kind = "ir" if getattr(m, "expand", False) else "ds"
    if kind == "ir":
        paths.update(exp_conv="expansion.expand_conv", exp_bn="expansion.expand_bn")
        problems += _pointwise_problems(m.expansion.expand_conv, "expand")
    dwl = m.depthwise_conv
    paths.update(dw_conv="depthwise_conv.depthwise_conv", dw_bn="depthwise_conv.depthwise_norm")
    dw = dwl.depthwise_conv
    problems += _dw_problems(dw)
    padding, pad_problems = _conv_padding(dw, dwl.depthwise_conv_pad if dwl.stride == 2 else None)
    problems += pad_problems
    act = _act_name(dwl.depthwise_act)
    if kind == "ir" and _act_name(m.expansion.expand_act) != act:
        problems.append("the expand and depthwise activations differ")
    parts, se_problems = _se_parts(m.squeeze_excite)
    problems += se_problems
    paths["se"] = "squeeze_excite"
    proj = m.projection
    paths.update(proj_conv="projection.project_conv", proj_bn="projection.project_bn")
    problems += _pointwise_problems(proj.project_conv, "project")
    for role in ("exp_bn", "dw_bn", "proj_bn"):
        if role in paths:
            problems += _bn_problems(_get(m, paths[role]), role.split("_")[0])
    has_skip = bool(proj.apply_dropout)
    if has_skip:
        paths["dropout"] = "projection.dropout"
    if act is None:
        problems.append("an activation other than ReLU / ReLU6 / SiLU / Hardswish")
    return _Layout(
        "huggingface EfficientNetBlock",
        kind,
        paths,
        act,
        "none",
        padding,
        dw.stride[0],
        dw.kernel_size[0],
        has_skip,
        parts[2:] if parts else None,
        problems,
    )


def _hf_mobilenet_v2_layout(m: nn.Module) -> _Layout | None:
    """Hugging Face ``MobileNetV2InvertedResidual``: three ``MobileNetV2ConvLayer`` (conv -> BatchNorm -> act, with
    TensorFlow "SAME" padding in front of each conv when ``config.tf_padding``), no SE, a residual when
    ``use_residual``."""
    if type(m).__name__ != "MobileNetV2InvertedResidual" or not type(m).__module__.startswith("transformers."):
        return None
    problems = []
    layers = {name: getattr(m, name, None) for name in ("expand_1x1", "conv_3x3", "reduce_1x1")}
    if any(getattr(layer, "convolution", None) is None for layer in layers.values()):
        return _Layout("huggingface MobileNetV2InvertedResidual", "ir", {}, None, problems=["unexpected layout"])
    exp, dwl, red = layers.values()
    paths = dict(
        exp_conv="expand_1x1.convolution",
        exp_bn="expand_1x1.normalization",
        dw_conv="conv_3x3.convolution",
        dw_bn="conv_3x3.normalization",
        proj_conv="reduce_1x1.convolution",
        proj_bn="reduce_1x1.normalization",
    )
    problems += _pointwise_problems(exp.convolution, "expand") + _pointwise_problems(red.convolution, "project")
    dw = dwl.convolution
    problems += _dw_problems(dw)
    for role in ("exp_bn", "dw_bn", "proj_bn"):
        problems += _bn_problems(_get(m, paths[role]), role.split("_")[0])
    act = _act_name(dwl.activation)
    if _act_name(exp.activation) != act:
        problems.append("the expand and depthwise activations differ")
    if red.activation is not None:
        problems.append("an activation after the projection")
    if act is None:
        problems.append("an activation other than ReLU / ReLU6 / SiLU / Hardswish")
    if getattr(getattr(m.expand_1x1, "config", None), "tf_padding", False):
        padding = _Padding("tf_same")
        if tuple(dw.padding) != (0, 0):
            problems.append("tf_padding with a padded conv")
    else:
        padding, pad_problems = _conv_padding(dw)
        problems += pad_problems
    return _Layout(
        "huggingface MobileNetV2InvertedResidual",
        "ir",
        paths,
        act,
        "none",
        padding,
        dw.stride[0],
        dw.kernel_size[0],
        bool(m.use_residual),
        None,
        problems,
    )


def _seeds_layout(m: nn.Module) -> _Layout | None:
    if type(m).__name__ != "FusedMBConv" or not all(hasattr(m, n) for n in ("fused", "se", "project", "skip")):
        return None
    if type(m).__module__.startswith(("torchvision.", "timm.")):
        return None
    problems = []
    fused, project = list(m.fused), list(m.project)
    if len(fused) != 3 or len(project) != 2:
        return _Layout("seeds FusedMBConv", "er", {}, None, problems=["unexpected fused / project layout"])
    conv = fused[0]
    problems += _regular_conv_problems(conv, "expand")
    problems += _pointwise_problems(project[0], "project")
    problems += _bn_problems(fused[1], "first") + _bn_problems(project[1], "project")
    parts, se_problems = _se_parts(m.se)
    problems += se_problems
    padding, pad_problems = _conv_padding(conv)
    problems += pad_problems
    act = _act_name(fused[2])
    if act is None:
        problems.append("an activation other than ReLU / ReLU6 / SiLU / Hardswish")
    paths = dict(exp_conv="fused.0", exp_bn="fused.1", se="se", proj_conv="project.0", proj_bn="project.1")
    return _Layout(
        "seeds FusedMBConv",
        "er",
        paths,
        act,
        "none",
        padding,
        conv.stride[0],
        conv.kernel_size[0],
        bool(m.skip),
        parts[2:] if parts else None,
        problems,
    )


def _layout(m: nn.Module) -> _Layout | None:
    if isinstance(m, FusedMBConvSE):
        return None
    for find in (_timm_layout, _torchvision_layout, _hf_layout, _hf_mobilenet_v2_layout, _seeds_layout):
        layout = find(m)
        if layout is not None:
            return layout
    return None


def unsupported_reasons(module: nn.Module) -> list[str]:
    """Why :meth:`FusedMBConvSE.from_module` cannot convert ``module`` (empty when it can)."""
    layout = _layout(module)
    if layout is None:
        return [f"{type(module).__name__} is not a known MBConv / Fused-MBConv block layout"]
    return list(layout.problems)


def can_convert(module: nn.Module) -> bool:
    """Whether ``module`` is an MBConv-family block (timm, torchvision, Hugging Face, the seeds) that
    :meth:`FusedMBConvSE.from_module` computes exactly (False for a ``FusedMBConvSE`` itself: swap is idempotent)."""
    layout = _layout(module)
    return layout is not None and not layout.problems


# ---- batch norm helpers --------------------------------------------------------------------------------------------


def _bn_factor(bn: nn.BatchNorm2d) -> float | None:
    """nn.BatchNorm2d's exponential average factor for this training step (num_batches_tracked incremented), or
    None when the running statistics are not tracked."""
    if not bn.track_running_stats or bn.running_mean is None:
        return None
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def _bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """As nn.BatchNorm2d: batch statistics in training mode, and in eval mode when it tracks no running ones."""
    return bn.training or bn.running_mean is None


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN after ``conv`` folded into it: (weight * s per output channel, (conv_bias - mean) * s + beta), s = gamma /
    sqrt(var + eps), computed in float32 (float64 for float64 weights)."""
    acc = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    scale = bn.weight.to(acc) * torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    weight = (conv.weight.flatten(1).to(acc) * scale[:, None]).to(conv.weight.dtype)
    shift = -bn.running_mean.to(acc) if conv.bias is None else conv.bias.to(acc) - bn.running_mean.to(acc)
    bias = (bn.bias.to(acc) + shift * scale).to(conv.weight.dtype)
    return weight, bias


def _versions(*tensors) -> tuple:
    return tuple((t.data_ptr(), t.dtype, t._version) if t is not None else None for t in tensors)


# ---- the block -----------------------------------------------------------------------------------------------------


class _BatchNormAct(torch.autograd.Function):
    """``act(batch_norm(y))`` that saves y and the (C,) statistics only: the BatchNorm output, which eager keeps as
    the activation's input, is recomputed in backward (one elementwise pass) - an expanded tensor less in memory."""

    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, training, momentum, eps, act):
        normed, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            y, weight, bias, running_mean, running_var, training, momentum, eps
        )
        ctx.save_for_backward(y, weight, bias, running_mean, running_var, save_mean, save_invstd)
        ctx.args = (training, eps, act)
        return _activation(normed, act)

    @staticmethod
    def backward(ctx, grad):
        y, weight, bias, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        training, eps, act = ctx.args
        if training:
            mean, invstd = save_mean, save_invstd
        else:
            mean, invstd = running_mean, torch.rsqrt(running_var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        normed = torch.addcmul(shift.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1))  # one pass
        grad_normed = _fused_activation_backward(grad, normed, act)
        grads = torch.ops.aten.native_batch_norm_backward(
            grad_normed,
            y,
            weight,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            training,
            eps,
            [
                ctx.needs_input_grad[0],
                weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2],
            ],
        )
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


def _fused_activation_backward(grad: torch.Tensor, y: torch.Tensor, act: str) -> torch.Tensor:
    """grad * act'(y) in one pass, with ATen's own backward kernels (PyTorch's conventions at the kinks)."""
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, y)
    if act == "hardswish":
        return torch.ops.aten.hardswish_backward(grad, y)
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, y, 0)
    if act == "relu6":
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)
    return grad * _activation_grad(y, act)


class _Linear(torch.autograd.Function):
    """``x @ weight^T + bias`` for (M, K) rows in training, forward and backward on the GEMM provider measured
    fastest for the shape (:func:`pykernels.gemm.train_provider`: BLAS ``addmm`` or oneDNN's 1x1 convolution)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous()
        ctx.provider = gemm.train_provider(x, weight, bias)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return gemm.train_linear(x, weight, bias, ctx.provider)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        return gemm.train_linear_backward(grad, x, weight, need[0], need[1], ctx.has_bias and need[2], ctx.provider)


class _ScaledProjection(torch.autograd.Function):
    """``linear(z * s[b, c], weight)`` over a (B, N, C) channels-last z: saves z and s (not the scaled product, which
    backward recomputes), so training keeps one expanded tensor fewer than eager's ``project(se(x))``. The GEMMs run
    on the training provider measured fastest for the shape, as :class:`_Linear`."""

    @staticmethod
    def forward(ctx, z, s, weight):
        ctx.save_for_backward(z, s, weight)
        zs = (z * s[:, None, :]).flatten(0, 1)
        ctx.provider = gemm.train_provider(zs, weight, None)
        return gemm.train_linear(zs, weight, None, ctx.provider).view(z.shape[0], z.shape[1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        z, s, weight = ctx.saved_tensors
        need_z, need_s, need_w = ctx.needs_input_grad[:3]
        zs = (z * s[:, None, :]).flatten(0, 1) if need_w else z.flatten(0, 1)  # recomputed, not saved
        grad_zs, grad_w, _ = gemm.train_linear_backward(
            grad.flatten(0, 1), zs, weight, need_z or need_s, need_w, False, ctx.provider
        )
        grad_z = grad_s = None
        if grad_zs is not None:
            grad_zs = grad_zs.view(z.shape)
            if need_z:
                grad_z = grad_zs * s[:, None, :]
            if need_s:
                grad_s = (grad_zs * z).sum(1)
        return grad_z, grad_s, grad_w


class FusedMBConvSE(nn.Module):
    """MBConv (inverted residual) / Fused-MBConv block with squeeze-excitation, on pykernels' fused ops.

    Built directly it has timm's layout and parameter names (``conv_pw``, ``bn1``, ``conv_dw``, ``bn2``,
    ``se.conv_reduce``, ``se.conv_expand``, ``conv_pwl``, ``bn3`` for an inverted residual; ``conv_dw``, ``bn1``,
    ``se``, ``conv_pw``, ``bn2`` with ``expand_ratio=1``; ``conv_exp``, ``bn1``, ``se``, ``conv_pwl``, ``bn2`` with
    ``fused_expand=True``), so a timm block's state_dict loads with ``strict=True``. :meth:`from_module` keeps the
    original block's submodules instead (state_dict keys unchanged whatever the library).

    Args:
        in_ch, out_ch: input / output channels.
        kernel_size: depthwise kernel (3, 5, 7) - or the Fused-MBConv expand kernel.
        stride: 1 or 2.
        expand_ratio: hidden width ``round(in_ch * expand_ratio)`` (timm rounds to a multiple of 8: pass
            ``hidden_ch`` to match a model exactly).
        se_ratio: SE reduced width ``round(in_ch * se_ratio)`` (EfficientNet's convention); 0 or None: no SE.
        fused_expand: Fused-MBConv / EdgeResidual (EfficientNet-V2): a regular k x k expand conv replaces the 1x1
            expand + depthwise pair.
        act: ``"silu"``, ``"relu"``, ``"relu6"``, ``"hardswish"``.
        drop_path: stochastic-depth rate (training only; only with the residual).
        se_act / gate: the SE's activation (default ``act``) and gate (``"sigmoid"``, ``"hard_sigmoid"``).
        padding: ``"symmetric"`` (``k // 2``) or ``"same"`` (TensorFlow's, timm's ``tf_*`` models).
        bn_eps, bn_momentum: of every BatchNorm.
        noskip: no residual even when stride 1 and in_ch == out_ch.
        hidden_ch, se_ch: explicit widths.
        backend: force a backend for the fused ops; None chooses.

    Shape:
        ``(B, in_ch, H, W)`` (NCHW or channels-last) -> ``(B, out_ch, H_out, W_out)``, channels-last in memory.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        expand_ratio: float = 6,
        se_ratio: float | None = 0.25,
        fused_expand: bool = False,
        act: str = "silu",
        drop_path: float = 0.0,
        *,
        se_act: str | None = None,
        gate: str = "sigmoid",
        padding: str = "symmetric",
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        noskip: bool = False,
        hidden_ch: int | None = None,
        se_ch: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        reasons = _ops.stride_reasons(stride) + _ops.activation_reasons(act)
        if not fused_expand:
            reasons += _ops.kernel_size_reasons(kernel_size)
        if padding not in ("symmetric", "same"):
            reasons.append(f"padding must be 'symmetric' or 'same', got {padding!r}")
        if reasons:
            raise ValueError("; ".join(reasons))
        hidden = int(hidden_ch if hidden_ch is not None else round(in_ch * expand_ratio))
        kind = "er" if fused_expand else ("ds" if hidden == in_ch and hidden_ch is None and expand_ratio == 1 else "ir")
        bn = dict(eps=bn_eps, momentum=bn_momentum)
        k = kernel_size
        pad = k // 2 if padding == "symmetric" else 0
        if kind == "ir":
            self.conv_pw = nn.Conv2d(in_ch, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden, **bn)
            self.conv_dw = nn.Conv2d(hidden, hidden, k, stride, pad, groups=hidden, bias=False)
            self.bn2 = nn.BatchNorm2d(hidden, **bn)
            paths = dict(exp_conv="conv_pw", exp_bn="bn1", dw_conv="conv_dw", dw_bn="bn2")
        elif kind == "ds":
            self.conv_dw = nn.Conv2d(in_ch, in_ch, k, stride, pad, groups=in_ch, bias=False)
            self.bn1 = nn.BatchNorm2d(in_ch, **bn)
            paths = dict(dw_conv="conv_dw", dw_bn="bn1")
        else:
            self.conv_exp = nn.Conv2d(in_ch, hidden, k, stride, pad, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden, **bn)
            paths = dict(exp_conv="conv_exp", exp_bn="bn1")
        se_width = se_ch if se_ch is not None else (round(in_ch * se_ratio) if se_ratio else 0)
        se_cfg = None
        if se_width:
            self.se = SqueezeExcite(hidden, max(1, int(se_width)), se_act or act, gate)
            paths["se"] = "se"
            se_cfg = (self.se.act, self.se.gate)
        proj = "conv_pw" if kind == "ds" else "conv_pwl"
        setattr(self, proj, nn.Conv2d(hidden, out_ch, 1, bias=False))
        proj_bn = "bn2" if kind in ("ds", "er") else "bn3"
        setattr(self, proj_bn, nn.BatchNorm2d(out_ch, **bn))
        paths.update(proj_conv=proj, proj_bn=proj_bn)
        has_skip = stride == 1 and in_ch == out_ch and not noskip
        if has_skip:
            self.drop_path = DropPath(drop_path)
            paths["drop_path"] = "drop_path"
        padding_rule = _Padding("static", (pad,) * 4) if padding == "symmetric" else _Padding("tf_same")
        self._layout = _Layout("pykernels", kind, paths, act, "none", padding_rule, stride, k, has_skip, se_cfg)
        self.backend = backend
        self._folded: dict = {}

    def __getstate__(self):
        """Pickling and ``copy.deepcopy`` (timm's ModelEma, ``swap(dry_run=True)``) leave the folded-weight cache
        behind: it may hold oneDNN-packed tensors, which have no storage to copy, and it is keyed to this module's own
        tensors anyway (the copy folds its own on first use)."""
        state = dict(super().__getstate__())
        state["_folded"] = {}
        return state

    # ---- conversion ------------------------------------------------------------------------------------------------

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> FusedMBConvSE:
        """A ``FusedMBConvSE`` computing what ``module`` computes, holding ``module``'s own submodules (weights,
        BatchNorm buffers, train/eval state, ``requires_grad``, device, dtype: all shared; the state_dict keys are the
        original's).

        Accepts timm ``InvertedResidual`` / ``DepthwiseSeparableConv`` / ``EdgeResidual``, torchvision ``MBConv`` /
        ``FusedMBConv`` / MobileNet-V3 ``InvertedResidual``, Hugging Face ``EfficientNetBlock``, the seeds'
        ``FusedMBConv``. Raises TypeError for anything else and ValueError (with every reason) for a variant it does
        not compute: anti-aliasing, space-to-depth, dilation, grouped expand convs, non-BatchNorm norms, other
        activations or gates, kernel sizes other than 3, 5, 7 (depthwise), strides other than 1, 2.
        """
        if isinstance(module, FusedMBConvSE):
            return module
        layout = _layout(module)
        if layout is None:
            raise TypeError(
                f"FusedMBConvSE.from_module does not know {type(module).__module__}.{type(module).__name__}; "
                "supported: timm InvertedResidual / DepthwiseSeparableConv / EdgeResidual, torchvision MBConv / "
                "FusedMBConv / MobileNet-V3 InvertedResidual, Hugging Face EfficientNetBlock / "
                "MobileNetV2InvertedResidual, the seeds' FusedMBConv"
            )
        if layout.problems:
            raise ValueError(
                f"FusedMBConvSE cannot stand in for this {type(module).__name__} ({layout.source}): "
                + "; ".join(layout.problems)
            )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in module.named_children():
            new.add_module(name, child)
        for name, param in module.named_parameters(recurse=False):
            new.register_parameter(name, param)
        for name, buf in module.named_buffers(recurse=False):
            new.register_buffer(name, buf)
        new._layout = layout
        new.backend = backend
        new._folded = {}
        new.training = module.training  # the children keep their own modes (a frozen BatchNorm stays in eval)
        return new

    # ---- parts ---------------------------------------------------------------------------------------------------

    def _part(self, role: str):
        path = self._layout.paths.get(role)
        if path is None:
            return None
        # get_submodule(path), walking the children dicts (get_submodule's hasattr / getattr / isinstance per level
        # cost ~1 us a part, and a forward looks up ten); anything unusual takes get_submodule itself (its errors)
        module = self
        for name in path.split("."):
            module = module._modules.get(name)
            if module is None:
                return self.get_submodule(path)
        return module

    @property
    def kind(self) -> str:
        return self._layout.kind

    def extra_repr(self) -> str:
        lay = self._layout
        parts = [f"kind={lay.kind!r}", f"kernel_size={lay.kernel}", f"stride={lay.stride}", f"act={lay.act!r}"]
        if lay.se:
            parts.append(f"se_act={lay.se[0]!r}, gate={lay.se[1]!r}")
        if lay.padding is not None and lay.padding.kind != "static":
            parts.append(f"padding={lay.padding.kind!r}")
        parts.append(f"skip={lay.has_skip}")
        if lay.source != "pykernels":
            parts.append(f"from={lay.source!r}")
        if self.backend:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    # ---- forward -------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self._layout
        exp_conv = self._part("exp_conv")
        in_ch = (exp_conv or self._part("dw_conv")).in_channels
        if x.dim() != 4 or x.shape[1] != in_ch:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {in_ch}, H, W), got {tuple(x.shape)}")
        bns = [self._part(role) for role in ("exp_bn", "dw_bn", "proj_bn") if role in lay.paths]
        # eval with every BatchNorm on running statistics and nothing to differentiate: folded weights, in place
        fast = not any(_bn_uses_batch_stats(bn) for bn in bns) and not (
            torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        )
        shortcut = x
        # 1. expand: 1x1 conv (GEMM on the channels-last view) + BN + act, or Fused-MBConv's k x k conv
        if lay.kind == "ir":
            h = self._pointwise_bn(x, exp_conv, self._part("exp_bn"), lay.act, fast, "exp")
        elif lay.kind == "er":
            h = self._regular_conv_bn(x, exp_conv, self._part("exp_bn"), lay.act, fast)
        else:
            h = x
        # 2. depthwise conv + BN + act, with the SE squeeze, in one pass
        se = self._part("se")
        if lay.kind in ("ir", "ds"):
            z, pooled = self._depthwise(h)
        else:
            z = h
            pooled = z.float().sum((2, 3)) if se is not None else None
        # 3. SE excitation on (B, C), then the projection with the SE scale
        proj_conv, proj_bn = self._part("proj_conv"), self._part("proj_bn")
        scale = None
        if se is not None:
            reduce, expand = _se_modules(se)
            mean = pooled / (z.shape[2] * z.shape[3])
            scale = _se_scale(mean, reduce, expand, *lay.se).to(z.dtype)
        dropout, drop = self._part("dropout"), self._part("drop_path")
        # eval: the residual add as the projection GEMM's epilogue when nothing is dropped
        fuse_skip = fast and lay.has_skip and proj_conv is not None and lay.proj_act == "none"
        fuse_skip = fuse_skip and not _drops(dropout) and not _drops(drop)
        if proj_conv is not None:
            y = self._project(z, scale, proj_conv, proj_bn, lay.proj_act, fast, shortcut if fuse_skip else None)
        else:
            y = z if scale is None else z * scale[:, :, None, None]
        # 4. residual (+ DropPath / Hugging Face's element-wise dropout)
        if not lay.has_skip or fuse_skip:
            return y
        if dropout is not None:  # Hugging Face: element-wise dropout, its mask drawn in NCHW order as HF draws it
            if dropout.training and dropout.p > 0:
                y = dropout(y.contiguous())
            return PF.drop_path_add(shortcut, y, 0.0, training=False, backend=self.backend)
        if drop is None or isinstance(drop, nn.Identity):
            return PF.drop_path_add(shortcut, y, 0.0, training=False, backend=self.backend)
        p, mode, rng, scale_by_keep = _drop_path_args(drop)
        return PF.drop_path_add(
            shortcut,
            y,
            p,
            training=drop.training,
            scale_by_keep=scale_by_keep,
            backend=self.backend,
            mode=mode,
            rng=rng,
        )

    # ---- stages --------------------------------------------------------------------------------------------------

    def _folded_weights(self, key: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, rows: int = 0):
        """(weight, bias, oneDNN-packed weight or None): BN folded into the conv (eval, no autograd), cached and
        refolded whenever a tensor it reads changes (an optimizer step, load_state_dict, a statistic update)."""
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        stamp = _versions(*tensors) + (bn.eps,)
        if torch.compiler.is_compiling():
            return (*_fold(conv, bn), None)
        cached = self._folded.get(key)
        if cached is None or cached[0] != stamp:
            weight, bias = _fold(conv, bn)
            packed = gemm.prepack(weight, rows) if rows else None
            cached = (stamp, (weight, bias, packed))
            self._folded[key] = cached
        return cached[1]

    def _pointwise_bn(self, x, conv, bn, act, fast, key):
        """act(BN(conv1x1(x))) as (B, C, H, W) channels-last: a GEMM on x's channels-last view."""
        rows = x.permute(0, 2, 3, 1)  # free when x is channels-last; an NCHW x is copied once
        if fast:
            batch, height, width, _ = rows.shape
            flat = rows.reshape(batch * height * width, rows.shape[3])
            weight, bias, packed = self._folded_weights(key, conv, bn, flat.shape[0])
            y = gemm.linear_act(flat, weight, bias, act, packed)
            return y.view(batch, height, width, y.shape[-1]).permute(0, 3, 1, 2)
        batch, height, width, _ = rows.shape
        flat = rows.reshape(batch * height * width, rows.shape[3])
        y = _Linear.apply(flat, conv.weight.flatten(1), conv.bias)
        return self._batch_norm_act(y.view(batch, height, width, y.shape[-1]).permute(0, 3, 1, 2), bn, act)

    def _regular_conv_bn(self, x, conv, bn, act, fast):
        lay = self._layout
        k = conv.kernel_size[0]
        pads = lay.padding.resolve(x.shape[2], x.shape[3], k, lay.stride)
        xp = TF.pad(x, pads) if any(pads) else x
        if fast:
            weight, bias, _ = self._folded_weights("exp", conv, bn)
            y = TF.conv2d(xp, weight.view_as(conv.weight), bias, lay.stride)
            return gemm._inplace_act(y, act)
        y = TF.conv2d(xp, conv.weight, conv.bias, lay.stride)
        return self._batch_norm_act(y, bn, act)

    def _batch_norm_act(self, y, bn, act):
        """act(BN(y)) saving only y for backward (the BatchNorm output is recomputed there)."""
        if act == "none" or not torch.is_grad_enabled() or y.numel() == 0:  # empty: F.batch_norm's no-op
            return _activation(self._batch_norm(y, bn), act)
        factor = _bn_factor(bn) if bn.training else None
        return _BatchNormAct.apply(
            y,
            bn.weight,
            bn.bias,
            bn.running_mean,
            bn.running_var,
            _bn_uses_batch_stats(bn),
            factor or 0.0,
            bn.eps,
            act,
        )

    def _batch_norm(self, y, bn):
        factor = _bn_factor(bn) if bn.training else None
        return TF.batch_norm(
            y, bn.running_mean, bn.running_var, bn.weight, bn.bias, _bn_uses_batch_stats(bn), factor or 0.0, bn.eps
        )

    def _depthwise(self, h):
        lay = self._layout
        conv, bn = self._part("dw_conv"), self._part("dw_bn")
        k = conv.kernel_size[0]
        padding = lay.padding.resolve(h.shape[2], h.shape[3], k, lay.stride)
        batch_stats = _bn_uses_batch_stats(bn)
        factor = _bn_factor(bn) if bn.training else None
        return PF.mbconv_se(
            h,
            conv.weight,
            conv.bias,
            bn.weight,
            bn.bias,
            bn.running_mean,
            bn.running_var,
            training=batch_stats,
            momentum=factor,
            eps=bn.eps,
            stride=lay.stride,
            padding=padding,
            act=lay.act,
            backend=self.backend,
        )

    def _project(self, z, scale, conv, bn, act, fast, residual=None):
        """BN(conv1x1(z * scale)) (+ act), as (B, C, H, W) channels-last; in eval with ``residual`` (the block's
        input, act "none"), ``residual +`` that, the add in the GEMM's epilogue."""
        rows = z.permute(0, 2, 3, 1)  # (B, H, W, C): free for our channels-last z
        if fast:
            batch, height, width, _ = rows.shape
            weight, bias, packed = self._folded_weights("proj", conv, bn, batch * height * width)
            other = None
            if residual is not None:  # (B, H*W, C_out) rows: a view for a channels-last residual, else one copy
                other = residual.permute(0, 2, 3, 1).contiguous().view(batch, height * width, residual.shape[1])
            if scale is None:
                flat = rows.reshape(batch * height * width, rows.shape[3])
                if other is None:
                    y = gemm.linear_act(flat, weight, bias, act, packed)
                else:
                    y = gemm.linear_add(flat, weight, bias, other.view(flat.shape[0], other.shape[-1]), packed)
            else:  # z is this block's own temporary here: the SE scale may be applied to it in place
                flat = rows.reshape(batch, height * width, rows.shape[3])
                y = gemm.scaled_linear_act(flat, scale, weight, bias, act, packed, other)
            return y.view(batch, height, width, y.shape[-1]).permute(0, 3, 1, 2)
        weight = conv.weight.flatten(1)
        if scale is not None:
            flat = rows.reshape(rows.shape[0], rows.shape[1] * rows.shape[2], rows.shape[3])
            y = _ScaledProjection.apply(flat, scale, weight).view(*rows.shape[:3], weight.shape[0])
            if conv.bias is not None:
                y = y + conv.bias
        else:
            flat = rows.reshape(-1, rows.shape[3])
            y = _Linear.apply(flat, weight, conv.bias).view(*rows.shape[:3], weight.shape[0])
        return _activation(self._batch_norm(y.permute(0, 3, 1, 2), bn), act)


def _drops(layer: nn.Module | None) -> bool:
    """Whether a DropPath / StochasticDepth / Dropout layer drops anything in its current mode."""
    if layer is None or isinstance(layer, nn.Identity) or not layer.training:
        return False
    if isinstance(layer, nn.Dropout):
        return layer.p > 0
    return _drop_path_args(layer)[0] > 0


def _drop_path_args(drop: nn.Module) -> tuple[float, str, str, bool]:
    """(drop_prob, mode, rng, scale_by_keep) of a DropPath-like layer, read at every call (schedules change them)."""
    if isinstance(drop, DropPath):
        return drop.drop_prob, drop.mode, drop.rng, drop.scale_by_keep
    if type(drop).__name__ == "StochasticDepth":
        return float(drop.p), drop.mode, "bernoulli", True
    converted = DropPath.from_module(drop)
    return converted.drop_prob, converted.mode, converted.rng, converted.scale_by_keep


def _se_modules(se: nn.Module):
    parts, _ = _se_parts(se, check=False)
    return parts[0], parts[1]
