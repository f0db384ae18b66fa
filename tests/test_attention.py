"""FusedMHSA and the pykernels::attention ops: parity with timm / nn.MultiheadAttention / Hugging Face ViT attention
(forward and every gradient), state_dict compatibility, opcheck / gradcheck of both ops, torch.compile, the memory
contract (nothing Nq x Nk saved for backward), dropout reproducibility and error messages.

Backends: ``torch`` always; ``triton`` under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1) or on
a GPU. Shapes are small so the interpreter stays fast.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICES, require_backend
from seeds_reference import MHSA, SelfAttention
from torch import nn

from pykernels.backends import BackendNotSupportedError
from pykernels.modules.attention import (
    FusedMaskedMHSA,
    FusedMHSA,
    FusedMultiheadAttention,
    FusedViTAttention,
    can_convert,
)
from pykernels.ops import attention as attention_ops

BACKENDS = ["torch", "triton"]
CASES = [(d, b) for d in DEVICES for b in BACKENDS]
CASE_IDS = [f"{d}-{b}" for d, b in CASES]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}


def _require(backend, device):
    require_backend("attention", backend, device)


def _reference(q, k, v, bias=None, key_padding_mask=None, causal=False, scale=None):
    """float64 math attention: (B, Nq, H, D) inputs -> (B, Nq, H * D); fully masked rows give 0."""
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    qt, kt, vt = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = qt @ kt.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if causal:
        scores = scores.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)
    return (probs @ vt).transpose(1, 2).reshape(batch, n_q, heads * head_dim)


def _grads(module, x):
    return {name: p.grad.clone() for name, p in module.named_parameters()}, x.grad.clone()


def _assert_grads_close(fused, fused_x, ref_named, ref_x, rename=None, **tol):
    grads, gx = _grads(fused, fused_x)
    torch.testing.assert_close(gx, ref_x.grad, **tol)
    for name, g in grads.items():
        want = ref_named[rename(name) if rename else name]
        torch.testing.assert_close(g, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


# ---- timm ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_attention_parity(device, backend, train):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    _require(backend, device)
    torch.manual_seed(0)
    ref = timm_vit.Attention(64, num_heads=4, qkv_bias=True).to(device).train(train)
    fused = FusedMHSA.from_module(ref, backend=backend)
    assert fused.training == train and fused.num_heads == 4 and fused.scale == ref.scale
    x = torch.randn(2, 37, 64, device=device)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_fused = ref(x_ref), fused(x_fused)
    torch.testing.assert_close(y_fused, y_ref, **TOL[torch.float32])
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fused.backward(grad)
    _assert_grads_close(
        fused, x_fused, dict((n, p.grad) for n, p in ref.named_parameters()), x_ref, atol=1e-4, rtol=1e-3
    )


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_fp16_against_float64(device, backend):
    _require(backend, device)
    torch.manual_seed(1)
    fused = FusedMHSA(64, num_heads=2, backend=backend).to(device)  # head dim 32
    x = torch.randn(2, 45, 64, device=device)
    fused16 = FusedMHSA.from_module(fused).half()
    y16 = fused16(x.half())
    y64 = FusedMHSA.from_module(fused, backend="torch").double()(x.double())
    torch.testing.assert_close(y16.double(), y64, atol=2e-2, rtol=2e-2)
    y16.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fused16.parameters())


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_timm_state_dict_loads_strict(qkv_bias):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    ref = timm_vit.Attention(48, num_heads=3, qkv_bias=qkv_bias)
    fused = FusedMHSA(48, num_heads=3, qkv_bias=qkv_bias)
    fused.load_state_dict(ref.state_dict(), strict=True)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(1, 10, 48)
    torch.testing.assert_close(fused(x), ref.eval()(x), **TOL[torch.float32])


# ---- bias, padding mask, causal: the op against the float64 oracle -------------------------------------------


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("variant", ["bias", "padding", "causal", "all"])
def test_op_masks_and_bias_grad(device, backend, variant):
    _require(backend, device)
    torch.manual_seed(2)
    batch, n, heads, head_dim = 2, 33, 2, 16
    qkv = torch.randn(batch, n, 3, heads, head_dim, device=device, requires_grad=True)
    bias = kpm = None
    causal = variant in ("causal", "all")
    if variant in ("bias", "all"):
        bias = torch.randn(1, heads, n, n, device=device, requires_grad=True)
    if variant in ("padding", "all"):
        kpm = torch.zeros(batch, n, dtype=torch.bool, device=device)
        kpm[0, -7:] = True
    scale = head_dim**-0.5
    out, lse = attention_ops.attention(*qkv.unbind(2), bias, kpm, causal, scale, 0.0, torch.tensor([0]), backend)
    ref = _reference(*qkv.unbind(2), bias, kpm, causal, scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-4)
    assert lse.shape == (batch, heads, n) and lse.dtype == torch.float32 and torch.isfinite(lse).all()
    grad = torch.randn_like(out)
    inputs = [qkv] + ([bias] if bias is not None else [])
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)


def test_gradcheck_torch_backend():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 6, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False] * 5 + [True]])

    def fn(q, k, v, bias):
        return attention_ops.attention(q, k, v, bias, kpm, True, 0.3, 0.25, torch.tensor([7]), "torch")[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), fast_mode=True)


# ---- opcheck --------------------------------------------------------------------------------------------------------


def _op_args(device, dtype, with_bias, backend, dropout_p=0.0):
    torch.manual_seed(4)
    qkv = torch.randn(2, 9, 3, 2, 16, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)
    bias = torch.randn(2, 1, 9, 9, device=device, dtype=dtype) if with_bias else None
    kpm = torch.zeros(2, 9, dtype=torch.bool, device=device)
    kpm[1, -2:] = True
    return q, k, v, bias, kpm, False, 0.25, dropout_p, torch.tensor([11]), backend


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck_attention(device, backend, with_bias):
    _require(backend, device)
    args = list(_op_args(device, torch.float32, with_bias, backend))
    for i in range(3):
        args[i] = args[i].detach().requires_grad_()
    if with_bias:
        args[3].requires_grad_()
    torch.library.opcheck(torch.ops.pykernels.attention.default, tuple(args))


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck_attention_backward(device, backend, with_bias):
    _require(backend, device)
    q, k, v, bias, kpm, causal, scale, dropout_p, seed, _ = _op_args(device, torch.float32, with_bias, backend, 0.1)
    out, lse = attention_ops.attention(q, k, v, bias, kpm, causal, scale, dropout_p, seed, backend)
    grad = torch.randn_like(out)
    args = (grad, q, k, v, out, lse, bias, kpm, causal, scale, dropout_p, seed, with_bias, backend)
    torch.library.opcheck(torch.ops.pykernels.attention_backward.default, args)


# ---- dropout ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_dropout_reproducible_and_gradients_consistent(device, backend):
    _require(backend, device)
    fused = FusedMHSA(32, num_heads=2, attn_drop=0.3, backend=backend).to(device).train()
    x = torch.randn(2, 20, 32, device=device)
    torch.manual_seed(5)
    y1 = fused(x)
    torch.manual_seed(5)
    y2 = fused(x)
    y3 = fused(x)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    assert not torch.allclose(y2, y3)
    assert not torch.allclose(y1, fused.eval()(x))
    # the backward regenerates the forward's mask: the op's gradient matches finite differences of the same seed
    q, k, v = (torch.randn(1, 8, 2, 16, device=device, requires_grad=True) for _ in range(3))
    seed = torch.tensor([123])
    out = attention_ops.attention(q, k, v, None, None, False, 0.25, 0.3, seed, backend)[0]
    grad = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, grad)
    direction = torch.randn_like(q)
    eps = 1e-2

    def f(t):
        return (attention_ops.attention(t, k, v, None, None, False, 0.25, 0.3, seed, backend)[0] * grad).sum()

    with torch.no_grad():
        fd = (f(q + eps * direction) - f(q - eps * direction)) / (2 * eps)
    torch.testing.assert_close((dq * direction).sum(), fd, atol=5e-3, rtol=5e-3)


# ---- nn.MultiheadAttention -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_multihead_attention_parity(device, backend, batch_first, need_weights, padding):
    _require(backend, device)
    torch.manual_seed(6)
    ref = nn.MultiheadAttention(32, 2, batch_first=batch_first).to(device).eval()
    fused = FusedMHSA.from_module(ref, backend=backend)
    assert isinstance(fused, FusedMultiheadAttention) and fused.batch_first == batch_first
    shape = (2, 21, 32) if batch_first else (21, 2, 32)
    x = torch.randn(shape, device=device)
    kpm = None
    if padding:
        kpm = torch.zeros(2, 21, dtype=torch.bool, device=device)
        kpm[1, -5:] = True
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, w_ref = ref(x_ref, x_ref, x_ref, key_padding_mask=kpm, need_weights=need_weights)
    y_fused, w_fused = fused(x_fused, x_fused, x_fused, key_padding_mask=kpm, need_weights=need_weights)
    torch.testing.assert_close(y_fused, y_ref, **TOL[torch.float32])
    if need_weights:
        torch.testing.assert_close(w_fused, w_ref, **TOL[torch.float32])
    else:
        assert w_fused is None and w_ref is None
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fused.backward(grad)
    names = {
        "qkv.weight": "in_proj_weight",
        "qkv.bias": "in_proj_bias",
        "proj.weight": "out_proj.weight",
        "proj.bias": "out_proj.bias",
    }
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    _assert_grads_close(fused, x_fused, ref_grads, x_ref, rename=names.get, atol=1e-4, rtol=1e-3)


def test_multihead_attention_attn_mask_and_cross_attention():
    torch.manual_seed(7)
    ref = nn.MultiheadAttention(32, 2, batch_first=True).eval()
    fused = FusedMHSA.from_module(ref)
    x = torch.randn(2, 12, 32)
    mask = torch.ones(12, 12, dtype=torch.bool).triu(1)  # True = not allowed
    for attn_mask in (mask, torch.randn(12, 12), torch.randn(4, 12, 12)):
        torch.testing.assert_close(
            fused(x, x, x, need_weights=False, attn_mask=attn_mask)[0],
            ref(x, x, x, need_weights=False, attn_mask=attn_mask)[0],
            **TOL[torch.float32],
        )
    memory = torch.randn(2, 7, 32)  # cross-attention: the reference path
    torch.testing.assert_close(fused(x, memory, memory)[0], ref(x, memory, memory)[0], **TOL[torch.float32])


# ---- Hugging Face ViT ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_hf_vit_attention_parity(device, backend):
    transformers = pytest.importorskip("transformers")
    from transformers.models.vit.modeling_vit import ViTAttention

    _require(backend, device)
    torch.manual_seed(8)
    config = transformers.ViTConfig(hidden_size=64, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1)
    config._attn_implementation = "eager"
    ref = ViTAttention(config).to(device).eval()
    fused = FusedMHSA.from_module(ref, backend=backend)
    assert isinstance(fused, FusedViTAttention)
    x = torch.randn(2, 17, 64, device=device)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref)[0]
    y_fused, weights = fused(x_fused)
    assert weights is None
    torch.testing.assert_close(y_fused, y_ref, **TOL[torch.float32])
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fused.backward(grad)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, atol=1e-4, rtol=1e-3)
    dqkv = torch.cat([ref.q_proj.weight.grad, ref.k_proj.weight.grad, ref.v_proj.weight.grad])
    torch.testing.assert_close(fused.qkv.weight.grad, dqkv, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(fused.proj.weight.grad, ref.o_proj.weight.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("seed_class", ["SelfAttention", "MHSA-nomask", "MHSA-causal", "MHSA-padding"])
def test_seeds_attention_parity(device, backend, seed_class):
    """from_module of the seeds' classes: same output and every gradient (input, qkv, output Linear); MHSA keeps its
    ``forward(x, mask)`` signature with a 0/1 mask (2-D causal, or (B, 1, 1, T) padding)."""
    _require(backend, device)
    torch.manual_seed(14)
    batch, tokens, dim, heads = 2, 13, 64, 4
    ref = (SelfAttention(dim, heads) if seed_class == "SelfAttention" else MHSA(dim, heads)).to(device).eval()
    fused = FusedMHSA.from_module(ref, backend=backend)
    assert type(fused) is (FusedMHSA if seed_class == "SelfAttention" else FusedMaskedMHSA)
    assert can_convert(ref)
    mask = None
    if seed_class == "MHSA-causal":
        mask = torch.ones(tokens, tokens, device=device).tril()
    elif seed_class == "MHSA-padding":
        mask = torch.ones(batch, 1, 1, tokens, device=device)
        mask[1, ..., -4:] = 0
    x = torch.randn(batch, tokens, dim, device=device)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    args = () if mask is None else (mask,)
    y_ref, y_fused = ref(x_ref, *args), fused(x_fused, *args)
    torch.testing.assert_close(y_fused, y_ref, **TOL[torch.float32])
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fused.backward(grad)
    out_name = "out" if seed_class == "SelfAttention" else "proj"
    ref_named = {n.replace(out_name + ".", "proj."): p.grad for n, p in ref.named_parameters()}
    _assert_grads_close(fused, x_fused, ref_named, x_ref, atol=1e-4, rtol=1e-3)


# ---- torch.compile ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,compiler", [("torch", "inductor"), ("triton", "aot_eager")])
def test_compile_fullgraph(backend, compiler):
    device = DEVICES[-1]
    _require(backend, device)
    torch.manual_seed(9)
    fused = FusedMHSA(32, num_heads=2, backend=backend).to(device)
    x = torch.randn(2, 19, 32, device=device)
    bias = torch.randn(1, 2, 19, 19, device=device)
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = fused(eager_x, bias)
    expected.sum().backward()
    eager_grads = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend=compiler)
    got = compiled(compiled_x, bias)
    got.sum().backward()
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, atol=1e-4, rtol=1e-3)
    for p, g in zip(fused.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_with_dropout(backend):
    """Attention dropout in training compiles without a graph break (the seed is a tensor drawn by torch.randint, not
    an ``.item()``), acts, gives finite gradients, and ``torch.manual_seed`` reproduces the compiled step."""
    device = DEVICES[-1]
    _require(backend, device)
    torch.manual_seed(12)
    fused = FusedMHSA(32, num_heads=2, attn_drop=0.5, backend=backend).to(device).train()
    x = torch.randn(2, 19, 32, device=device, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    with torch.no_grad():
        no_drop = fused.eval()(x)
    assert not torch.allclose(out, no_drop, atol=1e-3)  # dropout did act in the compiled train step
    torch.manual_seed(13)
    first = compiled.train()(x).detach()
    torch.manual_seed(13)
    second = compiled(x).detach()
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # torch.manual_seed reproduces the compiled step


# ---- memory: nothing Nq x Nk saved for backward -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensors_have_no_n_by_n(backend):
    device = DEVICES[-1]
    _require(backend, device)
    n = 1024
    fused = FusedMHSA(32, num_heads=2, backend=backend).to(device)  # B=1, H=2, D=16
    x = torch.randn(1, n, 32, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused(x)
    assert saved, "nothing saved: the hook saw no autograd graph"
    big = [s for s in saved if s[1] >= n * n]
    assert not big, f"tensors with >= Nq*Nk elements saved for backward: {big}"
    assert max(s[1] for s in saved) <= 3 * n * 32  # at most the packed qkv projection


# ---- errors ----------------------------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        FusedMHSA(30, num_heads=4)
    with pytest.raises(ValueError, match="head dim 20 not supported .* every multiple of 8 from 8 to 256"):
        FusedMHSA(40, num_heads=2, backend="triton")  # head dim 20
    with pytest.raises(ValueError, match="unknown pykernels backend"):
        FusedMHSA(32, num_heads=2, backend="cudnn")
    fused = FusedMHSA(32, num_heads=2)
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        fused(torch.randn(10, 32))
    with pytest.raises(ValueError, match="dim=32"):
        fused(torch.randn(1, 10, 16))
    with pytest.raises(ValueError, match="bool"):
        fused(torch.randn(1, 10, 32), key_padding_mask=torch.zeros(1, 10))
    with pytest.raises(TypeError, match="does not know"):
        FusedMHSA.from_module(nn.Linear(3, 3))
    # an explicit triton choice that cannot serve the call lists every backend's reasons
    q = torch.randn(1, 4, 1, 20)
    with pytest.raises(BackendNotSupportedError, match="head dim 20"):
        attention_ops.attention(q, q, q, None, None, False, 0.2, 0.0, torch.tensor([0]), "triton")
    # automatic choice falls back quietly (torch on CPU)
    out, _ = attention_ops.attention(q, q, q, None, None, False, 0.2, 0.0, torch.tensor([0]), None)
    torch.testing.assert_close(out.double(), _reference(q, q, q, scale=0.2), atol=1e-6, rtol=1e-5)


def test_extra_repr_and_copy():
    fused = FusedMHSA(64, num_heads=4, attn_drop=0.1, causal=True, scale=0.5, backend="torch")
    text = repr(fused)
    for part in ("dim=64", "num_heads=4", "head_dim=16", "scale=0.5", "attn_drop=0.1", "causal=True", "'torch'"):
        assert part in text
    copy = FusedMHSA.from_module(fused)
    x = torch.randn(1, 5, 64)
    torch.testing.assert_close(copy.eval()(x), fused.eval()(x))
    assert math.isclose(copy.scale, 0.5)


# ---- inside models: timm Block, nn.TransformerEncoderLayer ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inside_timm_block_with_attn_mask_and_causal(backend):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    device = DEVICES[-1]
    _require(backend, device)
    torch.manual_seed(10)
    block = timm_vit.Block(32, num_heads=2, qkv_bias=True).to(device).eval()
    x = torch.randn(2, 15, 32, device=device)
    keep = torch.rand(2, 1, 15, 15, device=device) > 0.3
    keep |= torch.eye(15, dtype=torch.bool, device=device)  # no fully masked row
    expected = [block(x), block(x, attn_mask=keep), block(x, is_causal=True)]
    assert can_convert(block.attn)
    block.attn = FusedMHSA.from_module(block.attn, backend=backend)
    got = [block(x), block(x, attn_mask=keep), block(x, is_causal=True)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_inside_transformer_encoder_layer(train):
    torch.manual_seed(11)
    layer = nn.TransformerEncoderLayer(32, 2, dim_feedforward=64, dropout=0.0, batch_first=True).train(train)
    x = torch.randn(2, 13, 32)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[0, -4:] = True
    with torch.no_grad():
        expected = layer(x, src_key_padding_mask=kpm)
    assert can_convert(layer.self_attn)
    layer.self_attn = FusedMHSA.from_module(layer.self_attn)
    with torch.no_grad():
        got = layer(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_can_convert():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    assert can_convert(timm_vit.Attention(32, 2))
    assert not can_convert(timm_vit.Attention(32, 2, qk_norm=True, norm_layer=nn.LayerNorm))
    assert not can_convert(FusedMHSA(32, 2))
    assert not can_convert(nn.MultiheadAttention(32, 2, kdim=16, vdim=16))
    assert not can_convert(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="q_norm"):
        FusedMHSA.from_module(timm_vit.Attention(32, 2, qk_norm=True, norm_layer=nn.LayerNorm))


# ---- swap ------------------------------------------------------------------------------------------------------------


def test_swap_attention_is_opt_in_and_matches_timm_vit():
    """`swap(model)` leaves attention alone (opt-in for now); `include="attention"` converts every timm Attention of
    a ViT, and the swapped model computes what the original computes."""
    import copy

    import timm

    import pykernels

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    default = pykernels.swap(copy.deepcopy(model)).model
    assert not any(isinstance(m, FusedMHSA) for m in default.modules())
    swapped = pykernels.swap(copy.deepcopy(model), include="attention").model
    n_attn = sum(type(m).__name__ == "Attention" for m in model.modules())
    assert n_attn > 0 and len(swapped.pykernels_swapped) == n_attn
    assert sum(isinstance(m, FusedMHSA) for m in swapped.modules()) == n_attn
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-5, atol=1e-5)
