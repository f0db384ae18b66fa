"""Global-memory traffic of the CUDA kernels (issue 13): the unmodified csrc/cuda/*.cu kernels run by the emulator's
traffic variant (tests/cuda_emu/traffic.cpp: every load, store and atomic of every launch on the tensors' memory is
counted), at benchmark shapes, against the minimum traffic of each op.

* test_counter_exact: the counter on a kernel whose traffic is known to the byte (tests/cuda_emu/traffic_probe.cu).
* test_traffic_gate: one case per op x direction (GATE_CASES, the cheapest benchmark shape of each), counted at a
  small batch and scaled to the benchmark batch by a dry run (tests/cuda_emu/traffic_report.py): distinct bytes
  within GATE_RATIO x the minimum, or a known excess with its reason (KNOWN_EXCESS, strict both ways).
  Every case: ``python tests/cuda_emu/emu.py traffic --out bench/results/gpu-traffic-cuda.json``.
* test_scaling_matches_a_count: that scaling against a real count at batch 2.

Run with the other GPU-code gates (``PYKERNELS_GPU_CHECK=1 python -m pytest tests/gpu_check -n 2 -q``); the table is
printed at the end of the run and written to cuda_traffic.txt / cuda_traffic.json beside cuda_resources.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cuda_emu"))

import emu  # noqa: E402
import traffic_cases  # noqa: E402
import traffic_report  # noqa: E402

ROW_PROPERTY = "cuda_traffic_row"  # collected by conftest.py for the end-of-run table

# One benchmark case per op x direction: the cheapest to emulate (the 7 x 7 / token stages).
GATE_CASES = (
    "drop_path_add/fwd/vit_s-tokens",
    "drop_path_add/bwd/vit_s-tokens",
    "dwconv_ln/fwd/s4",
    "dwconv_ln/bwd/s4",
    "mbconv_se/fwd_eval/192-320-k3-7",
    "mbconv_se/fwd_train/192-320-k3-7",
    "mbconv_se/bwd_train/192-320-k3-7",
)

_procs: list[emu.EmuProcess] = []


def proc() -> emu.EmuProcess:
    """This worker's traffic-variant process (started, and the variant built, on first use)."""
    from .test_cuda_emu import _missing_toolchain

    reason = _missing_toolchain()
    if reason:
        pytest.fail(reason, pytrace=False)  # asked for with PYKERNELS_GPU_CHECK=1: a gate must not skip silently
    if not _procs:
        _procs.append(emu.EmuProcess(emu.TRAFFIC))
    return _procs[0]


def start_early() -> None:
    """Starts the traffic variant's build while the other gates compile (conftest.py, once the tests are known)."""
    from . import aot
    from .test_cuda_emu import _missing_toolchain

    opted_in, interpreting = aot.gate_status()
    if opted_in and not interpreting and _missing_toolchain() is None:
        try:
            proc().launch()
        except Exception:  # noqa: BLE001, S110 - the tests that need it report the problem
            pass


@pytest.fixture(scope="module", autouse=True)
def _close_process():
    yield
    for p in _procs:
        p.close()
    _procs.clear()


def call(function: str, *args) -> dict:
    reply = proc().call(function, *args, timeout=900)
    if "exception" in reply:
        pytest.fail(f"{function}{args} raised in the emulator process:\n{reply['traceback']}", pytrace=False)
    return reply


@pytest.mark.parametrize("n", [200, 256])
def test_counter_exact(n):
    """traffic_probe.cu (see its header): every figure of its one launch, to the byte."""
    reply = call("probe", n)
    assert reply["results_ok"], "the probe kernel computed wrong results under the traffic variant"
    (launch,) = reply["launches"]
    blocks = (n + 63) // 64
    assert "traffic_probe_kernel" in launch["kernel"]
    assert launch["atomics"] == blocks
    assert launch["bytes_read"] == 8 * n + 16 * blocks  # x[i] + x[first] per thread, a 16-byte load per block
    assert launch["bytes_written"] == 4 * n + 4 * blocks  # out, sums (the shared-memory stage is not counted)
    assert launch["distinct_read"] == 4 * n
    assert launch["distinct_written"] == 4 * n + 4 * blocks
    assert launch["distinct_atomic"] == 4
    sectors = 2 * -(-4 * n // 32) + -(-4 * blocks // 32) + 1
    assert launch["sectors"] == sectors
    assert set(launch["tensors"]) == {"x", "out", "sums", "counter"}  # no workspace, no host memory
    assert launch["tensors"]["x"]["bytes_written"] == 0 and launch["tensors"]["counter"]["bytes_read"] == 0


def test_gate_cases_exist():
    missing = [name for name in GATE_CASES if name not in traffic_cases.CASES]
    assert not missing, f"GATE_CASES names no case of traffic_cases.CASES: {missing}"
    keys = {tuple(name.split("/")[:2]) for name in GATE_CASES}
    every = {(op, direction) for op, direction, _, _ in traffic_cases.CASES.values()}
    assert keys == every, f"op x direction without a gate case: {sorted(every - keys)}"
    # a known excess must be seen by the gate, or its strictness (fails once the excess is gone) is never checked
    assert set(traffic_report.KNOWN_EXCESS) <= keys


@pytest.mark.parametrize("name", GATE_CASES)
def test_traffic_gate(name, record_property):
    try:
        row = emu.measure_traffic(proc(), name)
    except (RuntimeError, emu.EmuCrash) as e:
        pytest.fail(str(e), pytrace=False)
    record_property(ROW_PROPERTY, row)
    assert row["launches"], f"{name}: no launch was counted"
    for launch in row["launches"]:  # every launch touches its inputs and outputs
        assert launch["distinct_read"] > 0 and launch["distinct_written"] > 0, launch["kernel"]
    bench = row["at_bench_batch"]
    assert bench["distinct_bytes"] >= 0.99 * bench["min_bytes"], (
        f"{name}: {bench['distinct_bytes']} distinct bytes, under the minimum {bench['min_bytes']}: a tensor the op "
        "must read or write went uncounted"
    )
    problems = traffic_report.check([row])
    assert not problems, "\n".join(problems)


def test_scaling_matches_a_count():
    """traffic_report.combine's scaling (a count at batch 1, buffer sizes from a dry run) against a real count at
    batch 2, on a case with partial-sum buffers, statistics and float32 parameter copies."""
    name = "mbconv_se/fwd_train/192-320-k3-7"
    row1, dry2, row2 = call("measure", name, 1, False), call("measure", name, 2, True), call("measure", name, 2, False)
    predicted = traffic_report.combine(row1, dry2)["at_bench_batch"]
    assert dry2["batch"] == 2 and predicted["batch"] == 2
    assert [launch["kernel"] for launch in row2["launches"]] == dry2["kernels"]
    assert row2["distinct_bytes"] != row1["distinct_bytes"]  # the batch matters
    assert abs(predicted["distinct_bytes"] - row2["distinct_bytes"]) <= 0.01 * row2["distinct_bytes"], (
        predicted["distinct_bytes"],
        row2["distinct_bytes"],
    )
