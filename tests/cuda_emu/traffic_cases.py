"""Global-memory traffic of the CUDA kernels (csrc/cuda/*.cu, unmodified) at the benchmark shapes, counted by the
emulator's traffic variant (traffic.cpp: every load / store / atomic of every launch, on the tensors' memory).

Runs inside the traffic variant's child process (emu.py: ``EmuProcess(emu.TRAFFIC)``); ``measure(case, batch)``
returns one row of bench/results/gpu-traffic-cuda.json (traffic_report.combine adds "at_bench_batch"):

    {"backend": "cuda", "op", "direction", "case", "bench_shape", "measured_shape", "scale_note", "dtype",
     "launches": [{"kernel", "bytes_read", "bytes_written", "distinct_read", "distinct_written", "distinct_atomic",
                   "sectors", "atomics", "tensors": {buffer: the same figures for that buffer, its "size", "seq"}}],
     "bytes_read", "bytes_written", "atomics", "distinct_bytes", "min_bytes", "ratio_requested", "ratio_distinct",
     "flops", "min_source", "min_terms", "min_bytes_bench", "flops_bench"}

Buffers are named after the call's tensors (x, grad_out, out, ...); the launchers' own allocations are
"workspace<i>" (the call's i-th allocation) or "float32 copy of <parameter>" (never written, 4 bytes per element of a
parameter of another dtype). All figures of a row are at measured_shape (the counted batch).

Definitions (per launch, summed over the launches of the op call):
  bytes_read / bytes_written  requested bytes: the sum of the sizes of the kernel's loads / stores of global memory
                              (re-reads of a halo or of a value another thread already read included: L1 / L2 hits)
  distinct_read / _written    bytes at distinct addresses read / written by the launch (what DRAM must move at least
                              once per launch); distinct_bytes = their sum (+ bytes touched by atomics) over launches
  sectors                     distinct 32-byte sectors the launch touched (DRAM granule: ``32 * sectors`` >= distinct)
  min_bytes                   tests/gpu_check/traffic_minimum.py (shared with the Triton counter): every input the
                              results depend on read once, every result written once, at the dtypes of the call
  ratio_requested             (bytes_read + bytes_written + 4 B per atomic) / min_bytes
  ratio_distinct              distinct_bytes / min_bytes: above 1 when a launch touches a workspace, or when several
                              launches read the same tensor (a recomputation, a statistics pass)
Only the csrc/cuda kernels are counted: the ATen calls the launchers make between launches (parameter casts to
float32, ``partial.sum(0)``, ``copy_`` into the parameter gradients: all of size C or G x C) are not.

Scale: the emulator runs one host thread per CUDA thread and the blocks one after another, so the benchmark batch
(32, 64 for ViT tokens) is cut to 1 (2 where batch 1 launches other kernels); channels, image sizes, kernel sizes,
strides, layouts and dtypes are the benchmark's. traffic_report.combine scales the count to the benchmark batch with a
dry run at that batch (the parameters weigh as much as the activations at batch 1 in the 7 x 7 and 14 x 14 stages).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases  # noqa: E402 - the inputs of the correctness cases (and pykernels.reference on sys.path)

try:  # the yardstick shared with the Triton counter (tests/gpu_check/traffic.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu_check"))
    import traffic_minimum
except ImportError:  # not there: the tensors of the call, each read or written once (the same rule, less exact)
    traffic_minimum = None

SO_PATH = ""  # set by emu.py's server
F16, F32 = torch.float16, torch.float32
DTYPE_NAMES = {F16: "float16", F32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}
ATOMIC_BYTES = 4
ACTIVATIONS = ("x", "grad_out", "residual", "branch")  # inputs of batch size (the others: parameters)

# ---- the cases: the benchmark shapes (bench/bench_*.py), batch scaled ----------------------------------------------


def _scale_note(bench_batch: int, batch: int) -> str:
    return (
        f"counted at batch {batch} (benchmark: {bench_batch}; at_bench_batch: the figures scaled to it by a dry run), "
        "every other dimension as benchmarked"
    )


# drop_path_add (bench/bench_drop_path.py: float32 on every device): (case, layout, bench shape, channel_dim)
DROP_PATH = (
    ("convnext_t-s1-nchw", "nchw", (32, 96, 56, 56), 1),
    ("convnext_t-s1-channels_last", "nhwc", (32, 96, 56, 56), 1),
    ("vit_s-tokens", "tokens", (64, 197, 384), 2),
)
# dwconv_ln (bench/bench_dwconv_ln.py: float16 on CUDA, k = 7, parameters in x's dtype): (case, layout, bench shape)
DWCONV = (
    ("s1", "nchw", (32, 96, 56, 56)),
    ("s1-cl", "nhwc", (32, 96, 56, 56)),
    ("s2", "nchw", (32, 192, 28, 28)),
    ("s3", "nchw", (32, 384, 14, 14)),
    ("s4", "nchw", (32, 768, 7, 7)),
)
# mbconv_se (bench/bench_mbconv_se.py: float16 on CUDA, channels-last input, expand ratio 6 -> the depthwise stage
# sees 6 * in_ch channels, SiLU, timm's symmetric padding k // 2): (case, channels, size, k, stride)
MBCONV = (
    ("16-24-s2-k3-112", 96, 112, 3, 2),
    ("40-40-k5-28", 240, 28, 5, 1),
    ("112-112-k5-14", 672, 14, 5, 1),
    ("192-320-k3-7", 1152, 7, 3, 1),
)


def _all_cases() -> dict[str, tuple]:
    """name -> (op, direction, case, args); names are "<op>/<direction>/<case>"."""
    out = {}
    for case, layout, shape, channel_dim in DROP_PATH:
        for direction in ("fwd", "bwd"):
            out[f"drop_path_add/{direction}/{case}"] = ("drop_path_add", direction, case, (layout, shape, channel_dim))
    for case, layout, shape in DWCONV:
        for direction in ("fwd", "bwd"):
            out[f"dwconv_ln/{direction}/{case}"] = ("dwconv_ln", direction, case, (layout, shape))
    for case, channels, size, k, stride in MBCONV:
        for direction in ("fwd_eval", "fwd_train", "bwd_train"):
            out[f"mbconv_se/{direction}/{case}"] = ("mbconv_se", direction, case, (channels, size, k, stride))
    return out


CASES = _all_cases()


# ---- counting ---------------------------------------------------------------------------------------------------


def _enable() -> None:
    torch.ops.pykernels_emu.traffic_enable()
    torch.ops.pykernels_emu.traffic_take()


def _base(t: torch.Tensor | None) -> int | None:
    return t.untyped_storage().data_ptr() if t is not None and t.numel() else None


def _nbytes(t: torch.Tensor | None) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def _call(dry: bool, fn):
    """(fn(), mark): runs the op call fn with the launches counted (dry: recorded, not run); mark: the allocation
    number of the call's first allocation."""
    torch.ops.pykernels_emu.traffic_take()
    mark = torch.ops.pykernels_emu.traffic_mark()
    torch.ops.pykernels_emu.traffic_dry(dry)
    try:
        return fn(), mark
    finally:
        torch.ops.pykernels_emu.traffic_dry(False)


def _launches(named: dict[str, torch.Tensor | None], mark: int) -> list[dict]:
    """The launches of the call, each allocation named after the tensor it holds, else "workspace<i>" (the call's
    i-th allocation; "seq": i, the same in a dry run of the call at another batch)."""
    names = {}
    for name, t in named.items():
        base = _base(t)
        if base is not None:
            names.setdefault(base, name)
    launches = []
    for text in torch.ops.pykernels_emu.traffic_take():
        raw = json.loads(text)
        entry = {"kernel": raw["kernel"], "atomics": raw["atomics"]}
        tensors = {}
        for r in raw["ranges"]:
            seq = r["seq"] - mark
            name = names.get(r["base"]) or f"workspace{seq}"
            tensors[name] = {k: r[k] for k in r if k != "base"} | {"seq": seq if seq >= 0 else None}
        for key in ("bytes_read", "bytes_written", "distinct_read", "distinct_written", "distinct_atomic", "sectors"):
            entry[key] = sum(t[key] for t in tensors.values())
        entry["tensors"] = tensors
        launches.append(entry)
    return launches


def _result(dry, mark, op, direction, case, bench_shape, shape, dtype, inputs, outputs, flops, spec) -> dict:
    """The row of a counted call, or what a dry run tells: the launches, the sizes of the named tensors and of every
    allocation of the call, in order (traffic_report.combine scales a row's figures by them)."""
    named = {**inputs, **outputs}
    launches = _launches(named, mark)
    if not dry:
        return _row(op, direction, case, bench_shape, shape, dtype, launches, inputs, outputs, flops, spec)
    return {
        "dry": True,
        "batch": shape[0],
        "kernels": [launch["kernel"] for launch in launches],
        "sizes": {name: t.untyped_storage().nbytes() for name, t in named.items() if t is not None and t.numel()},
        "allocations": list(torch.ops.pykernels_emu.traffic_allocations()),
        "min_bytes": sum(_nbytes(t) for t in named.values()),
    }


def _row(op, direction, case, bench_shape, measured_shape, dtype, launches, inputs, outputs, flops, spec) -> dict:
    """spec: (direction of traffic_minimum, its keyword arguments at batch 1): the minimum and flops; without
    traffic_minimum, every tensor of the call read or written once and `flops` (the minimum then extrapolated)."""
    _name_copies(launches, inputs)
    min_terms = {name: _nbytes(t) for name, t in {**inputs, **outputs}.items() if t is not None}
    min_bytes, bench_min, min_source = sum(min_terms.values()), None, "the tensors of the call, each once"
    bench_flops = None
    if traffic_minimum is not None:
        min_direction, kwargs = spec
        batch, bench_batch = measured_shape[0], bench_shape[0]
        min_bytes = traffic_minimum.minimum_bytes(op, min_direction, **_at_batch(kwargs, batch))
        bench_min = traffic_minimum.minimum_bytes(op, min_direction, **_at_batch(kwargs, bench_batch))
        flops = traffic_minimum.flops(op, min_direction, **_at_batch(kwargs, batch))
        bench_flops = traffic_minimum.flops(op, min_direction, **_at_batch(kwargs, bench_batch))
        min_source = "tests/gpu_check/traffic_minimum.py"
    bytes_read = sum(launch["bytes_read"] for launch in launches)
    bytes_written = sum(launch["bytes_written"] for launch in launches)
    atomics = sum(launch["atomics"] for launch in launches)
    distinct = sum(
        launch["distinct_read"] + launch["distinct_written"] + launch["distinct_atomic"] for launch in launches
    )
    return {
        "backend": "cuda",
        "op": op,
        "direction": direction,
        "case": case,
        "bench_shape": list(bench_shape),
        "measured_shape": list(measured_shape),
        "scale_note": _scale_note(bench_shape[0], measured_shape[0]),
        "dtype": DTYPE_NAMES[dtype],
        "launches": launches,
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
        "atomics": atomics,
        "distinct_bytes": distinct,
        "min_bytes": min_bytes,
        "min_source": min_source,
        "min_terms": min_terms,
        "min_bytes_bench": bench_min,
        "flops_bench": bench_flops,
        "ratio_requested": round((bytes_read + bytes_written + ATOMIC_BYTES * atomics) / min_bytes, 4),
        "ratio_distinct": round(distinct / min_bytes, 4),
        "flops": flops,
    }


def _at_batch(kwargs: dict, batch: int) -> dict:
    """traffic_minimum's keyword arguments at another batch (numel: per sample in kwargs)."""
    out = dict(kwargs, batch=batch)
    if "numel" in out:
        out["numel"] = kwargs["numel"] * batch
    return out


def _name_copies(launches: list[dict], inputs: dict[str, torch.Tensor | None]) -> None:
    """Renames the workspaces that only hold a float32 copy of an input parameter (the launchers cast parameters of
    other dtypes to float32 before launching): never written by a launch of the call, 4 bytes per element of a
    parameter of another dtype -> "float32 copy of <input|input...>" (the candidates when several have its size)."""
    written = {t["seq"] for launch in launches for t in launch["tensors"].values() if t["bytes_written"]}
    for launch in launches:
        renamed = {}
        for name, t in launch["tensors"].items():
            if t["seq"] is not None and t["seq"] not in written:
                sources = [
                    n
                    for n, x in inputs.items()
                    if x is not None and n not in ACTIVATIONS and x.dtype != F32 and 4 * x.numel() == t["size"]
                ]
                if sources:
                    name = f"float32 copy of {'|'.join(sources)} (#{t['seq']})"
            renamed[name] = t
        launch["tensors"] = renamed


def _drop_path(batch, dry, direction, case, layout, bench_shape, channel_dim) -> dict:
    gen = torch.Generator().manual_seed(0)
    shape = (batch, *bench_shape[1:])
    branch, _ = cases.make_branch(layout, shape, F32, gen)
    n = branch.numel()
    scale = cases.make_scale(shape[0], F32)
    gamma = cases.make_gamma(shape[channel_dim], F32, gen)
    if direction == "fwd":
        residual = cases.like(branch, F32, gen)
        out, mark = _call(
            dry, lambda: torch.ops.pykernels_emu.drop_path_add_fwd(residual, branch, scale, gamma, channel_dim, None)
        )
        inputs = {"residual": residual, "branch": branch, "scale": scale, "gamma": gamma}
        outputs = {"out": out}
        flops = 3 * n  # branch * gamma * scale + residual
    else:
        grad_out = cases.like(branch, F32, gen)
        (grad_branch, grad_gamma), mark = _call(
            dry, lambda: torch.ops.pykernels_emu.drop_path_add_bwd(grad_out, branch, scale, gamma, channel_dim, True)
        )
        inputs = {"grad_out": grad_out, "branch": branch, "scale": scale, "gamma": gamma}
        outputs = {"grad_branch": grad_branch, "grad_gamma": grad_gamma}
        flops = 5 * n  # grad_out * gamma * scale; grad_out * branch * scale summed
    spec = (direction, {"numel": n // shape[0], "channels": shape[channel_dim], "x_size": 4, "param_size": 4})
    spec[1].update(scale_size=4, has_residual=True, has_scale=True, need_grad_branch=True, need_grad_gamma=True)
    return _result(dry, mark, "drop_path_add", direction, case, bench_shape, shape, F32, inputs, outputs, flops, spec)


def _dwconv(batch, dry, direction, case, layout, bench_shape, k=7, eps=1e-6) -> dict:
    gen = torch.Generator().manual_seed(0)
    shape = (batch, *bench_shape[1:])
    b, c, h, w = shape
    x, weight, cb, lw, lb = cases.make_dw_inputs(layout, shape, k, F16, F16, True, gen)
    pixels = b * h * w
    conv_flops = 2 * k * k * pixels * c
    if direction == "fwd":
        (out, mean, rstd), mark = _call(dry, lambda: torch.ops.pykernels_emu.dwconv_ln_fwd(x, weight, cb, lw, lb, eps))
        inputs = {"x": x, "weight": weight, "conv_bias": cb, "ln_weight": lw, "ln_bias": lb}
        outputs = {"out": out, "mean": mean, "rstd": rstd}
        flops = conv_flops + 8 * pixels * c  # conv; LayerNorm: mean, variance, normalise, affine
    else:
        # the statistics the forward saves: any values do (the traffic does not depend on them)
        mean = torch.randn(b, h, w, generator=gen, dtype=F32)
        rstd = torch.rand(b, h, w, generator=gen, dtype=F32) + 0.5
        grad = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64).to(F16)
        got, mark = _call(
            dry, lambda: torch.ops.pykernels_emu.dwconv_ln_bwd(grad, x, weight, cb, lw, lb, mean, rstd, True, True)
        )
        inputs = {"grad_out": grad, "x": x, "weight": weight, "conv_bias": cb, "ln_weight": lw, "ln_bias": lb}
        inputs.update(mean=mean, rstd=rstd)
        outputs = dict(zip(("grad_x", "grad_weight", "grad_conv_bias", "grad_ln_weight", "grad_ln_bias"), got))
        # conv recomputed; LayerNorm backward; grad_x (transposed conv) and grad_weight (correlation)
        flops = conv_flops + 12 * pixels * c + 2 * conv_flops
    spec = (direction, {"channels": c, "height": h, "width": w, "ksize": k, "x_size": 2, "param_size": 2})
    return _result(dry, mark, "dwconv_ln", direction, case, bench_shape, shape, F16, inputs, outputs, flops, spec)


def _mbconv(batch, dry, direction, case, channels, size, k, stride, eps=1e-3, act="silu") -> dict:
    gen = torch.Generator().manual_seed(0)
    bench_shape = (32, channels, size, size)
    shape = (batch, *bench_shape[1:])
    pad = k // 2
    pad_t, pad_l, out_h, out_w = cases.mb_geometry(size, size, k, stride, (pad, pad, pad, pad))
    batch_stats = direction != "fwd_eval"
    x, weight, cb, bw, bb, rm, rv = cases.make_mb_inputs("nhwc", shape, k, F16, F16, True, not batch_stats, gen)
    cb = None  # timm's conv_dw has no bias (BatchNorm follows)
    geometry = (eps, stride, pad_t, pad_l, out_h, out_w, act, batch_stats)
    outputs_px = shape[0] * out_h * out_w * channels
    conv_flops = 2 * k * k * outputs_px
    if direction.startswith("fwd"):
        (out, pooled, mean, var), mark = _call(
            dry, lambda: torch.ops.pykernels_emu.mbconv_se_fwd(x, weight, cb, bw, bb, rm, rv, *geometry)
        )
        inputs = {"x": x, "weight": weight, "conv_bias": cb, "bn_weight": bw, "bn_bias": bb}
        if not batch_stats:
            inputs.update(running_mean=rm, running_var=rv)
        outputs = {"out": out, "pooled": pooled}
        if batch_stats:
            outputs.update(mean=mean, var=var)
        # conv (twice with batch statistics: the statistics pass recomputes it), BN, SiLU, pooling
        flops = conv_flops * (2 if batch_stats else 1) + 10 * outputs_px
    else:
        # the batch statistics the forward returns: any values do (the traffic does not depend on them)
        mean = torch.randn(channels, generator=gen, dtype=F32)
        var = torch.rand(channels, generator=gen, dtype=F32) + 0.5
        grad = torch.randn(shape[0], out_h, out_w, channels, generator=gen, dtype=torch.float64).to(F16)
        grad_pooled = torch.randn(shape[0], channels, generator=gen, dtype=torch.float64).to(F32)
        bwd_args = (eps, stride, pad_t, pad_l, act, True, True, True)
        got, mark = _call(
            dry,
            lambda: torch.ops.pykernels_emu.mbconv_se_bwd(
                grad, grad_pooled, x, weight, cb, bw, bb, mean, var, *bwd_args
            ),
        )
        inputs = {"grad_out": grad, "grad_pooled": grad_pooled, "x": x, "weight": weight, "conv_bias": cb}
        inputs.update(bn_weight=bw, bn_bias=bb, mean=mean, var=var)
        outputs = dict(zip(("grad_x", "grad_weight", "grad_conv_bias", "grad_bn_weight", "grad_bn_bias"), got))
        # conv recomputed (twice: the batch-statistics reduction and the main pass), BN / SiLU backward, grad_x,
        # grad_weight
        flops = 2 * conv_flops + 20 * outputs_px + 2 * conv_flops
    spec = {"channels": channels, "height": size, "width": size, "out_h": out_h, "out_w": out_w, "ksize": k}
    spec.update(has_conv_bias=False, batch_stats=batch_stats, has_grad_pooled=True, x_size=2, param_size=2)
    spec = (direction[:3], spec)
    return _result(dry, mark, "mbconv_se", direction, case, bench_shape, shape, F16, inputs, outputs, flops, spec)


def measure(name: str, batch: int = 1, dry: bool = False) -> dict:
    """One row of the traffic table (see the module docstring) for CASES[name], measured at that batch; dry: the
    launches recorded but not run, and the sizes of the call's tensors and allocations (the benchmark batch is
    0 or None: the case's)."""
    _enable()
    op, direction, case, args = CASES[name]
    if not batch:
        batch = 32 if op == "mbconv_se" else args[1][0]  # bench/bench_mbconv_se.py: batch 32
    if op == "drop_path_add":
        return _drop_path(batch, dry, direction, case, *args)
    if op == "dwconv_ln":
        return _dwconv(batch, dry, direction, case, *args)
    return _mbconv(batch, dry, direction, case, *args)


def case_names() -> dict:
    return {"names": list(CASES)}


def probe(n: int) -> dict:
    """traffic_probe.cu on n float32 elements: the launches as counted, and whether its results are right."""
    _enable()
    x = torch.arange(n, dtype=F32)
    (out, sums, counter), mark = _call(False, lambda: torch.ops.pykernels_emu.traffic_probe(x))
    launches = _launches({"x": x, "out": out, "sums": sums, "counter": counter}, mark)
    blocks = (n + 63) // 64
    staged = x + x[torch.arange(n) // 64 * 64]
    mirror = torch.arange(n) // 64 * 64 + 63 - torch.arange(n) % 64
    mirror = torch.where(mirror < n, mirror, torch.arange(n))
    ok = (
        torch.equal(out, 2 * staged[mirror])
        and torch.equal(sums, x[: blocks * 64 : 64] * 4 + 6)
        and int(counter[0]) == blocks
    )
    return {"launches": launches, "results_ok": ok}
