"""The fused MLP of ViT / ConvNeXt blocks: ``shortcut + drop_path(gamma * fc2(act(fc1(x))))`` over the last dim, as
one autograd node whose GEMMs run on the faster provider of :mod:`pykernels.gemm` for each shape.

Three paths, chosen per call:

* **inference** (no tensor needs a gradient, or grad mode off; CPU or CUDA): fc1 + bias + activation is one GEMM
  call, fc2 + bias (+ the residual) another - oneDNN's ``_linear_pointwise`` with the bias, the activation and the
  residual add as post-ops on weights packed once, or ``F.linear`` + in-place epilogues (``aten``), whichever was
  faster for the shape when first timed (:func:`pykernels.gemm.linear_act` / :func:`~pykernels.gemm.linear_add`; on
  CUDA ``torch._addmm_activation``'s cuBLASLt epilogue for tanh-GELU / ReLU). The layer-scale is folded into fc2
  (``gamma * (a W2^T + b2) = a (diag(gamma) W2)^T + gamma * b2``). Packed and folded weights are cached
  (:func:`pykernels.gemm.derived`) and rebuilt whenever a weight changes: another tensor, another storage or dtype,
  or an in-place update (the version counter moves: optimizer steps, ``load_state_dict``).
* **training** (:class:`_MlpFunction`): forward saves ``x`` and the fc1 pre-activation ``h`` - once - and the
  (B,) DropPath scale; backward recomputes ``act(h)``. Eager PyTorch keeps the 4C-wide hidden tensor twice (the
  activation's input and fc2's input) plus fc2's output for the layer-scale's gradient; here the gamma gradient comes
  from fc2's weight gradient instead: ``dL/dgamma_n = sum_k G_nk W2_nk + b2_n sum_m g_mn`` with ``G = g^T act(h)``,
  the product backward computes anyway. With a pre-norm (``norm``: a ViT block's ``norm2``, taken in by
  :class:`pykernels.FusedMlp` when swapped into a known block) x is the LayerNorm's input: the normalised copy is not
  kept (eager keeps both, the LayerNorm's input and fc1's) but recomputed in backward. Each GEMM (forward + its
  backward) runs on BLAS (``aten``) or on oneDNN's 1x1 convolution of a channels-last view (``conv``), chosen per
  shape by timing (:func:`pykernels.gemm.train_provider`).
* **reference** (:func:`pykernels.reference.mlp`: plain ATen ops): under ``torch.compile`` (inductor fuses the
  epilogue and its partitioner decides what to save and recompute), under autocast, and when the tensors do not
  share one dtype and device.

Why an ``autograd.Function`` over ATen calls and not a ``torch.library`` custom op: there is no kernel of ours
here - every step is an ATen or oneDNN op that already has a meta kernel, so a custom op would add only the
dispatcher's per-call overhead and hide the GEMMs from inductor (which, under ``torch.compile``, does this fusion
itself - bias + GELU into the GEMM with freezing - and picks its own GEMM backends). The custom-op route would buy
``opcheck`` and an opaque node, neither of which helps a composition of ATen ops. So eager calls take the fused
paths, compiled graphs see plain ATen ops (no graph break, ``fullgraph=True`` works), and the DropPath scale is drawn
from torch's generator before any of it (:func:`pykernels.functional.mlp`), so both see the same mask.
"""

from __future__ import annotations

import torch

from pykernels import gemm
from pykernels._dtypes import dtype_name
from pykernels.reference import mlp as reference_mlp
from pykernels.reference.mlp import ACTS, activation, activation_backward, activation_out

__all__ = ["ACTS", "act_reasons", "check_args", "linear", "mlp"]

# ---- argument rules ------------------------------------------------------------------------------------------------


def act_reasons(act: str) -> list[str]:
    """Why the fused MLP cannot apply ``act`` (empty: it can)."""
    if act in ACTS:
        return []
    return [f"activation {act!r} not supported: the fused MLP takes {', '.join(ACTS)} (gelu = erf form)"]


def _as_matrix(name: str, w: torch.Tensor) -> tuple[int, int]:
    """(out, in) of a Linear weight (out, in) or a 1x1 conv weight (out, in, 1, 1)."""
    if w.dim() == 2 or (w.dim() == 4 and tuple(w.shape[2:]) == (1, 1)):
        return w.shape[0], w.shape[1]
    raise ValueError(
        f"{name} must be a Linear weight (out, in) or a 1x1 conv weight (out, in, 1, 1), got {list(w.shape)}"
    )


def _tensor_reasons(name: str, t, shape, device) -> str | None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return f"{name} must be a floating-point torch.Tensor or None, got {type(t).__name__}"
    if t.shape != shape:
        return f"{name} must have shape {list(shape)}, got {list(t.shape)}"
    if t.device != device:
        return f"{name} is on {t.device} but x is on {device}; put them on one device"
    return None


def check_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, shortcut, norm=None) -> None:
    """Raise TypeError / ValueError, saying what is supported, unless the arguments are an MLP call mlp computes."""
    for name, t in (("x", x), ("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {dtype_name(t.dtype)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (features last)")
    hidden, in_features = _as_matrix("fc1_weight", fc1_weight)
    out_features, hidden2 = _as_matrix("fc2_weight", fc2_weight)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features (last dim) but fc1_weight takes {in_features}")
    if hidden2 != hidden:
        raise ValueError(f"fc1 gives {hidden} features but fc2_weight takes {hidden2}")
    device = x.device
    for name, t in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; put them on one device")
    if norm is not None:
        ln_weight, ln_bias, ln_eps = norm
        if not float(ln_eps) >= 0.0:
            raise ValueError(f"ln_eps must be >= 0, got {ln_eps}")
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            why = None if t is None else _tensor_reasons(name, t, (in_features,), device)
            if why:
                raise (TypeError if why.endswith("got " + type(t).__name__) else ValueError)(why)
    for name, t, shape in (
        ("fc1_bias", fc1_bias, (hidden,)),
        ("fc2_bias", fc2_bias, (out_features,)),
        ("gamma", gamma, (out_features,)),
        ("shortcut", shortcut, None),
    ):
        if t is None:
            continue
        why = _tensor_reasons(name, t, (*x.shape[:-1], out_features) if shape is None else shape, device)
        if why:
            raise (TypeError if why.endswith("got " + type(t).__name__) else ValueError)(why)
    if act not in ACTS:
        raise ValueError(act_reasons(act)[0])


# ---- dispatch ------------------------------------------------------------------------------------------------------


def _fused_ok(x: torch.Tensor, tensors) -> bool:
    """The fused paths take one dtype and device for every tensor, no autocast, no tracing by torch.compile."""
    if torch.compiler.is_compiling():
        return False
    if x.is_cpu:
        device_type = "cpu"
    elif x.is_cuda:
        device_type = "cuda"
    else:
        return False
    if torch.is_autocast_enabled(device_type):
        return False
    dtype, device = x.dtype, x.device
    for t in tensors:
        if t is not None and (t.dtype != dtype or t.device != device):
            return False
    return True


def _needs_grad(tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    act: str,
    gamma: torch.Tensor | None,
    shortcut: torch.Tensor | None,
    scale: torch.Tensor | None,
    norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
) -> torch.Tensor:
    """``shortcut + scale[b] * (gamma * fc2(act(fc1(LayerNorm(x)))))`` (arguments as checked by :func:`check_args`;
    ``scale`` the (B,) DropPath multipliers or None; ``norm`` (weight, bias, eps) of the LayerNorm or None) on the
    inference, training or reference path (see the module docstring). Returns ``(..., N)``, contiguous, x's dtype."""
    ln_weight, ln_bias, ln_eps = norm if norm is not None else (None, None, 0.0)
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, shortcut, ln_weight, ln_bias, scale)
    if not _fused_ok(x, tensors):
        return reference_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, shortcut, scale, norm)
    in_features = x.shape[-1]
    out_features = fc2_weight.shape[0]
    rows = x.reshape(-1, in_features)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    short = None
    if shortcut is not None:
        short = shortcut.reshape(-1, out_features)
        if not short.is_contiguous():
            short = short.contiguous()
    if scale is not None:
        scale = scale.reshape(-1)
    if _needs_grad(tensors):
        out = _MlpFunction.apply(
            rows,
            fc1_weight if fc1_weight.dim() == 2 else fc1_weight.flatten(1),
            fc1_bias,
            fc2_weight if fc2_weight.dim() == 2 else fc2_weight.flatten(1),
            fc2_bias,
            gamma,
            short,
            scale,
            act,
            norm is not None,
            ln_weight,
            ln_bias,
            float(ln_eps),
        )
    else:
        if norm is not None:
            rows = torch.nn.functional.layer_norm(rows, (in_features,), ln_weight, ln_bias, ln_eps)
        out = _inference(rows, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, short, scale)
    if x.dim() == 2:
        return out
    return out.view(*x.shape[:-1], out_features)


def _epilogue_(y: torch.Tensor, shortcut: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    """``shortcut + scale[b] * y`` for y (M, N), a temporary of ours (written in place where that saves a pass)."""
    if scale is None:
        return y if shortcut is None else y.add_(shortcut)
    batch = scale.shape[0]
    per_sample = scale.view(batch, 1, 1)
    y3 = y.view(batch, y.shape[0] // batch if batch else 0, y.shape[1])  # (no -1: B = 0 must work too)
    if shortcut is None:
        return y3.mul_(per_sample).view_as(y)
    return torch.addcmul(shortcut.view_as(y3), y3, per_sample).view_as(y)


# ---- inference: packed weights, GEMMs with epilogues -------------------------------------------------------------


def _pack(weight: torch.Tensor, rows: int):
    return gemm.prepack(weight.detach(), rows) if weight.device.type == "cpu" else None


def _prepared(w1, w2, b2, gamma, rows: int):
    """(fc1's packed weight, fc2's weight and bias with gamma folded in - None without gamma -, fc2's packed weight),
    cached until one of the weights changes (never a reference to the weights themselves: the cache entry goes with
    them)."""

    def build():
        with torch.no_grad():
            w2g = b2g = None
            if gamma is not None:  # gamma * (a W2^T + b2) = a (diag(gamma) W2)^T + gamma * b2
                w2g = (w2.flatten(1) * gamma[:, None]).contiguous()
                b2g = None if b2 is None else b2 * gamma
            packed2 = _pack(w2.flatten(1) if w2g is None else w2g, rows)
            return _pack(w1.flatten(1), rows), w2g, b2g, packed2

    return gemm.derived("mlp", (w1, w2, b2, gamma), build)


def _inference(x, w1, b1, w2, b2, act, gamma, shortcut, scale):
    packed1, w2g, b2g, packed2 = _prepared(w1, w2, b2, gamma, x.shape[0])
    w1m = w1 if w1.dim() == 2 else w1.flatten(1)
    w2m, b2m = (w2 if w2.dim() == 2 else w2.flatten(1), b2) if gamma is None else (w2g, b2g)
    if x.is_cpu:  # (not under torch.compile: the caller checked)
        # the hidden activation never leaves this function: a per-thread buffer (no fresh pages to fault in)
        ws = gemm.workspace((x.shape[0], w1m.shape[0]), x)
        hidden = gemm.linear_act_cpu(x, w1m, b1, act, packed1, ws)
        if shortcut is not None and scale is None:
            return gemm.linear_add_cpu(hidden, w2m, b2m, shortcut, packed2)
        return _epilogue_(gemm.linear_act_cpu(hidden, w2m, b2m, "none", packed2), shortcut, scale)
    hidden = gemm.linear_act(x, w1m, b1, act, packed1)
    if shortcut is not None and scale is None:
        return gemm.linear_add(hidden, w2m, b2m, shortcut, packed2)
    return _epilogue_(gemm.linear_act(hidden, w2m, b2m, "none", packed2), shortcut, scale)


# below this many multiply-adds (a 64 x 64 x 64 GEMM: microseconds) a linear goes straight to ATen: the provider cannot
# matter there, and the provider / packed-weight bookkeeping in Python would be most of the call (FusedMHSA on
# (1, 4, 64) tokens, per call: 1.6x timm's Attention without this shortcut, 1.3x with it)
TINY_GEMM_MACS = 1 << 18


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` over the last dim: on the faster GEMM provider with cached packed weights
    when nothing needs a gradient (CPU / CUDA, one dtype, outside torch.compile and autocast), else plain ATen.
    ``weight`` must be the caller's parameter itself (the packed copy is cached under it)."""
    tensors = (x, weight, bias)
    if x.numel() * weight.shape[0] < TINY_GEMM_MACS or not _fused_ok(x, tensors) or _needs_grad(tensors):
        return activation(torch.nn.functional.linear(x, weight, bias), act)
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    packed = gemm.derived("linear", (weight,), lambda: _pack(weight, rows.shape[0]))
    return gemm.linear_act(rows, weight, bias, act, packed).view(*x.shape[:-1], weight.shape[0])


# ---- training: one autograd node, the pre-activation saved once -------------------------------------------------


class _MlpFunction(torch.autograd.Function):
    """``shortcut + scale[b] * (gamma * fc2(act(fc1(LN(x)))))`` on (M, K) rows; saves x, h = fc1(LN(x)), the weights,
    the (B,) scale and the LayerNorm's (M, 1) statistics; backward recomputes LN(x) and act(h)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, gamma, shortcut, scale, act, has_norm, ln_weight, ln_bias, ln_eps):
        mean = rstd = None
        xn = x
        if has_norm:
            xn, mean, rstd = torch.native_layer_norm(x, [x.shape[1]], ln_weight, ln_bias, ln_eps)
        provider1 = gemm.train_provider(xn, w1, b1)
        h = gemm.train_linear(xn, w1, b1, provider1)
        del xn
        # act(h) only feeds fc2 here: a per-thread buffer (gemm.workspace) rather than fresh pages
        a = activation_out(h, act, gemm.workspace(h.shape, h)) if act != "none" else h
        w2s, b2s = w2, b2
        if gamma is not None:  # gamma * (a W2^T + b2) = a (diag(gamma) W2)^T + gamma * b2
            w2s = w2 * gamma[:, None]
            b2s = None if b2 is None else b2 * gamma
        provider2 = gemm.train_provider(a, w2s, b2s)
        y = gemm.train_linear(a, w2s, b2s, provider2)
        del a
        out = _epilogue_(y, shortcut, scale)
        ctx.save_for_backward(x, h, w1, w2, b2, gamma, scale, mean, rstd, ln_weight, ln_bias)
        ctx.has_norm = has_norm
        ctx.ln_eps = ln_eps
        ctx.act = act
        ctx.providers = (provider1, provider2)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, h, w1, w2, b2, gamma, scale, mean, rstd, ln_weight, ln_bias = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, need_gamma, need_shortcut = ctx.needs_input_grad[:7]
        need_ln_weight, need_ln_bias = ctx.needs_input_grad[10:12]
        need_x = need_x or need_ln_weight or need_ln_bias  # the LayerNorm's gradients come with x's
        provider1, provider2 = ctx.providers
        grad_out = grad_out.contiguous()
        grad_shortcut = grad_out if need_shortcut else None
        # g = dL/dy, y = a (diag(gamma) W2)^T + gamma * b2 (the DropPath scale applied, gamma folded in the weight)
        g = grad_out
        if scale is not None:
            batch = scale.shape[0]
            per = grad_out.shape[0] // batch if batch else 0
            g = (grad_out.view(batch, per, grad_out.shape[1]) * scale.view(-1, 1, 1)).view_as(grad_out)
        need_hidden = need_x or need_w1 or need_b1
        need_gw = need_w2 or need_gamma
        need_gb = need_b2 or (need_gamma and b2 is not None)
        grad_w2 = grad_b2 = grad_gamma = grad_x = grad_w1 = grad_b1 = grad_ln_weight = grad_ln_bias = None
        w2s = w2 if gamma is None else w2 * gamma[:, None]
        free = None  # an (M, H) buffer no longer needed: act(h) is recomputed into it (no new allocation)
        if need_hidden:
            # fc1's side first: grad_a = g W2s, grad_h = grad_a * act'(h) (in place), then fc1's gradients
            ws = gemm.workspace((g.shape[0], w2s.shape[1]), g) if provider2 == "aten" else None
            if ws is not None:  # the (M, H) gradient in the per-thread buffer
                grad_a = torch.mm(g, w2s, out=ws)
            else:
                grad_a = gemm.train_linear_backward(g, None, w2s, True, False, False, provider2)[0]
            grad_h = activation_backward(grad_a, h, ctx.act)
            xn = x
            if ctx.has_norm:  # recomputed: the same kernel on the same input gives the forward's values
                xn = torch.native_layer_norm(x, [x.shape[1]], ln_weight, ln_bias, ctx.ln_eps)[0]
            grad_x, grad_w1, grad_b1 = gemm.train_linear_backward(grad_h, xn, w1, need_x, need_w1, need_b1, provider1)
            del xn
            if ctx.has_norm and grad_x is not None:
                grad_x, grad_ln_weight, grad_ln_bias = torch.ops.aten.native_layer_norm_backward(
                    grad_x,
                    x,
                    [x.shape[1]],
                    mean,
                    rstd,
                    ln_weight,
                    ln_bias,
                    [ctx.needs_input_grad[0], need_ln_weight, need_ln_bias],
                )
            free = grad_h if grad_h.is_contiguous() and grad_h is not h else None
            del grad_a, grad_h
        if need_gw or need_gb:
            # fc2's weight / bias (and gamma's) gradients: G = g^T act(h), sum_m g
            a = activation_out(h, ctx.act, free) if need_gw else None
            _, gw, gb = gemm.train_linear_backward(g, a, w2s, False, need_gw, need_gb, provider2)
            del a
            if gamma is None:
                grad_w2, grad_b2 = gw, gb
            else:
                if need_w2:
                    grad_w2 = gw * gamma[:, None]
                if need_b2:
                    grad_b2 = gb * gamma
                if need_gamma:
                    grad_gamma = (gw * w2).sum(1)
                    if b2 is not None:
                        grad_gamma += gb * b2
        return (
            grad_x,
            grad_w1,
            grad_b1,
            grad_w2,
            grad_b2,
            grad_gamma,
            grad_shortcut,
            None,
            None,
            None,
            grad_ln_weight,
            grad_ln_bias,
            None,
        )
