"""Ahead-of-time gate for the Triton kernels: compile each kernel for sm_80 and sm_90 without a GPU, read its resources.

Every kernel module ``pykernels.triton_kernels.<stem>`` (source ``triton_kernels/<stem>.py``) has its specs in
``tests/gpu_check/specs/<stem>.py``, a module that imports the kernel module as ``K`` and defines ``AOT_SPECS``: a list
of dicts, one per compiled specialisation that the launchers ship on CUDA::

    {
        "kernel": K._stem_fwd_kernel,           # the @triton.jit function (autotune / heuristics wrappers unwrapped)
        "label": "res1-scale1-gamma1/f16/B1024", # short, unique per kernel: names the case in test ids and the table
        "signature": {"X": "*fp16", "N": "i32"}, # every non-constexpr argument -> Triton type string
        "constexprs": {"BLOCK": 1024},           # every tl.constexpr argument, plus int args the JIT pins to 1
        "divisible_by_16": ("X", "N"),           # args the JIT would mark 16-divisible / 16-byte aligned (optional)
        "num_warps": 4, "num_stages": 3,         # as the launcher passes them (optional: Triton's defaults)
        "options": {"enable_fp_fusion": False},  # other launch options the launcher passes (optional)
        "xfail": "reason",                       # known failure, tracked: the pytest gate xfails it strictly (optional)
    }

For each spec and target this module calls the public compiler API - ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``, which needs neither a GPU nor the CUDA driver, only the ``ptxas`` shipped in
the Triton wheel - then reads the resources of the resulting cubin:

* registers, stack frame, local memory and static shared memory from ``cuobjdump --dump-resource-usage`` on the
  cubin (the ``cuobjdump`` shipped in the Triton wheel). Register spills show there as STACK (the spill slots live in
  the stack frame; LOCAL stays 0), and in the SASS as STL / LDL;
* spill stores / loads in bytes from the ``ptxas -v`` log of the very ``ptxas`` run that produced the cubin (Triton
  prints it when ``TRITON_DUMP_PTXAS_LOG=1``; captured here), cross-checked against cuobjdump's register count;
* dynamic shared memory from the compiled kernel's metadata (what the launcher would request).

A spec fails on: a compile error, spill stores or loads, a stack frame or local memory, shared memory (static +
dynamic) over the target's per-block limit, or resources that cannot be read. Nothing is cached across runs: every
compile gets a fresh, private Triton cache directory and ``TRITON_ALWAYS_COMPILE=1``; the environment is restored.

Run it as ``python tests/gpu_check/aot.py`` (table + exit status; ``-j`` processes, ``-k`` substring filter) or
through pytest: ``PYKERNELS_GPU_CHECK=1 python -m pytest tests/gpu_check -n 2 -q`` (see README.md here).
Works with Triton 3.6 - 3.8: only ``triton.compile``, ``triton.compiler.ASTSource``,
``triton.backends.compiler.GPUTarget`` and the ``TRITON_*`` environment knobs are used.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__:  # under pytest (gpu_check.aot / tests.gpu_check.aot)
    from . import occupancy as occupancy_rules
else:  # script mode: this folder is sys.path[0]
    import occupancy as occupancy_rules

PACKAGE = "pykernels.triton_kernels"
# tests/gpu_check/specs/<stem>.py holds the AOT_SPECS of PACKAGE.<stem>. Imported relative to this module's package
# under pytest (``gpu_check.specs`` or ``tests.gpu_check.specs``, after pytest's rootdir rules); in script mode
# (``python tests/gpu_check/aot.py``, no package) this file's folder is sys.path[0], so it is the top-level ``specs``.
SPECS_PACKAGE = f"{__package__}.specs" if __package__ else "specs"

# target name -> (compute capability, max shared memory per block in bytes: the opt-in dynamic maximum)
TARGETS: dict[str, tuple[int, int]] = {
    "sm80": (80, 163 * 1024),  # A100: 163 KB
    "sm90": (90, 227 * 1024),  # H100: 227 KB
}

REQUIRED_KEYS = {"kernel", "label", "signature", "constexprs"}
SPEC_KEYS = REQUIRED_KEYS | {"divisible_by_16", "num_warps", "num_stages", "options", "xfail"}
TYPE_RE = re.compile(r"^\*?(i1|u1|i8|u8|i16|u16|i32|u32|i64|u64|fp8e4nv|fp8e5|fp16|bf16|fp32|fp64)$")


class SpecError(ValueError):
    """An AOT_SPECS entry that does not describe its kernel (missing / unknown arguments, bad types, another module's
    kernel)."""


def gate_status() -> tuple[bool, bool]:
    """(PYKERNELS_GPU_CHECK=1 is set, TRITON_INTERPRET is on): the gate runs when opted in and not interpreting."""
    return os.environ.get("PYKERNELS_GPU_CHECK") == "1", os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- specs and discovery ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """One compiled specialisation of one kernel, validated against the kernel's argument list."""

    stem: str
    kernel: Any  # triton.runtime.JITFunction
    label: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    divisible_by_16: tuple[str, ...] = ()
    num_warps: int | None = None
    num_stages: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    xfail: str | None = None

    @property
    def kernel_name(self) -> str:
        return self.kernel.__name__

    @property
    def id(self) -> str:
        return f"{self.stem}.{self.kernel_name}[{self.label}]"

    def compile_options(self) -> dict[str, Any]:
        opts = dict(self.options)
        if self.num_warps is not None:
            opts["num_warps"] = self.num_warps
        if self.num_stages is not None:
            opts["num_stages"] = self.num_stages
        return opts


def unwrap_jit(obj: Any) -> Any:
    """The JITFunction under ``triton.autotune`` / ``triton.heuristics`` wrappers (they keep it in ``.fn``)."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn") and seen < 8:
        obj, seen = obj.fn, seen + 1
    return obj if isinstance(obj, JITFunction) else None


def _make_spec(stem: str, index: int, entry: Any) -> KernelSpec:
    where = f"{spec_file(stem)}: AOT_SPECS[{index}]"
    if not isinstance(entry, dict):
        raise SpecError(f"{where}: expected a dict, got {type(entry).__name__}")
    missing, unknown = REQUIRED_KEYS - entry.keys(), entry.keys() - SPEC_KEYS
    if missing or unknown:
        raise SpecError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    kernel = unwrap_jit(entry["kernel"])
    if kernel is None:
        raise SpecError(f"{where}: 'kernel' is not a @triton.jit function (is TRITON_INTERPRET set?)")
    signature, constexprs = dict(entry["signature"]), dict(entry["constexprs"])
    args = list(kernel.arg_names)
    both = signature.keys() & constexprs.keys()
    given = set(signature) | set(constexprs)
    if both or given != set(args):
        raise SpecError(
            f"{where} ({kernel.__name__}): signature + constexprs must name each kernel argument once; "
            f"missing {[a for a in args if a not in given]}, unknown {sorted(given - set(args))}, twice {sorted(both)}"
        )
    declared_constexpr = {p.name for p in kernel.params if p.is_constexpr}
    if not declared_constexpr <= constexprs.keys():
        raise SpecError(f"{where}: tl.constexpr args {sorted(declared_constexpr - constexprs.keys())} need values")
    bad = {k: v for k, v in signature.items() if not (isinstance(v, str) and TYPE_RE.match(v))}
    if bad:
        raise SpecError(f"{where}: unknown Triton types {bad}")
    divisible = tuple(entry.get("divisible_by_16", ()))
    if not set(divisible) <= signature.keys():
        raise SpecError(f"{where}: divisible_by_16 names non-signature args {set(divisible) - signature.keys()}")
    return KernelSpec(
        stem=stem,
        kernel=kernel,
        label=str(entry["label"]),
        signature=signature,
        constexprs=constexprs,
        divisible_by_16=divisible,
        num_warps=entry.get("num_warps"),
        num_stages=entry.get("num_stages"),
        options=dict(entry.get("options", {})),
        xfail=entry.get("xfail"),
    )


def kernel_modules() -> list[str]:
    """Stems of every module in pykernels.triton_kernels (private ones too)."""
    package = importlib.import_module(PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)


def spec_file(stem: str) -> str:
    """Where the specs of ``PACKAGE.<stem>`` live, as the repository path that messages name."""
    return f"tests/gpu_check/specs/{stem}.py"


def spec_modules() -> list[str]:
    """Stems of every module in tests/gpu_check/specs."""
    package = importlib.import_module(SPECS_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)


def specs_of(stem: str) -> list[Any]:
    """The ``AOT_SPECS`` list of ``tests/gpu_check/specs/<stem>.py``, or [] when there is no such file (the coverage
    check then names every kernel of the module). An error while importing it propagates."""
    if stem not in spec_modules():
        return []
    module = importlib.import_module(f"{SPECS_PACKAGE}.{stem}")
    if not hasattr(module, "AOT_SPECS"):
        raise SpecError(f"{spec_file(stem)} defines no AOT_SPECS")
    return list(module.AOT_SPECS)


def jit_functions(stem: str) -> dict[str, Any]:
    """name -> JITFunction for every @triton.jit function defined (not imported) in the module."""
    module = importlib.import_module(f"{PACKAGE}.{stem}")
    found = {}
    for name, obj in vars(module).items():
        fn = unwrap_jit(obj)
        if fn is not None and getattr(fn.fn, "__module__", None) == module.__name__:
            found[name] = fn
    return found


def discover() -> tuple[list[KernelSpec], dict[str, dict[str, Any]]]:
    """(every AOT spec of every module, {stem: {name: JITFunction}}). Raises SpecError on malformed specs."""
    specs: list[KernelSpec] = []
    functions: dict[str, dict[str, Any]] = {}
    for stem in kernel_modules():
        functions[stem] = jit_functions(stem)
        for i, entry in enumerate(specs_of(stem)):
            spec = _make_spec(stem, i, entry)
            if getattr(spec.kernel.fn, "__module__", None) != f"{PACKAGE}.{stem}":
                raise SpecError(
                    f"{spec_file(stem)}: AOT_SPECS[{i}] is a spec of {spec.kernel.fn.__module__}.{spec.kernel_name}, "
                    f"not of a kernel of {PACKAGE}.{stem}"
                )
            specs.append(spec)
    ids = [s.id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise SpecError(f"duplicate AOT spec labels: {dupes}")
    return specs, functions


def device_functions(functions: dict[str, dict[str, Any]]) -> set[str]:
    """Names of @triton.jit functions that other jit functions call: device helpers, compiled into their callers."""
    sources = {name: fn.src for funcs in functions.values() for name, fn in funcs.items()}
    return {
        name
        for name in sources
        if any(re.search(rf"\b{re.escape(name)}\s*\(", src) for other, src in sources.items() if other != name)
    }


def jit_decorated_in_source(path: Path) -> set[str]:
    """Function names decorated with triton.jit / jit / triton.autotune(...) / triton.heuristics(...) in a file,
    found by parsing the source (independent of importing it)."""

    def is_triton_decorator(node: ast.expr) -> bool:
        if isinstance(node, ast.Call):
            node = node.func
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
        return name in {"jit", "autotune", "heuristics"}

    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and any(is_triton_decorator(d) for d in node.decorator_list)
    }


def coverage_problems(specs: list[KernelSpec], functions: dict[str, dict[str, Any]]) -> list[str]:
    """What the gate would miss: jit functions in the package sources that the import-based discovery did not see,
    kernels (jit functions no other jit function calls) without any AOT spec, and spec files of no kernel module."""
    package = importlib.import_module(PACKAGE)
    problems = []
    for folder in package.__path__:
        for path in sorted(Path(folder).glob("*.py")):
            if path.stem == "__init__":
                continue
            in_source, imported = jit_decorated_in_source(path), set(functions.get(path.stem, {}))
            if in_source != imported:
                problems.append(
                    f"{path}: @triton.jit functions in the source {sorted(in_source)}, seen {sorted(imported)}"
                )
    helpers = device_functions(functions)
    with_specs = {(s.stem, s.kernel_name) for s in specs}
    for stem, funcs in sorted(functions.items()):
        for name in sorted(funcs):
            if name not in helpers and (stem, name) not in with_specs:
                problems.append(
                    f"{PACKAGE}.{stem}.{name}: a kernel without AOT_SPECS entries (add them to {spec_file(stem)})"
                )
    for stem in sorted(set(spec_modules()) - set(functions)):
        problems.append(f"{spec_file(stem)}: specs of no module (there is no {PACKAGE}.{stem})")
    return problems


# ---- compile and measure ------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one (spec, target) compile produced; ``problems`` empty means it passes."""

    spec_id: str
    stem: str
    kernel: str
    label: str
    target: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    local: int | None = None
    static_smem: int | None = None
    dynamic_smem: int | None = None
    smem_limit: int | None = None
    warps: int | None = None  # num_warps of the compiled kernel (block = 32 * warps threads)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def smem(self) -> int | None:
        if self.static_smem is None or self.dynamic_smem is None:
            return None
        return self.static_smem + self.dynamic_smem

    @property
    def ok(self) -> bool:
        return not self.problems

    def occupancy(self) -> occupancy_rules.Occupancy | None:
        """Resident warps per SM on the target (occupancy.py), from the compiled registers, warps and shared memory."""
        if None in (self.registers, self.warps, self.smem):
            return None
        return occupancy_rules.occupancy(self.target, 32 * self.warps, self.registers, self.smem)

    def as_row(self) -> dict[str, Any]:
        row = {k: v for k, v in vars(self).items() if k != "log"}
        row["smem"] = self.smem
        occ = self.occupancy()
        row["occupancy"] = None if occ is None else occ.fraction
        row["occupancy_limiter"] = None if occ is None else occ.limiter
        return row


def _nvidia_tool(name: str) -> str:
    """Path of a CUDA tool shipped in the Triton wheel (TRITON_<NAME>_PATH overrides), else on PATH."""
    with contextlib.suppress(Exception):
        from triton import knobs

        return getattr(knobs.nvidia, name).path
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.is_file():
        return str(bundled)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in the Triton wheel nor on PATH")
    return found


@contextlib.contextmanager
def _hermetic_compile_env(cache_dir: str):
    """Environment for one compile: private cache, always compile, ptxas log on stdout. Restored afterwards."""
    wanted = {"TRITON_CACHE_DIR": cache_dir, "TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compile_spec(spec: KernelSpec, arch: int):
    """(CompiledKernel, captured stdout with the ptxas -v log) for one spec on ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index = {name: i for i, name in enumerate(spec.kernel.arg_names)}
    signature = {name: spec.signature.get(name, "constexpr") for name in spec.kernel.arg_names}
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in spec.divisible_by_16}
    source = ASTSource(spec.kernel, signature, constexprs=dict(spec.constexprs), attrs=attrs)
    captured = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="pykernels-aot-cache-") as cache_dir, _hermetic_compile_env(cache_dir):
        with contextlib.redirect_stdout(captured):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec.compile_options())
    return compiled, captured.getvalue()


_RES_RE = re.compile(r"Function\s+(\S+?):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")


def cubin_resources(cubin: bytes) -> dict[str, dict[str, int]]:
    """{function: {REG, STACK, SHARED, LOCAL}} from ``cuobjdump --dump-resource-usage`` on the cubin."""
    with tempfile.TemporaryDirectory(prefix="pykernels-aot-cubin-") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return {
        m.group(1): dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups()[1:]), strict=True))
        for m in _RES_RE.finditer(out)
    }


def ptxas_log_for(log: str, function: str) -> tuple[int, int, int, int] | None:
    """(registers, stack frame, spill stores, spill loads) of ``function`` in a ``ptxas -v`` log."""
    start = log.find(f"Compiling entry function '{function}'")
    if start < 0:
        return None
    section = log[start:]
    spill, regs = _SPILL_RE.search(section), _REGS_RE.search(section)
    if not spill or not regs:
        return None
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), int(spill.group(3))


def check(spec: KernelSpec, target: str) -> Result:
    """Compile ``spec`` for ``target`` (a key of TARGETS) and judge its resources."""
    arch, smem_limit = TARGETS[target]
    result = Result(spec.id, spec.stem, spec.kernel_name, spec.label, target, smem_limit=smem_limit)
    start = time.perf_counter()
    try:
        compiled, log = compile_spec(spec, arch)
    except Exception as e:  # noqa: BLE001 - a compile failure is a finding, reported with its message
        result.seconds = time.perf_counter() - start
        result.problems.append(f"compile error: {type(e).__name__}: {str(e).strip()[-3000:]}")
        return result
    result.seconds = time.perf_counter() - start
    result.log = log
    name = compiled.metadata.name
    result.dynamic_smem = int(compiled.metadata.shared)
    result.warps = int(compiled.metadata.num_warps)
    try:
        res = cubin_resources(compiled.asm["cubin"]).get(name)
    except Exception as e:  # noqa: BLE001
        res = None
        result.problems.append(f"cuobjdump failed: {e}")
    if res is None:
        result.problems.append(f"no resource usage for {name} in the cubin")
    else:
        result.registers, result.stack, result.static_smem, result.local = (
            res["REG"],
            res["STACK"],
            res["SHARED"],
            res["LOCAL"],
        )
    parsed = ptxas_log_for(log, name)
    if parsed is None:
        result.problems.append("no ptxas -v log captured (TRITON_DUMP_PTXAS_LOG unsupported?): spills unknown")
    else:
        regs, _stack_frame, result.spill_stores, result.spill_loads = parsed
        if result.registers is not None and regs != result.registers:
            result.problems.append(f"ptxas log says {regs} registers, the cubin {result.registers}: log mismatch")
    if result.spill_stores or result.spill_loads:
        result.problems.append(f"register spills: {result.spill_stores} B stores, {result.spill_loads} B loads")
    if result.stack and not (result.spill_stores or result.spill_loads):
        result.problems.append(f"{result.stack} B stack frame per thread (local arrays or spills)")
    if result.local:
        result.problems.append(f"{result.local} B local memory per thread")
    if result.smem is not None and result.smem > smem_limit:
        result.problems.append(f"shared memory {result.smem} B > {smem_limit} B per block on {target}")
    return result


# ---- report -------------------------------------------------------------------------------------------------------

COLUMNS = (
    "stem",
    "kernel",
    "config",
    "target",
    "regs",
    "spill st B",
    "spill ld B",
    "stack B",
    "smem B",
    "warps",
    "occ %",
    "limit",
    "status",
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table, one line per (spec, target), sorted by stem, kernel, config, target."""

    def cell(v):
        return "?" if v is None else str(v)

    lines = [
        (
            r["stem"],
            r["kernel"],
            r["label"],
            r["target"],
            cell(r["registers"]),
            cell(r["spill_stores"]),
            cell(r["spill_loads"]),
            cell(r["stack"]),
            cell(r["smem"]),
            cell(r.get("warps")),
            "?" if r.get("occupancy") is None else f"{100 * r['occupancy']:.1f}",
            cell(r.get("occupancy_limiter")),
            "ok" if not r["problems"] else "FAIL: " + "; ".join(p.splitlines()[0] for p in r["problems"]),
        )
        for r in sorted(rows, key=lambda r: (r["stem"], r["kernel"], r["label"], r["target"]))
    ]
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *lines, strict=True)]
    numeric = {4, 5, 6, 7, 8, 9, 10}

    def fmt(values):
        return "  ".join(
            (v.rjust(w) if i in numeric else v.ljust(w)) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    out = [fmt(COLUMNS), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    return "\n".join(out)


def summary(rows: list[dict[str, Any]]) -> str:
    failed = [r for r in rows if r["problems"]]
    regs = [r["registers"] for r in rows if r["registers"] is not None]
    at_cap = sum(1 for r in regs if r >= 255)
    return (
        f"{len(rows)} compiles ({len({r['spec_id'] for r in rows})} specs x {len({r['target'] for r in rows})} "
        f"targets), {len(failed)} failed; max registers {max(regs, default=0)} ({at_cap} at the 255 cap); "
        f"compile time {sum(r['seconds'] for r in rows):.1f} s (summed over workers)\n\n"
        + occupancy_rules.summary(rows, "Triton AOT, sm_80 and sm_90")
    )


def _check_job(job: tuple[int, str]) -> dict[str, Any]:
    index, target = job
    specs, _ = discover()
    return check(specs[index], target).as_row()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("-k", "--filter", default="", help="only specs whose id contains this substring")
    parser.add_argument("--target", choices=sorted(TARGETS), action="append", help="default: all targets")
    parser.add_argument("-o", "--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot.py compiles real cubins: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    start = time.perf_counter()
    specs, _ = discover()
    targets = args.target or sorted(TARGETS)
    jobs = [(i, t) for i, s in enumerate(specs) if args.filter in s.id for t in targets]
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            rows = pool.map(_check_job, jobs, chunksize=1)
    else:
        rows = [check(specs[i], t).as_row() for i, t in jobs]
    table = format_table(rows)
    text = f"{table}\n\n{summary(rows)}; wall {time.perf_counter() - start:.1f} s"
    print(text)
    for r in rows:
        for p in r["problems"]:
            print(f"\n{r['spec_id']} on {r['target']}: {p}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 1 if any(r["problems"] for r in rows) or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
