"""torch.library custom ops of pykernels (namespace ``pykernels``): fake impls, autograd, backend dispatch."""

from pykernels.ops import drop_path

__all__ = ["drop_path"]
