"""What a train.py run builds once: its data splits, model, loss, optimisation and loaders (:func:`build_parts`).

The loop that uses them is :mod:`adst_examples.training.fit`; the step and the epoch are the engine's
(:mod:`adst_examples.training.engine`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from adst_examples.data import (
    BadPairsError,
    LesionSplit,
    build_dataset,
    get_or_create_split,
    num_classes,
    split_indices,
)
from adst_examples.data import train_transforms as make_train_transforms
from adst_examples.training.batches import make_loader
from adst_examples.training.checkpoints import load_checkpoint, seed_everything
from adst_examples.training.distributed import DistContext, configure_backends, place_model, resolve_amp
from adst_examples.training.engine import Optimisation, steps_per_epoch
from adst_examples.training.models import build_criterion, build_model

__all__ = ["Data", "RunParts", "TrainState", "UsageError", "build_data", "build_parts", "restore"]


class UsageError(Exception):
    """A problem with the user's data or flags, reported without a traceback by the command line."""


@dataclass(frozen=True)
class Data:
    """The three splits and where they come from."""

    train: LesionSplit
    val: LesionSplit
    test: LesionSplit
    split: dict[str, list[str]]
    in_channels: int
    #: The dataset's tag of lesion-free images (BUSI ``normal``): test metrics are also reported without them.
    lesion_free_tag: str | None
    #: Of a multi-class dataset (``busi3``), every class by index (background first); ``()``: binary.
    class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """The model's ``classes``."""
        return max(1, len(self.class_names))


def dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``build_dataset`` keywords of train.py's dataset flags."""
    kwargs: dict[str, Any] = {"img_size": args.img_size}
    if args.dataset == "synthetic":
        return kwargs | {"n": min(args.synthetic_n, args.limit or args.synthetic_n)}
    kwargs["skip_bad"] = args.skip_bad
    if args.dataset == "folder":
        kwargs |= {"mask_suffix": args.mask_suffix, "channels": args.channels}
    return kwargs


def build_data(args: argparse.Namespace, ctx: DistContext) -> Data:
    """Dataset → optional ``--limit`` subset → split (rank 0 creates ``split.json``) → train/val/test splits."""
    try:
        dataset: Any = build_dataset(
            args.dataset, root=args.root, images=args.images, masks=args.masks, **dataset_kwargs(args)
        )
    except BadPairsError as exc:
        raise UsageError(exc.with_fix("pass --skip-bad to skip them")) from exc
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    pool = list(range(len(dataset)))  # the samples that enter the split
    if args.limit and len(dataset) > args.limit:
        rng = np.random.default_rng(args.split_seed)
        pool = sorted(rng.choice(len(dataset), args.limit, replace=False).tolist())
    names = [dataset.names[i] for i in pool]
    labels = [dataset.tags[i] for i in pool] if dataset.stratify_by_tag else None
    split_file = Path(args.split_file) if args.split_file else Path(args.out) / "split.json"
    split: dict[str, list[str]] = {}
    for rank_turn in (True, False):  # rank 0 writes the file first, the others then read it
        if ctx.is_main == rank_turn:
            try:
                split = get_or_create_split(names, split_file, seed=args.split_seed, labels=labels)
            except (FileNotFoundError, ValueError) as exc:
                raise UsageError(str(exc)) from exc
        ctx.barrier()
    indices = split_indices(dataset.names, split)
    lesion_free = dataset.lesion_free_tag
    if lesion_free is not None and not args.include_normal:
        for key in ("train", "val"):
            indices[key] = [i for i in indices[key] if dataset.tags[i] != lesion_free]
    empty = [key for key, idx in indices.items() if not idx]
    if empty:
        raise UsageError(f"split {empty} is empty ({len(pool)} samples); use more data or a larger --limit")
    augment = None if args.no_augment else make_train_transforms(dataset.in_channels, args.img_size)
    return Data(
        train=LesionSplit(dataset, indices["train"], augment),
        val=LesionSplit(dataset, indices["val"]),
        test=LesionSplit(dataset, indices["test"]),
        split=split,
        in_channels=dataset.in_channels,
        lesion_free_tag=lesion_free,
        class_names=tuple(getattr(dataset, "class_names", ())) if num_classes(dataset) > 1 else (),
    )


@dataclass(frozen=True)
class RunParts:
    """Everything a run builds once, in :func:`setup`; never reassigned."""

    args: argparse.Namespace
    ctx: DistContext
    run_dir: Path
    data: Data
    #: What is saved, evaluated and exported.
    model: nn.Module
    #: What the training step calls: ``model``'s DDP wrapper under DDP, else ``model`` itself.
    trained: nn.Module
    criterion: nn.Module
    opt: Optimisation
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    #: Reseeded every epoch: the workers' seeds (augmentation draws).
    train_gen: torch.Generator
    steps_per_epoch: int

    @property
    def adst(self) -> bool:
        """True for the ADST variant."""
        return not self.args.no_adst

    @property
    def name(self) -> str:
        """``"<dataset> ADST"`` or ``"<dataset> baseline"``."""
        return f"{self.args.dataset} {'ADST' if self.adst else 'baseline'}"

    @property
    def progress(self) -> bool:
        """Progress bars on rank 0 unless ``--no-progress``."""
        return self.ctx.is_main and not self.args.no_progress

    def log(self, message: str) -> None:
        """Print on rank 0 (through tqdm, so bars stay intact)."""
        if self.ctx.is_main:
            tqdm.write(message)


@dataclass
class TrainState:
    """What changes from epoch to epoch, and what ``last.pt`` carries besides the module states."""

    next_epoch: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    rng: dict[str, Any] | None = None


def build_parts(args: argparse.Namespace, ctx: DistContext) -> RunParts:
    """Seed, build data/model (DDP-wrapped under DDP)/loss/optimisation/loaders."""
    configure_backends(ctx.device, deterministic=args.deterministic)
    amp_dtype = resolve_amp(args.amp, ctx.device)
    run_dir = Path(args.out)
    data = build_data(args, ctx)  # before creating the run folder: bad data leaves nothing behind
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)  # the model's initialisation depends on the seed alone
    try:
        model = build_model(args, data.in_channels, data.num_classes)
        model = place_model(model, ctx.device, channels_last=args.channels_last)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    seed_everything(args.seed + ctx.rank)  # ranks differ in augmentation only; DDP copies rank 0's weights
    trained: nn.Module = model
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
    criterion = build_criterion(args, model, data.num_classes)
    common: dict[str, Any] = {"batch_size": args.batch_size, "workers": args.workers, "seed": args.seed}
    train_gen = torch.Generator()
    # ADST runs: the workers build the loss's targets.
    targets = None if args.no_adst else criterion.target_kwargs
    train = make_loader(data.train, ctx, train=True, generator=train_gen, target_kwargs=targets, **common)
    # Evaluation loaders get their own fixed generator: evaluation never draws from the global RNG.
    val = make_loader(data.val, ctx, train=False, generator=torch.Generator(), **common)
    test = make_loader(data.test, ctx, train=False, generator=torch.Generator(), **common)
    steps = min(len(train), steps_per_epoch(len(data.train), args.batch_size, args.max_steps))
    opt = Optimisation.build(
        model, lr=args.lr, total_steps=steps * args.epochs, device=ctx.device, amp_dtype=amp_dtype,
        weight_decay=args.weight_decay, min_lr_ratio=args.min_lr_ratio, optimizer=args.optimizer,
    )  # fmt: skip
    return RunParts(
        args=args, ctx=ctx, run_dir=run_dir, data=data, model=model, trained=trained, criterion=criterion,
        opt=opt, train_loader=train, val_loader=val, test_loader=test, train_gen=train_gen, steps_per_epoch=steps,
    )  # fmt: skip


def restore(s: RunParts) -> TrainState:
    """Load ``last.pt`` into the run's parts; returns where to continue (RNG states are applied later)."""
    ckpt = load_checkpoint(s.run_dir / "last.pt")
    s.model.load_state_dict(ckpt["model"])
    s.opt.optimizer.load_state_dict(ckpt["optimizer"])
    s.opt.scheduler.load_state_dict(ckpt["scheduler"])
    if s.opt.scaler.is_enabled() and ckpt["scaler"]:
        s.opt.scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"]
    s.log(f"resuming {s.run_dir} after epoch {ckpt['epoch']} (best val Dice {ckpt['best_score']:.4f})")
    return TrainState(
        next_epoch=ckpt["epoch"] + 1,
        history=list(ckpt["history"]),
        best_score=ckpt["best_score"],
        best_epoch=ckpt["best_epoch"],
        rng=rngs[s.ctx.rank] if len(rngs) == s.ctx.world_size else rngs[0],
    )
