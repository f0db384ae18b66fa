"""State-dict keys of a converted module: the original's, so that a swapped model's ``state_dict()`` loads into the
original model with ``strict=True`` and the original's loads into the swapped one.

A pykernels module built by ``from_module`` from a layout whose parameter names (or shapes) differ from its own -
torchvision's ``CNBlock`` (``block.0`` / ``layer_scale`` (C, 1, 1)), Hugging Face's ``ConvNextLayer``,
``nn.MultiheadAttention`` (``in_proj_weight``), Hugging Face attention (separate ``q_proj`` / ``k_proj`` /
``v_proj``) - saves under the original's keys and shapes, and loads either its own keys or the original's.
"""

from __future__ import annotations

from torch import nn


def keep_original_keys(new: nn.Module, original: nn.Module, pairs) -> None:
    """Make ``new.state_dict()`` use ``original``'s keys and shapes: ``pairs`` are ``(new's parameter, the
    original's parameter it was copied from)`` (either may be None: skipped). Same name and shape: nothing to do."""
    own_names = {id(p): n for n, p in new.named_parameters()}
    orig_names = {id(p): n for n, p in original.named_parameters()}
    mapping = {}
    for dst, src in pairs:
        if dst is None or src is None or id(dst) not in own_names or id(src) not in orig_names:
            continue
        own, orig = own_names[id(dst)], orig_names[id(src)]
        if (own, tuple(dst.shape)) != (orig, tuple(src.shape)):
            mapping[own] = (orig, tuple(src.shape))
    rename_keys(new, mapping)


def rename_keys(module: nn.Module, mapping: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """``module.state_dict()`` saves its parameter ``own`` as ``orig`` with shape ``shape`` for each ``own: (orig,
    shape)`` of ``mapping``; ``load_state_dict`` accepts ``orig`` (reshaped back) as well as ``own``."""
    if not mapping:
        return
    first = getattr(module, "_pykernels_key_map", None) is None
    module._pykernels_key_map = dict(mapping)
    if first:
        module.register_state_dict_post_hook(_save_hook)
        module.register_load_state_dict_pre_hook(_load_hook)


def _save_hook(module, state_dict, prefix, local_metadata) -> None:
    for own, (orig, shape) in module._pykernels_key_map.items():
        if prefix + own in state_dict:
            state_dict[prefix + orig] = state_dict.pop(prefix + own).reshape(shape)


def _load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    for own, (orig, _) in module._pykernels_key_map.items():
        if prefix + orig in state_dict and prefix + own not in state_dict:
            tensor = state_dict.pop(prefix + orig)
            state_dict[prefix + own] = tensor.reshape(module.get_parameter(own).shape)
