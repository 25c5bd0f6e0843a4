"""The one training augmentation: a joint image/mask ``torchvision.transforms.v2`` pipeline (public API only).

train.py applies it per sample in the DataLoader workers (:class:`~adst_examples.data.LesionSplit`); the study
applies the same pipeline per sample to its cached batches on the device (:func:`augment_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["augment_batch", "random_rot90", "train_transforms"]


def random_rot90() -> v2.RandomChoice:
    """Rotate by a uniformly random multiple of 90 degrees, exactly (nearest-neighbour rotation by 0/90/180/270).

    Applies the same rotation to every tv_tensor of the sample (image, mask, ...); ``expand=True`` so non-square
    inputs swap H and W instead of being cropped. Uses the torch RNG, so DataLoader worker seeding applies.
    """
    return v2.RandomChoice([v2.RandomRotation((angle, angle), expand=True) for angle in (0.0, 90.0, 180.0, 270.0)])


def train_transforms(
    in_channels: int,
    img_size: int,
    *,
    flips: bool = True,
    rot90: bool = True,
    affine: bool = True,
    color: bool = True,
) -> v2.Compose:
    """Joint image/mask training augmentation (apply to ``(tv_tensors.Image, tv_tensors.Mask)``).

    Pipeline: resize to ``img_size`` if needed (no-op for datasets already at that size); random horizontal and
    vertical flips (p=0.5 each); random rotation by a multiple of 90°; small random affine (±10°, translate 5%,
    scale 0.9-1.1; images bilinear, masks nearest — torchvision always uses nearest for ``Mask`` — so masks stay
    exactly ``{0, 1}``); color jitter on the image only (brightness/contrast 0.2; saturation 0.1 and hue 0.02
    only for RGB).

    Args:
        in_channels: 1 or 3.
        img_size: Expected side length.
        flips: Enable the random flips.
        rot90: Enable the random quarter turns.
        affine: Enable the small random affine.
        color: Enable the color jitter.

    Returns:
        A ``v2.Compose`` called as ``transform(image, mask)``.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"train_transforms: in_channels must be 1 or 3, got {in_channels}")
    ops: list[Callable[..., Any]] = [v2.Resize((img_size, img_size), antialias=True)]
    if flips:
        ops += [v2.RandomHorizontalFlip(p=0.5), v2.RandomVerticalFlip(p=0.5)]
    if rot90:
        ops.append(random_rot90())
    if affine:
        ops.append(
            v2.RandomAffine(
                degrees=10.0,
                translate=(0.05, 0.05),
                scale=(0.9, 1.1),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=0,
            )
        )
    if color:
        rgb = in_channels == 3
        ops.append(
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1 if rgb else None, hue=0.02 if rgb else None)
        )
    return v2.Compose(ops)


def augment_batch(
    transform: Callable[[Any, Any], tuple[Any, Any]], images: Tensor, masks: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Apply ``transform`` to every sample of a batch, on the batch's device, each with its own random draws.

    torchvision draws a transform's parameters from the global CPU RNG; here each sample's draws come from a seed
    taken from ``generator`` (inside ``torch.random.fork_rng``, so the global RNG is left as it was), so a run is
    reproducible from its seed and the draws do not depend on the device.

    Args:
        transform: A joint transform, e.g. :func:`train_transforms`.
        images: ``(B, C, H, W)`` float in ``[0, 1]``.
        masks: ``(B, 1, H, W)``.
        generator: CPU generator of the per-sample seeds.

    Returns:
        The transformed ``images`` and ``masks`` (same shapes, dtypes and device when the transform keeps them).
    """
    seeds = torch.randint(0, 2**62, (len(images),), generator=generator).tolist()
    out_images, out_masks = [], []
    with torch.random.fork_rng(devices=[]):
        for image, mask, seed in zip(images, masks, seeds, strict=True):
            torch.manual_seed(seed)
            image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
            out_images.append(image.as_subclass(Tensor))
            out_masks.append(mask.as_subclass(Tensor))
    return torch.stack(out_images), torch.stack(out_masks)
