"""The default mask losses: smp's Dice plus the pixel-wise loss of the mode (BCE for sigmoids, CE for softmax).

``ADSTLoss`` uses :func:`default_mask_loss` when it is given no ``base_loss``: :class:`DiceBCELoss` in binary and
multilabel mode, :class:`DiceCELoss` in multiclass mode. The Dice term counts every class alike whatever its area
(small lesions matter), the pixel-wise term gives a gradient everywhere, including images without lesions where
smp's Dice is 0. Both honour ``ignore_index`` and declare ``.mode`` and ``.ignore_index`` as smp losses do.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch.nn.functional as F
from torch import Tensor, nn

from .modes import BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE

__all__ = ["DiceBCELoss", "DiceCELoss", "default_mask_loss"]


class DiceBCELoss(nn.Module):
    """smp's Dice loss plus BCE-with-logits, both on logits, for the sigmoid modes.

    Args:
        dice_weight, bce_weight: weights of the two terms.
        mode: ``"binary"`` (the default) or ``"multilabel"``.
        ignore_index: target value of pixels that count in neither term; None: every pixel counts.

    Shape:
        logits (B, C, H, W), target (B, C, H, W) in [0, 1] (C = 1 in binary mode) -> scalar
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        *,
        mode: str = BINARY_MODE,
        ignore_index: int | None = None,
    ):
        super().__init__()
        if mode not in (BINARY_MODE, MULTILABEL_MODE):
            raise ValueError(
                f"DiceBCELoss: expected mode 'binary' or 'multilabel', got {mode!r}. Use DiceCELoss for 'multiclass'."
            )
        self.dice = smp.losses.DiceLoss(mode, from_logits=True, ignore_index=ignore_index)
        self.dice_weight, self.bce_weight = dice_weight, bce_weight
        self.mode, self.ignore_index = mode, ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = target.to(logits.dtype)
        dice = self.dice(logits, target)  # before the BCE: the graph's order sets the gradient's float rounding
        if self.ignore_index is None:
            bce = F.binary_cross_entropy_with_logits(logits, target)
        else:
            valid = (target != self.ignore_index).to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, target * valid, weight=valid, reduction="sum")
            bce = bce / valid.sum().clamp_min(1.0)
        return self.dice_weight * dice + self.bce_weight * bce


class DiceCELoss(nn.Module):
    """smp's multiclass Dice loss plus cross-entropy, both on logits.

    Args:
        dice_weight, ce_weight: weights of the two terms.
        ignore_index: class index of pixels that count in neither term; None: every pixel counts.

    Shape:
        logits (B, C, H, W), target (B, H, W) or (B, 1, H, W) long class indices -> scalar
    """

    mode = MULTICLASS_MODE

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, *, ignore_index: int | None = None):
        super().__init__()
        self.dice = smp.losses.DiceLoss(MULTICLASS_MODE, from_logits=True, ignore_index=ignore_index)
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = target.long().reshape(logits.shape[0], *logits.shape[2:])
        ignore = -100 if self.ignore_index is None else self.ignore_index  # -100: F.cross_entropy's "none"
        ce = F.cross_entropy(logits, target, ignore_index=ignore)
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * ce


def default_mask_loss(mode: str, ignore_index: int | None = None) -> nn.Module:
    """The mask loss ``ADSTLoss`` uses without a ``base_loss``: Dice + CE (multiclass), else Dice + BCE."""
    if mode == MULTICLASS_MODE:
        return DiceCELoss(ignore_index=ignore_index)
    return DiceBCELoss(mode=mode, ignore_index=ignore_index)
