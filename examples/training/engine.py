"""The one training engine: the optimisation, a training step, and an epoch over any iterable of batches.

train.py (DataLoader batches), compare.py (through train.py), the study (batches from its on-device cache) and
``benchmarks/train_overhead.py`` all call :func:`train_step`, so a Dice, a step time or a ratio measured by one of
them is what the others run. The forward runs under autocast (:func:`~adst_examples.training.distributed.autocast`,
dtype from :func:`~adst_examples.training.distributed.resolve_amp`); the loss runs outside it, in float32, on the
mask logits. Evaluation is in :mod:`adst_examples.training.evaluation`, the batch sources in
:mod:`adst_examples.training.batches`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adst_examples.training.distributed import autocast
from adst_plugin.functional import mask_logits

__all__ = [
    "AUX_FADES",
    "DEFAULT_LR",
    "SYNTHETIC_LR",
    "Batch",
    "Optimisation",
    "default_lr",
    "fade_factor",
    "hard_predictions",
    "lesion_masks",
    "steps_per_epoch",
    "train_epoch",
    "train_step",
]

#: Peak learning rate of real datasets, and of the small synthetic one (which trains in a few epochs).
DEFAULT_LR, SYNTHETIC_LR = 3e-4, 1e-3


def default_lr(dataset: str) -> float:
    """The peak learning rate used when none is given: :data:`SYNTHETIC_LR` for ``synthetic``, else DEFAULT_LR."""
    return SYNTHETIC_LR if dataset == "synthetic" else DEFAULT_LR


def steps_per_epoch(train_images: int, batch_size: int, max_steps: int | None = None) -> int:
    """Full batches per epoch (the last partial batch is dropped: no 1-image BatchNorm batches), at least 1."""
    steps = max(1, train_images // max(1, min(batch_size, train_images)))
    return min(steps, max_steps) if max_steps else steps


#: How the auxiliary terms' weight (``aux_scale``) may change over the epochs (``--aux-fade``).
AUX_FADES = ("none", "linear", "cosine")


def fade_factor(mode: str, epoch: int, epochs: int) -> float:
    """``aux_scale`` of 0-based ``epoch``: 1 throughout (``none``), or faded from 1 (first) to 0 (last epoch)."""
    if mode not in AUX_FADES:
        raise ValueError(f"--aux-fade: expected one of {AUX_FADES}, got {mode!r}")
    if mode == "none" or epochs <= 1:
        return 1.0
    t = min(epoch / (epochs - 1), 1.0)
    return 1.0 - t if mode == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Batch:
    """One training batch on the device.

    ``masks`` are whatever the criterion takes: ``(B, 1, H, W)`` in ``{0, 1}`` for the binary mode, ``(B, H, W)``
    ``int64`` class indices for the multiclass mode; ``targets`` are the ADST ``(core, border)`` built in the
    DataLoader workers, or ``None`` (the loss builds them itself).
    """

    images: Tensor
    masks: Tensor
    targets: tuple[Tensor, ...] | None = None


@dataclass(frozen=True)
class Optimisation:
    """What one optimizer step needs besides the model and the loss."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        *,
        lr: float,
        total_steps: int,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        weight_decay: float = 1e-4,
        min_lr_ratio: float = 0.01,
        optimizer: str = "adamw",
    ) -> Optimisation:
        """AdamW (or Adam, L2 decay), a per-step cosine from ``lr`` to ``lr * min_lr_ratio`` over ``total_steps``,
        and a GradScaler that is on for fp16 only."""
        opt_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[optimizer]
        opt = opt_cls(model.parameters(), lr=lr, weight_decay=weight_decay)
        # CosineAnnealingLR: old checkpoints' LambdaLR state loads into it unchanged.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=lr * min_lr_ratio)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
        return cls(optimizer=opt, scheduler=sched, scaler=scaler, amp_dtype=amp_dtype)


def hard_predictions(logits: Tensor, mode: str = "binary") -> Tensor:
    """The predicted mask of the logits: ``logits >= 0`` (binary, multilabel) or the argmax class ``(B, H, W)``
    (multiclass)."""
    return logits.argmax(1) if mode == "multiclass" else logits >= 0


def lesion_masks(logits: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted and true "any lesion" masks ``(B, 1, H, W)`` (bool): ``logits >= 0`` and ``masks > 0.5`` for one
    channel; for C > 1 channels (multiclass) the argmax class > 0 and the class index > 0."""
    if logits.shape[1] == 1:
        return logits >= 0, masks > 0.5
    return (logits.argmax(1, keepdim=True) > 0), masks.reshape(logits.shape[0], 1, *logits.shape[2:]) > 0


def train_step(
    model: nn.Module, criterion: Callable[..., Tensor], opt: Optimisation, batch: Batch
) -> tuple[Tensor, Tensor]:
    """One optimizer step (LR scheduler stepped too); returns the detached loss and float32 mask logits."""
    model.train()
    with autocast(batch.images.device, opt.amp_dtype):
        outputs = model(batch.images)
    logits = mask_logits(outputs).float()  # the loss runs outside autocast, in float32
    if batch.targets is None:
        loss = criterion(logits, batch.masks)
    else:
        loss = criterion(logits, batch.masks, targets=batch.targets)
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    return loss.detach(), logits.detach()


def train_epoch(
    model: nn.Module,
    criterion: Any,
    opt: Optimisation,
    batches: Iterable[Batch],
    *,
    steps: int,
    device: torch.device,
    aux_scale: float = 1.0,
    reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
    desc: str = "train",
    progress: bool = False,
) -> dict[str, float]:
    """At most ``steps`` :func:`train_step` calls over ``batches``; the mean of every loss term and of the Dice.

    Args:
        batches: Any iterable of :class:`Batch` (a DataLoader through
            :func:`~adst_examples.training.batches.loader_batches`, or the study's cache).
        aux_scale: Weight of the auxiliary terms this epoch (see :func:`fade_factor`); set on criteria that have it.
        reduce: Averages the means over DDP ranks (``DistContext.all_reduce_mean``); ``None``: one process.
    Returns:
        ``{"train_<term>": mean}`` for every term in ``criterion.last_terms`` (``total`` among them), ``train_dice``
        (hard Dice per image by smp.metrics, empty/empty = 1; of "any lesion" for multi-class logits) and
        ``train_s`` (seconds, device synchronised).
    Raises:
        FloatingPointError: the mean loss is not finite.
    """
    t0 = time.perf_counter()
    if hasattr(criterion, "aux_scale"):
        criterion.aux_scale = aux_scale
    sums: dict[str, Tensor] = {}
    done = 0
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for batch in batches:
        if done >= steps:
            break
        loss, logits = train_step(model, criterion, opt, batch)
        pred, truth = lesion_masks(logits, batch.masks)
        tp, fp, fn, tn = smp.metrics.get_stats(pred.long(), truth.long(), mode="binary")
        dice = smp.metrics.f1_score(tp, fp, fn, tn, reduction="micro-imagewise", zero_division=1.0)
        terms = getattr(criterion, "last_terms", None) or {"total": loss}
        # Summed on the device: no host sync per step unless a progress bar shows them.
        for key, value in {**terms, "dice": dice}.items():
            sums[key] = sums.get(key, torch.zeros((), device=device)) + value.float()
        done += 1
        bar.update()
        if progress:
            bar.set_postfix(loss=f"{sums['total'].item() / done:.4f}", dice=f"{sums['dice'].item() / done:.3f}")
    bar.close()
    means = {f"train_{k}": v.item() / max(done, 1) for k, v in sums.items()}  # .item(): the device is synchronised
    if not math.isfinite(means.get("train_total", 0.0)):
        raise FloatingPointError(f"{desc}: the training loss is not finite; lower --lr, or try --amp off")
    means = reduce(means) if reduce is not None else means
    return {**means, "train_s": time.perf_counter() - t0}
