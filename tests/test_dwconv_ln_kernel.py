"""The Triton dwconv + LayerNorm kernels (triton_kernels/dwconv_ln.py), forward and all five gradients, against the
float64 oracle ``pykernels.reference.dwconv_ln`` (autograd in float64).

Pass rule: for each output, the kernel's max error against the oracle is at most 2x the error of eager PyTorch in the
same dtype (``F.conv2d`` + ``permute`` + ``aten.native_layer_norm``, autograd; parameters cast to x's dtype) plus a
floor of ``2 * eps(dtype) * max|oracle|`` (the eager error can be ~0 on tiny cases). On CPU this runs under the Triton
interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``); the grids are small because the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from pykernels import BackendNotSupportedError, reference  # noqa: E402
from pykernels import functional as PF  # noqa: E402
from pykernels.triton_kernels import dwconv_ln as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if DEVICE == "cpu" and not INTERPRETING:
    pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1", allow_module_level=True)

EPS = 1e-6
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NAMES = ("out", "mean", "rstd", "grad_x", "grad_weight", "grad_conv_bias", "grad_ln_weight", "grad_ln_bias")
CHUNKED_C = 1030  # > SINGLE_PASS_MAX_CHANNELS: two chunks of 512 and a 6-channel tail


def make_inputs(batch, channels, height, width, ksize, dtype, layout="nchw", param_dtype=None, bias_offset=0.0, seed=0):
    """x (B, C, H, W) in ``layout``, weight, conv_bias, ln_weight, ln_bias, grad_out (B, H, W, C), on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def randn(*shape, scale=1.0, offset=0.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dt).to(DEVICE)

    x = randn(batch, channels, height, width)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    weight = randn(channels, 1, ksize, ksize, scale=1.0 / ksize, dt=param_dtype)
    conv_bias = randn(channels, scale=0.5, offset=bias_offset, dt=param_dtype)
    ln_weight = randn(channels, scale=0.5, offset=1.0, dt=param_dtype)
    ln_bias = randn(channels, scale=0.5, dt=param_dtype)
    grad_out = randn(batch, height, width, channels)
    return x, weight, conv_bias, ln_weight, ln_bias, grad_out


def _grads(outputs, inputs, grad_out):
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outputs, wanted, grad_out))
    return [next(got) if t is not None else None for t in inputs]


def oracle(x, weight, conv_bias, ln_weight, ln_bias, grad_out):
    """float64 (out, mean, rstd, grad_x, grad_weight, grad_conv_bias, grad_ln_weight, grad_ln_bias)."""
    inputs = [
        t.detach().double().requires_grad_() if t is not None else None
        for t in (x, weight, conv_bias, ln_weight, ln_bias)
    ]
    out, mean, rstd = reference.dwconv_ln(*inputs, EPS)
    return [out.detach(), mean.detach(), rstd.detach(), *_grads(out, inputs, grad_out.double())]


def eager(x, weight, conv_bias, ln_weight, ln_bias, grad_out):
    """The same in x's dtype with eager PyTorch ops (parameters cast to x's dtype)."""
    dtype = x.dtype
    inputs = [
        t.detach().to(dtype).requires_grad_() if t is not None else None
        for t in (x, weight, conv_bias, ln_weight, ln_bias)
    ]
    xe, we, cbe, lwe, lbe = inputs
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 eager as fp32 (no TF32 convs on GPUs)
        y = F.conv2d(xe, we, cbe, padding=weight.shape[-1] // 2, groups=x.shape[1]).permute(0, 2, 3, 1)
        out, mean, rstd = torch.ops.aten.native_layer_norm(y, (x.shape[1],), lwe, lbe, EPS)
        grads = _grads(out, inputs, grad_out)
    return [out.detach(), mean.detach().squeeze(-1), rstd.detach().squeeze(-1), *grads]


def kernel(x, weight, conv_bias, ln_weight, ln_bias, grad_out, need_grad_x=True, need_grad_params=True):
    out, mean, rstd = kernels.dwconv_ln_fwd(x, weight, conv_bias, ln_weight, ln_bias, EPS)
    grads = kernels.dwconv_ln_bwd(
        grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, need_grad_x, need_grad_params
    )
    return [out, mean, rstd, *grads]


def max_err(value, expected):
    return (value.double() - expected).abs().max().item() if expected.numel() else 0.0


def check_against_oracle(inputs, results, skip=()):
    """Assert the rule on every output; also dtypes and layouts of the contract."""
    x, weight, conv_bias, ln_weight, ln_bias, grad_out = inputs
    expected = oracle(*inputs)
    baseline = eager(*inputs)
    finfo = torch.finfo(x.dtype)
    report = []
    for name, value, ref, base in zip(NAMES, results, expected, baseline, strict=True):
        if name in skip or ref is None:
            continue
        floor = 2 * finfo.eps * max(ref.abs().max().item(), 1.0 if name in ("mean", "rstd") else 0.0)
        err, bound = max_err(value, ref), 2 * max_err(base, ref) + floor
        report.append(f"{name}: err {err:.2e} bound {bound:.2e}")
        assert torch.isfinite(value).all(), name
        assert err <= bound, "; ".join(report)
    out, mean, rstd, grad_x, grad_weight, grad_conv_bias, grad_ln_weight, grad_ln_bias = results
    batch, channels, height, width = x.shape
    assert out.shape == (batch, height, width, channels) and out.is_contiguous() and out.dtype == x.dtype
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (batch, height, width)
    if grad_x.numel():
        assert grad_x.dtype == x.dtype and grad_x.stride() == torch.empty_like(x).stride()
    for grad, param in ((grad_weight, weight), (grad_conv_bias, conv_bias), (grad_ln_weight, ln_weight)):
        if grad.numel():
            assert grad.dtype == param.dtype and grad.shape == param.shape
    if grad_ln_bias.numel():
        assert grad_ln_bias.dtype == ln_bias.dtype


# (B, C, H, W, k, layout): awkward maps (13 x 13, 7 x 7, 1 x 1), C = 3 / 200 and the chunked C, k = 3 / 5 / 7 / 13
SHAPES = {
    "b2-c3-7x7-k3-nchw": (2, 3, 7, 7, 3, "nchw"),
    "b1-c200-13x13-k7-cl": (1, 200, 13, 13, 7, "cl"),
    "b2-c24-13x13-k7-nchw": (2, 24, 13, 13, 7, "nchw"),
    "b2-c16-1x1-k13-cl": (2, 16, 1, 1, 13, "cl"),
    "b1-c8-7x7-k13-nchw": (1, 8, 7, 7, 13, "nchw"),
    f"b1-c{CHUNKED_C}-3x4-k3-nchw": (1, CHUNKED_C, 3, 4, 3, "nchw"),
    f"b2-c{CHUNKED_C}-2x3-k5-cl": (2, CHUNKED_C, 2, 3, 5, "cl"),
}
# the interpreter is slow: every shape in fp32, each half dtype on a subset that still covers both layouts, k = 3 /
# 7 / 13 and the chunked path
HALF_SHAPES = {
    torch.float16: ("b1-c200-13x13-k7-cl", "b2-c3-7x7-k3-nchw", "b1-c8-7x7-k13-nchw", f"b1-c{CHUNKED_C}-3x4-k3-nchw"),
    torch.bfloat16: ("b2-c24-13x13-k7-nchw", "b2-c16-1x1-k13-cl", f"b2-c{CHUNKED_C}-2x3-k5-cl"),
}
CASES = [pytest.param(torch.float32, case, id=f"fp32-{case}") for case in SHAPES] + [
    pytest.param(dtype, case, id=f"{DTYPE_IDS[dtype]}-{case}") for dtype, cases in HALF_SHAPES.items() for case in cases
]


@pytest.mark.parametrize(("dtype", "case"), CASES)
def test_forward_backward(dtype, case):
    batch, channels, height, width, ksize, layout = SHAPES[case]
    inputs = make_inputs(batch, channels, height, width, ksize, dtype, layout)
    check_against_oracle(inputs, kernel(*inputs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_parameters_with_half_input(dtype):
    """AMP: x in half precision, conv / LayerNorm parameters in fp32 (grads come back in fp32)."""
    inputs = make_inputs(2, 40, 9, 6, 5, dtype, "cl", param_dtype=torch.float32)
    check_against_oracle(inputs, kernel(*inputs))


@pytest.mark.parametrize(
    "present", [(False, False, False), (True, False, True), (False, True, False)], ids=["none", "cb-lb", "lw"]
)
def test_optional_parameters(present):
    x, weight, *params, grad_out = make_inputs(2, 12, 5, 9, 3, torch.float32, seed=1)
    params = [p if on else None for p, on in zip(params, present, strict=True)]
    inputs = (x, weight, *params, grad_out)
    results = kernel(*inputs)
    check_against_oracle(inputs, results)
    for grad, param in zip(results[5:], params, strict=True):
        assert (grad.shape == (0,)) == (param is None)


@pytest.mark.parametrize(("need_grad_x", "need_grad_params"), [(True, False), (False, True), (False, False)])
def test_need_grad_flags(need_grad_x, need_grad_params):
    inputs = make_inputs(1, 20, 6, 5, 3, torch.float32, "cl", seed=2)
    full = kernel(*inputs)
    part = kernel(*inputs, need_grad_x=need_grad_x, need_grad_params=need_grad_params)
    assert torch.equal(part[3], full[3]) if need_grad_x else part[3].shape == (0,)
    for got, want in zip(part[4:], full[4:], strict=True):
        assert torch.equal(got, want) if need_grad_params else got.shape == (0,)


@pytest.mark.parametrize("channels", [24, CHUNKED_C], ids=["single", "chunked"])
def test_bitwise_deterministic(channels):
    inputs = make_inputs(2, channels, 3, 2, 3, torch.float16, "nchw", param_dtype=torch.float32, seed=3)
    first, second = kernel(*inputs), kernel(*inputs)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("channels", [40, CHUNKED_C], ids=["single", "chunked"])
def test_large_mean_no_cancellation(channels):
    """y = conv + 1000: mean / variance from sums of squares would lose the variance in fp32; the kernels do not."""
    inputs = make_inputs(1, channels, 3, 3, 3, torch.float32, "cl", bias_offset=1000.0, seed=4)
    results = kernel(*inputs)
    check_against_oracle(inputs, results)
    expected = oracle(*inputs)
    torch.testing.assert_close(results[2].double(), expected[2], rtol=1e-4, atol=0)  # rstd


def test_strided_views_read_in_place():
    """x as a non-contiguous view (an H-slice of a channels-last tensor) and grad_out as an expanded view."""
    x, weight, conv_bias, ln_weight, ln_bias, _ = make_inputs(2, 10, 9, 7, 3, torch.float32, "cl", seed=5)
    x = x[:, :, 1:8]
    grad_out = torch.randn(1, 1, 7, 10, dtype=torch.float32, device=DEVICE).expand(2, 7, 7, 10)
    inputs = (x, weight, conv_bias, ln_weight, ln_bias, grad_out)
    check_against_oracle(inputs, kernel(*inputs))


def test_empty_batch():
    x, weight, conv_bias, ln_weight, ln_bias, grad_out = make_inputs(0, 6, 4, 4, 3, torch.float32)
    out, mean, rstd, grad_x, grad_weight, *grads = kernel(x, weight, conv_bias, ln_weight, ln_bias, grad_out)
    assert out.shape == (0, 4, 4, 6) and mean.shape == rstd.shape == (0, 4, 4) and grad_x.shape == x.shape
    assert not grad_weight.any() and grad_weight.shape == weight.shape and all(g.shape == (6,) for g in grads)


def test_input_errors():
    """The op checks every argument before a launcher runs (the launchers check only the kernels' own limits)."""
    x, weight, conv_bias, ln_weight, ln_bias, _ = make_inputs(1, 4, 5, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="kernel size 15"):
        PF.dwconv_ln(x, torch.zeros(4, 1, 15, 15, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="kernel size 4"):
        PF.dwconv_ln(x, torch.zeros(4, 1, 4, 4, device=DEVICE), backend="triton")
    with pytest.raises(BackendNotSupportedError, match="dtype float64 not supported by triton"):
        PF.dwconv_ln(x.double(), weight.double(), backend="triton")
    with pytest.raises(TypeError, match="x's dtype"):
        PF.dwconv_ln(x, weight, conv_bias.half(), backend="triton")
    with pytest.raises(ValueError, match="weight has 3 channels"):
        PF.dwconv_ln(x, weight[:3], backend="triton")
    with pytest.raises(ValueError, match="ln_bias must have shape"):
        PF.dwconv_ln(x, weight, None, None, ln_bias[:3], backend="triton")


def test_config_tables():
    """Single pass up to SINGLE_PASS_MAX_CHANNELS, chunked above (ConvNeXt-XL's 2048 included); tiles stay within the
    per-program element budget the AOT gate was run with."""
    for channels in (3, 96, 200, 768, 1024):
        block_p, block_c, thirds, chunked, _ = kernels._fwd_config(channels, interp=False)
        lanes = 3 * block_c if thirds else block_c
        assert not chunked and lanes >= channels and block_p * lanes <= kernels.TILE_ELEMENTS
    for channels in (1025, 1536, 2048, 4096):
        block_p, block_c, thirds, chunked, _ = kernels._fwd_config(channels, interp=False)
        assert (
            chunked and not thirds and block_c == kernels.CHUNK_CHANNELS and block_p * block_c <= kernels.TILE_ELEMENTS
        )
    assert kernels._fwd_config(CHUNKED_C, interp=True)[3], "the interpreter tests must reach the chunked path"
    assert kernels._fwd_config(24, interp=True)[2], "the interpreter tests must reach the three-tile rows"


@pytest.mark.parametrize("channels", [96, 192, 384, 768])
def test_convnext_widths_have_no_masked_channel_lanes(channels):
    """Issue 13: at ConvNeXt's C = 96 * 2^n every GPU tile of the forward, dy and grad_x kernels is full along C (the
    power-of-two tiles idled 25% of their lanes), with the same pixels per program and <= 16 fp32 per thread."""
    for backward in (False, True):
        block_p, block_c, thirds, chunked, warps = kernels._fwd_config(channels, interp=False, backward=backward)
        assert thirds and not chunked and 3 * block_c == channels
        assert block_p == kernels.TILE_ELEMENTS // (2 if backward else 1) // triton.next_power_of_2(channels)
        assert block_p * 3 * block_c <= 16 * 32 * warps
    block_p, block_c, _ = kernels._dx_config(channels, interp=False)
    assert channels % block_c == 0 and block_c >= 32
    assert channels % kernels._dw_config(channels, 7, interp=False)[1] == 0
