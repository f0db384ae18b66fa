"""Constants and launcher helpers shared by the Triton kernel modules of this package (no kernels here).

``LOG2E`` is a module-level ``tl.constexpr`` global: the only kind of global variable a ``@triton.jit`` function may
read (Triton 3.6 - 3.8 reject any other). It must be built as ``tl.constexpr(value)``: an annotation
``LOG2E: tl.constexpr = value`` leaves a plain float, which a kernel cannot read. Inside a kernel it acts as the float
literal would (``x * LOG2E`` gives the IR of ``x * 1.4426950408889634``), under ``TRITON_INTERPRET=1`` too.
"""

from __future__ import annotations

import torch
import triton.language as tl

MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E); the attention softmax runs in base 2
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * LN2


def interpreting(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` runs under the Triton interpreter: CPU tensors (the backends allow ``triton`` on CPU
    only with ``TRITON_INTERPRET=1``). The launchers pick bigger tiles there: fewer, larger numpy programs."""
    return t.device.type == "cpu"
