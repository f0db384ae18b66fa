"""The fused MLP (pykernels.functional.mlp, pykernels.FusedMlp, ConvNeXtBlock's MLP, FusedMHSA's projections):
``shortcut + drop_path(gamma * fc2(act(fc1(x))))``.

* forward and every gradient against the float64 formula (pykernels.reference.mlp) on awkward shapes (odd widths,
  one token, 2-D / 3-D / 4-D inputs), with and without biases, gamma, shortcut, on each GEMM provider (inference:
  aten / oneDNN; training: aten / oneDNN 1x1 conv), float32 and bfloat16;
* DropPath in training: the mask timm's DropPath draws under the same seed;
* the originals: timm ``Mlp`` (``use_conv`` False / True), torchvision ``MLPBlock``, Hugging Face ``ViTMLP``, timm's
  ``ConvNeXtBlock`` (``conv_mlp`` False / True), timm ``Attention`` (qkv / proj) as ``FusedMHSA``;
* packed weights rebuilt after ``optimizer.step()`` and ``load_state_dict`` (the eval output follows the weights);
* saved tensors (the hidden pre-activation once), ``torch.compile(fullgraph=True)``, state_dict keys, ``swap``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels
from pykernels import FusedMlp, gemm, reference
from pykernels import functional as PF
from pykernels.modules import mlp as mlp_module
from pykernels.ops import mlp as mlp_ops

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

from timm.layers import DropPath as TimmDropPath  # noqa: E402
from timm.layers import Mlp as TimmMlp  # noqa: E402
from timm.models.convnext import ConvNeXtBlock as TimmConvNeXtBlock  # noqa: E402
from timm.models.vision_transformer import Attention as TimmAttention  # noqa: E402
from torchvision.models.vision_transformer import MLPBlock  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread (two OpenMP teams spinning against each other under ``pytest -n 2`` made
    the tests of this repository 20-100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def force_provider(monkeypatch):
    """``force_provider(name)``: every GEMM provider choice made from now on in the test is ``name`` where it can run
    the call (the measured choice otherwise); earlier choices are forgotten for the test."""

    def force(name: str):
        monkeypatch.setattr(gemm, "_CHOICES", {})
        monkeypatch.setattr(mlp_ops, "TINY_GEMM_MACS", 0)  # the tests' small GEMMs go through the providers too
        real = gemm._pick

        def pick(key, runs):
            if name in runs:
                try:
                    runs[name]()
                except RuntimeError:
                    return real(key, runs)
                gemm._CHOICES[key] = name
                return name
            return real(key, runs)

        monkeypatch.setattr(gemm, "_pick", pick)

    return force


def onednn_runs(dtype=torch.float32) -> bool:
    return gemm.prepack(torch.ones(4, 4, dtype=dtype), 4) is not None


def assert_close_scaled(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max |expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3e} > {rtol:g} x max |expected| {scale:.3e}"


def make_case(x_shape, hidden, out, bias=True, gamma=False, shortcut=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = x_shape[-1]

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).requires_grad_()

    return {
        "x": rnd(*x_shape),
        "fc1_weight": rnd(hidden, k, s=k**-0.5),
        "fc1_bias": rnd(hidden, s=0.5) if bias else None,
        "fc2_weight": rnd(out, hidden, s=hidden**-0.5),
        "fc2_bias": rnd(out, s=0.5) if bias else None,
        "gamma": rnd(out, s=0.7) if gamma else None,
        "shortcut": rnd(*x_shape[:-1], out) if shortcut else None,
    }


ORDER = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma", "shortcut")


def run(case, act, fn, grad, **kw):
    """(output, {name: grad}) of (fn(...) * grad).sum()."""
    inputs = {n: t for n, t in case.items() if t is not None}
    for t in inputs.values():
        t.grad = None
    out = fn(
        case["x"],
        case["fc1_weight"],
        case["fc1_bias"],
        case["fc2_weight"],
        case["fc2_bias"],
        act,
        gamma=case["gamma"],
        shortcut=case["shortcut"],
        **kw,
    )
    (out * grad.to(out.dtype)).sum().backward()
    return out.detach(), {n: t.grad for n, t in inputs.items()}


def oracle(case, act, grad, scale=None):
    """The float64 formula's output and gradients (the same scale)."""
    case64 = {n: None if t is None else t.detach().double().requires_grad_() for n, t in case.items()}
    out = reference.mlp(*(case64[n] for n in ORDER[:5]), act, case64["gamma"], case64["shortcut"], scale)
    (out * grad).sum().backward()
    return out.detach(), {n: t.grad for n, t in case64.items() if t is not None}


def eager_error(case, act, grad):
    """The float64 oracle's distance to eager PyTorch in the case's dtype (output and each gradient)."""
    ref_out, ref_grads = oracle(case, act, grad)
    copies = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in case.items()}

    def fn(x, w1, b1, w2, b2, act, gamma=None, shortcut=None):
        return reference.mlp(x, w1, b1, w2, b2, act, gamma, shortcut)

    out, grads = run(copies, act, fn, grad)
    errs = {"out": (out.double() - ref_out).abs().max().item()}
    errs.update({n: (grads[n].double() - ref_grads[n]).abs().max().item() for n in grads})
    return errs


SHAPES = {"tokens_3d": ((2, 5, 13), 21, 13), "nhwc_4d": ((2, 3, 3, 7), 30, 9), "one_token": ((1, 1, 5), 4, 6)}
ACTS = list(mlp_ops.ACTS)


# ---- 1. forward and gradients against the float64 oracle ----------------------------------------------------------


@pytest.mark.parametrize("provider", ["aten", "onednn"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_inference_matches_float64(shape, act, provider, force_provider):
    if provider == "onednn" and not onednn_runs():
        pytest.skip("oneDNN is not available in this torch build")
    force_provider(provider)
    x_shape, hidden, out = SHAPES[shape]
    for bias, gamma, shortcut in [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]:
        case = make_case(x_shape, hidden, out, bias, gamma, shortcut)
        with torch.no_grad():
            got = PF.mlp(*(case[n] for n in ORDER[:5]), act, gamma=case["gamma"], shortcut=case["shortcut"])
        want, _ = oracle(case, act, torch.zeros(*x_shape[:-1], out, dtype=torch.float64))
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert_close_scaled(got, want, 2e-6, f"bias={bias} gamma={gamma} shortcut={shortcut}")


@pytest.mark.parametrize("provider", ["aten", "conv"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_matches_float64(shape, act, provider, force_provider):
    """Every gradient within 4x eager float32's own distance to the float64 formula (or 2e-6 relative)."""
    force_provider(provider)
    x_shape, hidden, out = SHAPES[shape]
    for bias, gamma, shortcut in [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]:
        case = make_case(x_shape, hidden, out, bias, gamma, shortcut, seed=3)
        grad = torch.randn(*x_shape[:-1], out, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        got, grads = run(case, act, PF.mlp, grad)
        want, want_grads = oracle(case, act, grad)
        eager = eager_error(case, act, grad)
        what = f"bias={bias} gamma={gamma} shortcut={shortcut}"
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= max(4 * eager["out"], 2e-6 * scale), what
        assert set(grads) == set(want_grads)
        for name, g in grads.items():
            ref = want_grads[name]
            err = (g.double() - ref).abs().max().item()
            assert err <= max(4 * eager[name], 2e-6 * ref.abs().max().item()), f"{what}: grad {name} error {err:.3g}"


def test_gradcheck_float64():
    case = make_case((2, 3, 5), 7, 4, True, True, True, dtype=torch.float64)
    inputs = tuple(case[n] for n in ORDER)
    for act in ("gelu", "gelu_tanh", "silu"):

        def fn(x, w1, b1, w2, b2, gamma, shortcut, act=act):
            torch.manual_seed(0)
            return PF.mlp(x, w1, b1, w2, b2, act, gamma=gamma, shortcut=shortcut, drop_prob=0.4, training=True)

        assert torch.autograd.gradcheck(fn, inputs)


def test_bfloat16_matches_float64_within_eager_error():
    """bfloat16 (oneDNN's bf16 GEMMs where this CPU has them, else ATen): output and gradients within 2x eager
    bfloat16's distance to the float64 formula."""
    case = make_case((2, 9, 24), 40, 24, True, True, True, dtype=torch.bfloat16, seed=5)
    grad = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eager = eager_error(case, "gelu", grad)
    got, grads = run(case, "gelu", PF.mlp, grad)
    want, want_grads = oracle(case, "gelu", grad)
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max().item() <= 2 * eager["out"]
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16
        assert (g.double() - want_grads[name]).abs().max().item() <= 2 * eager[name] + 1e-3, name
    with torch.no_grad():
        fast = PF.mlp(*(case[n] for n in ORDER[:5]), "gelu", gamma=case["gamma"], shortcut=case["shortcut"])
    assert (fast.double() - want).abs().max().item() <= 2 * eager["out"]


def test_conv_shaped_weights_and_non_contiguous_input():
    case = make_case((2, 4, 6, 8), 12, 8, True, True, True)
    x = case["x"].detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # same values, other strides
    assert not x.is_contiguous()
    w1, w2 = case["fc1_weight"].detach()[:, :, None, None], case["fc2_weight"].detach()[:, :, None, None]
    with torch.no_grad():
        got = PF.mlp(x, w1, case["fc1_bias"], w2, case["fc2_bias"], gamma=case["gamma"], shortcut=case["shortcut"])
    want, _ = oracle(case, "gelu", torch.zeros(2, 4, 6, 8, dtype=torch.float64))
    assert_close_scaled(got, want, 2e-6)


def test_providers_agree_with_the_formula():
    """Each GEMM provider on its own: act(x W^T + b) for the GELU forms, other + x W^T + b, and the training
    forward / backward products."""
    torch.manual_seed(0)
    x, w, b, other = torch.randn(37, 24), torch.randn(50, 24) * 0.2, torch.randn(50), torch.randn(37, 50)
    x64, w64, b64 = x.double(), w.double(), b.double()
    packed = gemm.prepack(w, 37)
    for act, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
        want = F.gelu(F.linear(x64, w64, b64), approximate=approximate)
        for name, fn in gemm._RUN.items():
            if name == "onednn" and packed is None:
                continue
            assert_close_scaled(fn(x, w, b, act, packed if name == "onednn" else None), want, 2e-6, f"{name} {act}")
    want = other.double() + F.linear(x64, w64, b64)
    for name, fn in gemm._RUN_ADD.items():
        if name == "onednn" and packed is None:
            continue
        assert_close_scaled(fn(x, w, b, other, packed if name == "onednn" else None), want, 2e-6, f"{name} add")
    grad = torch.randn(37, 50)
    for name, (fwd, bwd) in gemm._TRAIN_RUN.items():
        assert_close_scaled(fwd(x, w, b), F.linear(x64, w64, b64), 2e-6, f"{name} fwd")
        assert_close_scaled(fwd(x, w, None), F.linear(x64, w64), 2e-6, f"{name} fwd no bias")
        gi, gw, gb = bwd(grad, x, w, True, True, True)
        assert_close_scaled(gi, grad.double() @ w64, 2e-6, f"{name} grad input")
        assert_close_scaled(gw, grad.double().t() @ x64, 2e-6, f"{name} grad weight")
        assert_close_scaled(gb, grad.double().sum(0), 2e-6, f"{name} grad bias")
        assert bwd(grad, x, w, False, True, False)[0] is None
        gi_alone = bwd(grad, None, w, True, False, False)[0]  # grad input before x is at hand (fc2 in backward)
        assert_close_scaled(gi_alone, grad.double() @ w64, 2e-6, f"{name} grad input alone")


# ---- 2. DropPath: timm's mask under the same seed ----------------------------------------------------------------


def test_drop_path_same_mask_as_timm():
    """Training with drop_prob: the samples timm's DropPath drops (same seed) are dropped here, with its 1/keep scale,
    and every gradient follows the same mask."""
    case = make_case((8, 3, 6), 10, 6, True, True, True, seed=1)
    layer = TimmMlp(6, 10)
    with torch.no_grad():
        layer.fc1.weight.copy_(case["fc1_weight"]), layer.fc1.bias.copy_(case["fc1_bias"])
        layer.fc2.weight.copy_(case["fc2_weight"]), layer.fc2.bias.copy_(case["fc2_bias"])
    drop = TimmDropPath(0.5).train()
    grad = torch.randn(8, 3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    outcomes = set()
    for seed in range(3):
        torch.manual_seed(seed)
        got, grads = run(case, "gelu", PF.mlp, grad, drop_prob=0.5, training=True)
        x = case["x"].detach().clone().requires_grad_()
        gamma = case["gamma"].detach().clone().requires_grad_()
        torch.manual_seed(seed)
        want = case["shortcut"].detach() + drop(layer(x) * gamma)
        (want * grad.float()).sum().backward()
        dropped = (got - case["shortcut"].detach()).flatten(1).eq(0).all(1)
        assert torch.equal(dropped, (want - case["shortcut"].detach()).flatten(1).eq(0).all(1)), f"seed {seed}"
        outcomes.update(dropped.tolist())
        assert_close_scaled(got, want.detach(), 2e-6, f"seed {seed}")
        assert_close_scaled(grads["x"], x.grad, 2e-5, "grad x")
        assert_close_scaled(grads["gamma"], gamma.grad, 2e-5, "grad gamma")
        assert_close_scaled(grads["fc1_weight"], layer.fc1.weight.grad, 2e-5, "grad fc1")
        layer.zero_grad()
    assert outcomes == {True, False}


def test_no_random_draw_without_drop():
    case = make_case((4, 3, 5), 6, 5)
    state = torch.get_rng_state()
    PF.mlp(*(case[n] for n in ORDER[:5]), drop_prob=0.5, training=False)
    PF.mlp(*(case[n] for n in ORDER[:5]), drop_prob=0.0, training=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_argument_errors():
    case = make_case((2, 3, 5), 6, 4)
    x, w1, b1, w2, b2 = (case[n] for n in ORDER[:5])
    with pytest.raises(ValueError, match="x has 4 features"):
        PF.mlp(x[..., :4], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="fc1 gives 6 features but fc2_weight takes 5"):
        PF.mlp(x, w1, b1, w2[:, :5], b2)
    with pytest.raises(ValueError, match="gamma must have shape"):
        PF.mlp(x, w1, b1, w2, b2, gamma=torch.ones(5))
    with pytest.raises(ValueError, match="shortcut must have shape"):
        PF.mlp(x, w1, b1, w2, b2, shortcut=torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="activation 'quick_gelu' not supported"):
        PF.mlp(x, w1, b1, w2, b2, "quick_gelu")
    with pytest.raises(ValueError, match="drop_prob must be in"):
        PF.mlp(x, w1, b1, w2, b2, drop_prob=1.5, training=True)


# ---- 3. the originals ------------------------------------------------------------------------------------------


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def grads_of(module, x, seed=7):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * g).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def compare(original, x, rtol_out=2e-6, rtol_grad=2e-5):
    """FusedMlp.from_module(copy of original): eval output (no grad), training output and every gradient."""
    ours = FusedMlp.from_module(copy.deepcopy(original))
    assert set(ours.state_dict()) == set(original.state_dict())
    for training in (False, True):
        original.train(training), ours.train(training)
        with torch.no_grad():
            assert_close_scaled(ours(x), original(x), rtol_out, f"training={training} no-grad output")
        out, gx, gp = grads_of(ours, x)
        ref, rx, rp = grads_of(original, x)
        assert_close_scaled(out, ref, rtol_out, f"training={training} output")
        assert_close_scaled(gx, rx, rtol_grad, "grad x")
        for name, g in gp.items():
            assert_close_scaled(g, rp[name], rtol_grad, f"grad {name}")
    return ours


@pytest.mark.parametrize(
    "act_layer", [nn.GELU, timm.layers.activations.GELUTanh, nn.ReLU, nn.SiLU], ids=lambda a: a.__name__
)
def test_timm_mlp(act_layer):
    original = perturbed(TimmMlp(13, 27, 11, act_layer=act_layer))
    ours = compare(original, torch.randn(3, 7, 13))
    assert ours.act_name == mlp_module.act_name(act_layer())


def test_timm_mlp_conv_and_no_bias():
    original = perturbed(TimmMlp(6, 10, use_conv=True, bias=(False, True)))
    x = torch.randn(2, 6, 5, 3)
    compare(original, x)
    compare(original, x.contiguous(memory_format=torch.channels_last))


def test_timm_mlp_dropout_in_training_runs_the_original_layers():
    original = perturbed(TimmMlp(8, 16, drop=0.3)).train()
    ours = FusedMlp.from_module(copy.deepcopy(original))
    x = torch.randn(4, 5, 8)
    torch.manual_seed(0)
    want = original(x)
    torch.manual_seed(0)
    assert torch.equal(ours(x), want)
    original.eval(), ours.eval()
    with torch.no_grad():
        assert_close_scaled(ours(x), original(x), 2e-6)


def test_torchvision_mlp_block_and_hf_vit_mlp():
    compare(perturbed(MLPBlock(12, 30, 0.0)), torch.randn(2, 5, 12))
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTMLP

    config = ViTConfig(hidden_size=12, intermediate_size=20, hidden_act="gelu")
    ours = compare(perturbed(ViTMLP(config)), torch.randn(2, 5, 12))
    assert ours.config.intermediate_size == 20 and ours.act_name == "gelu"  # HF code may read mlp.config


def test_refused_variants_say_why():
    assert "LayerNorm between fc1 and fc2" in " ".join(
        mlp_module.unsupported_reasons(TimmMlp(8, 16, norm_layer=nn.LayerNorm))
    )
    assert "QuickGELU" in " ".join(mlp_module.unsupported_reasons(TimmMlp(8, 16, act_layer=timm.layers.QuickGELU)))
    assert not mlp_module.can_convert(FusedMlp(8))
    with pytest.raises(ValueError, match="cannot stand in"):
        FusedMlp.from_module(TimmMlp(8, 16, act_layer=nn.Tanh))
    with pytest.raises(TypeError, match="does not know"):
        FusedMlp.from_module(nn.Linear(3, 3))


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_timm_convnext_block(conv_mlp):
    original = perturbed(TimmConvNeXtBlock(12, conv_mlp=conv_mlp, ls_init_value=0.5))
    ours = pykernels.ConvNeXtBlock.from_module(copy.deepcopy(original))
    x = torch.randn(2, 12, 5, 5).contiguous(memory_format=torch.channels_last)
    for training in (False, True):
        original.train(training), ours.train(training)
        out, gx, gp = grads_of(ours, x)
        ref, rx, rp = grads_of(original, x)
        assert_close_scaled(out, ref, 2e-6, "output")
        assert_close_scaled(gx, rx, 2e-5, "grad x")
        for name, g in gp.items():
            assert_close_scaled(g, rp[name].reshape(g.shape), 2e-5, f"grad {name}")


def test_fused_mhsa_projections_in_eval(force_provider):
    original = perturbed(TimmAttention(24, num_heads=4, qkv_bias=True)).eval()
    ours = pykernels.FusedMHSA.from_module(original)
    x = torch.randn(2, 7, 24)
    for provider in ("aten", "onednn"):
        force_provider(provider)
        with torch.no_grad():
            assert_close_scaled(ours(x), original(x), 2e-6, provider)
    assert {k[:4] for k in gemm.choices()} >= {(14, 24, 72, "none"), (14, 24, 24, "none")}
    out, gx, gp = grads_of(ours, x)  # with autograd: plain nn.Linear
    ref, rx, rp = grads_of(original, x)
    assert_close_scaled(gx, rx, 2e-5)


def test_tiny_linears_go_straight_to_aten(monkeypatch):
    """Below TINY_GEMM_MACS no provider is chosen or packed (the bookkeeping would cost more than the GEMM)."""
    monkeypatch.setattr(gemm, "_CHOICES", {})
    x, w, b = torch.randn(2, 7, 24), torch.randn(72, 24), torch.randn(72)
    assert x.numel() * w.shape[0] < mlp_ops.TINY_GEMM_MACS
    with torch.no_grad():
        torch.testing.assert_close(mlp_ops.linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))
    assert not gemm.choices()


# ---- 4. packed weights follow the weights --------------------------------------------------------------------------


@pytest.fixture
def count_packs(monkeypatch):
    calls = []
    real = gemm.prepack

    def spy(weight, rows):
        calls.append(tuple(weight.shape))
        return real(weight, rows)

    monkeypatch.setattr(gemm, "prepack", spy)
    return calls


def test_repacked_after_optimizer_step(count_packs):
    block = pykernels.ConvNeXtBlock(8, layer_scale_init_value=0.5)
    x = torch.randn(2, 8, 4, 4)
    block.eval()
    with torch.no_grad():
        before = block(x)
        assert torch.equal(block(x), before)
    packs = len(count_packs)
    assert packs == 2, "fc1 and the gamma-folded fc2 are packed once"
    block.train()
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    block(x).square().sum().backward()
    opt.step()  # in-place updates of fc1, fc2, gamma
    block.eval()
    with torch.no_grad():
        after = block(x)
        reference_out = pykernels.ConvNeXtBlock.from_module(block)(x)  # a fresh copy: fresh packs
    assert len(count_packs) >= packs + 2
    assert not torch.allclose(after, before)
    assert_close_scaled(after, reference_out, 1e-6)
    with torch.no_grad():  # only gamma changes: the folded fc2 is rebuilt
        block.gamma.mul_(2.0)
        assert_close_scaled(block(x), pykernels.ConvNeXtBlock.from_module(block)(x), 1e-6, "after gamma update")


def test_repacked_after_load_state_dict():
    original = perturbed(TimmMlp(10, 20)).eval()
    ours = FusedMlp.from_module(copy.deepcopy(original))
    x = torch.randn(3, 10)
    other = perturbed(TimmMlp(10, 20), seed=5)
    with torch.no_grad():
        ours(x)
        ours.load_state_dict(other.state_dict())
        assert_close_scaled(ours(x), other(x), 2e-6, "after load_state_dict")
        ours.load_state_dict(other.state_dict(), assign=True)  # new tensors
        assert_close_scaled(ours(x), other(x), 2e-6, "after load_state_dict(assign=True)")
        ours.fc1.weight = nn.Parameter(original.fc1.weight.clone())
        ours.fc2.weight = nn.Parameter(original.fc2.weight.clone())
        ours.fc1.bias, ours.fc2.bias = original.fc1.bias, original.fc2.bias
        assert_close_scaled(ours(x), original(x), 2e-6, "after replacing the parameters")
        ours.double()
        assert_close_scaled(ours(x.double()), original.double()(x.double()), 1e-12, "after .double()")


def test_derived_weights_are_released_with_the_weights():
    weight, bias, weight2 = torch.randn(12, 6), torch.randn(12), torch.randn(6, 12)
    with torch.no_grad():
        PF.mlp(torch.randn(3, 6), weight, bias, weight2, None)
    keys = [k for k in gemm._DERIVED if id(weight) in k]
    assert keys
    del weight
    assert not [k for k in gemm._DERIVED if k in keys]


def test_inference_mode_and_pickling():
    ours = FusedMlp.from_module(perturbed(TimmMlp(6, 9))).eval()
    x = torch.randn(2, 6)
    want = ours(x).detach()
    with torch.inference_mode():
        assert_close_scaled(ours(x), want, 1e-6)
        inference_model = copy.deepcopy(ours)  # inference tensors as weights (no version counter): no caching
        assert_close_scaled(inference_model(x), want, 1e-6)
    import io

    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_close_scaled(loaded(x), want, 1e-6)


# ---- 5. memory, compile, state_dict, swap ----------------------------------------------------------------------


def saved_storages(fn):
    """{storage: nbytes} of the tensors autograd saves while fn() runs (each storage once)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_saves_the_hidden_tensor_once():
    case = make_case((4, 16, 8), 32, 8, True, True, True)
    x, w1, b1, w2, b2, gamma, short = (case[n] for n in ORDER)
    hidden_bytes = 4 * 16 * 32 * 4

    def fused():
        torch.manual_seed(0)
        PF.mlp(x, w1, b1, w2, b2, gamma=gamma, shortcut=short, drop_prob=0.25, training=True)

    def eager():
        torch.manual_seed(0)
        short + TimmDropPath(0.25)(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) * gamma)

    ours, theirs = saved_storages(fused), saved_storages(eager)
    assert sum(n == hidden_bytes for n in ours.values()) == 1
    assert sum(n == hidden_bytes for n in theirs.values()) == 2
    assert sum(ours.values()) < sum(theirs.values()) - hidden_bytes


def test_compile_fullgraph():
    torch._dynamo.reset()
    original = perturbed(TimmMlp(8, 16))
    ours = FusedMlp.from_module(copy.deepcopy(original))
    gamma = torch.randn(8, requires_grad=True)

    def block(x):
        return PF.mlp(
            x, ours.fc1.weight, ours.fc1.bias, ours.fc2.weight, ours.fc2.bias, gamma=gamma, shortcut=x.flip(0)
        ) + ours(x)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 8, requires_grad=True)
    out_c = compiled(x)
    out_e = block(x)
    assert_close_scaled(out_c, out_e, 1e-6)
    (gx_c,) = torch.autograd.grad(out_c.sum(), x)
    (gx_e,) = torch.autograd.grad(out_e.sum(), x)
    assert_close_scaled(gx_c, gx_e, 1e-5)
    with torch.no_grad():
        assert_close_scaled(compiled(x), out_e, 1e-6)


def test_state_dict_round_trip():
    original = perturbed(TimmMlp(8, 16, bias=(True, False)))
    ours = FusedMlp(8, 16, bias=(True, False))
    ours.load_state_dict(original.state_dict(), strict=True)
    fresh = TimmMlp(8, 16, bias=(True, False))
    fresh.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 8)
    assert_close_scaled(ours(x), original(x), 2e-6)
    block = MLPBlock(8, 16, 0.0)
    converted = FusedMlp.from_module(copy.deepcopy(block))
    assert list(converted.state_dict()) == list(block.state_dict())
    assert "layout='torchvision'" in repr(converted)


def test_swap_report():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5).eval()
    model.blocks[1].mlp = TimmMlp(24, 48, norm_layer=nn.LayerNorm)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    report = pykernels.swap(model)
    assert [(r.path, r.new) for r in report.replaced if r.kind == "mlp"] == [
        ("blocks.0.mlp", "FusedMlp"),
        ("blocks.0.norm2", "MlpPreNorm"),  # the block's pre-norm moved into the FusedMlp
    ]
    assert [(s.path, s.kind) for s in report.skipped] == [("blocks.1.mlp", "mlp")]
    assert "LayerNorm" in report.skipped[0].reason
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert_close_scaled(model(x), want, 2e-6)
    assert not pykernels.swap(model).replaced
    assert "mlp" not in {r.kind for r in pykernels.swap(copy.deepcopy(model), exclude="mlp").replaced}


# ---- 6. the pre-norm taken into the fused op (ViT blocks) --------------------------------------------------------


def test_layer_norm_prologue_matches_float64():
    case = make_case((3, 4, 10), 16, 10, True, True, True, seed=2)
    g = torch.Generator().manual_seed(3)
    ln_weight = (1 + 0.3 * torch.randn(10, generator=g)).requires_grad_()
    ln_bias = (0.3 * torch.randn(10, generator=g)).requires_grad_()
    grad = torch.randn(3, 4, 10, generator=g, dtype=torch.float64)

    def fused():
        torch.manual_seed(0)
        return PF.mlp(
            *(case[n] for n in ORDER[:5]),
            gamma=case["gamma"],
            shortcut=case["shortcut"],
            drop_prob=0.3,
            training=True,
            ln_weight=ln_weight,
            ln_bias=ln_bias,
            ln_eps=1e-5,
        )

    out = fused()
    (out * grad.float()).sum().backward()
    torch.manual_seed(0)
    scale = reference.draw_drop_path_scale(3, 3, 0.3, dtype=torch.float32, device="cpu").double()
    case64 = {n: t.detach().double().requires_grad_() for n, t in case.items()}
    w64, b64 = ln_weight.detach().double().requires_grad_(), ln_bias.detach().double().requires_grad_()
    inputs64 = [case64[n] for n in ORDER[:5]]
    want = reference.mlp(*inputs64, "gelu", case64["gamma"], case64["shortcut"], scale, (w64, b64, 1e-5))
    (want * grad).sum().backward()
    assert_close_scaled(out.detach(), want.detach(), 2e-6, "output")
    for name in ORDER:
        assert_close_scaled(case[name].grad, case64[name].grad, 2e-5, f"grad {name}")
    assert_close_scaled(ln_weight.grad, w64.grad, 2e-5, "grad ln_weight")
    assert_close_scaled(ln_bias.grad, b64.grad, 2e-5, "grad ln_bias")
    with torch.no_grad():
        assert_close_scaled(fused(), want.detach(), 2e-6, "no-grad output")


def vit_blocks():
    from timm.models.vision_transformer import Block
    from torchvision.models.vision_transformer import EncoderBlock
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTLayer

    config = ViTConfig(hidden_size=24, num_attention_heads=3, intermediate_size=40)
    return {
        "timm": (lambda: Block(24, 3, mlp_ratio=2.0), "norm2"),
        "torchvision": (lambda: EncoderBlock(3, 24, 40, 0.0, 0.0), "ln_2"),
        "huggingface": (lambda: ViTLayer(config), "layernorm_after"),
    }


@pytest.mark.parametrize("source", ["timm", "torchvision", "huggingface"])
def test_swapped_vit_block_takes_its_pre_norm(source):
    build, norm_name = vit_blocks()[source]
    torch.manual_seed(0)
    original = perturbed(build())
    block = copy.deepcopy(original)
    keys = list(block.state_dict())
    params = dict(block.named_parameters())
    report = pykernels.swap(block, include="mlp")
    assert [r.path for r in report.replaced] == ["mlp", norm_name]
    assert isinstance(getattr(block, norm_name), mlp_module.MlpPreNorm) and block.mlp._prenorm is getattr(
        block, norm_name
    )
    assert list(block.state_dict()) == keys and dict(block.named_parameters()) == params  # the same Parameters
    x = torch.randn(2, 5, 24)

    def call(module, x):
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    for training in (False, True):
        original.train(training), block.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, got = call(original, xa), call(block, xb)
        assert_close_scaled(got, want, 2e-6, f"training={training}")
        g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
        (want * g).sum().backward()
        (got * g).sum().backward()
        assert_close_scaled(xb.grad, xa.grad, 2e-5, "grad x")
        for (name, p), q in zip(block.named_parameters(), original.parameters()):
            assert_close_scaled(p.grad, q.grad, 2e-5, f"grad {name}")
        block.zero_grad(), original.zero_grad()
    again = copy.deepcopy(block)  # the reference to the norm follows the copy
    assert again.mlp._prenorm is getattr(again, norm_name)
    assert "mlp" not in {r.kind for r in pykernels.swap(block).replaced}


def test_pre_norm_saves_one_tensor_less():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    original = Block(16, 2, mlp_ratio=4.0).train()
    swapped = copy.deepcopy(original)
    pykernels.swap(swapped, include="mlp")
    x = torch.randn(2, 8, 16, requires_grad=True)
    ours = saved_storages(lambda: swapped(x))
    theirs = saved_storages(lambda: original(x))
    params = {p.untyped_storage().data_ptr() for m in (original, swapped) for p in m.parameters()}
    token = 2 * 8 * 16 * 4
    ours = sum(n for p, n in ours.items() if p not in params)
    theirs = sum(n for p, n in theirs.items() if p not in params)
    assert ours <= theirs - 5 * token, "the second 4C hidden tensor and the normalised copy are not kept"


# ---- 7. CUDA (runs where a GPU is present) ----------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_cuda_matches_float64(act):
    """cuBLASLt's GELU-tanh / ReLU epilogue (torch._addmm_activation) and plain ATen in inference, the fused autograd
    node in training (TF32 off)."""
    case = make_case((4, 33, 48), 96, 40, True, True, True, seed=6)
    cuda = {n: t.detach().cuda().requires_grad_() for n, t in case.items()}
    grad = torch.randn(4, 33, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            fast = PF.mlp(*(cuda[n] for n in ORDER[:5]), act, gamma=cuda["gamma"], shortcut=cuda["shortcut"])
        got, grads = run(cuda, act, PF.mlp, grad.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    want, want_grads = oracle(case, act, grad)
    assert_close_scaled(fast.cpu(), want, 1e-5, "inference")
    assert_close_scaled(got.cpu(), want, 1e-5, "training")
    for name, g in grads.items():
        assert_close_scaled(g.cpu(), want_grads[name], 1e-5, f"grad {name}")


# ---- 8. per-thread scratch buffers (hidden tensors above 1 MiB) -------------------------------------------------


@pytest.mark.parametrize("provider", ["aten", "onednn"])
def test_workspace_hidden_tensor(provider, force_provider):
    """A hidden tensor big enough for gemm.workspace: results as the formula, an earlier output untouched by a later
    call, training (act(h) and the hidden gradient in the buffer) as the formula, and threads each with their own."""
    if provider == "onednn" and not onednn_runs():
        pytest.skip("oneDNN is not available in this torch build")
    force_provider(provider)
    case = make_case((2, 150, 32), 1024, 32, True, True, True, seed=8)
    assert gemm.workspace((300, 1024), case["x"]) is not None
    other = make_case((2, 150, 32), 1024, 32, True, False, True, seed=9)
    with torch.no_grad():
        first = PF.mlp(*(case[n] for n in ORDER[:5]), gamma=case["gamma"], shortcut=case["shortcut"])
        kept = first.clone()
        second = PF.mlp(*(other[n] for n in ORDER[:5]), shortcut=other["shortcut"])
    zeros = torch.zeros(2, 150, 32, dtype=torch.float64)
    assert torch.equal(first, kept)
    assert_close_scaled(first, oracle(case, "gelu", zeros)[0], 2e-6, "first")
    assert_close_scaled(second, oracle(other, "gelu", zeros)[0], 2e-6, "second")
    grad = torch.randn(2, 150, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got, grads = run(case, "gelu", PF.mlp, grad)
    want, want_grads = oracle(case, "gelu", grad)
    assert_close_scaled(got, want, 2e-6, "training output")
    for name, g in grads.items():
        assert_close_scaled(g, want_grads[name], 2e-5, f"grad {name}")

    import threading

    results = {}

    def worker(name, c):
        with torch.no_grad():
            for _ in range(3):
                results[name] = PF.mlp(*(c[n] for n in ORDER[:5]), gamma=c["gamma"], shortcut=c["shortcut"])

    threads = [threading.Thread(target=worker, args=(n, c)) for n, c in (("a", case), ("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(results["a"], kept)
    assert_close_scaled(results["b"], oracle(other, "gelu", zeros)[0], 2e-6, "thread b")
    gemm.release_workspaces()
