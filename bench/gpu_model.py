"""A roofline time model of the benchmark rows on H100 SXM and H200 - a model, not a measurement (no GPU was lent).

``python bench/gpu_model.py`` writes ``bench/results/gpu-model-h100-h200.md``. For every op benchmark row (the shapes
of ``bench/bench_{drop_path,dwconv_ln,attention,mbconv_se}.py``, float16 as on CUDA):

    predicted time = max(bytes / HBM bandwidth, FLOPs / peak)

* **bytes, pykernels**: the op's minimum traffic (``tests/gpu_check/traffic_minimum.py``: each input read once, each
  output written once, the saved tensors) times the DRAM-traffic ratio the traffic counters measured on the kernels
  the op runs on CUDA (``distinct 32-byte sectors / minimum``, from ``bench/results/gpu-traffic-{cuda,triton}.json``,
  written by ``make gpu-check``'s counters at scaled-down shapes; the backend is the op's first CUDA priority: cuda
  for dwconv_ln / mbconv_se, triton for drop_path_add / attention). Where no measured ratio exists the minimum is used
  and the row says so. Distinct sectors assume every re-read of a tile halo hits L2 - a lower bound on DRAM traffic.
* **bytes, eager**: the kernels eager PyTorch launches for the same work, each reading its inputs and writing its
  outputs once (``EAGER_KERNELS`` below lists them per op, with the reason for each), the same L2 assumption. For
  attention the baseline is SDPA's FlashAttention kernel, modelled at the minimum traffic: a lower bound for it.
* **FLOPs**: ``traffic_minimum.flops``; GEMM-shaped work (attention) at the dense fp16 tensor-core peak (989 TFLOP/s),
  everything else (depthwise conv, normalisation, elementwise) at the fp32 CUDA-core peak (67 TFLOP/s on both GPUs).
* **HBM**: H100 SXM 3.35 TB/s, H200 4.8 TB/s.

Launch overheads, tails, L2 residency of small tensors and clocks are not modelled; the model ranks kernels by the
bytes they move, which is what the fused ops change. Figures are labelled "model, not measured" everywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu_check"))
import traffic_minimum as TM  # noqa: E402

RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "gpu-model-h100-h200.md"
TRAFFIC_FILES = {"cuda": RESULTS / "gpu-traffic-cuda.json", "triton": RESULTS / "gpu-traffic-triton.json"}


@dataclass(frozen=True)
class GPU:
    name: str
    hbm: float  # bytes / s
    tensor_fp16: float  # FLOP/s, dense
    cuda_fp32: float  # FLOP/s, non-tensor-core


GPUS = (
    GPU("H100 SXM", 3.35e12, 989e12, 67e12),
    GPU("H200", 4.8e12, 989e12, 67e12),
)
S = 2  # float16 activations
P = 4  # float32 parameters and statistics
GPU_BACKEND = {"drop_path_add": "triton", "dwconv_ln": "cuda", "attention": "triton", "mbconv_se": "cuda"}


# ---- measured traffic ratios -----------------------------------------------------------------------------------------


def load_ratios() -> dict[tuple[str, str, str, str], tuple[float, str]]:
    """(backend, op, direction, case) -> (distinct / minimum, the measured shape) from the committed counter files."""
    ratios = {}
    for backend, path in TRAFFIC_FILES.items():
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = data["rows"] if isinstance(data, dict) else data
        for r in rows:
            # the CUDA counter scales its batch-1 count to the benchmark batch (at_bench_batch): prefer that figure
            scaled = r.get("at_bench_batch") or {}
            ratio = scaled.get("ratio_distinct", r.get("ratio_distinct"))
            if ratio is None:
                continue
            direction, case = r["direction"], str(r["case"])
            if direction.endswith("_eval"):  # mbconv_se's eval forward: its own case
                direction, case = direction.removesuffix("_eval"), case + "-eval"
            direction = direction.removesuffix("_train")
            shape = r.get("measured_shape", "")
            if scaled.get("batch"):
                shape = f"{shape} scaled to batch {scaled['batch']}"
            ratios[(backend, r["op"], direction, case)] = (float(ratio), str(shape))
    return ratios


def ratio_for(ratios, op: str, direction: str, case: str) -> tuple[float, str]:
    """The measured ratio of the op's CUDA backend for ``case`` (else any case of the op x direction on that backend,
    the largest, said so; else 1.0: the minimum)."""
    backend = GPU_BACKEND[op]
    hit = ratios.get((backend, op, direction, case))
    if hit:
        return hit[0], f"{backend}, measured at {hit[1]}"
    same = [(v, k[3]) for k, v in ratios.items() if k[:3] == (backend, op, direction)]
    if same:
        (value, shape), other = max(same)
        return value, f"{backend}, measured on case {other} at {shape}"
    return 1.0, f"{backend}: not measured, minimum assumed"


# ---- eager kernels ---------------------------------------------------------------------------------------------------


def eager_drop_path(n: int, b: int, c: int) -> list[tuple[str, int]]:
    """``shortcut + timm.DropPath(p)(branch * gamma)``, train mode, then autograd.grad of shortcut, branch, gamma."""
    return [
        ("fwd: branch * gamma", 2 * n * S),
        ("fwd: bernoulli_ + div_ of the (B, 1, ...) mask", 2 * b * S),
        ("fwd: x * mask", 2 * n * S),
        ("fwd: shortcut + ...", 3 * n * S),
        ("bwd: grad * mask (mul backward)", 2 * n * S),
        ("bwd: grad_branch = grad * gamma", 2 * n * S),
        ("bwd: grad * branch, then its sum over B, H, W for grad_gamma", 3 * n * S + n * S + c * S),
    ]


def eager_dwconv_ln(b: int, c: int, h: int, w: int, k: int, channels_last: bool, backward: bool):
    """timm's ConvNeXtBlock front: conv_dw (cuDNN depthwise) -> permute(0, 2, 3, 1) -> LayerNorm. On NCHW input the
    permuted conv output is not contiguous and ``layer_norm`` copies it; its gradient comes back NHWC and the conv's
    backward copies it to NCHW."""
    n, px = b * c * h * w, b * h * w
    ks = [("fwd: depthwise conv", 2 * n * S + c * k * k * S)]
    if not channels_last:
        ks.append(("fwd: layer_norm's contiguous() copy of the permuted conv output", 2 * n * S))
    ks.append(("fwd: layer_norm", 2 * n * S + 2 * px * P))
    if backward:
        ks += [
            ("bwd: layer_norm dX (reads dY, X, stats)", 3 * n * S + 2 * px * P),
            ("bwd: layer_norm dgamma / dbeta (reads dY, X)", 2 * n * S),
        ]
        if not channels_last:
            ks.append(("bwd: NHWC grad copied to NCHW for the conv", 2 * n * S))
        ks += [("bwd: conv dgrad", 2 * n * S), ("bwd: conv wgrad (reads dY, X)", 2 * n * S)]
    return ks


def eager_attention(b: int, n: int, heads: int, d: int, backward: bool):
    """SDPA's FlashAttention kernel (what timm's Attention calls): modelled at the op's minimum traffic."""
    ks = [("fwd: SDPA flash forward (minimum)", TM.minimum_bytes("attention", "fwd", **_attn(b, n, heads, d)))]
    if backward:
        ks.append(("bwd: SDPA flash backward (minimum)", TM.minimum_bytes("attention", "bwd", **_attn(b, n, heads, d))))
    return ks


def eager_mbconv(b: int, c: int, h: int, w: int, ho: int, wo: int, k: int, backward: bool):
    """timm's InvertedResidual between the expansion and the SE's FCs: conv_dw -> BatchNormAct2d (BN, then SiLU) ->
    the SE's spatial mean. Forward in eval (running statistics) for the eval row; training forward (cuDNN BN reads x
    twice: statistics, then normalise) + backward for the training row."""
    nin, nout = b * c * h * w, b * c * ho * wo
    if not backward:
        return [
            ("fwd: depthwise conv", (nin + nout) * S),
            ("fwd: batch_norm (eval)", 2 * nout * S),
            ("fwd: SiLU", 2 * nout * S),
            ("fwd: SE mean over H, W", nout * S),
        ]
    return [
        ("fwd: depthwise conv", (nin + nout) * S),
        ("fwd: batch_norm (training: statistics, then normalise)", 3 * nout * S),
        ("fwd: SiLU", 2 * nout * S),
        ("fwd: SE mean over H, W", nout * S),
        ("bwd: mean backward (expand) added to the SE-scale gradient", 3 * nout * S),
        ("bwd: SiLU backward (reads grad, input)", 3 * nout * S),
        ("bwd: batch_norm backward (reduce: grad, x; then dX)", 5 * nout * S),
        ("bwd: conv dgrad", (nin + nout) * S),
        ("bwd: conv wgrad", (nin + nout) * S),
    ]


# ---- rows ------------------------------------------------------------------------------------------------------------


def _attn(b, n, heads, d):
    return {"batch": b, "heads": heads, "n_q": n, "head_dim": d, "x_size": S}


@dataclass
class Row:
    op: str
    case: str
    step: str
    shape: str
    min_bytes: int
    ours_bytes: float
    ours_note: str
    eager_bytes: int
    eager_kernels: list
    flops: int
    tensor_cores: bool


def _ours(ratios, op: str, case: str, directions: list[tuple[str, dict]]):
    total_min, total, notes = 0, 0.0, []
    for direction, kw in directions:
        m = TM.minimum_bytes(op, direction, **kw)
        r, note = ratio_for(ratios, op, direction, case)
        total_min += m
        total += m * r
        notes.append(f"{direction} x{r:.2f} ({note})")
    return total_min, total, "; ".join(notes)


def rows() -> list[Row]:
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_attention
    import bench_drop_path
    import bench_dwconv_ln
    import bench_mbconv_se

    ratios = load_ratios()
    out: list[Row] = []
    for c in bench_drop_path.CASES:
        n, b = 1, c.shape[0]
        for dim in c.shape:
            n *= dim
        ch = c.gamma_shape[0]
        kw = {"numel": n, "batch": b, "channels": ch, "x_size": S, "param_size": S}
        mn, ours, note = _ours(ratios, "drop_path_add", c.id, [("fwd", kw), ("bwd", kw)])
        ek = eager_drop_path(n, b, ch)
        fl = TM.flops("drop_path_add", "fwd", **kw) + TM.flops("drop_path_add", "bwd", **kw)
        out.append(Row("drop_path_add", c.id, "fwd + bwd", str(c.shape), mn, ours, note, _sum(ek), ek, fl, False))
    for c in bench_dwconv_ln.CASES:
        k = bench_dwconv_ln.KERNEL_SIZE
        kw = {"batch": c.batch, "channels": c.channels, "height": c.size, "width": c.size, "ksize": k, "x_size": S}
        cl = c.layout == "channels_last"
        for step, dirs in (("fwd", ["fwd"]), ("fwd + bwd", ["fwd", "bwd"])):
            mn, ours, note = _ours(ratios, "dwconv_ln", c.id, [(d, kw) for d in dirs])
            ek = eager_dwconv_ln(c.batch, c.channels, c.size, c.size, k, cl, step != "fwd")
            fl = sum(TM.flops("dwconv_ln", d, **kw) for d in dirs)
            shape = f"{c.shape} {c.layout}"
            out.append(Row("dwconv_ln", c.id, step, shape, mn, ours, note, _sum(ek), ek, fl, False))
    for c in bench_attention.CASES:
        kw = _attn(c.batch, c.tokens, c.heads, c.head_dim)
        for step, dirs in (("fwd", ["fwd"]), ("fwd + bwd", ["fwd", "bwd"])):
            mn, ours, note = _ours(ratios, "attention", c.id, [(d, kw) for d in dirs])
            ek = eager_attention(c.batch, c.tokens, c.heads, c.head_dim, step != "fwd")
            fl = sum(TM.flops("attention", d, **kw) for d in dirs)
            shape = f"B {c.batch}, N {c.tokens}, H {c.heads}, D {c.head_dim}"
            out.append(Row("attention", c.id, step, shape, mn, ours, note, _sum(ek), ek, fl, True))
    for c in bench_mbconv_se.CASES:
        mid = c.in_ch * 6  # timm InvertedResidual, exp_ratio=6 (bench_mbconv_se._timm_block)
        ho = -(-c.size // c.stride)
        kw = {
            "batch": c.batch,
            "channels": mid,
            "height": c.size,
            "width": c.size,
            "out_h": ho,
            "out_w": ho,
            "ksize": c.kernel,
            "x_size": S,
        }
        for step, dirs, train in (("eval fwd", ["fwd"], False), ("train fwd + bwd", ["fwd", "bwd"], True)):
            kwd = {**kw, "batch_stats": train}
            mn, ours, note = _ours(ratios, "mbconv_se", c.id if train else c.id + "-eval", [(d, kwd) for d in dirs])
            ek = eager_mbconv(c.batch, mid, c.size, c.size, ho, ho, c.kernel, train)
            fl = sum(TM.flops("mbconv_se", d, **kwd) for d in dirs)
            shape = f"B {c.batch}, C {mid}, {c.size}->{ho}, k{c.kernel}"
            out.append(Row("mbconv_se (dw+BN+act+SE pool)", c.id, step, shape, mn, ours, note, _sum(ek), ek, fl, False))
    return out


def _sum(kernels) -> int:
    return sum(b for _, b in kernels)


def predict(bytes_: float, flops: int, tensor_cores: bool, gpu: GPU) -> float:
    """Seconds: the roofline."""
    peak = gpu.tensor_fp16 if tensor_cores else gpu.cuda_fp32
    return max(bytes_ / gpu.hbm, flops / peak)


def render(rs: list[Row]) -> str:
    lines = [
        "# GPU time model: H100 SXM and H200 (model, not measured)",
        "",
        "Every figure in this file is **a model, not a measurement**: no GPU has been lent to this project. Generated",
        "by `python bench/gpu_model.py` (see its docstring for the method) from the benchmark shapes (float16) and the",
        "traffic ratios the counters of `make gpu-check` measured (`bench/results/gpu-traffic-*.json`).",
        "",
        "predicted time = max(bytes / HBM bandwidth, FLOPs / peak); HBM 3.35 TB/s (H100 SXM), 4.8 TB/s (H200); peaks:",
        "989 TFLOP/s dense fp16 tensor cores (attention), 67 TFLOP/s fp32 CUDA cores (everything else). Bytes in MB",
        "(10^6). *ours x min* = modelled DRAM bytes / the op's minimum; *eager / ours* = the predicted speed-up.",
        "",
        "| op | case | step | shape | min MB | ours MB (x min) | eager MB | GFLOP | H100 ours us | H100 eager us"
        " | H200 ours us | H200 eager us | eager / ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rs:
        t = {
            (g.name, who): predict(b, r.flops, r.tensor_cores, g)
            for g in GPUS
            for who, b in (("ours", r.ours_bytes), ("eager", r.eager_bytes))
        }
        lines.append(
            f"| {r.op} | {r.case} | {r.step} | {r.shape} | {r.min_bytes / 1e6:.1f} | {r.ours_bytes / 1e6:.1f} "
            f"({r.ours_bytes / r.min_bytes:.2f}) | {r.eager_bytes / 1e6:.1f} | {r.flops / 1e9:.2f} | "
            f"{t['H100 SXM', 'ours'] * 1e6:.1f} | {t['H100 SXM', 'eager'] * 1e6:.1f} | {t['H200', 'ours'] * 1e6:.1f} | "
            f"{t['H200', 'eager'] * 1e6:.1f} | {t['H100 SXM', 'eager'] / t['H100 SXM', 'ours']:.2f}x |"
        )
    lines += ["", "## Where the pykernels bytes come from", ""]
    for r in rs:
        lines.append(f"* {r.op} {r.case} {r.step}: {r.ours_note}")
    lines += ["", "## The eager kernels modelled", ""]
    seen = set()
    for r in rs:
        key = (r.op, r.step, r.shape.split(" ")[-1] if r.op == "dwconv_ln" else "")
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"* **{r.op}, {r.step}**{' (' + key[2] + ')' if key[2] else ''}, case {r.case}:")
        for name, b in r.eager_kernels:
            lines.append(f"  * {name}: {b / 1e6:.1f} MB")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render(rows())
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
