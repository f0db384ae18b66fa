"""Build pykernels and its C++/CUDA extension ``pykernels._C``.

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed; the
Makefile does this for you).

Environment switches:
  PYKERNELS_SKIP_BUILD=1        pure Python install: only the ``triton`` and ``torch`` backends.
  PYKERNELS_SKIP_CUDA_BUILD=1   build the C++ CPU kernels only, even if torch has CUDA and nvcc is found.
  PYKERNELS_CUDA_ARCHS="8.0;9.0"  compute capabilities the CUDA kernels are compiled for (default 8.0;9.0).
  MAX_JOBS                      parallel compile jobs for ninja (default: the number of CPU cores).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["pykernels", "pykernels.ops", "pykernels.modules", "pykernels.triton_kernels"]
# The Triton kernels live in the top-level folder triton_kernels/ but install as pykernels.triton_kernels:
# OpenAI's Triton project ships its own top-level `triton_kernels` package, which we must not shadow.
PACKAGE_DIR = {"pykernels": "pykernels", "pykernels.triton_kernels": "triton_kernels"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _log(msg: str) -> None:
    print(f"[pykernels setup] {msg}", file=sys.stderr, flush=True)


def _pip_cuda_include_dirs() -> list[str]:
    """Header folders of the pip-installed CUDA packages (nvidia/cu13/include, nvidia/*/include).

    torch's CUDA headers include cusparse.h & co., which a pip-installed torch ships in these
    folders rather than in the system CUDA toolkit.
    """
    dirs: list[str] = []
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return dirs
    for base in list(getattr(nvidia, "__path__", [])):
        dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    return dirs


def _nvcc_toolkit_dir() -> str | None:
    """The CUDA toolkit folder of the ``nvcc`` on PATH, as nvcc itself reports it (``TOP=`` of a dry run).

    torch guesses CUDA_HOME as the parent of ``which nvcc``; when that is a wrapper script (``/usr/local/bin/nvcc``)
    the guess (``/usr/local``) has no ``lib64/libcudart.so`` and the link fails.
    """
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dry_run.stdout + dry_run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line[len("#$ TOP=") :].strip())
            return top if os.path.isdir(os.path.join(top, "include")) else None
    return None


def _extensions():
    if _flag("PYKERNELS_SKIP_BUILD"):
        _log("PYKERNELS_SKIP_BUILD=1: pure-Python install (triton and torch backends only)")
        return [], {}

    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and not _flag("PYKERNELS_SKIP_CUDA_BUILD"):
        toolkit = _nvcc_toolkit_dir()  # must be set before torch.utils.cpp_extension is imported
        if toolkit:
            os.environ["CUDA_HOME"] = toolkit
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    want_cuda = not _flag("PYKERNELS_SKIP_CUDA_BUILD")
    has_cuda = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    build_cuda = want_cuda and has_cuda and bool(cuda_sources)
    if want_cuda and not has_cuda:
        _log(f"CUDA part skipped: torch.version.cuda={torch.version.cuda}, nvcc={nvcc}")

    cxx_flags = [
        "-O3",
        "-std=c++20",
        "-fopenmp",
        # Keep a*b+c as two roundings: fp32 outputs stay bit-identical to eager PyTorch.
        "-ffp-contract=off",
    ]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    extra_link_args = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]

    if build_cuda:
        archs = os.environ.get("PYKERNELS_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        include_dirs += _pip_cuda_include_dirs()
        define_macros.append(("PYKERNELS_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
        _log(f"building C++ CPU + CUDA kernels for archs {archs} with {nvcc} (MAX_JOBS={os.environ['MAX_JOBS']})")
        ext = CUDAExtension(
            "pykernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
    else:
        _log(f"building C++ CPU kernels (MAX_JOBS={os.environ['MAX_JOBS']})")
        ext = CppExtension(
            "pykernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="pykernels",
    version="0.1.0",
    description="Fused Triton / CUDA / C++ kernels for ViT, ConvNeXt and EfficientNet blocks, as drop-in nn.Modules",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "expecttest", "timm", "torchvision", "transformers"],
        "bench": ["pytest-benchmark", "matplotlib", "timm", "torchvision", "transformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
