"""Resource report of the compiled CUDA kernels: every kernel of the built extension pykernels/_C*.so, for every SASS
architecture in it (sm_80 and sm_90 by default), read with ``cuobjdump --dump-resource-usage``. Fails on a register
spill (a stack frame: ptxas puts spill slots there) or local memory, on shared memory over the per-block limit, and
on a kernel whose registers do not fit the block size its launcher uses (registers x threads > 64K registers).

Run with the other GPU-code gates: ``PYKERNELS_GPU_CHECK=1 python -m pytest tests/gpu_check -n 2 -q`` after
``make build``. Skips, naming the reason, when the extension is not built or was built without CUDA. The table is
printed at the end of the run and written next to the Triton one (conftest.py).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from . import aot
from . import occupancy as occupancy_rules
from .conftest import CUDA_ROW_PROPERTY

ROOT = Path(__file__).resolve().parents[2]
REGISTERS_PER_BLOCK = 64 * 1024  # sm_80 and sm_90
# Threads per block the launchers of csrc/cuda use, per kernel (the most they launch with; kernels have no
# __launch_bounds__, so ptxas compiles them for any block size). A kernel not listed is held to 1024 threads.
LAUNCH_THREADS = {
    "drop_path_add_fwd_kernel": 256,  # kMaxThreads in drop_path.cu
    "drop_path_add_bwd_channels_inner_kernel": 256,
    "drop_path_add_bwd_channels_outer_kernel": 256,
    "dwconv_ln_fwd_kernel": 256,  # kThreads in dwconv_ln.cu
    "dwconv_ln_bwd_dy_kernel": 256,
    "dwconv_ln_bwd_input_kernel": 256,
    "dwconv_ln_bwd_weight_kernel": 256,
    "mbconv_se_stats_kernel": 256,  # kThreads in mbconv_se.cu
    "mbconv_se_stats_merge_kernel": 256,
    "mbconv_se_fwd_kernel": 256,
    "mbconv_se_sum_kernel": 256,
    "mbconv_se_bwd_reduce_kernel": 256,
    "mbconv_se_bwd_main_kernel": 256,
    "mbconv_se_bwd_input_kernel": 256,
}
# Dynamic shared memory per block: the most each launcher asks for (its kSmemBudget; the launchers shrink their tiles
# to stay under it, so the occupancy below is a lower bound). Kernels not listed use none.
DYNAMIC_SMEM_BUDGET = {
    **{k: 96 * 1024 for k in LAUNCH_THREADS if k.startswith("dwconv_ln_")},  # dwconv_ln.cu kSmemBudget
    # mbconv_se.cu kSmemBudget (dynamic + static) for the kernels that stage a window
    **{k: 48 * 1024 for k in ("mbconv_se_stats_kernel", "mbconv_se_fwd_kernel", "mbconv_se_bwd_reduce_kernel")},
    **{k: 48 * 1024 for k in ("mbconv_se_bwd_main_kernel", "mbconv_se_bwd_input_kernel")},
}
_ARCH_RE = re.compile(r"^arch = (sm_\d+)", re.M)
_FUNC_RE = re.compile(r"Function\s+(\S+?):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def extension_path() -> Path | None:
    found = sorted(glob.glob(str(ROOT / "pykernels" / "_C*.so")))
    return Path(found[0]) if found else None


def cuobjdump() -> str:
    """cuobjdump of the Triton wheel (as aot.py uses), else of the CUDA toolkit."""
    try:
        return aot._nvidia_tool("cuobjdump")
    except Exception:  # noqa: BLE001 - Triton missing: fall back to the toolkit
        for candidate in (shutil.which("cuobjdump"), *sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))):
            if candidate and os.path.exists(candidate):
                return candidate
    raise FileNotFoundError("cuobjdump not found (neither in the Triton wheel nor in a CUDA toolkit)")


def expected_archs() -> set[str]:
    archs = os.environ.get("PYKERNELS_CUDA_ARCHS", "8.0;9.0")  # setup.py's default
    return {"sm_" + a.strip().replace(".", "").removesuffix("+PTX") for a in archs.replace(",", ";").split(";") if a}


def demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


def short_name(demangled: str) -> tuple[str, str]:
    """('drop_path_add_fwd_kernel', '<float, float, ..., 4, true>') from a demangled kernel signature."""
    head = demangled.replace("(anonymous namespace)::", "").split("(")[0]
    head = head.removeprefix("void ")
    template = ""
    if head.endswith(">"):
        depth, i = 0, len(head) - 1
        while i >= 0:
            depth += head[i] == ">"
            depth -= head[i] == "<"
            if depth == 0:
                break
            i -= 1
        head, template = head[:i], head[i:]
    return head.split("::")[-1], template.replace("c10::", "")


def resource_rows(so: Path) -> list[dict]:
    return parse_resources(
        subprocess.run([cuobjdump(), "--dump-resource-usage", str(so)], capture_output=True, text=True).stdout
    )


def parse_resources(text: str) -> list[dict]:
    """One row per (kernel, arch) with registers, stack, local and static shared memory, and the checks' verdict."""
    rows = []
    # the output is a sequence of ELF sections, each starting with "arch = sm_XX"
    arch_marks = [(m.start(), m.group(1)) for m in _ARCH_RE.finditer(text)]
    matches = list(_FUNC_RE.finditer(text))
    names = demangle([m.group(1) for m in matches])
    for m in matches:
        arch = next((a for pos, a in reversed(arch_marks) if pos < m.start()), "?")
        kernel, config = short_name(names[m.group(1)])
        regs, stack, shared, local = map(int, m.groups()[1:])
        threads = LAUNCH_THREADS.get(kernel, 1024)
        limit = aot.TARGETS.get(arch.replace("_", ""), (0, 163 * 1024))[1]
        problems = []
        if stack:
            problems.append(f"{stack} B stack frame per thread (register spills or local arrays)")
        if local:
            problems.append(f"{local} B local memory per thread")
        if regs * threads > REGISTERS_PER_BLOCK:
            problems.append(f"{regs} registers x {threads} threads > {REGISTERS_PER_BLOCK}: the launch would fail")
        if shared > limit:
            problems.append(f"{shared} B static shared memory > {limit} B per block")
        smem = shared + DYNAMIC_SMEM_BUDGET.get(kernel, 0)
        occ = occupancy_rules.occupancy(arch, threads, regs, min(smem, limit)) if arch != "?" else None
        rows.append(
            {
                "stem": next((f for f in ("drop_path", "dwconv_ln", "mbconv_se") if kernel.startswith(f)), "?"),
                "kernel": kernel,
                "config": config,
                "arch": arch,
                "registers": regs,
                "stack": stack,
                "local": local,
                "shared": shared,
                "threads": threads,
                "occupancy": None if occ is None else occ.fraction,
                "occupancy_limiter": None if occ is None else occ.limiter,
                "problems": problems,
            }
        )
    return rows


COLUMNS = ("kernel", "config", "arch", "regs", "threads", "stack B", "local B", "smem B", "occ %", "limit", "status")


def format_table(rows: list[dict]) -> str:
    lines = [
        (
            r["kernel"],
            r["config"],
            r["arch"],
            str(r["registers"]),
            str(r["threads"]),
            str(r["stack"]),
            str(r["local"]),
            str(r["shared"]),
            "?" if r.get("occupancy") is None else f"{100 * r['occupancy']:.1f}",
            str(r.get("occupancy_limiter")),
            "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"]),
        )
        for r in sorted(rows, key=lambda r: (r["kernel"], r["config"], r["arch"]))
    ]
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *lines, strict=True)]
    numeric = {3, 4, 5, 6, 7, 8}

    def fmt(values):
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([fmt(COLUMNS), fmt(["-" * w for w in widths])] + [fmt(line).rstrip() for line in lines])


def summary(rows: list[dict]) -> str:
    failed = sum(bool(r["problems"]) for r in rows)
    return (
        f"{len(rows)} kernels x archs ({len({(r['kernel'], r['config']) for r in rows})} kernels, archs "
        f"{sorted({r['arch'] for r in rows})}), {failed} failed; max registers "
        f"{max((r['registers'] for r in rows), default=0)}, max stack {max((r['stack'] for r in rows), default=0)} B"
        "\n\n"
        + occupancy_rules.summary(rows, "CUDA extension; smem = static + the launcher's dynamic budget: a lower bound")
    )


@pytest.fixture(scope="module")
def rows():
    so = extension_path()
    if so is None:
        pytest.skip("pykernels._C is not built (run `make build`): no CUDA kernels to measure")
    rows = resource_rows(so)
    if not rows:
        pytest.skip(
            f"{so.name} has no device code: built without CUDA (torch without CUDA, no nvcc, or "
            "PYKERNELS_SKIP_CUDA_BUILD=1)"
        )
    return rows


def test_cuda_kernels_have_no_spills(rows, record_property):
    for row in rows:
        record_property(CUDA_ROW_PROPERTY, row)
    failed = [r for r in rows if r["problems"]]
    assert not failed, "\n" + format_table(failed)


def test_low_occupancy_has_a_reason(rows):
    """Every kernel below 25% theoretical occupancy (at its launcher's shared-memory budget) is documented."""
    problems = occupancy_rules.undocumented(rows)
    assert not problems, "\n".join(problems)


def test_every_kernel_is_built_for_every_arch(rows):
    archs = {}
    for r in rows:
        archs.setdefault((r["kernel"], r["config"]), set()).add(r["arch"])
    want = expected_archs()
    missing = {k: sorted(want - a) for k, a in archs.items() if not want <= a}
    assert not missing, f"kernels missing an arch of PYKERNELS_CUDA_ARCHS ({sorted(want)}): {missing}"


def test_every_cuda_source_kernel_is_in_the_extension(rows):
    """Each __global__ function of csrc/cuda/*.cu appears in the cubins (a stale or partial build fails here)."""
    built = {r["kernel"] for r in rows}
    declared = {
        m.group(1)
        for cu in (ROOT / "csrc" / "cuda").glob("*.cu")
        for m in re.finditer(r"__global__\s+void\s+(\w+)", cu.read_text())
    }
    assert declared <= built, f"not in {extension_path().name}: {sorted(declared - built)} (rebuild: make build)"


def test_checks_flag_spills_local_memory_registers_and_shared_memory():
    """The checks fail on a stack frame, local memory, too many registers for the block and too much shared memory."""
    sample = """
arch = sm_80
 Function _ZN9pykernels9drop_path24drop_path_add_fwd_kernelIfLi4EEEvPT_:
  REG:255 STACK:16 SHARED:200000 LOCAL:8 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0
arch = sm_90
 Function _Z3fooPf:
  REG:64 STACK:0 SHARED:128 LOCAL:0 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3barPf:
  REG:72 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    spills, fits, too_many_registers = parse_resources(sample)
    assert (spills["kernel"], spills["config"], spills["arch"], spills["threads"]) == (
        "drop_path_add_fwd_kernel",
        "<float, 4>",
        "sm_80",
        256,
    )
    assert [p.split(" ", 2)[1] for p in spills["problems"]] == ["B", "B", "B"], spills["problems"]
    assert "stack frame" in spills["problems"][0] and "static shared memory" in spills["problems"][2]
    assert (fits["kernel"], fits["arch"], fits["threads"], fits["problems"]) == ("foo", "sm_90", 1024, [])
    assert too_many_registers["problems"] == ["72 registers x 1024 threads > 65536: the launch would fail"]
