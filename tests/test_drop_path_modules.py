"""pykernels.DropPath, functional.drop_path_add / drop_path_branch and pykernels.swap against the drop-path layers
they replace: timm's ``DropPath``, torchvision's ``StochasticDepth``, Hugging Face's ``*DropPath`` and the seeds'
reference ``DropPath`` / ``ConvNeXtBlock`` (../shared/seeds/003_8d8ded4205e85488.txt).

Everything runs on CPU with the automatic backend (the backend x dtype grid lives in tests/test_drop_path.py).
"Equal" means ``torch.equal`` (bit-identical) wherever the original computes the same float32 products in the same
order (timm, torchvision); Hugging Face divides before it masks, so there the check is: the same samples are dropped
and the values are allclose.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math

import pytest
import torch
from seeds_reference import ConvNeXtBlock, DropPath
from torch import nn

import pykernels
from pykernels.functional import drop_path, drop_path_add, drop_path_branch

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

PKDropPath = pykernels.DropPath


# ---- helpers ----------------------------------------------------------------------------------------------------

LAYOUTS = {
    # name: (shape, to-layout, gamma shape for drop_path_add)
    "nchw": ((8, 12, 7, 7), lambda t: t, (12, 1, 1)),
    "channels_last": ((8, 12, 7, 7), lambda t: t.contiguous(memory_format=torch.channels_last), (12, 1, 1)),
    "nhwc": ((8, 7, 7, 12), lambda t: t, (12,)),
    "tokens_197": ((8, 197, 24), lambda t: t, (24,)),
}


def make_input(layout: str, seed: int = 1234, dtype=torch.float32) -> torch.Tensor:
    shape, to_layout, _ = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    return to_layout(torch.randn(shape, generator=g, dtype=torch.float32).to(dtype))


def make_gamma(layout: str, seed: int = 99) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUTS[layout][2], generator=g)


def run_seeded(fn, seed: int = 0):
    torch.manual_seed(seed)
    return fn()


def dropped_rows(t: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows that are all zero."""
    return (t.reshape(t.shape[0], -1) == 0).all(dim=1)


def drop_path_count(model: nn.Module) -> list[str]:
    """Names of the drop-path layers (timm DropPath, torchvision StochasticDepth, HF / seeds' *DropPath) in model."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, PKDropPath):
            continue
        cls = type(m).__name__
        if cls == "StochasticDepth" or (cls.endswith("DropPath") and hasattr(m, "drop_prob")):
            names.append(name)
    return names


# ---- 1. timm bit-identity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_by_keep", [True, False], ids=["scale", "noscale"])
@pytest.mark.parametrize("p", [0.1, 0.5], ids=["p0.1", "p0.5"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_timm_droppath_bit_identical(layout, p, scale_by_keep):
    x = make_input(layout)
    ref_mod = timm.layers.DropPath(p, scale_by_keep=scale_by_keep).train()
    pk_mod = PKDropPath(p, scale_by_keep=scale_by_keep).train()

    x_ref = x.detach().clone().requires_grad_(True)
    x_pk = x.detach().clone().requires_grad_(True)
    ref = run_seeded(lambda: ref_mod(x_ref), seed=7)
    out = run_seeded(lambda: pk_mod(x_pk), seed=7)

    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max().item()}"
    assert torch.equal(dropped_rows(out), dropped_rows(ref))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last), "DropPath must keep the channels-last layout"

    grad = make_input(layout, seed=4321)
    ref.backward(grad)
    out.backward(grad)
    assert torch.equal(x_pk.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_timm_droppath_half_dtypes_match(dtype):
    """timm draws its mask (and 1/keep_prob) in the input's dtype; pykernels draws the same and rounds once."""
    x = make_input("nchw", dtype=dtype)
    ref = run_seeded(lambda: timm.layers.DropPath(0.3).train()(x), seed=3)
    out = run_seeded(lambda: PKDropPath(0.3).train()(x), seed=3)
    assert out.dtype == dtype
    assert torch.equal(dropped_rows(out), dropped_rows(ref))
    assert torch.equal(out, ref), f"max diff {(out.float() - ref.float()).abs().max().item()}"


@pytest.mark.parametrize("p", [0.1, 0.5], ids=["p0.1", "p0.5"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_drop_path_add_matches_timm(layout, p):
    """drop_path_add(shortcut, x, p, gamma) == timm's ``shortcut + DropPath(p)(x * gamma)``."""
    shortcut0 = make_input(layout, seed=11)
    x0 = make_input(layout, seed=12)
    gamma0 = make_gamma(layout)
    timm_dp = timm.layers.DropPath(p).train()

    def leaves():
        return [t.detach().clone().requires_grad_(True) for t in (shortcut0, x0, gamma0)]

    s_ref, x_ref, g_ref = leaves()
    s_pk, x_pk, g_pk = leaves()
    ref = run_seeded(lambda: s_ref + timm_dp(x_ref * g_ref), seed=5)
    out = run_seeded(lambda: drop_path_add(s_pk, x_pk, p, g_pk), seed=5)

    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max().item()}"

    grad = make_input(layout, seed=13)
    ref.backward(grad)
    out.backward(grad)
    assert torch.equal(s_pk.grad, s_ref.grad)
    torch.testing.assert_close(x_pk.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    # gamma's gradient is a reduction over B*H*W (or B*N) products: summation order differs
    torch.testing.assert_close(g_pk.grad, g_ref.grad, rtol=1e-5, atol=1e-5)
    # and both are close to the float64 value of sum(grad * x * scale) over all dims but the channel's
    keep = (~dropped_rows(ref.detach() - shortcut0)).to(torch.float32) / (1 - p)
    g64 = gamma0.double().requires_grad_(True)
    scale64 = keep.double().reshape(-1, *[1] * (x0.dim() - 1))
    (x0.double() * g64 * scale64 * grad.double()).sum().backward()
    torch.testing.assert_close(g_pk.grad.double(), g64.grad, rtol=1e-5, atol=1e-5)


def test_drop_path_functional_matches_timm():
    x = make_input("nchw")
    ref = run_seeded(lambda: timm.layers.drop_path(x, 0.4, True), seed=8)
    out = run_seeded(lambda: drop_path(x, 0.4, True), seed=8)
    assert torch.equal(out, ref)
    assert drop_path(x, 0.4) is x or torch.equal(drop_path(x, 0.4), x)  # training=False by default, as in timm


# ---- 2. torchvision StochasticDepth -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["row", "batch"], ids=["row", "batch"])
@pytest.mark.parametrize("p", [0.2, 0.5], ids=["p0.2", "p0.5"])
def test_torchvision_stochastic_depth(p, mode):
    from torchvision.ops import StochasticDepth

    x = make_input("nchw")
    sd = StochasticDepth(p, mode).train()
    direct = PKDropPath(p, mode=mode).train()
    converted = PKDropPath.from_module(sd)
    assert converted.mode == mode and converted.drop_prob == p and converted.training

    outcomes = set()
    for seed in range(12):  # several seeds so that batch mode sees both outcomes
        ref = run_seeded(lambda: sd(x), seed)
        a = run_seeded(lambda: direct(x), seed)
        b = run_seeded(lambda: converted(x), seed)
        assert torch.equal(a, ref), f"seed {seed}"
        assert torch.equal(b, ref), f"seed {seed}"
        rows = dropped_rows(ref)
        if mode == "batch":
            assert rows.all() or not rows.any()
        outcomes.update(rows.tolist())
    assert outcomes == {True, False}, "some samples (or batches) must be dropped and some kept"


# ---- 3. Hugging Face *DropPath --------------------------------------------------------------------------------------

HF_DROP_PATHS = [
    "convnext.modeling_convnext.ConvNextDropPath",
    "swin.modeling_swin.SwinDropPath",
    "beit.modeling_beit.BeitDropPath",
    "dinov2.modeling_dinov2.Dinov2DropPath",
    "segformer.modeling_segformer.SegformerDropPath",
    "convnextv2.modeling_convnextv2.ConvNextV2DropPath",
]


def hf_class(path: str):
    module, name = path.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(f"transformers.models.{module}"), name)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"{path} not in transformers {transformers.__version__}: {e}")


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "tokens_197"], ids=["nchw", "nhwc", "tokens"])
@pytest.mark.parametrize("path", HF_DROP_PATHS, ids=[p.rsplit(".", 1)[1] for p in HF_DROP_PATHS])
def test_huggingface_drop_path_from_module(path, layout):
    cls = hf_class(path)
    hf = cls(drop_prob=0.5).train()
    pk = PKDropPath.from_module(hf)
    assert pk.rng == "uniform" and pk.drop_prob == 0.5 and pk.training and pk.scale_by_keep

    x = make_input(layout)
    x = torch.cat([x, x])  # B = 16: with p = 0.5 both outcomes occur for the seeds below
    for seed in (0, 1):
        ref = run_seeded(lambda: hf(x), seed)
        out = run_seeded(lambda: pk(x), seed)
        assert torch.equal(dropped_rows(out), dropped_rows(ref)), f"seed {seed}: different samples dropped"
        assert 0 < int(dropped_rows(ref).sum()) < x.shape[0]
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_huggingface_drop_path_eval_and_zero():
    cls = hf_class(HF_DROP_PATHS[0])
    x = make_input("nchw")
    assert torch.equal(PKDropPath.from_module(cls(0.5).eval())(x), x)
    pk = PKDropPath.from_module(cls(0.0).train())
    assert pk.drop_prob == 0.0 and torch.equal(pk(x), x)


# ---- 4. the seeds' DropPath and ConvNeXtBlock -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens_197"], ids=["nchw", "channels_last", "tokens"])
def test_seeds_drop_path_from_module(layout):
    seeds_dp = DropPath(0.4).train()
    pk = PKDropPath.from_module(seeds_dp)
    assert pk.rng == "uniform" and pk.drop_prob == 0.4 and pk.training

    x = torch.cat([make_input(layout)] * 2)
    for seed in range(3):
        ref = run_seeded(lambda: seeds_dp(x), seed)
        out = run_seeded(lambda: pk(x), seed)
        assert torch.equal(dropped_rows(out), dropped_rows(ref)), f"seed {seed}"
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def seeds_convnext(depth: int = 3, dim: int = 16) -> nn.Module:
    torch.manual_seed(0)
    # layer_scale 1.0 (not 1e-6) so that a different drop pattern changes the output visibly
    return nn.Sequential(
        *[ConvNeXtBlock(dim, drop_path=0.3 * (i + 1) / depth, layer_scale_init_value=1.0) for i in range(depth)]
    )


def test_seeds_convnext_block_swap():
    model = seeds_convnext()
    expected_names = drop_path_count(model)
    assert len(expected_names) == 3
    swapped = pykernels.swap(copy.deepcopy(model), include="drop_path").model
    assert sorted(swapped.pykernels_swapped) == sorted(expected_names)
    assert drop_path_count(swapped) == []
    for name in expected_names:
        m = swapped.get_submodule(name)
        assert isinstance(m, PKDropPath) and m.rng == "uniform"

    x = torch.randn(16, 16, 9, 9, generator=torch.Generator().manual_seed(3))
    model.train(), swapped.train()
    for seed in range(3):
        ref = run_seeded(lambda: model(x), seed)
        out = run_seeded(lambda: swapped(x), seed)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the block's own residual + drop_path(gamma * x) as one fused call, with the seeds' uniform draw
    block = model[2]
    branch = lambda t: (
        block.gamma * block.pwconv2(block.act(block.pwconv1(block.norm(block.dwconv(t).permute(0, 2, 3, 1)))))
    ).permute(0, 3, 1, 2)  # noqa: E731
    ref = run_seeded(lambda: block(x), 4)
    out = run_seeded(lambda: drop_path_add(x, branch(x), block.drop_path.drop_prob, rng="uniform"), 4)
    assert torch.equal(dropped_rows(out - x), dropped_rows(ref - x))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model.eval(), swapped.eval()
    assert torch.equal(swapped(x), model(x))


# ---- 5. from_module / extra_repr ------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "source",
    [
        lambda: timm.layers.DropPath(0.25),
        lambda: timm.layers.DropPath(0.25, scale_by_keep=False),
        lambda: torchvision.ops.StochasticDepth(0.25, "row"),
        lambda: torchvision.ops.StochasticDepth(0.25, "batch"),
        lambda: hf_class(HF_DROP_PATHS[0])(0.25),
        lambda: DropPath(0.25),
        lambda: PKDropPath(0.25, scale_by_keep=False, mode="batch", rng="uniform"),
    ],
    ids=["timm", "timm_noscale", "tv_row", "tv_batch", "hf_convnext", "seeds", "pykernels"],
)
def test_from_module_copies_state(source, training):
    src = source().train(training)
    new = PKDropPath.from_module(src)
    assert isinstance(new, PKDropPath) and new is not src
    assert new.drop_prob == 0.25
    assert new.training == training
    assert new.scale_by_keep == getattr(src, "scale_by_keep", True)
    assert new.mode == getattr(src, "mode", "row")
    uniform_sources = ("transformers.", "seeds_reference")  # draw floor(keep_prob + rand)
    expected_rng = "uniform" if type(src).__module__.startswith(uniform_sources) else getattr(src, "rng", "bernoulli")
    assert new.rng == expected_rng
    # and it behaves like the source (bit-identical where the source masks by multiplication only)
    x = make_input("tokens_197")
    ref = run_seeded(lambda: src(x), 2)
    out = run_seeded(lambda: new(x), 2)
    assert torch.equal(dropped_rows(out), dropped_rows(ref))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "module", [nn.Linear(2, 2), nn.Dropout(0.1), nn.Identity()], ids=["linear", "dropout", "identity"]
)
def test_from_module_rejects_unrelated(module):
    with pytest.raises(TypeError) as info:
        PKDropPath.from_module(module)
    msg = str(info.value)
    assert type(module).__name__ in msg
    assert "timm" in msg and "StochasticDepth" in msg  # says what is supported


@pytest.mark.parametrize("p", [0.1, 0.0, 0.12345, 1.0], ids=["0.1", "0", "0.12345", "1"])
def test_extra_repr_matches_timm(p):
    assert PKDropPath(p).extra_repr() == timm.layers.DropPath(p).extra_repr()
    assert repr(PKDropPath(p)) == repr(timm.layers.DropPath(p))
    assert repr(PKDropPath(0.1)) == "DropPath(drop_prob=0.100)"


def test_extra_repr_names_non_default_options():
    r = repr(PKDropPath(0.2, scale_by_keep=False, mode="batch", rng="uniform"))
    assert "drop_prob=0.200" in r and "scale_by_keep=False" in r and "batch" in r and "uniform" in r


# ---- 6. swap on real models ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _timm_convnext_cached():
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, drop_path_rate=0.2, num_classes=10)


def timm_convnext():
    return copy.deepcopy(_timm_convnext_cached()), (2, 3, 32, 32)


def timm_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, drop_path_rate=0.2, img_size=32, num_classes=10)
    return model, (2, 3, 32, 32)


def torchvision_convnext():
    torch.manual_seed(0)
    return torchvision.models.convnext_tiny(weights=None, stochastic_depth_prob=0.2, num_classes=10), (2, 3, 32, 32)


def hf_convnext():
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    config = ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16, 24], depths=[2, 2, 2], num_stages=3, drop_path_rate=0.4, image_size=32
    )
    # layer-scale 1.0 instead of 1e-6 so that the drop pattern shows in the output
    config.layer_scale_init_value = 1.0
    model = ConvNextModel(config)
    return model, (4, 3, 32, 32)


def hf_output(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


MODELS = {
    # name: (builder, bit-identical to the original in float32, compare parameter gradients too)
    "timm_convnext_atto": (timm_convnext, True, True),
    "timm_vit_tiny": (timm_vit, True, True),
    "torchvision_convnext_tiny": (torchvision_convnext, True, False),  # 28M parameters: forward only, to stay fast
    "hf_convnext_tiny_config": (hf_convnext, False, True),
}


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_swap_real_model(name):
    build, bit_identical, check_grads = MODELS[name]
    model, input_shape = build()
    original_names = drop_path_count(model)
    assert original_names, "the model should contain drop-path layers"
    swapped = pykernels.swap(copy.deepcopy(model), include="drop_path").model

    assert len(swapped.pykernels_swapped) == len(original_names)
    assert sorted(swapped.pykernels_swapped) == sorted(original_names)
    assert drop_path_count(swapped) == [], "an original drop-path module remains after swap"
    for n in original_names:
        new, old = swapped.get_submodule(n), model.get_submodule(n)
        assert isinstance(new, PKDropPath)
        assert new.drop_prob == pytest.approx(float(getattr(old, "drop_prob", getattr(old, "p", None)) or 0.0))
    # weights untouched
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), swapped.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)

    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(1))
    model.train(), swapped.train()
    with torch.no_grad():
        ref = hf_output(run_seeded(lambda: model(x), 0))
        out = hf_output(run_seeded(lambda: swapped(x), 0))
        if bit_identical:
            assert torch.equal(out, ref), f"max diff {(out - ref).abs().max().item()}"
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # train mode really drops something: another seed gives another output
        other = hf_output(run_seeded(lambda: swapped(x), 1))
        assert not torch.equal(other, out)

    if check_grads:  # gradients of the swapped model match the original's (same seed)
        for m in (model, swapped):
            m.zero_grad(set_to_none=True)
            hf_output(run_seeded(lambda m=m: m(x), 3)).square().mean().backward()
        for (n, p1), (_, p2) in zip(model.named_parameters(), swapped.named_parameters()):
            if p1.grad is None:
                assert p2.grad is None, n
                continue
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")

    model.eval(), swapped.eval()
    with torch.no_grad():
        state = torch.get_rng_state()
        assert torch.equal(hf_output(swapped(x)), hf_output(model(x)))
        assert torch.equal(torch.get_rng_state(), state), "eval mode must not draw random numbers"


def test_swap_is_idempotent_and_keeps_train_state():
    model, _ = timm_convnext()
    model.eval()
    pykernels.swap(model, include="drop_path")
    n = len(model.pykernels_swapped)
    assert n == 11
    assert all(not m.training for m in model.modules() if isinstance(m, PKDropPath))
    pykernels.swap(model, include="drop_path")
    assert model.pykernels_swapped == []
    assert sum(isinstance(m, PKDropPath) for m in model.modules()) == n


def test_swap_include_exclude():
    model, _ = timm_convnext()
    n = len(drop_path_count(model))

    m = pykernels.swap(copy.deepcopy(model), include=["drop_path"]).model
    assert len(m.pykernels_swapped) == n and drop_path_count(m) == []

    m = pykernels.swap(copy.deepcopy(model), exclude=["drop_path", "convnext_block", "mlp"]).model
    assert m.pykernels_swapped == [] and len(drop_path_count(m)) == n

    # with the blocks excluded, their Mlps are still a kind of their own; the DropPaths stay
    m = pykernels.swap(copy.deepcopy(model), exclude=["drop_path", "convnext_block"]).model
    assert m.pykernels_swapped and all(p.endswith(".mlp") for p in m.pykernels_swapped)
    assert len(drop_path_count(m)) == n

    m = pykernels.swap(copy.deepcopy(model), include=[]).model
    assert m.pykernels_swapped == [] and len(drop_path_count(m)) == n

    m = pykernels.swap(copy.deepcopy(model), include=["drop_path"], exclude=["drop_path"]).model
    assert m.pykernels_swapped == [] and len(drop_path_count(m)) == n


@pytest.mark.parametrize(
    "kwargs", [{"include": ["not_a_kind"]}, {"exclude": ["not_a_kind"]}], ids=["include", "exclude"]
)
def test_swap_unknown_kind_raises(kwargs):
    model, _ = timm_convnext()
    with pytest.raises(ValueError, match="not_a_kind") as info:
        pykernels.swap(model, **kwargs)
    assert "drop_path" in str(info.value)  # lists the known kinds
    assert drop_path_count(model), "a failed swap must not have modified the model"


def test_swap_verbose_prints(capsys):
    model = nn.Sequential(nn.Linear(4, 4), timm.layers.DropPath(0.1))
    pykernels.swap(model, include="drop_path", verbose=True)
    assert model.pykernels_swapped == ["1"]
    assert "DropPath" in capsys.readouterr().out


# ---- 7. statistics --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rng", ["bernoulli", "uniform"])
def test_row_drop_rate_statistics(rng):
    B, p = 20000, 0.3
    x = torch.randn(B, 8, generator=torch.Generator().manual_seed(0)) + 10.0  # no exact zeros
    out = run_seeded(lambda: PKDropPath(p, rng=rng).train()(x), 123)
    dropped = dropped_rows(out)
    frac = dropped.double().mean().item()
    sd = math.sqrt(p * (1 - p) / B)
    assert abs(frac - p) < 4 * sd, f"dropped fraction {frac:.4f}, expected {p} +- {4 * sd:.4f}"
    kept = ~dropped
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)

    out_noscale = run_seeded(lambda: PKDropPath(p, scale_by_keep=False, rng=rng).train()(x), 123)
    assert torch.equal(dropped_rows(out_noscale), dropped)
    assert torch.equal(out_noscale[kept], x[kept])


def test_batch_mode_all_or_nothing():
    p, trials = 0.5, 200
    x = torch.randn(16, 4, 3, generator=torch.Generator().manual_seed(0)) + 10.0
    dp = PKDropPath(p, mode="batch").train()
    torch.manual_seed(0)
    n_dropped = 0
    for _ in range(trials):
        rows = dropped_rows(dp(x))
        assert rows.all() or not rows.any(), "batch mode must drop the whole batch or nothing"
        n_dropped += int(rows.all())
    sd = math.sqrt(trials * p * (1 - p))
    assert abs(n_dropped - trials * p) < 4 * sd, n_dropped


# ---- 8. drop_path_branch ------------------------------------------------------------------------------------------


class RecordingBranch(nn.Module):
    """LayerNorm + Linear (per-sample), recording each call's input."""

    def __init__(self, dim: int):
        super().__init__()
        torch.manual_seed(42)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.calls: list[torch.Tensor] = []

    def forward(self, t):
        self.calls.append(t.detach().clone())
        return self.fc(self.norm(t))


def kept_mask(B: int, p: float, seed: int) -> torch.Tensor:
    """(B,) bool: which samples drop_path_add keeps under this seed."""
    probe = run_seeded(lambda: drop_path_add(torch.zeros(B, 1), torch.ones(B, 1), p), seed)
    return probe.reshape(B) != 0


@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma", "nogamma"])
@pytest.mark.parametrize("p", [0.3, 0.7], ids=["p0.3", "p0.7"])
def test_drop_path_branch_runs_only_kept_samples(p, with_gamma):
    B, N, C = 24, 5, 16
    x0 = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    gamma0 = torch.rand(C, generator=torch.Generator().manual_seed(1)) + 0.5 if with_gamma else None
    branch = RecordingBranch(C)
    seed = 17
    kept = kept_mask(B, p, seed)
    assert 0 < int(kept.sum()) < B

    x_a = x0.clone().requires_grad_(True)
    g_a = gamma0.clone().requires_grad_(True) if with_gamma else None
    branch.calls.clear()
    out = run_seeded(lambda: drop_path_branch(x_a, branch, p, g_a), seed)
    assert [c.shape[0] for c in branch.calls] == [int(kept.sum())], "branch_fn must run once, on the kept samples only"
    assert torch.equal(branch.calls[0], x0[kept])

    x_b = x0.clone().requires_grad_(True)
    g_b = gamma0.clone().requires_grad_(True) if with_gamma else None
    ref_branch = copy.deepcopy(branch)
    ref = run_seeded(lambda: drop_path_add(x_b, ref_branch(x_b), p, g_b), seed)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~kept], x0[~kept]), "dropped samples must be exactly the residual"

    grad = torch.randn(B, N, C, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x_a.grad, x_b.grad, rtol=1e-5, atol=1e-5)
    for (n, p_a), (_, p_b) in zip(branch.named_parameters(), ref_branch.named_parameters()):
        assert p_a.grad is not None, n
        torch.testing.assert_close(p_a.grad, p_b.grad, rtol=1e-4, atol=1e-5)
    if with_gamma:
        assert g_a.grad is not None
        torch.testing.assert_close(g_a.grad, g_b.grad, rtol=1e-4, atol=1e-5)


def test_drop_path_branch_eval_runs_full_batch():
    B, C = 6, 8
    x = torch.randn(B, 3, C)
    branch = RecordingBranch(C)
    gamma = torch.rand(C)
    state = torch.get_rng_state()
    out = drop_path_branch(x, branch, 0.5, gamma, training=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert [c.shape[0] for c in branch.calls] == [B]
    with torch.no_grad():
        torch.testing.assert_close(out, x + gamma * branch.fc(branch.norm(x)))


def test_drop_path_branch_p1_runs_nothing():
    B, C = 6, 8
    x = torch.randn(B, 3, C, requires_grad=True)
    branch = RecordingBranch(C)
    out = run_seeded(lambda: drop_path_branch(x, branch, 1.0, torch.rand(C)), 0)
    assert branch.calls == []
    assert torch.equal(out, x.detach())
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_drop_path_branch_p0_runs_full_batch():
    B, C = 6, 8
    x = torch.randn(B, 3, C)
    branch = RecordingBranch(C)
    state = torch.get_rng_state()
    out = drop_path_branch(x, branch, 0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert [c.shape[0] for c in branch.calls] == [B]
    with torch.no_grad():
        torch.testing.assert_close(out, x + branch.fc(branch.norm(x)))


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0], ids=["p0", "p0.5", "p1"])
def test_drop_path_branch_dtype_does_not_depend_on_the_draw(p):
    """The result dtype is promote_types(x, branch output, gamma) whatever the draw: bf16 x with an fp32 gamma
    gives fp32 when some samples are kept, and must give fp32 too when every sample happens to be dropped (with B=1
    that is every other step; a dtype that flips between steps breaks the next layer and torch.compile)."""
    x = torch.randn(4, 3, 8, dtype=torch.bfloat16)
    gamma = torch.rand(8)
    expected = drop_path_add(x, x * 2, 0.0, gamma).dtype
    assert expected == torch.float32
    out = run_seeded(lambda: drop_path_branch(x, lambda t: t * 2, p, gamma), 1)
    assert out.dtype == expected, f"drop_path_branch(p={p}) returned {out.dtype}, expected {expected}"


@pytest.mark.parametrize("rng", ["bernoulli", "uniform"])
def test_drop_path_branch_mask_matches_drop_path_add(rng):
    """The docstring: the mask is the one drop_path_add would draw under the same seed when branch_fn keeps x's
    dtype (drop_path_branch must draw before the branch runs, so it draws in promote(x, gamma))."""
    B, p = 64, 0.3
    x = torch.randn(B, 3, 8, generator=torch.Generator().manual_seed(0))
    fn = lambda t: t * 2  # noqa: E731
    mismatched = 0
    for seed in range(10):
        out = run_seeded(lambda: drop_path_branch(x, fn, p, rng=rng), seed)
        ref = run_seeded(lambda: drop_path_add(x, fn(x), p, rng=rng), seed)
        mismatched += int((dropped_rows(out - x) != dropped_rows(ref - x)).sum())
    assert mismatched == 0, f"{mismatched} of {10 * B} samples dropped differently from drop_path_add (rng={rng!r})"


# ---- 9. edge cases ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda x: PKDropPath(0.0).train()(x),
        lambda x: PKDropPath(0.5).eval()(x),
        lambda x: PKDropPath(0.5, mode="batch").eval()(x),
        lambda x: PKDropPath.from_module(hf_class(HF_DROP_PATHS[0])(0.5).eval())(x),
        lambda x: drop_path(x, 0.5, training=False),
        lambda x: drop_path(x, 0.0, training=True),
        lambda x: drop_path_add(torch.zeros_like(x), x, 0.0),
        lambda x: drop_path_add(torch.zeros_like(x), x, 0.5, training=False),
    ],
    ids=["p0_train", "eval", "eval_batch", "eval_hf", "fn_eval", "fn_p0", "add_p0", "add_eval"],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"], ids=["nchw", "channels_last"])
def test_identity_cases_do_not_draw(call, layout):
    x = make_input(layout)
    state = torch.get_rng_state()
    out = call(x)
    assert torch.equal(torch.get_rng_state(), state), "the RNG must not advance when nothing is dropped"
    assert torch.equal(out, x)


@pytest.mark.parametrize("rng", ["bernoulli", "uniform"])
@pytest.mark.parametrize("layout", ["nchw", "tokens_197"], ids=["nchw", "tokens"])
def test_drop_prob_one(layout, rng):
    x = make_input(layout)
    out = run_seeded(lambda: PKDropPath(1.0, rng=rng).train()(x), 0)
    assert not out.isnan().any()
    assert torch.equal(out, torch.zeros_like(x))
    ref = run_seeded(lambda: timm.layers.DropPath(1.0).train()(x), 0)
    assert torch.equal(out, ref)

    shortcut = make_input(layout, seed=5).requires_grad_(True)
    branch = x.clone().requires_grad_(True)
    gamma = make_gamma(layout).requires_grad_(True)
    out = run_seeded(lambda: drop_path_add(shortcut, branch, 1.0, gamma, rng=rng), 0)
    assert not out.isnan().any()
    assert torch.equal(out, shortcut.detach())
    out.sum().backward()
    assert torch.equal(shortcut.grad, torch.ones_like(shortcut))
    assert torch.equal(branch.grad, torch.zeros_like(branch))
    assert torch.equal(gamma.grad, torch.zeros_like(gamma))


def test_batch_of_one():
    x = make_input("nchw")[:1]
    for seed in range(6):
        ref = run_seeded(lambda: timm.layers.DropPath(0.5).train()(x), seed)
        out = run_seeded(lambda: PKDropPath(0.5).train()(x), seed)
        assert torch.equal(out, ref)
    s, g = make_input("nchw", seed=2)[:1], make_gamma("nchw")
    ref = run_seeded(lambda: s + timm.layers.DropPath(0.5).train()(x * g), 9)
    out = run_seeded(lambda: drop_path_add(s, x, 0.5, g), 9)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("layout", ["nchw", "tokens_197"], ids=["nchw", "tokens"])
def test_empty_batch(layout):
    shape = (0,) + LAYOUTS[layout][0][1:]
    x = torch.randn(shape, requires_grad=True)
    out = PKDropPath(0.5).train()(x)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape

    s = torch.randn(shape, requires_grad=True)
    g = make_gamma(layout).requires_grad_(True)
    out = drop_path_add(s, x, 0.5, g)
    assert out.shape == shape
    out.sum().backward()
    assert g.grad is not None and torch.equal(g.grad, torch.zeros_like(g))

    branch = RecordingBranch(shape[-1])
    out = drop_path_branch(torch.randn(shape), branch, 0.5)
    assert out.shape == shape


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")], ids=["neg", "gt1", "nan"])
def test_invalid_drop_prob(p):
    x = make_input("nchw")
    with pytest.raises(ValueError, match="drop_prob"):
        PKDropPath(p)
    with pytest.raises(ValueError, match="drop_prob"):
        drop_path(x, p, True)
    with pytest.raises(ValueError, match="drop_prob"):
        drop_path_add(x, x, p)
    with pytest.raises(ValueError, match="drop_prob"):
        drop_path_branch(x, lambda t: t, p)


def test_invalid_mode_and_rng():
    x = make_input("nchw")
    with pytest.raises(ValueError, match="mode"):
        PKDropPath(0.1, mode="col")
    with pytest.raises(ValueError, match="rng"):
        PKDropPath(0.1, rng="normal")
    with pytest.raises(ValueError, match="mode"):
        drop_path_add(x, x, 0.1, mode="col")
    with pytest.raises(ValueError, match="rng"):
        drop_path_add(x, x, 0.1, rng="normal")
    with pytest.raises(ValueError, match="rng"):
        drop_path_branch(x, lambda t: t, 0.1, rng="normal")
