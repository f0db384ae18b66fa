"""Build the CUDA kernels of csrc/cuda/*.cu for the host emulator (cuda_emu.h) with ASan + UBSan, and run them.

The emulated extension registers every launcher of csrc/cuda under ``torch.ops.pykernels_emu`` for CPU tensors
(same schemas as ``pykernels::``, from csrc/ops.cpp), plus the emulator's own probes (selftest.cu). It is built by
``torch.utils.cpp_extension.load`` (ninja, incremental) into ``build/cuda_emu/<variant>/`` and can only be loaded by
a Python whose first library is the ASan runtime, so it lives in a child process:

    LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \\
        ASAN_OPTIONS=detect_leaks=0 python ...

``EmuProcess`` starts that child and calls functions of ``tests/cuda_emu/cases.py`` in it (JSON over pipes). An ASan
or UBSan report kills the child: the call raises ``EmuCrash`` with the report. A variant built from other sources (a
scratch copy of a kernel with a planted bug) builds into its own folder: ``EmuProcess("name", sources=[...])``.

By hand: ``python tests/cuda_emu/emu.py build`` (build only), ``python tests/cuda_emu/emu.py run CASE...`` (run
cases of cases.py under the sanitizers and print the results).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
BUILD_ROOT = ROOT / "build" / "cuda_emu"
MARK = "@@cuda_emu@@ "
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:abort_on_error=0:new_delete_type_mismatch=0:alloc_dealloc_mismatch=0"
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"
CFLAGS = [
    "-std=c++20",
    "-g1",  # line tables: ASan reports name file:line
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-ffp-contract=off",  # as setup.py and nvcc's __fmul_rn/__fadd_rn: no FMA contraction
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-include",
    str(HERE / "cuda_emu.h"),
]
# The traffic variant (traffic.cpp: global-memory traffic per launch): every memory access calls a callback of
# traffic.cpp (kernel-address instrumentation, no sanitizer runtime); -O0 keeps every access (see traffic.cpp).
TRAFFIC_CFLAGS = [
    "-std=c++20",
    "-O0",
    "-g0",
    "-fsanitize=kernel-address",
    "--param=asan-instrumentation-with-call-threshold=0",
    "--param=asan-stack=0",
    "--param=asan-globals=0",
    "-DCUDA_EMU_TRAFFIC",
    "-ffp-contract=off",
    "-Wno-unknown-pragmas",
    "-include",
    str(HERE / "cuda_emu.h"),
]
TRAFFIC = "traffic"  # the variant name (build/cuda_emu/traffic/)


def kernel_sources() -> list[Path]:
    """Every CUDA source of the extension: all of them run under the emulator."""
    return sorted((CSRC / "cuda").glob("*.cu"))


def _gcc_library(name: str) -> str:
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, check=True)
    path = path.stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"g++ does not know {name} (got {path!r}): install gcc's sanitizer runtimes")
    return os.path.realpath(path)


def preload() -> str:
    """LD_PRELOAD for a Python that loads ASan-built code: the ASan runtime first, then libstdc++ (python does not link
    it; without it ASan's __cxa_throw interceptor finds no real __cxa_throw and any C++ exception aborts)."""
    return f"{_gcc_library('libasan.so')} {_gcc_library('libstdc++.so')}"


def sanitizer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LD_PRELOAD=preload(), ASAN_OPTIONS=ASAN_OPTIONS, UBSAN_OPTIONS=UBSAN_OPTIONS, **extra)
    return env


@contextmanager
def _build_lock(folder: Path):
    """One build per folder at a time, across processes (pytest-xdist workers); released if the holder dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".cuda_emu.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        # torch's own FileBaton, left behind by a build that was killed, would make load() wait forever.
        (folder / "lock").unlink(missing_ok=True)
        yield


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # keep mtimes: ninja rebuilds only what changed
        path.write_text(text)


def load(variant: str = "main", sources: list[str] | None = None, opt: str = "-O1") -> str:
    """Build (incrementally) and load the emulated extension; returns the .so path. Needs the ASan runtime preloaded,
    except for the traffic variant (variant == TRAFFIC), which must run without it.

    sources: the .cu files to emulate (default: every csrc/cuda/*.cu plus selftest.cu; for the traffic variant every
    csrc/cuda/*.cu plus traffic_probe.cu); each is compiled through a one-line wrapper ``#include "<file>"`` so that
    g++ (not nvcc) compiles it.
    """
    import torch
    from torch.utils import cpp_extension

    traffic = variant.startswith(TRAFFIC)
    default = [*kernel_sources(), HERE / ("traffic_probe.cu" if traffic else "selftest.cu")]
    cu_files = [Path(s).resolve() for s in sources] if sources else default
    folder = BUILD_ROOT / variant
    wrappers = folder / "src"
    wrappers.mkdir(parents=True, exist_ok=True)
    cpp = [str(HERE / "emu_library.cpp")] + ([str(HERE / "traffic.cpp")] if traffic else [])
    for cu in cu_files:
        wrapper = wrappers / f"{cu.stem}_cu.cpp"
        _write_if_changed(wrapper, f'// generated by tests/cuda_emu/emu.py\n#include "{cu}"\n')
        cpp.append(str(wrapper))
    # The compilers this starts must not run with the ASan runtime preloaded.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        with _build_lock(folder):
            cpp_extension.load(
                name=f"pykernels_emu_{variant}",
                sources=cpp,
                extra_cflags=TRAFFIC_CFLAGS if traffic else [opt, *CFLAGS],
                extra_ldflags=[] if traffic else ["-fsanitize=address,undefined"],
                extra_include_paths=[str(HERE / "shim"), str(CSRC), str(CSRC / "cuda")],
                build_directory=str(folder),
                is_python_module=False,
                with_cuda=False,
                verbose=os.environ.get("CUDA_EMU_VERBOSE") == "1",
            )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    paths = [p for p in torch.ops.loaded_libraries if f"pykernels_emu_{variant}" in os.path.basename(p)]
    return paths[-1] if paths else ""


# ---- naming kernels: the launch log holds offsets into the .so; nm has the (internal-linkage) symbols -------------


def kernel_symbols(so_path: str) -> dict[int, str]:
    """{offset: demangled name} of the functions in the .so's symbol table."""
    out = subprocess.run(["nm", "-C", "--defined-only", so_path], capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            symbols[int(parts[0], 16)] = parts[2]
    return symbols


def launched_kernels(so_path: str) -> dict[str, int]:
    """{demangled kernel: launches} from the emulator's launch log of this process."""
    import torch

    symbols = kernel_symbols(so_path)
    launched = {}
    for entry in torch.ops.pykernels_emu.emu_launches():
        offset, count = map(int, entry.split())
        launched[symbols.get(offset, f"+0x{offset:x}")] = count
    return launched


# ---- the sanitized child process --------------------------------------------------------------------------------


class EmuCrash(RuntimeError):
    """The emulator process died (an ASan / UBSan report, a segfault); the message holds its stderr."""


class EmuProcess:
    """A child Python with the ASan runtime preloaded that builds + loads one variant and runs cases.py functions."""

    def __init__(self, variant: str = "main", sources: list[str] | None = None, opt: str = "-O1", env=None):
        self.variant, self.sources, self.opt, self.extra_env = variant, sources, opt, dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.so_path: str | None = None

    def launch(self) -> None:
        """Starts the child (it builds, then loads) without waiting for it: see start()."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.stderr = tempfile.TemporaryFile(mode="w+")
        spec = json.dumps({"variant": self.variant, "sources": self.sources, "opt": self.opt})
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=self._env(),
            cwd=str(ROOT),
        )
        self._buffer = b""
        self.so_path = None

    def _env(self) -> dict[str, str]:
        if not self.variant.startswith(TRAFFIC):
            return sanitizer_env(**self.extra_env)
        # the traffic variant defines the __asan_* callbacks itself: the ASan runtime must not be loaded
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 900.0) -> None:
        """Starts the child if needed and waits until its extension is built and loaded."""
        self.launch()
        if self.so_path is None:
            self.so_path = self._reply(timeout)["so"]

    def _stderr_text(self, limit: int = 12000) -> str:
        """The child's stderr: from the sanitizer report on (its first `limit` characters), else the tail."""
        self.stderr.seek(0)
        text = self.stderr.read()
        starts = [i for i in (text.find("ERROR: AddressSanitizer"), text.find("runtime error:")) if i >= 0]
        if starts:
            start = text.rfind("\n", 0, min(starts)) + 1
            return text[start : start + limit]
        return text[-limit:]

    def _reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(MARK):
                    return json.loads(text[len(MARK) :])
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise TimeoutError(f"cuda_emu process ({self.variant}) silent for {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            chunk = os.read(fd, 65536) if ready else b""
            if ready and not chunk:  # EOF: the child died
                code = self.proc.wait()
                raise EmuCrash(f"cuda_emu process ({self.variant}) exited with {code}:\n{self._stderr_text()}")
            self._buffer += chunk

    def call(self, function: str, *args, timeout: float = 300.0) -> dict:
        """cases.<function>(*args) in the child; its dict result, or EmuCrash if the child died."""
        if self.proc is None or self.proc.poll() is not None or self.so_path is None:
            self.start()
        self.proc.stdin.write((json.dumps({"function": function, "args": args}) + "\n").encode())
        self.proc.stdin.flush()
        try:
            return self._reply(timeout)
        except EmuCrash:
            self.proc, self.so_path = None, None  # the next call starts a fresh process
            raise

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc, self.so_path = None, None


def _serve(spec: str) -> None:
    """Child side of EmuProcess: build + load, then answer one JSON request per stdin line."""
    import traceback

    options = json.loads(spec)
    so_path = load(options["variant"], options["sources"], options["opt"])
    sys.path.insert(0, str(HERE))
    import cases

    cases.SO_PATH = so_path
    if options["variant"].startswith(TRAFFIC):
        import traffic_cases as cases  # the traffic measurements (and, through it, the inputs of cases.py)

        cases.SO_PATH = so_path
    out = sys.stdout
    out.write(MARK + json.dumps({"so": so_path}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = getattr(cases, request["function"])(*request["args"])
        except Exception as e:  # noqa: BLE001 - reported to the caller
            reply = {"exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        out.write(MARK + name_kernels(json.dumps(reply), so_path) + "\n")
        out.flush()


def name_kernels(text: str, so_path: str) -> str:
    """Replaces the emulator's "<lib>.so+0x<offset>" kernel references in text by the kernels' demangled names."""
    import re

    pattern = re.compile(re.escape(os.path.basename(so_path)) + r"\+0x([0-9a-f]+)")
    if not so_path or not pattern.search(text):
        return text
    symbols = kernel_symbols(so_path)
    return pattern.sub(lambda m: symbols.get(int(m.group(1), 16), m.group(0)), text)


def measure_traffic(proc: EmuProcess, name: str) -> dict:
    """traffic_cases.CASES[name] counted at a small batch and scaled to the benchmark batch by a dry run
    (traffic_report.combine). The batch: traffic_report.MEASURED_BATCH, doubled until its dry run launches the same
    kernels as the benchmark's (a grid of one block group at batch 1 skips a partial-sum merge kernel)."""
    sys.path.insert(0, str(HERE))
    import traffic_report

    def measure(batch: int, dry: bool) -> dict:
        reply = proc.call("measure", name, batch, dry, timeout=600 if dry else 1800)
        if "exception" in reply:
            raise RuntimeError(f"traffic case {name} (batch {batch}, dry {dry}) raised:\n{reply['traceback']}")
        return reply

    bench = measure(0, True)
    batch = traffic_report.MEASURED_BATCH
    while batch < bench["batch"] and measure(batch, True)["kernels"] != bench["kernels"]:
        batch = min(2 * batch, bench["batch"])
    return traffic_report.combine(measure(batch, False), bench)


def sources_at(rev: str) -> tuple[str, list[str]]:
    """(variant, sources): csrc/cuda/*.cu as of git revision `rev`, copied to build/cuda_emu/traffic-<commit>/ (the
    headers they include stay the working tree's; a file the revision does not have is left out: its ops are then
    missing)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", rev], cwd=ROOT, capture_output=True, text=True, check=True
    )
    variant = f"{TRAFFIC}-{commit.stdout.strip()}"
    folder = BUILD_ROOT / variant / "rev-src"
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in kernel_sources():
        relative = cu.relative_to(ROOT).as_posix()
        text = subprocess.run(["git", "show", f"{rev}:{relative}"], cwd=ROOT, capture_output=True, text=True)
        if text.returncode != 0:
            continue
        _write_if_changed(folder / cu.name, text.stdout)
        sources.append(str(folder / cu.name))
    return variant, [*sources, str(HERE / "traffic_probe.cu")]


def traffic_main(substrings: list[str], out: str | None, rev: str | None = None) -> int:
    sys.path.insert(0, str(HERE))
    import traffic_cases
    import traffic_report

    names = [n for n in traffic_cases.CASES if not substrings or any(k in n for k in substrings)]
    variant, sources = sources_at(rev) if rev else (TRAFFIC, None)
    proc = EmuProcess(variant, sources)
    start = time.perf_counter()
    proc.start()
    print(f"built + loaded {proc.so_path} in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for name in names:
        start = time.perf_counter()
        rows.append(measure_traffic(proc, name))
        bench = rows[-1]["at_bench_batch"]
        print(
            f"{name}: {bench['ratio_distinct']:.3f} x the minimum at batch {bench['batch']} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    proc.close()
    print(traffic_report.format_table(rows))
    print(traffic_report.summary(rows))
    if out:
        document = {
            "backend": "cuda",
            "sources": f"csrc/cuda as of {rev}" if rev else "csrc/cuda (working tree)",
            "generated_by": "python tests/cuda_emu/emu.py traffic --out "
            + out
            + "".join(f" -k {k}" for k in substrings),
            "definitions": "tests/cuda_emu/traffic_cases.py (counting), traffic_report.py (scaling, gate)",
            "gate_ratio": traffic_report.GATE_RATIO,
            "known_excess": {
                f"{op} {d}": {"reason": r, "figure": f} for (op, d), (r, f) in traffic_report.KNOWN_EXCESS.items()
            },
            "rows": rows,
        }
        Path(out).write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {out}")
    return 1 if traffic_report.check(rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve").add_argument("spec")
    sub.add_parser("build")
    run = sub.add_parser("run")
    run.add_argument("cases", nargs="*", help="names from cases.CASES (default: all)")
    traffic = sub.add_parser("traffic", help="global-memory traffic per op x direction x case (traffic_cases.py)")
    traffic.add_argument("-k", action="append", default=[], help="substring of the case names to run (repeatable)")
    traffic.add_argument("--out", help="write the rows as JSON (bench/results/gpu-traffic-cuda.json)")
    traffic.add_argument(
        "--git-rev",
        help="measure csrc/cuda/*.cu as of this git revision (e.g. HEAD, to compare with uncommitted changes)",
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args.spec)
        return 0
    if args.command == "traffic":
        return traffic_main(args.k, args.out, args.git_rev)
    proc = EmuProcess()
    start = time.perf_counter()
    proc.start()
    print(f"built + loaded {proc.so_path} in {time.perf_counter() - start:.1f} s")
    if args.command == "build":
        proc.close()
        return 0
    sys.path.insert(0, str(HERE))
    import cases

    failed = 0
    for name in args.cases or list(cases.CASES):
        reply = proc.call("run_case", name)
        ok = reply.get("ok", False)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name} {reply.get('detail') or reply.get('exception', '')}")
    proc.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
