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
* ``PYKERNELS_BENCH_SMOKE=1``   - tiny shapes, 2 rounds, no ``torch.compile`` providers (``tests/test_bench_smoke.py``).

Rounds are chosen here (``benchmark.pedantic``), so pytest-benchmark's ``--benchmark-min-rounds`` /
``--benchmark-max-time`` do not apply; ``--benchmark-disable`` runs each step once, untimed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
import torch

SMOKE = os.environ.get("PYKERNELS_BENCH_SMOKE", "0") not in ("", "0")
PROVIDERS = ("eager", "pykernels", "compile-eager", "compile-pykernels")
L2_FLUSH_BYTES = 256 * 1024 * 1024
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
            warmup: untimed calls before timing (the first compiles a ``torch.compile`` provider).
            min_rounds, max_rounds, budget_s: rounds = budget_s / (time of one step), clamped.
        """
        device, info = self.device, self.info
        inputs = list(inputs)

        def timed() -> None:
            step()
            synchronize(device)

        # warm-up, untimed: the first call compiles (torch.compile) or loads kernels; the others estimate a round
        warmup = 1 if SMOKE else max(warmup, 2)
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
        self.benchmark.pedantic(timed, setup=flush, rounds=rounds, iterations=1, warmup_rounds=0 if SMOKE else 1)

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
