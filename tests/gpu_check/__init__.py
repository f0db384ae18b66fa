"""Checks of the GPU code that need no GPU (opt-in: ``PYKERNELS_GPU_CHECK=1``); see README.md."""
