"""The eager fast path (pykernels/ops/_eager.py): ``<name>_call`` skips the custom-op wrapper when nothing needs it.

Checked for every op: which route a call takes (the custom op is not entered in eager no-grad calls; an
autograd.Function of the op's own formulas carries gradients; the custom op itself under torch.compile, modes,
functorch transforms and tensor subclasses), that the routes give bit-identical outputs and gradients and the same
errors, that backend selection (argument, use_backend, PYKERNELS_BACKEND) still decides, and that compiled graphs
still hold the custom ops, forward and backward. No timing here: bench/bench_overhead.py measures the overhead.
"""

import pytest
import torch
from functorch.compile import make_boxed_func
from helpers import spy_kernels
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import pykernels
import pykernels.functional as F
from pykernels import backends
from pykernels.ops import _eager
from pykernels.ops import attention as attention_ops
from pykernels.ops import drop_path as drop_path_ops
from pykernels.ops import dwconv_ln as dwconv_ln_ops
from pykernels.ops import mbconv_se as mbconv_se_ops

# ---- one case per op: its tensor inputs and a functional call taking them --------------------------------------------


def _drop_path_case():
    torch.manual_seed(0)
    x, y, g = torch.randn(4, 5, 16), torch.randn(4, 5, 16), torch.randn(16)
    return (x, y, g), lambda x, y, g, **kw: F.drop_path_add(x, y, 0.5, g, **kw)


def _dwconv_ln_case():
    torch.manual_seed(0)
    tensors = (torch.randn(2, 8, 5, 6), torch.randn(8, 1, 7, 7), torch.randn(8), torch.randn(8), torch.randn(8))
    return tensors, lambda x, w, b, lw, lb, **kw: F.dwconv_ln(x, w, b, lw, lb, 1e-6, **kw)


def _mbconv_se_case():
    torch.manual_seed(0)
    tensors = (torch.randn(2, 8, 6, 6), torch.randn(8, 1, 3, 3), torch.randn(8), torch.randn(8))
    rm, rv = torch.randn(8), torch.rand(8) + 0.5

    def fn(x, w, bw, bb, **kw):
        return F.mbconv_se(x, w, None, bw, bb, rm, rv, stride=2, **kw)

    return tensors, fn


def _attention_case():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 3, 2, 16).unbind(2)
    bias = torch.randn(2, 6, 6)
    return (q, k, v, bias), lambda q, k, v, bias, **kw: F.attention(q, k, v, bias, causal=True, **kw)


CASES = {
    "drop_path_add": (drop_path_ops, _drop_path_case),
    "dwconv_ln": (dwconv_ln_ops, _dwconv_ln_case),
    "mbconv_se": (mbconv_se_ops, _mbconv_se_case),
    "attention": (attention_ops, _attention_case),
}


FUNCTIONS = {
    "drop_path_add": "_DropPathAdd",
    "dwconv_ln": "_DWConvLN",
    "mbconv_se": "_MBConvSE",
    "attention": "_Attention",
}


def _outputs(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _spy_custom_ops(monkeypatch, module, name):
    """Counts calls of the custom ops ``name`` and ``name_backward`` that ``<name>_call`` reaches (module globals)."""
    entered = []
    for op_name in (name, f"{name}_backward"):
        real = getattr(module, op_name)

        def spy(*args, _real=real, _name=op_name):
            entered.append(_name)
            return _real(*args)

        monkeypatch.setattr(module, op_name, spy)
    return entered


def _slow(monkeypatch):
    """Every call takes the custom op (the route of torch.compile), for comparison."""
    monkeypatch.setattr(_eager, "route", lambda *tensors: _eager.OPAQUE)
    monkeypatch.setattr(_eager, "direct", lambda *tensors: False)


# ---- routes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_no_grad_calls_skip_the_custom_op(monkeypatch, name):
    module, case = CASES[name]
    entered = _spy_custom_ops(monkeypatch, module, name)
    tensors, fn = case()
    with torch.no_grad():
        fn(*tensors)
    with torch.inference_mode():
        fn(*tensors)
    fn(*tensors)  # grad mode on, nothing requires grad
    assert entered == []


@pytest.mark.parametrize("name", CASES)
def test_autograd_calls_use_the_ops_formulas_without_the_custom_op(monkeypatch, name):
    module, case = CASES[name]
    entered = _spy_custom_ops(monkeypatch, module, name)
    tensors, fn = case()
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = _outputs(fn(*leaves))[0]
    nodes = _graph_nodes(out)
    assert FUNCTIONS[name] + "Backward" in nodes, nodes
    assert not any(n.startswith("GeneratedBackwardFor_pykernels") for n in nodes), nodes
    torch.autograd.grad(out.square().sum(), leaves)
    assert entered == []


def _graph_nodes(out) -> set[str]:
    """Class names of the autograd nodes behind ``out``."""
    names, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [next_fn for next_fn, _ in node.next_functions]
    return names


@pytest.mark.parametrize("name", CASES)
def test_compile_traces_the_custom_ops(name):
    """torch.compile(fullgraph=True) sees pykernels::<name> in the forward graph and <name>_backward in the
    backward graph (the fast path is eager only)."""
    module, case = CASES[name]
    tensors, fn = case()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = _outputs(compiled(*leaves))[0]
    torch.autograd.grad(out.square().sum(), leaves)
    assert len(graphs) == 2
    assert f"pykernels.{name}.default" in graphs[0]
    assert f"pykernels.{name}_backward.default" in graphs[1]
    with torch.no_grad():
        torch._dynamo.reset()
        graphs.clear()
        compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True)
        torch.manual_seed(1)  # drop_path_add draws its mask
        got = _outputs(compiled(*tensors))
        torch.manual_seed(1)
        torch.testing.assert_close(got, _outputs(fn(*tensors)), rtol=0, atol=0)
        assert f"pykernels.{name}.default" in graphs[0]


def test_route_rules():
    x = torch.randn(3)
    w = torch.randn(3, requires_grad=True)
    assert _eager.route(x, None) == _eager.DIRECT
    assert _eager.route(x, w) == _eager.AUTOGRAD
    with torch.no_grad():
        assert _eager.route(x, w) == _eager.DIRECT
    with torch.inference_mode():
        assert _eager.route(x, w) == _eager.DIRECT
    assert _eager.route(torch.nn.Parameter(x)) == _eager.AUTOGRAD
    # whatever must see the custom op itself: modes, functorch transforms, subclasses
    with TorchDispatchMode():
        assert _eager.route(x) == _eager.OPAQUE
    with torch.device("cpu"):  # a torch-function mode
        assert _eager.route(x) == _eager.OPAQUE
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert _eager.route(fake) == _eager.OPAQUE
    assert _eager.route(fake) == _eager.OPAQUE  # a subclass even outside its mode
    seen = []
    torch.vmap(lambda t: seen.append(_eager.route(t)) or t)(torch.randn(2, 3))
    assert seen == [_eager.OPAQUE]
    assert not _eager.direct(x, w) and _eager.direct(x, None)


def test_dispatch_modes_see_the_custom_op():
    """Under a TorchDispatchMode (FlopCounterMode, make_fx, ...) the custom op is called, as before."""
    (x, y, g), fn = _drop_path_case()
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        fn(x, y, g)
    assert "pykernels.drop_path_add.default" in seen


# ---- same results, same errors, same backend -------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_routes_give_identical_results(monkeypatch, name):
    _, case = CASES[name]
    tensors, fn = case()
    leaves = [t.clone().requires_grad_() for t in tensors]

    def run():
        torch.manual_seed(1)  # drop_path_add draws its mask
        with torch.no_grad():
            out = _outputs(fn(*tensors))
        out_with_grad = _outputs(fn(*leaves))
        return out, out_with_grad, torch.autograd.grad(out_with_grad[0].square().sum(), leaves)

    fast, fast_grad_out, fast_grads = run()
    _slow(monkeypatch)
    slow, slow_grad_out, slow_grads = run()
    for a, b in zip(fast + fast_grad_out + fast_grads, slow + slow_grad_out + slow_grads):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


def test_double_backward_through_the_fast_path(monkeypatch):
    """drop_path_add's branch gradient is the op itself: differentiable again on either route."""
    (x, y, g), fn = _drop_path_case()
    results = []
    for slow in (False, True):
        if slow:
            _slow(monkeypatch)
        branch = y.clone().requires_grad_()
        out = fn(x, branch, g.detach(), training=False)
        (grad,) = torch.autograd.grad((out * out).sum(), branch, create_graph=True)
        (grad2,) = torch.autograd.grad(grad.sum(), branch)
        results.append((grad, grad2))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("bad_backend", ["nope", "cuda"])
def test_routes_raise_the_same_errors(monkeypatch, name, bad_backend):
    _, case = CASES[name]
    tensors, fn = case()
    with torch.no_grad():
        fast = _error(lambda: fn(*tensors, backend=bad_backend))
    _slow(monkeypatch)
    with torch.no_grad():
        slow = _error(lambda: fn(*tensors, backend=bad_backend))
    assert fast == slow
    assert fast[0] is (ValueError if bad_backend == "nope" else backends.BackendNotSupportedError)


def test_bad_arguments_still_raise_on_the_fast_path():
    (x, y, g), fn = _drop_path_case()
    with torch.no_grad():
        with pytest.raises(ValueError, match="same shape"):
            F.drop_path_add(x, y[:, :2])
        with pytest.raises(ValueError, match="per-channel layer-scale"):
            F.drop_path_add(x, y, 0.1, torch.randn(5, 2))
        with pytest.raises(TypeError, match="floating-point"):
            F.drop_path_add(x, y.long())
        q = torch.randn(1, 4, 2, 8)
        with pytest.raises(ValueError, match="k and v must be"):
            F.attention(q, q[:, :, :1], q)
        with pytest.raises(ValueError, match="kernel size 4 not supported"):
            F.dwconv_ln(torch.randn(1, 8, 4, 4), torch.randn(8, 1, 4, 4))


@pytest.mark.parametrize("name", CASES)
def test_backend_choice_is_respected_on_the_fast_path(monkeypatch, name):
    """argument > use_backend() > PYKERNELS_BACKEND > automatic, as the custom op decides (spy_kernels sees it)."""
    module, case = CASES[name]
    if hasattr(module, "SMALL_NUMEL"):
        monkeypatch.setattr(module, "SMALL_NUMEL", 0)  # no ATen route for tiny inputs: test_small_inputs_* below
    ran = spy_kernels(monkeypatch, module.OP)
    tensors, fn = case()
    auto = module.OP.select(tensors[0].device, [tensors[0].dtype])
    with torch.no_grad():
        fn(*tensors)
        monkeypatch.setenv("PYKERNELS_BACKEND", "torch")
        fn(*tensors)
        with pykernels.use_backend(auto):
            fn(*tensors)
            fn(*tensors, backend="torch")
        monkeypatch.delenv("PYKERNELS_BACKEND")
        fn(*tensors)
    assert ran == [auto, "torch", auto, "torch", auto]


def test_backward_pins_the_forwards_backend_on_the_fast_path(monkeypatch):
    """The autograd route keeps the op's backward pin (ctx.backend): a backward outside the use_backend block runs on
    the forward's explicit backend."""
    ran = spy_kernels(monkeypatch, dwconv_ln_ops.OP)
    (x, *params), fn = _dwconv_ln_case()
    x = x.requires_grad_()
    with pykernels.use_backend("torch"):
        out = fn(x, *params)
    out.sum().backward()
    assert ran == ["torch", "torch"]


# ---- tiny inputs: drop_path_add on ATen's arithmetic ----------------------------------------------------------------


def _spy_aten(monkeypatch):
    taken = []
    real = drop_path_ops._aten_fwd

    def spy(*args):
        taken.append(True)
        return real(*args)

    monkeypatch.setattr(drop_path_ops, "_aten_fwd", spy)
    return taken


_SMALL_LAYOUTS = {
    # name: (residual shape, gamma shape or None, how to lay the tensors out)
    "tokens": ((3, 5, 16), (16,), lambda t: t),
    "nchw": ((2, 8, 3, 5), (8, 1, 1), lambda t: t),
    "nchw-1c11": ((2, 8, 3, 5), (1, 8, 1, 1), lambda t: t),
    "channels_last": ((2, 8, 3, 5), (8, 1, 1), lambda t: t.contiguous(memory_format=torch.channels_last)),
    "no-gamma": ((4, 7), None, lambda t: t),
    "c1": ((2, 1, 3, 3), (1, 1, 1), lambda t: t),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", _SMALL_LAYOUTS)
def test_small_inputs_match_every_kernel_bit_for_bit(monkeypatch, layout, training, dtype):
    """Under the automatic choice, tiny float32 / float64 CPU calls compute x + (y * g) * scale with ATen's mul / add:
    the same bits, dtype and strides as the cpp and torch kernels, forward and every gradient (the branch gradient
    runs the same route; gamma's stays on the kernel)."""
    shape, gamma_shape, lay = _SMALL_LAYOUTS[layout]
    torch.manual_seed(0)
    x, y = lay(torch.randn(shape, dtype=dtype)), lay(torch.randn(shape, dtype=dtype))
    g = None if gamma_shape is None else torch.randn(gamma_shape, dtype=dtype)
    taken = _spy_aten(monkeypatch)
    results = {}
    for backend in (None, "cpp", "torch"):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, y, g)]
        torch.manual_seed(1)
        with torch.no_grad():
            out = F.drop_path_add(x, y, 0.5, g, training=training, backend=backend)
        torch.manual_seed(1)
        out_grad = F.drop_path_add(leaves[0], leaves[1], 0.5, leaves[2], training=training, backend=backend)
        grads = torch.autograd.grad(out_grad.sum(), [t for t in leaves if t is not None])  # broadcast grad_out
        results[backend] = (out, out_grad, *grads)
        if backend is None:  # no-grad and autograd forwards, and the branch gradient when it is the op itself
            assert len(taken) == (2 + (g is None) if y.is_contiguous() else 0)
    for backend in ("cpp", "torch"):
        # gamma's gradient is a reduction: the automatic route's is the cpp kernel's, the torch backend sums otherwise
        pairs = list(zip(results[None], results[backend]))[: 5 if backend == "cpp" or g is None else 4]
        for a, b in pairs:
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a, b)


def test_small_inputs_drop_path_module_matches_the_kernel(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 16)
    taken = _spy_aten(monkeypatch)
    module = pykernels.DropPath(0.3).train()
    outs = []
    for backend in (None, "cpp"):
        module.backend = backend
        torch.manual_seed(3)
        outs.append(module(x))
    assert taken == [True]
    assert torch.equal(outs[0], outs[1]) and (outs[0] == 0).any()


def test_small_inputs_route_only_where_the_bits_are_the_same(monkeypatch):
    """Not taken: half precisions (the kernels compute in float32 and round once), mixed dtypes, large or
    non-contiguous branches, an explicit backend (argument, use_backend, PYKERNELS_BACKEND), the custom op itself."""
    taken = _spy_aten(monkeypatch)
    x = torch.randn(4, 16)
    g = torch.randn(16)
    with torch.no_grad():
        F.drop_path_add(x, x, 0.1, g, training=False)
        assert len(taken) == 1
        F.drop_path_add(x.half(), x.half(), 0.1, g.half(), training=False)
        F.drop_path_add(x.bfloat16(), x.bfloat16(), 0.1, training=False)
        F.drop_path_add(x, x, 0.1, g.double(), training=False)
        F.drop_path_add(x.double(), x, 0.1, training=False)
        big = torch.randn(2, drop_path_ops.SMALL_NUMEL)
        F.drop_path_add(big, big, 0.1, training=False)
        F.drop_path_add(x.t(), x.t(), 0.1, training=False)
        F.drop_path_add(x, x, 0.1, g, training=False, backend="cpp")
        with pykernels.use_backend("torch"):
            F.drop_path_add(x, x, 0.1, g, training=False)
        monkeypatch.setenv("PYKERNELS_BACKEND", "cpp")
        F.drop_path_add(x, x, 0.1, g, training=False)
        monkeypatch.setenv("PYKERNELS_BACKEND", "auto")
        F.drop_path_add(x, x, 0.1, g, training=False)
        assert len(taken) == 2
        monkeypatch.setenv("PYKERNELS_BACKEND", "nope")
        with pytest.raises(ValueError, match="PYKERNELS_BACKEND='nope'"):
            F.drop_path_add(x, x, 0.1, g, training=False)
        monkeypatch.delenv("PYKERNELS_BACKEND")
        drop_path_ops.drop_path_add(x, x, None, g, 1)  # the custom op: its kernels, its fake's strides
    assert len(taken) == 2


# ---- attention on CPU tensors: the automatic choice (torch) without a selection -----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (1, 1, 4, 16), (2, 6, 1, 8), (1, 3, 2, 8)])
def test_cpu_attention_without_selection_matches_the_torch_backend(shape, causal, dtype):
    """Eager inference on CPU tensors under the automatic choice calls SDPA as the torch backend does (unmasked: the
    call inlined): the same values and strides as ``backend="torch"``, which selects; with a mask too."""
    torch.manual_seed(0)
    batch, n, heads, head_dim = shape
    q, k, v = torch.randn(batch, n, 3, heads, head_dim, dtype=dtype).unbind(2)  # packed qkv views
    bias = torch.randn(n, n, dtype=dtype)
    with torch.no_grad():
        for extra in ({}, {"bias": bias}):
            auto = F.attention(q, k, v, causal=causal, **extra)
            explicit = F.attention(q, k, v, causal=causal, backend="torch", **extra)
            assert auto.stride() == explicit.stride() and auto.dtype == explicit.dtype
            assert torch.equal(auto, explicit)


def test_fused_mhsa_without_mask_matches_the_checked_path(monkeypatch):
    """FusedMHSA skips the argument checks of its own q, k, v views (no bias, no padding mask): same output as the
    public function's checked path, which still runs (and raises) for a bias or a padding mask."""
    torch.manual_seed(0)
    module = pykernels.FusedMHSA(32, num_heads=4).eval()
    x = torch.randn(2, 7, 32)
    checked = []
    real = attention_ops.check_args
    monkeypatch.setattr(attention_ops, "check_args", lambda *a: checked.append(1) or real(*a))
    with torch.no_grad():
        fast = module(x)
        assert checked == []
        module.backend = "torch"
        slow = module(x)
        assert checked == []
        mask = torch.zeros(2, 7, dtype=torch.bool)
        masked = module(x, key_padding_mask=mask)
        assert checked == [1]
        with pytest.raises(ValueError, match="key_padding_mask"):
            module(x, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    assert torch.equal(fast, slow) and torch.equal(fast, masked)
