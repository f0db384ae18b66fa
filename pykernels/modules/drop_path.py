"""DropPath (stochastic depth, Huang et al. 2016) as a drop-in module for timm's ``DropPath``, torchvision's
``StochasticDepth`` and Hugging Face's ``*DropPath`` layers."""

from __future__ import annotations

import torch
from torch import nn

from pykernels import functional as F
from pykernels.ops.drop_path import check_drop_args


class DropPath(nn.Module):
    """Drop each sample's residual branch with probability ``drop_prob`` (training only).

    Drop-in for ``timm.layers.DropPath`` (same arguments, same mask under the same seed, bit-identical
    float32 output), ``torchvision.ops.StochasticDepth(p, mode)`` (``mode="batch"`` too) and Hugging Face's
    ``*DropPath`` (``rng="uniform"`` reproduces its draw). For the fused ``residual + drop_path(gamma * x)``
    use :func:`pykernels.functional.drop_path_add`.

    Args:
        drop_prob: probability of dropping a sample, in [0, 1].
        scale_by_keep: divide kept samples by ``keep_prob``.
        mode: ``"row"`` (per sample) or ``"batch"`` (whole batch), as torchvision's ``StochasticDepth``.
        rng: ``"bernoulli"`` (timm, torchvision) or ``"uniform"`` (Hugging Face, ``floor(keep_prob + rand)``).
        backend: force a backend (``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``); None chooses.

    Shape:
        input ``(B, ...)`` in any layout; output the same shape, dtype and layout.
    """

    def __init__(
        self,
        drop_prob: float = 0.0,
        scale_by_keep: bool = True,
        mode: str = "row",
        rng: str = "bernoulli",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_drop_args(drop_prob, mode, rng)
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep
        self.mode = mode
        self.rng = rng
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return F.drop_path(x, self.drop_prob, True, self.scale_by_keep, self.backend, mode=self.mode, rng=self.rng)

    def extra_repr(self) -> str:
        parts = [f"drop_prob={round(self.drop_prob, 3):0.3f}"]
        if not self.scale_by_keep:
            parts.append("scale_by_keep=False")
        if self.mode != "row":
            parts.append(f"mode={self.mode!r}")
        if self.rng != "bernoulli":
            parts.append(f"rng={self.rng!r}")
        if self.backend:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    @classmethod
    def from_module(cls, module: nn.Module) -> DropPath:
        """A pykernels ``DropPath`` that behaves like ``module`` (train mode copied too).

        Accepts timm's ``DropPath``, torchvision's ``StochasticDepth``, Hugging Face's ``*DropPath`` (their
        ``torch.rand``-based draw: ``rng="uniform"``) and other ``*DropPath`` classes with a ``drop_prob``
        attribute (the seeds' version: uniform draw unless it has timm's ``scale_by_keep``).
        """
        if isinstance(module, DropPath):
            new = cls(module.drop_prob, module.scale_by_keep, module.mode, module.rng, module.backend)
        elif type(module).__name__ == "StochasticDepth" and hasattr(module, "p") and hasattr(module, "mode"):
            new = cls(module.p, True, module.mode)
        elif type(module).__name__.endswith("DropPath") and hasattr(module, "drop_prob"):
            drop_prob = module.drop_prob if module.drop_prob is not None else 0.0
            from_timm = type(module).__module__.startswith("timm.")
            if from_timm or hasattr(module, "scale_by_keep"):
                new = cls(drop_prob, getattr(module, "scale_by_keep", True))
            else:  # transformers' and the reference implementations: floor(keep_prob + rand)
                new = cls(drop_prob, True, rng="uniform")
        else:
            raise TypeError(
                f"DropPath.from_module does not know {type(module).__module__}.{type(module).__name__}; supported: "
                "timm DropPath, torchvision StochasticDepth, Hugging Face *DropPath, "
                "classes named *DropPath with a drop_prob attribute"
            )
        new.train(module.training)
        return new
