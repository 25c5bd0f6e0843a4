"""Where the engine's batches come from: a DataLoader (train.py) or the on-device dataset cache (the study).

Both draw an epoch's order from :func:`epoch_order`, the same permutation for the same ``(seed, epoch)``, so a
study run and a train.py run of the same settings see the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler, SequentialSampler

from adst_examples.data import LesionSplit
from adst_examples.data.cache import CachedData
from adst_examples.data.transforms import augment_batch
from adst_examples.training.distributed import DistContext
from adst_examples.training.engine import Batch
from adst_plugin.collate import ADSTTargetCollate

__all__ = [
    "EpochSampler",
    "cached_eval_batches",
    "cached_train_batches",
    "epoch_order",
    "epoch_seed",
    "loader_batches",
    "make_loader",
]

#: What evaluation iterates: ``(indices, images, masks)``, indices into the names/tags it is given.
EvalBatch = tuple[Sequence[int] | Tensor, Tensor, Tensor]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed that depends only on ``(seed, epoch, rank)``, so that an epoch's draws do not depend on history."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0) -> Tensor:
    """The shuffled order of ``n`` training images in ``epoch``: a permutation seeded by ``(seed, epoch, rank)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch, rank)))


class EpochSampler(Sampler[int]):
    """The training sampler of one process: :func:`epoch_order` of the epoch set by :meth:`set_epoch`."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 1

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order next."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(
    split: LesionSplit,
    ctx: DistContext,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    train: bool,
    generator: torch.Generator,
    target_kwargs: dict[str, float] | None = None,
) -> DataLoader:
    """Loader of a split: :class:`EpochSampler` for training, DistributedSampler under DDP (padded, so
    evaluation drops duplicates).

    ``generator`` seeds the workers (the DataLoader seeds ``random``, NumPy and torch in each worker from it), so
    augmentation does not depend on the global RNG. With ``target_kwargs`` (an ADST loss's ``target_kwargs``) each
    batch also carries the ADST ``(core, border)`` targets, built in the workers.
    """
    sampler: Any
    if ctx.distributed:
        sampler = DistributedSampler(split, ctx.world_size, ctx.rank, shuffle=train, seed=seed)
    elif train:
        sampler = EpochSampler(len(split), seed)
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
        collate_fn=None if target_kwargs is None else ADSTTargetCollate(**target_kwargs),
    )


def loader_batches(loader: DataLoader, device: torch.device) -> Iterator[Batch]:
    """The DataLoader's ``(index, images, masks[, targets])`` items as engine batches on ``device``."""
    for _, images, masks, *precomputed in loader:
        targets = tuple(t.to(device, non_blocking=True) for t in precomputed[0]) if precomputed else None
        yield Batch(images.to(device, non_blocking=True), masks.to(device, non_blocking=True), targets)


def cached_train_batches(
    data: CachedData,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    steps: int,
    transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
) -> Iterator[Batch]:
    """``steps`` training batches of the cache in :func:`epoch_order`, augmented on the device by ``transform``
    (per sample, draws seeded by ``(seed, epoch)``)."""
    train = data.split["train"]
    order = train[epoch_order(len(train), seed, epoch).to(train.device)]
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, 1))
    for step in range(steps):
        sel = order[step * batch_size : (step + 1) * batch_size]
        x, m = data.images[sel].float() / 255.0, _masks(data, sel)
        if transform is not None:
            x, m = augment_batch(transform, x, m, generator)
        yield Batch(x.contiguous(), m.contiguous())


def cached_eval_batches(data: CachedData, key: str, batch_size: int) -> Iterator[EvalBatch]:
    """Split ``key`` of the cache in order, as ``(indices into data.names, images, masks)``."""
    idx = data.split[key]
    for start in range(0, len(idx), batch_size):
        sel = idx[start : start + batch_size]
        yield sel.tolist(), data.images[sel].float() / 255.0, _masks(data, sel)


def _masks(data: CachedData, sel: Tensor) -> Tensor:
    """The masks of ``sel`` as the loss takes them: ``float`` ``(B, 1, S, S)``, or ``int64`` class indices
    ``(B, S, S)`` for a multi-class cache."""
    masks = data.masks[sel]
    return masks.long() if data.num_classes > 1 else masks.float()
