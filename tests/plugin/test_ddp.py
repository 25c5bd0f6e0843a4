"""Two-rank DDP (gloo, CPU) without find_unused_parameters: gradients are synchronised across ranks and equal
the average of what each rank's batch gives on its own."""

import os

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adst_plugin import ADSTLoss, wrap_with_adst

WORLD = 2


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    y = torch.zeros(2, 1, 32, 32)
    y[:, :, 6 + 4 * rank : 20, 8:24] = 1
    return torch.rand(2, 3, 32, 32, generator=g), y


def _model(preset: str) -> torch.nn.Module:
    # Full-depth encoder: with encoder_depth < 5 smp keeps unused deep stages, which DDP would rightly reject.
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, decoder_channels=(32, 16, 16, 16, 16), classes=1)
    return wrap_with_adst(unet, preset)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, store: str, out: str, preset: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        wrapped = _model(preset)
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped, find_unused_parameters=False)
        criterion = ADSTLoss(ddp)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        x, y = _batch(rank)
        for step in range(2):  # DDP raises on the second step if a parameter got no gradient in the first
            optimizer.zero_grad()
            criterion(ddp(x), y).backward()
            if step == 0:
                torch.save(_grads(wrapped), os.path.join(out, f"rank{rank}.pt"))
            optimizer.step()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["adst", "paper"])
def test_ddp_gradients_are_synchronised_and_averaged(tmp_path, preset):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), preset), nprocs=WORLD, join=True)
    synced = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    local = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same reduction order
    try:
        for rank in range(WORLD):  # what each rank's batch gives alone (same initial weights)
            model = _model(preset)
            x, y = _batch(rank)
            ADSTLoss(model)(model(x), y).backward()
            local.append(_grads(model))
    finally:
        torch.set_num_threads(threads)
    assert synced[0].keys() == local[0].keys() and any(k.startswith("head.") for k in synced[0])
    differs = 0
    for name in local[0]:
        assert torch.equal(synced[0][name], synced[1][name]), name
        mean = (local[0][name] + local[1][name]) / 2
        assert torch.allclose(synced[0][name], mean, atol=1e-6, rtol=1e-4), name
        differs += not torch.allclose(local[0][name], local[1][name])
    assert differs > len(local[0]) // 2  # negative control: without the all-reduce the ranks disagree
