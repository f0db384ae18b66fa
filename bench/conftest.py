"""Shared fixtures of the pykernels benchmarks (pytest-benchmark).

Every ``bench/bench_<stem>.py`` times providers side by side in one run and names them the same way, so that
``bench/report.py`` can put them in one table per case and compute ratios from that run alone:

* ``eager``             - the original module / composition (timm, torchvision, Hugging Face) in eager PyTorch;
* ``pykernels``         - the pykernels op or module (automatic backend; the backend that ran is recorded);
* ``compile-eager``     - ``torch.compile`` of the original;
* ``compile-pykernels`` - ``torch.compile`` of the pykernels version (custom ops: one opaque node each).

A bench parametrizes ``provider`` (and its case), builds its inputs, then hands one *step* (the work of one timed
iteration, e.g. forward + backward) to the ``bench`` fixture (:class:`Bench`), which

* warms up outside the timed region (the first call of a ``torch.compile`` provider compiles; its time is recorded
  as ``first_call_s``) and picks the number of rounds from a time budget;
* times each round with ``torch.cuda.synchronize()`` inside the timed callable and flushes the GPU's L2 cache
  (writes a 256 MB buffer) before each round, untimed; on CPU the benchmarked tensors are larger than the last-level
  cache, so no flush is done there;
* records in ``benchmark.extra_info``: provider, device name, ideal bytes moved and effective GB/s (memory-bound ops)
  or FLOPs and TFLOP/s (attention, with the formula given by the bench), the bytes of the tensors saved for
  backward (counted with ``torch.autograd.graph.saved_tensors_hooks``: unique storages, so the figure is the same on
  every device), and on CUDA the peak of ``torch.cuda.max_memory_allocated`` over one step.

The environment (device name, CPU model and threads or GPU name, torch / Triton / timm versions, the command) goes
into the JSON's ``machine_info["pykernels"]`` and ``pykernels_command``, where ``bench/report.py`` finds it.

Environment variables:

* ``PYKERNELS_BENCH_DEVICE``    - ``cpu`` or ``cuda`` (default: cuda when available, else cpu);
* ``PYKERNELS_BENCH_PROVIDERS`` - comma-separated providers to run (default: all);
* ``PYKERNELS_BENCH_BUDGET_S``  - seconds of timed rounds per benchmark (default 4.0 on CPU, 1.0 on CUDA);
* ``PYKERNELS_BENCH_SMOKE=1``   - tiny shapes, 2 rounds, one thread, no ``torch.compile`` providers
  (``tests/test_bench_smoke.py``; one thread: on a busy machine - the test suite runs two workers - OpenMP's
  threads wait on each other, and a step of milliseconds takes seconds);
* ``PYKERNELS_BENCH_REPORT``    - where the report of a ``--benchmark-only`` run goes (default ``bench/results``; no
  report in smoke mode unless set), ``0``: no report.

Progress and report: under ``--benchmark-only`` every case prints one line when it ends (``[done/total elapsed]``,
the node id, median and rounds, first-call time, the case's wall time), and at the end of the session
``bench/report.py`` turns the run's JSON (``--benchmark-json``, else ``<report dir>/latest.raw.json``) into
``<device-slug>.md`` / ``.json`` / ``.png``; a run of part of the suite (some files, ``-k``, ``-m``,
``PYKERNELS_BENCH_PROVIDERS``) is written as ``<device-slug>-subset.*`` instead, so it never overwrites the report of
a whole run.

Rounds are chosen here (``benchmark.pedantic``), so pytest-benchmark's ``--benchmark-min-rounds`` /
``--benchmark-max-time`` do not apply; ``--benchmark-disable`` runs each step once, untimed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

SMOKE = os.environ.get("PYKERNELS_BENCH_SMOKE", "0") not in ("", "0")
PROVIDERS = ("eager", "pykernels", "compile-eager", "compile-pykernels")
if SMOKE:
    torch.set_num_threads(1)
L2_FLUSH_BYTES = 256 * 1024 * 1024
BENCH_DIR = Path(__file__).resolve().parent
_LOAD_AT_START: list[float] = []  # the machine's 1/5/15-min load averages when the session started


# ---- environment -------------------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    """``PYKERNELS_BENCH_DEVICE`` if set, else cuda when available, else cpu."""
    name = os.environ.get("PYKERNELS_BENCH_DEVICE", "").strip().lower()
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise pytest.UsageError(f"PYKERNELS_BENCH_DEVICE={name} but torch.cuda.is_available() is False")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` on CUDA, ``"AMD EPYC (2 threads)"`` on CPU (torch's intra-op threads)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return __import__(module).__version__
    except Exception as exc:  # not installed, or a broken install
        return f"not available ({type(exc).__name__})"


@functools.cache
def env_info(device: torch.device) -> dict[str, Any]:
    """What a report must say about where it was measured."""
    from pykernels import backends

    ext_loaded, ext_reason = backends.extension_status()
    cuda = device.type == "cuda"
    info: dict[str, Any] = {
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "cuda_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "pykernels": _version("pykernels"),
        "pykernels_C": "loaded" if ext_loaded else ext_reason,
        "load_avg_at_start": _LOAD_AT_START or None,
        "smoke": SMOKE,
    }
    if cuda:
        info["device_slug"] = slugify(info["gpu_name"])
    else:
        info["device_slug"] = slugify(f"cpu {info['cpu_model']} {info['cpu_threads']}t")
    return info


# ---- measurement helpers ------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CacheFlusher:
    """Writes a 256 MB buffer before each round on CUDA, so that no round finds its inputs in L2; no-op on CPU."""

    def __init__(self, device: torch.device, nbytes: int = L2_FLUSH_BYTES):
        self.device = device
        self.buffer = torch.empty(nbytes // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()
            torch.cuda.synchronize(self.device)


def saved_tensor_bytes(forward: Callable[[], Any], inputs: Iterable[torch.Tensor] = ()) -> dict[str, int]:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs.

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` as unique storages (views of one tensor count once),
    so the figure does not depend on the device or the allocator. Works for ``torch.compile``d callables too (the
    compiled autograd function saves through the same hooks).

    Returns:
        ``saved_bytes`` (all saved storages), ``saved_extra_bytes`` (those that are not storages of ``inputs``:
        what backward keeps alive beyond the inputs) and ``saved_tensors`` (number of saved tensors).
    """
    storages: dict[tuple[int, str], int] = {}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out  # frees the graph (and what it saved)
    input_keys = {(t.untyped_storage().data_ptr(), str(t.device)) for t in inputs}
    return {
        "saved_bytes": sum(storages.values()),
        "saved_extra_bytes": sum(n for key, n in storages.items() if key not in input_keys),
        "saved_tensors": count,
    }


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class Bench:
    """What a bench does with one provider of one case: see the module docstring.

    Usage::

        def bench_x(bench, provider):
            bench.describe(op="x", case="...", provider=provider, shape=..., layout=..., dtype=...)
            fn = bench.compile(fn) if provider.startswith("compile-") else fn
            bench.run(step, forward=lambda: fn(*inputs), inputs=inputs, ideal_bytes=...)
    """

    def __init__(self, benchmark, device: torch.device):
        self.benchmark = benchmark
        self.device = device
        self.info = benchmark.extra_info
        self.info.update(device=str(device), device_name=device_name(device))

    def seed(self, seed: int = 0) -> None:
        torch.manual_seed(seed)

    def describe(self, *, op: str, case: str, provider: str, **info: Any) -> None:
        """Names the benchmark's group (one table of the report: ``op[case]``) and records what it measures."""
        self.benchmark.group = f"{op}[{case}]"
        self.info.update(op=op, case=case, provider=provider, **info)

    def compile(self, fn: Callable, **options: Any) -> Callable:
        """``torch.compile(fn, dynamic=False, **options)`` with dynamo's caches reset first (each provider compiles
        on its own; no recompilation limit is reached across cases)."""
        torch._dynamo.reset()
        options.setdefault("dynamic", False)
        self.info["compile_options"] = {k: v for k, v in options.items() if isinstance(v, (bool, int, str, type(None)))}
        return torch.compile(fn, **options)

    def run(
        self,
        step: Callable[[], Any],
        *,
        forward: Callable[[], Any] | None = None,
        inputs: Iterable[torch.Tensor] = (),
        ideal_bytes: int | None = None,
        flops: float | None = None,
        warmup: int = 3,
        warmup_rounds: int = 1,
        min_rounds: int = 5,
        max_rounds: int | None = None,
        budget_s: float | None = None,
    ) -> None:
        """Warm up, measure memory, time ``step`` and record the derived figures.

        Args:
            step: one timed iteration (e.g. forward + backward); its result is dropped inside the timed region.
            forward: the forward alone, for the saved-for-backward byte count (skipped when None).
            inputs: the step's input tensors (their storages are not counted as *extra* saved bytes).
            ideal_bytes: bytes an ideal kernel must move for one step -> ``gbps``.
            flops: floating-point operations of one step -> ``tflops`` (state the formula in ``extra_info``).
            warmup: untimed calls before timing, at least 1 (the first compiles a ``torch.compile`` provider; the
                last ones estimate a round: give 2 where the first call is not a step's time).
            warmup_rounds: pytest-benchmark's untimed rounds right before the timed ones (0 for slow steps).
            min_rounds, max_rounds, budget_s: rounds = budget_s / (time of one step), clamped.
        """
        device, info = self.device, self.info
        inputs = list(inputs)

        def timed() -> None:
            step()
            synchronize(device)

        # warm-up, untimed: the first call compiles (torch.compile) or loads kernels; the others estimate a round
        warmup = 1 if SMOKE else max(warmup, 1)
        times = []
        for _ in range(warmup):
            synchronize(device)
            start = time.perf_counter()
            timed()
            times.append(time.perf_counter() - start)
        info["first_call_s"] = round(times[0], 4)
        if ideal_bytes is not None:
            info["ideal_bytes"] = int(ideal_bytes)
        if flops is not None:
            info["flops"] = float(flops)
        if forward is not None:
            info.update(saved_tensor_bytes(forward, inputs))
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            timed()
            peak = torch.cuda.max_memory_allocated(device)
            info.update(peak_mem_bytes=peak, peak_mem_over_base_bytes=peak - base)  # over base: beyond the inputs

        flush = CacheFlusher(device)  # allocated after the peak-memory step: its 256 MB are not in that peak
        if SMOKE:
            rounds = 2
        else:
            if budget_s is None:
                budget_s = float(os.environ.get("PYKERNELS_BENCH_BUDGET_S", "4.0" if device.type == "cpu" else "1.0"))
            if max_rounds is None:
                max_rounds = 100 if device.type == "cpu" else 1000
            estimate = _median(times[1:]) if len(times) > 1 else times[0]
            rounds = int(min(max(budget_s / max(estimate, 1e-6), min_rounds), max_rounds))
        info["rounds"] = rounds
        warmup_rounds = 0 if SMOKE else warmup_rounds
        self.benchmark.pedantic(timed, setup=flush, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)

        stats = getattr(self.benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            median = stats.stats.median
            if ideal_bytes is not None:
                info["gbps"] = round(ideal_bytes / median / 1e9, 3)
            if flops is not None:
                info["tflops"] = round(flops / median / 1e12, 4)


# ---- fixtures and hooks ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def device() -> torch.device:
    return pick_device()


@pytest.fixture(scope="session")
def bench_env(device) -> dict[str, Any]:
    return env_info(device)


@pytest.fixture
def bench(benchmark, device) -> Bench:
    return Bench(benchmark, device)


def pytest_configure(config):
    _Session.config = config
    if hasattr(os, "getloadavg") and not _LOAD_AT_START:
        _LOAD_AT_START.extend(round(x, 2) for x in os.getloadavg())


def _selected_providers() -> set[str] | None:
    names = os.environ.get("PYKERNELS_BENCH_PROVIDERS", "").strip()
    return {n.strip() for n in names.split(",") if n.strip()} if names else None


def pytest_collection_modifyitems(config, items):
    """Deselect providers left out by ``PYKERNELS_BENCH_PROVIDERS``, and the ``compile-*`` ones in smoke mode."""
    wanted = _selected_providers()
    keep, drop = [], []
    for item in items:
        provider = getattr(getattr(item, "callspec", None), "params", {}).get("provider")
        skip = provider is not None and (
            (wanted is not None and provider not in wanted) or (SMOKE and provider.startswith("compile-"))
        )
        (drop if skip else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["pykernels"] = env_info(pick_device())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["pykernels_command"] = shlex.join(getattr(sys, "orig_argv", sys.argv))


# ---- progress lines and the report at the end of a --benchmark-only run ------------------------------------------


class _Session:
    """What the progress lines and the report need to know about the session."""

    total = 0
    done = 0
    start = 0.0
    deselected = 0
    subset = False
    config: pytest.Config | None = None
    lines: dict[str, str] = {}  # node id -> figures of its benchmark, from pytest_runtest_makereport


def _benchmark_only(config) -> bool:
    return bool(config.getoption("benchmark_only", default=False))


def _report_dir() -> Path | None:
    """``PYKERNELS_BENCH_REPORT``: a folder, ``0`` (no report), or unset (bench/results; none in smoke mode)."""
    value = os.environ.get("PYKERNELS_BENCH_REPORT", "").strip()
    if value == "0":
        return None
    if value:
        return Path(value)
    return None if SMOKE else BENCH_DIR / "results"


def pytest_deselected(items):
    _Session.deselected += len(items)


def pytest_collection_finish(session):
    config = session.config
    _Session.total, _Session.done, _Session.start = len(session.items), 0, time.perf_counter()
    bench_files = {p.name for p in BENCH_DIR.glob("bench_*.py")}
    collected = {item.path.name for item in session.items if item.path.parent == BENCH_DIR}
    _Session.subset = bool(_Session.deselected) or not bench_files <= collected
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if _benchmark_only(config) and reporter is not None and config.get_verbosity() <= 0:
        reporter.showfspath = False  # the progress lines name each case (no file name + dots line per case)
    bs = getattr(config, "_benchmarksession", None)
    out = _report_dir()
    if config.option.collectonly or not _benchmark_only(config) or out is None or bs is None:
        return
    if not getattr(bs, "json", None):
        out.mkdir(parents=True, exist_ok=True)
        bs.json = str(out / "latest.raw.json")  # pytest-benchmark writes it at session end (as --benchmark-json)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(fixture, "stats", None), "stats", None)
    if call.when == "call" and stats is not None:
        info = fixture.extra_info
        parts = [f"median {_human_s(stats.median)} x {stats.rounds} rounds"]
        if "first_call_s" in info:
            parts.append(f"1st call {_human_s(info['first_call_s'])}")
        if "saved_bytes" in info:
            parts.append(f"saved {info['saved_bytes'] / 2**20:.0f} MiB")
        _Session.lines[item.nodeid] = ", ".join(parts)
    return report


def _relpath(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it (the report names its command)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _human_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def pytest_report_teststatus(report, config):
    """Under ``--benchmark-only`` without ``-v``: no dot per benchmark (the progress line says it)."""
    if _benchmark_only(config) and config.get_verbosity() <= 0 and report.when == "call" and report.passed:
        return "passed", "", "PASSED"
    return None


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """One line per case under ``--benchmark-only``: ``[done/total elapsed] node id: figures (wall time)``."""
    if report.when == "setup" and report.passed:
        return
    if report.when == "teardown" and not report.failed:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _Session.done += 1
    config = _Session.config
    if config is None or not _benchmark_only(config):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    elapsed = int(time.perf_counter() - _Session.start)
    clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
    head = f"[{_Session.done:>{len(str(_Session.total))}}/{_Session.total} {clock}]"
    if report.passed:
        what = _Session.lines.pop(report.nodeid, "done")
    elif report.skipped:
        what = "skipped"
    else:
        what = f"{report.when} FAILED"
    reporter.write_line(f"{head} {report.nodeid}: {what} ({report.duration:.1f} s)")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The report of a ``--benchmark-only`` run (bench/report.py on the JSON pytest-benchmark has just written)."""
    bs = getattr(config, "_benchmarksession", None)
    raw = getattr(bs, "json", None)
    out = _report_dir()
    if not _benchmark_only(config) or out is None or not getattr(bs, "benchmarks", None) or not raw:
        return
    slug = env_info(pick_device())["device_slug"]
    name = f"{slug}-subset" if _Session.subset else slug
    terminalreporter.section("pykernels benchmark report")
    spec = importlib.util.spec_from_file_location("pykernels_bench_report", BENCH_DIR / "report.py")
    report = importlib.util.module_from_spec(spec)
    text = io.StringIO()
    try:
        spec.loader.exec_module(report)
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            report.main([_relpath(raw), "--out-dir", _relpath(out), "--name", name])
    except Exception as exc:  # the timings are in the JSON already: say what failed, do not lose the run
        text.write(f"bench/report.py failed on {raw}: {type(exc).__name__}: {exc}\n")
    for line in text.getvalue().splitlines():
        terminalreporter.write_line(line)
    if _Session.subset:
        terminalreporter.write_line(f"(part of the suite was run: written as {name}.*, not over {slug}.*)")
