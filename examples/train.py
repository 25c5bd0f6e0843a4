"""Train an smp segmentation model with (default) or without (``--no-adst``) the ADST auxiliary head.

``python examples/train.py`` (or ``python -m examples.train``) with no arguments trains an ADST Unet on the built-in
synthetic data into ``runs/synthetic-adst`` in a few minutes on a laptop CPU. Real data::

    python examples/train.py --dataset busi --root ../shared/data/Dataset_BUSI_with_GT --epochs 100 --out runs/busi-adst
    torchrun --nproc_per_node=2 examples/train.py --dataset kvasir --root data/Kvasir-SEG   # DDP

Pipeline: seeded 70/10/20 split (``split.json``) → training with joint augmentation, cosine LR per step, AMP on
CUDA → validation Dice every epoch (``best.pt`` by val Dice, ``last.pt`` for ``--resume``) → the best weights are
exported to a plain smp model (``exported/``, ``save_pretrained``), reloaded with ``smp.from_pretrained`` and
evaluated on the test split (``metrics.json``, ``overlays.png``). See docs/examples.md, "Training CLI".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import adst_plugin
from adst_examples.cli import non_negative_int, positive_int
from adst_examples.data import (
    DATASET_NAMES,
    DATASETS,
    LesionSplit,
    build_dataset,
    datasets_needing,
    get_or_create_split,
    split_indices,
    train_transforms,
)
from adst_examples.metrics import METRIC_NAMES, MeanStd, MetricAccumulator
from adst_examples.training.checkpoints import (
    CHECKPOINT_FORMAT,
    epoch_seed,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    write_json,
    write_log,
)
from adst_examples.training.distributed import (
    DistContext,
    describe_device,
    resolve_amp,
    resolve_device,
    setup_distributed,
    teardown_distributed,
)
from adst_examples.training.loop import Optimisation, evaluate, fade_factor, head_maps, make_loader, train_one_epoch
from adst_examples.training.models import (
    add_model_arguments,
    build_criterion,
    build_model,
    check_model_args,
    count_params,
    export_model,
)
from adst_examples.training.plots import OverlayRow, plot_curves, plot_overlays

__all__ = ["UsageError", "build_parser", "main", "parse_args"]

#: Defaults of --img-size, --epochs and --lr: the synthetic data's are small, so the no-argument run takes minutes.
DEFAULTS: dict[str, Any] = {"img_size": 256, "epochs": 100, "lr": 3e-4}
SYNTHETIC_DEFAULTS: dict[str, Any] = {"img_size": 128, "epochs": 8, "lr": 1e-3}
#: Flags that may change when resuming (they do not change the computation's result on the same device).
RUNTIME_KEYS = frozenset({"resume", "device", "workers", "no_progress", "stop_after_epoch", "out", "amp"})
OVERLAY_IMAGES = 6


class UsageError(Exception):
    """A problem with the user's data or flags, reported without a traceback by the command line."""


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


def _by_dataset(key: str) -> str:
    return f"[synthetic {SYNTHETIC_DEFAULTS[key]}, else {DEFAULTS[key]}]"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see docs/examples.md, "Training CLI"); defaults are shown as ``[...]``."""
    p = argparse.ArgumentParser(
        prog="train.py",
        allow_abbrev=False,
        description="Train an smp model with or without the ADST auxiliary head, then export and test it.",
    )
    root_users, folder_users = "/".join(datasets_needing("root")), "/".join(datasets_needing("images"))
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=DATASET_NAMES, help="dataset loader [%(default)s]")
    g.add_argument("--root", help=f"dataset folder (--dataset {root_users})")
    g.add_argument("--images", help=f"images folder (--dataset {folder_users})")
    g.add_argument("--masks", help=f"masks folder (--dataset {folder_users})")
    g.add_argument("--mask-suffix", default="", help="mask file stem suffix, e.g. _mask (--dataset folder)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image channels (folder) [%(default)s]")
    g.add_argument("--synthetic-n", type=positive_int, default=200, help="number of synthetic images [%(default)s]")
    g.add_argument("--limit", type=positive_int, help="use only N samples (seeded random subset; smoke tests)")
    g.add_argument("--img-size", type=positive_int, help=f"square input size, multiple of 32 {_by_dataset('img_size')}")
    g.add_argument("--split-file", help="train/val/test split JSON, created if missing [RUN_DIR/split.json]")
    g.add_argument("--split-seed", type=non_negative_int, help="seed of a new split [--seed]")
    normal = g.add_mutually_exclusive_group()
    normal.add_argument(
        "--include-normal", dest="include_normal", action="store_true", default=True,
        help="BUSI: train and validate on the lesion-free 'normal' images too [default]",
    )  # fmt: skip
    normal.add_argument(
        "--exclude-normal", dest="include_normal", action="store_false",
        help="BUSI: leave 'normal' images out of train/val (test is always reported with and without them)",
    )  # fmt: skip

    add_model_arguments(p).add_argument(
        "--aux-fade", choices=("none", "cosine", "linear"), default="none",
        help="fade the auxiliary terms from 1 (first epoch) to 0 (last epoch) [%(default)s]",
    )  # fmt: skip

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, help=f"epochs {_by_dataset('epochs')}")
    g.add_argument("--batch-size", type=positive_int, default=8, help="per-process batch size [%(default)s]")
    g.add_argument("--lr", type=float, help=f"peak learning rate {_by_dataset('lr')}")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final LR = lr * ratio (cosine) [%(default)s]")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW: decoupled, Adam: L2 [%(default)s]")
    g.add_argument("--optimizer", choices=("adamw", "adam"), default="adamw", help="optimizer [%(default)s]")

    g = p.add_argument_group("runtime")
    g.add_argument("--out", help="run folder [runs/<dataset>-adst or runs/<dataset>-baseline]")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = CUDA if any [%(default)s]")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast: auto = bf16 (or fp16 + GradScaler) on CUDA, off on CPU [%(default)s]")  # fmt: skip
    g.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers per process [%(default)s]")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seeds init, shuffling, augmentation [%(default)s]")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on CUDA)")
    g.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt with RUN_DIR/config.json")
    g.add_argument("--max-steps", type=positive_int, help="at most N optimizer steps per epoch (smoke tests)")
    g.add_argument("--stop-after-epoch", type=positive_int, help="stop after epoch K as if interrupted (tests resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _merge_saved_config(args: argparse.Namespace, parser: argparse.ArgumentParser, run_dir: Path) -> None:
    """``--resume``: take every non-runtime flag from the run's config.json; explicit conflicting flags are errors."""
    path = run_dir / "config.json"
    if not (run_dir / "last.pt").is_file() or not path.is_file():
        parser.error(f"--resume: no run to resume in '{run_dir}' (needs last.pt and config.json)")
    saved = json.loads(path.read_text(encoding="utf-8"))["args"]
    for key, value in saved.items():
        if key in RUNTIME_KEYS or not hasattr(args, key):
            continue
        given = getattr(args, key)
        if given != value and given != parser.get_default(key):
            flag = "--" + key.replace("_", "-")
            parser.error(f"--resume: {flag} {given} differs from the run's config.json ({value}); drop the flag")
        setattr(args, key, value)


def _check_dataset_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Folder flags that the dataset needs are given, and no flag of another dataset is (it would be ignored)."""
    entry = DATASETS[args.dataset]
    given = {"root": args.root, "images": args.images, "masks": args.masks}
    if any(given[arg] is None for arg in entry.needs):
        parser.error(f"--dataset {args.dataset} needs {' and '.join(f'--{arg} DIR' for arg in entry.needs)}")
    for arg, value in given.items():
        if value is not None and arg not in entry.needs:
            users = "/".join(datasets_needing(arg))
            parser.error(f"--{arg} is not used by --dataset {args.dataset}; did you mean --dataset {users}?")
    if not args.include_normal and entry.cls.lesion_free_tag is None:  # type: ignore[attr-defined]
        users = "/".join(name for name, e in DATASETS.items() if e.cls.lesion_free_tag)  # type: ignore[attr-defined]
        parser.error(f"--exclude-normal only applies to --dataset {users}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; fill dataset-dependent defaults. Exits with a usage message on bad flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    variant = "baseline" if args.no_adst else "adst"
    args.out = str(Path(args.out) if args.out else Path("runs") / f"{args.dataset}-{variant}")
    if args.resume:
        _merge_saved_config(args, parser, Path(args.out))
    _check_dataset_flags(args, parser)
    defaults = SYNTHETIC_DEFAULTS if args.dataset == "synthetic" else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.split_seed = args.seed if args.split_seed is None else args.split_seed
    if args.img_size % 32:
        parser.error(f"--img-size: expected a multiple of 32 (smp encoders downsample 32x), got {args.img_size}")
    try:
        resolve_amp(args.amp, resolve_device(args.device))
        check_model_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    for name in ("lr", "weight_decay", "min_lr_ratio"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a number >= 0, got {getattr(args, name)}")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


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


def build_data(args: argparse.Namespace, ctx: DistContext) -> Data:
    """Dataset → optional ``--limit`` subset → split (rank 0 creates ``split.json``) → train/val/test splits."""
    kwargs: dict[str, Any] = {}
    if args.dataset == "synthetic":
        kwargs = {"n": min(args.synthetic_n, args.limit or args.synthetic_n)}
    elif args.dataset == "folder":
        kwargs = {"mask_suffix": args.mask_suffix, "channels": args.channels}
    try:
        dataset: Any = build_dataset(
            args.dataset, root=args.root, images=args.images, masks=args.masks, img_size=args.img_size, **kwargs
        )
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
    return Data(
        train=LesionSplit(dataset, indices["train"], train_transforms(dataset.in_channels, args.img_size)),
        val=LesionSplit(dataset, indices["val"]),
        test=LesionSplit(dataset, indices["test"]),
        split=split,
        in_channels=dataset.in_channels,
        lesion_free_tag=lesion_free,
    )


# --------------------------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Net:
    """The model being trained and its loss."""

    #: What is saved, evaluated and exported.
    raw: nn.Module
    #: What the training step calls: ``raw``'s DDP wrapper under DDP, else ``raw`` itself.
    trained: nn.Module
    #: What :func:`~adst_examples.training.models.build_criterion` returned.
    criterion: nn.Module


@dataclass(frozen=True)
class Loaders:
    """The three loaders; ``train_gen`` is reseeded every epoch (shuffle and worker seeds)."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    train_gen: torch.Generator
    steps_per_epoch: int


@dataclass(frozen=True)
class Session:
    """Everything a run builds once, in :func:`setup`; never reassigned."""

    args: argparse.Namespace
    ctx: DistContext
    run_dir: Path
    data: Data
    net: Net
    opt: Optimisation
    loaders: Loaders

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


def _amp_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype else "off"


def _summary_dict(summary: dict[str, MeanStd]) -> dict[str, dict[str, float]]:
    return {m: {"mean": s.mean, "std": s.std, "n": s.n} for m, s in summary.items()}


def setup(args: argparse.Namespace, ctx: DistContext) -> Session:
    """Seed, build data/model (DDP-wrapped under DDP)/optimizer/cosine schedule/scaler/loaders."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True, warn_only=True)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
    amp_dtype = resolve_amp(args.amp, ctx.device)
    run_dir = Path(args.out)
    seed_everything(args.seed)
    data = build_data(args, ctx)  # before creating the run folder: bad data leaves nothing behind
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    raw = build_model(args, data.in_channels).to(ctx.device)
    seed_everything(args.seed + ctx.rank)  # ranks differ in augmentation only; DDP copies rank 0's weights
    trained = raw
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        trained = DistributedDataParallel(raw, device_ids=ids, find_unused_parameters=False)
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(raw.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    criterion = build_criterion(args, raw)
    loader_kwargs: dict[str, Any] = {"batch_size": args.batch_size, "workers": args.workers, "seed": args.seed}
    train_gen = torch.Generator()
    # ADST runs: the workers build the loss's targets.
    train = make_loader(
        data.train, ctx, train=True, generator=train_gen, criterion=None if args.no_adst else criterion, **loader_kwargs
    )
    # Evaluation loaders get their own fixed generator: evaluation never draws from the global RNG.
    val = make_loader(data.val, ctx, train=False, generator=torch.Generator(), **loader_kwargs)
    test = make_loader(data.test, ctx, train=False, generator=torch.Generator(), **loader_kwargs)
    steps = min(len(train), args.max_steps or len(train))
    # Per-step cosine from lr down to lr * min_lr_ratio. Old checkpoints' LambdaLR state loads into it unchanged.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=steps * args.epochs, eta_min=args.lr * args.min_lr_ratio
    )
    return Session(
        args=args,
        ctx=ctx,
        run_dir=run_dir,
        data=data,
        net=Net(raw=raw, trained=trained, criterion=criterion),
        opt=Optimisation(
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype is torch.float16),
            amp_dtype=amp_dtype,
        ),
        loaders=Loaders(train=train, val=val, test=test, train_gen=train_gen, steps_per_epoch=steps),
    )


def restore(s: Session) -> TrainState:
    """Load ``last.pt`` into the session; returns where to continue (RNG states are applied later)."""
    ckpt = load_checkpoint(s.run_dir / "last.pt")
    s.net.raw.load_state_dict(ckpt["model"])
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


def run_epoch(s: Session, state: TrainState, epoch: int) -> tuple[dict[str, Any], dict[str, MeanStd]]:
    """Train one epoch and validate; appends the log row to ``state.history`` and updates the best score."""
    args, t0 = s.args, time.perf_counter()
    aux_scale = fade_factor(args.aux_fade, epoch - 1, args.epochs)
    # Shuffle order and worker seeds from (seed, epoch, rank) alone, so a resumed epoch replays exactly.
    s.loaders.train_gen.manual_seed(epoch_seed(args.seed, epoch, s.ctx.rank))
    sampler = s.loaders.train.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    row: dict[str, Any] = {"epoch": epoch}
    row |= train_one_epoch(
        s.net.trained, s.loaders.train, s.net.criterion, s.opt, s.ctx,
        steps=s.loaders.steps_per_epoch, aux_scale=aux_scale, desc=f"epoch {epoch}/{args.epochs}", progress=s.progress,
    )  # fmt: skip
    val, val_loss = evaluate(
        s.net.raw, s.loaders.val, s.ctx, s.opt.amp_dtype,
        metrics=("dice", "iou"), criterion=s.net.criterion, desc="val", progress=s.progress,
    )  # fmt: skip
    summary = val.summary()
    is_best = state.best_epoch == 0 or summary["dice"].mean > state.best_score
    if is_best:
        state.best_score, state.best_epoch = summary["dice"].mean, epoch
    row |= {
        "lr": s.opt.scheduler.get_last_lr()[0],
        "aux_scale": aux_scale if s.adst else None,
        "val_loss": val_loss,
        "val_dice": summary["dice"].mean,
        "val_iou": summary["iou"].mean,
        "is_best": is_best,
        "time_s": time.perf_counter() - t0,
    }
    if s.ctx.device.type == "cuda":
        row["max_mem_mib"] = torch.cuda.max_memory_allocated(s.ctx.device) / 2**20
    state.history.append(row)
    state.next_epoch = epoch + 1
    return row, summary


def save_epoch(s: Session, state: TrainState, row: dict[str, Any], val: dict[str, MeanStd]) -> None:
    """``best.pt`` (if best), ``last.pt``, logs and curves. Every rank calls it (RNG states are gathered)."""
    rng = s.ctx.all_gather_object(get_rng_state(s.ctx.device))  # after everything that drew random numbers
    if not s.ctx.is_main:
        return
    base = {"format": CHECKPOINT_FORMAT, "epoch": row["epoch"], "model": s.net.raw.state_dict()}
    meta = {"config": vars(s.args), "adst": s.adst}
    if row["is_best"]:
        save_checkpoint(s.run_dir / "best.pt", {**base, "val": _summary_dict(val), **meta})
    last = {
        "optimizer": s.opt.optimizer.state_dict(),
        "scheduler": s.opt.scheduler.state_dict(),
        "scaler": s.opt.scaler.state_dict(),
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "rng": rng,
    }
    save_checkpoint(s.run_dir / "last.pt", {**base, **last, **meta})
    write_log(s.run_dir, state.history)
    plot_curves(state.history, s.run_dir / "curves.png", s.name)
    terms = " ".join(f"{k[6:]} {v:.4f}" for k, v in row.items() if k.startswith("train_") and k != "train_dice")
    s.log(
        f"epoch {row['epoch']}/{s.args.epochs}  loss[{terms}]  val Dice {row['val_dice']:.4f} IoU {row['val_iou']:.4f}"
        f"{'  *best*' if row['is_best'] else ''}  ({row['time_s']:.1f} s)"
    )


def export_best(s: Session) -> nn.Module:
    """Best-on-val weights → plain smp model → ``exported/`` (rank 0) → reloaded with ``smp.from_pretrained``."""
    s.ctx.barrier()  # best.pt is complete
    s.net.raw.load_state_dict(load_checkpoint(s.run_dir / "best.pt")["model"])
    export_dir = s.run_dir / "exported"
    if s.ctx.is_main:
        plain = export_model(s.net.raw).cpu()
        plain.config["encoder_weights"] = None  # the weights are in the folder: reloading downloads nothing
        plain.save_pretrained(str(export_dir), dataset=s.args.dataset)
    s.ctx.barrier()
    return smp.from_pretrained(str(export_dir)).to(s.ctx.device).eval()


def _overlays(s: Session, exported: nn.Module, test: MetricAccumulator) -> None:
    """A few evenly spaced test images: image, truth, exported model's prediction, ADST maps of the best wrapper."""
    dice = dict(zip(test.names, test.values["dice"], strict=True))
    count = min(OVERLAY_IMAGES, len(s.data.test))
    picks = sorted({int(i) for i in np.linspace(0, len(s.data.test) - 1, count).round()})
    rows = []
    with torch.no_grad():
        for i in picks:
            _, image, mask = s.data.test[i]
            batch = image[None].to(s.ctx.device)
            prob = exported(batch).float().sigmoid()[0, 0].cpu().numpy()
            maps = {key: value[0, 0].cpu().numpy() for key, value in head_maps(s.net.raw, batch).items()}
            img = image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy()
            name = s.data.test.names[i]
            rows.append(
                OverlayRow(
                    name=name, image=img, target=mask[0].numpy(), prob=prob, dice=dice.get(name, math.nan), maps=maps
                )
            )
    plot_overlays(rows, s.run_dir / "overlays.png", f"{s.name}, test split")


def final_test(s: Session, state: TrainState, timing: dict[str, float], t_start: float) -> dict[str, Any]:
    """Test metrics of the reloaded exported model; rank 0 writes metrics.json, overlays.png and the model card."""
    t0 = time.perf_counter()
    exported = export_best(s)
    test, _ = evaluate(exported, s.loaders.test, s.ctx, s.opt.amp_dtype, desc="test", progress=s.progress)
    order = {name: i for i, name in enumerate(s.data.test.names)}
    keep = sorted(range(len(test)), key=lambda i: order[test.names[i]])  # split order, whatever the ranks did
    per_image: dict[str, list[Any]] = {"name": [test.names[i] for i in keep], "tag": [test.tags[i] for i in keep]}
    per_image |= {m: [test.values[m][i] for i in keep] for m in METRIC_NAMES}
    best = load_checkpoint(s.run_dir / "best.pt")
    lesion_free = s.data.lesion_free_tag
    result: dict[str, Any] = {
        "dataset": s.args.dataset,
        "variant": "adst" if s.adst else "baseline",
        "run_dir": str(s.run_dir),
        "test": _summary_dict(test.summary()),
    }
    if lesion_free is not None:
        result[f"test_without_{lesion_free}"] = _summary_dict(test.summary(exclude={lesion_free}))
    result |= {
        "best_epoch": best["epoch"],
        "best_val": best["val"],
        "per_image": per_image,
        "params": {"train": count_params(s.net.raw), "exported": count_params(exported)},
        "timing": {
            **timing,
            "s_per_epoch": float(np.mean([row["time_s"] for row in state.history])),
            "test_s": time.perf_counter() - t0,
        },
        "world_size": s.ctx.world_size,
        "device": str(s.ctx.device),
        "amp": _amp_name(s.opt.amp_dtype),
        "config": vars(s.args),
    }
    if s.ctx.is_main:
        _overlays(s, exported, test)
        means = {m: round(v["mean"], 4) for m, v in result["test"].items()}
        exported.generate_model_card(metrics=means, dataset=s.args.dataset).save(str(s.run_dir / "exported/README.md"))
        result["timing"]["total_s_this_session"] = time.perf_counter() - t_start
        write_json(s.run_dir / "metrics.json", result)
        s.log(f"test ({len(test)} images): {test.format()}")
        if lesion_free is not None:
            s.log(f"test without {lesion_free}: {test.format(exclude={lesion_free})}")
    s.ctx.barrier()
    return result


def _config(s: Session) -> dict[str, Any]:
    return {
        "args": vars(s.args),
        "world_size": s.ctx.world_size,
        "device": str(s.ctx.device),
        "machine": describe_device(s.ctx.device),
        "amp": _amp_name(s.opt.amp_dtype),
        "in_channels": s.data.in_channels,
        "sizes": {"train": len(s.data.train), "val": len(s.data.val), "test": len(s.data.test)},
        "versions": {"torch": torch.__version__, "smp": smp.__version__, "adst_plugin": adst_plugin.__version__},
        "command": sys.argv,
    }


def run(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any]:
    """Train, select on val, export, reload, test. Returns the metrics dict (on every rank)."""
    t_start = time.perf_counter()
    s = setup(args, ctx)
    if args.resume:
        state = restore(s)
    else:
        state = TrainState()
        if ctx.is_main:
            write_json(s.run_dir / "config.json", _config(s))
    s.log(
        f"{s.name}: {args.arch}/{args.encoder} ({count_params(s.net.raw) / 1e6:.2f} M params), train "
        f"{len(s.data.train)} / val {len(s.data.val)} / test {len(s.data.test)} at {args.img_size}px, "
        f"{ctx.world_size} x {ctx.device}, amp {_amp_name(s.opt.amp_dtype)} → {s.run_dir}"
    )
    if state.rng is not None:
        set_rng_state(state.rng, ctx.device)  # last: nothing after this may draw before the first epoch
    t_train = time.perf_counter()
    for epoch in range(state.next_epoch, args.epochs + 1):
        row, val = run_epoch(s, state, epoch)
        save_epoch(s, state, row, val)
        if args.stop_after_epoch and args.stop_after_epoch <= epoch < args.epochs:
            s.log(f"stopping after epoch {epoch} (--stop-after-epoch); continue with --resume")
            return {"stopped_after_epoch": epoch, "run_dir": str(s.run_dir)}
    timing = {"train_s_this_session": time.perf_counter() - t_train}
    return final_test(s, state, timing, t_start)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the metrics dict (or ``{"stopped_after_epoch": k, ...}``)."""
    args = parse_args(argv)
    ctx = setup_distributed(args.device)
    try:
        return run(args, ctx)
    finally:
        teardown_distributed(ctx)


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"train.py: error: {error}")
