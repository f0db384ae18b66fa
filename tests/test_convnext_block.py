"""pykernels.ConvNeXtBlock (Liu et al. 2022, "A ConvNet for the 2020s") against the blocks it replaces: timm's
``ConvNeXtBlock`` (``conv_mlp`` False and True), torchvision's ``CNBlock``, Hugging Face's ``ConvNextLayer`` and the
seeds' reference ``ConvNeXtBlock`` (../shared/seeds/003_8d8ded4205e85488.txt).

* eval mode: output and every gradient (input and each parameter, mapped back to the original's name) in float32
  (tight tolerance) and in float64, on the automatic backend and on ``torch``;
* train mode with drop_path > 0 and the same seed: the same samples dropped, the same values; and the mask/scale
  path is the original's DropPath (``x + DropPath(branch * gamma)``, up to the rounding of gamma folded into fc2);
* layouts (NCHW, channels_last), awkward sizes, kernel sizes, state_dict compatibility, ``pykernels.swap`` on real
  timm / torchvision / Hugging Face models, ``torch.compile(fullgraph=True)``, and the variants it refuses.

Why not ``torch.equal`` against the originals: the fused dwconv+LayerNorm computes the LayerNorm statistics in its
own order (two-pass / Welford), not ATen's, so float32 outputs differ from eager in the last bits (~1e-6 relative).
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from seeds_reference import ConvNeXtBlock as SeedsConvNeXtBlock
from torch import nn

import pykernels
from pykernels import ConvNeXtBlock
from pykernels.modules.convnext import _dwconv_ln_nhwc, can_convert, unsupported_reasons

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

from timm.models.convnext import ConvNeXtBlock as TimmBlock  # noqa: E402
from torchvision.models.convnext import CNBlock  # noqa: E402
from transformers import ConvNextConfig  # noqa: E402
from transformers.models.convnext.modeling_convnext import ConvNextLayer  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and under ``pytest -n 2`` on a shared 2-core machine OpenMP
    threads spinning against each other made each test 20-100x slower. (Multi-threaded kernel paths are covered by
    tests/test_dwconv_ln.py and tests/test_drop_path.py.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the originals, and how their parameter names map to ours --------------------------------------------------


def hf_layer(dim, drop_path=0.0, layer_scale=1e-6, hidden_act="gelu"):
    config = ConvNextConfig(layer_scale_init_value=layer_scale, hidden_act=hidden_act)
    return ConvNextLayer(config, dim, drop_path=drop_path)


# name: (builder(dim, drop_path, kernel_size) -> module, {our parameter name: the original's}, masks by multiply only)
TIMM_NAMES = {
    n: n
    for n in (
        "conv_dw.weight",
        "conv_dw.bias",
        "norm.weight",
        "norm.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "gamma",
    )
}
OFFICIAL_NAMES = {
    "conv_dw.weight": "dwconv.weight",
    "conv_dw.bias": "dwconv.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "mlp.fc1.weight": "pwconv1.weight",
    "mlp.fc1.bias": "pwconv1.bias",
    "mlp.fc2.weight": "pwconv2.weight",
    "mlp.fc2.bias": "pwconv2.bias",
    "gamma": "gamma",
}
HF_NAMES = {
    **OFFICIAL_NAMES,
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "gamma": "layer_scale_parameter",
}
TV_NAMES = {
    "conv_dw.weight": "block.0.weight",
    "conv_dw.bias": "block.0.bias",
    "norm.weight": "block.2.weight",
    "norm.bias": "block.2.bias",
    "mlp.fc1.weight": "block.3.weight",
    "mlp.fc1.bias": "block.3.bias",
    "mlp.fc2.weight": "block.5.weight",
    "mlp.fc2.bias": "block.5.bias",
    "gamma": "layer_scale",
}

SOURCES = {
    "timm": (lambda c, p: TimmBlock(c, drop_path=p), TIMM_NAMES, True),
    "timm_no_ls": (lambda c, p: TimmBlock(c, drop_path=p, ls_init_value=None), TIMM_NAMES, True),
    "timm_conv_mlp": (lambda c, p: TimmBlock(c, drop_path=p, conv_mlp=True), TIMM_NAMES, True),
    "timm_conv_mlp_no_ls": (
        lambda c, p: TimmBlock(c, drop_path=p, conv_mlp=True, ls_init_value=None),
        TIMM_NAMES,
        True,
    ),
    "torchvision": (lambda c, p: CNBlock(c, 1e-6, p), TV_NAMES, True),
    "hf": (lambda c, p: hf_layer(c, p), HF_NAMES, False),
    "hf_no_ls": (lambda c, p: hf_layer(c, p, layer_scale=0.0), HF_NAMES, False),
    "seeds": (lambda c, p: SeedsConvNeXtBlock(c, p), OFFICIAL_NAMES, False),
}
BACKENDS = {"auto": None, "torch": "torch"}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def build(source: str, dim: int = 16, drop_path: float = 0.0, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """The original block with every parameter perturbed (layer-scale ~N(0, 0.5) instead of 1e-6, LayerNorm weights
    away from 1, biases away from 0) so that every parameter matters to the output and gets a distinct gradient."""
    torch.manual_seed(seed)
    module = SOURCES[source][0](dim, drop_path)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * (0.5 if p.numel() == dim else 0.1))
    return module.to(dtype)


def make_x(shape, layout="nchw", seed=1, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=LAYOUTS[layout])


def run_seeded(fn, seed: int):
    torch.manual_seed(seed)
    return fn()


def dropped_rows(t: torch.Tensor) -> torch.Tensor:
    return (t.reshape(t.shape[0], -1) == 0).all(dim=1)


def assert_close_scaled(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max |expected| (a per-tensor relative error: gradients of reductions carry
    the rounding of their largest terms)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3e} > {rtol:g} x max |expected| {scale:.3e}"


def fwd_bwd(module, x, grad_seed=7):
    """Output and {name: grad} (input under "x") of ``(module(x) * g).sum()`` for a fixed random g."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(out.dtype)
    (out * g).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    grads["x"] = x.grad
    return out.detach(), grads


def compare_to_original(ours, original, names, x, out_rtol, grad_rtol, grads=True):
    out, g_ours = fwd_bwd(ours, x) if grads else (ours(x), None)
    ref, g_ref = fwd_bwd(original, x) if grads else (original(x), None)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close_scaled(out, ref, out_rtol, "output")
    if not grads:
        return out, ref
    assert_close_scaled(g_ours["x"], g_ref["x"], grad_rtol, "grad x")
    assert set(g_ours) - {"x"} == {n for n in names if n in g_ours}, "a parameter of ours has no original"
    for name, grad in g_ours.items():
        if name == "x":
            continue
        assert grad is not None, name
        ref_grad = g_ref[names[name]]
        assert_close_scaled(grad, ref_grad.reshape(grad.shape), grad_rtol, f"grad {name} ({names[name]})")
    return out, ref


def our_branch(block: ConvNeXtBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's residual branch before layer-scale, as the (B, C, H, W) channels-last view the block uses."""
    norm = block.norm
    y = _dwconv_ln_nhwc(x, block.conv_dw.weight, block.conv_dw.bias, norm.weight, norm.bias, norm.eps, block.backend)
    return block.mlp(y).permute(0, 3, 1, 2)


# ---- 1. eval mode: output and every gradient vs the original ------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_eval_parity_float32(source, layout, backend):
    original = build(source, dim=16, drop_path=0.3).eval()
    ours = ConvNeXtBlock.from_module(original)
    assert isinstance(ours, ConvNeXtBlock) and not ours.training
    assert (ours.gamma is None) == source.endswith("no_ls")
    x = make_x((2, 16, 9, 9), layout)
    with pykernels.use_backend(BACKENDS[backend]):
        out, _ = compare_to_original(ours, original, SOURCES[source][1], x, out_rtol=2e-6, grad_rtol=2e-5)
    assert out.is_contiguous(memory_format=torch.channels_last), "the block writes channels-last (as timm's does)"


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_eval_parity_float64(source, backend):
    original = build(source, dim=12, drop_path=0.3, dtype=torch.float64).eval()
    ours = ConvNeXtBlock.from_module(original)
    assert ours.conv_dw.weight.dtype == torch.float64
    x = make_x((2, 12, 8, 8), "channels_last" if "conv_mlp" in source else "nchw", dtype=torch.float64)
    with pykernels.use_backend(BACKENDS[backend]):
        compare_to_original(ours, original, SOURCES[source][1], x, out_rtol=1e-12, grad_rtol=1e-11)


# ---- 2. train mode: the original's DropPath draw under the same seed --------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("source", ["timm", "timm_conv_mlp", "torchvision", "hf", "seeds"])
def test_train_mode_same_seed_same_output(source, layout, backend):
    p = 0.5
    original = build(source, dim=8, drop_path=p).train()
    ours = ConvNeXtBlock.from_module(original)
    assert ours.training and ours.drop_path.training and ours.drop_path.drop_prob == p
    assert ours.drop_path.rng == ("bernoulli" if SOURCES[source][2] else "uniform")
    x = make_x((8, 8, 6, 6), layout)
    gamma = original.state_dict()[SOURCES[source][1]["gamma"]].reshape(1, -1, 1, 1)
    original_drop_path = next(m for n, m in original.named_modules() if n in ("drop_path", "stochastic_depth"))
    outcomes = set()
    with pykernels.use_backend(BACKENDS[backend]):
        for seed in range(3):
            out = run_seeded(lambda: ours(x), seed)
            ref = run_seeded(lambda: original(x), seed)
            rows = dropped_rows(out - x)
            assert torch.equal(rows, dropped_rows(ref - x)), f"seed {seed}: other samples dropped than the original"
            outcomes.update(rows.tolist())
            assert_close_scaled(out, ref, 2e-6, f"seed {seed}")
            # the mask / scale / layer-scale / residual path is the original's DropPath applied to our branch, up to
            # rounding: the fused MLP folds gamma into fc2's weight and adds the residual in fc2's epilogue (and HF /
            # the seeds divide by keep_prob before masking)
            with torch.no_grad():
                composed = run_seeded(lambda: x + original_drop_path(our_branch(ours, x) * gamma), seed)
            torch.testing.assert_close(out.detach(), composed, rtol=1e-6, atol=1e-6)
        assert outcomes == {True, False}, "both dropped and kept samples must occur"
        # gradients in train mode (same seed: same mask)
        compare_seeded = functools.partial(run_seeded, seed=11)
        _, g_ours = compare_seeded(lambda: fwd_bwd(ours, x))
        _, g_ref = compare_seeded(lambda: fwd_bwd(original, x))
    names = SOURCES[source][1]
    assert_close_scaled(g_ours["x"], g_ref["x"], 2e-5, "grad x")
    for name, grad in g_ours.items():
        if name != "x":
            assert_close_scaled(grad, g_ref[names[name]].reshape(grad.shape), 2e-5, f"grad {name}")


def test_train_mode_does_not_draw_when_p_is_zero_or_eval():
    x = make_x((2, 8, 5, 5))
    for block in (ConvNeXtBlock(8, drop_path=0.0).train(), ConvNeXtBlock(8, drop_path=0.5).eval()):
        state = torch.get_rng_state()
        block(x)
        assert torch.equal(torch.get_rng_state(), state)


# ---- 3. awkward sizes and kernel sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    "shape",
    [(1, 16, 13, 13), (2, 200, 7, 7), (3, 8, 1, 1), (1, 200, 1, 1), (2, 24, 13, 7)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_awkward_sizes(shape, layout, backend):
    original = build("timm", dim=shape[1], drop_path=0.2).eval()
    ours = ConvNeXtBlock.from_module(original)
    with pykernels.use_backend(BACKENDS[backend]):
        compare_to_original(ours, original, TIMM_NAMES, make_x(shape, layout), out_rtol=2e-6, grad_rtol=3e-5)


@pytest.mark.parametrize("kernel_size", [3, 5, 13])
def test_kernel_sizes(kernel_size):
    torch.manual_seed(0)
    original = TimmBlock(12, kernel_size=kernel_size, ls_init_value=0.5).eval()
    ours = ConvNeXtBlock.from_module(original)
    assert ours.kernel_size == kernel_size and ours.conv_dw.padding == (kernel_size // 2,) * 2
    compare_to_original(ours, original, TIMM_NAMES, make_x((2, 12, 9, 9)), out_rtol=2e-6, grad_rtol=3e-5)


def test_non_dense_input():
    """A strided view (every other row of a bigger image) is read correctly (copied once where a kernel needs it)."""
    original = build("timm", dim=16).eval()
    ours = ConvNeXtBlock.from_module(original)
    x = make_x((2, 16, 14, 7))[:, :, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    compare_to_original(ours, original, TIMM_NAMES, x, out_rtol=2e-6, grad_rtol=3e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_dtypes_error_within_twice_eager(dtype):
    """Block in bf16 / fp16: output and every gradient within 2x the original's own error against its float64 run
    (+ a small atol), the pass rule of the kernels' tests."""
    original = build("timm", dim=32).eval()
    oracle = copy.deepcopy(original).double()
    eager = copy.deepcopy(original).to(dtype)
    ours = ConvNeXtBlock.from_module(eager)
    x = make_x((2, 32, 9, 9), "channels_last")
    out64, g64 = fwd_bwd(oracle, x.double())
    out_e, g_e = fwd_bwd(eager, x.to(dtype))
    out_o, g_o = fwd_bwd(ours, x.to(dtype))
    assert out_o.dtype == dtype
    atol = 1e-2 if dtype == torch.bfloat16 else 2e-3

    def check(what, got, eager_val, exact):
        exact = exact.reshape(got.shape)
        err_ours = (got.double() - exact).abs().max().item()
        err_eager = (eager_val.double().reshape(got.shape) - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err_ours <= 2 * err_eager + atol * scale, f"{what}: {err_ours:.3e} vs eager {err_eager:.3e}"

    check("output", out_o, out_e, out64)
    for name, grad in g_o.items():
        check(f"grad {name}", grad, g_e[name], g64[name])


def test_autocast_bf16():
    original = build("timm", dim=32).eval()
    ours = ConvNeXtBlock.from_module(original)
    x = make_x((2, 32, 9, 9))
    with torch.no_grad():
        exact = copy.deepcopy(original).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = ours(x), original(x)
    assert out.dtype == ref.dtype
    assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-2


# ---- 4. module API: constructor, state_dict, from_module state, repr ----------------------------------------------


@pytest.mark.parametrize("conv_mlp", [False, True], ids=["linear_mlp", "conv_mlp"])
def test_timm_state_dict_loads_strict(conv_mlp):
    original = build("timm_conv_mlp" if conv_mlp else "timm").eval()
    ours = ConvNeXtBlock(16, conv_mlp=conv_mlp).eval()
    ours.load_state_dict(original.state_dict(), strict=True)
    assert torch.equal(ours(make_x((2, 16, 5, 5))), ConvNeXtBlock.from_module(original)(make_x((2, 16, 5, 5))))
    original.load_state_dict(ours.state_dict(), strict=True)  # and back
    no_ls = TimmBlock(16, ls_init_value=None)
    ConvNeXtBlock(16, layer_scale_init_value=None).load_state_dict(no_ls.state_dict(), strict=True)


def test_constructor_defaults_and_repr():
    block = ConvNeXtBlock(96, drop_path=0.1)
    assert block.kernel_size == 7 and block.hidden_dim == 384 and block.norm.eps == 1e-6
    assert block.gamma.shape == (96,) and torch.all(block.gamma == 1e-6)
    assert isinstance(block.drop_path, pykernels.DropPath) and block.drop_path.drop_prob == 0.1
    assert isinstance(block.mlp.fc1, nn.Linear) and isinstance(block.mlp.act, nn.GELU)
    assert ConvNeXtBlock(8, layer_scale_init_value=None).gamma is None
    assert ConvNeXtBlock(8, layer_scale_init_value=0.0).gamma is None
    assert ConvNeXtBlock(8, mlp_ratio=2).hidden_dim == 16
    r = repr(ConvNeXtBlock(8, layer_scale_init_value=None, kernel_size=5, conv_mlp=True, backend="torch"))
    for piece in ("dim=8", "kernel_size=5", "hidden_dim=32", "layer_scale=False", "conv_mlp=True", "'torch'"):
        assert piece in r, piece
    assert "drop_prob=0.100" in repr(block)
    for bad in (4, 15, 1):
        with pytest.raises(ValueError, match="kernel_size"):
            ConvNeXtBlock(8, kernel_size=bad)
    for dim in (1, 2):  # a (C,) layer-scale with C = 1 must not be mistaken for a per-W one
        out = ConvNeXtBlock(dim, layer_scale_init_value=0.5)(make_x((2, dim, 5, 3)))
        assert out.shape == (2, dim, 5, 3)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        ConvNeXtBlock(8)(torch.randn(2, 9, 4, 4))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_from_module_copies_state(training):
    original = build("hf", drop_path=0.25, dtype=torch.float64).train(training)
    original.dwconv.weight.requires_grad_(False)
    ours = ConvNeXtBlock.from_module(original)
    assert ours.training == training and ours.drop_path.training == training
    assert all(p.dtype == torch.float64 and p.device == original.dwconv.weight.device for p in ours.parameters())
    assert not ours.conv_dw.weight.requires_grad and ours.conv_dw.bias.requires_grad
    # copied, not shared
    assert ours.conv_dw.bias.data_ptr() != original.dwconv.bias.data_ptr()
    with torch.no_grad():
        ours.conv_dw.bias.zero_()
    assert original.dwconv.bias.abs().sum() > 0
    again = ConvNeXtBlock.from_module(ours, backend="torch")  # a ConvNeXtBlock converts (copies) too
    assert again.backend == "torch" and again.drop_path.rng == "uniform" and again is not ours
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_from_module_builds_biasless_and_affine_free_variants():
    torch.manual_seed(0)
    original = TimmBlock(16, conv_bias=False, ls_init_value=0.3).eval()
    original.norm = timm.layers.LayerNorm(16, eps=1e-5, affine=False)
    ours = ConvNeXtBlock.from_module(original)
    assert ours.conv_dw.bias is None and ours.norm.weight is None and ours.norm.eps == 1e-5
    x = make_x((2, 16, 6, 6))
    with torch.no_grad():
        assert_close_scaled(ours(x), original(x), 2e-6)


# ---- 5. what it refuses ---------------------------------------------------------------------------------------------


def _seeds_relu():
    m = SeedsConvNeXtBlock(8)
    m.act = nn.ReLU()
    return m


def _tv_relu():
    m = CNBlock(8, 1e-6, 0.0)
    m.block[4] = nn.ReLU()
    return m


def _timm_mlp_norm():
    m = TimmBlock(8)
    m.mlp.norm = nn.LayerNorm(32)
    return m


def _hf_v2():
    from transformers import ConvNextV2Config
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2Layer

    return ConvNextV2Layer(ConvNextV2Config(), 8)


REFUSED = {
    "timm_grn": (lambda: TimmBlock(8, use_grn=True), "GRN"),
    "timm_out_chs": (lambda: TimmBlock(8, 16), "out_chs"),
    "timm_stride": (lambda: TimmBlock(8, stride=2), "stride"),
    "timm_dilation": (lambda: TimmBlock(8, dilation=2), "dilation"),
    "timm_relu": (lambda: TimmBlock(8, act_layer="relu"), "not exact GELU"),
    "timm_gelu_tanh": (lambda: TimmBlock(8, act_layer="gelu_tanh"), "GELU"),
    "timm_kernel_15": (lambda: TimmBlock(8, kernel_size=15), "kernel size"),
    "timm_kernel_1": (lambda: TimmBlock(8, kernel_size=1), "kernel size"),
    "timm_mlp_norm": (_timm_mlp_norm, "inside the MLP"),
    "timm_batchnorm": (lambda: TimmBlock(8, norm_layer=nn.BatchNorm2d, conv_mlp=True), "not a LayerNorm"),
    "torchvision_relu": (_tv_relu, "not exact GELU"),
    "hf_relu": (lambda: hf_layer(8, hidden_act="relu"), "not exact GELU"),
    "hf_convnextv2": (_hf_v2, "GRN"),
    "seeds_relu": (_seeds_relu, "not exact GELU"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refuses_unsupported_variants(name):
    make, why = REFUSED[name]
    module = make()
    assert not can_convert(module)
    reasons = unsupported_reasons(module)
    assert any(why in r for r in reasons), reasons
    with pytest.raises(ValueError, match=re.escape(why)) as info:
        ConvNeXtBlock.from_module(module)
    assert "cannot stand in" in str(info.value)
    model = nn.Sequential(module)
    pykernels.swap(model, include="convnext_block")
    assert model.pykernels_swapped == [] and model[0] is module


@pytest.mark.parametrize(
    "module",
    [nn.Linear(4, 4), nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Identity()],
    ids=["linear", "conv", "identity"],
)
def test_rejects_unrelated_modules(module):
    assert not can_convert(module)
    with pytest.raises(TypeError, match="does not know") as info:
        ConvNeXtBlock.from_module(module)
    assert "timm ConvNeXtBlock" in str(info.value) and "CNBlock" in str(info.value)
    assert not can_convert(ConvNeXtBlock(8)), "a pykernels block must not be swapped again"


# ---- 6. swap on real models -----------------------------------------------------------------------------------------


def block_names(model: nn.Module, cls_names=("ConvNeXtBlock", "CNBlock", "ConvNextLayer")) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in cls_names and not isinstance(m, ConvNeXtBlock)]


@functools.lru_cache(maxsize=1)
def _timm_atto():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, drop_path_rate=0.3, num_classes=10)
    with torch.no_grad():  # layer-scale 1e-6 would hide the blocks' branches; make them matter
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.0)
    return model


def timm_atto():
    return copy.deepcopy(_timm_atto()), (1, 3, 64, 64), 12


def torchvision_tiny():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None, stochastic_depth_prob=0.2, layer_scale=0.5, num_classes=10)
    return model, (1, 3, 64, 64), 18


def hf_convnext():
    from transformers import ConvNextModel

    torch.manual_seed(0)
    config = ConvNextConfig(
        num_channels=3,
        hidden_sizes=[8, 16, 24],
        depths=[2, 2, 2],
        num_stages=3,
        drop_path_rate=0.4,
        layer_scale_init_value=0.5,
    )
    return ConvNextModel(config), (2, 3, 32, 32), 6


MODELS = {"timm_convnext_atto": timm_atto, "torchvision_convnext_tiny": torchvision_tiny, "hf_convnext": hf_convnext}


def model_output(model, x):
    out = model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.mark.parametrize("name", list(MODELS))
def test_swap_real_model_eval(name):
    model, shape, n_blocks = MODELS[name]()
    model.eval()
    expected = block_names(model)
    assert len(expected) == n_blocks
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model_output(model, x)
        pykernels.swap(model)  # default kinds: convnext_block first
        assert model.pykernels_swapped == expected, "exactly the blocks are reported (not their inner DropPaths)"
        assert block_names(model) == []
        assert all(isinstance(model.get_submodule(n), ConvNeXtBlock) for n in expected)
        assert all(not m.training for m in model.modules())
        out = model_output(model, x)
    assert_close_scaled(out, ref, 2e-5)
    pykernels.swap(model)
    assert model.pykernels_swapped == [], "swap is idempotent"


def test_swap_timm_keeps_state_dict_and_train_mode_draw():
    """A swapped timm model (conv_mlp=True blocks) still loads the original's state_dict with strict=True, and in
    train mode draws the same DropPath masks as the original under the same seed."""
    model, _, _ = timm_atto()
    swapped = pykernels.swap(copy.deepcopy(model)).model
    assert len(swapped.pykernels_swapped) == 12
    swapped.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model.train(), swapped.train()
    with torch.no_grad():
        ref = run_seeded(lambda: model(x), 3)
        out = run_seeded(lambda: swapped(x), 3)
        other = run_seeded(lambda: swapped(x), 4)
    assert_close_scaled(out, ref, 1e-4)
    assert not torch.allclose(other, out, rtol=1e-3, atol=1e-3), "another seed drops other samples"


def test_swap_include_exclude_kinds():
    model, _, _ = timm_atto()
    drop_paths = [n for n, m in model.named_modules() if type(m).__name__ == "DropPath"]
    only_dp = pykernels.swap(copy.deepcopy(model), include="drop_path").model
    assert sorted(only_dp.pykernels_swapped) == sorted(drop_paths) and block_names(only_dp)
    no_blocks = pykernels.swap(copy.deepcopy(model), exclude="convnext_block").model
    mlps = [n for n, m in model.named_modules() if type(m).__name__ == "Mlp"]  # kind "mlp" inside the blocks
    assert sorted(no_blocks.pykernels_swapped) == sorted(drop_paths + mlps)
    # blocks whose DropPath was swapped first are still recognised (a pykernels.DropPath inside is fine)
    pykernels.swap(only_dp, include="convnext_block")
    assert len(only_dp.pykernels_swapped) == 12


# ---- 7. CUDA (runs where a GPU is present) ----------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("source", ["timm", "timm_conv_mlp", "torchvision", "hf"])
def test_cuda_parity_and_train_mask(source, layout):
    """On the GPU backends chosen automatically: eval output and gradients vs the original (TF32 off on both
    sides), and the same DropPath mask under the same seed in train mode (CUDA's Philox stream, same draw)."""
    original = build(source, dim=48, drop_path=0.5).cuda().eval()
    ours = ConvNeXtBlock.from_module(original)
    assert ours.conv_dw.weight.is_cuda
    x = make_x((8, 48, 14, 14), layout).cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            compare_to_original(ours, original, SOURCES[source][1], x, out_rtol=1e-5, grad_rtol=1e-4)
            original.train(), ours.train()
            with torch.no_grad():
                for seed in range(2):
                    out = run_seeded(lambda: ours(x), seed)
                    ref = run_seeded(lambda: original(x), seed)
                    assert torch.equal(dropped_rows(out - x), dropped_rows(ref - x)), f"seed {seed}"
                    assert_close_scaled(out, ref, 1e-5, f"train seed {seed}")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


# ---- 8. torch.compile ---------------------------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    original = build("timm", dim=16, drop_path=0.5).eval()
    eager = ConvNeXtBlock.from_module(original)
    compiled_block = copy.deepcopy(eager)
    compiled = torch.compile(compiled_block, fullgraph=True, backend="inductor")
    for layout in LAYOUTS:
        x = make_x((2, 16, 9, 9), layout)
        out_e, g_e = fwd_bwd(eager, x)
        x_c = x.detach().clone().requires_grad_(True)
        compiled_block.zero_grad(set_to_none=True)
        out_c = compiled(x_c)
        g = torch.randn(out_c.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).float()
        (out_c * g).sum().backward()
        assert_close_scaled(out_c.detach(), out_e, 1e-6, f"{layout} output")
        assert_close_scaled(x_c.grad, g_e["x"], 1e-5, f"{layout} grad x")
        for name, p in compiled_block.named_parameters():
            assert_close_scaled(p.grad, g_e[name], 1e-5, f"{layout} grad {name}")
    # train mode: still one graph; with inductor's fallback_random the mask is eager's (same seed, same samples)
    import torch._inductor.config as inductor_config

    eager.train(), compiled_block.train()
    x = make_x((8, 16, 9, 9))
    outcomes = set()
    with inductor_config.patch(fallback_random=True), torch.no_grad():
        for seed in (0, 1):
            out_c = run_seeded(lambda: compiled(x), seed)
            out_e = run_seeded(lambda: eager(x), seed)
            rows = dropped_rows(out_c - x)
            assert torch.equal(rows, dropped_rows(out_e - x)), f"seed {seed}"
            outcomes.update(rows.tolist())
            assert_close_scaled(out_c, out_e, 1e-6, f"train seed {seed}")
    assert outcomes == {True, False}


def test_inference_in_place_gelu_matches_autograd_path():
    """Under no_grad the MLP applies GELU in place on its hidden tensor: the same values as the autograd path, and
    the input is left untouched."""
    torch.manual_seed(3)
    block = ConvNeXtBlock(24, layer_scale_init_value=0.5).eval()
    x = torch.randn(2, 24, 9, 9)
    x_copy = x.clone()
    with torch.no_grad():
        fast = block(x)
    slow = block(x.clone().requires_grad_())
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)
    torch.testing.assert_close(x, x_copy, rtol=0, atol=0)
