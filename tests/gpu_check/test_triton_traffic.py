"""Memory-traffic gate of the Triton kernels (issue 13): bytes moved per launch against the op's minimum.

Runs with the other GPU-code checks (``PYKERNELS_GPU_CHECK=1 python -m pytest tests/gpu_check -n 2``). The counts come
from ``traffic.py`` run in a child process under ``TRITON_INTERPRET=1`` (the gate's own process compiles real
cubins, so its Triton is not the interpreter), one child per op so that two xdist workers share the cases.

* ``test_counter_selftest``: the counter on a hand-written masked copy kernel (exact bytes, distinct bytes, sectors,
  masked lanes) and a gather that reads every other element twice.
* ``test_traffic[<op>]``: every case of the op, forward and backward, with the tiles the launchers ship on CUDA. For
  the memory-bound ops (drop_path_add, dwconv_ln, mbconv_se: elementwise, depthwise conv, normalisation, reductions;
  none has a GEMM) the DRAM estimate - distinct 32-byte sectors per launch, summed over the op's launches - must stay
  within ``LIMIT`` x the minimum (``traffic_minimum.py``), or the row carries a documented reason in
  ``KNOWN_EXCESS`` with its measured ratio (checked to within ``FIGURE_TOLERANCE``, and strict: a row whose excess
  is gone fails until its entry is removed). Attention is compute-bound (2 x 2 GEMMs of N x N x D per head forward):
  its K / V re-reads per query block are the flash-attention design, so its rows are reported, not gated; its
  minimum still checks that the counter saw every tensor (ratio_distinct >= 1).

The rows are written to ``triton_traffic.json`` and ``triton_traffic.txt`` beside the AOT table
(``$PYKERNELS_GPU_CHECK_REPORT``'s folder, default ``$TMPDIR/pykernels-gpu-check``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from . import traffic

HERE = Path(__file__).resolve().parent
LIMIT = 1.3  # DRAM-estimate bytes / minimum bytes of a memory-bound op
FIGURE_TOLERANCE = 0.05  # relative: a KNOWN_EXCESS figure that drifts further must be re-measured and updated
CHILD_TIMEOUT_S = 900

_TWO_PASS_STATS = (
    "training BatchNorm needs the statistics of the whole conv output before it can normalise: a stats pass reads x "
    "(recomputing the conv) and the apply pass reads it again: 2 x + out against x + out (1.5x at stride 1, 1.8x at "
    "stride 2, where x is 4 out), plus per-tile (mean, M2) and SE partials, (B, tiles, 2 + 1, C) fp32"
)
_DWCONV_BWD = (
    "three kernels share a (B, H, W, C) dy workspace in x's dtype: the dy kernel writes it, grad_x reads it, "
    "grad_weight reads it and x again (x read twice, dy moved three times); plus per-tile (tiles, 3, C) fp32 partial "
    "sums of the parameter grads (as large as x at C = 384, 3x x at C = 768: tiles of 1-2 pixels) and per-group "
    "(groups, C, k, k) fp32 grad_weight partials. Before the dy workspace went from fp32 to x's dtype (cc27744): "
    "3.25 / 2.91 / 3.08 / 3.42 at s1 / s2 / s3 / s4"
)
_MBCONV_BWD = (
    "with batch statistics: a reduce pass (reads grad_out and x, recomputes the conv) for the two channel means dy "
    "needs, a dy pass (reads both again, writes an fp32 (B, Ho, Wo, C) dy workspace), grad_x (reads dy), "
    "grad_weight (reads dy and x): x is read 3 times, grad_out twice, dy (4 B) written once and read twice"
)
# (op, direction, case) -> (reason, DRAM-estimate ratio measured at the kernels of c01373f)
KNOWN_EXCESS: dict[tuple[str, str, str], tuple[str, float]] = {
    ("dwconv_ln", "bwd", "s1"): (_DWCONV_BWD, 2.378),
    ("dwconv_ln", "bwd", "s1-cl"): (_DWCONV_BWD, 2.378),
    ("dwconv_ln", "bwd", "s2"): (_DWCONV_BWD, 2.327),
    ("dwconv_ln", "bwd", "s3"): (_DWCONV_BWD, 2.497),
    ("dwconv_ln", "bwd", "s4"): (_DWCONV_BWD, 2.834),
    ("dwconv_ln", "bwd", "s1-cl-no-conv-bias-x-grad-only"): (_DWCONV_BWD, 1.74),
    ("mbconv_se", "fwd", "16-24-s2-k3-112"): (_TWO_PASS_STATS, 1.817),
    ("mbconv_se", "fwd", "40-40-k5-28"): (_TWO_PASS_STATS, 1.595),
    ("mbconv_se", "fwd", "112-112-k5-14"): (_TWO_PASS_STATS, 1.595),
    ("mbconv_se", "fwd", "192-320-k3-7"): (_TWO_PASS_STATS, 1.539),
    ("mbconv_se", "fwd", "40-40-k5-28-nchw"): (_TWO_PASS_STATS, 1.595),
    ("mbconv_se", "bwd", "16-24-s2-k3-112"): (_MBCONV_BWD, 2.706),
    ("mbconv_se", "bwd", "40-40-k5-28"): (_MBCONV_BWD, 3.638),
    ("mbconv_se", "bwd", "112-112-k5-14"): (_MBCONV_BWD, 3.638),
    ("mbconv_se", "bwd", "192-320-k3-7"): (_MBCONV_BWD, 3.846),
    ("mbconv_se", "bwd", "40-40-k5-28-nchw"): (_MBCONV_BWD, 3.589),
}


def _report_dir() -> Path:
    default = Path(tempfile.gettempdir()) / "pykernels-gpu-check" / "triton_aot.txt"
    return Path(os.environ.get("PYKERNELS_GPU_CHECK_REPORT") or default).parent


def _child(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(HERE / "traffic.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        cwd=HERE.parent.parent,
    )
    if result.returncode:
        pytest.fail(f"traffic.py {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-6000:]}", False)


def test_counter_selftest(tmp_path):
    out = tmp_path / "selftest.json"
    _child(["--selftest", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["copied"], "the copy kernel did not copy: the counter changed what the kernel does"
    copy, twice = result["launches"]
    # n = 1000 float32, BLOCK 256, 4 programs: 1024 lanes per access, 24 masked off
    assert (copy["kernel"], copy["grid"]) == ("_copy_kernel", [4, 1, 1])
    assert (copy["bytes_read"], copy["bytes_written"]) == (4000, 4000)
    assert (copy["distinct_read"], copy["distinct_written"]) == (4000, 4000)
    assert (copy["sectors_read"], copy["sectors_written"]) == (125, 125)  # torch allocations are 64-byte aligned
    assert (copy["lanes"], copy["lanes_off"]) == (2048, 48)
    assert copy["masked_off_fraction"] == round(48 / 2048, 4)
    assert copy["atomics"] == {"count": 0, "bytes": 0}
    tensors = {t["name"]: t for t in copy["tensors"]}
    assert (tensors["SRC"]["read"], tensors["SRC"]["written"], tensors["DST"]["written"]) == (4000, 0, 4000)
    # the gather reads the even elements twice through its first load, every element once through the second
    assert (twice["bytes_read"], twice["distinct_read"], twice["bytes_written"]) == (8000, 4000, 4000)
    assert (twice["lanes"], twice["lanes_off"]) == (3072, 72)
    assert {t["name"]: t["reads_per_byte"] for t in twice["tensors"]}["SRC"] == 2.0


def _merge_report(part: Path) -> None:
    """Write the rows of every op finished so far in this run into triton_traffic.json / .txt."""
    rows = []
    meta = {}
    for path in sorted(part.parent.glob(f"{part.name.split('.')[0]}.*.json")):
        data = json.loads(path.read_text())
        meta = data["meta"]
        rows.extend(data["rows"])
    order = {op: i for i, op in enumerate(dict.fromkeys(c.op for c in traffic.CASES))}
    rows.sort(key=lambda r: order.get(r["op"], 99))
    for name, text in (
        ("triton_traffic.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"),
        ("triton_traffic.txt", traffic.format_table(rows) + "\n"),
    ):
        temporary = part.parent.parent / f".{name}.{os.getpid()}"
        temporary.write_text(text)
        os.replace(temporary, part.parent.parent / name)


def _check_row(row: dict) -> str | None:
    key = (row["op"], row["direction"], row["case"])
    ratio = row["ratio_sectors"]
    where = f"{'/'.join(key)}: DRAM estimate {ratio:.3f}x the minimum ({row['sector_bytes']} / {row['min_bytes']} B)"
    if row["ratio_distinct"] < 0.999:
        return f"{where}: distinct bytes below the minimum ({row['ratio_distinct']}): the counter or the minimum is off"
    if not row["gated"]:
        return None
    known = KNOWN_EXCESS.get(key)
    if known is None:
        return None if ratio <= LIMIT else f"{where} > {LIMIT}: fix the kernel or document it in KNOWN_EXCESS"
    reason, figure = known
    if ratio <= LIMIT:
        return f"{where} <= {LIMIT} now: the excess is gone, remove its KNOWN_EXCESS entry ({reason})"
    if abs(ratio - figure) > FIGURE_TOLERANCE * figure:
        return f"{where}, KNOWN_EXCESS says {figure}: update the figure"
    return None


@pytest.mark.parametrize("op", list(dict.fromkeys(c.op for c in traffic.CASES)))
def test_traffic(op, tmp_path):
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getppid()))[:12]
    parts = _report_dir() / "traffic-parts"
    parts.mkdir(parents=True, exist_ok=True)
    part = parts / f"{run_id}.{op}.json"
    _child(["-k", f"{op}/", "--out", str(part), "--quiet"], tmp_path)
    rows = json.loads(part.read_text())["rows"]
    _merge_report(part)
    expected = {(c.case, d) for c in traffic.CASES if c.op == op for d in ("fwd", "bwd")}
    got = {(r["case"], r["direction"]) for r in rows}
    assert got <= expected and {c for c, _ in got} == {c for c, _ in expected}, f"cases run: {sorted(got)}"
    for row in rows:
        assert row["launches"], f"{op}/{row['case']} {row['direction']}: no Triton launch counted"
    problems = [p for p in map(_check_row, rows) if p]
    stale = [
        key for key in KNOWN_EXCESS if key[0] == op and key not in {(r["op"], r["direction"], r["case"]) for r in rows}
    ]
    problems += [f"KNOWN_EXCESS entry {key} names no measured row" for key in stale]
    assert not problems, "\n".join(problems)
