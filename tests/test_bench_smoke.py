"""Smoke test of the benchmark suite: bench/bench_drop_path.py at tiny shapes, then bench/report.py on its JSON.

Runs both in subprocesses (``PYKERNELS_BENCH_SMOKE=1``: tiny shapes, 2 rounds, no ``torch.compile`` providers) and
writes only under ``tmp_path``, never into ``bench/results/``. It checks that the suite collects and runs, that
each benchmark records what the report needs, and that the report writes its markdown, JSON and PNG with every
provider and case in them. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PROVIDERS = ("eager", "pykernels")
CASES = ("convnext_t-s1-nchw", "convnext_t-s1-channels_last", "vit_s-tokens")


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYKERNELS_BENCH_"))}
    env.update(PYKERNELS_BENCH_SMOKE="1", PYKERNELS_BENCH_DEVICE="cpu", MPLBACKEND="Agg", MPLCONFIGDIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, (
        f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def _run_bench(path: str, tmp_path: Path) -> Path:
    """Run one bench file in smoke mode; returns the pytest-benchmark JSON it wrote."""
    raw_path = tmp_path / "raw.json"
    _run(
        [
            "-m",
            "pytest",
            path,
            "--benchmark-only",
            f"--benchmark-json={raw_path}",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "--benchmark-columns=median,rounds",
        ],
        tmp_path,
    )
    return raw_path


def test_bench_drop_path_and_report(tmp_path):
    raw_path = _run_bench("bench/bench_drop_path.py", tmp_path)
    raw = json.loads(raw_path.read_text())
    benches = raw["benchmarks"]
    assert {(b["extra_info"]["case"], b["extra_info"]["provider"]) for b in benches} == {
        (c, p) for c in CASES for p in SMOKE_PROVIDERS
    }
    for b in benches:
        info = b["extra_info"]
        assert info["backend"] in ("torch eager", "cpp", "torch"), info
        assert info["ideal_bytes"] == 6 * 4 * _numel(info["shape"])
        assert info["saved_bytes"] > 0 and info["gbps"] > 0 and b["stats"]["rounds"] == 2
    assert raw["machine_info"]["pykernels"]["device_type"] == "cpu"
    assert "--benchmark-only" in raw["pykernels_command"]

    out_dir = tmp_path / "out"
    result = _run(["bench/report.py", str(raw_path), "--out-dir", str(out_dir), "--name", "smoke"], tmp_path)
    md_path, json_path, png_path = (out_dir / f"smoke{ext}" for ext in (".md", ".json", ".png"))
    assert str(md_path) in result.stdout
    assert png_path.stat().st_size > 1000

    markdown = md_path.read_text()
    env = raw["machine_info"]["pykernels"]
    for needle in (
        env["device_name"],
        f"torch | {env['torch']}",
        f"Triton | {env['triton']}",
        "--benchmark-only",
        "vs eager (×)",
        "vs compile-eager (×)",
        "saved for bwd MB",
        "GB/s",
        "median ms",
    ):
        assert needle in markdown, needle
    for case in CASES:
        assert f"## drop_path_add[{case}]" in markdown
    for provider in SMOKE_PROVIDERS:
        assert f"| `{provider}` |" in markdown

    summary = json.loads(json_path.read_text())
    assert set(summary["cases"]) == {f"drop_path_add[{c}]" for c in CASES}
    for case in summary["cases"].values():
        providers = case["providers"]
        assert set(providers) == set(SMOKE_PROVIDERS)
        assert providers["eager"]["vs_eager"] == 1.0
        assert providers["pykernels"]["vs_compile_eager"] is None  # no compile-eager in this run: no ratio invented
        ratio = providers["eager"]["median_ms"] / providers["pykernels"]["median_ms"]
        assert abs(providers["pykernels"]["vs_eager"] - ratio) < 0.01 * ratio + 1e-3


def _numel(shape: list[int]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


def test_bench_attention_smoke(tmp_path):
    """bench/bench_attention.py collects and runs every non-compile provider in both modes, recording TFLOP/s."""
    benches = json.loads(_run_bench("bench/bench_attention.py", tmp_path).read_text())["benchmarks"]
    seen = {(b["extra_info"]["case"], b["extra_info"]["provider"]) for b in benches}
    assert seen == {
        (f"vit_s-{m}", p) for m in ("fwd", "fwd_bwd") for p in ("eager", "eager-explicit", "nn-mha", "pykernels")
    }
    for b in benches:
        info = b["extra_info"]
        assert info["flops"] > 0 and "tflops" in info, info  # tiny shapes: the rounded figure may be 0.0
        if info["provider"] == "pykernels":
            assert info["backend"] == "torch"  # CPU: SDPA through pykernels::attention


def test_bench_dwconv_ln_smoke(tmp_path):
    """bench/bench_dwconv_ln.py runs the op and the whole-block cases, both modes, every non-compile provider, with
    GB/s and the saved-for-backward bytes of the train step; pykernels' op runs a compiled or reference backend."""
    benches = json.loads(_run_bench("bench/bench_dwconv_ln.py", tmp_path).read_text())["benchmarks"]
    seen = {(b["extra_info"]["op"], b["extra_info"]["case"], b["extra_info"]["provider"]) for b in benches}
    assert seen == {
        (op, f"{case}-{m}", p)
        for op, cases in (("dwconv_ln", ("s1", "s1-cl")), ("convnext_block", ("s1",)))
        for case in cases
        for m in ("fwd", "fwd_bwd")
        for p in ("eager", "pykernels")
    }
    for b in benches:
        info = b["extra_info"]
        assert info["ideal_bytes"] == (2 if info["case"].endswith("-fwd") else 5) * _numel(info["shape"]) * 4
        assert "gbps" in info, info
        if info["case"].endswith("fwd_bwd"):
            assert info["saved_bytes"] > 0, info
        if info["provider"] == "pykernels":
            assert info["backend"] in ("cpp", "torch"), info


def test_bench_mbconv_se_smoke(tmp_path):
    """bench/bench_mbconv_se.py collects and runs its block cases (eval and train) for the non-compile providers,
    recording saved-for-backward bytes on the train steps."""
    benches = json.loads(_run_bench("bench/bench_mbconv_se.py", tmp_path).read_text())["benchmarks"]
    seen = {(b["extra_info"]["op"], b["extra_info"]["case"], b["extra_info"]["provider"]) for b in benches}
    assert seen == {("mbconv_block", f"smoke-{m}", p) for m in ("fwd", "fwd_bwd") for p in SMOKE_PROVIDERS}
    for b in benches:
        info = b["extra_info"]
        if "train" in info["case"] or "bwd" in info["case"]:
            assert info["saved_bytes"] > 0, info


def test_bench_models_smoke(tmp_path):
    """bench/bench_models.py runs its whole-model cases (two models at 32x32: eval at batch 1 and a training step)
    for the non-compile providers; the swapped rows say what was swapped (attention included for the ViT), training
    rows record saved-for-backward bytes, and the report writes its files from the run."""
    raw_path = _run_bench("bench/bench_models.py", tmp_path)
    benches = json.loads(raw_path.read_text())["benchmarks"]
    seen = {(b["extra_info"]["op"], b["extra_info"]["case"], b["extra_info"]["provider"]) for b in benches}
    assert seen == {
        ("model", f"{model}-{case}", p)
        for model in ("convnext_nano", "vit_small_patch16_224")
        for case in ("b1-eval", "b2-train_step")
        for p in SMOKE_PROVIDERS
    }
    for b in benches:
        info = b["extra_info"]
        assert info["shape"][0] == (2 if "train" in info["case"] else 1), info
        if "train" in info["case"]:
            assert info["saved_bytes"] > 0, info
        if info["provider"] == "pykernels":
            kind = "convnext_block" if info["model"] == "convnext_nano" else "attention"
            assert info["backend"].startswith("swapped ") and kind in info["backend"], info

    out_dir = tmp_path / "out"
    _run(["bench/report.py", str(raw_path), "--out-dir", str(out_dir), "--name", "smoke"], tmp_path)
    assert (out_dir / "smoke.png").stat().st_size > 1000
    summary = json.loads((out_dir / "smoke.json").read_text())
    assert set(summary["cases"]) == {
        f"model[{m}-{c}]" for m in ("convnext_nano", "vit_small_patch16_224") for c in ("b1-eval", "b2-train_step")
    }
