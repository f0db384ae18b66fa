"""pykernels: fused Triton / CUDA / C++ kernels for ViT, ConvNeXt and EfficientNet building blocks, as drop-in
``nn.Module``s with full autograd.

    from pykernels import ConvNeXtBlock, DropPath, DWConvLayerNorm, FusedMBConvSE, FusedMHSA, FusedMlp
    from pykernels import FusedWindowAttention   # Swin / Swin-V2 window attention
    from pykernels.functional import attention, drop_path_add, dwconv_ln, mbconv_se, mlp
    pykernels.swap(model)     # timm / torchvision / Hugging Face ConvNeXt and MBConv blocks, MLPs, DropPaths

Importing never fails because Triton, the compiled extension or a GPU is missing: each op falls back to a
backend that is there (``python -m pykernels info`` says which).
"""

from pykernels import backends as _backends
from pykernels import functional, ops
from pykernels.backends import BackendNotSupportedError, use_backend
from pykernels.modules import (
    ConvNeXtBlock,
    DropPath,
    DWConvLayerNorm,
    FusedMBConvSE,
    FusedMHSA,
    FusedMlp,
    FusedWindowAttention,
    SqueezeExcite,
)
from pykernels.swap import swap


def info() -> str:
    """Versions, devices, and for each op and backend whether it is usable here (or why not)."""
    return _backends.info()


__all__ = [
    "BackendNotSupportedError",
    "ConvNeXtBlock",
    "DropPath",
    "DWConvLayerNorm",
    "FusedMBConvSE",
    "FusedMHSA",
    "FusedMlp",
    "FusedWindowAttention",
    "functional",
    "info",
    "SqueezeExcite",
    "ops",
    "swap",
    "use_backend",
]
