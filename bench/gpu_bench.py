"""One shot on a lent GPU (``make gpu-bench``): build, check every GPU kernel there, benchmark, write the report.

For the day an H100 / H200 is lent for a few minutes: one command, no network, progress on every step, everything
inside a deadline (default 8 minutes: ``--deadline-s``), and whatever finished is written even if a later stage runs
out of time. Works with torch >= 2.11 and Triton >= 3.6 (the device machine's stack); needs pytest and
pytest-benchmark, uses pytest-xdist when installed. Stages, each with its share of the time left:

1. **extension** - ``pykernels._C`` with its CUDA kernels. When the checkout has none built for this torch, it is
   built here for the device's arch only (``PYKERNELS_CUDA_ARCHS``, ``MAX_JOBS`` = all cores, ``--build-timeout-s``).
   If nvcc is missing or the build fails, the run goes on without the ``cuda`` backend and says so in the report
   (the Triton kernels need no build).
2. **correctness** - the test files of every GPU kernel (``SWEEP_FILES``), the cases on the CUDA device only
   (``-k cuda``: the tests parametrize devices and backends, so ids carry ``cuda``): triton and cuda backends against
   the float64 oracles and torch, forward and every gradient. Failures are listed in the report, never hidden.
3. **benchmark** - the op benchmarks (drop_path, dwconv_ln, attention / MHSA, MBConv blocks) with the eager and
   pykernels providers, then the whole models (eval batch 8 and 32, the training step), then the ``torch.compile``
   providers of the op benchmarks, as long as time remains; each sub-stage is its own pytest run (a run cut by the
   deadline loses only its own rows).
4. **report** - ``bench/report.py`` on the merged rows: ``bench/results/<gpu-slug>.{md,json,png}`` (e.g.
   ``nvidia-h200.md``), plus ``<gpu-slug>-correctness.txt`` with the sweep's summary and the stages' timings.

Usage: ``python bench/gpu_bench.py [--deadline-s 480] [--skip-build] [--dry-run]``; ``--dry-run`` prints the plan
(stages, commands, budgets) without running anything and works without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SWEEP_FILES = (
    "tests/test_drop_path.py",
    "tests/test_drop_path_modules.py",
    "tests/test_dwconv_ln_kernel.py",
    "tests/test_dwconv_ln.py",
    "tests/test_attention_kernel.py",
    "tests/test_attention.py",
    "tests/test_mbconv_se_kernel.py",
    "tests/test_mbconv_se.py",
    "tests/test_convnext_block.py",
    "tests/test_mlp.py",
)
OP_BENCH_FILES = (
    "bench/bench_drop_path.py",
    "bench/bench_dwconv_ln.py",
    "bench/bench_attention.py",
    "bench/bench_mbconv_se.py",
)
MODEL_BENCH = "bench/bench_models.py"
# fractions of the deadline: stage budgets are min(share * deadline, time left - what the later stages need at least)
SHARES = {"build": 0.35, "correctness": 0.25, "ops": 0.2, "models": 0.2, "compile": 1.0}
REPORT_RESERVE_S = 25.0  # kept for the report stage


def log(start: float, message: str) -> None:
    print(f"[gpu-bench {time.monotonic() - start:6.1f}s] {message}", flush=True)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, capture: bool = False):
    """Run ``cmd`` from the repo root with a timeout; output streams through unless ``capture``. Returns (rc, text)."""
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            timeout=max(1.0, timeout),
            capture_output=capture,
            text=True,
        )
        return proc.returncode, (proc.stdout or "") + (proc.stderr or "")
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out


def _extension_status() -> str:
    """'cuda' (the extension loads with CUDA kernels), 'cpu-only', or why it does not load - in a child process (a
    stale .so built for another torch can abort the interpreter)."""
    code = (
        "import pykernels.backends as b\n"
        "ok, why = b.extension_status()\n"
        "print(('cuda' if b.has_compiled_kernel('drop_path_add_fwd', 'CUDA') else 'cpu-only') if ok else why)\n"
    )
    rc, out = _run([sys.executable, "-c", code], 120, capture=True)
    lines = out.strip().splitlines()
    return lines[-1] if rc == 0 and lines else f"not loadable: {(lines or ['?'])[-1][:200]}"


def stage_install(start: float, notes: list[str]) -> None:
    """``pykernels.triton_kernels`` lives in the top-level folder triton_kernels/ and maps into the package only once
    installed (setup.py's package_dir): a bare checkout gets an editable, pure-Python install (no network, no build)."""
    probe = [sys.executable, "-c", "import pykernels.triton_kernels"]
    if _run(probe, 120, capture=True)[0] == 0:
        return
    log(start, "pykernels is not installed here: pip install --no-build-isolation --no-deps -e . (no build)")
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    rc, out = _run(cmd, 180, env={"PYKERNELS_SKIP_BUILD": "1"}, capture=True)
    if rc != 0 or _run(probe, 120, capture=True)[0] != 0:
        notes.append("pykernels.triton_kernels not importable (editable install failed): Triton kernels not run")
        log(start, f"{notes[-1]}\n{out.strip()[-800:]}")


def stage_build(start: float, budget: float, skip: bool, notes: list[str]) -> bool:
    status = _extension_status()
    log(start, f"extension: {status}")
    if status == "cuda" or skip:
        if status != "cuda":
            notes.append(f"extension not built (--skip-build): {status}; the cuda backend did not run")
        return status == "cuda"
    import torch

    major, minor = torch.cuda.get_device_capability()
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        notes.append("no nvcc on this machine: the cuda backend did not run (Triton kernels only)")
        log(start, notes[-1])
        return False
    env = {"PYKERNELS_CUDA_ARCHS": f"{major}.{minor}", "MAX_JOBS": str(os.cpu_count() or 4)}
    log(start, f"building the extension for sm_{major}{minor} (budget {budget:.0f} s) ...")
    rc, out = _run([sys.executable, "setup.py", "build_ext", "--inplace"], budget, env=env, capture=True)
    if rc != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        notes.append(f"extension build failed (rc {rc}{', timed out' if rc == 124 else ''}): cuda backend not run")
        log(start, f"{notes[-1]}\n{tail}")
        return False
    status = _extension_status()
    log(start, f"extension built: {status}")
    if status != "cuda":
        notes.append(f"extension built but {status}: cuda backend not run")
    return status == "cuda"


def _xdist_args() -> list[str]:
    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(min(8, max(1, (os.cpu_count() or 2) // 2)))]


def stage_correctness(start: float, budget: float, notes: list[str]) -> str:
    cmd = [sys.executable, "-m", "pytest", *SWEEP_FILES, "-k", "cuda", "-q", "-p", "no:cacheprovider", "-rfE"]
    cmd += _xdist_args()
    log(start, f"correctness sweep on the device (budget {budget:.0f} s): {shlex.join(cmd[3:])}")
    rc, out = _run(cmd, budget, capture=True)
    tail = out.strip().splitlines()[-40:]
    for line in tail[-6:]:
        log(start, f"  {line}")
    verdict = {0: "passed", 124: "cut by the deadline"}.get(rc, f"FAILED (pytest rc {rc})")
    notes.append(f"correctness sweep: {verdict}")
    return "\n".join([shlex.join(cmd[3:]), f"verdict: {verdict}", *tail])


def stage_bench(start: float, name: str, files: list[str], budget: float, env: dict[str, str], k: str | None):
    out_json = RESULTS / f".gpu-bench-{name}.raw.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-only", "-q", "-p", "no:cacheprovider"]
    cmd += [f"--benchmark-json={out_json}"] + (["-k", k] if k else [])
    full_env = {"PYKERNELS_BENCH_DEVICE": "cuda", "PYKERNELS_BENCH_REPORT": "0", **env}
    log(start, f"bench {name} (budget {budget:.0f} s): {shlex.join(cmd[3:])}")
    rc, _ = _run(cmd, budget, env=full_env)
    if rc == 124:
        log(start, f"bench {name}: cut by the deadline, its rows are lost")
    if not out_json.exists():
        return None
    return json.loads(out_json.read_text())


def merge(runs: list[dict]) -> dict:
    merged = dict(runs[0])
    merged["benchmarks"] = [b for r in runs for b in r.get("benchmarks", [])]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline-s", type=float, default=480.0, help="wall-clock budget of the whole run")
    parser.add_argument("--build-timeout-s", type=float, default=None, help="cap of the build stage")
    parser.add_argument("--skip-build", action="store_true", help="never build the extension")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing (no GPU needed)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.deadline_s

    def left() -> float:
        return deadline - time.monotonic()

    def budget(stage: str, later_min: float) -> float:
        return max(0.0, min(SHARES[stage] * args.deadline_s, left() - later_min - REPORT_RESERVE_S))

    if args.dry_run:
        log(start, f"plan within {args.deadline_s:.0f} s:")
        cap = SHARES["build"] * args.deadline_s
        log(start, f"  1 build  (<= {cap:.0f} s, only if pykernels._C lacks CUDA kernels)")
        log(start, f"  2 correctness: pytest {' '.join(SWEEP_FILES)} -k cuda")
        log(start, f"  3 bench ops (eager, pykernels): {' '.join(OP_BENCH_FILES)}")
        log(start, f"  4 bench models (eager, pykernels; eval b8/b32, train b8): {MODEL_BENCH}")
        log(start, "  5 bench ops (compile-eager, compile-pykernels) with what time is left")
        log(start, "  6 report: bench/results/<gpu-slug>.{md,json,png} + <gpu-slug>-correctness.txt")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu-bench: no CUDA device here (torch.cuda.is_available() is False); nothing run", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    name = slug(gpu)
    import triton

    log(start, f"{gpu}, torch {torch.__version__}, Triton {triton.__version__}, deadline {args.deadline_s:.0f} s")
    notes: list[str] = []
    stage_install(start, notes)
    build_cap = args.build_timeout_s or SHARES["build"] * args.deadline_s
    has_cuda = stage_build(start, min(build_cap, budget("build", 150)), args.skip_build, notes)
    correctness = stage_correctness(start, budget("correctness", 120), notes)

    runs = []
    plain = {"PYKERNELS_BENCH_PROVIDERS": "eager,pykernels", "PYKERNELS_BENCH_BUDGET_S": "0.5"}
    stages = [
        ("ops", list(OP_BENCH_FILES), plain, None, 60),
        ("models", [MODEL_BENCH], {**plain, "PYKERNELS_BENCH_BUDGET_S": "1.0"}, "b8 or b32", 0),
        ("compile", list(OP_BENCH_FILES), {"PYKERNELS_BENCH_PROVIDERS": "compile-eager,compile-pykernels"}, None, 0),
    ]
    for stage, files, env, k, later in stages:
        b = budget(stage, later)
        if b < 20:
            notes.append(f"bench {stage}: skipped, {left():.0f} s left")
            log(start, notes[-1])
            continue
        run = stage_bench(start, stage, files, b, env, k)
        if run is None:
            notes.append(f"bench {stage}: no rows (cut by the deadline or failed)")
        else:
            runs.append(run)
            notes.append(f"bench {stage}: {len(run.get('benchmarks', []))} rows")

    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = [
        f"# gpu-bench on {gpu}",
        f"torch {torch.__version__}, Triton {triton.__version__}, cuda backend built: {has_cuda}",
        f"wall {time.monotonic() - start:.0f} s of {args.deadline_s:.0f} s",
        *notes,
        "",
        correctness,
    ]
    (RESULTS / f"{name}-correctness.txt").write_text("\n".join(summary) + "\n")
    if runs:
        raw = RESULTS / f"{name}.raw.json"
        raw.write_text(json.dumps(merge(runs)))
        rc, out = _run([sys.executable, "bench/report.py", str(raw), "--name", name], max(10.0, left()), capture=True)
        log(start, f"report: rc {rc} {out.strip().splitlines()[-1] if out.strip() else ''}")
    for note in notes:
        log(start, note)
    log(start, f"wrote bench/results/{name}.* ({time.monotonic() - start:.0f} s)")
    return 0 if "correctness sweep: passed" in notes else 1


if __name__ == "__main__":
    sys.exit(main())
