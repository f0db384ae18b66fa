"""Public nn.Modules of pykernels (each with a ``from_module`` converter)."""

from pykernels.modules.attention import (
    FusedHFRelPosAttention,
    FusedHFWindowAttention,
    FusedMHSA,
    FusedMultiheadAttention,
    FusedShiftedWindowAttention,
    FusedViTAttention,
    FusedWindowAttention,
)
from pykernels.modules.convnext import ConvNeXtBlock
from pykernels.modules.drop_path import DropPath
from pykernels.modules.dwconv_ln import DWConvLayerNorm
from pykernels.modules.mbconv_se import FusedMBConvSE, SqueezeExcite
from pykernels.modules.mlp import FusedMlp

__all__ = [
    "ConvNeXtBlock",
    "DropPath",
    "DWConvLayerNorm",
    "FusedHFRelPosAttention",
    "FusedHFWindowAttention",
    "FusedMBConvSE",
    "FusedMHSA",
    "FusedMlp",
    "FusedMultiheadAttention",
    "FusedShiftedWindowAttention",
    "FusedViTAttention",
    "FusedWindowAttention",
    "SqueezeExcite",
]
