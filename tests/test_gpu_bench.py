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


def test_gpu_time_model_is_a_roofline_and_labels_every_figure(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_model
    finally:
        sys.path.remove(str(SCRIPT.parent))
    h100 = gpu_model.GPUS[0]
    # memory-bound: 3.35 GB at 3.35 TB/s is 1 ms; compute-bound: 989 GFLOP on the tensor cores is 1 ms
    assert gpu_model.predict(3.35e9, 0, True, h100) == pytest.approx(1e-3)
    assert gpu_model.predict(0, 989e9, True, h100) == pytest.approx(1e-3)
    assert gpu_model.predict(0, 67e9, False, h100) == pytest.approx(1e-3)
    out = tmp_path / "model.md"
    assert gpu_model.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert "model, not measured" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    ops = {line.split(" | ")[0].strip("| ") for line in rows}
    assert {"drop_path_add", "dwconv_ln", "attention"} <= ops and any(o.startswith("mbconv_se") for o in ops)
    for line in rows:  # every row: modelled bytes at or above the op's minimum, a finite speed-up
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[5].split(" ")[0]) >= float(cells[4]) * 0.999
        assert cells[-1].endswith("x") and float(cells[-1][:-1]) > 0
