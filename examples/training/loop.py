"""The loaders and the loops: every line that uses the model's outputs or calls the loss is in this file.

Items are ``(index, image, mask)`` (:class:`~adst_examples.data.LesionSplit`); training batches may also carry the
ADST targets, built in the DataLoader workers (:class:`~adst_plugin.collate.ADSTTargetCollate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from adst_examples.data import LesionSplit
from adst_examples.metrics import METRIC_NAMES, MetricAccumulator
from adst_examples.training.distributed import DistContext, autocast
from adst_plugin import ADSTLoss, ADSTModel
from adst_plugin.collate import ADSTTargetCollate
from adst_plugin.functional import mask_logits

__all__ = [
    "Optimisation",
    "evaluate",
    "fade_factor",
    "head_maps",
    "make_loader",
    "train_one_epoch",
]


@dataclass(frozen=True)
class Optimisation:
    """What one optimizer step needs besides the model and the loss."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None


def make_loader(
    split: LesionSplit,
    ctx: DistContext,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    train: bool,
    generator: torch.Generator,
    criterion: ADSTLoss | None = None,
) -> DataLoader:
    """Loader of a split; DistributedSampler under DDP (padded, so evaluation drops duplicates).

    ``generator`` drives the shuffle and seeds the workers (the DataLoader seeds ``random``, NumPy and torch in
    each worker from it), so augmentation does not depend on the global RNG. With ``criterion`` each batch also
    carries that loss's ADST ``(core, border)`` targets, built in the workers.
    """
    sampler: Any
    if ctx.distributed:
        sampler = DistributedSampler(split, ctx.world_size, ctx.rank, shuffle=train, seed=seed)
    elif train:
        sampler = RandomSampler(split, generator=generator)
    else:
        sampler = SequentialSampler(split)
    return DataLoader(
        split,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=train and len(sampler) >= batch_size,  # no 1-image BatchNorm batches
        generator=generator,
        collate_fn=None if criterion is None else ADSTTargetCollate(**criterion.target_kwargs),
    )


def fade_factor(mode: str, epoch: int, epochs: int) -> float:
    """``aux_scale`` of 0-based ``epoch``: 1 throughout (``none``), or faded from 1 (first) to 0 (last epoch)."""
    if mode == "none" or epochs <= 1:
        return 1.0
    t = epoch / (epochs - 1)
    if mode == "linear":
        return 1.0 - t
    if mode == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"--aux-fade: expected none, linear or cosine, got {mode!r}")


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: ADSTLoss,
    opt: Optimisation,
    ctx: DistContext,
    *,
    steps: int,
    aux_scale: float = 1.0,
    desc: str = "train",
    progress: bool = False,
) -> dict[str, float]:
    """``steps`` optimizer steps (LR scheduler stepped per step); mean loss terms and Dice over steps and ranks.

    Args:
        aux_scale: Weight of the ADST auxiliary terms this epoch (see :func:`fade_factor`).
    Returns:
        ``{"train_<term>": mean}`` for every loss term plus ``train_dice`` (hard Dice per image, by smp.metrics).
    Raises:
        FloatingPointError: the mean loss is not finite.
    """
    device = ctx.device
    model.train()
    criterion.aux_scale = aux_scale
    sums: dict[str, Tensor] = {}
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (_, images, masks, *precomputed) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, opt.amp_dtype):
            outputs = model(images)
        logits = mask_logits(outputs).float()  # the loss runs outside autocast, in float32
        # Targets built by ADSTTargetCollate in the workers (ADST runs); the loss builds them itself otherwise.
        targets = tuple(t.to(device, non_blocking=True) for t in precomputed[0]) if precomputed else None
        loss = criterion(logits, masks, targets=targets)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        tp, fp, fn, tn = smp.metrics.get_stats((logits.detach() > 0).long(), masks.long(), mode="binary")
        dice = smp.metrics.f1_score(tp, fp, fn, tn, reduction="micro-imagewise", zero_division=1.0)
        # Summed on the device: no host sync per step unless a progress bar shows them.
        for key, value in {**criterion.last_terms, "dice": dice}.items():
            sums[key] = sums.get(key, torch.zeros((), device=device)) + value.float()
        bar.update()
        if progress:
            done = step + 1
            bar.set_postfix(loss=f"{sums['total'].item() / done:.4f}", dice=f"{sums['dice'].item() / done:.3f}")
    bar.close()
    means = {f"train_{k}": v.item() / max(steps, 1) for k, v in sums.items()}
    if not math.isfinite(means.get("train_total", 0.0)):
        raise FloatingPointError(f"{desc}: the training loss is not finite; lower --lr, or try --amp off")
    return ctx.all_reduce_mean(means)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    amp_dtype: torch.dtype | None,
    *,
    metrics: Sequence[str] = METRIC_NAMES,
    criterion: ADSTLoss | None = None,
    desc: str = "eval",
    progress: bool = False,
) -> tuple[MetricAccumulator, float]:
    """Per-image metrics of a loader over a :class:`LesionSplit`, gathered over ranks, each image once.

    Args:
        criterion: if given, also the mean mask loss.
    Returns:
        The merged accumulator (identical on every rank) and the mean loss (``nan`` without ``criterion``).
    """
    split: LesionSplit = loader.dataset  # type: ignore[assignment]
    model.eval()
    acc = MetricAccumulator(metrics)
    loss_sum, count = 0.0, 0
    for index, images, masks in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        with autocast(ctx.device, amp_dtype):
            outputs = model(images.to(ctx.device, non_blocking=True))
        logits = mask_logits(outputs).float()
        if criterion is not None:
            loss_sum += criterion(logits, masks.to(ctx.device)).item() * len(index)
            count += len(index)
        ids = index.tolist()
        acc.update(
            logits.sigmoid().cpu(), masks, tags=[split.tags[i] for i in ids], names=[split.names[i] for i in ids]
        )
    gathered = acc.gather()
    gathered.drop_duplicates()  # DistributedSampler pads the last ranks with repeated images
    totals = ctx.all_reduce_mean({"loss": loss_sum, "count": float(count)})
    return gathered, totals["loss"] / totals["count"] if totals["count"] else math.nan


@torch.no_grad()
def head_maps(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """The ADST head's ``main``, ``edge`` and ``fused`` probability maps of ``images`` (none for a plain model)."""
    if not isinstance(model, ADSTModel):
        return {}
    maps = model.eval().forward_adst(images).maps
    return {key: getattr(maps, key).float().sigmoid() for key in ("main", "edge", "fused")}
