"""Test cases that run inside the sanitized emulator process (see emu.py): the emulated CUDA ops of csrc/cuda against
the pure-PyTorch reference (pykernels.reference), and probes of the emulator itself.

Every function returns a JSON-able dict; ``run_case(name)`` returns ``{"ok": bool, "detail": str}``.
Comparison rules: outputs computed elementwise (the forward, grad_branch) must be bit-identical to the reference
(same operation order, one rounding each: __fmul_rn / __fadd_rn); grad_gamma (a reduction in another order) must be
within 1e-5 (float32 accumulation) or 1e-12 (float64) of the float64 oracle, relative to the sum of |terms| of its
channel; outputs also keep the reference's dtype, shape and strides.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pykernels import reference  # noqa: E402

SO_PATH = ""  # set by emu.py's server
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = {"f16": F16, "bf16": BF16, "f32": F32, "f64": F64}


# ---- inputs -----------------------------------------------------------------------------------------------------


def make_branch(layout: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator):
    """(tensor, channel_dim) in one of the layouts the kernels read.

    nchw (B, C, H, W) contiguous; nhwc: the same, channels_last; tokens (B, N, C); view: x[:, 1:] of a (B, N + 1, C)
    tensor (a ViT token view: batch stride (N + 1) * C, data pointer C elements in).
    """

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=F64).to(dtype)

    if layout == "nchw":
        return rand(*shape), 1
    if layout == "nhwc":
        return rand(*shape).contiguous(memory_format=torch.channels_last), 1
    if layout == "tokens":
        return rand(*shape), 2
    if layout == "view":
        b, n, c = shape
        return rand(b, n + 1, c)[:, 1:], 2
    raise ValueError(layout)


def like(t: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A random tensor with t's shape and strides (token views stay views)."""
    if t.dim() == 3 and not t.is_contiguous():  # a token view: make another view of a bigger buffer
        b, n, c = t.shape
        return torch.randn(b, n + 1, c, generator=gen, dtype=F64).to(dtype)[:, 1:]
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype).copy_(torch.randn(t.shape, generator=gen, dtype=F64))


def make_scale(batch: int, dtype: torch.dtype) -> torch.Tensor:
    """DropPath multipliers: sample 1 dropped (0), the others kept (1 / 0.8)."""
    scale = torch.full((batch,), 1 / 0.8, dtype=F64)
    scale[1::3] = 0.0
    return scale.to(dtype)


def make_gamma(channels: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(channels, generator=gen, dtype=F64) + 0.5).to(dtype)


# ---- comparisons ------------------------------------------------------------------------------------------------


def same_bits(name: str, got: torch.Tensor, want: torch.Tensor) -> list[str]:
    if got.dtype != want.dtype or got.shape != want.shape:
        return [f"{name}: got {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}"]
    problems = []
    if got.numel() and got.stride() != want.stride():
        problems.append(f"{name}: strides {got.stride()}, want {want.stride()}")
    bad = got.view(-1) if got.is_contiguous() else got.reshape(-1)
    ref = want.reshape(-1)
    diff = ~((bad == ref) | (bad.isnan() & ref.isnan()))
    if diff.any():
        i = int(diff.nonzero()[0])
        problems.append(
            f"{name}: {int(diff.sum())} of {diff.numel()} elements differ (first at flat {i}: {bad[i].item()!r} "
            f"vs {ref[i].item()!r}; max |diff| {(bad.double() - ref.double()).abs().max().item():.3g})"
        )
    return problems


def close_to_oracle(name, got, want64, abs_sum, accumulate: torch.dtype) -> list[str]:
    rel = 1e-12 if accumulate == F64 else 1e-5
    # the result is rounded to gamma's dtype at the end: allow that rounding too
    rounding = torch.finfo(got.dtype).eps * want64.abs() if got.dtype != F64 else 0
    tol = rel * abs_sum + rounding + 1e-30
    err = (got.double() - want64).abs()
    if got.dtype != want64.dtype and got.shape != want64.shape:
        return [f"{name}: shape {tuple(got.shape)}, want {tuple(want64.shape)}"]
    if (err > tol).any() or err.isnan().any():
        c = int((err / tol).nan_to_num(float("inf")).argmax())
        return [f"{name}: channel {c}: {got[c].item()!r} vs oracle {want64[c].item()!r} (tol {tol[c].item():.3g})"]
    return []


# ---- the op cases -----------------------------------------------------------------------------------------------


def fwd_case(layout, shape, dtypes, residual=True, scale=True, gamma=True, out_dtype=None, seed=0) -> list[str]:
    """pykernels_emu.drop_path_add_fwd vs reference.drop_path_add_fwd, bit for bit.

    dtypes: (branch, residual, gamma/scale) as keys of DTYPES.
    """
    gen = torch.Generator().manual_seed(seed)
    branch_dt, residual_dt, param_dt = (DTYPES[d] for d in dtypes)
    branch, channel_dim = make_branch(layout, shape, branch_dt, gen)
    res = like(branch, residual_dt, gen) if residual else None
    # scale in the compute dtype of the call (a float64 scale alone would make the kernel accumulate in float64)
    compute = reference.compute_dtype(branch_dt, residual_dt if residual else branch_dt, param_dt)
    sc = make_scale(branch.shape[0], compute) if scale else None
    gm = make_gamma(branch.shape[channel_dim], param_dt, gen) if gamma else None
    out_dt = DTYPES[out_dtype] if out_dtype else None
    got = torch.ops.pykernels_emu.drop_path_add_fwd(res, branch, sc, gm, channel_dim, out_dt)
    want = reference.drop_path_add_fwd(res, branch, sc, gm, channel_dim, out_dt)
    return same_bits("out", got, want)


def bwd_case(layout, shape, dtypes, scale=True, need_grad_branch=True, seed=0) -> list[str]:
    """pykernels_emu.drop_path_add_bwd vs the reference: grad_branch bit for bit, grad_gamma vs the float64 oracle.

    dtypes: (grad_out, branch, gamma/scale).
    """
    gen = torch.Generator().manual_seed(seed)
    grad_dt, branch_dt, param_dt = (DTYPES[d] for d in dtypes)
    branch, channel_dim = make_branch(layout, shape, branch_dt, gen)
    grad = like(branch, grad_dt, gen)
    compute = reference.compute_dtype(grad_dt, branch_dt, param_dt)
    sc = make_scale(branch.shape[0], compute) if scale else None
    gm = make_gamma(branch.shape[channel_dim], param_dt, gen)
    got_gb, got_gg = torch.ops.pykernels_emu.drop_path_add_bwd(grad, branch, sc, gm, channel_dim, need_grad_branch)
    want_gb, _ = reference.drop_path_add_bwd(grad, branch, sc, gm, channel_dim, need_grad_branch)
    sc64 = sc.double() if sc is not None else None
    _, want_gg64 = reference.drop_path_add_bwd(grad.double(), branch.double(), sc64, gm.double(), channel_dim, False)
    terms = grad.double() * branch.double()
    if sc64 is not None:
        terms = terms * sc64.reshape([-1] + [1] * (grad.dim() - 1))
    abs_sum = terms.abs().sum([d for d in range(grad.dim()) if d != channel_dim])
    problems = same_bits("grad_branch", got_gb, want_gb)
    if got_gg.dtype != gm.dtype or got_gg.shape != gm.shape:
        problems.append(f"grad_gamma: {got_gg.dtype} {tuple(got_gg.shape)}, want {gm.dtype} {tuple(gm.shape)}")
    else:
        problems += close_to_oracle("grad_gamma", got_gg, want_gg64, abs_sum, compute)
    return problems


# Shapes: partial blocks and warps of work (odd R = 507, 15, 11 * 13 * 3), C = 3 / 200, H = W = 13, B = 1, 197
# tokens; nchw / nhwc / tokens / token views (aligned and not: the vectorized and the scalar kernels).
SHAPES = {
    "nchw": [(2, 3, 13, 13), (1, 200, 7, 7), (3, 8, 16, 16)],
    "nhwc": [(2, 3, 13, 13), (2, 200, 5, 5), (1, 8, 4, 4)],
    "tokens": [(2, 197, 200), (1, 5, 3), (3, 11, 13)],
    "view": [(2, 197, 24), (2, 9, 30)],
}


def _cases() -> dict[str, tuple]:
    cases: dict[str, tuple] = {}
    # forward, every optional-argument combination (float32, and with an explicit out_dtype)
    for res, sc, gm in itertools.product((True, False), repeat=3):
        name = f"res{int(res)}-scale{int(sc)}-gamma{int(gm)}"
        cases[f"fwd/options/{name}"] = (fwd_case, "nchw", (2, 3, 13, 13), ("f32",) * 3, res, sc, gm)
        cases[f"fwd/options/{name}/view-f16"] = (fwd_case, "view", (2, 9, 30), ("f16",) * 3, res, sc, gm)
    cases["fwd/options/out_dtype-f16"] = (fwd_case, "tokens", (2, 197, 200), ("f32",) * 3, True, True, True, "f16")
    cases["fwd/options/out_dtype-f32"] = (fwd_case, "nhwc", (2, 3, 13, 13), ("bf16",) * 3, True, True, True, "f32")
    # forward, layouts x shapes x dtypes
    for layout, shapes in SHAPES.items():
        for shape in shapes:
            for dt in ("f32", "f16", "bf16", "f64"):
                label = "x".join(map(str, shape))
                cases[f"fwd/{layout}/{label}/{dt}"] = (fwd_case, layout, shape, (dt,) * 3)
    # forward, mixed dtypes: bf16 branch + f16 residual + f32 gamma (out f32); f16 branch + f32 residual -> f16 out
    cases["fwd/mixed/bf16-f16-f32"] = (fwd_case, "nchw", (2, 3, 13, 13), ("bf16", "f16", "f32"))
    cases["fwd/mixed/f16-f32-f16/out-f16"] = (
        fwd_case,
        "tokens",
        (3, 11, 13),
        ("f16", "f32", "f16"),
        True,
        True,
        True,
        "f16",
    )
    cases["fwd/mixed/f32-bf16-bf16"] = (fwd_case, "view", (2, 9, 30), ("f32", "bf16", "bf16"))
    # backward: nchw = channels outer (block reduction with warp shuffles), nhwc / tokens / views = channels inner
    for layout, shapes in SHAPES.items():
        for shape in shapes:
            label = "x".join(map(str, shape))
            for dt in ("f32", "bf16", "f64"):
                for need in (True, False):
                    if need is False and dt != "f32":
                        continue
                    cases[f"bwd/{layout}/{label}/{dt}/grad_branch{int(need)}"] = (
                        bwd_case,
                        layout,
                        shape,
                        (dt,) * 3,
                        True,
                        need,
                    )
    cases["bwd/nchw/2x3x13x13/f16/no-scale"] = (bwd_case, "nchw", (2, 3, 13, 13), ("f16",) * 3, False)
    cases["bwd/tokens/2x197x200/f16/no-scale"] = (bwd_case, "tokens", (2, 197, 200), ("f16",) * 3, False)
    cases["bwd/mixed/nchw/f16-bf16-f32"] = (bwd_case, "nchw", (3, 8, 16, 16), ("f16", "bf16", "f32"))
    cases["bwd/mixed/view/bf16-f32-f16"] = (bwd_case, "view", (2, 9, 30), ("bf16", "f32", "f16"))
    return cases


CASES = _cases()


def run_case(name: str) -> dict:
    function, *args = CASES[name]
    problems = function(*args)
    return {"ok": not problems, "detail": "; ".join(problems)}


def run_all(prefix: str = "") -> dict:
    """Every case whose name starts with prefix: {name: problems} of the failing ones."""
    failures = {}
    for name, (function, *args) in CASES.items():
        if name.startswith(prefix):
            problems = function(*args)
            if problems:
                failures[name] = problems
    return {"ran": sum(n.startswith(prefix) for n in CASES), "failures": failures}


# ---- probes of the emulator --------------------------------------------------------------------------------------


def launched_kernels() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import emu

    return emu.launched_kernels(SO_PATH)


def collective(op: int, arg: int, width: int, mask: int, threads: int) -> dict:
    return {"out": torch.ops.pykernels_emu.emu_collective(op, arg, width, mask, threads).tolist()}


def block_reverse(blocks: int, threads: int, smem_elems: int) -> dict:
    x = torch.arange(blocks * threads, dtype=F32).reshape(blocks, threads)
    out = torch.ops.pykernels_emu.emu_block_reverse(x, smem_elems)
    return {"ok": torch.equal(out, x.flip(1))}


def smem_poison(blocks: int, threads: int) -> dict:
    return {"out": torch.ops.pykernels_emu.emu_smem_poison(blocks, threads).isnan().all(1).tolist()}


def histogram(n: int, bins: int) -> dict:
    idx = (torch.arange(n) * 7) % bins
    got = torch.ops.pykernels_emu.emu_histogram(idx, bins)
    return {"ok": torch.equal(got, torch.bincount(idx, minlength=bins).int())}


def misuse(kind: int) -> dict:
    try:
        torch.ops.pykernels_emu.emu_misuse(kind)
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0]}
    return {"error": None}


def set_env(name: str, value: str | None) -> dict:
    """Sets (None: removes) an environment variable of the emulator process (CUDA_EMU_PLANT, CUDA_EMU_ORDER)."""
    import os

    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    return {}


def run_fwd_with_bad_launch() -> dict:
    """A launch that names a too-large block is refused like cudaErrorInvalidConfiguration."""
    try:
        torch.ops.pykernels_emu.emu_collective(0, 0, 32, 0xFFFFFFFF, 2048)
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0]}
    return {"error": None}
