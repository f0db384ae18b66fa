"""Public nn.Modules of pykernels (each with a ``from_module`` converter)."""

from pykernels.modules.attention import FusedMHSA, FusedMultiheadAttention, FusedViTAttention
from pykernels.modules.convnext import ConvNeXtBlock
from pykernels.modules.drop_path import DropPath

__all__ = ["ConvNeXtBlock", "DropPath", "FusedMHSA", "FusedMultiheadAttention", "FusedViTAttention"]
