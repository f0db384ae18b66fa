"""Layout and output rules shared by every pykernels op (so each backend sees the same, kernel-friendly tensors).

Kernels see a tensor as B rows (dim 0 = batch): element ``r`` of sample ``b`` lives at ``ptr + b * stride(0) + r``,
``r`` running over a dense row in the tensor's own dim order - NCHW, channels-last and (B, N, C) tokens all
qualify without a copy. Outputs are ``torch.empty_like`` of such a tensor, so the fake (meta) implementations,
the compiled kernels and the Triton launchers agree on output strides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """The elements fill ``numel`` consecutive slots in some dim order (size-1 dims ignored)."""
    expected = 1
    shape, strides = t.shape, t.stride()  # read once: each read is a call into C
    for dim in sorted((d for d in range(len(shape)) if shape[d] != 1), key=strides.__getitem__):
        if strides[dim] != expected:
            return False
        expected *= shape[dim]
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
    return t if t.is_contiguous() or is_dense_rows(t) else t.contiguous()  # the first test: the common case, cheaper


def shares_row_strides(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same strides as ``ref`` on every dim but the batch dim (size-1 dims ignored): rows line up, batch stride free."""
    return t.shape == ref.shape and all(t.stride(d) == ref.stride(d) for d in range(1, t.dim()) if t.shape[d] > 1)


def conform_rows(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` if its rows line up with ``ref``'s (any batch stride, e.g. a token slice ``x[:, 1:]``), else a copy of
    ``t`` in ref's layout."""
    if t.stride() == ref.stride() and t.shape == ref.shape or shares_row_strides(t, ref):  # the first test is cheaper
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def distinct(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    """``outputs`` with each one that shares storage with an input or an earlier output, or is a slice of a larger
    buffer, cloned: custom-op outputs may not alias, and their strides / offsets must match the fake's. A launcher
    may hand back views of one buffer (e.g. three (C,) sums of one (3, C) tensor); for kernels that keep the contract
    this is a no-op."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    seen_empty = {id(t) for t in inputs if t is not None and not t.numel()}
    result = []
    for t in outputs:
        if not t.numel():  # a (0,) placeholder handed out twice (e.g. ``[empty] * 4``) is an alias too
            if id(t) in seen_empty:
                t = t.new_empty(t.shape)
            seen_empty.add(id(t))
        else:
            ptr = t.untyped_storage().data_ptr()
            part_of_a_buffer = t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size()
            if ptr in seen or part_of_a_buffer:
                t = t.clone(memory_format=torch.preserve_format)
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        result.append(t)
    return tuple(result)
