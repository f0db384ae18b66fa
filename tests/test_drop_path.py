"""drop_path_add on every backend: forward and every gradient against the float64 oracle and against eager
timm-style PyTorch, over dtypes, layouts and awkward shapes; gradcheck, opcheck, torch.compile, edge cases, errors.

Module-level parity with timm / torchvision / Hugging Face / the seeds lives in test_drop_path_modules.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import device_backends, require_backend, spy_kernels

import pykernels
from pykernels import functional as F
from pykernels import reference
from pykernels.ops import drop_path as ops

TOL = {  # kernels compute in fp32 and round once: well inside these
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float32: dict(rtol=1.3e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(layout: str, shape, dtype, device, seed=0):
    """(residual, branch, gamma) in the given layout; gamma shaped as the layout's users shape it."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    if layout in ("nchw", "channels_last"):
        residual, branch = rand(*shape), rand(*shape)
        gamma = rand(shape[1], 1, 1)
        if layout == "channels_last":
            residual = residual.to(memory_format=torch.channels_last)
            branch = branch.to(memory_format=torch.channels_last)
    elif layout == "timm_permuted":
        # timm's ConvNeXtBlock: branch = NHWC MLP output permuted back to NCHW (channels-last memory), shortcut NCHW
        b, c, h, w = shape
        residual, branch, gamma = rand(*shape), rand(b, h, w, c).permute(0, 3, 1, 2), rand(1, c, 1, 1)
    elif layout == "tokens":
        residual, branch, gamma = rand(*shape), rand(*shape), rand(shape[-1])
    elif layout == "token_view":
        # ViT-style slice x[:, 1:] (batch stride != row size) as the residual, and a transposed seq-first branch
        b, n, c = shape
        residual = rand(b, n + 1, c)[:, 1:]
        branch = rand(n, b, c).transpose(0, 1)
        gamma = rand(c)
    else:
        raise ValueError(layout)
    return residual, branch, gamma


def eager(residual, branch, scale, gamma):
    """timm's composition in the inputs' dtype: shortcut + (branch * gamma) * mask/keep_prob."""
    out = branch * gamma if gamma is not None else branch
    if scale is not None:
        out = out * scale.reshape((-1,) + (1,) * (branch.dim() - 1)).to(out.dtype)
    return residual + out


def run(backend, residual, branch, scale, gamma, channel_dim):
    return ops.drop_path_add(residual, branch, scale, gamma, channel_dim, None, backend)


def scale_for(batch, drop_prob, dtype, device, seed=1):
    if drop_prob == 0.0:
        return None
    torch.manual_seed(seed)
    return reference.draw_drop_path_scale(batch, 2, drop_prob, dtype=dtype, device=device)


LAYOUT_SHAPES = {
    "nchw": [(2, 16, 13, 13), (1, 200, 7, 7)],
    "channels_last": [(2, 16, 13, 13), (3, 200, 5, 5)],
    "timm_permuted": [(2, 24, 7, 7)],
    "tokens": [(2, 197, 48), (1, 50, 200)],
    "token_view": [(3, 196, 32)],
}
CASES = [(layout, shape) for layout, shapes in LAYOUT_SHAPES.items() for shape in shapes]


def _id(v):
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v).replace("torch.", "")


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout,shape", CASES, ids=_id)
@pytest.mark.parametrize("drop_prob", [0.0, 0.5], ids=lambda p: f"p{p}")
def test_forward_backward_vs_oracle(device, backend, dtype, layout, shape, drop_prob):
    require_backend("drop_path_add", backend, device)
    residual, branch, gamma = make_case(layout, shape, dtype, device)
    scale = scale_for(shape[0], drop_prob, dtype, device)
    channel_dim = F._channel_dim(gamma, branch)
    gamma_flat = gamma.reshape(-1)
    leaves = [t.detach().requires_grad_() for t in (residual, branch, gamma_flat)]
    out = run(backend, leaves[0], leaves[1], scale, leaves[2], channel_dim)
    # forward: the float64 oracle, rounded to the dtype
    oracle = reference.drop_path_add(residual, branch, scale, gamma_flat, channel_dim, torch.float64)
    assert out.dtype == dtype and out.shape == branch.shape
    torch.testing.assert_close(out.double(), oracle.to(dtype).double(), **TOL[dtype])
    # fp32: bit-identical to eager PyTorch doing the same three ops (timm's composition)
    if dtype == torch.float32:
        assert torch.equal(out, eager(residual, branch, scale, gamma))
    # backward: every gradient against the float64 oracle's; gamma's (a reduction) by flash-attention's rule:
    # its error is at most 2x the error of eager PyTorch in the same dtype (plus a floor for exact cases)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in (residual, branch, gamma_flat)]
    ref_out = reference.drop_path_add(ref_leaves[0], ref_leaves[1], scale, ref_leaves[2], channel_dim, torch.float64)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.double())
    eager_leaves = [t.detach().requires_grad_() for t in (residual, branch, gamma)]
    eager_grads = torch.autograd.grad(eager(*eager_leaves[:2], scale, eager_leaves[2]), eager_leaves, grad_out)
    for got, want in zip(grads[:2], ref_grads[:2]):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.to(dtype).double(), **TOL[dtype])
    err = (grads[2].double() - ref_grads[2]).abs().max().item()
    eager_err = (eager_grads[2].reshape(-1).double() - ref_grads[2]).abs().max().item()
    floor = 1e-6 * ref_grads[2].abs().max().item() + 1e-6
    assert grads[2].dtype == dtype
    assert err <= 2 * eager_err + floor, f"grad gamma error {err:.3g} vs eager {eager_err:.3g}"


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize(
    "mix",
    [
        ("float32", "bfloat16", "float32"),
        ("float32", "float16", None),
        ("bfloat16", "bfloat16", "float32"),
        ("float64", "float64", "float64"),
        ("float64", "float32", None),
    ],
    ids=lambda m: "res_{}-br_{}-g_{}".format(*m),
)
def test_mixed_dtypes_promote_like_eager(device, backend, mix):
    """Autocast-style mixes (bf16 branch, fp32 shortcut / layer-scale) give eager's promoted dtype and values."""
    require_backend("drop_path_add", backend, device)
    res_dtype, br_dtype, g_dtype = (getattr(torch, m) if m else None for m in mix)
    residual, branch, _ = make_case("tokens", (2, 9, 40), torch.float64, device)
    residual, branch = residual.to(res_dtype), branch.to(br_dtype)
    gamma = torch.rand(40, dtype=g_dtype, device=device) if g_dtype else None
    scale = scale_for(2, 0.5, reference.promote_dtypes(branch, gamma), device)
    want = eager(residual, branch, scale, gamma)
    reasons = ops.OP.not_supported_reasons(
        backend, torch.device(device), [residual.dtype, branch.dtype] + ([g_dtype] if g_dtype else [])
    )
    if reasons:
        with pytest.raises(pykernels.BackendNotSupportedError, match="float64 cannot be mixed"):
            run(backend, residual, branch, scale, gamma, 2)
        return
    out = run(backend, residual, branch, scale, gamma, 2)
    assert out.dtype == want.dtype
    torch.testing.assert_close(
        out, want, **TOL[torch.bfloat16 if torch.bfloat16 in (res_dtype, br_dtype) else torch.float16]
    )


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize(
    "needs",
    list(itertools.product([False, True], repeat=3)),
    ids=lambda n: "rg_" + "".join("1" if x else "0" for x in n),
)
def test_requires_grad_subsets(device, backend, needs):
    """requires_grad on any subset of (residual, branch, gamma): the right grads, None for the others."""
    require_backend("drop_path_add", backend, device)
    residual, branch, gamma = make_case("nchw", (2, 5, 3, 3), torch.float32, device)
    leaves = [t.clone().requires_grad_(n) for t, n in zip((residual, branch, gamma), needs)]
    torch.manual_seed(0)
    out = F.drop_path_add(leaves[0], leaves[1], 0.5, leaves[2], backend=backend)
    torch.manual_seed(0)
    ref_leaves = [t.clone().requires_grad_(n) for t, n in zip((residual, branch, gamma), needs)]
    ref = eager(
        ref_leaves[0],
        ref_leaves[1],
        reference.draw_drop_path_scale(2, 4, 0.5, dtype=torch.float32, device=device),
        ref_leaves[2],
    )
    assert torch.equal(out, ref)
    if not any(needs):
        assert not out.requires_grad
        return
    out.sum().backward()  # grad_out is an expanded (all-stride-0) tensor here: an awkward layout on purpose
    ref.sum().backward()
    for got, want, need in zip(leaves, ref_leaves, needs):
        if need:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)
        else:
            assert got.grad is None


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_gradcheck_float64(backend, layout):
    require_backend("drop_path_add", backend, "cpu")
    shape = (3, 4, 2, 3) if layout != "tokens" else (3, 5, 4)
    residual, branch, gamma = make_case(layout, shape, torch.float64, "cpu")
    scale = torch.tensor([2.0, 0.0, 1.25], dtype=torch.float64)  # kept (1/keep_prob), dropped, kept
    channel_dim = F._channel_dim(gamma, branch)
    inputs = tuple(t.detach().requires_grad_() for t in (residual, branch, gamma.reshape(-1)))

    def fn(r, b, g):
        return ops.drop_path_add(r, b, scale, g, channel_dim, None, backend)

    # the interpreter is slow: Triton gets gradcheck's fast mode (a random projection of the Jacobian)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, fast_mode=backend == "triton")
    assert torch.autograd.gradgradcheck(
        lambda r, b: ops.drop_path_add(r, b, scale, inputs[2].detach(), channel_dim, None, backend),
        inputs[:2],
        fast_mode=backend == "triton",
    )


def _opcheck_samples(device):
    samples = []
    for layout, shape in [
        ("nchw", (2, 6, 3, 3)),
        ("channels_last", (2, 6, 3, 3)),
        ("tokens", (3, 5, 8)),
        ("token_view", (2, 4, 8)),
    ]:
        residual, branch, gamma = make_case(layout, shape, torch.float32, device)
        scale = torch.tensor([1.25, 0.0, 2.0][: shape[0]], device=device)
        channel_dim = F._channel_dim(gamma, branch)
        samples.append((residual, branch, scale, gamma.reshape(-1), channel_dim))
    return samples


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_opcheck_python_ops(device, backend):
    require_backend("drop_path_add", backend, device)
    for residual, branch, scale, gamma, channel_dim in _opcheck_samples(device):
        for args in [
            (
                residual.requires_grad_(),
                branch.requires_grad_(),
                scale,
                gamma.requires_grad_(),
                channel_dim,
                None,
                backend,
            ),
            (None, branch, scale, None, channel_dim, None, backend),
            (residual, branch, None, gamma, channel_dim, torch.float32, backend),
        ]:
            torch.library.opcheck(torch.ops.pykernels.drop_path_add.default, args)
        grad_out = torch.randn_like(branch)
        for need in (True, False):
            args = (grad_out, branch.detach(), scale, gamma.detach(), channel_dim, need, backend)
            torch.library.opcheck(torch.ops.pykernels.drop_path_add_backward.default, args)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_compiled_ops(device):
    require_backend("drop_path_add", "cpp" if device == "cpu" else "cuda", device)
    for residual, branch, scale, gamma, channel_dim in _opcheck_samples(device):
        branch = branch.contiguous() if not branch.is_contiguous() and branch.dim() == 3 else branch
        residual = torch.empty_like(branch).copy_(residual)
        torch.library.opcheck(
            torch.ops.pykernels.drop_path_add_fwd.default, (residual, branch, scale, gamma, channel_dim)
        )
        torch.library.opcheck(
            torch.ops.pykernels.drop_path_add_fwd.default, (None, branch, None, None, channel_dim, torch.float16)
        )
        grad_out = torch.randn_like(branch)
        torch.library.opcheck(
            torch.ops.pykernels.drop_path_add_bwd.default, (grad_out, branch, scale, gamma, channel_dim, True)
        )


class _Block(torch.nn.Module):
    """A ConvNeXt-style residual tail: Linear branch, layer-scale, DropPath, residual - in pykernels."""

    def __init__(self, dim=16, drop_prob=0.25, backend=None):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)
        self.gamma = torch.nn.Parameter(torch.full((dim,), 0.5))
        self.drop_path = pykernels.DropPath(drop_prob, backend=backend)
        self.drop_prob = drop_prob
        self.backend = backend

    def forward(self, x):
        y = F.drop_path_add(x, self.fc(x), self.drop_prob, self.gamma, self.training, backend=self.backend)
        return self.drop_path(y) + x


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a block using both public entry points: no graph break, same values and
    grads as eager (inductor's fallback_random keeps torch's RNG stream so masks match)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    block = _Block()
    x = torch.randn(4, 7, 16)
    compiled = torch.compile(block, fullgraph=True)
    with inductor_config.patch(fallback_random=True):
        for training in (True, False):
            block.train(training)
            torch.manual_seed(5)
            out = compiled(x.clone().requires_grad_())
            out.sum().backward()
            grads = [p.grad.clone() for p in block.parameters()]
            block.zero_grad()
            torch.manual_seed(5)
            ref = block(x.clone().requires_grad_())
            ref.sum().backward()
            torch.testing.assert_close(out, ref)
            for got, p in zip(grads, block.parameters()):
                torch.testing.assert_close(got, p.grad)
            block.zero_grad()


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_compile_each_backend_aot_eager(device, backend):
    """Every backend's kernels run inside a fullgraph-compiled graph (aot_eager: fast, same tracing path)."""
    require_backend("drop_path_add", backend, device)
    torch._dynamo.reset()
    block = _Block(backend=backend).to(device)
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    fn = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = fn(x)
    out.sum().backward()
    assert block.gamma.grad is not None and x.grad is not None and torch.isfinite(out).all()


# ---- edge cases ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_eval_and_zero_prob_draw_no_rng(device, backend):
    require_backend("drop_path_add", backend, device)
    residual, branch, gamma = make_case("tokens", (3, 4, 8), torch.float32, device)
    for kwargs in (dict(drop_prob=0.3, training=False), dict(drop_prob=0.0, training=True)):
        state = torch.get_rng_state()
        out = F.drop_path_add(residual, branch, gamma=gamma, backend=backend, **kwargs)
        assert torch.equal(torch.get_rng_state(), state), "an RNG number was drawn"
        assert torch.equal(out, residual + branch * gamma)
    x = branch.clone()
    assert pykernels.DropPath(0.3).eval()(x) is x
    assert pykernels.DropPath(0.0).train()(x) is x


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
def test_drop_prob_one_drops_everything(device, backend):
    require_backend("drop_path_add", backend, device)
    residual, branch, gamma = make_case("nchw", (3, 4, 5, 5), torch.float32, device)
    branch.requires_grad_()
    out = F.drop_path_add(residual, branch, 1.0, gamma, backend=backend)
    assert torch.equal(out, residual) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.equal(branch.grad, torch.zeros_like(branch))
    assert torch.equal(F.drop_path(branch.detach(), 1.0, True, backend=backend), torch.zeros_like(branch))


@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (0, 7, 8), (1, 4, 3, 3), (5, 1, 1, 1), (2, 0, 8)], ids=_id)
def test_empty_and_tiny_batches(device, backend, shape):
    require_backend("drop_path_add", backend, device)
    residual = torch.randn(shape, device=device, requires_grad=True)
    branch = torch.randn(shape, device=device, requires_grad=True)
    gamma = torch.randn((shape[1], 1, 1) if len(shape) == 4 else (shape[-1],), device=device, requires_grad=True)
    torch.manual_seed(0)
    out = F.drop_path_add(residual, branch, 0.5, gamma, backend=backend)
    torch.manual_seed(0)
    ref = reference.drop_path(branch * gamma, 0.5, True) + residual
    assert out.shape == shape and torch.equal(out, ref)
    out.sum().backward()
    assert gamma.grad.shape == gamma.shape and branch.grad.shape == shape


def test_batch_over_grid_limit_triton(monkeypatch):
    """Triton's launcher splits batches over CUDA's 65535 grid-y limit (the limit lowered to 3 to keep it fast)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    require_backend("drop_path_add", "triton", device)
    from pykernels.triton_kernels import drop_path as triton_drop_path

    monkeypatch.setattr(triton_drop_path, "MAX_GRID_Y", 3)
    x = torch.randn(8, 3, 5, device=device)
    scale = torch.rand(8, device=device)
    out = ops.drop_path_add(x, x, scale, None, 1, None, "triton")
    torch.testing.assert_close(out, x + x * scale[:, None, None])


# ---- errors a user can hit -------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="same shape"):
        F.drop_path_add(x, torch.randn(2, 4, 3, 2), 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        F.drop_path_add(x.long(), x.long(), 0.1)
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\]"):
        F.drop_path_add(x, x, 1.5)
    with pytest.raises(ValueError, match="per-channel layer-scale"):
        F.drop_path_add(x, x, 0.1, torch.randn(5))
    with pytest.raises(ValueError, match="per-channel layer-scale"):
        F.drop_path_add(x, x, 0.1, torch.randn(4, 3))
    with pytest.raises(ValueError, match="on meta but branch is on cpu"):
        F.drop_path_add(x.to("meta"), x, 0.1)
    with pytest.raises(ValueError, match="unknown pykernels backend 'cudnn'"):
        F.drop_path_add(x, x, 0.1, backend="cudnn")
    with pytest.raises(ValueError, match="mode must be"):
        pykernels.DropPath(0.1, mode="col")
    with pytest.raises(ValueError, match="batch dim"):
        F.drop_path_add(torch.randn(3), torch.randn(3), 0.1)


def test_explicit_backend_that_cannot_serve_lists_every_reason():
    x = torch.randn(2, 3, 4)
    with pytest.raises(pykernels.BackendNotSupportedError) as info:
        F.drop_path_add(x, x, 0.1, backend="cuda")
    msg = str(info.value)
    assert "'cuda' cannot run drop_path_add" in msg
    for name in ("triton:", "cuda:", "cpp:", "torch: supported"):
        assert name in msg


def test_backend_selection_precedence(monkeypatch):
    """argument > use_backend() > PYKERNELS_BACKEND > automatic (cpp if built, else torch, on CPU)."""
    monkeypatch.setattr(ops, "SMALL_NUMEL", 0)  # tiny inputs under the automatic choice run ATen (test_eager_fast_path)
    ran = spy_kernels(monkeypatch, ops.OP)
    x = torch.randn(2, 3, 4)
    F.drop_path_add(x, x, 0.1)
    auto = "cpp" if not ops.OP.not_supported_reasons("cpp", x.device, [x.dtype]) else "torch"
    monkeypatch.setenv("PYKERNELS_BACKEND", "torch")
    F.drop_path_add(x, x, 0.1)
    with pykernels.use_backend(auto):
        F.drop_path_add(x, x, 0.1)
        F.drop_path_add(x, x, 0.1, backend="torch")
        with pykernels.use_backend(None):
            F.drop_path_add(x, x, 0.1)
    assert ran == [auto, "torch", auto, "torch", "torch"]
    monkeypatch.setenv("PYKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="PYKERNELS_BACKEND='nope'"):
        F.drop_path_add(x, x, 0.1)


@pytest.mark.parametrize("gamma_grad", [True, False], ids=["gamma_grad", "no_gamma_grad"])
def test_backward_runs_on_the_forwards_explicit_backend(monkeypatch, gamma_grad):
    """An explicit choice made for the forward (here a use_backend() block) also runs the backward, even when
    backward() is called outside the block - as attention and dwconv_ln do."""
    ran = spy_kernels(monkeypatch, ops.OP)
    x = torch.randn(2, 3, 4)
    branch = torch.randn(2, 3, 4, requires_grad=True)
    gamma = torch.randn(4, requires_grad=gamma_grad)
    auto = "cpp" if not ops.OP.not_supported_reasons("cpp", x.device, [x.dtype]) else "torch"
    explicit = "torch" if auto == "cpp" else "cpp"
    if ops.OP.not_supported_reasons(explicit, x.device, [x.dtype]):
        pytest.skip(f"needs two CPU backends (torch and cpp): {explicit} is not available here")
    with pykernels.use_backend(explicit):
        out = F.drop_path_add(x, branch, 0.5, gamma)
    out.sum().backward()
    assert ran == [explicit, explicit], ran


def test_automatic_choice_falls_back_quietly(monkeypatch):
    """float64 mixed with float32 is outside the compiled kernels: the automatic choice quietly takes `torch`."""
    ran = spy_kernels(monkeypatch, ops.OP)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    out = F.drop_path_add(x, x.float(), 0.0)
    assert ran == ["torch"] and out.dtype == torch.float64


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_single_channel_gamma(layout):
    """C = 1: a (1, 1, 1) layer-scale is NCHW's (C, 1, 1) (not a scale of the last dim), as eager broadcasts it."""
    torch.manual_seed(0)
    x, b = torch.randn(2, 1, 5, 7), torch.randn(2, 1, 5, 7)
    if layout == "channels_last":
        x, b = (t.contiguous(memory_format=torch.channels_last) for t in (x, b))
    gamma = torch.randn(1, 1, 1, requires_grad=True)
    out = F.drop_path_add(x, b, 0.0, gamma)
    torch.testing.assert_close(out, x + b * gamma, rtol=0, atol=0)
    (grad_gamma,) = torch.autograd.grad(out.sum(), gamma)
    torch.testing.assert_close(grad_gamma, b.sum().reshape(1, 1, 1), rtol=1e-5, atol=1e-5)
