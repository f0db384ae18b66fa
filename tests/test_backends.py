"""Backend registry, `python -m pykernels info`, the build, and importing without Triton / the extension / a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pykernels
from pykernels import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300
    )


# sys.modules[name] = None: `import name` raises ImportError and find_spec(name) is None, as if not installed
BLOCKER = """
import sys
for name in BLOCKED:
    sys.modules[name] = None
"""


@pytest.mark.parametrize("blocked", [["triton"], ["pykernels._C"], ["triton", "pykernels._C"]], ids="+".join)
def test_import_and_run_without_triton_or_extension(blocked):
    """`import pykernels` never fails; ops fall back to what is there, and info() says why the rest is missing."""
    proc = _run_python(
        f"BLOCKED = {blocked!r}\n"
        + BLOCKER
        + """
import torch, pykernels
from pykernels import functional as F
x = torch.randn(2, 3, 4)
out = F.drop_path_add(x, x, 0.5, torch.ones(4))
assert out.shape == x.shape
print(pykernels.info())
""",
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0, proc.stderr
    if "triton" in blocked:
        assert "Triton is not importable" in proc.stdout
    if "pykernels._C" in blocked:
        assert "pykernels._C is not built or failed to load" in proc.stdout
        assert "cpp     cpu   unavailable" in proc.stdout


def test_python_m_pykernels_info():
    proc = subprocess.run([sys.executable, "-m", "pykernels", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch {torch.__version__}" in out and "triton" in out and "CUDA (torch build)" in out
    assert "op drop_path_add" in out
    for backend in backends.BACKENDS:
        assert f"\n  {backend} " in out, f"no line for backend {backend}"


def test_info_lists_every_registered_op():
    text = pykernels.info()
    for name in backends.registered_ops():
        assert f"op {name}" in text


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown pykernels backend 'gpu'"):
        with pykernels.use_backend("gpu"):
            pass


def test_use_backend_is_restored_after_errors():
    with pytest.raises(RuntimeError):
        with pykernels.use_backend("torch"):
            assert backends.requested_backend() == "torch"
            raise RuntimeError("boom")
    assert backends.requested_backend() in (None, os.environ.get("PYKERNELS_BACKEND") or None)


def test_triton_kernels_is_a_pykernels_subpackage():
    """triton_kernels/ installs as pykernels.triton_kernels, never as a top-level package (OpenAI Triton's name)."""
    import pykernels.triton_kernels as tk

    assert os.path.realpath(os.path.dirname(tk.__file__)) == os.path.realpath(os.path.join(ROOT, "triton_kernels"))
    code = (
        "import importlib.util as u; s = u.find_spec('triton_kernels'); print(s is None or ROOT not in str(s.origin))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", f"ROOT = {ROOT!r}; {code}"], capture_output=True, text=True, cwd="/", timeout=120
    )
    assert proc.stdout.strip() == "True", proc.stdout + proc.stderr


def _cuda_build_expected() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    skip = os.environ.get("PYKERNELS_SKIP_CUDA_BUILD", "0") not in ("", "0") or os.environ.get(
        "PYKERNELS_SKIP_BUILD", "0"
    ) not in ("", "0")
    nvcc = (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None) or shutil.which("nvcc")
    return torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc) and not skip


def test_extension_built_with_every_kernel():
    """The build produced pykernels._C with the CPU kernels and - where torch has CUDA and nvcc exists (CI) - the
    CUDA kernels compiled and linked in, even though this machine cannot run them."""
    if os.environ.get("PYKERNELS_SKIP_BUILD", "0") not in ("", "0"):
        pytest.skip("PYKERNELS_SKIP_BUILD=1: pure-Python install, no pykernels._C to check")
    ok, why = backends.extension_status()
    assert ok, why
    for op in ("drop_path_add_fwd", "drop_path_add_bwd"):
        assert backends.has_compiled_kernel(op, "CPU"), op
        if _cuda_build_expected():
            assert backends.has_compiled_kernel(op, "CUDA"), (
                f"{op}: CUDA kernel missing although nvcc and CUDA torch exist"
            )
