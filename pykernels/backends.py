"""Backend registry, capability checks and backend selection (xFormers' dispatch pattern, made small).

Four backends can run a pykernels op:

* ``triton`` - Triton kernels (``pykernels.triton_kernels``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (how the tests run them on a machine without a GPU);
* ``cuda``   - the CUDA kernels compiled into the extension ``pykernels._C``;
* ``cpp``    - the C++ CPU kernels compiled into ``pykernels._C``;
* ``torch``  - the pure-PyTorch reference (``pykernels.reference``): any device, the fallback.

Each op declares, per backend, what it supports (:class:`KernelSpec`) and can say *why* a backend
cannot serve a call (:meth:`Op.not_supported_reasons`). Selection (:meth:`Op.select`):

* explicit - the ``backend=`` argument, else the innermost :func:`use_backend` context, else the
  ``PYKERNELS_BACKEND`` environment variable; an explicit choice that cannot serve the call raises
  :class:`BackendNotSupportedError` listing every backend's reasons;
* automatic - the first backend of the op's priority list for the device (CUDA: the op's preferred
  GPU backend first; CPU: ``cpp`` if built, else ``torch``) that supports the call; it falls back quietly.

Importing this module never fails because Triton, the extension or CUDA is missing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pykernels._dtypes import FLOAT_DTYPES, dtype_name

BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpp", "torch")

_CONTEXT_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("pykernels_backend", default=None)
_OPS: dict[str, Op] = {}


class BackendNotSupportedError(RuntimeError):
    """An explicitly chosen backend cannot serve a call (the message lists every backend's reasons)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown pykernels backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run every pykernels op inside the ``with`` block on backend ``name`` (``None``: automatic choice).

    Example::

        with pykernels.use_backend("cpp"):
            y = pykernels.functional.drop_path_add(x, branch, 0.1)
    """
    token = _CONTEXT_BACKEND.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _CONTEXT_BACKEND.reset(token)


def requested_backend(explicit: str | None = None) -> str | None:
    """The explicit backend in force: argument > :func:`use_backend` > ``PYKERNELS_BACKEND``; None = automatic."""
    if explicit:
        return _check_name(explicit)
    ctx = _CONTEXT_BACKEND.get()
    if ctx:
        return ctx
    env = os.environ.get("PYKERNELS_BACKEND", "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"PYKERNELS_BACKEND={env!r} is not a backend; choose one of {', '.join(BACKENDS)} or auto")
        return env
    return None


# What Op.select reads on every call to know whether its memoised decision still holds: os.environ's own dict
# (bytes keys on POSIX) - what os.environ.get reads, without its per-call encode / decode.
if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict):
    _env_get, _ENV_BACKEND, _ENV_INTERPRET = os.environ._data.get, b"PYKERNELS_BACKEND", b"TRITON_INTERPRET"
else:  # pragma: no cover - Windows, or a Python whose os.environ has no _data
    _env_get, _ENV_BACKEND, _ENV_INTERPRET = os.environ.get, "PYKERNELS_BACKEND", "TRITON_INTERPRET"


def automatic(explicit: str | None = None) -> bool:
    """Whether the automatic choice is in force: no ``backend=`` argument, no :func:`use_backend` block, and
    ``PYKERNELS_BACKEND`` unset (or ``auto``). What :func:`requested_backend` decides, read without resolving it on the
    hot path (an invalid ``PYKERNELS_BACKEND`` raises as it does)."""
    if explicit or _CONTEXT_BACKEND.get():
        return False
    return not _env_get(_ENV_BACKEND) or requested_backend() is None


# ---- what is installed ------------------------------------------------------------------------------------------


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), e.g. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return False, f"Triton is not importable ({type(exc).__name__}: {exc})"
    return True, triton.__version__


@functools.cache
def extension_status() -> tuple[bool, str]:
    """(``pykernels._C`` loaded, '' or the reason it is not)."""
    try:
        import pykernels._C  # noqa: F401  (registers torch.ops.pykernels.*)
    except Exception as exc:
        return False, (
            f"the extension pykernels._C is not built or failed to load ({type(exc).__name__}: {exc}); "
            "build it with `pip install --no-build-isolation -e .` (see README)"
        )
    return True, ""


def has_compiled_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether ``pykernels._C`` registered a ``dispatch_key`` ("CPU"/"CUDA") kernel for ``pykernels::op_name``."""
    if not extension_status()[0]:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::{op_name}", dispatch_key)
    except RuntimeError:
        return False


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


# ---- per-op capability declarations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """What one backend's implementation of one op supports.

    Args:
        devices: device types it runs on ("cpu", "cuda").
        dtypes: supported input dtypes.
        min_capability: minimum CUDA compute capability, for GPU backends.
        check: op-specific extra check, called with the call's description; returns reasons (empty = fine).
    """

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype] = FLOAT_DTYPES
    min_capability: tuple[int, int] | None = None
    check: Callable[..., list[str]] | None = field(default=None, compare=False)


def _dtype_names(dtypes) -> str:
    return ", ".join(sorted(dtype_name(d) for d in dtypes))


@functools.cache
def _import_status(module: str) -> tuple[bool, str]:
    """(``module`` importable, '' or the reason it is not)."""
    try:
        importlib.import_module(module)
    except Exception as exc:
        return False, f"{module} is not available ({type(exc).__name__}: {exc})"
    return True, ""


@dataclass
class Op:
    """A pykernels op: its backends' capabilities, its priority lists per device type, and where its kernels are.

    Every backend's kernels are found by name (see docs/adding-an-op.md), all with the signatures of the compiled
    ops declared in csrc/ops.cpp:

    * ``triton``: ``pykernels.triton_kernels.<stem>.<name>_fwd`` / ``<name>_bwd`` (the launchers);
    * ``cpp`` / ``cuda``: ``torch.ops.pykernels.<name>_fwd`` / ``<name>_bwd`` (CPU / CUDA kernels of ``pykernels._C``);
    * ``torch``: ``pykernels.reference.<stem>.<name>_fwd`` / ``<name>_bwd``.

    Args:
        name: the op's name: ``pykernels::<name>`` is its public custom op, ``pykernels::<name>_backward`` its backward.
        stem: the file stem of its kernels (default: ``name``).
        specs: what each backend that implements it supports (a backend absent here has no implementation).
        gpu_priority / cpu_priority: the automatic order on CUDA / CPU tensors.
    """

    name: str
    specs: dict[str, KernelSpec]
    gpu_priority: Sequence[str]
    cpu_priority: Sequence[str] = ("cpp", "torch")
    stem: str = ""
    _decisions: dict = field(default_factory=dict, repr=False, compare=False)
    _kernels: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.stem = self.stem or self.name
        for name in (*self.specs, *self.gpu_priority, *self.cpu_priority):
            _check_name(name)

    def kernels(self, backend: str) -> tuple[Callable, Callable]:
        """(fwd, bwd) callables of ``backend``, with the signatures of the compiled ops."""
        try:
            return self._kernels[backend]
        except KeyError:
            pass
        fwd, bwd = f"{self.name}_fwd", f"{self.name}_bwd"
        if backend in ("cpp", "cuda"):
            # the overloads' own callables (OpOverload.__call__ only forwards to them: a Python frame less per call)
            found = (getattr(torch.ops.pykernels, fwd).default._op, getattr(torch.ops.pykernels, bwd).default._op)
        else:
            package = "pykernels.triton_kernels" if backend == "triton" else "pykernels.reference"
            module = importlib.import_module(f"{package}.{self.stem}")
            found = (getattr(module, fwd), getattr(module, bwd))
        self._kernels[backend] = found
        return found

    def compiled_schema_exists(self) -> bool:
        """Whether the loaded ``pykernels._C`` defines ``pykernels::<name>_fwd`` / ``_bwd`` (an extension built
        before csrc/ops.cpp declared this op does not)."""
        return (
            extension_status()[0]
            and hasattr(torch.ops.pykernels, f"{self.name}_fwd")
            and hasattr(torch.ops.pykernels, f"{self.name}_bwd")
        )

    def register_compiled_fakes(self, fwd_fake: Callable, bwd_fake: Callable) -> None:
        """Fake (meta) kernels of the compiled ``pykernels::<name>_fwd`` / ``_bwd`` (when ``pykernels._C`` defines
        them): the same functions as the Python custom ops' fakes, whose extra trailing ``backend`` argument has a
        default."""
        if self.compiled_schema_exists():
            torch.library.register_fake(f"pykernels::{self.name}_fwd")(fwd_fake)
            torch.library.register_fake(f"pykernels::{self.name}_bwd")(bwd_fake)

    def backend_reasons(self, backend: str, device: torch.device | None = None) -> list[str]:
        """Why ``backend`` cannot run this op at all (nothing built / installed), or on ``device``."""
        spec = self.specs.get(backend)
        if spec is None:
            return [f"{backend} has no implementation of {self.name}"]
        reasons: list[str] = []
        if backend == "triton":
            ok, why = triton_status()
            if ok:
                ok, why = _import_status(f"pykernels.triton_kernels.{self.stem}")
            if not ok:
                reasons.append(why)
            if device is not None and device.type == "cpu" and not triton_interpret():
                reasons.append("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (the interpreter)")
        elif backend in ("cpp", "cuda"):
            ok, why = extension_status()
            if not ok:
                reasons.append(why)
            elif not self.compiled_schema_exists():
                reasons.append(
                    f"pykernels._C has no {self.name} kernels (built before csrc/ops.cpp defined "
                    f"pykernels::{self.name}_fwd); rebuild it with `pip install --no-build-isolation -e .`"
                )
            elif not has_compiled_kernel(f"{self.name}_fwd", "CPU" if backend == "cpp" else "CUDA"):
                if backend == "cuda":
                    reasons.append(
                        "pykernels._C was built without its CUDA kernels (no CUDA torch or nvcc at build time, "
                        "or PYKERNELS_SKIP_CUDA_BUILD=1)"
                    )
                else:
                    reasons.append(f"pykernels._C has no CPU kernel for {self.name}_fwd")
        if device is not None:
            if device.type == "cuda" and not torch.cuda.is_available():
                reasons.append("no CUDA device (torch.cuda.is_available() is False)")
            if device.type not in spec.devices:
                reasons.append(
                    f"{backend} runs {self.name} on {'/'.join(sorted(spec.devices))} tensors, not {device.type}"
                )
            elif spec.min_capability is not None and device.type == "cuda":
                cap = cuda_capability(device)
                if cap is not None and cap < spec.min_capability:
                    want = "sm_{}{}".format(*spec.min_capability)
                    reasons.append(f"{backend} needs compute capability >= {want}, device has sm_{cap[0]}{cap[1]}")
        return reasons

    def not_supported_reasons(
        self, backend: str, device: torch.device, dtypes: Sequence[torch.dtype], **call
    ) -> list[str]:
        """Every reason ``backend`` cannot serve a call on ``device`` with input ``dtypes`` (empty: it can)."""
        reasons = self.backend_reasons(backend, device)
        spec = self.specs.get(backend)
        if spec is None:
            return reasons
        bad = sorted({dtype_name(d) for d in dtypes if d not in spec.dtypes})
        if bad:
            reasons.append(
                f"dtype {', '.join(bad)} not supported by {backend} (supported: {_dtype_names(spec.dtypes)})"
            )
        if spec.check is not None and not bad:
            reasons += spec.check(device=device, dtypes=dtypes, **call)
        return reasons

    def select(self, device: torch.device, dtypes: Sequence[torch.dtype], backend: str | None = None, **call) -> str:
        """The backend that runs this call (see the module docstring for the rules).

        Decisions are memoised per (device, dtypes, the sources of the explicit choice - argument, use_backend(),
        PYKERNELS_BACKEND -, TRITON_INTERPRET, call details): what is installed does not change within a process, and
        this keeps dispatch to a dict lookup on the hot path. A choice that raises is not memoised (it raises again).
        """
        # the raw inputs of requested_backend() and triton_interpret() (reading them costs less than resolving
        # them), and the call details in the caller's order (another order is another entry, the same decision)
        key = (device, tuple(dtypes), backend, _CONTEXT_BACKEND.get(), _env_get(_ENV_BACKEND), _env_get(_ENV_INTERPRET))
        if call:
            key += tuple(call.items())
        try:
            name = self._decisions.get(key)
        except TypeError:  # unhashable call details: decide without memoising
            key = name = None
        if name is not None:
            return name
        explicit = requested_backend(backend)
        name = self._select(device, dtypes, explicit, **call)
        if key is not None:
            self._decisions[key] = name
        return name

    def _select(self, device: torch.device, dtypes: Sequence[torch.dtype], explicit: str | None, **call) -> str:
        if explicit is not None:
            if not self.not_supported_reasons(explicit, device, dtypes, **call):
                return explicit
            lines = [f"pykernels backend {explicit!r} cannot run {self.name} for this call:"]
            for name in BACKENDS:
                why = self.not_supported_reasons(name, device, dtypes, **call)
                lines.append(f"  {name}: " + ("supported" if not why else "; ".join(why)))
            raise BackendNotSupportedError("\n".join(lines))
        priority = self.gpu_priority if device.type == "cuda" else self.cpu_priority
        for name in priority:
            if not self.not_supported_reasons(name, device, dtypes, **call):
                return name
        lines = [f"no pykernels backend can run {self.name} for this call:"]
        for name in BACKENDS:
            lines.append(f"  {name}: " + "; ".join(self.not_supported_reasons(name, device, dtypes, **call) or ["-"]))
        raise BackendNotSupportedError("\n".join(lines))


def register_op(op: Op) -> Op:
    _OPS[op.name] = op
    return op


def registered_ops() -> dict[str, Op]:
    """Every registered op by name (importing :mod:`pykernels` registers them all)."""
    return dict(_OPS)


def info() -> str:
    """A human-readable report: versions, devices, and for each op and backend whether it is usable (or why not)."""
    import platform

    lines = [
        f"pykernels {_version()}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"triton {triton_status()[1] if triton_status()[0] else 'not installed'}, "
        f"CUDA (torch build) {torch.version.cuda or 'none'}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"device cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("device: cpu only (torch.cuda.is_available() is False)")
    lines.append(f"cpu threads: {torch.get_num_threads()}")
    ext_ok, ext_why = extension_status()
    lines.append("extension pykernels._C: " + ("loaded" if ext_ok else ext_why))
    lines.append(
        f"TRITON_INTERPRET={'1' if triton_interpret() else '0'}; "
        f"PYKERNELS_BACKEND={os.environ.get('PYKERNELS_BACKEND', '') or 'auto'}"
    )
    devices = [torch.device("cpu"), torch.device("cuda")]
    for op in _OPS.values():
        lines.append("")
        lines.append(
            f"op {op.name}  (auto order: cuda -> {', '.join(op.gpu_priority)}; cpu -> {', '.join(op.cpu_priority)})"
        )
        for name in BACKENDS:
            if name not in op.specs:
                lines.append(f"  {name:<7} -     no {name} implementation of {op.name}")
                continue
            for device in devices:
                spec = op.specs.get(name)
                why = op.backend_reasons(name, device)
                if spec is not None and device.type not in spec.devices:
                    continue  # e.g. cpp on cuda: not a combination worth a line
                status = "available" if not why else "unavailable: " + "; ".join(why)
                dtypes = f" [{_dtype_names(spec.dtypes)}]" if spec is not None and not why else ""
                if name == "cuda" and spec is not None and why:
                    built = has_compiled_kernel(f"{op.name}_fwd", "CUDA")
                    status += f" (CUDA kernels {'built into' if built else 'not in'} pykernels._C)"
                lines.append(f"  {name:<7} {device.type:<5} {status}{dtypes}")
    from pykernels import gemm

    lines.append("")
    lines.append("GEMM providers (fused blocks' 1x1 convs and MLPs, eval and training; chosen per shape by timing):")
    chosen = gemm.choices()
    if not chosen:
        lines.append("  none measured yet in this process (each shape is timed on both providers at its first call)")
    for key, provider in chosen.items():
        lines.append(f"  {key}: {provider}")
    return "\n".join(lines)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pykernels")
    except Exception:
        return "(not installed)"
