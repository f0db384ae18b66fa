"""torch.library custom ops of pykernels (namespace ``pykernels``): fake impls, autograd, backend dispatch."""

from pykernels.ops import attention, drop_path

__all__ = ["attention", "drop_path"]
