"""Root pytest configuration: ``pytest --benchmark-only`` from the repository root runs the benchmarks.

``testpaths = ["tests"]`` (pyproject.toml) keeps a bare ``pytest`` the fast test run of ``tests/``. A bare
``pytest --benchmark-only`` would then collect only ``tests/`` (which has no benchmarks: everything skipped), so when
``--benchmark-only`` is given and the paths came from ``testpaths`` (no path or node id on the command line, invoked
from the repository root), the paths become ``bench/`` instead: the same run as ``pytest bench --benchmark-only``,
with ``bench/conftest.py``'s progress lines and report (see there). Any explicit path is left alone.

``tests/conftest.py`` is still imported at start-up in that case (pytest picks its initial conftests from
``testpaths`` before any conftest can act); what it sets for the test run (``TRITON_INTERPRET=1`` on a machine
without CUDA) is undone here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent / "bench"
# TRITON_INTERPRET as it was before tests/conftest.py (imported after this file) could set it
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("benchmark_only", default=False):
        return
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    config.args = [str(BENCH_DIR)]
    config.args_source = pytest.Config.ArgsSource.ARGS
    if _TRITON_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _TRITON_INTERPRET
