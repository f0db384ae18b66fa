"""dwconv_ln (depthwise k x k conv + LayerNorm over channels, ConvNeXt's block front) on every backend: forward and all
five gradients against the float64 oracle by flash-attention's rule (error <= 2 x eager PyTorch's error in the same
dtype + a floor), over dtypes, layouts, awkward shapes and kernel sizes; gradcheck, opcheck, torch.compile, what
autograd saves, determinism, errors, backend selection, and DWConvLayerNorm against timm / torchvision / Hugging Face.

Triton runs here under the (slow) interpreter on CPU: it gets a few small cases; its kernel-level tests cover more.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as TF
from helpers import device_backends, require_backend, spy_kernels

import pykernels
from pykernels import functional as F
from pykernels import reference
from pykernels.modules.dwconv_ln import DWConvLayerNorm
from pykernels.ops import dwconv_ln as ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    """On a GPU, eager float32 convs (forward and backward) in full float32, not TF32: eager is the yardstick."""
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allow


pytestmark = pytest.mark.usefixtures("one_thread_per_xdist_worker")


EPS = 1e-6
# floor of the pass rule, relative to the largest oracle value: about one rounding of the result in the dtype
FLOOR = {torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float64: 1e-12}
NAMES = ("out", "grad_x", "grad_weight", "grad_conv_bias", "grad_ln_weight", "grad_ln_bias")


def _id(v):
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v).replace("torch.", "")


def _triton_slow(device, backend):
    return backend == "triton" and device == "cpu"


def require(backend, device, dtype=torch.float32, kernel_size=7):
    """Skip unless ``backend`` runs dwconv_ln on ``device`` here (built / importable) for this dtype."""
    require_backend("dwconv_ln", backend, device)
    why = ops.OP.not_supported_reasons(
        backend, torch.device(device), [dtype], kernel_size=kernel_size, param_dtypes=(dtype,)
    )
    if why:
        pytest.skip(f"{backend} on {device}: " + "; ".join(why))


def make_inputs(shape, k, dtype, device, layout="nchw", param_dtype=None, seed=0, affine=True, conv_bias=True):
    """(x, weight, conv_bias, ln_weight, ln_bias) with realistic scales (the conv output has a per-channel offset)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    param_dtype = param_dtype or dtype

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device=device)

    if layout == "noncontig":  # a strided view: every other column of a wider tensor
        x = rand(b, c, h, 2 * w)[..., ::2]
    elif layout == "permuted":  # (B, H, C, W) memory: neither NCHW nor channels_last
        x = rand(b, h, c, w).permute(0, 2, 1, 3)
    else:
        x = rand(b, c, h, w)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = rand(c, 1, k, k, scale=1.0 / k).to(param_dtype)
    cb = rand(c, scale=0.5).to(param_dtype) if conv_bias else None
    lw = rand(c, scale=0.2, shift=1.0).to(param_dtype) if affine else None
    lb = rand(c, scale=0.2).to(param_dtype) if affine else None
    return x, weight, cb, lw, lb


def eager(x, weight, cb, lw, lb, eps=EPS):
    """ConvNeXt's composition in x's dtype (parameters cast to it): conv2d -> permute -> layer_norm."""
    cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
    k = weight.shape[-1]
    y = TF.conv2d(x, cast(weight), cast(cb), padding=k // 2, groups=x.shape[1]).permute(0, 2, 3, 1)
    return TF.layer_norm(y, (x.shape[1],), cast(lw), cast(lb), eps)


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


def check_against_oracle(backend, inputs, out_dtype, eps=EPS, extra_floor=0.0):
    """Forward and every gradient of ``backend`` vs the float64 oracle: err <= 2 x eager err + floor."""
    x = inputs[0]
    grad_out = torch.randn(
        (x.shape[0], x.shape[2], x.shape[3], x.shape[1]), generator=torch.Generator().manual_seed(7)
    ).to(device=x.device, dtype=out_dtype)
    out, grads = _grads(lambda *a: F.dwconv_ln(*a, eps=eps, backend=backend), inputs, grad_out)
    ref64 = [t.double() if t is not None else None for t in inputs]
    want, want_grads = _grads(lambda *a: reference.dwconv_ln(*a, eps, torch.float64)[0], ref64, grad_out.double())
    eager_out, eager_grads = _grads(lambda *a: eager(*a, eps=eps), inputs, grad_out)
    assert out.dtype == out_dtype and out.shape == grad_out.shape and out.is_contiguous()
    report = []
    for name, got, ref, eag, src in zip(
        NAMES, [out, *grads], [want, *want_grads], [eager_out, *eager_grads], [None, *inputs]
    ):
        if ref is None:
            assert got is None
            continue
        if src is not None:
            assert got.dtype == src.dtype and got.shape == src.shape, name
        err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
        eager_err = (eag.double() - ref).abs().max().item() if ref.numel() else 0.0
        floor = (FLOOR[got.dtype if src is not None else out_dtype] + extra_floor) * (ref.abs().max().item() + 1e-3)
        assert torch.isfinite(got).all(), name
        report.append((name, err, eager_err, floor))
    bad = [r for r in report if not r[1] <= 2 * r[2] + r[3]]
    assert not bad, "; ".join(f"{n}: err {e:.3g} > 2 x eager {ee:.3g} + floor {f:.3g}" for n, e, ee, f in bad)
    return out, grads


# ---- forward + every gradient vs the oracle ----------------------------------------------------------------------

CASES = [  # (B, C, H, W), k, layout
    ((2, 16, 13, 13), 7, "nchw"),
    ((2, 16, 13, 13), 7, "channels_last"),
    ((1, 200, 7, 7), 7, "nchw"),
    ((2, 200, 7, 7), 5, "channels_last"),
    ((2, 3, 7, 7), 3, "channels_last"),
    ((1, 8, 55, 55), 7, "nchw"),
    ((3, 12, 1, 1), 7, "nchw"),
    ((2, 12, 1, 1), 3, "channels_last"),
    ((1, 24, 9, 6), 13, "noncontig"),
    ((2, 10, 6, 9), 11, "permuted"),
]
TRITON_CPU_CASES = {0, 1, 4}  # the interpreter is slow: small shapes only


def _oracle_params():
    params = []
    for device, backend in device_backends():
        for dtype in DTYPES:
            for i, (shape, k, layout) in enumerate(CASES):
                if _triton_slow(device, backend) and (i not in TRITON_CPU_CASES or dtype == torch.bfloat16):
                    continue
                params.append(
                    pytest.param(
                        device,
                        backend,
                        dtype,
                        shape,
                        k,
                        layout,
                        id=f"{device}-{backend}-{_id(dtype)}-{_id(shape)}-k{k}-{layout}",
                    )
                )
    return params


@pytest.mark.parametrize("device,backend,dtype,shape,k,layout", _oracle_params())
def test_forward_backward_vs_oracle(device, backend, dtype, shape, k, layout):
    require(backend, device, dtype, k)
    inputs = make_inputs(shape, k, dtype, device, layout)
    check_against_oracle(backend, inputs, dtype)


def _kernel_size_params():
    params = []
    for device, backend in device_backends():
        for k in ops.SUPPORTED_KERNEL_SIZES:
            for layout in ("nchw", "channels_last"):
                if _triton_slow(device, backend) and (k != 13 or layout == "nchw"):  # k = 3, 7: the oracle grid
                    continue
                params.append(pytest.param(device, backend, k, layout, id=f"{device}-{backend}-k{k}-{layout}"))
    return params


@pytest.mark.parametrize("device,backend,k,layout", _kernel_size_params())
def test_every_kernel_size(device, backend, k, layout):
    """k = 3..13 on an image smaller than the kernel on one side (halo wider than the image)."""
    require(backend, device, torch.float32, k)
    shape = (1, 6, 7, 5) if _triton_slow(device, backend) else (2, 12, 9, 5)
    inputs = make_inputs(shape, k, torch.float32, device, layout)
    check_against_oracle(backend, inputs, torch.float32)


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize(
    "x_dtype,param_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)], ids=_id
)
def test_mixed_precision_params(device, backend, x_dtype, param_dtype):
    """Autocast-style mix: bf16 / fp16 activations with float32 parameters; each gradient in its tensor's dtype."""
    require(backend, device, x_dtype)
    inputs = make_inputs((2, 20, 6, 6), 7, x_dtype, device, "channels_last", param_dtype=param_dtype)
    # eager casts the float32 parameters to x's dtype, which the kernels do not: the floor is the dtype's rounding
    out, grads = check_against_oracle(backend, inputs, x_dtype)
    assert [g.dtype for g in grads] == [x_dtype] + [param_dtype] * 4


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_float64(device, backend):
    """float64: the cpp and torch backends; Triton / CUDA refuse it with a reason."""
    reasons = ops.OP.not_supported_reasons(
        backend, torch.device(device), [torch.float64], kernel_size=5, param_dtypes=(torch.float64,)
    )
    inputs = make_inputs((2, 6, 5, 4), 5, torch.float64, device, "channels_last")
    if backend in ("triton", "cuda"):
        assert any("float64 not supported" in r for r in reasons)
        with pytest.raises(pykernels.BackendNotSupportedError, match="float64 not supported"):
            F.dwconv_ln(*inputs, backend=backend)
        return
    require(backend, device, torch.float64, 5)
    out = F.dwconv_ln(*inputs, backend=backend)
    want = reference.dwconv_ln(*inputs, EPS, torch.float64)[0]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ---- layouts, requires_grad subsets, parameters absent -------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_out_layout_nchw_is_a_channels_last_view(device, backend, layout):
    require(backend, device)
    inputs = make_inputs((2, 8, 5, 6), 3, torch.float32, device, layout)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = F.dwconv_ln(*leaves, out_layout="nchw", backend=backend)
    nhwc = F.dwconv_ln(*inputs, backend=backend)
    assert out.shape == (2, 8, 5, 6) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, nhwc.permute(0, 3, 1, 2))
    # backward through the view: grad_out arrives NCHW-strided and is made (B, H, W, C) contiguous inside
    (out * torch.arange(out.numel(), dtype=out.dtype, device=device).reshape(out.shape).sin()).sum().backward()
    ref = [t.clone().requires_grad_() for t in inputs]
    eager(*ref).permute(0, 3, 1, 2).mul(
        torch.arange(out.numel(), dtype=out.dtype, device=device).reshape(out.shape).sin()
    ).sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
    if layout == "channels_last":
        assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=lambda n: "x" if n[0] else "params")
def test_requires_grad_subsets(device, backend, needs):
    """Only x, or only the parameters, need a gradient: the right ones come back, the rest stay None."""
    require(backend, device)
    inputs = make_inputs((2, 6, 4, 5), 3, torch.float32, device, "nchw")
    need_x, need_params = needs
    leaves = [inputs[0].clone().requires_grad_(need_x)] + [t.clone().requires_grad_(need_params) for t in inputs[1:]]
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    out = F.dwconv_ln(*leaves, backend=backend)
    out.pow(2).sum().backward()
    eager(*ref).pow(2).sum().backward()
    for got, want in zip(leaves, ref):
        if got.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
        else:
            assert got.grad is None
    # needs nothing: no graph at all
    assert not F.dwconv_ln(*inputs, backend=backend).requires_grad


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize("absent", ["conv_bias", "ln_affine", "all"])
def test_optional_parameters_absent(device, backend, absent):
    require(backend, device)
    inputs = make_inputs(
        (2, 7, 5, 5),
        5,
        torch.float32,
        device,
        "channels_last",
        conv_bias=absent == "ln_affine",
        affine=absent == "conv_bias",
    )
    check_against_oracle(backend, inputs, torch.float32)


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_empty_batch(device, backend):
    require(backend, device)
    inputs = make_inputs((0, 4, 5, 5), 3, torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = F.dwconv_ln(*leaves, backend=backend)
    assert out.shape == (0, 5, 5, 4)
    out.sum().backward()
    assert leaves[0].grad.shape == inputs[0].shape and torch.equal(leaves[1].grad, torch.zeros_like(inputs[1]))


# ---- what autograd keeps; determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_autograd_saves_nothing_of_activation_size_but_x(device, backend, layout):
    require(backend, device)
    shape = (2, 8, 6, 7)
    x, *params = make_inputs(shape, 3, torch.float32, device, layout)
    x.requires_grad_()
    params = [p.requires_grad_() for p in params]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = F.dwconv_ln(x, *params, backend=backend)
        out_nchw = F.dwconv_ln(x, *params, out_layout="nchw", backend=backend)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big, "x should be saved"
    for t in big:
        assert t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.stride() == x.stride(), (
            f"autograd saved a {tuple(t.shape)} tensor that is not x"
        )
    (out.sum() + out_nchw.sum()).backward()
    assert x.grad is not None


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_deterministic(device, backend):
    """Two runs give bit-identical outputs and gradients (parameter-grad reductions in a fixed order), with two
    intra-op threads (also under xdist, where the other tests run on one)."""
    require(backend, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_deterministic(device, backend)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpp_independent_of_thread_count(layout):
    """The C++ kernels split work and reduce the parameter gradients by shape only: 1, 2 and 3 intra-op threads give
    bit-identical outputs and gradients."""
    require("cpp", "cpu")
    shape = (2, 40, 11, 9)
    inputs = make_inputs(shape, 7, torch.float32, "cpu", layout)
    grad_out = torch.randn(shape[0], shape[2], shape[3], shape[1])
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_grads(lambda *a: F.dwconv_ln(*a, backend="cpp"), inputs, grad_out))
    finally:
        torch.set_num_threads(threads)
    (out0, g0) = runs[0]
    for out, grads in runs[1:]:
        assert torch.equal(out, out0)
        for name, a, b in zip(NAMES[1:], grads, g0):
            assert torch.equal(a, b), f"{name} depends on the thread count"


def _check_deterministic(device, backend):
    shape = (1, 16, 5, 5) if _triton_slow(device, backend) else (2, 48, 19, 19)
    inputs = make_inputs(shape, 7, torch.float32, device, "channels_last")
    grad_out = torch.randn(shape[0], shape[2], shape[3], shape[1], device=device)
    runs = [_grads(lambda *a: F.dwconv_ln(*a, backend=backend), inputs, grad_out) for _ in range(2)]
    (out0, g0), (out1, g1) = runs
    assert torch.equal(out0, out1)
    for name, a, b in zip(NAMES[1:], g0, g1):
        assert torch.equal(a, b), f"{name} differs between two runs"


# ---- gradcheck, opcheck, torch.compile -----------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Hundreds of tiny calls: one intra-op thread (a thread pool waking per tiny op dominates on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_gradcheck_float64(backend, layout, affine, one_thread):
    require(backend, "cpu", torch.float64, 3)
    inputs = make_inputs((2, 4, 4, 3), 3, torch.float64, "cpu", layout, affine=affine, conv_bias=affine)
    inputs = tuple(t.detach().requires_grad_() for t in inputs if t is not None)

    def fn(*args):
        x, weight, *rest = args
        cb, lw, lb = rest if rest else (None, None, None)
        return F.dwconv_ln(x, weight, cb, lw, lb, eps=1e-5, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _opcheck_samples(device):
    samples = []
    for shape, k, layout, affine in [
        ((2, 6, 5, 4), 3, "nchw", True),
        ((2, 6, 5, 4), 5, "channels_last", True),
        ((1, 5, 3, 6), 3, "noncontig", False),
    ]:
        samples.append(make_inputs(shape, k, torch.float32, device, layout, affine=affine, conv_bias=affine))
    return samples


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_opcheck_python_ops(device, backend, one_thread):
    require(backend, device)
    samples = _opcheck_samples(device)
    if _triton_slow(device, backend):
        samples = samples[:1]
    for i, (x, weight, cb, lw, lb) in enumerate(samples):
        args = (x.requires_grad_(), weight.requires_grad_(), cb, lw, lb, EPS, backend)
        torch.library.opcheck(torch.ops.pykernels.dwconv_ln.default, args)
        out, mean, rstd = ops.dwconv_ln(x.detach(), weight.detach(), cb, lw, lb, EPS, backend)
        grad_out = torch.randn_like(out)
        combos = [(True, True), (False, True), (True, False)][
            : 3 if i == 0 and not _triton_slow(device, backend) else 2
        ]
        for need_x, need_params in combos:
            args = (grad_out, x.detach(), weight.detach(), cb, lw, lb, mean, rstd, need_x, need_params, backend)
            torch.library.opcheck(torch.ops.pykernels.dwconv_ln_backward.default, args)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_compiled_ops(device, one_thread):
    require("cpp" if device == "cpu" else "cuda", device)
    for x, weight, cb, lw, lb in _opcheck_samples(device):
        x = ops.kernel_layout(x)
        torch.library.opcheck(torch.ops.pykernels.dwconv_ln_fwd.default, (x, weight, cb, lw, lb, EPS))
        out, mean, rstd = torch.ops.pykernels.dwconv_ln_fwd(x, weight, cb, lw, lb, EPS)
        grad_out = torch.randn_like(out)
        for need_x, need_params in [(True, True), (False, True), (True, False)]:
            torch.library.opcheck(
                torch.ops.pykernels.dwconv_ln_bwd.default,
                (grad_out, x, weight, cb, lw, lb, mean, rstd, need_x, need_params),
            )


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) (inductor) of DWConvLayerNorm, both out layouts: same values and gradients.

    The on-disk AOTAutograd / FX graph caches are off here: their keys do not cover a custom op's Python autograd
    code, so a graph cached by an older pykernels would be replayed."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with functorch_config.patch(enable_autograd_cache=False), inductor_config.patch(fx_graph_cache=False):
        _compare_compiled_module()


def _compare_compiled_module():
    module = DWConvLayerNorm(16, 7)
    with torch.no_grad():
        module.norm.weight.uniform_(0.5, 1.5)
        module.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    for out_layout in ("nhwc", "nchw"):
        module.out_layout = out_layout
        compiled = torch.compile(module, fullgraph=True)
        results = []
        for fn in (compiled, module):
            xi = x.clone().requires_grad_()
            out = fn(xi)
            (out * out).sum().backward()
            results.append((out.detach(), xi.grad, [p.grad.clone() for p in module.parameters()]))
            module.zero_grad()
        (out, gx, gp), (want, want_gx, want_gp) = results
        assert out.shape == want.shape and out.stride() == want.stride()
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(gx, want_gx)
        for got, ref in zip(gp, want_gp):
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_compile_each_backend_aot_eager(device, backend):
    """Every backend's kernels run inside a fullgraph-compiled graph (aot_eager: same tracing path, fast)."""
    require(backend, device)
    torch._dynamo.reset()
    module = DWConvLayerNorm(8, 3, backend=backend).to(device)
    x = torch.randn(2, 8, 5, 5, device=device, requires_grad=True)
    out = torch.compile(module, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    want = module(x.detach())
    torch.testing.assert_close(out, want)
    assert x.grad is not None and module.conv_dw.weight.grad is not None


# ---- errors, backend selection -------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 1, 7, 7)
    cases = [
        (ValueError, r"4-D \(B, C, H, W\)", (torch.randn(4, 5, 5), w), {}),
        (ValueError, r"weight has 6 channels but x has C = 4", (x, torch.randn(6, 1, 7, 7)), {}),
        (ValueError, r"kernel size 4 not supported.*odd k from 3 to 13", (x, torch.randn(4, 1, 4, 4)), {}),
        (ValueError, r"kernel size 15 not supported.*3, 5, 7, 9, 11, 13", (x, torch.randn(4, 1, 15, 15)), {}),
        (ValueError, r"kernel size 1 not supported", (x, torch.randn(4, 1, 1, 1)), {}),
        (ValueError, r"depthwise conv weight of shape \(C, 1, k, k\)", (x, torch.randn(4, 2, 7, 7)), {}),
        (ValueError, r"depthwise conv weight of shape \(C, 1, k, k\)", (x, torch.randn(4, 1, 7, 5)), {}),
        (ValueError, r"conv_bias must have shape \(C,\) = \(4,\)", (x, w, torch.randn(5)), {}),
        (ValueError, r"ln_weight must have shape", (x, w, None, torch.randn(4, 1)), {}),
        (ValueError, r"ln_bias is on meta but x is on cpu", (x, w, None, None, torch.randn(4, device="meta")), {}),
        (
            TypeError,
            r"conv_bias is bfloat16 but x is float32.*x's dtype or float32",
            (x, w, torch.randn(4).bfloat16()),
            {},
        ),
        (TypeError, r"weight is float64 but x is float16", (x.half(), w.double()), {}),
        (TypeError, r"weight is float32 but x is float64.*float64 x needs float64", (x.double(), w), {}),
        (TypeError, r"x must be float16, bfloat16, float32 or float64", (x.int(), w), {}),
        (ValueError, r"out_layout must be 'nhwc'", (x, w), dict(out_layout="NCHW")),
        (ValueError, r"unknown pykernels backend 'cudnn'", (x, w), dict(backend="cudnn")),
        (ValueError, r"x has 0 channels", (torch.randn(2, 0, 3, 3), torch.randn(0, 1, 3, 3)), {}),
    ]
    for exc, pattern, args, kwargs in cases:
        with pytest.raises(exc, match=pattern):
            F.dwconv_ln(*args, **kwargs)


# every argument rule of check_args, one broken rule per call: (what, args); x (2, 4, 5, 5) float32, k = 7. Mixing
# devices needs a second real device: a meta tensor would send the compiled op to its fake kernel.
_OTHER_DEVICE = "cuda" if torch.cuda.is_available() else None


def _rule_cases():
    other = _OTHER_DEVICE or "meta"
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 1, 7, 7)
    c = torch.randn(4)
    return {
        "x_dim": (torch.randn(4, 5, 5), w, None, None, None, EPS),
        "x_dtype": (x.int(), w.int(), None, None, None, EPS),
        "x_no_channels": (torch.randn(2, 0, 3, 3), torch.randn(0, 1, 3, 3), None, None, None, EPS),
        "x_no_pixels": (torch.randn(2, 4, 0, 5), w, None, None, None, EPS),
        "weight_not_depthwise": (x, torch.randn(4, 2, 7, 7), None, None, None, EPS),
        "weight_not_square": (x, torch.randn(4, 1, 7, 5), None, None, None, EPS),
        "weight_3d": (x, torch.randn(4, 7, 7), None, None, None, EPS),
        "weight_channels": (x, torch.randn(6, 1, 7, 7), None, None, None, EPS),
        "kernel_even": (x, torch.randn(4, 1, 4, 4), None, None, None, EPS),
        "kernel_1": (x, torch.randn(4, 1, 1, 1), None, None, None, EPS),
        "kernel_15": (x, torch.randn(4, 1, 15, 15), None, None, None, EPS),
        "weight_dtype": (x.half(), w.double(), None, None, None, EPS),
        "weight_f32_with_f64_x": (x.double(), w, None, None, None, EPS),
        "weight_device": (x, w.to(other), None, None, None, EPS),
        "conv_bias_shape": (x, w, torch.randn(5), None, None, EPS),
        "ln_weight_shape": (x, w, None, torch.randn(4, 1), None, EPS),
        "ln_bias_device": (x, w, None, None, torch.randn(4, device=other), EPS),
        "conv_bias_dtype": (x, w, c.bfloat16(), None, None, EPS),
        "ln_weight_dtype_f64": (x, w, None, c.double(), None, EPS),
        "eps": (x, w, None, None, None, -1.0),
        "two_problems": (x.half(), torch.randn(4, 1, 15, 15).double(), torch.randn(5), None, None, -1.0),
    }


@pytest.mark.parametrize("case", list(_rule_cases()))
def test_compiled_and_python_rules_agree(case):
    """The argument rules live in pykernels/ops/dwconv_ln.py (check_args); csrc/dwconv_ln_args.h is the compiled
    side's copy. Both refuse exactly the same calls with the same message, and accept the same calls."""
    require_backend("dwconv_ln", "cpp", "cpu")
    if case.endswith("_device") and _OTHER_DEVICE is None:
        pytest.skip("mixing devices needs a CUDA device (a meta tensor would dispatch to the fake kernel)")
    args = _rule_cases()[case]
    with pytest.raises((TypeError, ValueError)) as python:
        ops.check_args(*args)
    with pytest.raises(RuntimeError) as compiled:
        torch.ops.pykernels.dwconv_ln_fwd(*args)
    prefix = "dwconv_ln_fwd: "
    assert str(compiled.value).startswith(prefix), str(compiled.value)
    assert str(compiled.value)[len(prefix) :] == str(python.value)


def test_compiled_and_python_rules_accept_the_same_calls():
    require_backend("dwconv_ln", "cpp", "cpu")
    c = torch.randn(8)
    for dtype, param_dtype in (
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
    ):
        for k in ops.SUPPORTED_KERNEL_SIZES:
            args = (
                torch.randn(1, 8, 3, 4, dtype=dtype),
                torch.randn(8, 1, k, k, dtype=param_dtype),
                c.to(param_dtype),
                c.to(param_dtype),
                c.to(param_dtype),
                0.0,
            )
            ops.check_args(*args)
            torch.ops.pykernels.dwconv_ln_fwd(*args)


def test_module_errors():
    with pytest.raises(ValueError, match="kernel_size=8: kernel size 8 not supported.*odd k from 3 to 13"):
        DWConvLayerNorm(8, kernel_size=8)
    with pytest.raises(ValueError, match="out_layout"):
        DWConvLayerNorm(8, out_layout="hwc")
    ln = torch.nn.LayerNorm(8)
    bad_convs = {
        "not depthwise (in_channels=8, out_channels=8, groups=2": torch.nn.Conv2d(8, 8, 7, padding=3, groups=2),
        "stride (2, 2) (need 1)": torch.nn.Conv2d(8, 8, 7, padding=3, groups=8, stride=2),
        "dilation (2, 2) (need 1)": torch.nn.Conv2d(8, 8, 7, padding=6, groups=8, dilation=2),
        "padding (2, 2) (need k // 2 = 3": torch.nn.Conv2d(8, 8, 7, padding=2, groups=8),
        "padding_mode 'reflect'": torch.nn.Conv2d(8, 8, 7, padding=3, groups=8, padding_mode="reflect"),
        "kernel size 15": torch.nn.Conv2d(8, 8, 15, padding=7, groups=8),
        "not square": torch.nn.Conv2d(8, 8, (7, 5), padding=(3, 2), groups=8),
    }
    for what, conv in bad_convs.items():
        with pytest.raises(ValueError, match="unsupported conv: .*" + re.escape(what)):
            DWConvLayerNorm.from_module(conv, ln)
    conv = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    with pytest.raises(ValueError, match=r"normalizes over \(16,\)"):
        DWConvLayerNorm.from_module(conv, torch.nn.LayerNorm(16))
    with pytest.raises(TypeError, match="norm must be a LayerNorm"):
        DWConvLayerNorm.from_module(conv, torch.nn.BatchNorm2d(8))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        DWConvLayerNorm.from_module(torch.nn.Linear(8, 8), ln)


def test_explicit_backend_that_cannot_serve_lists_every_reason():
    x, w, *_ = make_inputs((2, 4, 5, 5), 7, torch.float32, "cpu")
    with pytest.raises(pykernels.BackendNotSupportedError) as info:
        F.dwconv_ln(x, w, backend="cuda")
    msg = str(info.value)
    assert "'cuda' cannot run dwconv_ln" in msg
    for name in ("triton:", "cuda:", "cpp:", "torch: supported"):
        assert name in msg


def test_unsupported_reasons_name_what_is_supported():
    cpu = torch.device("cpu")
    for backend in ("triton", "cuda", "cpp"):
        why = ops.OP.not_supported_reasons(backend, cpu, [torch.float32], kernel_size=15, param_dtypes=())
        assert any("kernel size 15" in r and "3, 5, 7, 9, 11, 13" in r for r in why), why
        why = ops.OP.not_supported_reasons(backend, cpu, [torch.float16], kernel_size=7, param_dtypes=(torch.bfloat16,))
        assert any("parameter dtype bfloat16 with float16 x" in r for r in why), why
    for backend in ("triton", "cuda"):
        why = ops.OP.not_supported_reasons(backend, cpu, [torch.float64], kernel_size=7)
        assert any("dtype float64 not supported" in r for r in why), why
    # the torch backend takes any odd kernel size and any dtype mix (the op, below the functional's checks)
    assert (
        ops.OP.not_supported_reasons("torch", cpu, [torch.float16], kernel_size=15, param_dtypes=(torch.float64,)) == []
    )
    assert "even" in ops.OP.not_supported_reasons("torch", cpu, [torch.float32], kernel_size=4)[0]
    # an op-level call with k = 15 and an explicit compiled backend: BackendNotSupportedError, torch runs it
    x, w, *_ = make_inputs((1, 3, 4, 4), 15, torch.float32, "cpu")
    with pytest.raises(pykernels.BackendNotSupportedError, match="kernel size 15 not supported"):
        ops.dwconv_ln(x, w, None, None, None, EPS, "cpp")
    torch.testing.assert_close(ops.dwconv_ln(x, w, None, None, None, EPS, "torch")[0], eager(x, w, None, None, None))


def test_backend_selection(monkeypatch):
    """Automatic: cpp if built, else torch, on CPU; argument > use_backend() > PYKERNELS_BACKEND; backward runs on
    the forward's backend even outside the use_backend() block."""
    ran = spy_kernels(monkeypatch, ops.OP)
    inputs = make_inputs((1, 4, 3, 3), 3, torch.float32, "cpu")
    auto = (
        "cpp"
        if not ops.OP.not_supported_reasons("cpp", torch.device("cpu"), [torch.float32], kernel_size=3)
        else "torch"
    )
    F.dwconv_ln(*inputs)
    monkeypatch.setenv("PYKERNELS_BACKEND", "torch")
    F.dwconv_ln(*inputs)
    with pykernels.use_backend(auto):
        F.dwconv_ln(*inputs)
        F.dwconv_ln(*inputs, backend="torch")
    assert ran == [auto, "torch", auto, "torch"]
    monkeypatch.delenv("PYKERNELS_BACKEND")
    ran.clear()
    x = inputs[0].clone().requires_grad_()
    with pykernels.use_backend("torch"):
        out = F.dwconv_ln(x, *inputs[1:])
    out.sum().backward()
    assert ran == ["torch", "torch"]
    # float64 on CPU: the cpp kernels take it too
    ran.clear()
    F.dwconv_ln(*make_inputs((1, 4, 3, 3), 3, torch.float64, "cpu"))
    assert ran == [auto]


def test_gpu_priority_is_cuda_then_triton():
    assert tuple(ops.OP.gpu_priority) == ("cuda", "triton", "torch")
    assert tuple(ops.OP.cpu_priority) == ("cpp", "torch")


# ---- DWConvLayerNorm ----------------------------------------------------------------------------------------------


def test_module_state_dict_repr_and_forward():
    module = DWConvLayerNorm(24, kernel_size=5, eps=1e-5, bias=False)
    assert set(module.state_dict()) == {"conv_dw.weight", "norm.weight", "norm.bias"}
    assert "dim=24, kernel_size=5, eps=1e-05, bias=False, out_layout='nhwc'" in repr(module)
    x = torch.randn(2, 24, 6, 7)
    with torch.no_grad():
        want = TF.layer_norm(module.conv_dw(x).permute(0, 2, 3, 1), (24,), module.norm.weight, module.norm.bias, 1e-5)
        torch.testing.assert_close(module(x), want)
        torch.testing.assert_close(module(x.contiguous(memory_format=torch.channels_last)), want)
        # a conv weight with other strides (e.g. a loaded checkpoint's transposed storage): copied for the kernels
        module.conv_dw.weight = torch.nn.Parameter(module.conv_dw.weight.transpose(2, 3).contiguous().transpose(2, 3))
        assert not module.conv_dw.weight.is_contiguous()
        torch.testing.assert_close(module(x), want)


def _check_converted(new, front, x, out_layout, atol=1e-5):
    assert new.out_layout == out_layout
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = new(x1), front(x2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)
    g = torch.randn_like(want)
    (got * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=atol)


def test_from_module_nn_and_torchvision():
    conv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
    norm = torch.nn.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    new = DWConvLayerNorm.from_module(conv, norm)
    _check_converted(new, lambda x: norm(conv(x).permute(0, 2, 3, 1)), torch.randn(2, 16, 8, 8), "nhwc")
    same = torch.nn.Conv2d(16, 16, 5, padding="same", groups=16, bias=False)
    plain = torch.nn.LayerNorm(16, elementwise_affine=False)
    new = DWConvLayerNorm.from_module(same, plain.eval())
    assert new.conv_dw.bias is None and new.norm.weight is None
    _check_converted(new, lambda x: plain(same(x).permute(0, 2, 3, 1)), torch.randn(1, 16, 6, 6), "nhwc")
    torchvision = pytest.importorskip("torchvision")
    block = torchvision.models.convnext.CNBlock(32, layer_scale=1e-6, stochastic_depth_prob=0.0)
    conv, norm = block.block[0], block.block[2]
    new = DWConvLayerNorm.from_module(conv, norm)
    assert new.norm.eps == norm.eps
    _check_converted(new, lambda x: block.block[2](block.block[1](block.block[0](x))), torch.randn(2, 32, 7, 7), "nhwc")


def test_from_module_timm():
    timm_convnext = pytest.importorskip("timm.models.convnext")
    for conv_mlp, layout in ((False, "nhwc"), (True, "nchw")):
        block = timm_convnext.ConvNeXtBlock(32, conv_mlp=conv_mlp)
        with torch.no_grad():
            block.norm.weight.uniform_(0.5, 1.5)
            block.norm.bias.uniform_(-0.5, 0.5)
        new = DWConvLayerNorm.from_module(block.conv_dw, block.norm)
        assert {k: v for k, v in new.state_dict().items()}.keys() == {
            k for k in block.state_dict() if k.startswith(("conv_dw.", "norm."))
        }

        def front(x, block=block, conv_mlp=conv_mlp):
            y = block.conv_dw(x)
            return block.norm(y) if conv_mlp else block.norm(y.permute(0, 2, 3, 1))

        _check_converted(new, front, torch.randn(2, 32, 7, 7), layout)


def test_from_module_hugging_face():
    convnext = pytest.importorskip("transformers.models.convnext.modeling_convnext")
    from transformers import ConvNextConfig

    layer = convnext.ConvNextLayer(ConvNextConfig(hidden_sizes=[24], depths=[1]), dim=24)
    with torch.no_grad():
        layer.layernorm.weight.uniform_(0.5, 1.5)
        layer.layernorm.bias.uniform_(-0.5, 0.5)
    new = DWConvLayerNorm.from_module(layer.dwconv, layer.layernorm)
    _check_converted(
        new, lambda x: layer.layernorm(layer.dwconv(x).permute(0, 2, 3, 1)), torch.randn(2, 24, 6, 6), "nhwc"
    )
    norm_cf = convnext.ConvNextLayerNorm(24, eps=1e-6, data_format="channels_first")
    new = DWConvLayerNorm.from_module(layer.dwconv, norm_cf)
    _check_converted(new, lambda x: norm_cf(layer.dwconv(x)), torch.randn(1, 24, 5, 5), "nchw")


def test_from_module_keeps_dtype_device_and_mode():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8).to(torch.bfloat16).eval()
    norm = torch.nn.LayerNorm(8).to(torch.bfloat16)
    conv.weight.requires_grad_(False)
    new = DWConvLayerNorm.from_module(conv, norm, backend="torch")
    assert not new.training and new.backend == "torch" and "backend='torch'" in repr(new)
    assert all(p.dtype == torch.bfloat16 for p in new.parameters())
    assert not new.conv_dw.weight.requires_grad and new.norm.weight.requires_grad
    assert torch.equal(new.conv_dw.weight, conv.weight) and new.conv_dw.weight.data_ptr() != conv.weight.data_ptr()


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_module_convnext_stage_shapes(device, backend):
    """ConvNeXt-T's four stage widths (96..768 channels) at small H x W, through the module, fp32."""
    require(backend, device)
    dims = [(96, 5)] if _triton_slow(device, backend) else [(96, 14), (192, 7), (384, 5), (768, 3)]
    for dim, size in dims:
        module = DWConvLayerNorm(dim).to(device)
        with torch.no_grad():
            module.norm.weight.uniform_(0.5, 1.5)
        inputs = (
            torch.randn(1, dim, size, size, device=device),
            module.conv_dw.weight,
            module.conv_dw.bias,
            module.norm.weight,
            module.norm.bias,
        )
        check_against_oracle(backend, [t.detach() for t in inputs], torch.float32)


def test_requires_grad_product_small():
    """Every requires_grad pattern over (x, weight, conv_bias, ln_weight, ln_bias) on the default CPU backend."""
    inputs = make_inputs((1, 5, 4, 4), 3, torch.float32, "cpu")
    for needs in itertools.product([False, True], repeat=5):
        if not any(needs):
            continue
        leaves = [t.clone().requires_grad_(n) for t, n in zip(inputs, needs)]
        ref = [t.clone().requires_grad_(n) for t, n in zip(inputs, needs)]
        F.dwconv_ln(*leaves).pow(2).sum().backward()
        eager(*ref).pow(2).sum().backward()
        for got, want in zip(leaves, ref):
            assert (got.grad is None) == (want.grad is None)
            if got.grad is not None:
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_backward_takes_a_grad_out_of_another_dtype(device, backend):
    """A float64 grad_out for float32 x (or float32 for float64 x) is conformed before the kernels see it."""
    require(backend, device)
    x, w, cb, lw, lb = make_inputs((1, 4, 3, 3), 3, torch.float32, device)
    out, mean, rstd = ops.dwconv_ln(x, w, cb, lw, lb, EPS, backend)
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=device)
    got = ops.dwconv_ln_backward(grad_out, x, w, cb, lw, lb, mean, rstd, True, True, backend)
    want = ops.dwconv_ln_backward(grad_out.float(), x, w, cb, lw, lb, mean, rstd, True, True, backend)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b)
