"""The one evaluation path: predictions of a model over ``(indices, images, masks)`` batches, metrics, mean loss.

Used for the per-epoch validation and for the final validation/test of the exported model, by train.py (DataLoader
batches) and by the study (its on-device cache). A pixel is lesion when its logit is ``>= 0`` (probability
``>= 0.5``), the rule of ``smp.metrics``. For a multi-class model (C > 1 logits, ``class_names`` given) a pixel's
class is the argmax; the binary metrics are those of "any lesion" (class > 0), and the per-class Dice is added
(:mod:`adst_examples.metrics.classes`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from adst_examples.metrics import CLASS_MEAN, METRIC_NAMES, MetricAccumulator
from adst_examples.training.batches import EvalBatch
from adst_examples.training.distributed import DistContext, autocast
from adst_examples.training.engine import lesion_masks
from adst_plugin import ADSTModel
from adst_plugin.functional import mask_logits

__all__ = ["VALIDATION_METRICS", "evaluate", "head_maps", "loader_eval_batches", "selection_metric"]

#: What the per-epoch validation computes (cheap; the best epoch is chosen by its Dice).
VALIDATION_METRICS: tuple[str, ...] = ("dice", "iou")


def selection_metric(summary: Mapping[str, Any]) -> str:
    """What picks the best epoch: the mean Dice of the lesion classes (multi-class), else the Dice."""
    return CLASS_MEAN if CLASS_MEAN in summary else "dice"


def loader_eval_batches(loader: DataLoader) -> Iterable[EvalBatch]:
    """A DataLoader over a :class:`~adst_examples.data.LesionSplit` as evaluation batches (indices into the split)."""
    for index, images, masks in loader:
        yield index.tolist(), images, masks


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[EvalBatch],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    names: Sequence[str],
    tags: Sequence[str | None],
    metrics: Sequence[str] = METRIC_NAMES,
    small_lesions: bool = True,
    class_names: Sequence[str] = (),
    criterion: nn.Module | None = None,
    ctx: DistContext | None = None,
    desc: str = "eval",
    progress: bool = False,
) -> tuple[MetricAccumulator, float]:
    """Per-image metrics (and pooled small-lesion scores) of ``model`` over ``batches``, each image once.

    Args:
        batches: ``(indices, images, masks)``; ``indices`` index ``names`` and ``tags``.
        names, tags: Of the images ``indices`` refer to (names identify images across DDP ranks).
        class_names: Of a multi-class model, every class by index (background first); its masks are ``(B, H, W)``
            class indices.
        criterion: If given, also the mean loss (the plain mask loss outside training mode).
        ctx: Under DDP, every rank's images are gathered and duplicates (padding) dropped.
    Returns:
        The accumulator (identical on every rank) and the mean loss (``nan`` without ``criterion``).
    """
    model.eval()
    acc = MetricAccumulator(metrics, small_lesions=small_lesions, class_names=class_names)
    loss_sum, count = 0.0, 0
    for ids, images, masks in tqdm(batches, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        ids = list(ids)
        with autocast(device, amp_dtype):
            outputs = model(images.to(device, non_blocking=True))
        logits = mask_logits(outputs).float()
        if criterion is not None:
            loss_sum += criterion(logits, masks.to(device)).item() * len(ids)
            count += len(ids)
        if (logits.shape[1] > 1) != bool(class_names):
            raise ValueError(
                f"evaluate: expected {'a multi-class' if class_names else 'a 1-channel'} model for class_names="
                f"{list(class_names)}, got {logits.shape[1]} output channels"
            )
        pred, truth = lesion_masks(logits.cpu(), masks.cpu())
        classes = {"class_pred": logits.argmax(1).cpu(), "class_target": masks.cpu()} if class_names else {}
        acc.update(pred, truth, tags=[tags[i] for i in ids], names=[names[i] for i in ids], **classes)
    if ctx is None:
        return acc, loss_sum / count if count else math.nan
    gathered = acc.gather()
    gathered.drop_duplicates()  # DistributedSampler pads the last ranks with repeated images
    totals = ctx.all_reduce_mean({"loss": loss_sum, "count": float(count)})
    return gathered, totals["loss"] / totals["count"] if totals["count"] else math.nan


@torch.no_grad()
def head_maps(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """The ADST head's ``main``, ``edge`` and ``fused`` probability maps of ``images`` (none for a plain model), one
    channel per class (a multi-class model's background channel carries no target)."""
    if not isinstance(model, ADSTModel):
        return {}
    maps = model.eval().forward_adst(images).maps
    return {key: getattr(maps, key).float().sigmoid() for key in ("main", "edge", "fused")}
