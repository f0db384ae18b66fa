"""Pure-PyTorch implementations, one module per op stem: the ``torch`` backend (CPU fallback), the test oracle and
the benchmark baseline. Each ``<stem>.py`` holds ``<op>_fwd`` / ``<op>_bwd`` with the signatures of the compiled
kernels (csrc/ops.cpp), plus the plain differentiable formulas the tests use as oracles."""

from pykernels._dtypes import compute_dtype, promote_dtypes
from pykernels.reference.attention import attention_bwd, attention_fwd
from pykernels.reference.drop_path import (
    draw_drop_path_scale,
    drop_path,
    drop_path_add,
    drop_path_add_bwd,
    drop_path_add_fwd,
)
from pykernels.reference.dwconv_ln import dwconv_ln, dwconv_ln_bwd, dwconv_ln_fwd
from pykernels.reference.mbconv_se import mbconv_se, mbconv_se_bwd, mbconv_se_fwd
from pykernels.reference.mlp import mlp

__all__ = [
    "attention_bwd",
    "attention_fwd",
    "compute_dtype",
    "draw_drop_path_scale",
    "drop_path",
    "drop_path_add",
    "drop_path_add_bwd",
    "drop_path_add_fwd",
    "dwconv_ln",
    "dwconv_ln_bwd",
    "dwconv_ln_fwd",
    "mbconv_se",
    "mbconv_se_bwd",
    "mbconv_se_fwd",
    "mlp",
    "promote_dtypes",
]
