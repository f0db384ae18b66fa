"""A swapped model trains under DistributedDataParallel (gloo, 2 CPU processes) - and under FSDP2's ``fully_shard`` -
with the gradients and parameters of the unswapped model trained the same way.

Each rank builds the same model from one seed (a small timm ConvNeXt and a small ViT: every default swap kind plus
attention), swaps a copy, wraps both, and runs the same training steps on its own slice of a seeded batch (drop-path
in training mode: each rank's DropPath masks come from its own seeded generator, the same for both models). After
every step the synced gradients and then the parameters must agree between the two models, and across ranks.
"""

from __future__ import annotations

import copy
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(name: str) -> torch.nn.Module:
    import timm

    if name == "convnext":
        return timm.create_model(
            "convnext_atto", pretrained=False, num_classes=10, drop_path_rate=0.1, ls_init_value=0.5
        )
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=10,
        drop_path_rate=0.1,
        init_values=0.5,
    )


def _wrap(model: torch.nn.Module, how: str) -> torch.nn.Module:
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in [m for m in model.modules() if type(m).__name__ in ("ConvNeXtStage", "Block")]:
        fully_shard(block)
    fully_shard(model)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded DTensor) parameter or gradient."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, port: int, name: str, how: str, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        import pykernels

        torch.manual_seed(0)
        original = _model(name)
        swapped = copy.deepcopy(original)
        report = pykernels.swap(swapped, include=["convnext_block", "mbconv", "mlp", "drop_path", "attention"])
        assert report.replaced, report
        models = [_wrap(m.train(), how) for m in (original, swapped)]
        optims = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
        data = torch.randn(STEPS, 2 * WORLD, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        for step in range(STEPS):
            x = data[step, 2 * rank : 2 * rank + 2]
            losses = []
            for model, optim in zip(models, optims):
                torch.manual_seed(100 * step + rank)  # the same drop-path masks for both models on this rank
                optim.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                losses.append(loss.detach())
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
            named = [dict(m.named_parameters()) for m in models]
            for key, p in named[0].items():
                key2 = key if key in named[1] else key.replace("module.", "")
                g_want, g_got = _full(p.grad), _full(named[1][key2].grad)
                torch.testing.assert_close(g_got, g_want, rtol=1e-3, atol=1e-5, msg=f"grad of {key}, step {step}")
                # synced: every rank holds the same gradient
                gathered = [torch.empty_like(g_want) for _ in range(WORLD)]
                dist.all_gather(gathered, g_got.contiguous())
                assert torch.equal(gathered[0], gathered[1]), key
            for optim in optims:
                optim.step()
        for key, p in models[0].named_parameters():
            torch.testing.assert_close(
                _full(dict(models[1].named_parameters())[key].data), _full(p.data), rtol=1e-3, atol=1e-5
            )
    except BaseException:  # noqa: BLE001 - handed to the parent, which fails the test with it
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(name: str, how: str) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, name, how, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not alive, "a rank hung (killed after 300 s)"
    assert not messages, "\n".join(messages)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed built without gloo")
@pytest.mark.parametrize("name", ["convnext", "vit"])
def test_ddp_swapped_matches_unswapped(name):
    _run(name, "ddp")


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed built without gloo")
@pytest.mark.parametrize("name", ["convnext", "vit"])
def test_fsdp2_swapped_matches_unswapped(name):
    _run(name, "fsdp2")
