"""Global-memory traffic of the Triton kernels, counted lane by lane under the Triton interpreter.

Library and CLI (issue 13, Triton side). Under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` / atomic of a
kernel reaches ``triton.runtime.interpreter.InterpreterBuilder`` with the raw CPU addresses of its lanes and the lane
mask. :func:`count_traffic` patches those methods (``create_masked_load``, ``create_masked_store`` - which the
unmasked ``create_load`` / ``create_store`` and the tensor-descriptor loads / stores call -, ``create_atomic_rmw``,
``create_atomic_cas``) and ``GridExecutor.__call__`` (one call = one kernel launch: the kernel's name and arguments)
and records per launch:

* bytes read / written as requested (active lanes x element size: what the kernel asks of the memory system),
* distinct bytes read / written (unique addresses x element size) and distinct 32-byte sectors read / written
  (the DRAM granule: the DRAM estimate, assuming each launch's distinct sectors come from / go to DRAM once),
* atomics (count of active lanes, bytes), lanes masked off / total lanes of every memory access,
* per tensor argument (addresses mapped through each argument's data_ptr, shape and strides; a strided view such as
  q / k / v of one packed qkv tensor is told apart from its neighbours): requested and distinct bytes, i.e. how many
  times the kernel read each element of it.

:func:`gpu_configs` makes the launchers pick the tiles they ship on CUDA instead of their bigger interpreter tiles:
each kernel module's ``interpreting`` (imported by name from ``_common``) returns False, ``torch.cuda
.get_device_properties`` describes an H100 SXM (132 SMs, 227 KB opt-in shared memory per block: the sm_90 limit), and
the autotuned attention kernels run the first config the launcher's own pruner keeps for that head dim / dtype at that
limit (the pruner of ``triton_kernels/attention.py``, read at run time; a real autotuner would time the kept configs
and may pick another).

The cases (:data:`CASES`) are the benchmark shapes of ``bench/bench_*.py`` in the CUDA benchmark dtype (float16;
drop_path_add: float32, as its benchmark), scaled down so that each runs in seconds under the interpreter (each row
states its scale), through the public ops with ``backend="triton"``: forward, then ``torch.autograd.grad`` of every
input the benchmark differentiates. Each op x direction x case row compares the traffic with
:func:`traffic_minimum.minimum_bytes` (every input read once, every output written once, plus the saved tensors).
Work done by torch between the launches (the final sums of per-tile partials, dtype casts, ``zeros_like``) is not
counted: only Triton launches.

CLI::

    TRITON_INTERPRET=1 python tests/gpu_check/traffic.py [-k SUBSTRING] [--out rows.json] [--txt table.txt]
        [--module-file dwconv_ln=/path/to/old/dwconv_ln.py]   # measure another version of a kernel module

(``TRITON_INTERPRET=1`` is set by the script itself when missing.) ``--out bench/results/gpu-traffic-triton.json``
regenerates the committed file. ``--selftest`` prints the counts of a hand-written masked copy kernel (what
test_triton_traffic.py checks).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __name__ == "__main__":  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

try:  # package (pytest) or script mode
    from . import traffic_minimum
except ImportError:  # pragma: no cover - script mode
    import traffic_minimum  # type: ignore[no-redef]

SECTOR = 32  # bytes: the DRAM / L2 access granule of NVIDIA GPUs since Volta
KERNEL_MODULES = ("drop_path", "dwconv_ln", "attention", "mbconv_se")
# H100 SXM, as the launchers see it through torch.cuda.get_device_properties
SM90_PROPERTIES = SimpleNamespace(
    name="NVIDIA H100 (modelled by tests/gpu_check/traffic.py)",
    major=9,
    minor=0,
    multi_processor_count=132,
    shared_memory_per_block_optin=227 * 1024,
    shared_memory_per_block=48 * 1024,
    total_memory=80 * 1024**3,
    warp_size=32,
)
ATTENTION_KINDS = {
    "_attention_fwd_kernel": "fwd",
    "_attention_bwd_dkdv_kernel": "dkdv",
    "_attention_bwd_dq_kernel": "dq",
}


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- the counter -----------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch: raw accesses while it runs, then a summary (:meth:`finish`)."""

    kernel: str
    phase: str
    tensors: list[tuple[str, torch.Tensor]]
    constexprs: dict[str, Any]
    config: str = ""
    grid: tuple[int, ...] = ()
    reads: list[tuple[np.ndarray, int]] = field(default_factory=list)
    writes: list[tuple[np.ndarray, int]] = field(default_factory=list)
    atomics: int = 0
    atomic_bytes: int = 0
    lanes: int = 0
    lanes_off: int = 0
    instructions: list[tuple[str, int, int, int]] = field(default_factory=list)  # kind, first address, lanes, off
    summary: dict[str, Any] = field(default_factory=dict)

    def access(self, kind: str, ptrs, mask) -> None:
        from triton.runtime.interpreter import _get_np_dtype

        size = _get_np_dtype(ptrs.get_element_ty()).itemsize
        addresses = np.asarray(ptrs.data).reshape(-1).view(np.int64)
        if mask is None:
            active = addresses
        else:
            lanes_on = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).reshape(-1)
            active = addresses[lanes_on]
        self.lanes += addresses.size
        self.lanes_off += addresses.size - active.size
        self.instructions.append(
            (kind, int(active[0]) if active.size else -1, addresses.size, addresses.size - active.size)
        )
        if kind == "atomic":
            self.atomics += active.size
            self.atomic_bytes += active.size * size
            self.reads.append((active.copy(), size))
            self.writes.append((active.copy(), size))
        else:
            (self.reads if kind == "read" else self.writes).append((active.copy(), size))

    def finish(self) -> dict[str, Any]:
        read = _stats(self.reads)
        written = _stats(self.writes)
        per_tensor = self._per_tensor()
        self.summary = {
            "kernel": self.kernel,
            "phase": self.phase,
            "grid": list(self.grid),
            "config": self.config or _config_text(self.constexprs),
            "bytes_read": read["bytes"],
            "bytes_written": written["bytes"],
            "distinct_read": read["distinct"],
            "distinct_written": written["distinct"],
            "sectors": read["sectors"] + written["sectors"],
            "sectors_read": read["sectors"],
            "sectors_written": written["sectors"],
            "atomics": {"count": self.atomics, "bytes": self.atomic_bytes},
            "masked_off_fraction": round(self.lanes_off / self.lanes, 4) if self.lanes else 0.0,
            "lanes": self.lanes,
            "lanes_off": self.lanes_off,
            "tensors": per_tensor,
        }
        self.reads, self.writes, self.tensors, self.instructions = [], [], [], []  # free the addresses
        return self.summary

    def _per_tensor(self) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        for kind, accesses in (("read", self.reads), ("written", self.writes)):
            if not accesses:
                continue
            addresses = np.concatenate([a for a, _ in accesses])
            sizes = np.concatenate([np.full(a.size, s, dtype=np.int64) for a, s in accesses])
            unique, first, counts = np.unique(addresses, return_index=True, return_counts=True)
            unique_sizes = sizes[first]
            owner = np.full(unique.size, -1, dtype=np.int64)
            for index, (_, tensor) in enumerate(self.tensors):
                free = owner < 0
                if not free.any():
                    break
                owner[free] = np.where(_members(unique[free], tensor), index, -1)
            for index in np.unique(owner):
                picked = owner == index
                name = self.tensors[index][0] if index >= 0 else "(no tensor argument)"
                row = rows.setdefault(name, _tensor_row(self.tensors[index][1] if index >= 0 else None))
                row[kind] = int((counts[picked] * unique_sizes[picked]).sum())
                row[f"distinct_{kind}"] = int(unique_sizes[picked].sum())
        self._lanes_per_tensor(rows)
        for name, row in rows.items():
            row["name"] = name
            for kind in ("read", "written"):
                row.setdefault(kind, 0)
                row.setdefault(f"distinct_{kind}", 0)
            row["reads_per_byte"] = round(row["read"] / row["distinct_read"], 3) if row["distinct_read"] else 0.0
        return [rows[name] for name in sorted(rows, key=lambda n: -(rows[n]["read"] + rows[n]["written"]))]

    def _lanes_per_tensor(self, rows: dict[str, dict[str, Any]]) -> None:
        """Lanes and masked-off lanes of the loads / stores of each tensor (an access belongs to the tensor of its
        first active lane; fully masked accesses to none)."""
        if not self.instructions:
            return
        first = np.array([address for _, address, _, _ in self.instructions], dtype=np.int64)
        owner = np.full(first.size, -1, dtype=np.int64)
        for index, (_, tensor) in enumerate(self.tensors):
            free = owner < 0
            owner[free] = np.where(_members(first[free], tensor), index, -1)
        for (kind, address, lanes, off), index in zip(self.instructions, owner.tolist(), strict=True):
            if index < 0:
                name = "(no tensor argument)" if address >= 0 else "(fully masked accesses)"
            else:
                name = self.tensors[index][0]
            row = rows.setdefault(name, _tensor_row(self.tensors[index][1] if index >= 0 else None))
            prefix = "store" if kind == "write" else "load"
            row[f"{prefix}_lanes"] = row.get(f"{prefix}_lanes", 0) + lanes
            row[f"{prefix}_lanes_off"] = row.get(f"{prefix}_lanes_off", 0) + off
        for row in rows.values():
            for prefix in ("load", "store"):
                lanes = row.get(f"{prefix}_lanes", 0)
                row[f"{prefix}_masked_off_fraction"] = (
                    round(row.get(f"{prefix}_lanes_off", 0) / lanes, 4) if lanes else 0.0
                )


def _stats(accesses: list[tuple[np.ndarray, int]]) -> dict[str, int]:
    if not accesses:
        return {"bytes": 0, "distinct": 0, "sectors": 0}
    total = sum(a.size * s for a, s in accesses)
    distinct = 0
    for size in sorted({s for _, s in accesses}):
        distinct += np.unique(np.concatenate([a for a, s in accesses if s == size])).size * size
    # elements are aligned to their size (<= 8 bytes), so none straddles a 32-byte sector
    sectors = np.unique(np.concatenate([a // SECTOR for a, _ in accesses])).size
    return {"bytes": int(total), "distinct": int(distinct), "sectors": int(sectors)}


def _members(addresses: np.ndarray, tensor: torch.Tensor) -> np.ndarray:
    """Which addresses are elements of ``tensor`` (its data_ptr, shape and strides; stride-0 dims broadcast)."""
    size = tensor.element_size()
    offset = addresses - tensor.data_ptr()
    ok = (offset >= 0) & (offset % size == 0)
    index = offset // size
    dims = sorted(
        (
            (stride, extent)
            for stride, extent in zip(tensor.stride(), tensor.shape, strict=True)
            if extent > 1 and stride
        ),
        reverse=True,
    )
    if any(extent == 0 for extent in tensor.shape):
        return np.zeros(addresses.shape, dtype=bool)
    for stride, extent in dims:
        quotient = index // stride
        ok &= quotient < extent
        index = index - quotient * stride
    return ok & (index == 0)


def _tensor_row(tensor: torch.Tensor | None) -> dict[str, Any]:
    if tensor is None:
        return {"shape": None, "dtype": None}
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _config_text(constexprs: dict[str, Any]) -> str:
    keys = [k for k in constexprs if k.startswith("BLOCK") or k in ("num_warps", "num_stages", "CHUNKED", "STRIDE")]
    return " ".join(f"{k}={constexprs[k]}" for k in keys)


def _merge_aliases(named) -> list[tuple[str, torch.Tensor]]:
    """One entry per distinct view: arguments that pass the same tensor (a launcher's stand-in for an absent optional
    argument, ``lse`` as the unused dbias buffer) are named together, ``"DBIAS=LSE"``."""
    merged: dict[tuple, tuple[str, torch.Tensor]] = {}
    for name, tensor in named:
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        merged[key] = (f"{merged[key][0]}={name}", tensor) if key in merged else (name, tensor)
    return list(merged.values())


class Recorder:
    """What :func:`count_traffic` yields: ``launches`` (summaries, in launch order) and the current ``phase`` label."""

    def __init__(self) -> None:
        self.launches: list[dict[str, Any]] = []
        self.phase = ""
        self.current: Launch | None = None
        self.next_config = ""

    def take(self, phase: str | None = None) -> list[dict[str, Any]]:
        """The summaries recorded so far (of ``phase`` only, if given), removed from the recorder."""
        taken = [s for s in self.launches if phase is None or s["phase"] == phase]
        self.launches = [s for s in self.launches if s not in taken]
        return taken


@contextlib.contextmanager
def count_traffic():
    """Count every global memory access of every Triton kernel launched inside (``TRITON_INTERPRET=1`` only)."""
    if not interpreter_active():
        raise RuntimeError("count_traffic needs the Triton interpreter: set TRITON_INTERPRET=1 before importing triton")
    from triton.runtime import interpreter as I  # noqa: N812

    recorder = Recorder()
    builder = I.InterpreterBuilder
    saved = {
        name: getattr(builder, name)
        for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    }
    saved_grid_dim = builder.set_grid_dim
    saved_call = I.GridExecutor.__call__

    def masked_load(self, ptrs, mask, *args, **kwargs):
        if recorder.current is not None:
            recorder.current.access("read", ptrs, mask)
        return saved["create_masked_load"](self, ptrs, mask, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        if recorder.current is not None:
            recorder.current.access("write", ptrs, mask)
        return saved["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(self, rmw_op, ptr, val, mask, *args, **kwargs):
        if recorder.current is not None:
            recorder.current.access("atomic", ptr, mask)
        return saved["create_atomic_rmw"](self, rmw_op, ptr, val, mask, *args, **kwargs)

    def atomic_cas(self, ptr, cmp, val, *args, **kwargs):
        if recorder.current is not None:
            recorder.current.access("atomic", ptr, None)
        return saved["create_atomic_cas"](self, ptr, cmp, val, *args, **kwargs)

    def set_grid_dim(self, *grid):
        if recorder.current is not None:
            recorder.current.grid = tuple(int(g) for g in grid)
        return saved_grid_dim(self, *grid)

    def grid_call(self, *args_dev, **kwargs):
        tensors = _merge_aliases(
            (name, value)
            for name, value in (*zip(self.arg_names, args_dev), *kwargs.items())
            if isinstance(value, torch.Tensor)
        )
        constexprs = {k: v for k, v in kwargs.items() if k in self.constexprs or k in ("num_warps", "num_stages")}
        launch = Launch(self.fn.__name__, recorder.phase, tensors, constexprs, config=recorder.next_config)
        recorder.next_config = ""
        if recorder.current is not None:
            raise RuntimeError("nested kernel launches")
        recorder.current = launch
        try:
            return saved_call(self, *args_dev, **kwargs)
        finally:
            recorder.current = None
            recorder.launches.append(launch.finish())

    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    builder.create_atomic_rmw = atomic_rmw
    builder.create_atomic_cas = atomic_cas
    builder.set_grid_dim = set_grid_dim
    I.GridExecutor.__call__ = grid_call
    try:
        yield recorder
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        builder.set_grid_dim = saved_grid_dim
        I.GridExecutor.__call__ = saved_call


# ---- the tiles the launchers ship on CUDA ----------------------------------------------------------------------------


@contextlib.contextmanager
def gpu_configs(recorder: Recorder | None = None, scale: float = 1.0):
    """Inside: the launchers of ``pykernels.triton_kernels`` choose their CUDA tiles for CPU tensors (see module doc).
    ``recorder`` (optional) receives the attention config chosen per launch.

    ``scale`` (measured elements / benchmark elements of the case) shrinks the modelled device with the problem: the
    launchers size some grids from the device, not the tensors (drop_path_add's backward: 4 programs per SM, each
    writing a row of fp32 partial sums; dwconv_ln / mbconv_se grad_weight: about ``DW_TARGET_PROGRAMS`` programs, each
    writing a (C, k, k) fp32 partial). At a scaled-down shape those partials would weigh as much as the tensors; with
    the SM count and ``DW_TARGET_PROGRAMS`` multiplied by ``scale`` (at least 1) they keep the share they have at the
    benchmark shape."""
    modules = [importlib.import_module(f"pykernels.triton_kernels.{stem}") for stem in KERNEL_MODULES]
    saved = [(m, m.interpreting) for m in modules if hasattr(m, "interpreting")]
    saved_props = torch.cuda.get_device_properties
    attention = importlib.import_module("pykernels.triton_kernels.attention")
    saved_launch = attention._launch

    def launch(kernel, grid_fn, interp, *args, **kwargs):
        # the autotuner's choice, modelled: the first config the launcher's pruner keeps (sm_90 shared memory)
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        kind = ATTENTION_KINDS[kernel.fn.__name__]
        kept = attention._pruner(kind)(kernel.configs, named)
        config = kept[0]
        meta = dict(config.kwargs)
        if recorder is not None:
            recorder.next_config = (
                f"BLOCK_M={meta['BLOCK_M']} BLOCK_N={meta['BLOCK_N']} BLOCK_D={kwargs.get('BLOCK_D')} "
                f"num_warps={config.num_warps} num_stages={config.num_stages} (1st of {len(kept)} kept)"
            )
        kernel.fn[grid_fn(meta)](*args, **kwargs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)

    properties = SimpleNamespace(**vars(SM90_PROPERTIES))
    properties.multi_processor_count = max(1, round(SM90_PROPERTIES.multi_processor_count * scale))
    targets = [(m, m.DW_TARGET_PROGRAMS) for m in modules if hasattr(m, "DW_TARGET_PROGRAMS")]
    for module, _ in saved:
        module.interpreting = lambda t: False
    for module, target in targets:
        module.DW_TARGET_PROGRAMS = max(1, round(target * scale))
    torch.cuda.get_device_properties = lambda device=None: properties
    attention._launch = launch
    try:
        yield
    finally:
        for module, fn in saved:
            module.interpreting = fn
        for module, target in targets:
            module.DW_TARGET_PROGRAMS = target
        torch.cuda.get_device_properties = saved_props
        attention._launch = saved_launch


# ---- cases -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark shape, scaled: ``build(dtype) -> (forward, backward, minimum kwargs)``; ``forward()`` returns what
    ``backward(result)`` differentiates."""

    op: str
    case: str
    bench_shape: tuple
    measured_shape: tuple
    scale_note: str
    dtype: torch.dtype
    build: Callable[[], tuple[Callable, Callable, dict]]
    gated: bool = True  # memory-bound: checked against the 1.3x rule

    @property
    def scale(self) -> float:
        """Measured elements / benchmark elements."""
        return math.prod(self.measured_shape) / math.prod(self.bench_shape)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.case}"


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, generator, requires_grad=False, channels_last=False):
    t = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def _drop_path_case(case_id, bench_shape, shape, layout, dtype, need_grad_gamma=True):
    def build():
        import pykernels.functional as PF

        g = _seeded()
        channels_last = layout == "channels_last"
        shortcut = _randn(shape, dtype, g, True, channels_last)
        branch = _randn(shape, dtype, g, True, channels_last)
        channels = shape[1] if layout != "BNC" else shape[-1]
        gamma_shape = (channels,) if layout == "BNC" else (channels, 1, 1)
        gamma = (0.1 * torch.rand(gamma_shape, generator=g) + 0.05).to(dtype).requires_grad_(need_grad_gamma)
        grad_out = _randn(shape, dtype, g, False, channels_last)
        inputs = (shortcut, branch, gamma) if need_grad_gamma else (shortcut, branch)
        torch.manual_seed(0)

        def forward():
            return PF.drop_path_add(shortcut, branch, 0.1, gamma, training=True, backend="triton")

        def backward(out):
            return torch.autograd.grad(out, inputs, grad_out)

        numel = math.prod(shape)
        minimum = dict(
            numel=numel,
            batch=shape[0],
            channels=channels,
            has_residual=True,
            has_scale=True,
            need_grad_branch=True,
            need_grad_gamma=need_grad_gamma,
            x_size=torch.empty((), dtype=dtype).element_size(),
            param_size=torch.empty((), dtype=dtype).element_size(),
        )
        return forward, backward, minimum

    scale = f"batch {bench_shape[0]} -> {shape[0]}" + (
        f", {bench_shape[2]}x{bench_shape[3]} -> {shape[2]}x{shape[3]}" if len(shape) == 4 else ""
    )
    return Case("drop_path_add", case_id, bench_shape, shape, scale, dtype, build)


def _dwconv_ln_case(case_id, bench_shape, shape, layout, dtype=torch.float16, conv_bias=True, params_grad=True):
    def build():
        import pykernels.functional as PF

        g = _seeded()
        batch, channels, height, width = shape
        x = _randn(shape, dtype, g, True, layout == "channels_last")
        weight = (0.1 * torch.randn((channels, 1, 7, 7), generator=g)).to(dtype).requires_grad_(params_grad)
        bias = (0.1 * torch.randn(channels, generator=g)).to(dtype).requires_grad_(params_grad) if conv_bias else None
        ln_weight = (1 + 0.1 * torch.randn(channels, generator=g)).to(dtype).requires_grad_(params_grad)
        ln_bias = (0.1 * torch.randn(channels, generator=g)).to(dtype).requires_grad_(params_grad)
        grad_out = _randn((batch, height, width, channels), dtype, g)
        inputs = [x] + ([weight, ln_weight, ln_bias] + ([bias] if conv_bias else []) if params_grad else [])

        def forward():
            return PF.dwconv_ln(x, weight, bias, ln_weight, ln_bias, 1e-6, backend="triton")

        def backward(out):
            return torch.autograd.grad(out, inputs, grad_out)

        minimum = dict(
            batch=batch,
            channels=channels,
            height=height,
            width=width,
            ksize=7,
            has_conv_bias=conv_bias,
            need_grad_params=params_grad,
            x_size=x.element_size(),
            param_size=weight.element_size(),
        )
        return forward, backward, minimum

    scale = f"batch {bench_shape[0]} -> {shape[0]}"
    if bench_shape[2] != shape[2]:
        scale += f", {bench_shape[2]}x{bench_shape[3]} -> {shape[2]}x{shape[3]}"
    return Case("dwconv_ln", case_id, bench_shape, shape, scale, dtype, build)


def _attention_case(case_id, bench_shape, shape, dtype=torch.float16):
    def build():
        import pykernels.functional as PF

        g = _seeded()
        batch, tokens, heads, head_dim = shape
        # FusedMHSA's path: q, k, v are views of the packed (B, N, 3, H, D) projection
        qkv = _randn((batch, tokens, 3, heads, head_dim), dtype, g, True)
        grad_out = _randn((batch, tokens, heads, head_dim), dtype, g)

        def forward():
            q, k, v = qkv.unbind(2)
            return PF.attention(q, k, v, backend="triton")

        def backward(out):
            return torch.autograd.grad(out, (qkv,), grad_out)

        minimum = dict(batch=batch, heads=heads, n_q=tokens, head_dim=head_dim, x_size=qkv.element_size())
        return forward, backward, minimum

    scale = f"batch {bench_shape[0]} -> {shape[0]}, heads {bench_shape[2]} -> {shape[2]}"
    if bench_shape[1] != shape[1]:
        scale += f", N {bench_shape[1]} -> {shape[1]}"
    return Case("attention", case_id, bench_shape, shape, scale, dtype, build, gated=False)


def _mbconv_case(
    case_id, bench_shape, shape, ksize, stride, layout="channels_last", training=True, dtype=torch.float16
):
    def build():
        import pykernels.functional as PF

        g = _seeded()
        batch, channels, height, width = shape
        x = _randn(shape, dtype, g, training, layout == "channels_last")
        weight = (0.2 * torch.randn((channels, 1, ksize, ksize), generator=g)).to(dtype).requires_grad_(training)
        bn_weight = (1 + 0.1 * torch.randn(channels, generator=g)).to(dtype).requires_grad_(training)
        bn_bias = (0.1 * torch.randn(channels, generator=g)).to(dtype).requires_grad_(training)
        running_mean = 0.1 * torch.randn(channels, generator=g)
        running_var = 0.75 + 0.5 * torch.rand(channels, generator=g)
        pad = ksize // 2
        out_h = (height + 2 * pad - ksize) // stride + 1
        out_w = (width + 2 * pad - ksize) // stride + 1
        grad_out = _randn((batch, channels, out_h, out_w), dtype, g, channels_last=True)
        grad_pooled = torch.randn((batch, channels), generator=g)

        def forward():
            return PF.mbconv_se(
                x,
                weight,
                None,
                bn_weight,
                bn_bias,
                running_mean.clone(),
                running_var.clone(),
                training=training,
                stride=stride,
                act="silu",
                backend="triton",
            )

        def backward(result):
            out, pooled = result
            return torch.autograd.grad((out, pooled), (x, weight, bn_weight, bn_bias), (grad_out, grad_pooled))

        minimum = dict(
            batch=batch,
            channels=channels,
            height=height,
            width=width,
            out_h=out_h,
            out_w=out_w,
            ksize=ksize,
            has_conv_bias=False,
            batch_stats=training,
            x_size=x.element_size(),
            param_size=weight.element_size(),
        )
        return forward, backward if training else None, minimum

    scale = f"batch {bench_shape[0]} -> {shape[0]}"
    if bench_shape[2] != shape[2]:
        scale += f", {bench_shape[2]}x{bench_shape[3]} -> {shape[2]}x{shape[3]}"
    return Case("mbconv_se", case_id, bench_shape, shape, scale, dtype, build)


F16, F32 = torch.float16, torch.float32
CASES: tuple[Case, ...] = (
    # bench/bench_drop_path.py (float32 there, on CUDA too)
    _drop_path_case("convnext_t-s1-nchw", (32, 96, 56, 56), (1, 96, 14, 14), "NCHW", F32),
    _drop_path_case("convnext_t-s1-channels_last", (32, 96, 56, 56), (1, 96, 14, 14), "channels_last", F32),
    _drop_path_case("vit_s-tokens", (64, 197, 384), (1, 197, 384), "BNC", F32),
    _drop_path_case("vit_s-tokens-no-gamma-grad", (64, 197, 384), (1, 197, 384), "BNC", F32, need_grad_gamma=False),
    # bench/bench_dwconv_ln.py: ConvNeXt-T stages (timm: conv bias, LayerNorm weight and bias)
    _dwconv_ln_case("s1", (32, 96, 56, 56), (1, 96, 16, 16), "NCHW"),
    _dwconv_ln_case("s1-cl", (32, 96, 56, 56), (1, 96, 16, 16), "channels_last"),
    _dwconv_ln_case("s2", (32, 192, 28, 28), (1, 192, 7, 7), "NCHW"),
    _dwconv_ln_case("s3", (32, 384, 14, 14), (1, 384, 7, 7), "NCHW"),
    _dwconv_ln_case("s4", (32, 768, 7, 7), (1, 768, 7, 7), "NCHW"),
    _dwconv_ln_case(
        "s1-cl-no-conv-bias-x-grad-only",
        (32, 96, 56, 56),
        (1, 96, 7, 7),
        "channels_last",
        conv_bias=False,
        params_grad=False,
    ),
    # bench/bench_attention.py: FusedMHSA (packed qkv), head dim 64; vit_b (12 heads) is vit_s per head
    _attention_case("vit_s", (32, 197, 6, 64), (1, 197, 2, 64)),
    _attention_case("long_1024", (2, 1024, 6, 64), (1, 512, 1, 64)),
    # bench/bench_mbconv_se.py: the depthwise stage of EfficientNet-B0 blocks (expand ratio 6: in_ch * 6 channels,
    # channels-last, no conv bias, BatchNorm affine, SiLU, training: batch statistics)
    _mbconv_case("16-24-s2-k3-112", (32, 96, 112, 112), (1, 96, 28, 28), 3, 2),
    _mbconv_case("40-40-k5-28", (32, 240, 28, 28), (1, 240, 7, 7), 5, 1),
    _mbconv_case("112-112-k5-14", (32, 672, 14, 14), (1, 672, 7, 7), 5, 1),
    _mbconv_case("192-320-k3-7", (32, 1152, 7, 7), (1, 1152, 7, 7), 3, 1),
    _mbconv_case("40-40-k5-28-nchw", (32, 240, 28, 28), (1, 240, 7, 7), 5, 1, layout="NCHW"),
    _mbconv_case("40-40-k5-28-eval", (32, 240, 28, 28), (1, 240, 7, 7), 5, 1, training=False),
)


# ---- running and reporting ----------------------------------------------------------------------------------------


def _row(case: Case, direction: str, launches: list[dict], minimum: dict, seconds: float) -> dict[str, Any]:
    min_bytes = traffic_minimum.minimum_bytes(case.op, direction, **minimum)
    read = sum(launch["bytes_read"] for launch in launches)
    written = sum(launch["bytes_written"] for launch in launches)
    distinct = sum(launch["distinct_read"] + launch["distinct_written"] for launch in launches)
    sector_bytes = SECTOR * sum(launch["sectors"] for launch in launches)
    return {
        "backend": "triton",
        "op": case.op,
        "direction": direction,
        "case": case.case,
        "bench_shape": list(case.bench_shape),
        "measured_shape": list(case.measured_shape),
        "scale_note": case.scale_note,
        "scale": case.scale,
        "dtype": str(case.dtype).removeprefix("torch."),
        "gated": case.gated,
        "launches": launches,
        "bytes_read": read,
        "bytes_written": written,
        "distinct_bytes": distinct,
        "sector_bytes": sector_bytes,
        "min_bytes": min_bytes,
        "ratio_requested": round((read + written) / min_bytes, 4),
        "ratio_distinct": round(distinct / min_bytes, 4),
        "ratio_sectors": round(sector_bytes / min_bytes, 4),
        "flops": traffic_minimum.flops(case.op, direction, **minimum),
        "seconds": round(seconds, 2),
    }


def run_case(case: Case) -> list[dict[str, Any]]:
    """Forward and backward of ``case`` with the CUDA tiles; one row per direction."""
    rows = []
    with count_traffic() as recorder, gpu_configs(recorder, case.scale):
        forward, backward, minimum = case.build()
        start = time.perf_counter()
        recorder.phase = "fwd"
        result = forward()
        rows.append(_row(case, "fwd", recorder.take("fwd"), minimum, time.perf_counter() - start))
        if backward is not None:
            start = time.perf_counter()
            recorder.phase = "bwd"
            backward(result)
            rows.append(_row(case, "bwd", recorder.take("bwd"), minimum, time.perf_counter() - start))
    return rows


def run(cases=CASES, substring: str = "", log=None) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        if substring and substring not in case.id:
            continue
        start = time.perf_counter()
        rows.extend(run_case(case))
        if log:
            log(f"{case.id}: {time.perf_counter() - start:.1f} s")
    return rows


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Per op x direction x case a summary line, then one line per launch (and its heaviest tensors)."""
    head = (
        f"{'op/case':44} {'dir':3} {'min MB':>8} {'req MB':>8} {'dist MB':>8} {'sect MB':>8} "
        f"{'req/min':>7} {'dist/min':>8} {'sect/min':>8} {'GFLOP':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['op'] + '/' + row['case']:44} {row['direction']:3} {_mb(row['min_bytes']):>8} "
            f"{_mb(row['bytes_read'] + row['bytes_written']):>8} {_mb(row['distinct_bytes']):>8} "
            f"{_mb(row['sector_bytes']):>8} {row['ratio_requested']:7.3f} {row['ratio_distinct']:8.3f} "
            f"{row['ratio_sectors']:8.3f} {row['flops'] / 1e9:7.3f}"
        )
        lines.append(f"    {row['dtype']} {row['measured_shape']} (bench {row['bench_shape']}: {row['scale_note']})")
        for launch in row["launches"]:
            lines.append(
                f"    {launch['kernel']:34} grid={launch['grid']} read {_mb(launch['bytes_read'])} "
                f"(distinct {_mb(launch['distinct_read'])}) written {_mb(launch['bytes_written'])} "
                f"(distinct {_mb(launch['distinct_written'])}) MB, {launch['sectors']} sectors, masked off "
                f"{100 * launch['masked_off_fraction']:.1f}%, atomics {launch['atomics']['count']}"
            )
            lines.append(f"        {launch['config']}")
            for tensor in launch["tensors"][:6]:
                lines.append(
                    f"        {tensor['name']:16} {str(tensor['shape']):22} {tensor['dtype'] or '':8} read "
                    f"{_mb(tensor['read'])} MB ({tensor['reads_per_byte']}x of {_mb(tensor['distinct_read'])}), "
                    f"written {_mb(tensor['written'])} MB (distinct {_mb(tensor['distinct_written'])}), "
                    f"lanes off: loads "
                    f"{100 * tensor.get('load_masked_off_fraction', 0):.1f}%, stores "
                    f"{100 * tensor.get('store_masked_off_fraction', 0):.1f}%"
                )
    return "\n".join(lines)


def _commit() -> str:
    """The checkout's commit (``+dirty`` when the kernels differ from it), or ``unknown`` outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "triton_kernels"], cwd=root).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def write_outputs(rows: list[dict[str, Any]], json_path: Path | None, txt_path: Path | None) -> str:
    text = format_table(rows)
    meta = {
        "tool": "tests/gpu_check/traffic.py",
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__,
        "device_model": f"{SM90_PROPERTIES.name}: launchers' CUDA tiles, attention = 1st config kept by the pruner",
        "sector_bytes": SECTOR,
        "note": "Triton launches only (torch ops between them not counted); addresses counted under TRITON_INTERPRET",
        "commit": _commit(),
    }
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if txt_path:
        txt_path.parent.mkdir(parents=True, exist_ok=True)
        txt_path.write_text(text + "\n")
    return text


# ---- self test: a masked copy kernel with known counts --------------------------------------------------------------


def selftest() -> dict[str, Any]:
    """Run a hand-written masked copy (n = 1000 float32, BLOCK 256, 4 programs) and a gather that reads every element
    twice; return their launch summaries (exact figures checked by test_triton_traffic.py)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(DST, SRC, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(DST + offsets, tl.load(SRC + offsets, mask=mask), mask=mask)

    @triton.jit
    def _twice_kernel(DST, SRC, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        first = tl.load(SRC + offsets // 2 * 2, mask=mask)  # even elements, each twice
        second = tl.load(SRC + offsets, mask=mask)
        tl.store(DST + offsets, first + second, mask=mask)

    src = torch.arange(1000, dtype=torch.float32)
    dst = torch.zeros_like(src)
    with count_traffic() as recorder:
        _copy_kernel[(4,)](dst, src, 1000, BLOCK=256)
        copied = bool(torch.equal(dst, src))
        _twice_kernel[(4,)](dst, src, 1000, BLOCK=256)
    return {"copied": copied, "launches": recorder.take()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only cases whose 'op/case' contains this substring")
    parser.add_argument("--out", type=Path, help="JSON rows (e.g. bench/results/gpu-traffic-triton.json)")
    parser.add_argument("--txt", type=Path, help="the table as text")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    parser.add_argument("--selftest", type=Path, help="write the self-test's launch summaries here and exit")
    parser.add_argument(
        "--module-file",
        action="append",
        default=[],
        metavar="STEM=PATH",
        help="load pykernels.triton_kernels.STEM from PATH (e.g. `git show HEAD~1:triton_kernels/dwconv_ln.py`)",
    )
    args = parser.parse_args(argv)
    if not interpreter_active():
        print("traffic.py needs TRITON_INTERPRET=1 (set before triton is imported)", file=sys.stderr)
        return 2
    if args.selftest:
        args.selftest.write_text(json.dumps(selftest(), indent=1) + "\n")
        return 0
    for spec in args.module_file:
        stem, path = spec.split("=", 1)
        name = f"pykernels.triton_kernels.{stem}"
        importlib.import_module("pykernels.triton_kernels")
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    torch.set_num_threads(1)
    rows = run(substring=args.k, log=lambda line: print(line, file=sys.stderr))
    if not rows:
        print(f"no case matches {args.k!r}", file=sys.stderr)
        return 1
    text = write_outputs(rows, args.out, args.txt)
    if not args.quiet:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
