"""Model surgery: find layers pykernels knows in a timm / torchvision / Hugging Face model and replace them,
weights and train/eval state included, with their pykernels counterparts.

Example::

    model = timm.create_model("convnext_tiny", drop_path_rate=0.1)
    pykernels.swap(model)            # every ConvNeXt block is now a pykernels.ConvNeXtBlock
    pykernels.swap(model, include="drop_path")   # only the DropPath layers

Kinds, tried in this order on each module (the first that matches replaces it, and nothing inside a replaced module
is visited again):

* ``"convnext_block"`` (default): timm ``ConvNeXtBlock`` (``conv_mlp`` False / True), torchvision ``CNBlock``,
  Hugging Face ``ConvNextLayer``, official-layout ConvNeXt ``Block`` -> :class:`pykernels.ConvNeXtBlock`
  (fused dwconv + LayerNorm, fused layer-scale + DropPath + residual; same values in eval mode up to float32
  rounding, same DropPath mask in training mode). Variants it does not compute (ConvNeXt-V2's GRN, strided or
  channel-changing blocks, other activations) are left alone.
* ``"mbconv"`` (default): timm ``InvertedResidual`` / ``DepthwiseSeparableConv`` / ``EdgeResidual``, torchvision
  ``MBConv`` / ``FusedMBConv`` / MobileNet-V3 ``InvertedResidual``, Hugging Face ``EfficientNetBlock``, the seeds'
  ``FusedMBConv`` -> :class:`pykernels.FusedMBConvSE`, which keeps the block's own submodules (state_dict keys
  unchanged). Variants it does not compute (anti-aliasing, dilation, other norms or activations) are left alone.
* ``"drop_path"`` (default): timm ``DropPath``, torchvision ``StochasticDepth``, Hugging Face ``*DropPath`` ->
  :class:`pykernels.DropPath` (bit-identical where the original masks by multiplication).
* ``"attention"`` (opt-in): timm ``Attention``, ``nn.MultiheadAttention``, HF ``ViTAttention`` -> ``FusedMHSA``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from pykernels.modules import ConvNeXtBlock, DropPath, FusedMBConvSE, FusedMHSA
from pykernels.modules.attention import can_convert as _is_attention
from pykernels.modules.convnext import can_convert as _is_convnext_block
from pykernels.modules.mbconv_se import can_convert as _is_mbconv


@dataclass(frozen=True)
class Converter:
    """``matches(module)`` says whether ``convert(module)`` can replace it; ``kind`` names it for include/exclude;
    ``default`` kinds are swapped when ``include`` is not given (the others only on request)."""

    kind: str
    matches: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module], nn.Module]
    default: bool = True


def _is_drop_path(m: nn.Module) -> bool:
    name = type(m).__name__
    if isinstance(m, DropPath):
        return False
    if name == "StochasticDepth":
        return hasattr(m, "p") and hasattr(m, "mode")
    return name.endswith("DropPath") and hasattr(m, "drop_prob")


CONVERTERS: list[Converter] = [
    # before "drop_path": a whole block is replaced (its DropPath with it) before its parts are considered
    Converter("convnext_block", _is_convnext_block, ConvNeXtBlock.from_module),
    Converter("mbconv", _is_mbconv, FusedMBConvSE.from_module),
    Converter("drop_path", _is_drop_path, DropPath.from_module),
    # opt-in until FusedMHSA has been measured on a GPU (on CPU it runs the same ATen kernel as timm's SDPA path)
    Converter("attention", _is_attention, FusedMHSA.from_module, default=False),
]


def swap(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    verbose: bool = False,
) -> nn.Module:
    """Replace, in place, every sub-module that a pykernels module can stand in for.

    Args:
        model: any ``nn.Module`` (timm, torchvision, Hugging Face, your own).
        include: kinds to swap (default: ``"convnext_block"``, ``"mbconv"`` and ``"drop_path"``; ``"attention"`` - timm
            ``Attention``, ``nn.MultiheadAttention``, HF ``ViTAttention`` -> ``FusedMHSA`` - is opt-in for now).
            See the module docstring for what each kind replaces.
        exclude: kinds to leave alone.
        verbose: print one line per replaced module.

    Returns:
        ``model`` itself, with ``model.pykernels_swapped`` set to the list of replaced module names.
    """
    kinds = {c.kind for c in CONVERTERS}
    defaults = {c.kind for c in CONVERTERS if c.default}
    include = {include} if isinstance(include, str) else set(defaults if include is None else include)
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    unknown = (include | exclude) - kinds
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; known: {sorted(kinds)}")
    active = [c for c in CONVERTERS if c.kind in include and c.kind not in exclude]
    swapped: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        if any(parent_name.startswith(name + ".") or parent_name == name for name in swapped):
            continue  # inside a module that was replaced: no longer part of the model
        for child_name, child in list(parent.named_children()):
            for conv in active:
                if conv.matches(child):
                    setattr(parent, child_name, conv.convert(child))
                    full = f"{parent_name}.{child_name}" if parent_name else child_name
                    swapped.append(full)
                    if verbose:
                        new_name = type(getattr(parent, child_name)).__name__
                        print(f"pykernels.swap: {full}: {type(child).__name__} -> {new_name}")
                    break
    model.pykernels_swapped = swapped
    return model
