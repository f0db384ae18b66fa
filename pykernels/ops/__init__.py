"""torch.library custom ops of pykernels (namespace ``pykernels``), one module per op stem: argument rules, backend
capabilities, fake (meta) kernels, autograd and dispatch. Importing this package registers every op."""

from pykernels.ops import attention, drop_path, dwconv_ln, mbconv_se, mlp

__all__ = ["attention", "drop_path", "dwconv_ln", "mbconv_se", "mlp"]
