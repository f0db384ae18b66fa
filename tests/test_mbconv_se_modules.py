"""FusedMBConvSE / SqueezeExcite against the originals: timm (InvertedResidual, DepthwiseSeparableConv, EdgeResidual,
SqueezeExcite), torchvision (MBConv, FusedMBConv, MobileNet-V3 InvertedResidual, SqueezeExcitation), Hugging Face
(EfficientNetBlock) and the seeds' FusedMBConv / SEModule (../shared/seeds/003_8d8ded4205e85488.txt).

Whole models are compared with flash-attention's rule against the same model in float64 (error <= 2 x eager float32's
error + a floor): random-weight EfficientNets amplify float32 rounding from block to block, so a fixed tolerance would
either pass wrong blocks or fail right ones. Training steps, running statistics, state_dict keys, refolding after
weight changes, refusals, torch.compile and the memory saved for backward are checked too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pykernels
from pykernels import FusedMBConvSE, SqueezeExcite
from pykernels.modules.mbconv_se import can_convert, unsupported_reasons

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


pytestmark = pytest.mark.usefixtures("one_thread_per_xdist_worker")


def _randomize_bn(model: nn.Module, seed: int = 1) -> None:
    """BatchNorm statistics and affine parameters away from their identity init, so a wrong fold or a wrong
    statistic shows; conv weights scaled by 0.8, so that the random-weight network does not amplify float32 rounding
    from block to block (at timm's init, efficientnetv2_rw_t's eager float32 output is 6% away from float64's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(0.8)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1 + 1.0)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _out(y):
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def _errors(got, want, eager):
    """(error of got, error of eager), both relative to the float64 reference's magnitude; ``eager`` may be a tuple
    of eager results (the largest of their errors counts)."""
    scale = want.abs().max().item() + 1e-30
    eagers = eager if isinstance(eager, tuple) else (eager,)
    eager_err = max((e.double() - want).abs().max().item() for e in eagers) / scale
    return (got.double() - want).abs().max().item() / scale, eager_err


def _assert_rule(name, got, want, eager, floor=2e-6, factor=2.0):
    err, eager_err = _errors(got, want, eager)
    assert err <= factor * eager_err + floor, f"{name}: error {err:.3g} > {factor} x eager {eager_err:.3g} + {floor}"


_KINKED = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh)


def compare_models(original: nn.Module, size=64, batch=2, train=(False, True), seed=0):
    """Swap a copy of ``original`` and check it against ``original`` run in float64.

    * float32 outputs (eval and training) by the 2 x eager rule, eager's error being the larger of the original run
      on an NCHW input and on a channels-last one (model and input): the swapped blocks compute in channels-last, and
      PyTorch's own channels-last kernels (BatchNorm's batch statistics among them) round differently - on
      mobilenetv2_100 in training, 3x further from float64 than NCHW.
    * float64: the swapped model converted to float64 - every output, parameter gradient and running statistic within
      1e-9 (relative to its largest value) of the original's: the blocks' arithmetic, without rounding to hide in.
    * float32 parameter gradients and statistics, which compound the rounding of every block (16 to 40 of them)
      through backward, within 4 x eager's error + 1e-4 - for models with smooth activations only. With ReLU / ReLU6
      / hard-swish kinks and BatchNorms that see 8 values per channel at the last stage (batch 2 at 64 x 64), training
      gradients are chaotic in float32: eager itself, on an input perturbed by 1e-7 (relative), moves 1% on
      mobilenetv2_100; there the float64 check carries the gradients."""
    _randomize_bn(original)
    swapped = pykernels.swap(copy.deepcopy(original), include=["mbconv"]).model
    assert swapped.pykernels_swapped, "nothing was swapped"
    ref64 = copy.deepcopy(original).double()
    swapped64 = copy.deepcopy(swapped).double()
    eager_cl = copy.deepcopy(original).to(memory_format=torch.channels_last)
    grads32 = not any(isinstance(m, _KINKED) for m in original.modules())
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    for training in train:
        mode = "train" if training else "eval"
        models = [copy.deepcopy(m).train(training) for m in (swapped, ref64, original, eager_cl, swapped64)]
        inputs = (x, x.double(), x, x.contiguous(memory_format=torch.channels_last), x.double())
        outs = []
        for m, inp in zip(models, inputs):
            torch.manual_seed(seed)
            outs.append(_out(m(inp)))
        _assert_rule(f"output ({mode})", outs[0], outs[1], tuple(outs[2:4]))
        _assert_close64(f"float64 output ({mode})", outs[4], outs[1])
        weight = torch.randn(outs[1].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        grads = [
            torch.autograd.grad((o * weight.to(o.dtype)).sum(), list(m.parameters())) for o, m in zip(outs, models)
        ]
        names = [n for n, _ in models[0].named_parameters()]
        assert all(names == [n for n, _ in m.named_parameters()] for m in models[1:])
        largest = max(g.abs().max().item() for g in grads[1])
        for name, got, want, eager, eager_cl_grad, got64 in zip(names, *grads):
            _assert_close64(f"float64 grad {name} ({mode})", got64, want, largest)
            if grads32 and want.abs().max().item() >= 1e-6 * largest:  # else exactly zero in exact arithmetic
                _assert_rule(f"grad {name} ({mode})", got, want, (eager, eager_cl_grad), floor=1e-4, factor=4.0)
        if training:
            for (name, got), (_, want), (_, eager), (_, eager_cl_buf), (_, got64) in zip(
                *(m.named_buffers() for m in models)
            ):
                if got.dtype.is_floating_point:
                    _assert_close64(f"float64 buffer {name}", got64, want)
                    if grads32:
                        _assert_rule(f"buffer {name}", got, want, (eager, eager_cl_buf), floor=1e-5, factor=4.0)
                else:
                    assert torch.equal(got, eager) and torch.equal(got64, want), name
    return swapped


def _assert_close64(name, got, want, scale=None):
    scale = max(scale if scale is not None else want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item() / scale if want.numel() else 0.0
    assert err <= 1e-9, f"{name}: error {err:.3g} relative to {scale:.3g} (float64 on both sides)"


# ---- whole models: eval, training, gradients, running statistics ---------------------------------------------------


def _hf_efficientnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.EfficientNetConfig(
        image_size=64, hidden_dim=640, width_coefficient=0.5, depth_coefficient=0.5
    )
    return transformers.EfficientNetModel(config)


MODELS = {
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "timm_mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100"),
    "timm_tf_efficientnet_b0_same_padding": lambda: timm.create_model("tf_efficientnet_b0"),
    "timm_efficientnetv2_rw_t_edge_residual": lambda: timm.create_model("efficientnetv2_rw_t"),
    "timm_mobilenetv2_100": lambda: timm.create_model("mobilenetv2_100"),
    "tv_efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "tv_efficientnet_v2_s": lambda: torchvision.models.efficientnet_v2_s(),
    "tv_mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(),
    "hf_efficientnet": _hf_efficientnet,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_whole_model_matches_the_original(name):
    model = MODELS[name]()
    swapped = compare_models(model)
    kinds = {type(m).__name__ for m in swapped.modules()}
    assert not kinds & {
        "InvertedResidual",
        "DepthwiseSeparableConv",
        "EdgeResidual",
        "MBConv",
        "FusedMBConv",
        "EfficientNetBlock",
    }, kinds
    assert set(swapped.state_dict()) == set(model.state_dict()), "state_dict keys changed"


TRAINED = [
    "timm_efficientnet_b0",
    "timm_mobilenetv3_large_100",
    "tv_efficientnet_b0",
    "tv_efficientnet_v2_s",
    "hf_efficientnet",
]


@pytest.mark.parametrize("name", TRAINED)
def test_three_training_steps_match(name):
    """Three SGD steps with the same seed: the losses and every parameter and buffer follow the original's."""
    original = MODELS[name]()
    _randomize_bn(original)
    swapped = pykernels.swap(copy.deepcopy(original), include=["mbconv"]).model
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    losses = {}
    for label, model in (("swapped", swapped), ("original", original)):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(0)
        losses[label] = []
        for _ in range(3):
            opt.zero_grad()
            loss = _out(model(x)).float().pow(2).mean()
            loss.backward()
            opt.step()
            losses[label].append(loss.item())
    torch.testing.assert_close(losses["swapped"], losses["original"], rtol=2e-3, atol=1e-6)
    for (name_a, a), (name_b, b) in zip(swapped.state_dict().items(), original.state_dict().items()):
        assert name_a == name_b
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name_a)
        else:
            assert torch.equal(a, b), name_a
    # and eval after training uses the refolded weights (the optimizer changed them in place)
    swapped.eval(), original.eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(swapped(x)), _out(original(x)), rtol=2e-3, atol=2e-3)


# ---- blocks built directly -------------------------------------------------------------------------------------------

BLOCKS = {
    # name: (FusedMBConvSE kwargs, timm block factory)
    "ir_e6_k3_s1": (dict(in_ch=16, out_ch=16, kernel_size=3, stride=1, expand_ratio=6), "ir"),
    "ir_e4_k5_s2": (dict(in_ch=16, out_ch=24, kernel_size=5, stride=2, expand_ratio=4), "ir"),
    "ds_e1_k3_s1": (dict(in_ch=16, out_ch=16, kernel_size=3, stride=1, expand_ratio=1), "ds"),
    "er_e4_k3_s2": (dict(in_ch=16, out_ch=24, kernel_size=3, stride=2, expand_ratio=4, fused_expand=True), "er"),
    "ir_relu_hardsigmoid": (
        dict(in_ch=8, out_ch=8, kernel_size=5, expand_ratio=3, act="hardswish", se_act="relu", gate="hard_sigmoid"),
        "ir",
    ),
    "ir_no_se_same_padding": (dict(in_ch=8, out_ch=16, kernel_size=3, stride=2, se_ratio=0, padding="same"), "ir"),
}


def _timm_twin(kwargs, kind):
    """The timm block with FusedMBConvSE(**kwargs)'s configuration (and its parameter names)."""
    from functools import partial

    from timm.layers import get_act_layer
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual, SqueezeExcite

    act = get_act_layer(kwargs.get("act", "silu"))
    se_ratio = kwargs.get("se_ratio", 0.25)
    gate = "hard_sigmoid" if kwargs.get("gate") == "hard_sigmoid" else "sigmoid"
    se_act = get_act_layer(kwargs.get("se_act") or kwargs.get("act", "silu"))
    in_ch = kwargs["in_ch"]
    se_layer = (
        partial(
            SqueezeExcite, rd_channels=round(in_ch * se_ratio), force_act_layer=se_act, gate_layer=get_act_layer(gate)
        )
        if se_ratio
        else None
    )
    pad = "same" if kwargs.get("padding") == "same" else ""
    common = dict(stride=kwargs.get("stride", 1), act_layer=act, se_layer=se_layer, pad_type=pad)
    if kind == "ir":
        exp = kwargs.get("expand_ratio", 6)
        block = InvertedResidual(in_ch, kwargs["out_ch"], kwargs.get("kernel_size", 3), exp_ratio=exp, **common)
    elif kind == "ds":
        block = DepthwiseSeparableConv(in_ch, kwargs["out_ch"], kwargs.get("kernel_size", 3), **common)
    else:
        block = EdgeResidual(
            in_ch, kwargs["out_ch"], kwargs.get("kernel_size", 3), exp_ratio=kwargs.get("expand_ratio", 6), **common
        )
    return block


def _block_pair(name):
    kwargs, kind = BLOCKS[name]
    twin = _timm_twin(kwargs, kind)
    mid = twin.conv_pw.out_channels if kind == "ir" else (twin.conv_exp.out_channels if kind == "er" else None)
    ours = FusedMBConvSE(**kwargs, hidden_ch=mid)
    ours.load_state_dict(twin.state_dict(), strict=True)  # timm's names and shapes
    _randomize_bn(twin)
    ours.load_state_dict(twin.state_dict(), strict=True)
    return ours, twin


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_timm(name, layout):
    ours, twin = _block_pair(name)
    ref64 = copy.deepcopy(twin).double()
    in_ch = BLOCKS[name][0]["in_ch"]
    for size in (15, 7, 1):
        for training, batch in ((False, 2), (True, 2), (True, 1)):
            if training and size == 1:
                batch = 4  # BatchNorm over 1-2 values per channel is ill-conditioned: any rounding decides
            elif training and batch * ((size + 1) // 2) ** 2 <= 1:
                continue
            x = torch.randn(batch, in_ch, size, size, generator=torch.Generator().manual_seed(size))
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            models = [copy.deepcopy(m).train(training) for m in (ours, twin, ref64)]
            outs = [m(t) for m, t in zip(models, (x, x, x.double()))]
            assert outs[0].shape == outs[1].shape
            _assert_rule(f"{name} size {size} train={training} batch={batch}", *outs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_low_precision_eval(dtype):
    ours, twin = _block_pair("ir_e6_k3_s1")
    x = torch.randn(2, 16, 12, 12)
    want = twin.double().eval()(x.double())
    got = ours.to(dtype).eval()(x.to(dtype))
    eager = twin.to(dtype)(x.to(dtype))
    _assert_rule(str(dtype), got, want, eager, floor=1e-2)


def test_refold_after_weight_and_statistic_changes():
    """Eval folds BatchNorm into the 1x1 weights once, and refolds whenever a weight or a running statistic changes:
    an optimizer step, load_state_dict, a training step's statistic update - never a stale result."""
    ours, twin = _block_pair("ir_e6_k3_s1")
    ours.eval(), twin.eval()
    x = torch.randn(2, 16, 8, 8)

    def same():
        with torch.no_grad():
            torch.testing.assert_close(ours(x), twin(x), rtol=1e-4, atol=1e-5)

    same()
    with torch.no_grad():
        for p in list(ours.parameters()):
            p.mul_(1.1)  # an in-place optimizer-style update
    twin.load_state_dict(ours.state_dict())
    same()
    state = {k: (v * 0.9 if v.dtype.is_floating_point else v) for k, v in twin.state_dict().items()}
    ours.load_state_dict(state), twin.load_state_dict(state)
    same()
    ours.train(), twin.train()
    ours(torch.randn(4, 16, 8, 8)), twin(torch.randn(4, 16, 8, 8))  # running statistics move
    ours.load_state_dict(twin.state_dict())
    ours.eval(), twin.eval()
    same()


def test_a_replaced_submodule_is_used_at_the_next_call():
    """The forward looks its parts up at every call (walking the children dicts): a BatchNorm or SE layer replaced on
    the block after conversion is what the next call computes with, as the original module would."""
    ours, twin = _block_pair("ir_e6_k3_s1")
    ours.eval(), twin.eval()
    x = torch.randn(2, 16, 8, 8)
    roles = [role for role in ("dw_bn", "proj_bn") if role in ours._layout.paths]
    assert roles
    for role in roles:
        path = ours._layout.paths[role]
        bn, twin_bn = copy.deepcopy(ours.get_submodule(path)), copy.deepcopy(twin.get_submodule(path))
        with torch.no_grad():
            for norm in (bn, twin_bn):  # each keeps its own class (timm's BatchNormAct2d holds the activation)
                norm.running_mean.add_(0.5)
                norm.weight.mul_(2.0)
        ours.set_submodule(path, bn)
        twin.set_submodule(path, twin_bn)
        assert ours._part(role) is bn
        with torch.no_grad():
            torch.testing.assert_close(ours(x), twin(x), rtol=1e-4, atol=1e-5)


def test_deepcopy_and_pickle_after_eval():
    """A block that has run in eval holds folded (maybe oneDNN-packed) weights: deepcopy (timm's ModelEma does it)
    and pickling still work, and the copy computes the same."""
    import io
    import pickle

    ours, twin = _block_pair("ir_e6_k3_s1")
    ours.eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want = ours(x)
        for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            torch.testing.assert_close(clone(x), want)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    assert ours._folded, "the original keeps its cache"


def test_drop_path_draws_the_same_mask_as_timm():
    kwargs, kind = BLOCKS["ir_e6_k3_s1"]
    twin = _timm_twin(kwargs, kind)
    twin.drop_path = timm.layers.DropPath(0.5)
    ours = FusedMBConvSE.from_module(copy.deepcopy(twin))
    x = torch.randn(8, 16, 6, 6)
    torch.manual_seed(3)
    a = ours.train()(x)
    torch.manual_seed(3)
    b = twin.train()(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph():
    ours, _ = _block_pair("ir_e4_k5_s2")
    x = torch.randn(2, 16, 9, 9)
    for training in (False, True):
        ours.train(training)
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        torch.manual_seed(0)
        got = compiled(x)
        torch.manual_seed(0)
        want = ours(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _saved_bytes(model, x) -> int:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def test_training_saves_at_most_0_6_of_eager():
    """Autograd keeps the expand conv output, the depthwise input and output - eager also keeps both BatchNorm
    outputs, the depthwise conv output and the SE-scaled tensor."""
    ours, twin = _block_pair("ir_e6_k3_s1")
    x = torch.randn(8, 16, 28, 28, requires_grad=True)
    mine, eager = _saved_bytes(ours.train(), x), _saved_bytes(twin.train(), x)
    assert mine <= 0.6 * eager, (mine, eager)


# ---- conversion: sources, refusals, swap ---------------------------------------------------------------------------


def test_seeds_fused_mbconv():
    from seeds_reference import FusedMBConv as SeedsFusedMBConv

    for stride, (cin, cout) in ((1, (16, 16)), (2, (16, 24))):
        seed_block = SeedsFusedMBConv(cin, cout, expand_ratio=4, stride=stride)
        _randomize_bn(seed_block)
        ours = FusedMBConvSE.from_module(copy.deepcopy(seed_block))
        ref64 = copy.deepcopy(seed_block).double()
        x = torch.randn(2, cin, 11, 11)
        for training in (False, True):
            outs = [m.train(training)(t) for m, t in ((ours, x), (copy.deepcopy(seed_block), x), (ref64, x.double()))]
            _assert_rule(f"seeds stride {stride} train={training}", *outs)
        assert set(ours.state_dict()) == set(seed_block.state_dict())


def test_squeeze_excite_from_every_source():
    from seeds_reference import SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite as TimmSE
    from torchvision.ops import SqueezeExcitation

    x = torch.randn(2, 32, 5, 5)
    for original in (
        TimmSE(32, rd_channels=8, act_layer=nn.SiLU),
        SqueezeExcitation(32, 8),
        SqueezeExcitation(32, 8, scale_activation=nn.Hardsigmoid),
        SEModule(32, 4),
    ):
        ours = SqueezeExcite.from_module(original)
        torch.testing.assert_close(ours(x), original(x), rtol=1e-5, atol=1e-6)
    module = SqueezeExcite(32, 8)
    assert set(module.state_dict()) == {
        "conv_reduce.weight",
        "conv_reduce.bias",
        "conv_expand.weight",
        "conv_expand.bias",
    }


def _timm_ir(**kw):
    from timm.models._efficientnet_blocks import InvertedResidual

    return InvertedResidual(16, 16, 3, exp_ratio=4, act_layer=nn.SiLU, **kw)


REFUSED = {
    "dilation": (lambda: _timm_ir(dilation=2), "dilation"),
    "anti_aliasing": (lambda: _timm_ir(stride=2, aa_layer="avg"), "anti-aliasing"),
    "gelu": (
        lambda: timm.models._efficientnet_blocks.InvertedResidual(16, 16, 3, exp_ratio=4, act_layer=nn.GELU),
        "activation",
    ),
    "groupnorm": (lambda: _timm_ir(norm_layer=lambda c, **kw: nn.GroupNorm(4, c)), "norm"),
    "kernel_9": (lambda: timm.models._efficientnet_blocks.InvertedResidual(16, 16, 9, exp_ratio=4), "kernel size 9"),
    # timm.layers.SEModule shares its class name with the seeds' SEModule (ReLU, sigmoid): its own act / gate are read
    "timm_se_module_maxpool": (
        lambda: _timm_ir(se_layer=lambda c, **kw: timm.layers.SEModule(c, add_maxpool=True, **kw)),
        "max-pool",
    ),
    "timm_se_module_bn": (
        lambda: _timm_ir(se_layer=lambda c, **kw: timm.layers.SEModule(c, norm_layer=nn.BatchNorm2d, **kw)),
        "BatchNorm2d inside the SE layer",
    ),
    "timm_se_module_gelu": (
        lambda: _timm_ir(se_layer=lambda c, **kw: timm.layers.SEModule(c, act_layer=nn.GELU)),
        "SE activation GELU",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refuses_what_it_does_not_compute(name):
    make, why = REFUSED[name]
    try:
        module = make()
    except Exception as e:  # the library refuses the variant itself
        pytest.skip(f"this timm version cannot build the variant: {e}")
    assert not can_convert(module)
    assert any(why in r for r in unsupported_reasons(module)), unsupported_reasons(module)
    with pytest.raises(ValueError, match="cannot stand in"):
        FusedMBConvSE.from_module(module)
    model = nn.Sequential(module)
    pykernels.swap(model, include="mbconv")
    assert model.pykernels_swapped == [] and model[0] is module


def test_rejects_unrelated_modules():
    for module in (nn.Conv2d(8, 8, 3), nn.Identity(), nn.Sequential(nn.Conv2d(8, 8, 1))):
        assert not can_convert(module)
        with pytest.raises(TypeError, match="does not know"):
            FusedMBConvSE.from_module(module)


def test_swap_keeps_state_dict_round_trip_and_is_idempotent():
    model = torchvision.models.mobilenet_v3_large()
    original = copy.deepcopy(model)
    pykernels.swap(model)
    swapped_names = list(model.pykernels_swapped)
    assert swapped_names and all("features" in n for n in swapped_names)
    original.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(original.state_dict(), strict=True)
    pykernels.swap(model)
    assert model.pykernels_swapped == []
    assert "FusedMBConvSE" in repr(model) and "from='torchvision InvertedResidual'" in repr(model)


def test_constructor_errors():
    with pytest.raises(ValueError, match="kernel size 9"):
        FusedMBConvSE(8, 8, kernel_size=9)
    with pytest.raises(ValueError, match="stride 3"):
        FusedMBConvSE(8, 8, stride=3)
    with pytest.raises(ValueError, match="activation 'gelu'"):
        FusedMBConvSE(8, 8, act="gelu")
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        FusedMBConvSE(8, 8)(torch.randn(1, 9, 4, 4))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dropping", [False, True], ids=["eval", "train_mode_frozen_bn_drop_path"])
def test_skip_connection_in_the_projection_epilogue(layout, dropping):
    """Without autograd and with every BatchNorm on running statistics, the residual add runs as the projection
    GEMM's epilogue - unless the block is in training mode with an active DropPath (BatchNorms frozen, no_grad), where
    the sample mask must still be drawn and applied as timm draws it. Both against timm's block; the input is left
    untouched. The SE layer is timm.layers' SEModule with the block's SiLU (it was once read as the seeds' ReLU one)."""
    torch.manual_seed(0)
    original = _timm_ir(se_layer=timm.layers.SEModule, drop_path_rate=0.5)
    _randomize_bn(original)
    block = FusedMBConvSE.from_module(copy.deepcopy(original))
    for m in (original, block):
        m.train(dropping)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.eval()
    x = torch.randn(4, 16, 9, 11)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.no_grad():
        torch.manual_seed(5)
        want = original(x)
        torch.manual_seed(5)
        got = block(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(x, kept)
    if dropping:  # some sample was dropped: its output is its input
        assert any(torch.equal(got[i], x[i]) for i in range(4))
