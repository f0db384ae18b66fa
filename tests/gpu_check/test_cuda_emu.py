"""The CUDA kernels' exact source, run on the CPU by the emulator of tests/cuda_emu under ASan + UBSan, against the
pure-PyTorch reference; and tests of the harness itself (it must catch an out-of-bounds read, a missing
__syncthreads and a wrong warp shuffle planted in a scratch copy of csrc/cuda/drop_path.cu).

Run with the other GPU-code gates: ``PYKERNELS_GPU_CHECK=1 python -m pytest tests/gpu_check -n 2 -q`` (see
conftest.py for when they skip). The emulated extension is built with ninja into build/cuda_emu/ (about a minute the
first time, incremental afterwards) by a child Python with the ASan runtime preloaded, which then runs the cases of
tests/cuda_emu/cases.py on request (tests/cuda_emu/emu.py). A sanitizer report kills that child: the test that
caused it fails with the report.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EMU_DIR = ROOT / "tests" / "cuda_emu"
sys.path.insert(0, str(EMU_DIR))

import cases  # noqa: E402
import emu  # noqa: E402

_procs: dict[str, emu.EmuProcess] = {}


def _missing_toolchain() -> str | None:
    if shutil.which("g++") is None or shutil.which("nm") is None:
        return "the CUDA emulator needs g++ and nm (binutils)"
    try:
        emu.preload()
    except Exception as e:  # noqa: BLE001
        return f"the CUDA emulator needs gcc's AddressSanitizer runtime: {e}"
    return None


def proc(variant: str = "main") -> emu.EmuProcess:
    """This worker's emulator process for a variant (started, and its extension built, on first use)."""
    reason = _missing_toolchain()
    if reason:
        pytest.fail(reason, pytrace=False)  # asked for with PYKERNELS_GPU_CHECK=1: a gate must not skip silently
    if variant not in _procs:
        if variant == "main":
            _procs[variant] = emu.EmuProcess()
        else:
            _procs[variant] = emu.EmuProcess(variant, sources=[str(planted_source())], opt="-O0")
    return _procs[variant]


def start_early() -> None:
    """When the gate runs, start the emulator processes (conftest calls this once the selected tests are known): they
    build the emulated extension while the other gates compile."""
    from . import aot

    opted_in, interpreting = aot.gate_status()
    if opted_in and not interpreting and _missing_toolchain() is None:
        for variant in ("main", "planted"):
            try:
                proc(variant).launch()
            except Exception:  # noqa: BLE001, S110 - the tests that need it report the problem
                pass


@pytest.fixture(scope="module", autouse=True)
def _close_processes():
    yield
    for p in _procs.values():
        p.close()
    _procs.clear()


def call(function: str, *args, variant: str = "main") -> dict:
    reply = proc(variant).call(function, *args)
    if "exception" in reply:
        pytest.fail(f"{function}{args} raised in the emulator process:\n{reply['traceback']}", pytrace=False)
    return reply


# ---- the kernels against the reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(cases.CASES))
def test_emulated_kernel_matches_reference(name):
    reply = call("run_case", name)
    assert reply["ok"], f"{name}: {reply['detail']}"


def test_every_cuda_kernel_runs_under_the_emulator():
    """Each __global__ function of csrc/cuda/*.cu is launched by the cases (drop_path: vectorized and scalar)."""
    for name in (
        "fwd/nchw/3x8x16x16/f32",  # vectorized (R % 4 == 0, aligned)
        "fwd/nchw/2x3x13x13/f32",  # scalar (R odd)
        "bwd/nchw/3x8x16x16/f32/grad_branch1",  # channels outer, vectorized
        "bwd/nchw/2x3x13x13/f32/grad_branch1",  # channels outer, scalar
        "bwd/tokens/2x197x200/f32/grad_branch1",  # channels inner, vectorized
        "bwd/tokens/1x5x3/f32/grad_branch1",  # channels inner, scalar
        *DWCONV_EVERY_KERNEL,
        *cases.MBCONV_EVERY_KERNEL,  # every kernel of mbconv_se.cu (sum kernel: both splits)
    ):
        assert call("run_case", name)["ok"], name
    launched = call("launched_kernels")
    kernels = {
        (cu.name, m.group(1))
        for cu in emu.kernel_sources()
        for m in re.finditer(r"__global__\s+void\s+(\w+)", cu.read_text())
    }
    assert kernels, "no __global__ kernels found in csrc/cuda"
    names = " ".join(launched)
    missing = sorted(f"{cu}: {k}" for cu, k in kernels if f"::{k}<" not in names and f"::{k}(" not in names)
    assert not missing, f"kernels never launched under the emulator (add cases to tests/cuda_emu/cases.py): {missing}"
    for kernel in (
        "drop_path_add_fwd_kernel",
        "drop_path_add_bwd_channels_inner_kernel",
        "drop_path_add_bwd_channels_outer_kernel",
    ):
        widths = {m.group(1) for n in launched for m in re.finditer(kernel + r"<.*, (\d+)(?:, (?:true|false))?>\(", n)}
        assert widths >= {"1", "4"}, f"{kernel}: vector widths launched {widths}, want 1 and 4"


DWCONV_EVERY_KERNEL = (
    "dwconv_fwd/nchw/2x3x7x7/k3/f32",  # dwconv_ln_fwd_kernel
    "dwconv_bwd/nhwc/2x3x7x7/k3/bf16",  # dy (grad_out in x's dtype), input (channels_last), weight kernels
    "dwconv_bwd/nchw/2x3x7x7/k3/f16-grad-f32",  # dy kernel reading float32 grad_out for float16 x; input (NCHW)
)


def test_every_dwconv_ln_kernel_runs_under_the_emulator():
    """The four kernels of csrc/cuda/dwconv_ln.cu run under the emulator, the dy kernel with grad_out in x's dtype and
    in float32 (the launcher's conversion)."""
    for name in DWCONV_EVERY_KERNEL:
        reply = call("run_case", name)
        assert reply["ok"], f"{name}: {reply['detail']}"
    names = " ".join(call("launched_kernels"))
    for kernel in (
        "dwconv_ln_fwd_kernel",
        "dwconv_ln_bwd_dy_kernel",
        "dwconv_ln_bwd_input_kernel",
        "dwconv_ln_bwd_weight_kernel",
    ):
        assert f"::{kernel}<" in names, f"{kernel} never launched: {names}"
    assert "dwconv_ln_bwd_dy_kernel<c10::BFloat16, c10::BFloat16, float>" in names, names
    assert "dwconv_ln_bwd_dy_kernel<c10::Half, float, float>" in names, names


# ---- the emulator's own semantics -----------------------------------------------------------------------------------


def expected_collective(op, arg, width, mask, threads):
    """What CUDA specifies for collective_probe_kernel (tests/cuda_emu/selftest.cu); None where it is undefined."""
    out = []
    for t in range(threads):
        warp, lane = divmod(t, 32)
        in_warp = min(32, threads - warp * 32)
        m = mask & ((1 << in_warp) - 1)
        if not m >> lane & 1:
            out.append(-2)
            continue
        base = lane & ~(width - 1)
        src = {
            0: base + (arg & (width - 1)),
            1: lane - arg if lane - arg >= base else lane,
            2: lane + arg if lane + arg < base + width else lane,
            3: lane ^ arg if (lane ^ arg) < base + width else lane,
        }.get(op)
        if op == 4:
            bits = sum(1 << i for i in range(in_warp) if m >> i & 1 and (warp * 32 + i) % 2)
            out.append(bits - (1 << 32) if bits >= 1 << 31 else bits)
        elif op == 5:
            out.append(int(any(m >> i & 1 and warp * 32 + i == 3 for i in range(in_warp))))
        elif op == 6:
            out.append(int(all(warp * 32 + i < 40 for i in range(in_warp) if m >> i & 1)))
        else:
            out.append(1000 + warp * 32 + src if m >> src & 1 else None)
    return out


COLLECTIVES = [
    # (op, arg, width, mask, threads): op 0 shfl, 1 up, 2 down, 3 xor, 4 ballot, 5 any, 6 all
    (0, 5, 32, 0xFFFFFFFF, 64),
    (0, 37, 8, 0xFFFFFFFF, 45),  # src lane wraps modulo the width; partial second warp
    (1, 3, 16, 0xFFFFFFFF, 48),
    (2, 4, 8, 0xFFFFFFFF, 40),
    (2, 1, 32, 0x0000FFFF, 32),  # lane 15 reads lane 16, outside the mask: undefined
    (3, 1, 32, 0x0000FFFF, 32),
    (3, 16, 32, 0xFFFFFFFF, 50),
    (2, 16, 32, 0xFFFFFFFF, 33),  # a warp of one lane
    (4, 0, 32, 0xFFFFFFFF, 40),
    (4, 0, 32, 0xF0F0F0F0, 64),
    (5, 0, 32, 0xFFFFFFFF, 40),
    (6, 0, 32, 0xFFFFFFFF, 48),
]


@pytest.mark.parametrize("args", COLLECTIVES, ids=lambda a: "op{}-arg{}-w{}-m{:x}-t{}".format(*a))
def test_warp_collectives(args):
    got = call("collective", *args)["out"]
    want = expected_collective(*args)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == (-1 if w is None else w), f"thread {t}: got {g}, want {w} (None: undefined -> all ones)"


def test_dynamic_shared_memory_atomics_and_poison():
    assert call("block_reverse", 3, 64, 64)["ok"]
    assert call("smem_poison", 4, 32)["out"] == [True] * 4, "dynamic shared memory must read as NaN in every block"
    assert call("histogram", 1000, 37)["ok"]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (0, r"warp 0 waits in __shfl_sync \(mask 0xffffffff\) for lanes of which 16 exited"),
        (1, r"warp 0 waits in __shfl_sync .* 16 wait in __syncthreads"),
        (2, r"lane 16\) with mask 0x0000ffff: the calling lane is not in the mask"),
    ],
    ids=["mask-names-exited-lanes", "shuffle-vs-syncthreads-deadlock", "lane-outside-its-mask"],
)
def test_misuse_is_an_error(kind, message):
    error = call("misuse", kind)["error"]
    assert error and re.search(message, error), error
    assert "misuse_kernel" in error, f"the error should name the kernel: {error}"


def test_invalid_launch_configuration():
    error = call("run_fwd_with_bad_launch")["error"]
    assert error and "invalid launch configuration" in error and "block (2048, 1, 1)" in error, error


def test_asan_catches_dynamic_shared_memory_overflow():
    """64 threads, dynamic shared memory for 63 floats: thread 63's store is a heap-buffer-overflow."""
    with pytest.raises(emu.EmuCrash) as crash:
        proc().call("block_reverse", 2, 64, 63)
    report = str(crash.value)
    assert "AddressSanitizer: heap-buffer-overflow" in report and "WRITE of size 4" in report, report[-3000:]
    assert "block_reverse_kernel" in report and "selftest.cu" in report, report[-3000:]


# ---- planted bugs: the gate must catch each kind --------------------------------------------------------------------

SOURCE = ROOT / "csrc" / "cuda" / "drop_path.cu"
# exact text of drop_path.cu -> the same with a bug armed by CUDA_EMU_PLANT=<name> (one scratch build serves all)
SHUFFLE = "__shfl_down_sync(0xffffffffu, value, offset)"
PLANTS = {
    "gamma[c]": (
        "gamma != nullptr ? gamma[c] : acc_t(1)",
        'gamma != nullptr ? gamma[c + planted("off_by_one_read")] : acc_t(1)',
        1,
    ),
    "__syncthreads": (
        "  if (lane == 0) warp_sums[warp] = value;\n  __syncthreads();\n",
        '  if (lane == 0) warp_sums[warp] = value;\n  if (!planted("missing_syncthreads")) __syncthreads();\n',
        1,
    ),
    "shuffle": (
        SHUFFLE,
        '(planted("shuffle_up") ? __shfl_up_sync(0xffffffffu, value, offset) '
        ': __shfl_down_sync(planted("shuffle_mask") ? 0x7fffffffu : 0xffffffffu, value, offset))',
        2,
    ),
}
PRELUDE = """// Scratch copy of csrc/cuda/drop_path.cu with bugs planted by tests/gpu_check/test_cuda_emu.py, each
// armed when CUDA_EMU_PLANT names it.
static int planted(const char* name) {
  const char* armed = std::getenv("CUDA_EMU_PLANT");
  return armed != nullptr && std::strcmp(armed, name) == 0;
}
"""


def planted_source() -> Path:
    text = SOURCE.read_text()
    for what, (old, new, count) in PLANTS.items():
        found = text.count(old)
        assert found == count, f"plant {what!r}: {old!r} occurs {found} times in {SOURCE} (want {count}): update PLANTS"
        text = text.replace(old, new)
    path = emu.BUILD_ROOT / "planted" / "drop_path_planted.cu"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != PRELUDE + text:
        path.write_text(PRELUDE + text)
    return path


def run_planted(plant: str | None, case: str) -> dict:
    call("set_env", "CUDA_EMU_PLANT", plant, variant="planted")
    return proc("planted").call("run_case", case)


def test_planted_copy_is_correct_when_disarmed():
    for case in (
        "fwd/nchw/2x3x13x13/f32",
        "bwd/nchw/2x3x13x13/f32/grad_branch1",
        "bwd/nchw/1x200x7x7/f32/grad_branch1",
    ):
        reply = run_planted(None, case)
        assert reply.get("ok"), f"{case} on the disarmed scratch copy: {reply}"


def test_gate_catches_an_out_of_bounds_read():
    """gamma[c + 1]: the thread of the last channel reads one float past gamma -> ASan kills the process."""
    with pytest.raises(emu.EmuCrash) as crash:
        run_planted("off_by_one_read", "fwd/nchw/2x3x13x13/f32")
    report = str(crash.value)
    assert "AddressSanitizer: heap-buffer-overflow" in report and "READ of size 4" in report, report[-3000:]
    assert "drop_path_add_fwd_kernel" in report and "drop_path_planted.cu" in report, report[-3000:]


@pytest.mark.parametrize("case", ["bwd/nchw/2x3x13x13/f32/grad_branch1", "bwd/nchw/1x200x7x7/f32/grad_branch1"])
def test_gate_catches_a_missing_syncthreads(case):
    """Without the barrier in block_sum, warp 0 reads the other warps' partial sums before they are written."""
    reply = run_planted("missing_syncthreads", case)
    assert reply.get("ok") is False and "grad_gamma" in reply["detail"], reply


def test_gate_catches_a_wrong_shuffle():
    """__shfl_up_sync instead of __shfl_down_sync in the warp reduction: lane 0 sums itself 32 times."""
    reply = run_planted("shuffle_up", "bwd/nchw/2x3x13x13/f32/grad_branch1")
    assert reply.get("ok") is False and "grad_gamma" in reply["detail"], reply


def test_gate_catches_a_shuffle_mask_that_leaves_out_a_lane():
    """Mask 0x7fffffff with all 32 lanes calling: undefined on a GPU (often silently right), an error here."""
    reply = run_planted("shuffle_mask", "bwd/nchw/2x3x13x13/f32/grad_branch1")
    assert "exception" in reply and "the calling lane is not in the mask" in reply["exception"], reply
    assert "drop_path_add_bwd_channels_outer_kernel" in reply["exception"], reply
