"""AOT specs of the Triton kernels: ``specs/<stem>.py`` defines ``AOT_SPECS`` for ``triton_kernels/<stem>.py``.

Read by the ahead-of-time gate only (``tests/gpu_check/aot.py``: the format of a spec is in its docstring); the kernel
modules never import them. Each file imports its kernel module as ``K`` and builds its list from the tables and
helpers the launchers use (``K.allowed_configs``, ``K._fwd_config``, ...), so that the specs follow the launchers.
"""
