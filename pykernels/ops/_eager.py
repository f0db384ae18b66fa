"""The eager fast path of every pykernels op: call the op's body without the custom-op wrapper when nothing needs it.

A call through a Python ``torch.library.custom_op`` pays for the boxed dispatcher call, the autograd wrapper's
redispatch below autograd, dynamo's disable wrapper and the output alias check before its body runs: ~10 us, the
whole cost of an op on the tiny tensors of small-batch inference. Each op module therefore has a ``<name>_call``
beside its custom op ``<name>`` (what :mod:`pykernels.functional` calls), taking one of three routes (:func:`route`):

* :data:`OPAQUE` - the custom op itself, whenever something must see ``pykernels::<name>``: ``torch.compile`` /
  ``torch.export`` (``torch.compiler.is_compiling()``), ``torch.jit.trace``, a torch-function or dispatch mode
  (FakeTensorMode, ``make_fx``, FlopCounterMode, ``with torch.device(...)``), a functorch transform (vmap, grad),
  or an input that is a tensor subclass;
* :data:`DIRECT` - grad mode off, or no input tensor requires grad: the op's body (the very function the custom op
  runs: same backend selection, same kernels, same results);
* :data:`AUTOGRAD` - otherwise: a ``torch.autograd.Function`` built from the op's own ``_setup_context`` and
  ``_backward`` (:func:`autograd_function`), which costs less than the custom op's generated one reached through
  the dispatcher, and saves and computes the same.

Argument checks are not skipped on any route: the functional layer checks as before, and the body is the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OPAQUE, DIRECT, AUTOGRAD = 0, 1, 2

_C = torch._C
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling


def route(*tensors: torch.Tensor | None) -> int:
    """:data:`OPAQUE`, :data:`DIRECT` or :data:`AUTOGRAD` for a call with these tensor inputs (None: absent)."""
    if (
        _is_compiling()  # first: dynamo folds it to True and never traces the checks below
        or _C._is_torch_function_mode_enabled()
        or _C._len_torch_dispatch_stack()
        or _C._are_functorch_transforms_active()
        or _C._get_tracing_state() is not None
    ):
        return OPAQUE
    grad = _C.is_grad_enabled()
    needs_grad = False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN:
            return OPAQUE
        if grad and t.requires_grad:
            needs_grad = True
    return AUTOGRAD if needs_grad else DIRECT


def direct(*tensors: torch.Tensor | None) -> bool:
    """Whether an op without autograd (a backward op) may run its body directly: :func:`route` is :data:`DIRECT`."""
    return route(*tensors) == DIRECT


def autograd_function(
    name: str, forward: Callable, setup_context: Callable, backward: Callable
) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` that runs ``forward(*inputs)``, then ``setup_context(ctx, inputs, output)`` and
    differentiates with ``backward(ctx, *grads)``: the functions registered with the custom op's
    ``register_autograd``, so both routes save and compute the same. ``apply`` takes every argument of the custom op,
    defaults included (``backward`` returns one gradient per argument)."""

    def _forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(
        name, (torch.autograd.Function,), {"forward": staticmethod(_forward), "backward": staticmethod(backward)}
    )
