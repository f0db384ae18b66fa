"""bench/gpu_bench.py (``make gpu-bench``) on a machine without a GPU: the plan prints, a real run refuses cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_bench.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_every_stage_and_names_existing_files():
    proc = _run("--dry-run", "--deadline-s", "300")
    assert proc.returncode == 0, proc.stderr
    for stage in ("build", "correctness", "bench ops", "bench models", "compile", "report"):
        assert stage in proc.stdout
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
    for path in (*gpu_bench.SWEEP_FILES, *gpu_bench.OP_BENCH_FILES, gpu_bench.MODEL_BENCH):
        assert (ROOT / path).is_file(), path
    merged = gpu_bench.merge([{"machine_info": {"a": 1}, "benchmarks": [1, 2]}, {"benchmarks": [3]}])
    assert merged == {"machine_info": {"a": 1}, "benchmarks": [1, 2, 3]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_it_refuses_and_runs_nothing():
    proc = _run("--deadline-s", "60")
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
