"""The real-model matrix: small configurations of timm, torchvision and Hugging Face models (tests/model_zoo.py,
random weights, no downloads), each swapped with every kind (attention included), checked the way a user would:

* the report accounts for every layer of a kind swap handles (by class name, independently of swap's own matching):
  each is replaced, or skipped with a reason, or inside one that is;
* eval parity with every layer-scale set to O(1) and BatchNorm statistics away from the identity;
* the swapped model's state_dict loads into the original with ``strict=True`` and back;
* three SGD steps (training mode, drop-path on where the model has it) with the same seed give the same losses and
  parameters;
* ``torch.compile`` runs the swapped model in eval (and, for one model per kind, a training step) with ``aot_eager``:
  dynamo + AOT autograd trace every pykernels op as inductor would see them; inductor itself compiles the swapped
  models in ``make bench``, and the ops in their own tests.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from model_zoo import MODELS, output_tensor, unhide_branches

import pykernels

pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread_per_xdist_worker")

ALL_KINDS = ["convnext_block", "mbconv", "mlp", "drop_path", "attention"]
# layer classes of the kinds swap handles, by name - written independently of swap's matching
IN_SCOPE = re.compile(
    r"(Attention|Mlp|MLP|MLPBlock|DropPath|StochasticDepth|ConvNeXtBlock|CNBlock|ConvNextLayer|ConvNextV2Layer|"
    r"InvertedResidual|MBConv|FusedMBConv|EdgeResidual|DepthwiseSeparableConv|EfficientNetBlock|Intermediate)$"
)
# what must be replaced in each model (kind: minimum count); the rest may be skipped with a reason
MUST_REPLACE = {
    "timm_convnext_atto": {"convnext_block": 12},
    "timm_efficientnet_b0": {"mbconv": 16},
    "timm_mobilenetv3_small_050": {"mbconv": 11},
    "timm_vit_tiny": {"attention": 2, "mlp": 2, "drop_path": 2},
    "timm_deit_tiny": {"attention": 2, "mlp": 2},
    "timm_swin_tiny": {"attention": 4, "mlp": 4, "drop_path": 3},
    "tv_convnext_tiny": {"convnext_block": 18},
    "tv_efficientnet_b0": {"mbconv": 16},
    "tv_vit": {"attention": 2, "mlp": 2},
    "tv_swin": {"attention": 4, "mlp": 4, "drop_path": 3},
    "hf_vit": {"attention": 2, "mlp": 2},
    "hf_dinov2": {"attention": 2, "mlp": 2, "drop_path": 2},
    "hf_swin": {"attention": 4, "mlp": 4, "drop_path": 3},
    "hf_swinv2": {"attention": 4, "drop_path": 3},
    "hf_beit": {"attention": 2, "mlp": 2, "drop_path": 1},
    "hf_data2vec_vision": {"attention": 2, "drop_path": 1},
    "hf_clip_vision": {"attention": 2},
    "hf_convnext": {"convnext_block": 4},
    "hf_convnextv2": {"drop_path": 3},
    "hf_efficientnet": {"mbconv": 10},
    "hf_mobilenetv2": {"mbconv": 10},
}


# a compiled training step too, one model per swapped kind (each traces forward + backward: up to a minute per
# BatchNorm network on 2 cores; the ops' own compile tests cover their backward in every configuration)
COMPILE_TRAIN = ("timm_convnext_atto", "timm_vit_tiny", "hf_beit", "hf_efficientnet", "tv_swin")


def _build(name: str):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = unhide_branches(build())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return model, x


def _swap(model):
    swapped = copy.deepcopy(model)
    report = pykernels.swap(swapped, include=ALL_KINDS)
    return swapped, report


def _assert_scaled_close(got, want, rel, what="", floor=0.0):
    scale = want.abs().max().item() or 1.0
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * scale + floor, f"{what}: max error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("name", list(MODELS))
def test_report_accounts_for_every_layer_and_eval_matches(name):
    model, x = _build(name)
    model.eval()
    swapped, report = _swap(model)
    accounted = [r.path for r in report.replaced] + [s.path for s in report.skipped]
    assert all(s.reason for s in report.skipped), report
    missing = [
        f"{path} ({type(m).__name__})"
        for path, m in model.named_modules()
        if IN_SCOPE.search(type(m).__name__) and not any(path == a or path.startswith(a + ".") for a in accounted)
    ]
    assert not missing, f"swap's report does not mention {missing}\n{report}"
    counts: dict[str, int] = {}
    for r in report.replaced:
        if r.new != "MlpPreNorm":
            counts[r.kind] = counts.get(r.kind, 0) + 1
    for kind, n in MUST_REPLACE[name].items():
        assert counts.get(kind, 0) >= n, f"{kind}: replaced {counts.get(kind, 0)}, expected >= {n}\n{report}"
    with torch.no_grad():
        want = output_tensor(model(x))
        got = output_tensor(swapped(x))
    _assert_scaled_close(got, want, 1e-4, name)
    # the state_dict goes both ways
    keys = set(model.state_dict())
    assert set(swapped.state_dict()) == keys
    copy.deepcopy(model).load_state_dict(swapped.state_dict(), strict=True)
    copy.deepcopy(swapped).load_state_dict(model.state_dict(), strict=True)


def _train(model, x, steps=3):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    torch.manual_seed(0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = output_tensor(model(x)).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.parametrize("name", list(MODELS))
def test_three_training_steps_match(name):
    """Same seed, same data: the same losses and parameters after three SGD steps. The tolerance: 2e-3 of each
    tensor's scale, or - for networks with BatchNorm, whose training-mode statistics over few values amplify rounding -
    4x what eager PyTorch itself moves when the same model runs channels-last instead (its own float32 noise)."""
    model, x = _build(name)
    swapped, _ = _swap(model)
    noise_model = None
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        noise_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    want_losses, want = _train(model, x)
    got_losses, got = _train(swapped, x)
    noise_losses, noise = (
        _train(noise_model, x.contiguous(memory_format=torch.channels_last))
        if noise_model
        else (
            want_losses,
            want,
        )
    )
    for w, g, n in zip(want_losses, got_losses, noise_losses):
        assert abs(g - w) <= max(2e-3 * abs(w), 4 * abs(n - w)) + 1e-6, (want_losses, got_losses, noise_losses)
    floats = [k for k, a in want.items() if a.dtype.is_floating_point]
    scale = {k: want[k].abs().max().item() for k in floats}
    eager_noise = {k: (noise[k].float() - want[k].float()).abs().max().item() for k in floats}
    # eager's worst relative drift over the whole model: one tensor's own drift can be small by chance
    worst = max((eager_noise[k] / scale[k] for k in floats if scale[k] > 0), default=0.0)
    for key, a in want.items():
        b = got[key]
        if a.dtype.is_floating_point:
            err = (b.float() - a.float()).abs().max().item()
            allowed = max(2e-3 * scale[key], 4 * eager_noise[key], worst * scale[key])
            # floor: a parameter that barely moves (BEiT's zero k bias: its gradient is 0 up to rounding)
            assert err <= allowed + 1e-6, f"{key}: {err:.3g} (eager's own {eager_noise[key]:.3g}, worst {worst:.3g})"
        else:
            assert torch.equal(a, b), key


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_compile_runs_the_swapped_model(name):
    model, x = _build(name)
    swapped, _ = _swap(model)
    swapped.eval()
    torch._dynamo.reset()
    compiled = torch.compile(swapped, backend="aot_eager")
    with torch.no_grad():
        want = output_tensor(swapped(x))
        got = output_tensor(compiled(x))
    _assert_scaled_close(got, want, 1e-5, name)
    if name not in COMPILE_TRAIN:
        return
    # and a training step (AOT autograd traces the pykernels ops' backward)
    swapped.train()
    torch.manual_seed(0)
    loss = output_tensor(compiled(x)).float().square().mean()
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in swapped.parameters())
