"""GEMM providers of the fused blocks: ``act(x @ W^T + b)`` (the 1x1 convolutions of MBConv on channels-last
activations, the MLP and attention projections of ViT / ConvNeXt blocks), ``other + x @ W^T + b`` (a GEMM with the
residual add as its epilogue), and the training GEMMs with their backward, each with the provider chosen per shape by
measurement.

Inference (no autograd), two providers compute the same thing:

* ``aten``   - ``F.linear`` (``aten::addmm``: the bias is first copied into the output, then a BLAS GEMM), then the
  activation (or the residual add) in place; on CUDA, ``torch._addmm_activation`` (cuBLASLt's bias + GELU-tanh /
  ReLU epilogue) where it computes the call;
* ``onednn`` - ``torch.ops.mkldnn._linear_pointwise`` with the bias and the activation (GELU erf / tanh, ReLU, SiLU,
  ...) or the residual add (``.binary``, "add") fused as oneDNN post-ops, on weights reordered once into oneDNN's
  blocked layout (re-packed whenever the caller's weights change: :func:`derived`).

Training (:func:`train_provider`): ``aten`` (addmm / mm: the BLAS library torch was built with) or ``conv`` (oneDNN's
1x1 convolution of a channels-last view of the rows, forward and ``convolution_backward``), timed forward + backward.

Which one is faster depends on the CPU, the thread count and the shape; so the first call of each (M, K, N,
activation, dtype, threads) times the candidates a few times and keeps the fastest for the process (never a choice
by CPU vendor name: no machine gets slower than ``aten``). A provider that cannot run a call (oneDNN without bfloat16
support, a CUDA tensor) is not chosen. :func:`choices` lists the decisions (``python -m pykernels info`` prints them).
"""

from __future__ import annotations

import threading
import time
import weakref

import torch
import torch.nn.functional as F

__all__ = [
    "choices",
    "derived",
    "linear_act",
    "linear_add",
    "linear_add_cpu",
    "linear_act_cpu",
    "prepack",
    "release_workspaces",
    "scaled_linear_act",
    "train_linear",
    "train_linear_backward",
    "train_provider",
    "workspace",
]

PROVIDERS = ("aten", "onednn")
# act -> (oneDNN post-op, its scalars, its algorithm): the names torch/_inductor's mkldnn fusion passes use
_ONEDNN_ACT = {
    "none": ("none", [], ""),
    "relu": ("relu", [], ""),
    "relu6": ("hardtanh", [0.0, 6.0], ""),
    "silu": ("swish", [], ""),
    "hardswish": ("hardswish", [], ""),
    "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
}
ACTS = tuple(_ONEDNN_ACT)
_CHOICES: dict[tuple, str] = {}
_TIMING_REPEATS = 3


def _onednn_available(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def prepack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """``weight`` (N, K) reordered for oneDNN (a hint of ``rows`` = M), or None where oneDNN cannot take it."""
    if not _onednn_available(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    except RuntimeError:
        return None


def _inplace_act(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return y
    if act == "relu":
        return y.relu_()
    if act == "relu6":
        return y.clamp_(0.0, 6.0)
    if act == "silu":
        return F.silu(y, inplace=True)
    if act == "hardswish":
        return F.hardswish(y, inplace=True)
    if act in ("gelu", "gelu_tanh"):
        approximate = "none" if act == "gelu" else "tanh"
        if torch.compiler.is_compiling():
            return torch.ops.aten.gelu_(y, approximate=approximate)
        return torch._C._nn.gelu_(y, approximate=approximate)  # the Python binding: no torch.ops call overhead
    raise ValueError(f"unknown activation {act!r}")


def _aten(x, weight, bias, act, packed, out=None):
    if out is None:
        return _inplace_act(F.linear(x, weight, bias), act)
    if bias is None:
        return _inplace_act(torch.mm(x, weight.t(), out=out), act)
    return _inplace_act(torch.addmm(bias, x, weight.t(), out=out), act)


def _onednn(x, weight, bias, act, packed, out=None):  # (out: oneDNN's op has no out= form)
    name, scalars, algorithm = _ONEDNN_ACT[act]
    return torch.ops.mkldnn._linear_pointwise(x, weight if packed is None else packed, bias, name, scalars, algorithm)


_RUN = {"aten": _aten, "onednn": _onednn}


def _cublaslt_epilogue(x: torch.Tensor, bias: torch.Tensor | None, act: str) -> bool:
    """Whether ``torch._addmm_activation`` (cuBLASLt's bias + GELU-tanh / ReLU epilogue) computes this call."""
    return (
        x.device.type == "cuda"
        and not torch.compiler.is_compiling()
        and bias is not None
        and act in ("gelu_tanh", "relu")
        and x.dim() == 2
    )


def _time(fn) -> float:
    times = []
    for _ in range(_TIMING_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


_PICK_MIN_SECONDS = 2e-3  # time each candidate for at least this long in total (tiny GEMMs: many rounds)
_PICK_MAX_ROUNDS = 25
_PICK_MARGIN = 0.95  # another provider replaces the baseline only when at least 5% faster (timing noise)


def _pick(key: tuple, runs: dict) -> str:
    """Time the candidates (name -> zero-argument callable; the first is the baseline, aten), keep the fastest for
    ``key``. Rounds alternate between the candidates (a load change on a shared machine hits each alike): at least
    :data:`_TIMING_REPEATS` rounds, more - up to :data:`_PICK_MAX_ROUNDS` - until each candidate has run for
    :data:`_PICK_MIN_SECONDS`; each candidate's median counts, and another candidate replaces the baseline only when
    it is :data:`_PICK_MARGIN` faster (a wrong pick from timing noise costs at most that much). A candidate that raises
    RuntimeError (oneDNN without bfloat16 support on this CPU, ...) is out."""
    baseline = next(iter(runs))
    live = {}
    for name, run in runs.items():
        try:
            run()  # warm-up (oneDNN creates its primitive here)
        except RuntimeError:
            continue
        live[name] = run
    if len(live) <= 1:
        best = next(iter(live), baseline)
        _CHOICES[key] = best
        return best
    times: dict[str, list[float]] = {name: [] for name in live}
    for round_ in range(_PICK_MAX_ROUNDS):
        for name, run in live.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        if round_ + 1 >= _TIMING_REPEATS and all(sum(t) >= _PICK_MIN_SECONDS for t in times.values()):
            break
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    best = min(medians, key=medians.get)
    if baseline in medians and medians[best] > _PICK_MARGIN * medians[baseline]:
        best = baseline
    _CHOICES[key] = best
    return best


def _choose(key: tuple, x, weight, bias, act, packed, out=None) -> str:
    runs = {"aten": lambda: _aten(x, weight, bias, act, packed, out)}
    if _onednn_available(x):
        runs["onednn"] = lambda: _onednn(x, weight, bias, act, packed)
    return _pick(key, runs)


def linear_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(x @ weight^T + bias)`` for a 2-D contiguous ``x`` (M, K) on the faster provider for its shape (inference
    only: no autograd). ``packed``: :func:`prepack` of ``weight`` (the oneDNN provider reorders it otherwise)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        if _cublaslt_epilogue(x, bias, act):
            # cuBLASLt's GELU (tanh form) / ReLU epilogue: the activation inside the GEMM
            return torch._addmm_activation(bias, x, weight.t(), use_gelu=act == "gelu_tanh")
        return _aten(x, weight, bias, act, packed)
    return linear_act_cpu(x, weight, bias, act, packed)


def linear_act_cpu(x, weight, bias, act, packed=None, out=None) -> torch.Tensor:
    """:func:`linear_act` for a caller that has checked: CPU tensors, not under torch.compile. ``out``: an (M, N)
    buffer the ``aten`` provider writes into (a :func:`workspace`; oneDNN allocates its own output); the choice is
    timed with it."""
    key = (x.shape[0], x.shape[1], weight.shape[0], act, x.dtype, "cpu", torch.get_num_threads())
    if out is not None:
        key += ("workspace",)
    provider = _CHOICES.get(key) or _choose(key, x, weight, bias, act, packed, out)
    return _RUN[provider](x, weight, bias, act, packed, out)


# ---- per-thread scratch buffers for temporaries ---------------------------------------------------------------------
#
# A tensor above glibc's mmap threshold (32 MiB at most) is mapped fresh by every allocation and its pages are
# faulted in on first touch: on the 2-core reference machine 14 ms for the 38 MiB hidden tensor of a ConvNeXt-T
# stage-1 MLP at batch 8 - half the cost of the GEMM that fills it. Temporaries that never leave an op (the MLP's
# hidden activation in inference, act(h) and the hidden gradient in training) go to a per-thread buffer instead.

_WORKSPACE_MIN_BYTES = 1 << 20
_WORKSPACES = threading.local()


def workspace(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """A contiguous scratch tensor of ``shape`` and ``like``'s dtype, reused by the calling thread (grown when too
    small); None off CPU, under torch.compile and for small sizes (the allocator serves those well). The caller must
    be done with it before the next call that asks for a workspace in this thread. :func:`release_workspaces` frees
    the buffers."""
    if not like.is_cpu or torch.compiler.is_compiling():
        return None
    numel = 1
    for size in shape:
        numel *= size
    if numel * like.element_size() < _WORKSPACE_MIN_BYTES:
        return None
    buffers = getattr(_WORKSPACES, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACES.buffers = {}
    buffer = buffers.get(like.dtype)
    if buffer is None or buffer.numel() < numel:
        buffers[like.dtype] = None  # free the old one first
        buffer = buffers[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return buffer[:numel].view(shape)


def release_workspaces() -> None:
    """Free the calling thread's scratch buffers (:func:`workspace`)."""
    _WORKSPACES.buffers = {}


def choices() -> dict[tuple, str]:
    """The provider chosen for each (M, K, N, activation, dtype, device, threads) seen so far in this process."""
    return dict(_CHOICES)


# ---- act((z * s[b, k]) @ W^T + b): a per-sample input scale (the SE gate before MBConv's projection) -----------------


def _scale_then_gemm(z, s, weight, bias, act, packed, other=None):
    z.mul_(s[:, None, :])  # one pass over z (the caller's temporary)
    flat = z.view(-1, z.shape[2])
    if other is None:
        y = linear_act(flat, weight, bias, act, packed)
    else:
        y = linear_add(flat, weight, bias, other.reshape(flat.shape[0], other.shape[-1]), packed)
    return y.view(z.shape[0], z.shape[1], y.shape[-1])


def _per_sample_weights(z, s, weight, bias, act, packed, other=None):
    # W diag(s_b) per sample: no pass over z, B GEMMs in one baddbmm
    scaled = weight[None, :, :] * s[:, None, :]  # (B, N, K)
    if other is not None:  # the residual as baddbmm's addend, then the bias in place
        out = torch.baddbmm(other, z, scaled.transpose(1, 2))
        return out if bias is None else out.add_(bias)
    out = (
        torch.baddbmm(bias[None, None, :], z, scaled.transpose(1, 2))
        if bias is not None
        else torch.bmm(z, scaled.transpose(1, 2))
    )
    return _inplace_act(out, act)


_SCALED = {"scale-then-gemm": _scale_then_gemm, "per-sample-weights": _per_sample_weights}


def scaled_linear_act(
    z: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    packed: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act((z * s[:, None, :]) @ weight^T + bias)`` for ``z`` (B, M, K) contiguous (inference only; ``z`` may be
    overwritten), ``s`` (B, K): either one pass scaling z then one GEMM, or W diag(s_b) per sample in one batched
    GEMM - whichever was faster for this shape (measured at its first call, as :func:`linear_act`). With ``other``
    (B, M, N) contiguous and ``act == "none"``: ``other + (z * s) @ weight^T + bias``, the residual add in the GEMM's
    epilogue (MBConv's skip connection)."""
    if other is not None and act != "none":
        raise ValueError(f"scaled_linear_act: a residual 'other' needs act='none', got {act!r}")
    if z.device.type != "cpu" or torch.compiler.is_compiling():
        return _per_sample_weights(z, s, weight, bias, act, packed, other)
    key = ("scaled", *z.shape, weight.shape[0], act, other is not None, z.dtype, torch.get_num_threads())
    provider = _CHOICES.get(key)
    if provider is None:
        timings = {}
        for name, run in _SCALED.items():
            trial = z.clone()
            run(trial, s, weight, bias, act, packed, other)  # warm-up (and the inner GEMM's own provider choice)
            timings[name] = _time(lambda run=run: run(z.clone(), s, weight, bias, act, packed, other))
        provider = _CHOICES[key] = min(timings, key=timings.get)
    return _SCALED[provider](z, s, weight, bias, act, packed, other)


# ---- other + x W^T + b: a GEMM with the residual add as its epilogue -------------------------------------------------


def _aten_add(x, weight, bias, other, packed):
    return F.linear(x, weight, bias).add_(other)


def _onednn_add(x, weight, bias, other, packed):
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight if packed is None else packed, bias, "add")


_RUN_ADD = {"aten": _aten_add, "onednn": _onednn_add}


def linear_add(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    other: torch.Tensor,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``other + x @ weight^T + bias`` for 2-D contiguous ``x`` (M, K) and ``other`` (M, N), on the faster provider for
    its shape (measured at its first call, as :func:`linear_act`; inference only): ``aten`` (``F.linear`` then an
    in-place add) or ``onednn`` (one ``_linear_pointwise.binary`` call, the add as a post-op, on packed weights)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return _aten_add(x, weight, bias, other, packed)
    return linear_add_cpu(x, weight, bias, other, packed)


def linear_add_cpu(x, weight, bias, other, packed=None) -> torch.Tensor:
    """:func:`linear_add` for a caller that has checked: CPU tensors, not under torch.compile."""
    key = ("add", x.shape[0], x.shape[1], weight.shape[0], x.dtype, "cpu", torch.get_num_threads())
    provider = _CHOICES.get(key)
    if provider is None:
        runs = {"aten": lambda: _aten_add(x, weight, bias, other, packed)}
        if _onednn_available(x) and other.dtype == x.dtype:
            runs["onednn"] = lambda: _onednn_add(x, weight, bias, other, packed)
        provider = _pick(key, runs)
    return _RUN_ADD[provider](x, weight, bias, other, packed)


# ---- training: y = x W^T + b and its backward, on BLAS (aten) or on oneDNN's 1x1 convolution ------------------------
#
# ATen's CPU mm goes to the BLAS library torch was built with (MKL: on some CPUs not its fastest code path), while a
# 1x1 convolution of a channels-last (1, K, M, 1) view of the same (M, K) rows goes to oneDNN, forward and backward
# (grad input, grad weight and grad bias in one call). Both compute the same products; which one is faster is
# measured once per (M, K, N, dtype, threads), forward + backward together.


def _rows_as_image(t: torch.Tensor) -> torch.Tensor:
    """(M, K) contiguous rows as a (1, K, M, 1) channels-last image (a view)."""
    return t.view(1, t.shape[0], 1, t.shape[1]).permute(0, 3, 1, 2)


def _aten_train_fwd(x, weight, bias):
    return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())


def _aten_train_bwd(grad, x, weight, need_input, need_weight, need_bias):
    return (
        grad.mm(weight) if need_input else None,
        grad.t().mm(x) if need_weight else None,
        grad.sum(0) if need_bias else None,
    )


def _conv_grad_input(grad, weight):
    """grad @ weight (M, K) as the 1x1 convolution of the grad rows with weight^T."""
    n, k = weight.shape
    y = F.conv2d(_rows_as_image(grad), weight.t().contiguous().view(k, n, 1, 1))
    return y.permute(0, 2, 3, 1).reshape(grad.shape[0], k)


def _conv_train_fwd(x, weight, bias):
    y = F.conv2d(_rows_as_image(x), weight.view(*weight.shape, 1, 1), bias)
    return y.permute(0, 2, 3, 1).reshape(x.shape[0], weight.shape[0])  # a view when oneDNN kept channels-last


def _conv_train_bwd(grad, x, weight, need_input, need_weight, need_bias):
    n, k = weight.shape
    if x is None:  # only grad_input (the caller has no x yet)
        return _conv_grad_input(grad, weight), None, (grad.sum(0) if need_bias else None)
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        _rows_as_image(grad),
        _rows_as_image(x),
        weight.view(n, k, 1, 1),
        [n] if need_bias else None,
        [1, 1],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        1,
        [need_input, need_weight, need_bias],
    )
    return (
        grad_input.permute(0, 2, 3, 1).reshape(x.shape[0], k) if need_input else None,
        grad_weight.view(n, k) if need_weight else None,
        grad_bias if need_bias else None,
    )


TRAIN_PROVIDERS = ("aten", "conv")
_TRAIN_RUN = {"aten": (_aten_train_fwd, _aten_train_bwd), "conv": (_conv_train_fwd, _conv_train_bwd)}


def train_provider(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The provider of ``x @ weight^T + bias`` (x (M, K) contiguous, weight (N, K)) for a training step: ``aten`` or
    ``conv``, the faster at forward + backward for this shape (timed at its first call on throwaway tensors of the
    shape; ``aten`` off CPU, under ``torch.compile``, and wherever oneDNN is missing)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not torch.backends.mkldnn.is_available():
        return "aten"
    m, k = x.shape
    n = weight.shape[0]
    key = ("train", m, k, n, bias is not None, x.dtype, x.device.type, torch.get_num_threads())
    provider = _CHOICES.get(key)
    if provider is None:
        with torch.no_grad():
            xs, ws = x.detach(), weight.detach()
            bs = None if bias is None else bias.detach()
            grad = torch.ones(m, n, dtype=x.dtype, device=x.device)

            def step(name):
                fwd, bwd = _TRAIN_RUN[name]
                return lambda: (fwd(xs, ws, bs), bwd(grad, xs, ws, True, True, bs is not None))

            provider = _pick(key, {name: step(name) for name in TRAIN_PROVIDERS})
    return provider


def train_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, provider: str) -> torch.Tensor:
    """``x @ weight^T + bias`` (M, N) on ``provider`` (no autograd: the caller's autograd.Function owns it)."""
    return _TRAIN_RUN[provider][0](x, weight, bias)


def train_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    provider: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad @ weight, grad^T @ x, grad.sum(0)) - those asked for, None for the others - on ``provider``. ``x`` may
    be None when ``need_weight`` is False."""
    if not (need_input or need_weight or need_bias):
        return None, None, None
    return _TRAIN_RUN[provider][1](grad.contiguous(), x, weight, need_input, need_weight, need_bias)


# ---- derived weights (packed, folded), rebuilt whenever a tensor they come from changes ------------------------------

_DERIVED: dict[tuple, tuple] = {}


def _stamps(tensors: tuple) -> tuple:
    # data_ptr: another storage (.to(), .data = ..., load_state_dict(assign=True)); _version: in-place updates;
    # dtype: a reinterpretation of the same storage. Raises RuntimeError for inference tensors (no version counter).
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in tensors)


def derived(tag: str, tensors: tuple, build):
    """``build()`` - something computed from ``tensors`` (packed or folded weights; it must not hold a reference to
    them) - cached per process until one of the tensors changes: another tensor object, another storage or dtype, or
    an in-place update (an optimizer step, ``load_state_dict``, ``copy_``: the version counter moves). An entry goes
    when a tensor it reads is freed. Inference tensors (no version counter) and ``torch.compile`` get ``build()``
    every call."""
    if torch.compiler.is_compiling():
        return build()
    try:
        stamp = _stamps(tensors)
    except RuntimeError:  # an inference tensor
        return build()
    key = (tag, *map(id, tensors))
    entry = _DERIVED.get(key)
    if entry is not None and entry[0] == stamp:
        refs = entry[1]
        if all(t is None or ref() is t for ref, t in zip(refs, tensors)):
            return entry[2]
    value = build()
    refs = tuple(None if t is None else weakref.ref(t, lambda _, key=key: _DERIVED.pop(key, None)) for t in tensors)
    _DERIVED[key] = (stamp, refs, value)
    return value
