"""Model surgery: find layers pykernels knows in a timm / torchvision / Hugging Face model and replace them,
weights and train/eval state included, with their pykernels counterparts - or leave them alone and say why.

Example::

    model = timm.create_model("convnext_tiny", drop_path_rate=0.1)
    report = pykernels.swap(model)             # in place; every ConvNeXt block is now a pykernels.ConvNeXtBlock
    print(report)                              # what was replaced, what was skipped and why
    pykernels.swap(model, include="drop_path", dry_run=True)   # what would be replaced, changing nothing

Kinds, tried in this order on each module (the first that matches replaces it, and nothing inside a replaced module
is visited again):

* ``"convnext_block"`` (default): timm ``ConvNeXtBlock`` (``conv_mlp`` False / True), torchvision ``CNBlock``,
  Hugging Face ``ConvNextLayer``, official-layout ConvNeXt ``Block`` -> :class:`pykernels.ConvNeXtBlock`
  (fused dwconv + LayerNorm, fused layer-scale + DropPath + residual; same values in eval mode up to float32
  rounding, same DropPath mask in training mode). Variants it does not compute (ConvNeXt-V2's GRN, strided or
  channel-changing blocks, other activations) are skipped with the reason.
* ``"mbconv"`` (default): timm ``InvertedResidual`` / ``DepthwiseSeparableConv`` / ``EdgeResidual``, torchvision
  ``MBConv`` / ``FusedMBConv`` / MobileNet-V3 ``InvertedResidual``, Hugging Face ``EfficientNetBlock`` /
  ``MobileNetV2InvertedResidual``, the seeds' ``FusedMBConv`` -> :class:`pykernels.FusedMBConvSE`, which keeps the
  block's own submodules (state_dict keys unchanged). Variants it does not compute (anti-aliasing, dilation, other
  norms or activations) are skipped.
* ``"mlp"`` (default): timm ``Mlp`` (``use_conv`` False / True), torchvision ``MLPBlock`` / two-layer ``MLP``, Hugging
  Face ``ViTMLP`` / ``Dinov2MLP`` -> :class:`pykernels.FusedMlp`, which keeps the original's submodules (state_dict
  keys unchanged): fc1 + bias + activation as one GEMM call in inference (oneDNN on packed weights where that was
  measured faster), the hidden pre-activation saved once in training. A norm between the layers or an activation
  other than GELU (erf / tanh), ReLU, SiLU is skipped with the reason. In timm's ViT ``Block``, torchvision's
  ``EncoderBlock`` and HF's ``ViTLayer`` / ``Dinov2Layer`` the LayerNorm in front of the MLP moves into the
  FusedMlp (``pykernels.modules.mlp.adopt_prenorm``: the block's norm becomes an identity ``MlpPreNorm`` holding
  the same parameters), so training saves the LayerNorm's input alone.
* ``"drop_path"`` (default): timm ``DropPath``, torchvision ``StochasticDepth``, Hugging Face ``*DropPath`` ->
  :class:`pykernels.DropPath` (bit-identical where the original masks by multiplication).
* ``"attention"`` (opt-in): timm ``Attention``, ``nn.MultiheadAttention``, Hugging Face ViT-layout attention
  (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``) -> ``FusedMHSA``; Swin / Swin-V2 window attention (timm
  ``WindowAttention``, torchvision ``ShiftedWindowAttention(V2)``, Hugging Face ``SwinAttention`` /
  ``Swinv2Attention`` / ``DonutSwinAttention`` / ``MaskFormerSwinAttention`` / ``Swin2SRAttention`` /
  ``ClapAudioAttention``) -> ``FusedWindowAttention`` (relative-position bias, Swin-V2's cosine attention and
  continuous position bias, the shifted-window mask), each verified on a probe with a mask. Window attention of
  other layouts is skipped with the reason.

Known classes are matched exactly. A module matched by its structure alone (Hugging Face's attention classes, which
share ViT's layout but not always its maths - Swin's window bias, BEiT's relative-position bias -; the official
ConvNeXt ``Block`` layout; the seeds' classes; ``*DropPath`` classes outside timm / torchvision / HF) is replaced only
after a verification: the original and the candidate run on a small seeded probe input and must agree (and the
candidate must not raise); otherwise it is skipped with the reason. ``verify=False`` turns the probe off.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from pykernels.modules import ConvNeXtBlock, DropPath, FusedMBConvSE, FusedMHSA, FusedMlp
from pykernels.modules import attention as _attention
from pykernels.modules import convnext as _convnext
from pykernels.modules import mbconv_se as _mbconv
from pykernels.modules import mlp as _mlp

_KNOWN_LIBRARIES = ("timm.", "torchvision.", "transformers.")


@dataclass(frozen=True)
class Converter:
    """One kind of layer ``swap`` can replace.

    Attributes:
        kind: its name for include / exclude.
        candidate: whether a module is a layer of this kind (the converter may still refuse a variant).
        reasons: why ``convert`` cannot stand in for a candidate (empty: it can).
        convert: the pykernels module computing what the candidate computes.
        probe: for a candidate matched by structure alone (not by its exact class), the inputs of a verification
            forward (on copies, in eval mode - or training mode with ``probe_train`` - with a seeded RNG); None: an
            exact match, no probe.
        default: swapped when ``include`` is not given (the others only on request).
        probe_train: run the probe in training mode (DropPath: the mask is what must agree).
    """

    kind: str
    candidate: Callable[[nn.Module], bool]
    reasons: Callable[[nn.Module], list[str]]
    convert: Callable[[nn.Module], nn.Module]
    probe: Callable[[nn.Module], tuple | None] = lambda m: None
    default: bool = True
    probe_train: bool = False


def _known_library(m: nn.Module) -> bool:
    return type(m).__module__.startswith(_KNOWN_LIBRARIES)


def _param(m: nn.Module) -> torch.Tensor | None:
    return next(iter(m.parameters()), None)


def _like(m: nn.Module, *shape: int) -> torch.Tensor:
    p = _param(m)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    return x.to(p) if p is not None else x


def _is_drop_path(m: nn.Module) -> bool:
    name = type(m).__name__
    if isinstance(m, DropPath):
        return False
    if name == "StochasticDepth":
        return hasattr(m, "p") and hasattr(m, "mode")
    return name.endswith("DropPath") and hasattr(m, "drop_prob")


def _drop_path_probe(m: nn.Module):
    if _known_library(m):
        return None
    return (torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0)),)


def _convnext_probe(m: nn.Module):
    if _convnext._is_official_layout(m) and not _known_library(m):
        dim = m.dwconv.in_channels
        return (_like(m, 2, dim, 9, 9),)
    return None


def _mbconv_probe(m: nn.Module):
    layout = _mbconv._layout(m)
    if layout is not None and layout.source.startswith("seeds"):
        conv = m.get_submodule(layout.paths["exp_conv"])
        return (_like(m, 2, conv.in_channels, 9, 9),)
    return None


def _mlp_probe(m: nn.Module):
    if _mlp.is_structural_match(m):
        return (_like(m, 2, 5, m.fc1.in_features),)
    return None


def _attention_probe(m: nn.Module):
    if _attention.is_structural_match(m):
        return (_like(m, 2, 5, m.q_proj.in_features),)
    if _attention._seeds_kind(m) is not None:
        return (_like(m, 2, 5, m.qkv.in_features),)
    return None


def _window_probe(m: nn.Module):
    """Window attention: x of 2 images x 2 windows with a shifted-window-like mask (0 / -100 between token groups in
    the second window); torchvision's layer takes an image (B, H, W, C) of 2 x 2 windows and shifts it itself."""
    dim, (wh, ww) = _attention.window_geometry(m)
    if _attention.window_layout(m) == "torchvision":
        return (_like(m, 2, 2 * wh, 2 * ww, dim),)
    n = wh * ww
    group = torch.arange(n) % 2
    mask = torch.zeros(2, n, n)
    mask[1] = (group[:, None] != group[None, :]).float() * -100.0
    x = _like(m, 4, n, dim)
    return (x, mask.to(x))


def _hf_relpos_probe(m: nn.Module):
    """BEiT-family attention: a class token + the patches of the relative-position window, with the resolution."""
    s = m.attention
    dim = s.query.in_features
    if s.has_relative_position_bias:
        wh, ww = s.relative_position_bias.window_size
        patch = s.config.patch_size
        return (_like(m, 2, 1 + wh * ww, dim), False, None, False, (wh * patch, ww * patch))
    return (_like(m, 2, 5, dim),)


CONVERTERS: list[Converter] = [
    # before "drop_path": a whole block is replaced (its DropPath with it) before its parts are considered
    Converter(
        "convnext_block",
        lambda m: not isinstance(m, ConvNeXtBlock) and _convnext._parts(m) is not None,
        _convnext.unsupported_reasons,
        ConvNeXtBlock.from_module,
        _convnext_probe,
    ),
    Converter(
        "mbconv",
        lambda m: _mbconv._layout(m) is not None,
        _mbconv.unsupported_reasons,
        FusedMBConvSE.from_module,
        _mbconv_probe,
    ),
    Converter("mlp", _mlp.is_candidate, _mlp.unsupported_reasons, FusedMlp.from_module, _mlp_probe),
    Converter("drop_path", _is_drop_path, lambda m: [], DropPath.from_module, _drop_path_probe, probe_train=True),
    # opt-in until FusedMHSA has been measured on a GPU (on CPU it runs the same ATen kernel as timm's SDPA path);
    # window attention first: Hugging Face's SwinAttention also has the ViT layout the next converter matches
    Converter(
        "attention",
        _attention.is_window_candidate,
        _attention.window_unsupported_reasons,
        _attention.FusedWindowAttention.from_module,
        _window_probe,
        default=False,
    ),
    Converter(
        "attention",
        _attention.is_hf_relpos_candidate,
        _attention.hf_relpos_unsupported_reasons,
        _attention.FusedHFRelPosAttention.from_module,
        _hf_relpos_probe,
        default=False,
    ),
    Converter(
        "attention",
        _attention.is_candidate,
        _attention.unsupported_reasons,
        FusedMHSA.from_module,
        _attention_probe,
        default=False,
    ),
]


# Layers that look like a kind by their class name but that no converter knows: reported as skipped (never passed over
# in silence), unless a module around them was already replaced or reported
_LOOKS_LIKE = {
    "convnext_block": re.compile(r"(ConvNe[Xx]t\w*(Block|Layer)|CNBlock)$"),
    "mbconv": re.compile(r"(InvertedResidual|MBConv|EdgeResidual|DepthwiseSeparableConv|EfficientNetBlock)$"),
    "mlp": re.compile(r"(Mlp|MLP|MLPBlock|Intermediate)$"),
    "drop_path": re.compile(r"(DropPath|StochasticDepth)$"),
    "attention": re.compile(r"Attention$"),
}


def _unknown_reason(kind: str, m: nn.Module) -> str:
    name = type(m).__name__
    if kind == "mlp" and name.endswith("Intermediate"):
        return (
            "an MLP split into *Intermediate (fc1 + activation) and *Output (fc2 + dropout + residual) modules: "
            "not converted"
        )
    where = f"{type(m).__module__}.{name}"
    return f"no pykernels counterpart for this {where} layout (docs/coverage.md lists the known ones)"


# ---- the report ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replaced:
    path: str
    old: str
    new: str
    kind: str


@dataclass(frozen=True)
class Skipped:
    path: str
    cls: str
    kind: str
    reason: str


@dataclass
class SwapReport:
    """What :func:`swap` replaced (``replaced``: path, old class -> new class, kind) and what it left alone
    (``skipped``: path, class, kind, reason). ``print(report)`` shows both as a table."""

    model: nn.Module = field(repr=False)
    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    dry_run: bool = False

    def __str__(self) -> str:
        verb = "would replace" if self.dry_run else "replaced"
        lines = [f"pykernels.swap: {verb} {len(self.replaced)}, skipped {len(self.skipped)}"]
        if self.replaced:
            rows = [(r.path or "(model)", f"{r.old} -> {r.new}", r.kind) for r in self.replaced]
            lines += _table(("path", "replacement", "kind"), rows)
        if self.skipped:
            rows = [(s.path or "(model)", s.cls, s.kind, s.reason) for s in self.skipped]
            lines += [""] + _table(("skipped", "class", "kind", "reason"), rows)
        return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths), "-" * len(header[-1]))] + [
        fmt.format(*row) for row in rows
    ]


# ---- verification ----------------------------------------------------------------------------------------------


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return getattr(out, "last_hidden_state", None)


def _verify(original: nn.Module, candidate: nn.Module, inputs: tuple, train: bool) -> str | None:
    """None when ``candidate`` computes what ``original`` computes on the probe, else the reason it does not. Runs
    on copies (a candidate may share the original's submodules, whose buffers must not move)."""
    results = []
    for module in (copy.deepcopy(original), copy.deepcopy(candidate)):
        module.train(train)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                results.append(_first_tensor(module(*inputs)))
        except Exception as exc:  # noqa: BLE001 - the probe's verdict is the reason
            who = "the original" if not results else "the replacement"
            return f"verification probe failed on {who} ({type(exc).__name__}: {exc})"[:300]
    want, got = results
    if want is None or got is None or want.shape != got.shape:
        return "verification probe: outputs of different kinds or shapes"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    if not err <= 1e-3 * scale + 1e-5:
        return f"verification probe: outputs differ (max error {err:.3g} at scale {scale:.3g})"
    return None


# ---- swap ---------------------------------------------------------------------------------------------------------


def swap(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    verbose: bool = False,
    dry_run: bool = False,
    verify: bool = True,
) -> SwapReport:
    """Replace, in place, every sub-module that a pykernels module can stand in for; report what was replaced and
    what was skipped (with the reason).

    Args:
        model: any ``nn.Module`` (timm, torchvision, Hugging Face, your own).
        include: kinds to swap (default: ``"convnext_block"``, ``"mbconv"``, ``"mlp"`` and ``"drop_path"``;
            ``"attention"`` -
            timm ``Attention``, ``nn.MultiheadAttention``, HF ViT-layout attention -> ``FusedMHSA``, Swin / Swin-V2
            window attention -> ``FusedWindowAttention`` - is opt-in for now). See the module docstring for what
            each kind replaces.
        exclude: kinds to leave alone.
        verbose: print the report.
        dry_run: change nothing; the report says what would be replaced.
        verify: run the probe verification of structure-matched modules (see the module docstring).

    Returns:
        a :class:`SwapReport` (``report.model`` is ``model``). ``model.pykernels_swapped`` lists the replaced paths.
        Swapping a swapped model again replaces nothing.
    """
    kinds = {c.kind for c in CONVERTERS}
    defaults = {c.kind for c in CONVERTERS if c.default}
    include = {include} if isinstance(include, str) else set(defaults if include is None else include)
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    unknown = (include | exclude) - kinds
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; known: {sorted(kinds)}")
    active = [c for c in CONVERTERS if c.kind in include and c.kind not in exclude]
    report = SwapReport(model, dry_run=dry_run)
    done: list[str] = []  # replaced (or would-be-replaced) paths and pykernels modules: nothing inside is visited
    for parent_name, parent in list(model.named_modules()):
        if any(parent_name == name or parent_name.startswith(name + ".") for name in done):
            continue
        if parent is not model and type(parent).__module__.startswith("pykernels."):
            done.append(parent_name)  # a pykernels module (swapped before): what it holds is its own business
            continue
        for child_name, child in list(parent.named_children()):
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            matched = False
            for conv in active:
                if not conv.candidate(child):
                    continue
                matched = True
                reasons = conv.reasons(child)
                if reasons:
                    report.skipped.append(Skipped(path, type(child).__name__, conv.kind, "; ".join(reasons)))
                    break
                try:
                    new = conv.convert(copy.deepcopy(child) if dry_run else child)
                except (TypeError, ValueError) as exc:
                    report.skipped.append(Skipped(path, type(child).__name__, conv.kind, str(exc)))
                    break
                probe = conv.probe(child) if verify else None
                why = _verify(child, new, probe, conv.probe_train) if probe is not None else None
                if why is not None:
                    report.skipped.append(Skipped(path, type(child).__name__, conv.kind, why))
                    break
                if not dry_run:
                    setattr(parent, child_name, new)
                report.replaced.append(Replaced(path, type(child).__name__, type(new).__name__, conv.kind))
                done.append(path)
                if conv.kind == "mlp":  # a pre-norm block's LayerNorm moves into its FusedMlp
                    norm_name = _mlp.prenorm_name(parent, child_name, new)
                    if norm_name is not None:
                        norm_path = f"{parent_name}.{norm_name}" if parent_name else norm_name
                        old_norm = type(getattr(parent, norm_name)).__name__
                        if not dry_run:
                            _mlp.adopt_prenorm(parent, child_name, new)
                        report.replaced.append(Replaced(norm_path, old_norm, "MlpPreNorm", conv.kind))
                        done.append(norm_path)
                break
            if not matched and not type(child).__module__.startswith("pykernels."):
                accounted = [r.path for r in report.replaced] + [r.path for r in report.skipped]
                if not any(path.startswith(a + ".") for a in accounted):
                    for conv in active:
                        if _LOOKS_LIKE[conv.kind].search(type(child).__name__):
                            reason = _unknown_reason(conv.kind, child)
                            report.skipped.append(Skipped(path, type(child).__name__, conv.kind, reason))
                            break
    if not dry_run:
        model.pykernels_swapped = [r.path for r in report.replaced]
    if verbose:
        print(report)
    return report
