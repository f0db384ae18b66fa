"""Public nn.Modules of pykernels (each with a ``from_module`` converter)."""

from pykernels.modules.attention import FusedMHSA, FusedMultiheadAttention, FusedViTAttention
from pykernels.modules.convnext import ConvNeXtBlock
from pykernels.modules.drop_path import DropPath
from pykernels.modules.dwconv_ln import DWConvLayerNorm
from pykernels.modules.mbconv_se import FusedMBConvSE, SqueezeExcite
from pykernels.modules.mlp import FusedMlp

__all__ = [
    "ConvNeXtBlock",
    "DropPath",
    "DWConvLayerNorm",
    "FusedMBConvSE",
    "FusedMHSA",
    "FusedMlp",
    "FusedMultiheadAttention",
    "FusedViTAttention",
    "SqueezeExcite",
]
