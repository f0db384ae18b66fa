"""Benchmark: whole models, as a user runs them after ``pykernels.swap(model)``.

Models (random weights, fp32 on CPU, fp16 on CUDA, NCHW input):

* timm ``convnext_nano``, ``convnext_tiny``, ``vit_small_patch16_224``, ``deit_small_patch16_224``,
  ``efficientnet_b0``;
* torchvision ``convnext_tiny`` (``tv_convnext_tiny``);
* Hugging Face ``ViTModel`` at ViT-S/16 size (hidden 384, 12 layers, 6 heads, MLP 1536, 224 px: ``hf_vit_s``) and
  ``ConvNextModel`` with the default (ConvNeXt-T) config (``hf_convnext_tiny``); both return ``pooler_output``.

Cases: eval forward (``torch.no_grad``) at batch 1, 8 and 32, and a training step at batch 8 (forward, loss =
mean of the squared output, backward, SGD step with momentum; drop-path 0.1, 0.2 for EfficientNet, as they are
trained). Groups are named ``model[<model>-b<batch>-<eval|train_step>]``.

Providers (see ``bench/conftest.py``):

* ``eager``                  - the original model in eager PyTorch;
* ``pykernels``              - ``pykernels.swap(copy.deepcopy(model)).model`` (the default kinds; ``"attention"``
  too for the ViTs); the kinds and number of modules replaced are in the ``backend`` column;
* ``compile-eager``          - ``torch.compile`` of the original;
* ``compile-eager-freezing`` - the same with inductor's freezing (weights folded as constants; eval only);
* ``compile-pykernels``      - ``torch.compile`` of the swapped model.

``eager`` and ``pykernels`` run every case; the ``torch.compile`` providers run the training step and the eval at
batch 8 only (``PYKERNELS_BENCH_MODEL_COMPILE_BATCHES=1,8,32``: every eval batch), since each compiles anew (about a
minute per model and case on 2 cores, more for a training step, less when inductor's cache has the graph). Training
steps record the bytes autograd saves for backward (unique storages) and, on CUDA, the peak memory. Each case times
few rounds (rounds = 3 s / step time, at least 3; ``PYKERNELS_BENCH_BUDGET_S`` sets the 3 s) after one untimed call
(two for ``torch.compile``).

Subsets (``-k`` matches the case ids ``<model>-b<batch>-<eval|train_step>-<provider>``)::

    pytest bench/bench_models.py --benchmark-only -k convnext_nano                 # one model, every case
    pytest bench/bench_models.py --benchmark-only -k "b8-eval or train_step"      # batch-8 eval and training
    pytest bench/bench_models.py --benchmark-only -k "vit_small and b8-eval and not compile"
    PYKERNELS_BENCH_PROVIDERS=eager,pykernels pytest bench/bench_models.py --benchmark-only   # no torch.compile
"""

from __future__ import annotations

import collections
import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

SMOKE = os.environ.get("PYKERNELS_BENCH_SMOKE", "0") not in ("", "0")
PROVIDERS = ("eager", "pykernels", "compile-eager", "compile-eager-freezing", "compile-pykernels")
BUDGET_S = float(os.environ.get("PYKERNELS_BENCH_BUDGET_S", "3.0"))  # per case on CPU: few rounds for slow steps
# eval batches that also run the torch.compile providers (each compiles anew: the slow part of this file)
COMPILE_BATCHES = tuple(int(b) for b in os.environ.get("PYKERNELS_BENCH_MODEL_COMPILE_BATCHES", "8").split(",") if b)


class _Pooled(nn.Module):
    """A Hugging Face model called as ``model(pixel_values=x).pooler_output`` (a tensor, like timm's models)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).pooler_output


def _timm(name: str) -> Callable[[int, float], nn.Module]:
    def build(size: int, drop_path: float) -> nn.Module:
        import timm

        kwargs = {"img_size": size} if "patch16" in name and size != 224 else {}
        return timm.create_model(name, pretrained=False, drop_path_rate=drop_path, **kwargs)

    return build


def _tv_convnext_tiny(size: int, drop_path: float) -> nn.Module:
    import torchvision

    return torchvision.models.convnext_tiny(weights=None, stochastic_depth_prob=drop_path)


def _hf_vit_s(size: int, drop_path: float) -> nn.Module:
    import transformers

    config = transformers.ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=size
    )
    return _Pooled(transformers.ViTModel(config))


def _hf_convnext_tiny(size: int, drop_path: float) -> nn.Module:
    import transformers

    return _Pooled(transformers.ConvNextModel(transformers.ConvNextConfig(drop_path_rate=drop_path)))


@dataclass(frozen=True)
class Model:
    id: str  # in the case name (and so in -k)
    name: str  # what it is, for the report
    build: Callable[[int, float], nn.Module]  # (image size, drop-path rate) -> model
    attention: bool = False  # swap "attention" too
    drop_path: float = 0.1  # in the training step


MODELS = (
    Model("convnext_nano", "timm convnext_nano", _timm("convnext_nano")),
    Model("convnext_tiny", "timm convnext_tiny", _timm("convnext_tiny")),
    Model("vit_small_patch16_224", "timm vit_small_patch16_224", _timm("vit_small_patch16_224"), attention=True),
    Model("deit_small_patch16_224", "timm deit_small_patch16_224", _timm("deit_small_patch16_224"), attention=True),
    Model("efficientnet_b0", "timm efficientnet_b0", _timm("efficientnet_b0"), drop_path=0.2),
    Model("tv_convnext_tiny", "torchvision convnext_tiny", _tv_convnext_tiny),
    Model("hf_vit_s", "HF ViTModel (ViT-S/16 size)", _hf_vit_s, attention=True),
    Model("hf_convnext_tiny", "HF ConvNextModel (ConvNeXt-T)", _hf_convnext_tiny),
)
MODELS_BY_ID = {m.id: m for m in MODELS}

if SMOKE:  # two models, tiny images: the smoke test runs in seconds
    SIZE, EVAL_BATCHES, TRAIN_BATCH = 32, (1,), 2
    MODEL_IDS = ("convnext_nano", "vit_small_patch16_224")
else:
    SIZE, EVAL_BATCHES, TRAIN_BATCH = 224, (1, 8, 32), 8
    MODEL_IDS = tuple(m.id for m in MODELS)


def _cases() -> list:
    """(model, mode, batch, provider) in the order they run: per model, its eval batches then the training step."""
    params = []
    for model_id in MODEL_IDS:
        steps = [("eval", b) for b in EVAL_BATCHES] + [("train_step", TRAIN_BATCH)]
        for mode, batch in steps:
            for provider in PROVIDERS:
                if provider == "compile-eager-freezing" and mode != "eval":
                    continue  # inductor's freezing applies to inference only
                if provider.startswith("compile-") and mode == "eval" and batch not in COMPILE_BATCHES:
                    continue
                case = f"{model_id}-b{batch}-{mode}"
                params.append(pytest.param(model_id, mode, batch, provider, id=f"{case}-{provider}"))
    return params


def _swap_kinds(model: Model) -> set[str]:
    from pykernels.swap import CONVERTERS

    kinds = {c.kind for c in CONVERTERS if c.default}
    return kinds | {"attention"} if model.attention else kinds


@pytest.mark.parametrize("model_id,mode,batch,provider", _cases())
def bench_model(bench, device, model_id: str, mode: str, batch: int, provider: str):
    import pykernels

    spec = MODELS_BY_ID[model_id]
    train = mode == "train_step"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    bench.seed(0)
    model = spec.build(SIZE, spec.drop_path if train else 0.0).to(device=device, dtype=dtype)
    backend = "torch eager"
    if provider.endswith("pykernels"):
        report = pykernels.swap(copy.deepcopy(model), include=_swap_kinds(spec))
        model = report.model
        counts = collections.Counter(r.kind for r in report.replaced)
        backend = "swapped " + (", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "nothing")
    if provider.startswith("compile-"):
        backend = "inductor" + (" + " + backend if provider.endswith("pykernels") else "")
        backend += " (freezing)" if provider.endswith("freezing") else ""
    model.train(train)
    x = torch.randn(batch, 3, SIZE, SIZE, device=device, dtype=dtype)
    bench.describe(
        op="model",
        case=f"{model_id}-b{batch}-{mode}",
        provider=provider,
        model=model_id,
        model_name=spec.name,
        shape=list(x.shape),
        dtype=str(dtype).removeprefix("torch."),
        backend=backend,
        step="training step (forward, backward, SGD step)" if train else "eval forward",
    )

    first_call_s = None
    if provider == "compile-eager-freezing":
        import torch._inductor.config as inductor_config

        module = bench.compile(model)
        start = time.perf_counter()
        # freezing is read when the graph is compiled, at the first (no_grad) call: not as a torch.compile option
        with torch.no_grad(), inductor_config.patch(freezing=True):
            module(x)
        first_call_s = time.perf_counter() - start
        warmup = 1
    elif provider.startswith("compile-"):
        module = bench.compile(model)
        warmup = 2  # the first call compiles, the second estimates the rounds
    else:
        module = model
        warmup = 1  # a step (plus one-time set-up): it estimates the rounds
    rounds = dict(warmup=warmup, warmup_rounds=0, min_rounds=3, budget_s=BUDGET_S if device.type == "cpu" else None)

    if not train:

        def step():
            with torch.no_grad():
                module(x)

        bench.run(step, **rounds)
        if first_call_s is not None:
            bench.info["first_call_s"] = round(first_call_s, 4)  # the call that compiled
        return
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        module(x).float().square().mean().backward()
        opt.step()

    bench.run(step, forward=lambda: module(x), inputs=[x, *model.parameters()], **rounds)
