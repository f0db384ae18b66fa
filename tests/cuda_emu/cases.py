"""Test cases that run inside the sanitized emulator process (see emu.py): the emulated CUDA ops of csrc/cuda against
the pure-PyTorch reference (pykernels.reference), and probes of the emulator itself.

Every function returns a JSON-able dict; ``run_case(name)`` returns ``{"ok": bool, "detail": str}``.
Comparison rules: outputs computed elementwise (the forward, grad_branch) must be bit-identical to the reference
(same operation order, one rounding each: __fmul_rn / __fadd_rn); grad_gamma (a reduction in another order) must be
within 1e-5 (float32 accumulation) or 1e-12 (float64) of the float64 oracle, relative to the sum of |terms| of its
channel; outputs also keep the reference's dtype, shape and strides.
"""

from __future__ import annotations

import importlib
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


# ---- dwconv_ln: depthwise k x k conv + LayerNorm over channels (csrc/cuda/dwconv_ln.cu) ------------------------------
# Every output is compared with the float64 oracle (pykernels.reference in float64, on the same rounded inputs). The
# kernels accumulate in float32 (float64 for float64 x) in another order than the oracle, so each element may be off
# by DW_REL (1e-5 float32, 1e-12 float64) times a bound of its sum of |terms| (below), plus half an ulp of its dtype
# for the final rounding (grad_x and grad_weight of fp16 / bf16 x: plus half an ulp of x's dtype times the same bound,
# the rounding of the dy workspace, stored in x's dtype); dtypes, shapes and strides must be the torch backend's
# (reference.dwconv_ln_fwd / _bwd).


def _dw_rel(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == F64 else 1e-5


def make_dw_inputs(layout, shape, k, dtype, param_dtype, params, gen):
    """x (B, C, H, W) NCHW or channels_last, weight (C, 1, k, k), conv_bias / ln_weight / ln_bias (or None)."""
    b, c, h, w = shape
    x = torch.randn(b, c, h, w, generator=gen, dtype=F64).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, k, k, generator=gen, dtype=F64) / k).to(param_dtype)
    conv_bias = (0.5 * torch.randn(c, generator=gen, dtype=F64)).to(param_dtype) if params else None
    ln_weight = (torch.rand(c, generator=gen, dtype=F64) + 0.5).to(param_dtype) if params else None
    ln_bias = (0.3 * torch.randn(c, generator=gen, dtype=F64)).to(param_dtype) if params else None
    return x, weight, conv_bias, ln_weight, ln_bias


def _f64(t):
    return None if t is None else t.double()


def _structure(name, got, want) -> list[str]:
    """Same dtype, shape and memory layout (strides of the dims of size > 1; none for an empty tensor)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return [f"{name}: got {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}"]
    dims = [d for d in range(got.dim()) if got.shape[d] > 1] if got.numel() else []
    if [got.stride(d) for d in dims] != [want.stride(d) for d in dims]:
        return [f"{name}: strides {got.stride()}, want {want.stride()}"]
    return []


def _within(name, got, want64, bound, rel) -> list[str]:
    """|got - want64| <= rel * bound + half an ulp of got's dtype (its final rounding)."""
    rounding = 0.5 * torch.finfo(got.dtype).eps * want64.abs() if got.dtype != F64 else 0.0
    tol = rel * bound + rounding + 1e-300
    err = (got.double() - want64).abs()
    bad = (err > tol) | err.isnan()
    if bad.any():
        i = int((err / tol).nan_to_num(float("inf")).reshape(-1).argmax())
        g, w, t = got.double().reshape(-1)[i].item(), want64.reshape(-1)[i].item(), tol.reshape(-1)[i].item()
        worst = (err / tol).nan_to_num(float("inf")).max().item()
        return [
            f"{name}: {int(bad.sum())} of {bad.numel()} off (flat {i}: {g!r} vs oracle {w!r}, tol {t:.3g}; "
            f"worst err/tol {worst:.3g})"
        ]
    return []


def _conv_abs(x64, weight64, conv_bias64):
    """(B, H, W, C) sum of |terms| of y = conv(x) + conv_bias."""
    k = weight64.shape[-1]
    y = torch.nn.functional.conv2d(x64.abs(), weight64.abs(), None, padding=k // 2, groups=x64.shape[1])
    y = y.permute(0, 2, 3, 1)
    return y + conv_bias64.abs() if conv_bias64 is not None else y


def dwconv_fwd_case(layout, shape, k, dt, param_dt=None, params=True, eps=1e-6, seed=0) -> list[str]:
    """pykernels_emu.dwconv_ln_fwd vs the float64 oracle: out, mean, rstd."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dt]
    x, weight, cb, lw, lb = make_dw_inputs(layout, shape, k, dtype, DTYPES[param_dt or dt], params, gen)
    got = torch.ops.pykernels_emu.dwconv_ln_fwd(x, weight, cb, lw, lb, eps)
    want = reference.dwconv_ln_fwd(x, weight, cb, lw, lb, eps)
    problems = []
    for name, g, w in zip(("out", "mean", "rstd"), got, want, strict=True):
        problems += _structure(name, g, w)
    if problems:
        return problems
    x64, w64, cb64, lw64, lb64 = (_f64(t) for t in (x, weight, cb, lw, lb))
    out64, mean64, rstd64 = reference.dwconv_ln(x64, w64, cb64, lw64, lb64, eps, F64)
    rel = _dw_rel(dtype)
    scale = _conv_abs(x64, w64, cb64).amax(-1)  # (B, H, W): bounds the error of y, mean and var
    xhat64 = (out64 - (lb64 if lb64 is not None else 0)) / (lw64 if lw64 is not None else 1)
    lw_abs = lw64.abs() if lw64 is not None else 1.0
    bound = lw_abs * (xhat64.abs() + 4 * rstd64[..., None] * scale[..., None])
    if lb64 is not None:
        bound = bound + lb64.abs()
    problems += _within("out", got[0], out64, bound, rel)
    problems += _within("mean", got[1], mean64, 4 * scale, rel)
    problems += _within("rstd", got[2], rstd64, rstd64 * (1 + 4 * scale * rstd64), rel)
    return problems


def dwconv_bwd_case(
    layout,
    shape,
    k,
    dt,
    param_dt=None,
    params=True,
    need_grad_x=True,
    need_grad_params=True,
    grad_dt=None,
    eps=1e-6,
    seed=0,
) -> list[str]:
    """pykernels_emu.dwconv_ln_bwd vs the float64 oracle: reference.dwconv_ln_bwd in float64, same mean / rstd."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dt]
    x, weight, cb, lw, lb = make_dw_inputs(layout, shape, k, dtype, DTYPES[param_dt or dt], params, gen)
    x64, w64, cb64, lw64, lb64 = (_f64(t) for t in (x, weight, cb, lw, lb))
    _, mean64, rstd64 = reference.dwconv_ln(x64, w64, cb64, lw64, lb64, eps, F64)
    stats = reference.compute_dtype(dtype)
    mean, rstd = mean64.to(stats), rstd64.to(stats)  # what the forward saved
    b, c, h, w = shape
    grad = torch.randn(b, h, w, c, generator=gen, dtype=F64).to(DTYPES[grad_dt or dt])
    got = torch.ops.pykernels_emu.dwconv_ln_bwd(grad, x, weight, cb, lw, lb, mean, rstd, need_grad_x, need_grad_params)
    want = reference.dwconv_ln_bwd(grad, x, weight, cb, lw, lb, mean, rstd, need_grad_x, need_grad_params)
    names = ("grad_x", "grad_weight", "grad_conv_bias", "grad_ln_weight", "grad_ln_bias")
    problems = []
    for name, g, wnt in zip(names, got, want, strict=True):
        problems += _structure(name, g, wnt)
    if problems:
        return problems
    mean_s, rstd_s = mean.double(), rstd.double()
    want64 = reference.dwconv_ln_bwd(
        grad.double(), x64, w64, cb64, lw64, lb64, mean_s, rstd_s, need_grad_x, need_grad_params
    )
    # Magnitude bounds: X >= |xhat| + its sensitivity to y's error; D bounds the terms of dy.
    rel = _dw_rel(dtype)
    scale = _conv_abs(x64, w64, cb64).amax(-1, keepdim=True)
    y64 = torch.nn.functional.conv2d(x64, w64, cb64, padding=k // 2, groups=c).permute(0, 2, 3, 1)
    rs = rstd_s[..., None]
    xhat = (y64 - mean_s[..., None]) * rs
    big_x = xhat.abs() + 4 * rs * scale
    g64 = grad.double()
    gw = (g64 * lw64).abs() if lw64 is not None else g64.abs()
    big_d = rs * (gw + gw.mean(-1, keepdim=True) + big_x * (gw * big_x).mean(-1, keepdim=True))
    big_d_nchw = big_d.permute(0, 3, 1, 2)
    # dy is stored in x's dtype between the kernels (fp16 / bf16: one rounding, half an ulp of each dy term)
    rel_dy = rel + (0.5 * torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0)
    if need_grad_x:
        bound = torch.nn.functional.conv_transpose2d(big_d_nchw, w64.abs(), padding=k // 2, groups=c)
        problems += _within("grad_x", got[0], want64[0], bound, rel_dy)
    if need_grad_params:
        bound_w = torch.nn.grad.conv2d_weight(x64.abs(), w64.shape, big_d_nchw, padding=k // 2, groups=c)
        problems += _within("grad_weight", got[1], want64[1], bound_w, rel_dy)
        bounds = (big_d.sum((0, 1, 2)), (g64.abs() * big_x).sum((0, 1, 2)), g64.abs().sum((0, 1, 2)))
        for i, bound in enumerate(bounds, start=2):
            if got[i].numel():
                problems += _within(names[i], got[i], want64[i], bound, rel)
    return problems


# (layout, (B, C, H, W), k, dtypes): C = 3 (one partial chunk of 32 channels), 40 (two chunks), 200 (7 chunks, the
# last partial), 2048 (64 chunks: the widest ConvNeXt, the tile shrinks); H = W = 1 / 5 / 7 / 13; W = 20 (two tiles
# of 16 per row, the second partial); odd W (the last pixel group of a thread is partial); B = 1 / 2; k = 3 / 5 / 7 /
# 13 (the halo is wider than the image; with k = 13 the float32 kernels opt in to more than 48 KB of dynamic shared
# memory). Small on purpose: the emulator runs one host thread per CUDA thread.
DW_GRID = [
    ("nchw", (2, 3, 7, 7), 3, ("f32", "f16", "bf16", "f64")),
    ("nhwc", (2, 3, 7, 7), 3, ("f32", "bf16", "f64")),
    ("nchw", (1, 200, 5, 5), 7, ("f32",)),
    ("nhwc", (1, 200, 5, 5), 7, ("bf16",)),
    ("nchw", (1, 40, 13, 13), 13, ("f32",)),
    ("nhwc", (1, 40, 13, 13), 13, ("f16",)),
    ("nchw", (1, 8, 1, 1), 3, ("f32",)),
    ("nhwc", (2, 5, 1, 1), 13, ("f32", "f16")),
    ("nchw", (1, 6, 3, 20), 5, ("f32",)),
    ("nhwc", (1, 6, 3, 20), 5, ("f64",)),
    ("nchw", (1, 2048, 1, 1), 3, ("bf16",)),
    ("nhwc", (2, 1, 5, 4), 3, ("f32",)),  # C = 1: LayerNorm of one value (out = ln_bias), both layouts at once
    ("nchw", (0, 4, 3, 3), 3, ("f32",)),  # no pixels: empty outputs, zero parameter grads
]


def _dw_label(shape, k):
    return "x".join(map(str, shape)) + f"/k{k}"


def _dw_cases() -> dict[str, tuple]:
    cases: dict[str, tuple] = {}
    for layout, shape, k, dts in DW_GRID:
        for dt in dts:
            label = f"{layout}/{_dw_label(shape, k)}/{dt}"
            cases[f"dwconv_fwd/{label}"] = (dwconv_fwd_case, layout, shape, k, dt)
            cases[f"dwconv_bwd/{label}"] = (dwconv_bwd_case, layout, shape, k, dt)
    small = ((2, 3, 7, 7), 3)
    for layout in ("nchw", "nhwc"):
        lbl = f"{layout}/{_dw_label(*small)}"
        # parameters in float32 for reduced x; no parameters at all
        cases[f"dwconv_fwd/{lbl}/f16-params-f32"] = (dwconv_fwd_case, layout, *small, "f16", "f32")
        cases[f"dwconv_bwd/{lbl}/bf16-params-f32"] = (dwconv_bwd_case, layout, *small, "bf16", "f32")
        cases[f"dwconv_fwd/{lbl}/f32/no-params"] = (dwconv_fwd_case, layout, *small, "f32", None, False)
        cases[f"dwconv_bwd/{lbl}/f32/no-params"] = (dwconv_bwd_case, layout, *small, "f32", None, False)
        # need_grad_x / need_grad_params (both True: the grid above)
        for gx, gp in ((True, False), (False, True), (False, False)):
            cases[f"dwconv_bwd/{lbl}/f32/grad_x{int(gx)}-params{int(gp)}"] = (
                dwconv_bwd_case,
                layout,
                *small,
                "f32",
                None,
                True,
                gx,
                gp,
            )
    # grad_out in another dtype than x (the launcher converts it to float32)
    lbl = _dw_label(*small)
    for layout, dt, grad_dt in (("nchw", "f16", "f32"), ("nhwc", "f32", "bf16")):
        cases[f"dwconv_bwd/{layout}/{lbl}/{dt}-grad-{grad_dt}"] = (
            dwconv_bwd_case,
            layout,
            *small,
            dt,
            None,
            True,
            True,
            True,
            grad_dt,
        )
    # the widest C with the largest k: the tile shrinks to fit the shared memory
    cases["dwconv_fwd/nchw/1x2048x1x4/k13/bf16"] = (dwconv_fwd_case, "nchw", (1, 2048, 1, 4), 13, "bf16")
    return cases


CASES.update(_dw_cases())


# ---- mbconv_se: depthwise k x k conv (stride 1 / 2) + BatchNorm + activation + SE squeeze (csrc/cuda/mbconv_se.cu) ---
# Every output is compared with the float64 oracle (pykernels.reference.mbconv_se in float64 on the same rounded
# inputs; the backward: reference.mbconv_se_bwd in float64 with the same statistics). The kernels accumulate in
# float32 in another order, so each element may be off by MB_REL = 1e-5 times an error bound propagated through the
# computation (below: a sum of |terms| per accumulation; the statistics', BatchNorm's and act's sensitivities), plus
# half an ulp of its dtype for the final rounding; dtypes, shapes and strides must be the torch backend's
# (reference.mbconv_se_fwd / _bwd). bn_weight is drawn in [0.5, 3) so that y reaches relu6's upper clamp and both
# hardswish bends.

_mb = importlib.import_module("pykernels.reference.mbconv_se")  # the module (reference.mbconv_se is its function)

MB_REL = 1e-5
MB_ROUND = 0.1  # a few float32 roundings (exp, rsqrt, products), in units of MB_REL
MB_ACT_SLOPE = 1.5  # max |act'| (hardswish: 1.5 at y = 3)
MB_ACT_CURVE = 0.5  # max |act''| away from the kinks (silu: 0.5 at 0; hardswish: 1/3)


def mb_geometry(h, w, k, stride, pads):
    """(pad_t, pad_l, out_h, out_w) of pads = (top, bottom, left, right)."""
    pad_t, pad_b, pad_l, pad_r = pads
    return pad_t, pad_l, (h + pad_t + pad_b - k) // stride + 1, (w + pad_l + pad_r - k) // stride + 1


def make_mb_inputs(layout, shape, k, dtype, param_dtype, params, running, gen):
    """x (B, C, H, W) NCHW or channels_last, weight (C, 1, k, k), conv_bias / bn_weight / bn_bias and running_mean /
    running_var (or None)."""
    b, c, h, w = shape
    x = torch.randn(b, c, h, w, generator=gen, dtype=F64).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)

    def param(t):
        return t.to(param_dtype)

    weight = param(torch.randn(c, 1, k, k, generator=gen, dtype=F64) / k)
    conv_bias = param(0.5 * torch.randn(c, generator=gen, dtype=F64)) if params else None
    bn_weight = param(2.5 * torch.rand(c, generator=gen, dtype=F64) + 0.5) if params else None
    bn_bias = param(0.5 * torch.randn(c, generator=gen, dtype=F64)) if params else None
    running_mean = param(0.3 * torch.randn(c, generator=gen, dtype=F64)) if running else None
    running_var = param(torch.rand(c, generator=gen, dtype=F64) + 0.5) if running else None
    return x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var


def _chan(t):
    """(C,) -> (1, C, 1, 1)."""
    return t[None, :, None, None]


def _mb_forward_terms(x64, w64, cb64, bw64, bb64, mean64, var64, eps, conv_args, batch_stats, var_err):
    """The forward's float64 intermediates (B, C, out_h, out_w) and bounds of their errors in units of MB_REL:
    y0 (off by A = its sum of |terms|), mean (batch: by mean(A + |y0|)), xhat, y. var_err: var's error bound."""
    y0 = _mb._conv(x64, w64, cb64, *conv_args, F64)
    cb_abs = cb64.abs() if cb64 is not None else None
    a = _mb._conv(x64.abs(), w64.abs(), cb_abs, *conv_args, F64)
    mean_err = _chan((a + y0.abs()).mean((0, 2, 3))) if batch_stats else 0.0
    rstd = _chan(torch.rsqrt(var64 + eps))
    xhat = (y0 - _chan(mean64)) * rstd
    x_err = rstd * (a + mean_err) + xhat.abs() * (MB_ROUND + 0.5 * _chan(var_err) / (_chan(var64) + eps))
    gamma = _chan(bw64) if bw64 is not None else torch.ones_like(rstd)
    beta = _chan(bb64) if bb64 is not None else torch.zeros_like(rstd)
    y = xhat * gamma + beta
    y_err = gamma.abs() * x_err + MB_ROUND * ((xhat * gamma).abs() + beta.abs())
    return {
        "y0": y0,
        "a": a,
        "mean_err": mean_err,
        "rstd": rstd,
        "xhat": xhat,
        "x_err": x_err,
        "gamma": gamma,
        "y": y,
        "y_err": y_err,
    }


def mbconv_fwd_case(
    layout,
    shape,
    k,
    stride,
    pads,
    dt,
    act="silu",
    batch_stats=True,
    param_dt=None,
    params=True,
    running=None,
    eps=1e-3,
    seed=0,
) -> list[str]:
    """pykernels_emu.mbconv_se_fwd vs the float64 oracle: out, pooled, mean, var. running: pass running statistics
    (default: unless batch_stats; with batch_stats they are ignored)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dt]
    running = not batch_stats if running is None else running
    inputs = make_mb_inputs(layout, shape, k, dtype, DTYPES[param_dt or dt], params, running, gen)
    b, c, h, w = shape
    pad_t, pad_l, out_h, out_w = mb_geometry(h, w, k, stride, pads)
    args = (eps, stride, pad_t, pad_l, out_h, out_w, act, batch_stats)
    got = torch.ops.pykernels_emu.mbconv_se_fwd(*inputs, *args)
    want = reference.mbconv_se_fwd(*inputs, *args)
    names = ("out", "pooled", "mean", "var")
    problems = []
    for name, g, wnt in zip(names, got, want, strict=True):
        problems += _structure(name, g, wnt)
    if problems or b == 0:
        if b == 0 and batch_stats and not (got[2].isnan().all() and got[3].isnan().all()):
            problems.append(f"empty batch: mean / var {got[2].tolist()} / {got[3].tolist()}, want NaN (torch's)")
        return problems
    x64, w64, cb64, bw64, bb64, rm64, rv64 = (_f64(t) for t in inputs)
    out64, pooled64, mean64, var64 = _mb.mbconv_se(x64, w64, cb64, bw64, bb64, rm64, rv64, *args, dtype=F64)
    conv_args = (stride, pad_t, pad_l, out_h, out_w)
    var_err = torch.zeros_like(var64)
    if batch_stats:
        t = _mb_forward_terms(x64, w64, cb64, bw64, bb64, mean64, var64, eps, conv_args, True, var_err)
        dev = (t["y0"] - _chan(mean64)).abs()
        var_err = 2 * (dev * (t["a"] + t["mean_err"])).mean((0, 2, 3)) + var64
        problems += _within("mean", got[2], mean64, t["mean_err"].reshape(-1), MB_REL)
        problems += _within("var", got[3], var64, var_err, MB_REL)
    t = _mb_forward_terms(x64, w64, cb64, bw64, bb64, mean64, var64, eps, conv_args, batch_stats, var_err)
    z_abs = out64.permute(0, 3, 1, 2).abs()
    z_err = MB_ACT_SLOPE * t["y_err"] + MB_ROUND * z_abs
    problems += _within("out", got[0], out64, z_err.permute(0, 2, 3, 1), MB_REL)
    problems += _within("pooled", got[1], pooled64, (z_err + z_abs).sum((2, 3)), MB_REL)
    return problems


def _mb_transposed(d, w_abs, x_shape, k, stride, pad_t, pad_l):
    """The transposed strided conv of d (B, C, out_h, out_w) with w_abs, cropped to x's (H, W): as the reference."""
    batch, channels, height, width = x_shape
    out_h, out_w = d.shape[2], d.shape[3]
    rows, cols = (out_h - 1) * stride + k, (out_w - 1) * stride + k
    full = torch.nn.grad.conv2d_input((batch, channels, rows, cols), w_abs, d, stride=stride, groups=channels)
    return torch.nn.functional.pad(full, (-pad_l, width + pad_l - cols, -pad_t, height + pad_t - rows))


def mbconv_bwd_case(
    layout,
    shape,
    k,
    stride,
    pads,
    dt,
    act="silu",
    batch_stats=True,
    param_dt=None,
    params=True,
    need_grad_x=True,
    need_grad_params=True,
    grad_dt=None,
    grad_pooled=True,
    eps=1e-3,
    seed=0,
) -> list[str]:
    """pykernels_emu.mbconv_se_bwd vs the float64 oracle (reference.mbconv_se_bwd in float64, same statistics)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dt]
    x, weight, cb, bw, bb, rm, rv = make_mb_inputs(
        layout, shape, k, dtype, DTYPES[param_dt or dt], params, not batch_stats, gen
    )
    b, c, h, w = shape
    pad_t, pad_l, out_h, out_w = mb_geometry(h, w, k, stride, pads)
    x64, w64, cb64, bw64, bb64 = (_f64(t) for t in (x, weight, cb, bw, bb))
    if batch_stats:  # what the forward returned: the batch statistics in float32
        _, _, mean64, var64 = _mb.mbconv_se(
            x64, w64, cb64, bw64, bb64, None, None, eps, stride, pad_t, pad_l, out_h, out_w, act, True, dtype=F64
        )
        mean, var = mean64.float(), var64.float()
    else:  # the running statistics, as the op hands them over
        mean, var = rm, rv
    grad = torch.randn(b, out_h, out_w, c, generator=gen, dtype=F64).to(DTYPES[grad_dt or dt])
    gp = torch.randn(b, c, generator=gen, dtype=F64).float() if grad_pooled else None
    tail = (eps, stride, pad_t, pad_l, act, batch_stats, need_grad_x, need_grad_params)
    got = torch.ops.pykernels_emu.mbconv_se_bwd(grad, gp, x, weight, cb, bw, bb, mean, var, *tail)
    want = reference.mbconv_se_bwd(grad, gp, x, weight, cb, bw, bb, mean, var, *tail)
    names = ("grad_x", "grad_weight", "grad_conv_bias", "grad_bn_weight", "grad_bn_bias")
    problems = []
    for name, g, wnt in zip(names, got, want, strict=True):
        problems += _structure(name, g, wnt)
    if problems:
        return problems
    if b == 0:
        for name, g in zip(names[1:], got[1:], strict=True):
            if g.numel() and (g != 0).any():
                problems.append(f"{name}: empty batch, want zeros, got {g.tolist()}")
        return problems
    mean_s, var_s = mean.double(), var.double()
    gp64 = _f64(gp)
    want64 = reference.mbconv_se_bwd(grad.double(), gp64, x64, w64, cb64, bw64, bb64, mean_s, var_s, *tail)
    # Error bounds in units of MB_REL: the statistics are given (exact), y0 off by A, g by act'' * y's error; sums
    # over pixels may lose one MB_REL of their sum of |terms|.
    t = _mb_forward_terms(
        x64,
        w64,
        cb64,
        bw64,
        bb64,
        mean_s,
        var_s,
        eps,
        (stride, pad_t, pad_l, out_h, out_w),
        False,
        torch.zeros_like(var_s),
    )
    xhat, x_err = t["xhat"], t["x_err"]
    go = grad.double().permute(0, 3, 1, 2) + (gp64[:, :, None, None] if gp64 is not None else 0)
    g_mag = (go * _mb.activation_grad(t["y"], act)).abs()
    g_err = go.abs() * MB_ACT_CURVE * t["y_err"] + MB_ROUND * g_mag
    scale = (t["rstd"] * t["gamma"]).abs()
    if batch_stats:
        count = b * out_h * out_w

        def per_pixel(total):  # a (C,) sum / N as (1, C, 1, 1)
            return _chan(total / count)

        sum_g = g_mag.sum((0, 2, 3))
        sum_gx = (g_mag * xhat.abs()).sum((0, 2, 3))
        sum_g_err = (g_err + g_mag).sum((0, 2, 3))
        sum_gx_err = (g_err * xhat.abs() + g_mag * x_err + g_mag * xhat.abs()).sum((0, 2, 3))
        dy_mag = scale * (g_mag + per_pixel(sum_g) + xhat.abs() * per_pixel(sum_gx))
        dy_err = scale * (g_err + per_pixel(sum_g_err) + xhat.abs() * per_pixel(sum_gx_err) + x_err * per_pixel(sum_gx))
    else:
        sum_g_err = (g_err + g_mag).sum((0, 2, 3))
        sum_gx_err = (g_err * xhat.abs() + g_mag * x_err + g_mag * xhat.abs()).sum((0, 2, 3))
        dy_mag = scale * g_mag
        dy_err = scale * g_err
    dy_err = dy_err + MB_ROUND * dy_mag
    if need_grad_x:
        bound = _mb_transposed(dy_err + 0.5 * dy_mag, w64.abs(), x.shape, k, stride, pad_t, pad_l)
        problems += _within("grad_x", got[0], want64[0], bound, MB_REL)
    if need_grad_params:
        window = _mb._window(x64.abs(), k, stride, pad_t, pad_l, out_h, out_w)
        bound_w = torch.nn.grad.conv2d_weight(window, w64.shape, dy_err + dy_mag, stride=stride, groups=c)
        problems += _within("grad_weight", got[1], want64[1], bound_w, MB_REL)
        bounds = ((dy_err + dy_mag).sum((0, 2, 3)), sum_gx_err, sum_g_err)
        for i, bound in enumerate(bounds, start=2):
            if got[i].numel():
                problems += _within(names[i], got[i], want64[i], bound, MB_REL)
    return problems


def mbconv_error_case(dt="f64") -> list[str]:
    """The CUDA kernels take float16 / bfloat16 / float32 x: float64 is refused with the header's message."""
    x = torch.zeros(1, 2, 3, 3, dtype=DTYPES[dt])
    weight = torch.zeros(2, 1, 3, 3, dtype=DTYPES[dt])
    try:
        torch.ops.pykernels_emu.mbconv_se_fwd(
            x, weight, None, None, None, None, None, 1e-5, 1, 1, 1, 3, 3, "relu", True
        )
    except RuntimeError as e:
        message = str(e).splitlines()[0]
        want = "mbconv_se_fwd: x must be float16, bfloat16, float32 (float64 only on the CPU), got float64"
        return [] if want in message else [f"message {message!r}, want {want!r}"]
    return ["float64 x was accepted"]


# (layout, (B, C, H, W), k, stride, pads (top, bottom, left, right), dtypes). C = 1 / 3 / 5 (one partial chunk of 32
# channels), 40 (two chunks), 200 (7 chunks, the last partial); H = W = 1 (the halo is all padding); TensorFlow's
# asymmetric "same" padding (9 x 8, k = 5, stride 2: pads 2 / 2 / 1 / 2); a pad wider than needed on one side only;
# several tiles per image (W = 37 > 16: two tiles across, the last partial; H = 19 > 8) so that the pooled sums add
# more than 8 tile partials; B = 0.
MB_GRID = [
    ("nchw", (2, 3, 7, 7), 3, 1, (1, 1, 1, 1), ("f32", "f16", "bf16")),
    ("nhwc", (2, 3, 7, 7), 3, 1, (1, 1, 1, 1), ("f32", "bf16")),
    ("nchw", (2, 5, 9, 8), 5, 2, (2, 2, 1, 2), ("f32", "f16")),
    ("nhwc", (2, 5, 9, 8), 5, 2, (2, 2, 1, 2), ("f32",)),
    ("nchw", (1, 200, 5, 5), 7, 1, (3, 3, 3, 3), ("f32",)),
    ("nhwc", (1, 200, 5, 5), 7, 1, (3, 3, 3, 3), ("bf16",)),
    ("nchw", (1, 40, 6, 7), 7, 2, (3, 2, 0, 6), ("f32",)),
    ("nhwc", (1, 40, 6, 7), 7, 2, (2, 3, 3, 3), ("f16",)),
    ("nchw", (1, 3, 6, 6), 3, 2, (0, 1, 2, 0), ("f32",)),
    ("nhwc", (2, 1, 1, 1), 3, 1, (1, 1, 1, 1), ("f32",)),  # C = 1, 1 x 1: both layouts at once
    ("nchw", (1, 3, 1, 1), 7, 2, (3, 3, 3, 3), ("f32",)),
    ("nchw", (1, 2, 19, 37), 3, 1, (1, 1, 1, 1), ("f32",)),  # 3 x 3 tiles of 8 x 16
    ("nhwc", (1, 1, 32, 128), 3, 1, (1, 1, 1, 1), ("f32",)),  # 32 tiles: the sums split over 8 warps
    ("nhwc", (1, 4, 19, 37), 5, 2, (1, 2, 2, 2), ("f32",)),
    ("nchw", (1, 32, 5, 33), 7, 2, (3, 3, 3, 3), ("f32",)),  # 32 channels: the output tile shrinks to 3 x 8
    ("nhwc", (1, 32, 9, 17), 7, 1, (3, 3, 3, 3), ("f16",)),  # the grad_x tile shrinks to 8 x 8 (NCHW: 4 x 16)
    ("nchw", (0, 4, 5, 5), 3, 1, (1, 1, 1, 1), ("f32",)),  # no pixels
]


def _mb_label(shape, k, stride, pads):
    return "x".join(map(str, shape)) + f"/k{k}s{stride}/p" + "".join(map(str, pads))


def _mb_cases() -> dict[str, tuple]:
    cases: dict[str, tuple] = {}
    for layout, shape, k, stride, pads, dts in MB_GRID:
        for dt in dts:
            label = f"{layout}/{_mb_label(shape, k, stride, pads)}/{dt}"
            geo = (layout, shape, k, stride, pads, dt)
            for bs in (True, False):
                mode = "batch" if bs else "running"
                cases[f"mbconv_fwd/{label}/{mode}"] = (mbconv_fwd_case, *geo, "silu", bs)
                cases[f"mbconv_bwd/{label}/{mode}"] = (mbconv_bwd_case, *geo, "silu", bs)
    small = ((2, 3, 7, 7), 3, 1, (1, 1, 1, 1))
    strided = ((2, 5, 9, 8), 5, 2, (2, 2, 1, 2))
    for layout, geo in (("nchw", small), ("nhwc", strided)):
        lbl = f"{layout}/{_mb_label(*geo)}"
        for act in _mb.ACTIVATIONS:
            for bs in (True, False):
                mode = "batch" if bs else "running"
                cases[f"mbconv_fwd/{lbl}/f32/{act}/{mode}"] = (mbconv_fwd_case, layout, *geo, "f32", act, bs)
                cases[f"mbconv_bwd/{lbl}/f32/{act}/{mode}"] = (mbconv_bwd_case, layout, *geo, "f32", act, bs)
        # parameters in float32 beside reduced x; no parameters; running statistics passed but batch_stats
        cases[f"mbconv_fwd/{lbl}/f16-params-f32"] = (mbconv_fwd_case, layout, *geo, "f16", "hardswish", True, "f32")
        cases[f"mbconv_bwd/{lbl}/bf16-params-f32"] = (mbconv_bwd_case, layout, *geo, "bf16", "relu6", False, "f32")
        cases[f"mbconv_fwd/{lbl}/f32/no-params"] = (mbconv_fwd_case, layout, *geo, "f32", "relu", True, None, False)
        cases[f"mbconv_bwd/{lbl}/f32/no-params"] = (mbconv_bwd_case, layout, *geo, "f32", "relu", True, None, False)
        cases[f"mbconv_fwd/{lbl}/f32/batch-ignores-running"] = (
            mbconv_fwd_case,
            layout,
            *geo,
            "f32",
            "silu",
            True,
            None,
            True,
            True,
        )
        # need_grad_x / need_grad_params (both True above), without grad_pooled
        for gx, gp in ((True, False), (False, True), (False, False)):
            for bs in (True, False):
                mode = "batch" if bs else "running"
                cases[f"mbconv_bwd/{lbl}/f32/{mode}/grad_x{int(gx)}-params{int(gp)}"] = (
                    mbconv_bwd_case,
                    layout,
                    *geo,
                    "f32",
                    "silu",
                    bs,
                    None,
                    True,
                    gx,
                    gp,
                )
        cases[f"mbconv_bwd/{lbl}/f32/no-grad_pooled"] = (
            mbconv_bwd_case,
            layout,
            *geo,
            "f32",
            "hardswish",
            True,
            None,
            True,
            True,
            True,
            None,
            False,
        )
    # grad_out in another dtype than x (the launcher converts it to float32)
    for layout, dt, grad_dt in (("nchw", "f16", "f32"), ("nhwc", "f32", "bf16")):
        cases[f"mbconv_bwd/{layout}/{_mb_label(*small)}/{dt}-grad-{grad_dt}"] = (
            mbconv_bwd_case,
            layout,
            *small,
            dt,
            "silu",
            True,
            None,
            True,
            True,
            True,
            grad_dt,
        )
    cases["mbconv_fwd/error/f64"] = (mbconv_error_case, "f64")
    return cases


CASES.update(_mb_cases())

# Cases that together launch every kernel of csrc/cuda/mbconv_se.cu (for a check like DWCONV_EVERY_KERNEL in
# tests/gpu_check/test_cuda_emu.py): the statistics, merge, forward and one-column sum kernels; the backward's reduce,
# main and grad_x (NCHW: the stash) kernels; the sum split over 8 warps (32 tiles) and grad_x for channels_last.
MBCONV_EVERY_KERNEL = (
    "mbconv_fwd/nchw/2x3x7x7/k3s1/p1111/f32/batch",
    "mbconv_bwd/nchw/2x3x7x7/k3s1/p1111/f32/batch",
    "mbconv_bwd/nhwc/1x1x32x128/k3s1/p1111/f32/batch",
)
