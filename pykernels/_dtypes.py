"""dtype rules shared by every layer (a leaf: imports torch only, so kernels may use it without depending upward)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def promote_dtypes(*tensors: torch.Tensor | None) -> torch.dtype:
    """``torch.promote_types`` over the given tensors (None entries are skipped)."""
    dtype = None
    for t in tensors:
        if t is not None:
            other = t.dtype
            if dtype is None:
                dtype = other
            elif other is not dtype:  # dtypes are singletons; promote_types costs more than the comparison
                dtype = torch.promote_types(dtype, other)
    assert dtype is not None
    return dtype


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Kernels accumulate in float32, or float64 when any operand is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).replace("torch.", "")
