"""Empty inputs (B = 0, N = 0, H = W = 0) on every op, backend and module: empty outputs of the right shape, and
gradients of the right shape (zero for the parameters), never a crash; where eager PyTorch refuses (a convolution over
an empty image) a clear ValueError. (B = 0 per op is also in each op's own tests; here are the sizes those do not
cover and the modules.)"""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from helpers import device_backends, require_backend

import pykernels
from pykernels import functional as F

# ---- ops, each backend ---------------------------------------------------------------------------------------------


def _grads_shaped_like(out: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    grads = torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)
    for g, t in zip(grads, leaves):
        assert g is not None and g.shape == t.shape
        assert torch.isfinite(g).all()
        if t.numel() and t.dim() <= 1:  # a parameter: nothing flowed into it
            assert not g.any()


@pytest.mark.parametrize("device,backend", device_backends(), ids=str)
@pytest.mark.parametrize("op", ["dwconv_ln", "mbconv_se"])
@pytest.mark.parametrize("shape", [(2, 4, 0, 0), (2, 4, 0, 5), (0, 4, 5, 0)], ids=str)
def test_conv_ops_refuse_an_empty_image_as_conv2d_does(device, backend, op, shape):
    """H = 0 or W = 0: ``F.conv2d`` refuses a k x k convolution over an empty image (RuntimeError); both conv ops
    refuse it too, up front, with a ValueError that names the shape (never a crash inside a kernel)."""
    require_backend(op, backend, device)
    c, k = shape[1], (7 if op == "dwconv_ln" else 3)
    x = torch.randn(shape, device=device)
    w = torch.randn(c, 1, k, k, device=device)
    with pytest.raises(RuntimeError):
        torch.nn.functional.conv2d(x, w, padding=k // 2, groups=c)
    with pytest.raises(ValueError, match=r"H, W >= 1.*" + re.escape(str(list(shape)))):
        if op == "dwconv_ln":
            F.dwconv_ln(x, w, None, None, None, 1e-6, backend=backend)
        else:
            F.mbconv_se(x, w, None, None, None, torch.zeros(c), torch.ones(c), backend=backend)


@pytest.mark.parametrize("device,backend", device_backends(), ids=str)
@pytest.mark.parametrize("shape", [(0, 6, 3, 3), (0, 6, 1, 1)], ids=str)
def test_mbconv_se_training_on_no_values_is_batch_norms_no_op(device, backend, shape):
    """B = 0 in training: batch statistics over zero values. ``F.batch_norm`` returns an empty output and leaves the
    running statistics alone (no NaN mean); so does the op."""
    require_backend("mbconv_se", backend, device)
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, bw, bb = (torch.randn(s, device=device, requires_grad=True) for s in ((6, 1, 3, 3), (6,), (6,)))
    rm, rv = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5
    want_rm, want_rv = rm.clone(), rv.clone()
    torch.nn.functional.batch_norm(x.detach(), want_rm, want_rv, bw.detach(), bb.detach(), training=True)
    out, pooled = F.mbconv_se(x, w, None, bw, bb, rm, rv, training=True, backend=backend)
    assert out.shape == shape and pooled.shape == shape[:2] and not pooled.any()
    assert torch.equal(rm, want_rm) and torch.equal(rv, want_rv)
    _grads_shaped_like(out.sum() + pooled.sum(), [x, w, bw, bb])


@pytest.mark.parametrize("device,backend", device_backends(), ids=str)
@pytest.mark.parametrize("shape", [(0, 5, 8), (3, 0, 8)], ids=str)
def test_drop_path_add_empty_tokens(device, backend, shape):
    require_backend("drop_path_add", backend, device)
    x, y = (torch.randn(shape, device=device, requires_grad=True) for _ in range(2))
    g = torch.randn(shape[-1], device=device, requires_grad=True)
    out = F.drop_path_add(x, y, 0.3, g, training=True, backend=backend)
    assert out.shape == shape
    _grads_shaped_like(out, [x, y, g])


@pytest.mark.parametrize("shape", [(0, 5, 16), (3, 0, 16), (0, 16)], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_mlp_empty_tokens(shape, training):
    c, hidden = shape[-1], 32
    x = torch.randn(shape, requires_grad=True)
    w1, b1 = torch.randn(hidden, c, requires_grad=True), torch.randn(hidden, requires_grad=True)
    w2, b2 = torch.randn(c, hidden, requires_grad=True), torch.randn(c, requires_grad=True)
    g = torch.randn(c, requires_grad=True)
    out = F.mlp(x, w1, b1, w2, b2, gamma=g, shortcut=x, drop_prob=0.2, training=training)
    assert out.shape == shape
    _grads_shaped_like(out, [x, w1, b1, w2, b2, g])


# ---- modules ---------------------------------------------------------------------------------------------------


def _module_case(name: str):
    """(original module, input shape) of a module case; the pykernels module comes from ``swap``."""
    if name == "vit_block":
        return timm.models.vision_transformer.Block(32, 4, init_values=0.5, drop_path=0.1), (0, 7, 32)
    if name == "vit_block_no_tokens":
        return timm.models.vision_transformer.Block(32, 4, init_values=0.5, drop_path=0.1), (2, 0, 32)
    if name == "convnext_block":
        return timm.models.convnext.ConvNeXtBlock(16, ls_init_value=0.5, drop_path=0.1), (0, 16, 6, 6)
    from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

    se = SqueezeExcite
    block = InvertedResidual(16, 16, 3, exp_ratio=4, act_layer=torch.nn.SiLU, se_layer=se, drop_path_rate=0.1)
    return block, (0, 16, 6, 6)


MODULE_CASES = [
    "vit_block",
    "vit_block_no_tokens",
    "convnext_block",
    "mbconv_block",
]


@pytest.mark.parametrize("name", MODULE_CASES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_swapped_modules_on_empty_inputs(name, training):
    """The swapped block does what the original does on an empty input: an empty output of the same shape, with
    gradients, and the same buffers (running statistics); where the original raises, the swapped one raises too."""
    torch.manual_seed(0)
    original, shape = _module_case(name)
    holder = torch.nn.Sequential(original)
    swapped = copy.deepcopy(holder)
    report = pykernels.swap(swapped, include=["convnext_block", "mbconv", "mlp", "drop_path", "attention"])
    assert report.replaced, report
    results = []
    for model in (holder, swapped):
        model.train(training)
        x = torch.randn(shape, requires_grad=True)
        try:
            out = model(x)
        except (ValueError, RuntimeError) as exc:
            results.append(type(exc))
            continue
        assert out.shape == shape
        params = [p for p in model.parameters() if p.requires_grad]
        _grads_shaped_like(out, [x, *params])
        results.append(out.shape)
    want, got = results
    if isinstance(want, type):  # the original refused: the swapped module refuses with a ValueError, never NaN
        assert got in (ValueError, RuntimeError), f"original raised {want.__name__}, swapped returned {got}"
    else:
        assert got == want
        for (name, a), (_, b) in zip(holder.named_buffers(), swapped.named_buffers()):
            assert torch.equal(a, b), name
