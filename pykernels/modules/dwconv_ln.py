"""Depthwise k x k conv fused with LayerNorm over channels: the front of ConvNeXt's block (Liu et al. 2022,
"A ConvNet for the 2020s") - timm's ``conv_dw -> permute -> norm``, torchvision's ``CNBlock`` and Hugging Face's
``ConvNextLayer`` ``dwconv -> permute -> layernorm`` - as one module with one kernel (forward and backward)."""

from __future__ import annotations

import torch
from torch import nn

from pykernels import functional as F
from pykernels.ops import dwconv_ln as _ops

__all__ = ["DWConvLayerNorm", "check_kernel_size", "conv_reasons"]

_CHANNELS_FIRST_NORMS = ("LayerNorm2d", "LayerNormChannelsFirst")


def check_kernel_size(kernel_size: int) -> None:
    reasons = _ops.kernel_size_reasons(kernel_size)
    if reasons:
        raise ValueError(f"kernel_size={kernel_size}: {reasons[0]}")


def conv_reasons(conv: nn.Module) -> list[str]:
    """Why the fused op cannot compute ``conv`` as its depthwise conv (empty: it can): a plain ``nn.Conv2d`` (its
    subclasses, e.g. timm's ``Conv2dSame``, pad or compute differently) with ``groups == in_channels ==
    out_channels``, a square kernel of a supported size, stride 1, dilation 1, padding ``k // 2`` (or ``"same"``)
    and zero padding."""
    if type(conv) is not nn.Conv2d:
        return [f"the depthwise conv is a {type(conv).__name__}, not an nn.Conv2d"]
    problems = []
    dim, k = conv.in_channels, conv.kernel_size
    if not (conv.groups == dim == conv.out_channels):
        problems.append(
            f"not depthwise (in_channels={conv.in_channels}, out_channels={conv.out_channels}, "
            f"groups={conv.groups}; need all equal)"
        )
    if k[0] != k[1]:
        problems.append(f"kernel {tuple(k)} is not square")
    else:
        problems += _ops.kernel_size_reasons(k[0])
    if tuple(conv.stride) != (1, 1):
        problems.append(f"stride {tuple(conv.stride)} (need 1)")
    if tuple(conv.dilation) != (1, 1):
        problems.append(f"dilation {tuple(conv.dilation)} (need 1)")
    padding = conv.padding
    if padding != "same" and (isinstance(padding, str) or tuple(padding) != (k[0] // 2, k[1] // 2)):
        problems.append(f"padding {padding!r} (need k // 2 = {k[0] // 2}, 'same')")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode {conv.padding_mode!r} (need 'zeros')")
    return problems


class DWConvLayerNorm(nn.Module):
    """``LayerNorm_C(depthwise_conv_kxk(x))`` of ConvNeXt's block, fused; output channels-last ``(B, H, W, C)``.

    Holds ``conv_dw`` (``nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=bias)``) and ``norm``
    (``nn.LayerNorm(dim, eps)``) under timm's ConvNeXtBlock names, so their state_dict keys read as timm's
    (``conv_dw.weight``, ``conv_dw.bias``, ``norm.weight``, ``norm.bias``). Use :meth:`from_module` to build one from
    an existing depthwise conv and LayerNorm with their weights.

    Args:
        dim: channels C.
        kernel_size: odd k in 3..13 (ConvNeXt: 7).
        eps: LayerNorm epsilon (timm's ConvNeXt: 1e-6).
        bias: whether the depthwise conv has a bias.
        out_layout: ``"nhwc"`` -> ``(B, H, W, C)`` contiguous (the input of ConvNeXt's MLP ``nn.Linear``);
            ``"nchw"`` -> the same memory viewed as ``(B, C, H, W)`` (channels_last), for timm's ``conv_mlp=True``.
        backend: force a backend (``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"``); None chooses.
        device, dtype: of the parameters.

    Shape:
        input ``(B, C, H, W)``, NCHW- or channels_last-contiguous (other strides cost one copy);
        output ``(B, H, W, C)``, or ``(B, C, H, W)`` for ``out_layout="nchw"``, in the input's dtype.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        eps: float = 1e-6,
        bias: bool = True,
        out_layout: str = "nhwc",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        check_kernel_size(kernel_size)
        if out_layout not in ("nhwc", "nchw"):
            raise ValueError(f"out_layout must be 'nhwc' or 'nchw', got {out_layout!r}")
        factory = dict(device=device, dtype=dtype)
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.out_layout = out_layout
        self.backend = backend

    @property
    def dim(self) -> int:
        return self.conv_dw.in_channels

    @property
    def kernel_size(self) -> int:
        return self.conv_dw.kernel_size[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dwconv_ln(
            x,
            self.conv_dw.weight,
            self.conv_dw.bias,
            self.norm.weight,
            self.norm.bias,
            self.norm.eps,
            self.out_layout,
            self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"kernel_size={self.kernel_size}", f"eps={self.norm.eps}"]
        if self.conv_dw.bias is None:
            parts.append("bias=False")
        parts.append(f"out_layout={self.out_layout!r}")
        if self.backend:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    @classmethod
    def from_module(
        cls, conv: nn.Module, norm: nn.Module, out_layout: str | None = None, backend: str | None = None
    ) -> DWConvLayerNorm:
        """A ``DWConvLayerNorm`` computing ``norm(conv(x))`` with copies of their weights (device, dtype and
        train/eval state of ``conv``).

        Args:
            conv: a depthwise ``nn.Conv2d``: ``groups == in_channels == out_channels``, square odd kernel 3..13,
                stride 1, padding ``k // 2`` (or ``"same"``), dilation 1, ``padding_mode="zeros"``.
            norm: a LayerNorm over the C channels: ``nn.LayerNorm(C)`` and timm's ``LayerNorm`` (after a permute
                to channels-last), timm's ``LayerNorm2d`` (on NCHW), Hugging Face's ``ConvNextLayerNorm`` (either
                ``data_format``), or anything with ``normalized_shape == (C,)``, ``eps``, ``weight``, ``bias``.
            out_layout: ``"nhwc"`` / ``"nchw"``; None: ``"nchw"`` for channels-first norms (timm ``LayerNorm2d``,
                HF ``data_format="channels_first"``, whose callers keep NCHW), else ``"nhwc"``.
            backend: as in the constructor.
        """
        if isinstance(conv, DWConvLayerNorm):
            raise TypeError("conv is already a DWConvLayerNorm; copy.deepcopy it instead")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d (depthwise), got {type(conv).__module__}.{type(conv).__name__}")
        dim = conv.in_channels
        k = conv.kernel_size
        problems = conv_reasons(conv)
        if problems:
            raise ValueError("DWConvLayerNorm.from_module: unsupported conv: " + "; ".join(problems))

        normalized_shape = getattr(norm, "normalized_shape", None)
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        eps = getattr(norm, "eps", None)
        if normalized_shape is None or eps is None or not hasattr(norm, "weight"):
            raise TypeError(
                f"norm must be a LayerNorm (normalized_shape, eps, weight, bias), got "
                f"{type(norm).__module__}.{type(norm).__name__}"
            )
        if tuple(normalized_shape) != (dim,):
            raise ValueError(
                f"norm normalizes over {tuple(normalized_shape)}, but the fused op normalizes over the conv's "
                f"{dim} channels"
            )
        ln_weight = getattr(norm, "weight", None)
        ln_bias = getattr(norm, "bias", None)
        channels_first = type(norm).__name__ in _CHANNELS_FIRST_NORMS or (
            getattr(norm, "data_format", "channels_last") == "channels_first"
        )
        if out_layout is None:
            out_layout = "nchw" if channels_first else "nhwc"

        new = cls(
            dim,
            k[0],
            float(eps),
            bias=conv.bias is not None,
            out_layout=out_layout,
            backend=backend,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        if ln_weight is None or ln_bias is None:  # LayerNorm(elementwise_affine=False) or (bias=False)
            new.norm = nn.LayerNorm(
                dim,
                eps=float(eps),
                elementwise_affine=ln_weight is not None,
                bias=ln_bias is not None,
                device=conv.weight.device,
                dtype=(ln_weight if ln_weight is not None else conv.weight).dtype,
            )
        elif ln_weight.dtype != conv.weight.dtype or ln_weight.device != conv.weight.device:
            new.norm.to(device=ln_weight.device, dtype=ln_weight.dtype)
        with torch.no_grad():
            new.conv_dw.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.conv_dw.bias.copy_(conv.bias)
            if ln_weight is not None:
                new.norm.weight.copy_(ln_weight)
            if ln_bias is not None:
                new.norm.bias.copy_(ln_bias)
        pairs = (
            (new.conv_dw.weight, conv.weight),
            (new.conv_dw.bias, conv.bias),
            (new.norm.weight, ln_weight),
            (new.norm.bias, ln_bias),
        )
        for param, src in pairs:
            if param is not None and src is not None:
                param.requires_grad_(src.requires_grad)  # frozen layers stay frozen
        new.train(conv.training)
        return new
