"""Combine, gate and print the global-memory traffic of the CUDA kernels counted by the emulator (traffic_cases.py).

The emulator runs one host thread per CUDA thread, so each case is counted at batch 1 (MEASURED_BATCH; doubled until
it launches the same kernels as the benchmark's batch: emu.measure_traffic) and brought to the benchmark's batch by a
dry run: the same call at the benchmark batch with the launches recorded but not run (every launcher allocation still
happens), which gives the size of every tensor and every allocation of the call at that batch. Each term - the
distinct bytes of one allocation in one launch - is scaled by its allocation's size at the benchmark batch over its
size at the counted batch (the allocations are matched by name for the call's tensors and by order for its workspaces:
the launcher allocates in the same order at any batch). Exact when a launch touches the same fraction of a buffer at
both batches (every buffer here: activations and their gradients grow with the batch, parameters and their float32
copies do not, a partial-sum buffer of G blocks has the G of the benchmark's grid). test_cuda_traffic.py checks it
against a real count at batch 2. At batch 1 the parameters weigh as much as the activations in the 7 x 7 and 14 x 14
stages: the measured ratios at that batch are in the rows too, but the gate reads the scaled ones. Requested bytes are
reported at the counted batch only: a parameter re-read by every block grows with the grid, not with its buffer.

Gate (tests/gpu_check/test_cuda_traffic.py and ``emu.py traffic``): distinct bytes / minimum bytes at the benchmark
batch <= GATE_RATIO for every op x direction x case, unless KNOWN_EXCESS gives the op x direction a reason and the
ratio measured when the reason was written; such an entry is strict: it fails when no case of it exceeds GATE_RATIO
any more (the excess is gone: delete the entry) and when a case exceeds its figure by more than FIGURE_SLACK (worse).
"""

from __future__ import annotations

GATE_RATIO = 1.3
FIGURE_SLACK = 0.05  # relative: a known excess may grow by this much before the gate calls it a regression
MEASURED_BATCH = 1

# (op, direction) -> (reason, the highest ratio_distinct at the benchmark batch over its cases when written)
KNOWN_EXCESS: dict[tuple[str, str], tuple[str, float]] = {
    ("dwconv_ln", "bwd"): (
        "three launches: the dy kernel reads grad_out and x (the conv is recomputed) and writes dy to a (B, H, W, C) "
        "workspace in x's dtype, read back by the grad_x kernel and by the grad_weight kernel, which reads x again "
        "and writes a C*k*k float32 partial per block group (summed by ATen): 2 reads of N s and the workspace's "
        "3 N s over the minimum, plus the partials, about 12.8 MB in every stage at batch 32 (s4: 12.8 of 32.0 MB, "
        "s1: 12.8 of 149.7 MB); worst case s4",
        4.332,
    ),
    ("mbconv_se", "fwd_train"): (
        "batch statistics: the stats kernel reads x to reduce the conv output before the forward kernel reads x again "
        "to normalise it (no grid-wide sync inside one kernel): one more read of x, 4x the output at stride 2 "
        "(worst case 16-24-s2-k3-112: 77 MB of x twice against a 96 MB minimum)",
        1.821,
    ),
    ("mbconv_se", "bwd_train"): (
        "batch statistics: the reduce kernel reads grad_out and x (sum g, sum g*xhat) before the main kernel reads "
        "them again; dy0 goes through a (B, Ho, Wo, C) float32 workspace (written by the main kernel, read by the "
        "grad_x kernel: 2 x 4 bytes an element against x's 2), and the main kernel's partials (G x C*(k*k+3) float32); "
        "worst case 192-320-k3-7 (dy0 workspace 14.5 of 36.8 MB)",
        3.330,
    ),
}


def combine(row: dict, dry: dict) -> dict:
    """row (counted at a small batch) with "at_bench_batch": its figures scaled to the batch of the dry run."""
    where = f"{row['op']} {row['direction']} {row['case']}"
    kernels = [launch["kernel"] for launch in row["launches"]]
    if kernels != dry["kernels"]:
        raise ValueError(f"{where}: other launches at batch {dry['batch']}: {dry['kernels']} (counted: {kernels})")
    distinct = 0.0
    terms = []  # (kernel, buffer, distinct bytes at the benchmark batch)
    for launch in row["launches"]:
        kernel = launch["kernel"].split("(")[0].split("::")[-1]
        for name, t in launch["tensors"].items():
            seq = t.get("seq")
            size = dry["allocations"][seq] if seq is not None else dry["sizes"].get(name)
            if size is None:
                raise ValueError(f"{where}: {name} ({t['size']} B) has no size in the dry run")
            factor = size / t["size"]
            term = factor * (t["distinct_read"] + t["distinct_written"] + t["distinct_atomic"])
            distinct += term
            terms.append([kernel, name, round(term)])
    minimum = row.get("min_bytes_bench") or dry["min_bytes"]
    flops = row.get("flops_bench") or row["flops"] * dry["batch"] / row["measured_shape"][0]
    out = dict(row)
    out["at_bench_batch"] = {
        "batch": dry["batch"],
        "method": f"counted at batch {row['measured_shape'][0]}, each buffer scaled to its size at batch "
        f"{dry['batch']} (dry run)",
        "distinct_bytes": round(distinct),
        "min_bytes": round(minimum),
        "ratio_distinct": round(distinct / minimum, 4),
        "flops": round(flops),
        "terms": terms,
    }
    out["dry_run"] = {k: dry[k] for k in ("batch", "kernels", "sizes", "allocations", "min_bytes")}
    return out


def check(rows: list[dict]) -> list[str]:
    """The gate's complaints (empty: passed). Every (op, direction) in KNOWN_EXCESS must have a row here."""
    problems = []
    by_key: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_key.setdefault((row["op"], row["direction"]), []).append(row)
    for key, group in sorted(by_key.items()):
        ratios = {row["case"]: row["at_bench_batch"]["ratio_distinct"] for row in group}
        worst = max(ratios.values())
        if key not in KNOWN_EXCESS:
            problems += [
                f"{key[0]} {key[1]} {case}: distinct bytes {ratio:.3f} x the minimum (gate {GATE_RATIO}); fix the "
                f"kernel or give the reason in KNOWN_EXCESS (tests/cuda_emu/traffic_report.py)"
                for case, ratio in ratios.items()
                if ratio > GATE_RATIO
            ]
            continue
        reason, figure = KNOWN_EXCESS[key]
        if worst <= GATE_RATIO:
            problems.append(
                f"{key[0]} {key[1]}: within the gate now (worst case {worst:.3f} <= {GATE_RATIO}): remove its "
                f"KNOWN_EXCESS entry ({reason})"
            )
        elif worst > figure * (1 + FIGURE_SLACK):
            problems.append(
                f"{key[0]} {key[1]}: {worst:.3f} x the minimum, worse than the known {figure:.3f} ({reason})"
            )
    return problems


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'op':14} {'direction':9} {'case':28} {'dtype':7} {'launches':>8} "
        f"{'min MB':>9} {'distinct MB':>11} {'ratio':>6} {'req ratio':>9} {'AI':>6}  "
        f"{'counted at':>10}  known excess"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        bench = row["at_bench_batch"]
        known = KNOWN_EXCESS.get((row["op"], row["direction"]))
        lines.append(
            f"{row['op']:14} {row['direction']:9} {row['case']:28} {row['dtype']:7} {len(row['launches']):>8} "
            f"{_mb(bench['min_bytes']):>9} {_mb(bench['distinct_bytes']):>11} {bench['ratio_distinct']:>6.3f} "
            f"{row['ratio_requested']:>9.3f} {bench['flops'] / bench['distinct_bytes']:>6.2f}  "
            f"{'B=' + str(row['measured_shape'][0]) + ': ' + format(row['ratio_distinct'], '.2f'):>10}  "
            f"{'yes' if known else ''}"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    problems = check(rows)
    notes = [
        "figures at the benchmark batch (MB = 1e6 bytes), counted at a small batch ('counted at': it and its own "
        "ratio) and scaled by a dry run; "
        "ratio = distinct bytes / minimum; req ratio = requested bytes / minimum at the counted batch (re-reads of "
        "parameters grow with the grid, not with their buffer: not scaled); "
        "AI = flops / distinct byte",
    ]
    for (op, direction), (reason, figure) in sorted(KNOWN_EXCESS.items()):
        notes.append(f"known excess {op} {direction} (<= {figure:.3f}): {reason}")
    if problems:
        notes += ["GATE FAILED:", *(f"  {p}" for p in problems)]
    else:
        notes.append(f"gate passed: every op x direction x case within {GATE_RATIO} x or a known excess")
    return "\n".join(notes)
