"""Triton kernels of pykernels and their launchers. Installed as ``pykernels.triton_kernels`` (never as a top-level
``triton_kernels``, which is the name of OpenAI Triton's own package). Import the submodules lazily: Triton may be
missing."""
