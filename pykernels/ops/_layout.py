"""Layout rules shared by every pykernels op (so each backend sees the same, kernel-friendly tensors).

Kernels see a tensor as B rows (dim 0 = batch): element ``r`` of sample ``b`` lives at ``ptr + b * stride(0) + r``,
``r`` running over a dense row in the tensor's own dim order - NCHW, channels-last and (B, N, C) tokens all
qualify without a copy. Outputs are ``torch.empty_like`` of such a tensor, so the fake (meta) implementations,
the compiled kernels and the Triton launchers agree on output strides.
"""

from __future__ import annotations

import torch


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """The elements fill ``numel`` consecutive slots in some dim order (size-1 dims ignored)."""
    expected = 1
    for dim in sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=t.stride):
        if t.stride(dim) != expected:
            return False
        expected *= t.shape[dim]
    return True


def is_dense_rows(t: torch.Tensor) -> bool:
    """Dense (no gaps, no overlap) with the batch dim outermost: ``empty_like(t)`` is then a row layout."""
    if t.is_contiguous():
        return True
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True
    if not is_non_overlapping_and_dense(t):
        return False
    return t.shape[0] <= 1 or t.stride(0) == t.numel() // t.shape[0]


def as_dense_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is already a dense row layout, else a contiguous copy."""
    return t if is_dense_rows(t) else t.contiguous()


def shares_row_strides(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same strides as ``ref`` on every dim but the batch dim (size-1 dims ignored): rows line up, batch stride free."""
    return t.shape == ref.shape and all(t.stride(d) == ref.stride(d) for d in range(1, t.dim()) if t.shape[d] > 1)


def conform_rows(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` if its rows line up with ``ref``'s (any batch stride, e.g. a token slice ``x[:, 1:]``), else a copy of
    ``t`` in ref's layout."""
    if shares_row_strides(t, ref):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)
