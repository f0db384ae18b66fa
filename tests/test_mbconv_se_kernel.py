"""The Triton MBConv depthwise-stage kernels (triton_kernels/mbconv_se.py): the output, the SE sums, the batch
statistics and every gradient against the float64 oracle ``pykernels.reference.mbconv_se`` (autograd in float64).

Pass rule: for each output, the kernel's max error against the oracle is at most 2x the error of eager PyTorch in the
same dtype (pad -> ``F.conv2d`` -> ``F.batch_norm`` -> activation, autograd; parameters and statistics cast to x's
dtype) plus a floor of ``FLOOR[dtype]`` times the output's scale (the eager error can be ~0 on tiny cases). The scale
is max |oracle|, except for sums that cancel: ``grad_conv_bias`` with batch statistics is 0 in exact arithmetic (the
sum of ``dy0``), so its scale is the largest per-channel sum of ``|dy0|``. On CPU this runs under the Triton
interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``); the shapes are small because the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from pykernels import reference  # noqa: E402
from pykernels.reference.mbconv_se import activation, activation_grad  # noqa: E402
from pykernels.triton_kernels import mbconv_se as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if DEVICE == "cpu" and not INTERPRETING:
    pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1", allow_module_level=True)

EPS = 1e-5
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NAMES = ("out", "pooled", "mean", "var", "grad_x", "grad_weight", "grad_conv_bias", "grad_bn_weight", "grad_bn_bias")


class Case:
    """One call: x (B, C, H, W) in ``layout``, k, stride, paddings (top, left, bottom, right), act, batch_stats."""

    def __init__(self, shape, k, stride, pads, act, batch_stats, layout):
        self.shape, self.k, self.stride, self.pads = shape, k, stride, pads
        self.act, self.batch_stats, self.layout = act, batch_stats, layout
        pad_t, pad_l, pad_b, pad_r = pads
        self.out_h = (shape[2] + pad_t + pad_b - k) // stride + 1
        self.out_w = (shape[3] + pad_l + pad_r - k) // stride + 1

    def conv_args(self):
        return (self.stride, self.pads[0], self.pads[1], self.out_h, self.out_w)


def make_inputs(case, dtype, param_dtype=None, stats_dtype=torch.float32, bias_offset=0.0, seed=0, present=None):
    """(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, grad_out, grad_pooled) on DEVICE; the
    conv output has a per-channel offset and the running statistics are near (not at) the batch's."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    batch, channels, height, width = case.shape

    def randn(*shape, scale=1.0, offset=0.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dt).to(DEVICE)

    x = randn(batch, channels, height, width)
    if case.layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = randn(channels, 1, case.k, case.k, scale=1.0 / case.k, dt=param_dtype)
    params = [
        randn(channels, scale=0.5, offset=bias_offset, dt=param_dtype),
        randn(channels, scale=0.2, offset=1.0, dt=param_dtype),
        randn(channels, scale=0.5, dt=param_dtype),
    ]
    if present is not None:
        params = [p if on else None for p, on in zip(params, present, strict=True)]
    running_mean = randn(channels, scale=0.5, offset=bias_offset, dt=stats_dtype)
    running_var = (randn(channels, scale=0.2, offset=1.0).abs() + 0.2).to(stats_dtype)
    grad_out = randn(batch, case.out_h, case.out_w, channels)
    grad_pooled = randn(batch, channels, dt=torch.float32) / (case.out_h * case.out_w) ** 0.5
    return (x, weight, *params, running_mean, running_var, grad_out, grad_pooled)


def _grads(outputs, inputs, grad_outputs):
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outputs, wanted, grad_outputs))
    return [next(got) if t is not None else None for t in inputs]


def oracle(case, inputs):
    """float64 (out, pooled, mean, var, grad_x, grad_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias) and the
    per-channel sums of |dy0| (the scale of grad_conv_bias)."""
    x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, grad_out, grad_pooled = inputs
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs[:5]]
    stats = (running_mean.double(), running_var.double())
    out, pooled, mean, var = reference.mbconv_se(
        *leaves, *stats, EPS, *case.conv_args(), case.act, case.batch_stats, torch.float64
    )
    grads = _grads((out, pooled), leaves, (grad_out.double(), grad_pooled.double()))
    # dy0 = d loss / d (conv output): the same composition with the conv output as a leaf
    y0 = F.conv2d(_pad(case, leaves[0].detach()), leaves[1].detach(), None, stride=case.stride, groups=x.shape[1])
    if conv_bias is not None:
        y0 = y0 + conv_bias.double()[:, None, None]
    y0.requires_grad_()
    mean0, var0 = (y0.mean((0, 2, 3)), y0.var((0, 2, 3), correction=0)) if case.batch_stats else stats
    y = (y0 - mean0[:, None, None]) * torch.rsqrt(var0 + EPS)[:, None, None]
    if bn_weight is not None:
        y = y * bn_weight.double()[:, None, None]
    if bn_bias is not None:
        y = y + bn_bias.double()[:, None, None]
    z = activation(y, case.act)
    loss = (z * grad_out.double().permute(0, 3, 1, 2)).sum() + (z.sum((2, 3)) * grad_pooled.double()).sum()
    (dy0,) = torch.autograd.grad(loss, y0)
    return [out.detach(), pooled.detach(), mean.detach(), var.detach(), *grads], dy0.abs().sum((0, 2, 3))


def _pad(case, x):
    pad_t, pad_l, pad_b, pad_r = case.pads
    return F.pad(x, (pad_l, pad_r, pad_t, pad_b))


def eager(case, inputs):
    """The same in x's dtype with eager PyTorch ops (parameters and statistics cast to x's dtype)."""
    x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, grad_out, grad_pooled = inputs
    dtype = x.dtype
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs[:5]]
    xe, we, cbe, bwe, bbe = leaves
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 eager as fp32 (no TF32 convs on GPUs)
        y0 = F.conv2d(_pad(case, xe), we, cbe, stride=case.stride, groups=x.shape[1])
        mean, var = torch.var_mean(y0.detach().float(), (0, 2, 3), correction=0)
        rm, rv = running_mean.to(dtype).clone(), running_var.to(dtype).clone()
        y = F.batch_norm(y0, rm, rv, bwe, bbe, case.batch_stats, 0.0, EPS)
        z = activation(y, case.act)
        pooled = z.float().sum((2, 3))
        grads = _grads((z.permute(0, 2, 3, 1), pooled), leaves, (grad_out, grad_pooled))
    return [z.detach().permute(0, 2, 3, 1), pooled.detach(), mean.to(dtype), var.to(dtype), *grads]


def kernel(case, inputs, need_grad_x=True, need_grad_params=True, grad_pooled=True):
    """(out, pooled, mean, var, grad_x, grad_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias) of the
    launchers; the backward uses the statistics the forward used."""
    x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, grad_out, gp = inputs
    params = (x, weight, conv_bias, bn_weight, bn_bias)
    out, pooled, mean, var = kernels.mbconv_se_fwd(
        *params, running_mean, running_var, EPS, *case.conv_args(), case.act, case.batch_stats
    )
    stats = (mean, var) if case.batch_stats else (running_mean, running_var)
    grads = kernels.mbconv_se_bwd(
        grad_out,
        gp if grad_pooled else None,
        *params,
        *stats,
        EPS,
        *case.conv_args()[:3],
        case.act,
        case.batch_stats,
        need_grad_x,
        need_grad_params,
    )
    return [out, pooled, mean, var, *grads]


def max_err(value, expected):
    return (value.double() - expected).abs().max().item() if expected.numel() else 0.0


def check_against_oracle(case, inputs, results, skip=()):
    """Assert the rule on every output (but ``skip``), and the contract's dtypes, shapes and layouts."""
    x, weight, conv_bias, bn_weight, bn_bias = inputs[:5]
    expected, dy0_abs_sum = oracle(case, inputs)
    baseline = eager(case, inputs)
    report = []
    for name, value, ref, base in zip(NAMES, results, expected, baseline, strict=True):
        if ref is None or name in skip or (name in ("mean", "var") and not case.batch_stats):
            continue
        scale = ref.abs().max().item()
        if name == "grad_conv_bias" and case.batch_stats:
            scale = dy0_abs_sum.max().item()
        err, bound = max_err(value, ref), 2 * max_err(base, ref) + FLOOR[x.dtype] * scale
        report.append(f"{name}: err {err:.2e} bound {bound:.2e}")
        assert torch.isfinite(value).all(), name
        assert err <= bound, "; ".join(report)
    out, pooled, mean, var, grad_x, *param_grads = results
    batch, channels = x.shape[:2]
    assert out.shape == (batch, case.out_h, case.out_w, channels) and out.is_contiguous() and out.dtype == x.dtype
    assert pooled.shape == (batch, channels) and pooled.dtype == torch.float32
    stats_shape = (channels,) if case.batch_stats else (0,)
    assert mean.shape == var.shape == stats_shape and mean.dtype == var.dtype == torch.float32
    assert grad_x.dtype == x.dtype and grad_x.shape == x.shape and grad_x.stride() == torch.empty_like(x).stride()
    for grad, param in zip(param_grads, (weight, conv_bias, bn_weight, bn_bias), strict=True):
        if param is None:
            assert grad.shape == (0,) and grad.dtype == x.dtype
        else:
            assert grad.dtype == param.dtype and grad.shape == param.shape and grad.is_contiguous()


# ((B, C, H, W), k, stride, (pad_t, pad_l, pad_b, pad_r), act, batch_stats, layout): k = 3 / 5 / 7, stride 1 / 2,
# symmetric, TF-"same" (0 before, 1 after), asymmetric and unused-border paddings, every activation, both BatchNorm
# modes, awkward shapes (C = 200 / 5 / 3, 13 x 13, 1 x 1, batch 1)
CASES = {
    "b2-c16-13x13-k3-s1-same-silu-running-nchw": Case((2, 16, 13, 13), 3, 1, (1, 1, 1, 1), "silu", False, "nchw"),
    "b2-c24-14x14-k3-s2-tfsame-relu6-batch-cl": Case((2, 24, 14, 14), 3, 2, (0, 0, 1, 1), "relu6", True, "cl"),
    "b1-c200-13x13-k5-s2-p2-hardswish-batch-cl": Case((1, 200, 13, 13), 5, 2, (2, 2, 2, 2), "hardswish", True, "cl"),
    "b2-c8-9x11-k7-s1-p3-none-running-nchw": Case((2, 8, 9, 11), 7, 1, (3, 3, 3, 3), "none", False, "nchw"),
    "b2-c12-10x7-k7-s2-asym-relu-running-nchw": Case((2, 12, 10, 7), 7, 2, (3, 2, 2, 4), "relu", False, "nchw"),
    "b2-c32-1x1-k3-s2-p1-silu-batch-nchw": Case((2, 32, 1, 1), 3, 2, (1, 1, 1, 1), "silu", True, "nchw"),
    "b3-c5-6x5-k5-s1-asym-relu-batch-cl": Case((3, 5, 6, 5), 5, 1, (2, 1, 2, 3), "relu", True, "cl"),
    "b2-c16-10x9-k3-s2-p0-silu-batch-nchw": Case((2, 16, 10, 9), 3, 2, (0, 0, 0, 0), "silu", True, "nchw"),
    "b1-c3-7x7-k7-s2-p3-hardswish-running-cl": Case((1, 3, 7, 7), 7, 2, (3, 3, 3, 3), "hardswish", False, "cl"),
}
# the interpreter is slow: every case in fp32, a few in each half dtype (both layouts, both modes, both strides)
HALF_CASES = {
    torch.float16: {
        "b2-c200-13x13-k3-s2-p1-silu-batch-cl": Case((2, 200, 13, 13), 3, 2, (1, 1, 1, 1), "silu", True, "cl"),
        "b2-c24-9x9-k5-s1-p2-hardswish-running-nchw": Case(
            (2, 24, 9, 9), 5, 1, (2, 2, 2, 2), "hardswish", False, "nchw"
        ),
    },
    torch.bfloat16: {
        "b2-c40-9x9-k7-s1-p3-silu-batch-nchw": Case((2, 40, 9, 9), 7, 1, (3, 3, 3, 3), "silu", True, "nchw"),
        "b2-c16-14x14-k3-s2-tfsame-relu6-running-cl": Case((2, 16, 14, 14), 3, 2, (0, 0, 1, 1), "relu6", False, "cl"),
    },
}
PARAMS = [pytest.param(torch.float32, case, id=f"fp32-{name}") for name, case in CASES.items()] + [
    pytest.param(dtype, case, id=f"{DTYPE_IDS[dtype]}-{name}")
    for dtype, cases in HALF_CASES.items()
    for name, case in cases.items()
]


@pytest.mark.parametrize(("dtype", "case"), PARAMS)
def test_forward_backward(dtype, case):
    inputs = make_inputs(case, dtype)
    check_against_oracle(case, inputs, kernel(case, inputs))


@pytest.mark.parametrize("batch_stats", [False, True], ids=["running", "batch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_parameters_with_half_input(dtype, batch_stats):
    """AMP: x in half precision, conv / BatchNorm parameters in fp32 (their grads come back in fp32); the running
    statistics in x's dtype."""
    case = Case((2, 20, 7, 6), 3, 2, (1, 1, 1, 1), "silu", batch_stats, "cl")
    inputs = make_inputs(case, dtype, param_dtype=torch.float32, stats_dtype=dtype, seed=1)
    check_against_oracle(case, inputs, kernel(case, inputs))


@pytest.mark.parametrize(
    "present", [(False, False, False), (True, False, False), (False, True, True)], ids=["none", "cb", "affine"]
)
@pytest.mark.parametrize("batch_stats", [False, True], ids=["running", "batch"])
def test_optional_parameters(present, batch_stats):
    case = Case((2, 12, 6, 7), 3, 1, (1, 1, 1, 1), "hardswish", batch_stats, "nchw")
    inputs = make_inputs(case, torch.float32, seed=2, present=present)
    check_against_oracle(case, inputs, kernel(case, inputs))


@pytest.mark.parametrize("batch_stats", [False, True], ids=["running", "batch"])
def test_without_grad_pooled(batch_stats):
    """grad_pooled None (the SE branch's output unused): g = grad_out * act'(y)."""
    case = Case((2, 10, 5, 6), 5, 2, (2, 2, 2, 2), "relu6", batch_stats, "cl")
    inputs = list(make_inputs(case, torch.float32, seed=3))
    inputs[-1] = torch.zeros_like(inputs[-1])  # the oracle's view of None
    check_against_oracle(case, inputs, kernel(case, inputs, grad_pooled=False))


@pytest.mark.parametrize(("need_grad_x", "need_grad_params"), [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("batch_stats", [False, True], ids=["running", "batch"])
def test_need_grad_flags(need_grad_x, need_grad_params, batch_stats):
    case = Case((1, 20, 6, 5), 3, 2, (1, 1, 1, 1), "silu", batch_stats, "cl")
    inputs = make_inputs(case, torch.float32, seed=4)
    full = kernel(case, inputs)
    part = kernel(case, inputs, need_grad_x=need_grad_x, need_grad_params=need_grad_params)
    assert torch.equal(part[4], full[4]) if need_grad_x else part[4].shape == (0,)
    for got, want in zip(part[5:], full[5:], strict=True):
        assert torch.equal(got, want) if need_grad_params else (got.shape == (0,) and got.dtype == torch.float32)


@pytest.mark.parametrize("batch_stats", [False, True], ids=["running", "batch"])
def test_bitwise_deterministic(batch_stats):
    case = Case((2, 24, 9, 8), 5, 2, (2, 2, 2, 2), "silu", batch_stats, "nchw")
    inputs = make_inputs(case, torch.float16, param_dtype=torch.float32, seed=5)
    first, second = kernel(case, inputs), kernel(case, inputs)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


def _gpu_configs(t):
    return False  # interpreting() -> False: the launchers take their GPU tiles (run here by the interpreter)


@pytest.mark.parametrize(
    "case",
    [
        Case((2, 72, 17, 18), 3, 2, (1, 1, 1, 1), "silu", True, "cl"),
        Case((2, 20, 10, 9), 3, 1, (1, 1, 1, 1), "hardswish", True, "nchw"),
    ],
    ids=["cl-s2-k3-c72", "nchw-s1-k3-c20"],
)
def test_gpu_tiles(monkeypatch, case):
    """The GPU branch of the tables: several channel blocks, several (partial) pixel tiles per image and their
    partial sums, stride-2 grad_x phases, several grad_weight groups."""
    monkeypatch.setattr(kernels, "interpreting", _gpu_configs)
    block_p, block_c, _ = kernels._fwd_config(case.shape[1], case.layout == "cl", False)
    tiles = kernels._tiles(case.out_h, case.out_w, *kernels._pixel_tile(block_p, case.out_h, case.out_w, False))[1]
    assert triton.cdiv(case.shape[1], block_c) > 1 and tiles > 1
    inputs = make_inputs(case, torch.float32, seed=6)
    check_against_oracle(case, inputs, kernel(case, inputs))


@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_large_mean_no_cancellation(layout):
    """Conv output = conv + 1000: statistics from E[y^2] - E[y]^2 would lose the variance in fp32; the per-tile
    (mean, M2) merge does not. (grad_conv_bias, 0 in exact arithmetic, is left out: at this offset its error is
    fp32's resolution of y0 ~ 1000 summed over the batch, for eager PyTorch as for the kernels.)"""
    case = Case((2, 12, 9, 9), 3, 1, (1, 1, 1, 1), "silu", True, layout)
    inputs = make_inputs(case, torch.float32, bias_offset=1000.0, seed=7)
    results = kernel(case, inputs)
    check_against_oracle(case, inputs, results, skip=("grad_conv_bias",))
    expected, _ = oracle(case, inputs)
    torch.testing.assert_close(results[3].double(), expected[3], rtol=1e-4, atol=0)  # var


@pytest.mark.parametrize("act", ["none", "relu", "relu6", "silu", "hardswish"])
def test_activation_derivative_conventions(act):
    """y exactly at the kinks (0, 6, -3, 3): the grads follow PyTorch's conventions (reference.activation_grad)."""
    kinks = torch.tensor([0.0, 6.0, -3.0, 3.0, -0.5, 7.0])
    case = Case((2, kinks.numel(), 3, 4), 3, 1, (1, 1, 1, 1), act, False, "nchw")
    x, weight, *_, grad_out, grad_pooled = make_inputs(case, torch.float32, seed=8)
    weight = torch.zeros_like(weight)  # y = conv_bias exactly: weight 0, mean 0, var 1, eps 0
    conv_bias, mean, var = kinks.to(DEVICE), torch.zeros_like(kinks).to(DEVICE), torch.ones_like(kinks).to(DEVICE)
    out, *_ = kernels.mbconv_se_fwd(x, weight, conv_bias, None, None, mean, var, 0.0, *case.conv_args(), act, False)
    _, _, grad_conv_bias, _, _ = kernels.mbconv_se_bwd(
        grad_out, grad_pooled, x, weight, conv_bias, None, None, mean, var, 0.0, 1, 1, 1, act, False, False, True
    )
    y = kinks.double()
    torch.testing.assert_close(out.double(), activation(y, act).expand_as(out), rtol=1e-6, atol=1e-6)
    g = grad_out.double().sum((1, 2)) + grad_pooled.double() * (case.out_h * case.out_w)  # (B, C)
    torch.testing.assert_close(grad_conv_bias.double(), (g * activation_grad(y, act)).sum(0), rtol=1e-5, atol=1e-5)


def test_strided_view_read_in_place():
    """x as a non-contiguous view (an H-slice of a channels-last tensor): the kernels read its strides; grad_x comes
    back dense in the same dim order."""
    case = Case((2, 10, 7, 7), 3, 2, (1, 1, 1, 1), "silu", True, "cl")
    inputs = list(make_inputs(case, torch.float32, seed=9))
    big = torch.randn(2, 10, 9, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    inputs[0] = big[:, :, 1:8]
    assert not inputs[0].is_contiguous(memory_format=torch.channels_last)
    results = kernel(case, inputs)
    check_against_oracle(case, inputs, results)


def test_empty_batch():
    case = Case((0, 6, 5, 5), 3, 1, (1, 1, 1, 1), "silu", True, "nchw")
    inputs = make_inputs(case, torch.float32)
    out, pooled, mean, var, grad_x, grad_weight, *grads = kernel(case, inputs)
    assert out.shape == (0, 5, 5, 6) and pooled.shape == (0, 6) and mean.shape == var.shape == (6,)
    assert grad_x.shape == (0, 6, 5, 5) and not grad_weight.any() and grad_weight.shape == (6, 1, 3, 3)
    assert all(g.shape == (6,) and not g.any() for g in grads)


def test_config_tables():
    """GPU tiles stay within the per-program element budget the AOT gate was run with; channels-last tiles run along
    channels (up to 64), NCHW tiles along pixels (8 channels)."""
    for channels in (1, 3, 16, 24, 96, 200, 1152):
        for channels_last in (True, False):
            block_p, block_c, warps = kernels._fwd_config(channels, channels_last, interp=False)
            assert block_p * block_c <= kernels.TILE_ELEMENTS and 1 <= warps <= 8
            assert block_c == (min(max(triton.next_power_of_2(channels), 16), 64) if channels_last else 8)
            dy_p, dy_c, _ = kernels._dy_config(channels, channels_last, interp=False)
            assert dy_c == block_c and dy_p * 2 == block_p
        block_p, block_c, _ = kernels._dx_config(channels, interp=False)
        assert block_p * block_c <= kernels.TILE_ELEMENTS and 16 <= block_c <= 128
        for ksize in (3, 5, 7):
            block_p, block_c, block_k, _ = kernels._dw_config(channels, ksize, interp=False)
            assert block_p * block_c * block_k <= kernels.DW_TILE_ELEMENTS and block_k >= ksize
