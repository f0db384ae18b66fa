"""Ahead-of-time gate: every Triton kernel in pykernels.triton_kernels compiles for sm_80 and sm_90 without a GPU,
without register spills and within the shared memory of a block, for every specialisation its launchers ship.

Run alone, without the Triton interpreter: ``PYKERNELS_GPU_CHECK=1 python -m pytest tests/gpu_check -n 2 -q``
(see conftest.py for when these tests skip). The specs of ``triton_kernels/<stem>.py`` come from the ``AOT_SPECS``
list of ``tests/gpu_check/specs/<stem>.py``; the compiling and measuring is in aot.py (also runnable as a script).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from . import aot, occupancy  # noqa: E402
from .conftest import ROW_PROPERTY  # noqa: E402

# Discovery imports the kernel modules: only when the gate runs (under TRITON_INTERPRET the kernels are not
# JITFunctions). A malformed AOT_SPECS entry is reported by test_discovery, not as a collection error.
SPECS: list[aot.KernelSpec] = []
FUNCTIONS: dict[str, dict] = {}
DISCOVERY_ERROR: Exception | None = None
_opted_in, _interpreting = aot.gate_status()
if _opted_in and not _interpreting:
    try:
        SPECS, FUNCTIONS = aot.discover()
    except Exception as e:  # noqa: BLE001 - surfaced by test_discovery
        DISCOVERY_ERROR = e


def _params():
    if not SPECS:  # gate off (the autouse fixture skips it, with the reason) or discovery failed (it fails)
        yield pytest.param(None, None, id="no-specs")
    for spec in SPECS:
        marks = [pytest.mark.xfail(strict=True, reason=spec.xfail)] if spec.xfail else []
        for target in aot.TARGETS:
            yield pytest.param(spec, target, id=f"{spec.stem}.{spec.kernel_name}/{spec.label}/{target}", marks=marks)


@pytest.mark.parametrize(("spec", "target"), list(_params()))
def test_kernel_compiles_without_spills(spec, target, record_property):
    if spec is None:
        pytest.fail(f"no AOT specs discovered ({DISCOVERY_ERROR!r})")
    result = aot.check(spec, target)
    row = result.as_row()
    record_property(ROW_PROPERTY, row)
    low = occupancy.undocumented([row])  # below 25% theoretical occupancy without a reason in occupancy.KNOWN_LOW
    if result.ok and low:
        pytest.fail(low[0], pytrace=False)
    if not result.ok:
        log = result.log.strip()
        pytest.fail(
            f"{spec.id} on {target} (num_warps={spec.num_warps}, num_stages={spec.num_stages}, "
            f"options={spec.options}):\n  " + "\n  ".join(result.problems) + (f"\nptxas -v:\n{log}" if log else ""),
            pytrace=False,
        )


def test_discovery_covers_every_jit_function():
    """Every @triton.jit function in the triton_kernels sources is seen by the gate, and every kernel (a jit function
    no other jit function calls) has AOT specs: a new kernel without AOT_SPECS fails here."""
    assert DISCOVERY_ERROR is None, f"AOT spec discovery failed: {DISCOVERY_ERROR!r}"
    assert not aot.coverage_problems(SPECS, FUNCTIONS), "\n".join(aot.coverage_problems(SPECS, FUNCTIONS))
    with_specs = {(s.stem, s.kernel_name) for s in SPECS}
    assert {("drop_path", "_drop_path_add_fwd_kernel"), ("drop_path", "_drop_path_add_bwd_kernel")} <= with_specs


NEW_KERNEL_MODULE = """
import triton
import triton.language as tl


@triton.jit
def _probe_helper(x):
    return x + 1


@triton.jit
def _probe_fwd_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, _probe_helper(tl.load(X + offs, mask=offs < N)), mask=offs < N)
"""


PROBE_SPECS = """
from pykernels.triton_kernels import _aot_probe as K

AOT_SPECS = [
    {
        "kernel": K._probe_fwd_kernel,
        "label": "B128",
        "signature": {"X": "*fp32", "N": "i32"},
        "constexprs": {"BLOCK": 128},
    }
]
"""


@pytest.fixture
def probe_folders(tmp_path, monkeypatch):
    """(kernels folder, specs folder): temporary folders added to pykernels.triton_kernels and tests/gpu_check/specs;
    the modules imported from them are dropped afterwards."""
    import pykernels.triton_kernels as package

    specs_package = importlib.import_module(aot.SPECS_PACKAGE)
    kernels, specs = tmp_path / "kernels", tmp_path / "specs"
    kernels.mkdir()
    specs.mkdir()
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(kernels)])
    monkeypatch.setattr(specs_package, "__path__", [*specs_package.__path__, str(specs)])
    before = set(sys.modules)
    yield kernels, specs
    for name in set(sys.modules) - before:
        if name.startswith((f"{aot.PACKAGE}._aot_", f"{aot.SPECS_PACKAGE}._aot_")):
            del sys.modules[name]


def test_discovery_flags_a_new_kernel_without_specs(probe_folders):
    """A module added to triton_kernels with a kernel but no tests/gpu_check/specs/<stem>.py makes the coverage check
    fail, naming the kernel and the file; once that file lists the kernel in its AOT_SPECS, the kernel is covered."""
    kernels, specs = probe_folders
    (kernels / "_aot_probe.py").write_text(NEW_KERNEL_MODULE)
    found, functions = aot.discover()
    assert set(functions["_aot_probe"]) == {"_probe_helper", "_probe_fwd_kernel"}
    assert not [s for s in found if s.stem == "_aot_probe"]
    assert aot.coverage_problems(found, functions) == [
        f"{aot.PACKAGE}._aot_probe._probe_fwd_kernel: a kernel without AOT_SPECS entries "
        "(add them to tests/gpu_check/specs/_aot_probe.py)"
    ]
    (specs / "_aot_probe.py").write_text(PROBE_SPECS)
    importlib.invalidate_caches()
    found, functions = aot.discover()
    assert [s.id for s in found if s.stem == "_aot_probe"] == ["_aot_probe._probe_fwd_kernel[B128]"]
    assert aot.coverage_problems(found, functions) == []


def test_discovery_rejects_specs_of_another_module(probe_folders):
    """specs/<stem>.py may list only kernels of triton_kernels/<stem>.py, and a specs file of no module is flagged."""
    kernels, specs = probe_folders
    (kernels / "_aot_probe.py").write_text(NEW_KERNEL_MODULE)
    (kernels / "_aot_probe_b.py").write_text(NEW_KERNEL_MODULE)
    (specs / "_aot_probe_b.py").write_text(PROBE_SPECS)  # the kernel of _aot_probe, filed under _aot_probe_b
    with pytest.raises(aot.SpecError, match=r"specs/_aot_probe_b\.py: AOT_SPECS\[0\] is a spec of .*_aot_probe\."):
        aot.discover()
    (kernels / "_aot_probe_b.py").unlink()
    (specs / "_aot_probe_b.py").rename(specs / "_aot_probe.py")
    (specs / "_aot_orphan.py").write_text("AOT_SPECS = []\n")
    importlib.invalidate_caches()
    found, functions = aot.discover()
    assert aot.coverage_problems(found, functions) == [
        f"tests/gpu_check/specs/_aot_orphan.py: specs of no module (there is no {aot.PACKAGE}._aot_orphan)"
    ]


# ---- the gate can fail: toy kernels that break each rule -------------------------------------------------------


@triton.jit
def _toy_scale(x):
    return x * 1.0001


@triton.jit
def _toy_spill_kernel(X, OUT, K, BLOCK: tl.constexpr):
    # BLOCK fp32 accumulators carried across a loop by one warp: 256 per thread do not fit in 255 registers
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(K):
        acc = _toy_scale(acc) + tl.load(X + k * BLOCK + offs)
    tl.store(OUT + offs, acc)


@triton.jit
def _toy_smem_kernel(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # a 10-stage software pipeline of 128x64 + 64x128 fp16 tiles: 32 KB of shared memory per stage
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * BLOCK_N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * BLOCK_N + rn[None, :], acc)


def _toy_spec(entry: dict) -> aot.KernelSpec:
    return aot._make_spec("toy", 0, entry)


TOY_SPILL = {
    "kernel": _toy_spill_kernel,
    "label": "B8192-w1",
    "signature": {"X": "*fp32", "OUT": "*fp32", "K": "i32"},
    "constexprs": {"BLOCK": 32 * 256},
    "num_warps": 1,
}
TOY_SMEM = {
    "kernel": _toy_smem_kernel,
    "label": "128x128x64-s10",
    "signature": {"A": "*fp16", "B": "*fp16", "C": "*fp32", "K": "i32"},
    "constexprs": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64},
    "divisible_by_16": ("A", "B", "C", "K"),
    "num_warps": 8,
    "num_stages": 10,
}


@pytest.mark.parametrize("target", list(aot.TARGETS))
def test_gate_fails_on_register_spills(target):
    result = aot.check(_toy_spec(TOY_SPILL), target)
    assert result.spill_stores and result.spill_loads, result.log
    assert result.stack, "spill slots live in the stack frame: cuobjdump's STACK must show them"
    assert not result.ok and any("register spills" in p for p in result.problems), result.problems


@pytest.mark.parametrize("target", list(aot.TARGETS))
def test_gate_fails_on_shared_memory_over_the_limit(target):
    result = aot.check(_toy_spec(TOY_SMEM), target)
    assert result.smem > aot.TARGETS[target][1], result.as_row()
    assert not result.spill_stores and not result.spill_loads, "the toy should break only the shared-memory rule"
    assert [p for p in result.problems if "shared memory" in p] == result.problems, result.problems


def test_gate_fails_on_compile_errors():
    result = aot.check(_toy_spec({**TOY_SPILL, "label": "B100", "constexprs": {"BLOCK": 100}}), "sm80")
    assert not result.ok and "compile error" in result.problems[0] and "power of 2" in result.problems[0]


def test_spec_validation():
    """A spec that does not name each kernel argument exactly once is rejected before compiling."""
    aot._make_spec("toy", 0, TOY_SPILL)
    for bad in (
        {**TOY_SPILL, "signature": {"X": "*fp32", "OUT": "*fp32"}},  # K missing
        {**TOY_SPILL, "constexprs": {}},  # constexpr BLOCK without a value
        {**TOY_SPILL, "signature": {**TOY_SPILL["signature"], "BLOCK": "i32"}},  # named twice
        {**TOY_SPILL, "signature": {"X": "*float", "OUT": "*fp32", "K": "i32"}},  # not a Triton type
        {**TOY_SPILL, "divisible_by_16": ("BLOCK",)},  # a constexpr cannot carry an alignment hint
        {**TOY_SPILL, "num_wraps": 4},  # typo
    ):
        with pytest.raises(aot.SpecError):
            aot._make_spec("toy", 0, bad)


def test_source_scan_and_device_helpers():
    """The source scan finds the jit functions of a file, and a jit function called by another is a helper."""
    assert {"_toy_scale", "_toy_spill_kernel", "_toy_smem_kernel"} <= aot.jit_decorated_in_source(Path(__file__))
    toys = {"toy": {f.__name__: f for f in (_toy_scale, _toy_spill_kernel, _toy_smem_kernel)}}
    assert aot.device_functions(toys) == {"_toy_scale"}
