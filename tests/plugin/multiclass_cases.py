"""Builders shared by the multi-class tests: tiny C-class smp models and a batch of masks in each smp mode."""

from __future__ import annotations

import numpy as np
import segmentation_models_pytorch as smp
import torch
from conftest import tiny_unet

MODES = ("multiclass", "multilabel")


def tiny_model(classes: int = 3, encoder_name: str = "resnet18", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A small smp Unet (depth 3) with ``classes`` output channels, seeded."""
    torch.manual_seed(seed)
    return tiny_unet(encoder_name=encoder_name, classes=classes, **kwargs)


def _disc(size: int, radius: float, centre: tuple[float, float]) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def class_indices(batch: int = 2, size: int = 32) -> torch.Tensor:
    """Long (B, H, W): image 0 holds a class-1 disc touching a class-2 block, image 1 a class-1 disc only (class 2
    absent) and, when B > 2, further images are empty (background)."""
    index = np.zeros((batch, size, size), np.int64)
    index[0][_disc(size, size / 4, (size / 3, size / 3))] = 1
    index[0, size // 2 : size - 3, size // 3 : size - 4] = 2
    if batch > 1:
        index[1][_disc(size, size / 6, (2 * size / 3, size / 2))] = 1
    return torch.from_numpy(index)


def multilabel_mask(batch: int = 2, size: int = 32, classes: int = 3) -> torch.Tensor:
    """Float (B, C, H, W) in {0, 1} with overlapping labels: channel 0 a disc, channel 1 a block overlapping it,
    channel 2 (when C > 2) a small disc in image 0 only."""
    mask = np.zeros((batch, classes, size, size), np.float32)
    mask[:, 0][:, _disc(size, size / 4, (size / 2, size / 2))] = 1
    mask[:, 1, size // 3 : size - 2, 2 : size // 2] = 1
    if classes > 2:
        mask[0, 2][_disc(size, 3, (5, size - 6))] = 1
    return torch.from_numpy(mask)


def mode_mask(mode: str, batch: int = 2, size: int = 32, classes: int = 3) -> torch.Tensor:
    """A mask of ``mode``: class indices (multiclass), (B, C, H, W) labels (multilabel) or (B, 1, H, W) (binary)."""
    if mode == "multiclass":
        return class_indices(batch, size)
    if mode == "multilabel":
        return multilabel_mask(batch, size, classes)
    return (class_indices(batch, size) > 0).float()[:, None]


def images(batch: int = 2, size: int = 32, seed: int = 0, channels: int = 3) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def smp_loss(mode: str, **kwargs) -> torch.nn.Module:
    """The user's line: smp's Dice loss of ``mode`` on logits."""
    return smp.losses.DiceLoss(mode, from_logits=True, **kwargs)
