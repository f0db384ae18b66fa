"""The GPU-code checks run only when asked for: ``PYKERNELS_GPU_CHECK=1 python -m pytest tests/gpu_check -n 2 -q``.

* Not asked for (the normal ``pytest tests`` run, CPU or GPU machine): every test here is skipped. They compile several
  hundred cubins (about six minutes on two cores), need the real Triton compiler (no ``TRITON_INTERPRET``), and change
  ``TRITON_*`` variables of the process while they compile; the normal run keeps none of that.
* Asked for but ``TRITON_INTERPRET`` is on (exported by hand; tests/conftest.py leaves it unset when
  PYKERNELS_GPU_CHECK=1): every test fails, since a gate that skipped would pass silently.
* Asked for: the tests compile and check; at the end the resource table of every compile is printed (whatever the
  ``-s`` / capture setting) and written to ``$PYKERNELS_GPU_CHECK_REPORT`` (default: a file under the temp dir); the
  table of the compiled CUDA kernels (test_cuda_resources.py) goes to ``cuda_resources.txt`` beside it.
* The CUDA emulator tests (test_cuda_emu.py) run the same way: skipped unless asked for.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from . import aot

ROW_PROPERTY = "triton_aot_row"
CUDA_ROW_PROPERTY = "cuda_resources_row"  # test_cuda_resources.py
TRAFFIC_ROW_PROPERTY = "cuda_traffic_row"  # test_cuda_traffic.py
_rows: list[dict] = []
_cuda_rows: list[dict] = []
_traffic_rows: list[dict] = []
_SESSION_START = time.time()  # test_triton_traffic.py writes its table into the report folder: shown if from this run


@pytest.fixture(autouse=True)
def _gpu_check_gate():
    opted_in, interpreting = aot.gate_status()
    if opted_in and interpreting:
        pytest.fail(
            "PYKERNELS_GPU_CHECK=1 but TRITON_INTERPRET is on: the gate compiles real cubins; unset TRITON_INTERPRET",
            pytrace=False,
        )
    if not opted_in:
        pytest.skip(
            "opt-in GPU-code gate (Triton AOT, CUDA emulator, CUDA resources): run "
            "`PYKERNELS_GPU_CHECK=1 python -m pytest tests/gpu_check -n 2`"
        )


def pytest_collection_finish(session):
    emu_tests = [item for item in session.items if item.path.name == "test_cuda_emu.py"]
    if emu_tests:
        emu_tests[0].module.start_early()
    traffic_tests = [item for item in session.items if item.path.name == "test_cuda_traffic.py"]
    if traffic_tests:
        traffic_tests[0].module.start_early()


def pytest_runtest_logreport(report):
    # rows travel in user_properties, so they reach the controlling process under pytest-xdist too
    if report.when == "call":
        _rows.extend(value for name, value in report.user_properties if name == ROW_PROPERTY)
        _cuda_rows.extend(value for name, value in report.user_properties if name == CUDA_ROW_PROPERTY)
        _traffic_rows.extend(value for name, value in report.user_properties if name == TRAFFIC_ROW_PROPERTY)


def _write_section(terminalreporter, title: str, text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    terminalreporter.section(title)
    for line in text.splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(table written to {path})")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    default = Path(tempfile.gettempdir()) / "pykernels-gpu-check" / "triton_aot.txt"
    path = Path(os.environ.get("PYKERNELS_GPU_CHECK_REPORT") or default)
    if _rows:
        text = f"{aot.format_table(_rows)}\n\n{aot.summary(_rows)}"
        _write_section(terminalreporter, "Triton AOT: resources per kernel, specialisation and target", text, path)
    if _cuda_rows:
        from . import test_cuda_resources as cuda

        text = f"{cuda.format_table(_cuda_rows)}\n\n{cuda.summary(_cuda_rows)}"
        _write_section(
            terminalreporter,
            "CUDA extension: resources per kernel and arch (cuobjdump)",
            text,
            path.with_name("cuda_resources.txt"),
        )
    if _traffic_rows:
        import json
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cuda_emu"))
        import traffic_report

        rows = sorted(_traffic_rows, key=lambda row: (row["op"], row["direction"], row["case"]))
        text = f"{traffic_report.format_table(rows)}\n\n{traffic_report.summary(rows)}"
        _write_section(
            terminalreporter,
            "CUDA kernels: global-memory traffic per op x direction (emulator, test_cuda_traffic.py)",
            text,
            path.with_name("cuda_traffic.txt"),
        )
        path.with_name("cuda_traffic.json").write_text(json.dumps(rows, indent=1) + "\n")
    triton_traffic = path.with_name("triton_traffic.txt")
    if triton_traffic.exists() and triton_traffic.stat().st_mtime >= _SESSION_START:
        _write_section(
            terminalreporter,
            "Triton kernels: global-memory traffic per launch (interpreter, test_triton_traffic.py)",
            triton_traffic.read_text().rstrip(),
            triton_traffic,
        )
