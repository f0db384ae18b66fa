"""Whole models, eager vs swapped, measured **interleaved**: alternating rounds in one process, so that a change of
machine load hits both providers alike (``bench_models.py`` runs its cases one after the other, a few rounds each).

Usage (models and settings as in ``bench_models.py``; ``model:batch:mode[:rounds]``, mode ``eval`` or ``train``)::

    python bench/interleave_models.py convnext_tiny:8:eval:9 efficientnet_b0:8:train:7

Prints one line per case: the median step of each provider, the ratio of the medians and of the minima.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models as B  # noqa: E402

import pykernels  # noqa: E402


def measure(name: str, batch: int, mode: str, rounds: int = 7) -> str:
    spec = B.MODELS_BY_ID[name]
    train = mode == "train"
    torch.manual_seed(0)
    model = spec.build(224, spec.drop_path if train else 0.0)
    swapped = pykernels.swap(copy.deepcopy(model), include=B._swap_kinds(spec)).model
    x = torch.randn(batch, 3, 224, 224)
    models = {"eager": model, "pykernels": swapped}
    optimizers = {}
    for key, m in models.items():
        m.train(train)
        if train:
            optimizers[key] = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def output(m):
        out = m(x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def step(key):
        m = models[key]
        if not train:
            with torch.no_grad():
                output(m)
            return
        optimizers[key].zero_grad(set_to_none=True)
        output(m).float().square().mean().backward()
        optimizers[key].step()

    for key in models:  # warm-up: first calls, GEMM provider choices, packed weights
        step(key)
        step(key)
    times = {key: [] for key in models}
    for _ in range(rounds):
        for key in models:
            start = time.perf_counter()
            step(key)
            times[key].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    low = {k: min(v) * 1e3 for k, v in times.items()}
    return (
        f"{name:24s} b{batch:<3d} {mode:5s} eager {med['eager']:8.1f} ms  swapped {med['pykernels']:8.1f} ms  "
        f"median ratio {med['eager'] / med['pykernels']:.2f}x  min ratio {low['eager'] / low['pykernels']:.2f}x"
    )


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for case in argv:
        name, batch, mode, *rest = case.split(":")
        print(measure(name, int(batch), mode, int(rest[0]) if rest else 7), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
