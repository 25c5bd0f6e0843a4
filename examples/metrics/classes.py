"""Per-class Dice of multi-class (class-index) masks, per image, via ``smp.metrics`` in its ``multiclass`` mode.

For each image and each lesion class ``k`` (every class but the background, index 0), Dice is computed on the
pixels predicted as ``k`` and the pixels labelled ``k``; when both are empty the image scores 1 for ``k`` (smp's
``zero_division=1``, the convention of the binary Dice in :mod:`adst_examples.metrics.pixels`). So a benign image
whose prediction holds no malignant pixel scores 1 in the malignant column, and one malignant false alarm scores 0.
``dice_class_mean`` is the mean over the lesion classes of the same image, then averaged over images like every
other metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch
from torch import Tensor

__all__ = ["CLASS_MEAN", "class_metric_names", "per_class_dice"]

#: The per-image mean of the lesion classes' Dice.
CLASS_MEAN = "dice_class_mean"


def class_metric_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """``dice_<name>`` of every lesion class (``class_names[1:]``, index order), then :data:`CLASS_MEAN`."""
    if len(class_names) < 2:
        raise ValueError(f"class_metric_names: expected >= 2 class names (background first), got {list(class_names)}")
    return (*(f"dice_{name}" for name in class_names[1:]), CLASS_MEAN)


def _check(x: Tensor, name: str, num_classes: int) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 3 or x.is_floating_point() or x.dtype == torch.bool:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"per_class_dice: expected {name} as integer class indices (B, H, W), got {got}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
        raise ValueError(
            f"per_class_dice: expected {name} values in [0, {num_classes - 1}], got [{int(x.min())}, {int(x.max())}]"
        )
    return x.long()


def per_class_dice(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Dice of every lesion class, per image: ``(B, num_classes - 1)`` float (column ``k - 1`` is class ``k``).

    Args:
        pred, target: ``(B, H, W)`` integer class indices in ``[0, num_classes)``.
    """
    p, t = _check(pred, "pred", num_classes), _check(target, "target", num_classes)
    if p.shape != t.shape:
        raise ValueError(f"per_class_dice: pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    tp, fp, fn, tn = smp.metrics.get_stats(p, t.to(p.device), mode="multiclass", num_classes=num_classes)
    dice = smp.metrics.f1_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)
    return dice[:, 1:].float()
