"""FusedWindowAttention (Swin / Swin-V2 window attention) against the originals it stands in for: timm
``swin_transformer.WindowAttention`` and ``swin_transformer_v2.WindowAttention``, torchvision
``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2``, Hugging Face ``SwinAttention`` (transformers 5 layout),
``Swinv2Attention``, ``DonutSwinAttention``, ``MaskFormerSwinAttention`` (the ``self`` / ``output`` layout).

Awkward shapes: window 7 (N = 49), 2 images x 3 windows (nW > 1, B > 1), with and without a shifted-window mask;
torchvision's layer on 14 x 14 (4 windows, shift 3) and 10 x 12 (padded to 14 x 14). Forward and every gradient (the
input and each parameter: qkv, proj, the relative-position bias table / Swin-V2's logit scale and position MLP) in
float64 and float32, state_dict keys both ways, ``output_attentions``, torch.compile(fullgraph=True), errors.
Backends: ``torch``; ``triton`` under the interpreter on CPU (or on a GPU) in float32.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import DEVICES, require_backend
from torch import nn

import pykernels
from pykernels.modules.attention import (
    FusedHFWindowAttention,
    FusedShiftedWindowAttention,
    FusedWindowAttention,
    window_unsupported_reasons,
)

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

DIM, HEADS, WINDOW = 32, 2, 7  # head dim 16 (a Triton head dim), N = 49
N = WINDOW * WINDOW


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Position tables, biases and Swin-V2 logit scales away from their inits (zeros / log 10 hide a dropped term)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):  # one head near the clamp (log 100), one small
                p.copy_(torch.tensor([math.log(80.0), math.log(3.0)]).view(p.shape).to(p))
            elif "relative_position_bias_table" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen).to(p))
        for name, b in module.named_buffers():
            if name.endswith("k_bias"):  # timm Swin-V2: a zero buffer (no key bias)
                b.zero_()
    return module


def _timm_v1():
    from timm.models.swin_transformer import WindowAttention

    module = WindowAttention(DIM, HEADS, window_size=WINDOW)
    module.fused_attn = False  # the explicit maths (scores, + bias, + mask, softmax)
    return module


def _timm_v2():
    from timm.models.swin_transformer_v2 import WindowAttention

    return WindowAttention(DIM, (WINDOW, WINDOW), HEADS)


def _hf_config(name, attn_implementation="eager"):
    config = getattr(transformers, name)(embed_dim=DIM, num_heads=[HEADS], window_size=WINDOW)
    config._attn_implementation = attn_implementation
    return config


def _hf_swin():
    from transformers.models.swin.modeling_swin import SwinAttention

    # SDPA (transformers' default): its eager function takes the softmax in float32 even for float64 inputs
    return SwinAttention(_hf_config("SwinConfig", "sdpa"), DIM, HEADS, WINDOW)


def _hf_swinv2():
    from transformers.models.swinv2.modeling_swinv2 import Swinv2Attention

    return Swinv2Attention(_hf_config("Swinv2Config"), DIM, HEADS, WINDOW)


def _hf_donut():
    from transformers.models.donut.modeling_donut_swin import DonutSwinAttention

    return DonutSwinAttention(_hf_config("DonutSwinConfig"), DIM, HEADS, WINDOW)


def _hf_maskformer():
    from transformers.models.maskformer.modeling_maskformer_swin import MaskFormerSwinAttention

    return MaskFormerSwinAttention(_hf_config("MaskFormerSwinConfig"), DIM, HEADS, WINDOW)


def _tv(v2: bool, shift: int):
    from torchvision.models import swin_transformer as tv

    cls = tv.ShiftedWindowAttentionV2 if v2 else tv.ShiftedWindowAttention
    return cls(DIM, [WINDOW, WINDOW], [shift, shift], HEADS)


# name: (builder, the fused class from_module returns, the output's first tensor)
WINDOWED = {
    "timm": (_timm_v1, FusedWindowAttention, lambda out: out),
    "timm_v2": (_timm_v2, FusedWindowAttention, lambda out: out),
    "hf_swin": (_hf_swin, FusedHFWindowAttention, lambda out: out[0]),
    "hf_swinv2": (_hf_swinv2, FusedHFWindowAttention, lambda out: out[0]),
    "hf_donut": (_hf_donut, FusedHFWindowAttention, lambda out: out[0]),
    "hf_maskformer": (_hf_maskformer, FusedHFWindowAttention, lambda out: out[0]),
}
TORCHVISION = {
    "tv-shift0": (lambda: _tv(False, 0)),
    "tv-shift3": (lambda: _tv(False, 3)),
    "tv_v2-shift0": (lambda: _tv(True, 0)),
    "tv_v2-shift3": (lambda: _tv(True, 3)),
}
TOL = {
    torch.float64: dict(out=dict(atol=1e-10, rtol=1e-9), grad=dict(atol=1e-9, rtol=1e-8)),
    torch.float32: dict(out=dict(atol=2e-5, rtol=2e-4), grad=dict(atol=2e-4, rtol=2e-3)),
}


def _shift_mask(windows: int, seed: int = 1) -> torch.Tensor:
    """(nW, N, N) 0 / -100 mask as Swin builds it: window 0 whole, the others cut into 2-4 regions."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(windows, N, N)
    for w in range(1, windows):
        regions = torch.randint(0, w + 1, (N,), generator=gen)
        mask[w] = (regions[:, None] != regions[None, :]).float() * -100.0
    return mask


def _grads_by_original_key(module: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient (0 where none) under the module's state_dict keys: for a fused module the
    original's keys, packed q / k / v split the same way as its weights."""
    ghost = copy.deepcopy(module)
    with torch.no_grad():
        for p, g in zip(ghost.parameters(), module.parameters()):
            p.copy_(g.grad if g.grad is not None else torch.zeros_like(g))
    return {k: v for k, v in ghost.state_dict().items() if v.is_floating_point()}


def _param_keys(original: nn.Module) -> set[str]:
    return {name for name, _ in original.named_parameters()}


def _run(module, x, extra, first, grad):
    x = x.clone().requires_grad_()
    out = first(module(x, *extra))
    out.backward(grad)
    return out, x.grad


def _check_parity(original, fused, x, extra, first, dtype):
    tol = TOL[dtype]
    torch.manual_seed(3)
    grad = torch.randn_like(first(original(x, *extra)))
    want, want_dx = _run(original, x, extra, first, grad)
    got, got_dx = _run(fused, x, extra, first, grad)
    torch.testing.assert_close(got, want, **tol["out"])
    torch.testing.assert_close(got_dx, want_dx, **tol["grad"])
    want_grads, got_grads = _grads_by_original_key(original), _grads_by_original_key(fused)
    keys = _param_keys(original)
    assert keys <= set(got_grads), sorted(keys - set(got_grads))
    for key in sorted(keys):
        if key == "qkv.bias" and isinstance(fused, FusedShiftedWindowAttention) and fused.cosine:
            # torchvision V2 zeroes a clone of the key slice: no gradient there in either
            assert not got_grads[key].chunk(3)[1].any()
        torch.testing.assert_close(
            got_grads[key], want_grads[key], **tol["grad"], msg=lambda m, key=key: f"d {key}: {m}"
        )
    assert any(got_grads[k].abs().sum() > 0 for k in keys if "position" in k or "logit" in k or "cpb" in k)


def _require(backend, device):
    require_backend("attention", backend, device)


# ---- parity with each original ---------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "shifted"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(WINDOWED))
def test_parity_with_windowed_originals(name, dtype, masked):
    build, fused_cls, first = WINDOWED[name]
    torch.manual_seed(0)
    original = _randomise(build()).to(dtype).train()  # dropout 0: training mode changes nothing but the flag
    fused = FusedWindowAttention.from_module(original)
    assert type(fused) is fused_cls and fused.training
    x = torch.randn(2 * 3, N, DIM, dtype=dtype)  # 2 images x 3 windows
    extra = (_shift_mask(3).to(dtype),) if masked else (None,)
    _check_parity(original, fused, x, extra, first, dtype)


@pytest.mark.parametrize("size", [(14, 14), (10, 12)], ids=["14x14", "10x12-padded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_parity_with_torchvision(name, dtype, size):
    torch.manual_seed(0)
    original = _randomise(TORCHVISION[name]()).to(dtype)
    fused = FusedWindowAttention.from_module(original)
    assert type(fused) is FusedShiftedWindowAttention and fused.shift_size == tuple(original.shift_size)
    x = torch.randn(2, *size, DIM, dtype=dtype)
    _check_parity(original, fused, x, (), lambda out: out, dtype)


@pytest.mark.parametrize("name", ["timm", "timm_v2", "hf_swin", "tv_v2-shift3"])
def test_triton_backend_against_the_original(name):
    """The Triton kernel (interpreter on CPU, or a GPU) with the combined bias and its gradient, float32."""
    device = DEVICES[-1]
    _require("triton", device)
    torch.manual_seed(0)
    if name in WINDOWED:
        build, _, first = WINDOWED[name]
        original = _randomise(build()).to(device)
        x = torch.randn(2 * 2, N, DIM, device=device)
        extra = (_shift_mask(2).to(device),)
    else:
        original, first = _randomise(TORCHVISION[name]()).to(device), (lambda out: out)
        x, extra = torch.randn(1, 14, 14, DIM, device=device), ()
    fused = FusedWindowAttention.from_module(original, backend="triton")
    _check_parity(original, fused, x, extra, first, torch.float32)


def test_hf_swinv2_mask_added_twice_is_reproduced():
    """Hugging Face's Swin-V2 adds its mask twice (-200 across regions). With a head's logit scale near 100 a -100
    mask no longer hides the other region: here every key of the query's own region scores cos = -1 and every key of
    the other region cos = +1, so -100 once lets the masked keys win (-20 > -80) and twice does not (-120)."""
    torch.manual_seed(0)
    original = _randomise(_hf_swinv2()).double().eval()
    fused = FusedWindowAttention.from_module(original)
    assert fused.mask_repeats == 2 and FusedWindowAttention.from_module(_hf_donut()).mask_repeats == 1
    with torch.no_grad():
        original.self.key.weight.copy_(-original.self.query.weight)
        original.self.query.bias.zero_()
    fused = FusedWindowAttention.from_module(original)
    region = (torch.arange(N) >= N // 2).double()
    mask = (region[:, None] != region[None, :]).double().unsqueeze(0) * -100.0  # one window, two regions
    x = torch.randn(DIM, dtype=torch.float64) * (1 - 2 * region)[:, None]  # u in one region, -u in the other
    x = x.unsqueeze(0)
    want = original(x, mask)[0]
    torch.testing.assert_close(fused(x, mask)[0], want, atol=1e-10, rtol=1e-9)
    fused.mask_repeats = 1
    assert not torch.allclose(fused(x, mask)[0], want, atol=1e-3)


# ---- Hugging Face: attention weights, head mask ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["hf_swin", "hf_swinv2", "hf_donut"])
def test_hf_output_attentions_returns_the_weights(name):
    build, _, _ = WINDOWED[name]
    torch.manual_seed(0)
    original = _randomise(build()).double().eval()
    if name == "hf_swin":
        original.config._attn_implementation = "eager"  # SDPA returns no weights
    fused = FusedWindowAttention.from_module(original)
    x, mask = torch.randn(4, N, DIM, dtype=torch.float64), _shift_mask(2).double()
    want = original(x, mask, output_attentions=True)
    got = fused(x, mask, output_attentions=True)
    assert len(got) == len(want) == 2 and got[1] is not None
    tol = dict(atol=1e-6, rtol=1e-5) if name == "hf_swin" else dict(atol=1e-10, rtol=1e-9)  # its float32 softmax
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    plain = fused(x, mask)
    if name == "hf_swin":  # transformers 5: always (out, weights or None); weights only when asked for
        assert len(plain) == 2 and plain[1] is None
        fused._hf_config.output_attentions = True  # asked for in the model's config: weights, not None
        assert fused(x, mask)[1] is not None
    else:
        assert len(plain) == 1
        assert len(fused(x, mask, False)) == 1  # output_attentions by position, as the HF layer passes it


def test_hf_head_mask_is_applied_not_ignored():
    torch.manual_seed(0)
    fused = FusedHFWindowAttention(DIM, HEADS, WINDOW).double().eval()
    fused._hf_arg_names = ("attention_mask", "head_mask", "output_attentions")  # transformers 4's signature
    fused._hf_pair = False
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    head_mask = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, HEADS, 1, 1)
    out, probs = fused(x, None, head_mask, True)
    want, _ = fused.explicit(x, None, head_mask)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, fused(x)[0])
    assert (probs[:, 1] == 0).all()


# ---- state_dict, copies, repr -----------------------------------------------------------------------------------


ALL_BUILDERS = {**{k: v[0] for k, v in WINDOWED.items()}, **TORCHVISION}


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    original = _randomise(ALL_BUILDERS[name]()).eval()
    fused = FusedWindowAttention.from_module(original)
    state = fused.state_dict()
    assert set(state) == set(original.state_dict())
    for key, value in original.state_dict().items():
        assert state[key].shape == value.shape, key
        torch.testing.assert_close(state[key], value, msg=lambda m, key=key: f"{key}: {m}")
    copy.deepcopy(original).load_state_dict(state, strict=True)
    # the original's checkpoint into a fresh fused module (other weights) and into the fused one, with its own keys
    other = _randomise(ALL_BUILDERS[name](), seed=5).eval()
    fresh = FusedWindowAttention.from_module(other)
    fresh.load_state_dict(original.state_dict(), strict=True)
    if name.startswith("tv"):
        x, extra = torch.randn(1, 14, 14, DIM), ()
    else:
        x, extra = torch.randn(2, N, DIM), (_shift_mask(2),)
    first = WINDOWED[name][2] if name in WINDOWED else (lambda out: out)
    torch.testing.assert_close(first(fresh(x, *extra)), first(fused(x, *extra)))
    own = nn.Module.state_dict(fused)  # the packed keys (qkv / proj) load too
    fresh2 = FusedWindowAttention.from_module(other)
    fresh2.load_state_dict(own, strict=True)
    torch.testing.assert_close(first(fresh2(x, *extra)), first(fused(x, *extra)))


def test_copy_repr_and_direct_construction():
    fused = FusedWindowAttention(DIM, HEADS, WINDOW, attn_drop=0.1, cosine=True, backend="torch")
    text = repr(fused)
    for part in ("dim=32", "num_heads=2", "window_size=(7, 7)", "cosine=True", "attn_drop=0.1", "'torch'"):
        assert part in text
    again = FusedWindowAttention.from_module(fused)
    x = torch.randn(3, N, DIM)
    torch.testing.assert_close(again.eval()(x), fused.eval()(x))
    shifted = FusedShiftedWindowAttention(DIM, HEADS, (7, 7), (3, 3))
    assert "shift_size=(3, 3)" in repr(shifted) and shifted(torch.randn(1, 14, 14, DIM)).shape == (1, 14, 14, DIM)
    assert pykernels.FusedWindowAttention is FusedWindowAttention


# ---- memory: what the bias materialises ------------------------------------------------------------------------


def test_bias_broadcasts_without_mask_and_is_one_tensor_with_it(monkeypatch):
    seen = []
    real = pykernels.functional.attention

    def spy(q, k, v, bias, *args):
        seen.append(bias)
        return real(q, k, v, bias, *args)

    monkeypatch.setattr(pykernels.functional, "attention", spy)
    fused = FusedWindowAttention(DIM, HEADS, WINDOW).eval()
    x = torch.randn(2 * 3, N, DIM)
    fused(x)
    assert tuple(seen[-1].shape) == (1, HEADS, N, N)  # broadcast over the windows, nothing per window
    fused(x, _shift_mask(3))
    assert tuple(seen[-1].shape) == (6, HEADS, N, N)
    fused(x[:3], _shift_mask(3))  # one image: the (nW, H, N, N) sum itself, no further copy
    assert seen[-1]._base is not None or seen[-1].shape[0] == 3


# ---- torch.compile ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,compiler",
    [("timm", "inductor"), ("timm_v2", "aot_eager"), ("hf_swin", "aot_eager"), ("tv_v2-shift3", "aot_eager")],
)
def test_compile_fullgraph(name, compiler):
    device = DEVICES[-1]
    torch.manual_seed(0)
    if name in WINDOWED:
        build, _, first = WINDOWED[name]
        x, extra = torch.randn(2 * 3, N, DIM, device=device), (_shift_mask(3).to(device),)
    else:
        build, first = TORCHVISION[name], (lambda out: out)
        x, extra = torch.randn(2, 14, 14, DIM, device=device), ()
    fused = FusedWindowAttention.from_module(_randomise(build()).to(device)).train()
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = first(fused(eager_x, *extra))
    expected.square().sum().backward()
    eager_grads = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend=compiler)
    got = first(compiled(compiled_x, *extra))
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, atol=1e-4, rtol=1e-3)
    for p, g in zip(fused.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)


# ---- errors and refusals ---------------------------------------------------------------------------------------


def test_errors():
    fused = FusedWindowAttention(DIM, HEADS, WINDOW)
    with pytest.raises(ValueError, match="tokens per window"):
        fused(torch.randn(2, 48, DIM))
    with pytest.raises(ValueError, match="channels"):
        fused(torch.randn(2, N, DIM + 1))
    with pytest.raises(ValueError, match=r"\(B \* nW, N, C\)"):
        fused(torch.randn(N, DIM))
    with pytest.raises(ValueError, match="nW dividing"):
        fused(torch.randn(5, N, DIM), _shift_mask(2))
    with pytest.raises(ValueError, match="nW dividing"):
        fused(torch.randn(4, N, DIM), torch.zeros(2, N, 48))
    with pytest.raises(ValueError, match="additive float"):
        fused(torch.randn(4, N, DIM), torch.zeros(2, N, N, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        FusedWindowAttention(30, 4, WINDOW)
    with pytest.raises(ValueError, match="head dim 20"):
        FusedWindowAttention(40, 2, WINDOW, backend="triton")
    with pytest.raises(TypeError, match="does not know"):
        FusedWindowAttention.from_module(nn.Linear(3, 3))
    hf = FusedWindowAttention.from_module(_hf_swin())
    with pytest.raises(TypeError, match="positional"):
        hf(torch.randn(2, N, DIM), None, None, None)


def test_timm_v2_with_a_key_bias_is_refused():
    original = _timm_v2()
    with torch.no_grad():
        original.k_bias.fill_(1.0)
    assert "k_bias" in window_unsupported_reasons(original)[0]
    with pytest.raises(TypeError, match="k_bias"):
        FusedWindowAttention.from_module(original)
    report = pykernels.swap(nn.Sequential(original), include=["attention"])
    assert report.replaced == [] and "k_bias" in report.skipped[0].reason


def test_swap_converts_each_original_after_the_probe():
    for name, build in ALL_BUILDERS.items():
        model = nn.Sequential(_randomise(build()).eval())
        report = pykernels.swap(model, include=["attention"])
        assert [r.kind for r in report.replaced] == ["attention"] and report.skipped == [], (name, report)
        assert isinstance(model[0], FusedWindowAttention)
    # opt-in, as the other attention layers
    model = nn.Sequential(_timm_v1())
    assert pykernels.swap(model).replaced == [] and not isinstance(model[0], FusedWindowAttention)


@pytest.mark.parametrize("cosine", [False, True], ids=["swin", "swin_v2"])
def test_empty_batch(cosine):
    """No windows (B = 0): an empty output and empty / zero gradients, with and without a mask."""
    fused = FusedWindowAttention(DIM, HEADS, WINDOW, cosine=cosine).train()
    for mask in (None, _shift_mask(2)):
        x = torch.randn(0, N, DIM, requires_grad=True)
        out = fused(x, mask)
        out.sum().backward()
        assert out.shape == (0, N, DIM) and x.grad.shape == x.shape
        assert not fused.qkv.weight.grad.any()
    shifted = FusedShiftedWindowAttention(DIM, HEADS, WINDOW, 3)
    assert shifted(torch.randn(0, 14, 14, DIM)).shape == (0, 14, 14, DIM)


def test_attention_dropout_acts_and_is_reproducible():
    """attn_drop in training: the probabilities are dropped (the output moves) and torch.manual_seed reproduces it."""
    torch.manual_seed(0)
    fused = FusedWindowAttention(DIM, HEADS, WINDOW, attn_drop=0.5).train()
    x, mask = torch.randn(4, N, DIM), _shift_mask(2)
    torch.manual_seed(1)
    first = fused(x, mask)
    torch.manual_seed(1)
    torch.testing.assert_close(fused(x, mask), first, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(first, fused.eval()(x, mask), atol=1e-3)


def test_cpu_training_with_a_learned_bias_runs_atens_sdpa_with_the_same_maths(monkeypatch):
    """Training on CPU (automatic backend, bias table needing a gradient) goes through ATen's SDPA autograd as timm's
    fused path does (the op's torch backend would recompute the probabilities for the bias gradient); an explicit
    backend keeps the op. Both give the same forward and gradients."""
    calls = []
    real = pykernels.functional.attention

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(pykernels.functional, "attention", spy)
    torch.manual_seed(0)
    fused = FusedWindowAttention(DIM, HEADS, WINDOW).double().train()
    with torch.no_grad():
        fused.relative_position_bias_table.normal_(0, 0.5)
    x = torch.randn(2 * 3, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = _shift_mask(3).double()

    def run():
        out = fused(x, mask)
        grads = torch.autograd.grad(out.square().sum(), [x, *fused.parameters()])
        return out, grads

    out, grads = run()
    assert calls == []
    with pykernels.use_backend("torch"):
        ref_out, ref_grads = run()
    assert calls == [1]
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
