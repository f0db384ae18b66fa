"""mbconv_se (MBConv's depthwise stage: depthwise conv -> BatchNorm -> activation, with the SE squeeze) on every
backend: the output, the pooled sums and every gradient against the float64 oracle by flash-attention's rule (error
<= 2 x eager PyTorch's error in the same dtype + a floor), over dtypes, layouts, strides, kernel sizes, paddings,
activations and both BatchNorm modes; gradcheck, opcheck, torch.compile, what autograd saves, the running-statistic
update, errors (Python and compiled rules agree), backend selection.

Triton runs here under the (slow) interpreter on CPU: it gets a few small cases; its kernel-level tests cover more.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as TF
from helpers import device_backends, require_backend, spy_kernels

import pykernels
from pykernels import functional as F
from pykernels import reference
from pykernels.ops import mbconv_se as ops
from pykernels.reference.mbconv_se import activation

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
NAMES = ("out", "pooled", "grad_x", "grad_weight", "grad_conv_bias", "grad_bn_weight", "grad_bn_bias")


pytestmark = pytest.mark.usefixtures("one_thread_per_xdist_worker")


def require(backend, device, dtype=torch.float32):
    require_backend("mbconv_se", backend, device)
    why = ops.OP.not_supported_reasons(backend, torch.device(device), [dtype], param_dtypes=(dtype,))
    if why:
        pytest.skip(f"{backend} on {device}: " + "; ".join(why))


def make_inputs(shape, k, dtype, device, layout="nchw", seed=0, conv_bias=True, affine=True):
    """(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var) at realistic scales: the conv output has
    a per-channel offset and the running statistics are near (not at) the batch's."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device=device)

    x = rand(b, c, h, 2 * w)[..., ::2] if layout == "noncontig" else rand(b, c, h, w)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = rand(c, 1, k, k, scale=1.0 / k).to(dtype)
    cb = rand(c, scale=0.5).to(dtype) if conv_bias else None
    bw = rand(c, scale=0.2, shift=1.0).to(dtype) if affine else None
    bb = rand(c, scale=0.5).to(dtype) if affine else None
    rm = rand(c, scale=0.5).float()
    rv = (rand(c, scale=0.2, shift=1.0).abs() + 0.2).float()
    return x, weight, cb, bw, bb, rm, rv


def _pads(padding, k):
    if padding is None:
        return (k // 2,) * 4
    return (padding,) * 4 if isinstance(padding, int) else padding


def eager(x, weight, cb, bw, bb, rm, rv, *, stride, padding, act, training, eps=1e-5):
    """The composition in x's dtype (parameters and statistics cast to it): pad -> conv2d -> batch_norm -> act, and
    the SE squeeze ``sum((2, 3))``."""
    cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
    y = TF.conv2d(TF.pad(x, _pads(padding, weight.shape[-1])), cast(weight), cast(cb), stride=stride, groups=x.shape[1])
    y = TF.batch_norm(y, cast(rm).clone(), cast(rv).clone(), cast(bw), cast(bb), training, 0.0, eps)
    z = activation(y, act)
    return z, z.sum((2, 3))


def oracle(x, weight, cb, bw, bb, rm, rv, *, stride, padding, act, training, eps=1e-5):
    k = weight.shape[-1]
    pad_l, pad_r, pad_t, pad_b = _pads(padding, k)
    out_h = ops.output_size(x.shape[2], k, stride, pad_t, pad_b)
    out_w = ops.output_size(x.shape[3], k, stride, pad_l, pad_r)
    out, pooled, _, _ = reference.mbconv_se(
        x, weight, cb, bw, bb, rm, rv, eps, stride, pad_t, pad_l, out_h, out_w, act, training, torch.float64
    )
    return out.permute(0, 3, 1, 2), pooled


def _run(fn, inputs, grad_out, grad_pooled):
    """(out, pooled, grads of x, weight, conv_bias, bn_weight, bn_bias) of ``fn(*inputs)``."""
    leaves = [t.detach().requires_grad_() if (t is not None and i < 5) else t for i, t in enumerate(inputs)]
    out, pooled = fn(*leaves)
    present = [t for t in leaves[:5] if t is not None]
    grads = iter(torch.autograd.grad((out, pooled), present, (grad_out.to(out.dtype), grad_pooled.to(pooled.dtype))))
    return out.detach(), pooled.detach(), [next(grads) if t is not None else None for t in leaves[:5]]


def check_against_oracle(backend, inputs, *, stride=1, padding=None, act="silu", training=False, floor_scale=1.0):
    kw = dict(stride=stride, padding=padding, act=act, training=training)
    x = inputs[0]
    ref64 = [t.double() if t is not None else None for t in inputs]
    want_out, want_pooled = oracle(*ref64, **kw)
    gen = torch.Generator().manual_seed(11)
    grad_out = torch.randn(want_out.shape, generator=gen).to(x.device)
    grad_pooled = torch.randn(want_pooled.shape, generator=gen).to(x.device) / want_out[0, 0].numel() ** 0.5

    def ours(*a):
        rm, rv = (None, None) if training else (a[5], a[6])
        return F.mbconv_se(
            *a[:5], rm, rv, training=training, momentum=None, stride=stride, padding=padding, act=act, backend=backend
        )

    out, pooled, grads = _run(ours, inputs, grad_out, grad_pooled)
    w_out, w_pooled, w_grads = _run(lambda *a: oracle(*a, **kw), ref64, grad_out.double(), grad_pooled.double())
    e_out, e_pooled, e_grads = _run(lambda *a: eager(*a, **kw), inputs, grad_out, grad_pooled)
    assert out.dtype == x.dtype and out.shape == want_out.shape
    assert out.permute(0, 2, 3, 1).is_contiguous(), "out must be channels-last in memory"
    assert pooled.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    report = []
    for name, got, ref, eag, src in zip(
        NAMES, [out, pooled, *grads], [w_out, w_pooled, *w_grads], [e_out, e_pooled, *e_grads], [None, None, *inputs]
    ):
        if ref is None:
            assert got is None, name
            continue
        if src is not None:
            assert got.dtype == src.dtype and got.shape == src.shape, name
        err = (got.double() - ref).abs().max().item()
        eager_err = (eag.double() - ref).abs().max().item()
        scale = ref.abs().max().item() + 1e-30
        bound = 2 * eager_err + FLOOR[x.dtype] * floor_scale * scale
        report.append(f"{name}: err {err:.3g} eager {eager_err:.3g} bound {bound:.3g}")
        assert err <= bound, "\n".join(report)


# (shape, k, stride, padding, act, training, layout)
CASES = {
    "s1k3": ((2, 16, 13, 13), 3, 1, None, "silu", False, "nchw"),
    "s1k5_train": ((2, 24, 9, 11), 5, 1, None, "silu", True, "channels_last"),
    "s2k3_same_tf": ((2, 16, 14, 14), 3, 2, (0, 1, 0, 1), "silu", False, "channels_last"),
    "s2k5_train_hf": ((1, 40, 15, 15), 5, 2, (1, 2, 1, 2), "relu", True, "nchw"),
    "s2k7": ((2, 8, 12, 9), 7, 2, 3, "hardswish", False, "nchw"),
    "s1k3_relu6_b1_train": ((1, 200, 7, 7), 3, 1, None, "relu6", True, "channels_last"),
    "s1k5_none": ((3, 5, 6, 5), 5, 1, None, "none", False, "noncontig"),
    "s2k3_1x1": ((2, 32, 1, 1), 3, 2, 1, "silu", True, "nchw"),
}


def _case_params():
    for device, backend in device_backends():
        slow = backend == "triton" and device == "cpu"
        for case in CASES:
            for dtype in DTYPES:
                if slow and (dtype != torch.float32 and case not in ("s2k3_same_tf",)):
                    continue
                yield pytest.param(device, backend, dtype, case, id=f"{device}-{backend}-{str(dtype)[6:]}-{case}")


@pytest.mark.parametrize(("device", "backend", "dtype", "case"), list(_case_params()))
def test_against_float64_oracle(device, backend, dtype, case):
    shape, k, stride, padding, act, training, layout = CASES[case]
    require(backend, device, dtype)
    inputs = make_inputs(shape, k, dtype, device, layout)
    check_against_oracle(backend, inputs, stride=stride, padding=padding, act=act, training=training)


@pytest.mark.parametrize(("device", "backend"), device_backends())
def test_without_optional_parameters(device, backend):
    require(backend, device)
    inputs = make_inputs((2, 8, 7, 6), 3, torch.float32, device, conv_bias=False, affine=False)
    check_against_oracle(backend, inputs, stride=2, padding=1, act="silu", training=True)
    check_against_oracle(backend, inputs, stride=1, act="relu", training=False)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck(backend, training):
    require(backend, "cpu", torch.float64)
    x, w, cb, bw, bb, rm, rv = make_inputs((2, 3, 6, 5), 3, torch.float64, "cpu")
    rm, rv = rm.double(), rv.double()

    def fn(x, w, cb, bw, bb):
        return F.mbconv_se(
            x,
            w,
            cb,
            bw,
            bb,
            rm.clone(),
            rv.clone(),
            training=training,
            stride=2,
            padding=(0, 1, 1, 1),
            act="silu",
            backend=backend,
        )

    leaves = [t.requires_grad_() for t in (x, w, cb, bw, bb)]
    assert torch.autograd.gradcheck(fn, leaves)


def _op_args(device="cpu", dtype=torch.float32, training=False):
    x, w, cb, bw, bb, rm, rv = make_inputs((2, 6, 7, 7), 3, dtype, device, "channels_last")
    if training:
        rm = rv = None
    return (x, w, cb, bw, bb, rm, rv, 1e-5, 2, 1, 1, 4, 4, "silu", training)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_opcheck(training):
    args = _op_args(training=training)
    leaves = [t.detach().requires_grad_() if (t is not None and i < 5) else t for i, t in enumerate(args)]
    torch.library.opcheck(ops.mbconv_se, (*leaves, "torch"))
    with torch.no_grad():
        out, pooled, mean, var = ops.mbconv_se(*args, "torch")
    stats = (mean, var) if training else (args[5], args[6])
    bwd_args = (torch.randn_like(out), torch.randn_like(pooled), *args[:5], *stats, 1e-5, 2, 1, 1, "silu", training)
    torch.library.opcheck(ops.mbconv_se_backward, (*bwd_args, True, True, "torch"))
    if ops.OP.compiled_schema_exists() and not ops.OP.backend_reasons("cpp", torch.device("cpu")):
        torch.library.opcheck(torch.ops.pykernels.mbconv_se_fwd.default, args)
        torch.library.opcheck(torch.ops.pykernels.mbconv_se_bwd.default, (*bwd_args, True, True))


def test_compile_fullgraph():
    x, w, cb, bw, bb, rm, rv = make_inputs((2, 8, 9, 9), 3, torch.float32, "cpu")

    def block(x, w, bw, bb):
        out, pooled = F.mbconv_se(x, w, None, bw, bb, None, None, training=True, momentum=None, stride=2, act="silu")
        return out * pooled[:, :, None, None].sigmoid()

    leaves = [t.clone().requires_grad_() for t in (x, w, bw, bb)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    want = block(*leaves)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got.sum(), leaves)
    g2 = torch.autograd.grad(want.sum(), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_saves_no_activation_sized_tensor_but_x(training):
    """Autograd keeps x, the parameters and (C,) statistics: nothing else of activation size (eager keeps the conv
    output, the BatchNorm output and the activation)."""
    x, w, cb, bw, bb, rm, rv = make_inputs((2, 32, 20, 20), 3, torch.float32, "cpu")
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.mbconv_se(x, w, cb, bw, bb, rm, rv, training=training, act="silu")
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_running_statistics_update_as_batch_norm(momentum):
    """Training mode normalises with the batch's statistics and updates the running ones as nn.BatchNorm2d does."""
    x, w, cb, bw, bb, rm, rv = make_inputs((4, 8, 9, 9), 3, torch.float32, "cpu")
    bn = torch.nn.BatchNorm2d(8, momentum=momentum).train()
    with torch.no_grad():
        bn.weight.copy_(bw), bn.bias.copy_(bb), bn.running_mean.copy_(rm), bn.running_var.copy_(rv)
    mine_mean, mine_var = rm.clone(), rv.clone()
    for step in range(3):
        xs = x * (step + 1)
        want = activation(bn(TF.conv2d(xs, w, cb, padding=1, groups=8)), "silu")
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        out, _ = F.mbconv_se(xs, w, cb, bw, bb, mine_mean, mine_var, training=True, momentum=factor, act="silu")
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine_var, bn.running_var, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    x, w, cb, bw, bb, rm, rv = make_inputs((2, 4, 6, 6), 3, torch.float32, "cpu")
    cases = [
        (ValueError, r"4-D \(B, C, H, W\)", (x[0], w), {}),
        (ValueError, "kernel size 9 not supported: mbconv_se takes k in {3, 5, 7}", (x, torch.randn(4, 1, 9, 9)), {}),
        (ValueError, "stride 3 not supported", (x, w), dict(stride=3)),
        (
            ValueError,
            "activation 'gelu' not supported: mbconv_se takes none, relu, relu6, silu, hardswish",
            (x, w),
            dict(act="gelu"),
        ),
        (ValueError, "weight has 5 channels but x has C = 4", (x, torch.randn(5, 1, 3, 3)), {}),
        (ValueError, r"bn_weight must have shape \(C,\) = \(4,\)", (x, w, None, torch.ones(5)), {}),
        (TypeError, "bn_bias is float64 but x is float32", (x, w, None, None, bb.double()), {}),
        (ValueError, "running_mean and running_var are needed", (x, w), {}),
        (ValueError, r"padding must be an int or \(left, right, top, bottom\)", (x, w), dict(padding=(1, 1))),
        (ValueError, "padding top = 3 must be in", (x, w), dict(padding=(1, 1, 3, 1))),
        (
            ValueError,
            "Expected more than 1 value per channel when training",
            (x[:1, :, :1, :1], w),
            dict(training=True, padding=1),
        ),
        (ValueError, "unknown pykernels backend 'cudnn'", (x, w, None, None, None, rm, rv), dict(backend="cudnn")),
    ]
    for exc, pattern, args, kwargs in cases:
        with pytest.raises(exc, match=pattern):
            F.mbconv_se(*args, **kwargs)


# every argument rule of check_args, one broken rule per call (op-level arguments); x (2, 4, 6, 6) float32, k = 3
_OTHER_DEVICE = "cuda" if torch.cuda.is_available() else None


def _rule_cases():
    other = _OTHER_DEVICE or "meta"
    x, w, cb, bw, bb, rm, rv = make_inputs((2, 4, 6, 6), 3, torch.float32, "cpu")
    base = dict(
        x=x,
        weight=w,
        conv_bias=cb,
        bn_weight=bw,
        bn_bias=bb,
        running_mean=rm,
        running_var=rv,
        eps=1e-5,
        stride=1,
        pad_t=1,
        pad_l=1,
        out_h=6,
        out_w=6,
        act="silu",
        batch_stats=False,
    )
    cases = {
        "x_dim": dict(x=x[0]),
        "x_dtype": dict(x=x.int(), weight=w.int()),
        "x_no_rows": dict(x=x[:, :, :0]),
        "weight_shape": dict(weight=torch.randn(4, 2, 3, 3)),
        "weight_channels": dict(weight=torch.randn(5, 1, 3, 3)),
        "kernel_9": dict(weight=torch.randn(4, 1, 9, 9)),
        "stride_3": dict(stride=3),
        "act": dict(act="gelu"),
        "pad_top": dict(pad_t=3),
        "pad_left_negative": dict(pad_l=-1),
        "out_h_too_big": dict(out_h=8),
        "out_w_zero": dict(out_w=0),
        "conv_bias_shape": dict(conv_bias=torch.randn(5)),
        "bn_weight_dtype": dict(bn_weight=bw.double()),
        "bn_bias_device": dict(bn_bias=bb.to(other)),
        "running_var_missing": dict(running_var=None),
        "eps": dict(eps=-1.0),
    }
    return {name: dict(base, **change) for name, change in cases.items()}


@pytest.mark.parametrize("case", list(_rule_cases()))
def test_compiled_and_python_rules_agree(case):
    """The argument rules live in pykernels/ops/mbconv_se.py (check_args); csrc/mbconv_se_args.h is the compiled
    side's copy. Both refuse the same calls with the same message."""
    require_backend("mbconv_se", "cpp", "cpu")
    if case.endswith("_device") and _OTHER_DEVICE is None:
        pytest.skip("mixing devices needs a CUDA device (a meta tensor would dispatch to the fake kernel)")
    args = list(_rule_cases()[case].values())
    with pytest.raises((TypeError, ValueError)) as python:
        ops.check_args(*args)
    with pytest.raises(RuntimeError) as compiled:
        torch.ops.pykernels.mbconv_se_fwd(*args)
    prefix = "mbconv_se_fwd: "
    assert str(compiled.value).startswith(prefix), str(compiled.value)
    assert str(compiled.value)[len(prefix) :] == str(python.value)


def test_backend_selection_and_backward_pin(monkeypatch):
    """Automatic: cpp if built, else torch, on CPU; an explicit choice made for the forward runs the backward too."""
    ran = spy_kernels(monkeypatch, ops.OP)
    x, w, cb, bw, bb, rm, rv = make_inputs((2, 4, 5, 5), 3, torch.float32, "cpu")
    auto = "cpp" if not ops.OP.not_supported_reasons("cpp", torch.device("cpu"), [torch.float32]) else "torch"
    F.mbconv_se(x, w, cb, bw, bb, rm, rv)
    assert ran == [auto]
    ran.clear()
    x.requires_grad_()
    with pykernels.use_backend("torch"):
        out, pooled = F.mbconv_se(x, w, cb, bw, bb, rm, rv)
    (out.sum() + pooled.sum()).backward()
    assert ran == ["torch", "torch"]


def test_gpu_priority():
    assert tuple(ops.OP.gpu_priority) == ("cuda", "triton", "torch")
    assert tuple(ops.OP.cpu_priority) == ("cpp", "torch")


# ---- the C++ CPU kernels: bands, thread count, ISA paths -------------------------------------------------------------

# Shapes cut into several bands of output rows (the kernels make B * bands reach ~32 units, >= 8 rows per band): the
# backward's halo rows, the grad_x rows each band owns, stride 2 with odd / even sizes, cropped columns, C a multiple
# of 16 in the compute dtype (rows of out / grad_out / grad_x used in place).
BAND_CASES = {
    "k5s1_train_cl": ((1, 24, 40, 37), 5, 1, None, "silu", True, "channels_last"),
    "k3s2_tf_same_nchw": ((1, 20, 45, 33), 3, 2, (0, 1, 0, 1), "hardswish", False, "nchw"),
    "k7s2_train_nchw": ((2, 16, 35, 30), 7, 2, 3, "relu", True, "nchw"),
    "k3s2_crop_cl": ((1, 16, 34, 20), 3, 2, 0, "relu6", False, "channels_last"),
    "k3s1_train_c200": ((1, 200, 17, 9), 3, 1, None, "silu", True, "channels_last"),
    "k5s1_train_c32": ((2, 32, 30, 45), 5, 1, None, "silu", True, "channels_last"),
    "k7s2_asym_c48": ((1, 48, 40, 41), 7, 2, (3, 2, 3, 2), "hardswish", False, "channels_last"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(BAND_CASES))
def test_cpp_bands_against_float64_oracle(case, dtype):
    shape, k, stride, padding, act, training, layout = BAND_CASES[case]
    require("cpp", "cpu", dtype)
    inputs = make_inputs(shape, k, dtype, "cpu", layout, seed=3)
    check_against_oracle("cpp", inputs, stride=stride, padding=padding, act=act, training=training)


def _cpp_run(inputs, grad_out, grad_pooled, *, training, stride, act):
    """Raw compiled ops: (out, pooled, mean, var, grad_x, grad_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias)."""
    x, w, cb, bw, bb, rm, rv = inputs
    k = w.shape[-1]
    out_h = ops.output_size(x.shape[2], k, stride, k // 2, k // 2)
    out_w = ops.output_size(x.shape[3], k, stride, k // 2, k // 2)
    fwd_stats = (None, None) if training else (rm, rv)
    common = (1e-5, stride, k // 2, k // 2)
    out, pooled, mean, var = torch.ops.pykernels.mbconv_se_fwd(
        x, w, cb, bw, bb, *fwd_stats, *common, out_h, out_w, act, training
    )
    stats = (mean, var) if training else (rm, rv)
    grads = torch.ops.pykernels.mbconv_se_bwd(
        grad_out, grad_pooled, x, w, cb, bw, bb, *stats, *common, act, training, True, True
    )
    return (out, pooled, mean, var, *grads)


def _thread_case(layout):
    inputs = make_inputs((3, 40, 37, 23), 5, torch.float32, "cpu", layout, seed=5)
    gen = torch.Generator().manual_seed(6)
    grad_out = torch.randn(3, 19, 12, 40, generator=gen)
    grad_pooled = torch.randn(3, 40, generator=gen)
    return inputs, grad_out, grad_pooled


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpp_independent_of_thread_count(layout, training):
    """The C++ kernels split work into bands and tasks by shape only and add the partial sums (SE sums, batch
    statistics, parameter gradients) in a fixed order: 1, 2 and 3 intra-op threads give bit-identical results."""
    require("cpp", "cpu")
    inputs, grad_out, grad_pooled = _thread_case(layout)
    names = (
        "out",
        "pooled",
        "mean",
        "var",
        "grad_x",
        "grad_weight",
        "grad_conv_bias",
        "grad_bn_weight",
        "grad_bn_bias",
    )
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_cpp_run(inputs, grad_out, grad_pooled, training=training, stride=2, act="silu"))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name, got, want in zip(names, run, runs[0]):
            assert torch.equal(got, want), f"{name} depends on the thread count"


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import pykernels.ops
from test_mbconv_se import _cpp_run, _thread_case
torch.set_num_threads(2)
results = []
for layout in ("nchw", "channels_last"):
    for training, act in ((False, "silu"), (True, "hardswish")):
        inputs, grad_out, grad_pooled = _thread_case(layout)
        results.append(_cpp_run(inputs, grad_out, grad_pooled, training=training, stride=2, act=act))
torch.save(results, sys.argv[1])
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_cpp_isa_paths_agree(isa, tmp_path):
    """The vector code is instantiated for the baseline ISA, AVX2 and AVX-512 (chosen at run time; PYKERNELS_CPU_ISA
    caps it): every path does the same per-channel operations in the same order, so all give the same bits."""
    require("cpp", "cpu")
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_ISA_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    results = {}
    for name in ("default", isa):
        env = dict(os.environ)
        env.pop("PYKERNELS_CPU_ISA", None)
        if name != "default":
            env["PYKERNELS_CPU_ISA"] = name
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, str(script), str(path)], env=env, check=True, timeout=600)
        results[name] = torch.load(path)
    for got_run, want_run in zip(results[isa], results["default"]):
        for got, want in zip(got_run, want_run):
            assert torch.equal(got, want), f"the {isa} path differs from the default one"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cpp_large_outputs(training):
    """Outputs of 32 MiB and more take other store paths in the C++ kernels (non-temporal stores, huge-page hints):
    out, pooled, the statistics and every gradient of a 32.2 MiB channels-last float32 problem against the float64
    oracle: error <= 2 x the float32 torch backend's error + a floor."""
    require("cpp", "cpu")
    inputs = make_inputs((1, 64, 363, 363), 3, torch.float32, "cpu", "channels_last", seed=9)
    x, w, cb, bw, bb, rm, rv = inputs
    x64, w64, cb64, bw64, bb64, rm64, rv64 = (t.double() for t in inputs)
    stats = (None, None) if training else (rm, rv)
    common = (1e-5, 1, 1, 1)
    got = torch.ops.pykernels.mbconv_se_fwd(x, w, cb, bw, bb, *stats, *common, 363, 363, "silu", training)
    assert got[0].nbytes >= 32 << 20
    want = reference.mbconv_se_fwd(
        x64, w64, cb64, bw64, bb64, *((None, None) if training else (rm64, rv64)), *common, 363, 363, "silu", training
    )
    fp32 = reference.mbconv_se_fwd(x, w, cb, bw, bb, *stats, *common, 363, 363, "silu", training)
    gen = torch.Generator().manual_seed(10)
    grad_out = torch.randn(got[0].shape, generator=gen)
    mean, var = (got[2], got[3]) if training else (rm, rv)
    tail = ("silu", training, True, True)
    grads = torch.ops.pykernels.mbconv_se_bwd(grad_out, None, x, w, cb, bw, bb, mean, var, *common, *tail)
    want_grads = reference.mbconv_se_bwd(
        grad_out.double(), None, x64, w64, cb64, bw64, bb64, mean.double(), var.double(), *common, *tail
    )
    fp32_grads = reference.mbconv_se_bwd(grad_out, None, x, w, cb, bw, bb, mean, var, *common, *tail)
    assert grads[0].stride() == x.stride()
    names = (
        "out",
        "pooled",
        "mean",
        "var",
        "grad_x",
        "grad_weight",
        "grad_conv_bias",
        "grad_bn_weight",
        "grad_bn_bias",
    )
    for name, a, b, c in zip(names, (*got, *grads), (*want, *want_grads), (*fp32, *fp32_grads)):
        err = (a.double() - b).abs().max().item() if b.numel() else 0.0
        bound = 2 * (c.double() - b).abs().max().item() + 1e-6 * b.abs().max().item() if b.numel() else 0.0
        assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g}"
