"""Train an smp segmentation model with (default) or without (``--no-adst``) the ADST auxiliary head.

``python examples/train.py`` with no arguments trains an ADST Unet on the built-in synthetic data into
``runs/synthetic-adst`` in a few minutes on a laptop CPU. Real data::

    python examples/train.py --dataset busi --root ../shared/data/Dataset_BUSI_with_GT --epochs 100 --out runs/busi-adst
    torchrun --nproc_per_node=2 examples/train.py --dataset kvasir --root data/Kvasir-SEG   # DDP

Pipeline: seeded 70/10/20 split (``split.json``) → training with joint augmentation, cosine LR per step, AMP on
CUDA → validation Dice every epoch (``best.pt`` by val Dice, ``last.pt`` for ``--resume``) → the best weights are
exported to a plain smp model (``exported/``, ``save_pretrained``), reloaded with ``smp.from_pretrained`` and
evaluated on the test split (``metrics.json``, ``overlays.png``). See docs/examples.md, "Training CLI".
"""

from __future__ import annotations

import argparse
import copy
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
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

try:
    import adst_plugin
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import adst_plugin

import lesion_data as ld
import lesion_metrics as lm
import train_utils as tu

from adst_plugin import ADSTLoss, DiceBCELoss, wrap_with_adst
from adst_plugin import constants as C
from adst_plugin.head import FUSIONS
from adst_plugin.wrapper import TAPS

__all__ = ["UsageError", "build_parser", "main", "parse_args"]

ARCHS: dict[str, str] = {key: cls.__name__ for key, cls in smp.MODEL_ARCHITECTURES_MAPPING.items()}
#: Dataset-dependent defaults (synthetic: small and quick, so the no-argument run takes minutes on a CPU).
DEFAULT_IMG_SIZE = {"synthetic": 128}
DEFAULT_EPOCHS = {"synthetic": 8}
DEFAULT_LR = {"synthetic": 1e-3}
#: Flags that may change when resuming (they do not change the computation's result on the same device).
RUNTIME_KEYS = frozenset({"resume", "device", "workers", "no_progress", "stop_after_epoch", "out", "amp"})
OVERLAY_IMAGES = 6


class UsageError(Exception):
    """A problem with the user's data or flags, reported without a traceback by the command line."""


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


def _arch(name: str) -> str:
    key = name.lower()
    if key not in ARCHS:
        raise argparse.ArgumentTypeError(f"unknown architecture {name!r}; valid: {', '.join(ARCHS.values())}")
    return ARCHS[key]


def _encoder(name: str) -> str:
    known = smp.encoders.get_encoder_names()
    if name not in known and not name.startswith("tu-"):
        raise argparse.ArgumentTypeError(
            f"unknown encoder {name!r}; valid: {', '.join(known)} or any timm model as 'tu-<name>'"
        )
    return name


def _weights(value: str) -> str | None:
    return None if value.lower() in ("", "none", "null") else value


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return number


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Show real defaults only; dataset-dependent ones are written as "[...]" in the help text.
    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default in ("", argparse.SUPPRESS) or "[" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see docs/examples.md, "Training CLI")."""
    p = argparse.ArgumentParser(
        prog="train.py",
        allow_abbrev=False,
        description="Train an smp model with or without the ADST auxiliary head, then export and test it.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=ld.DATASET_NAMES, help="dataset loader")
    g.add_argument("--root", help="dataset folder (busi, isic2018, kvasir)")
    g.add_argument("--images", help="images folder (--dataset folder)")
    g.add_argument("--masks", help="masks folder (--dataset folder)")
    g.add_argument("--mask-suffix", default="", help="mask file stem suffix, e.g. _mask (--dataset folder)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image channels (--dataset folder)")
    g.add_argument("--synthetic-n", type=_positive, default=200, help="number of synthetic images")
    g.add_argument("--limit", type=_positive, help="use only N samples (seeded random subset; smoke tests)")
    g.add_argument("--img-size", type=_positive, help="square input size, multiple of 32 [synthetic 128, else 256]")
    g.add_argument("--split-file", help="train/val/test split JSON, created if missing [RUN_DIR/split.json]")
    g.add_argument("--split-seed", type=_non_negative, help="seed of a new split [--seed]")
    normal = g.add_mutually_exclusive_group()
    normal.add_argument(
        "--include-normal", dest="include_normal", action="store_true", default=True,
        help="BUSI: train and validate on the lesion-free 'normal' images too [default]",
    )  # fmt: skip
    normal.add_argument(
        "--exclude-normal", dest="include_normal", action="store_false",
        help="BUSI: leave 'normal' images out of train/val (test is always reported with and without them)",
    )  # fmt: skip

    g = p.add_argument_group("model")
    g.add_argument("--arch", type=_arch, default="Unet", help=f"smp architecture: {', '.join(ARCHS.values())}")
    g.add_argument("--encoder", type=_encoder, default="resnet34", help="smp encoder name")
    g.add_argument("--encoder-weights", type=_weights, default=None, help="e.g. imagenet (needs a download)")

    g = p.add_argument_group("ADST head and loss")
    g.add_argument("--no-adst", action="store_true", help="train the plain model (baseline)")
    g.add_argument("--tap", choices=TAPS, default="decoder", help="what the head reads")
    g.add_argument("--head-stride", type=_positive, default=C.HEAD_STRIDE, help="head working stride (1 = paper)")
    g.add_argument("--fusion", choices=FUSIONS, default="convglu", help="fusion of main and edge maps")
    g.add_argument("--hidden-channels", type=_positive, default=C.HIDDEN_CHANNELS, help="head width")
    g.add_argument("--aux-weight", type=float, default=1.0, help="multiplies w_main, w_edge and w_fused")
    g.add_argument("--aux-fade", choices=("none", "cosine", "linear"), default="none",
                   help="fade the auxiliary terms from 1 (first epoch) to 0 (last epoch)")  # fmt: skip
    g.add_argument(
        "--feature-grad",
        action=argparse.BooleanOptionalAction,
        default=C.FEATURE_GRAD,
        help="the head's main/fused losses also train the tapped features (off by default, see docs/results.md)",
    )
    g.add_argument("--w-main", type=float, default=C.W_MAIN, help="weight of the main (core map) term")
    g.add_argument("--w-edge", type=float, default=C.W_EDGE, help="weight of the edge (border map) term")
    g.add_argument("--w-fused", type=float, default=C.W_FUSED, help="weight of the fused term")
    g.add_argument(
        "--base-loss",
        choices=("dicebce", "bce"),
        default="dicebce",
        help="loss on the mask (and fused) logits, for baseline and ADST alike",
    )
    g.add_argument(
        "--fused-loss",
        choices=("base", "dicebce", "bce"),
        default="base",
        help="loss on the fused logits only (ADST); base = same as --base-loss",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive, help="epochs [synthetic 8, else 100]")
    g.add_argument("--batch-size", type=_positive, default=8, help="per-process batch size")
    g.add_argument("--lr", type=float, help="peak learning rate [synthetic 1e-3, else 3e-4]")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final LR = lr * ratio (cosine per step)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled (AdamW) or L2 (Adam)")
    g.add_argument("--optimizer", choices=("adamw", "adam"), default="adamw", help="optimizer")

    g = p.add_argument_group("runtime")
    g.add_argument("--out", help="run folder [runs/<dataset>-adst or runs/<dataset>-baseline]")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if available")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast: auto = bf16 (or fp16 + GradScaler) on CUDA, off on CPU")  # fmt: skip
    g.add_argument("--workers", type=_non_negative, default=2, help="DataLoader workers per process")
    g.add_argument("--seed", type=_non_negative, default=0, help="seeds init, shuffling and augmentation")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on CUDA)")
    g.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt with RUN_DIR/config.json")
    g.add_argument("--max-steps", type=_positive, help="at most N optimizer steps per epoch (smoke tests)")
    g.add_argument("--stop-after-epoch", type=_positive, help="stop after epoch K as if interrupted (tests resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _merge_saved_config(args: argparse.Namespace, parser: argparse.ArgumentParser, run_dir: Path) -> None:
    """``--resume``: take every non-runtime flag from the run's config.json; explicit conflicting flags are errors."""
    path = run_dir / "config.json"
    if not (run_dir / "last.pt").is_file() or not path.is_file():
        parser.error(f"--resume: no run to resume in '{run_dir}' (needs last.pt and config.json)")
    saved = json.loads(path.read_text(encoding="utf-8"))["args"]
    if "no_feature_grad" in saved:  # runs from before --feature-grad became a --[no-]feature-grad pair
        saved["feature_grad"] = not saved.pop("no_feature_grad")
    for key, value in saved.items():
        if key in RUNTIME_KEYS or not hasattr(args, key):
            continue
        given = getattr(args, key)
        if given != value and given != parser.get_default(key):
            flag = "--" + key.replace("_", "-")
            parser.error(f"--resume: {flag} {given} differs from the run's config.json ({value}); drop the flag")
        setattr(args, key, value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; fill dataset-dependent defaults. Exits with a usage message on bad flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    variant = "baseline" if args.no_adst else "adst"
    args.out = str(Path(args.out) if args.out else Path("runs") / f"{args.dataset}-{variant}")
    if args.resume:
        _merge_saved_config(args, parser, Path(args.out))
    if args.dataset == "folder" and (args.images is None or args.masks is None):
        parser.error("--dataset folder needs --images DIR and --masks DIR")
    if args.dataset in ("busi", "isic2018", "kvasir") and args.root is None:
        parser.error(f"--dataset {args.dataset} needs --root DIR (the dataset folder)")
    # Flags of another dataset would be ignored silently (e.g. --root without --dataset trains on synthetic data).
    if args.root is not None and args.dataset not in ("busi", "isic2018", "kvasir"):
        parser.error(f"--root is not used by --dataset {args.dataset}; did you mean --dataset busi/isic2018/kvasir?")
    if (args.images or args.masks) and args.dataset != "folder":
        parser.error("--images/--masks are only used by --dataset folder")
    if not args.include_normal and args.dataset != "busi":
        parser.error("--exclude-normal only applies to --dataset busi")
    args.img_size = args.img_size or DEFAULT_IMG_SIZE.get(args.dataset, 256)
    args.epochs = args.epochs or DEFAULT_EPOCHS.get(args.dataset, 100)
    args.lr = DEFAULT_LR.get(args.dataset, 3e-4) if args.lr is None else args.lr
    args.split_seed = args.seed if args.split_seed is None else args.split_seed
    if args.img_size % 32:
        parser.error(f"--img-size: expected a multiple of 32 (smp encoders downsample 32x), got {args.img_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available; use --device cpu or auto")
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.amp == "fp16" and not on_cuda:
        parser.error("--amp fp16 needs CUDA; on CPU use --amp bf16 or --amp off")
    for name in ("lr", "weight_decay", "aux_weight", "min_lr_ratio", "w_main", "w_edge", "w_fused"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a number >= 0, got {getattr(args, name)}")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The three splits (``TransformedSubset``s: ``names``, ``tags``, ``in_channels``) and their source."""

    train: ld.TransformedSubset
    val: ld.TransformedSubset
    test: ld.TransformedSubset
    split: dict[str, list[str]]
    in_channels: int


def build_data(args: argparse.Namespace, ctx: tu.DistContext) -> Data:
    """Dataset → optional ``--limit`` subset → split (rank 0 creates ``split.json``) → train/val/test subsets."""
    kwargs: dict[str, Any] = {}
    if args.dataset == "synthetic":
        kwargs = {"n": min(args.synthetic_n, args.limit or args.synthetic_n)}
    elif args.dataset == "folder":
        kwargs = {"mask_suffix": args.mask_suffix, "channels": args.channels}
    try:
        dataset: Any = ld.build_dataset(
            args.dataset, root=args.root, images=args.images, masks=args.masks, img_size=args.img_size, **kwargs
        )
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if args.limit and len(dataset) > args.limit:
        rng = np.random.default_rng(args.split_seed)
        dataset = ld.TransformedSubset(dataset, sorted(rng.choice(len(dataset), args.limit, replace=False).tolist()))
    split_file = Path(args.split_file) if args.split_file else Path(args.out) / "split.json"
    labels = dataset.tags if args.dataset == "busi" else None  # stratify BUSI by class
    split: dict[str, list[str]] = {}
    for rank_turn in (True, False):  # rank 0 writes the file first, the others then read it
        if ctx.is_main == rank_turn:
            try:
                split = ld.get_or_create_split(dataset.names, split_file, seed=args.split_seed, labels=labels)
            except (FileNotFoundError, ValueError) as exc:
                raise UsageError(str(exc)) from exc
        ctx.barrier()
    indices = ld.split_indices(dataset.names, split)
    if args.dataset == "busi" and not args.include_normal:
        for key in ("train", "val"):
            indices[key] = [i for i in indices[key] if dataset.tags[i] != "normal"]
    empty = [key for key, idx in indices.items() if not idx]
    if empty:
        raise UsageError(f"split {empty} is empty ({len(dataset)} samples); use more data or a larger --limit")
    transform = ld.train_transforms(dataset.in_channels, args.img_size)
    return Data(
        train=ld.TransformedSubset(dataset, indices["train"], transform),
        val=ld.TransformedSubset(dataset, indices["val"]),
        test=ld.TransformedSubset(dataset, indices["test"]),
        split=split,
        in_channels=dataset.in_channels,
    )


def build_model(args: argparse.Namespace, in_channels: int) -> nn.Module:
    """The smp model, wrapped with the ADST head unless ``--no-adst``."""
    model = smp.create_model(
        args.arch, encoder_name=args.encoder, encoder_weights=args.encoder_weights, in_channels=in_channels, classes=1
    )
    if args.no_adst:
        return model
    return wrap_with_adst(
        model,
        tap=args.tap,
        head_stride=args.head_stride,
        fusion=args.fusion,
        hidden_channels=args.hidden_channels,
        feature_grad=args.feature_grad,
    )


def build_criterion(args: argparse.Namespace) -> ADSTLoss:
    """ADSTLoss; on the baseline's plain logits it is the same Dice + BCE mask loss alone."""
    w = args.aux_weight
    losses = {"dicebce": DiceBCELoss, "bce": nn.BCEWithLogitsLoss}
    base = losses[args.base_loss]()
    fused = None if args.fused_loss == "base" else losses[args.fused_loss]()
    return ADSTLoss(base, fused_loss=fused, w_main=w * args.w_main, w_edge=w * args.w_edge, w_fused=w * args.w_fused)


def make_loader(
    subset: ld.TransformedSubset,
    args: argparse.Namespace,
    ctx: tu.DistContext,
    *,
    train: bool,
    generator: Any,
    target_kwargs: dict[str, float] | None = None,
) -> DataLoader:
    """Loader of ``(index, image, mask)``; DistributedSampler under DDP (padded, so evaluation drops duplicates).

    With ``target_kwargs`` each batch also carries its ADST ``(core, border)`` targets, built in the workers.
    """
    dataset = tu.IndexedDataset(subset)
    sampler: Any
    if ctx.distributed:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=train, seed=args.seed)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=train and len(sampler) >= args.batch_size,  # no 1-image BatchNorm batches
        worker_init_fn=tu.worker_init_fn,
        generator=generator,  # also seeds the workers: augmentation does not depend on the global RNG
        collate_fn=None if target_kwargs is None else tu.TargetCollate(**target_kwargs),
    )


# --------------------------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Session:
    """Everything a run builds once: data, model (``raw`` and, under DDP, its DDP wrapper), optimisation, loaders."""

    args: argparse.Namespace
    ctx: tu.DistContext
    run_dir: Path
    data: Data
    raw: nn.Module
    model: nn.Module
    criterion: ADSTLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_gen: torch.Generator
    loaders: dict[str, DataLoader]
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
    """What ``last.pt`` carries besides model/optimizer/scheduler/scaler states."""

    next_epoch: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    rng: dict[str, Any] | None = None


def _amp_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype else "off"


def _summary_dict(summary: dict[str, lm.MeanStd]) -> dict[str, dict[str, float]]:
    return {m: {"mean": s.mean, "std": s.std, "n": s.n} for m, s in summary.items()}


def setup(args: argparse.Namespace, ctx: tu.DistContext) -> Session:
    """Seed, build data/model/optimizer/cosine schedule/scaler/loaders (the model is not DDP-wrapped yet)."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True, warn_only=True)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
    amp_dtype = tu.resolve_amp(args.amp, ctx.device)
    run_dir = Path(args.out)
    tu.seed_everything(args.seed)
    data = build_data(args, ctx)  # before creating the run folder: bad data leaves nothing behind
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    raw = build_model(args, data.in_channels).to(ctx.device)
    tu.seed_everything(args.seed + ctx.rank)  # ranks differ in augmentation only; DDP copies rank 0's weights
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(raw.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    train_gen = torch.Generator()
    criterion = build_criterion(args)
    target_kwargs = None if args.no_adst else criterion.target_kwargs  # ADST targets come from the workers
    loaders = {
        "train": make_loader(data.train, args, ctx, train=True, generator=train_gen, target_kwargs=target_kwargs)
    }
    for key in ("val", "test"):  # own fixed generator: evaluation never draws from the global RNG
        loaders[key] = make_loader(getattr(data, key), args, ctx, train=False, generator=torch.Generator())
    steps = min(len(loaders["train"]), args.max_steps or len(loaders["train"]))
    total = steps * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: tu.cosine_factor(s, total, args.min_lr_ratio))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype is torch.float16)
    return Session(
        args, ctx, run_dir, data, raw, raw, criterion, optimizer, scheduler, scaler, amp_dtype,
        train_gen, loaders, steps,
    )  # fmt: skip


def restore(s: Session) -> TrainState:
    """Load ``last.pt`` into the session; returns where to continue (RNG states are applied later)."""
    ckpt = tu.load_checkpoint(s.run_dir / "last.pt")
    s.raw.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    if s.scaler.is_enabled() and ckpt["scaler"]:
        s.scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"]
    s.log(f"resuming {s.run_dir} after epoch {ckpt['epoch']} (best val Dice {ckpt['best_score']:.4f})")
    return TrainState(
        next_epoch=ckpt["epoch"] + 1,
        history=list(ckpt["history"]),
        best_score=ckpt["best_score"],
        best_epoch=ckpt["best_epoch"],
        rng=rngs[s.ctx.rank] if len(rngs) == s.ctx.world_size else rngs[0],
    )


def run_epoch(s: Session, state: TrainState, epoch: int) -> tuple[dict[str, Any], dict[str, lm.MeanStd]]:
    """Train one epoch and validate; appends the log row to ``state.history`` and updates the best score."""
    args, t0 = s.args, time.perf_counter()
    s.criterion.aux_scale = tu.fade_factor(args.aux_fade, epoch - 1, args.epochs)
    # Shuffle order and worker seeds from (seed, epoch, rank) alone, so a resumed epoch replays exactly.
    s.train_gen.manual_seed(tu.epoch_seed(args.seed, epoch, s.ctx.rank))
    sampler = s.loaders["train"].sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    row: dict[str, Any] = {"epoch": epoch}
    row |= tu.train_one_epoch(
        s.model, s.loaders["train"], s.criterion, s.optimizer, s.scheduler, s.scaler, s.ctx, s.amp_dtype,
        steps=s.steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", progress=s.progress,
    )  # fmt: skip
    val, val_loss = tu.evaluate(
        s.raw, s.loaders["val"], s.data.val.names, s.data.val.tags, s.ctx, s.amp_dtype, ("dice", "iou"), s.criterion,
        desc="val", progress=s.progress,
    )  # fmt: skip
    summary = val.summary()
    is_best = state.best_epoch == 0 or summary["dice"].mean > state.best_score
    if is_best:
        state.best_score, state.best_epoch = summary["dice"].mean, epoch
    row |= {
        "lr": s.scheduler.get_last_lr()[0],
        "aux_scale": s.criterion.aux_scale if s.adst else None,
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


def save_epoch(s: Session, state: TrainState, row: dict[str, Any], val: dict[str, lm.MeanStd]) -> None:
    """``best.pt`` (if best), ``last.pt``, logs and curves. Every rank calls it (RNG states are gathered)."""
    rng = s.ctx.all_gather_object(tu.get_rng_state(s.ctx.device))  # after everything that drew random numbers
    if not s.ctx.is_main:
        return
    base = {"format": tu.CHECKPOINT_FORMAT, "epoch": row["epoch"], "model": s.raw.state_dict()}
    meta = {"config": vars(s.args), "adst": s.adst}
    if row["is_best"]:
        tu.save_checkpoint(s.run_dir / "best.pt", {**base, "val": _summary_dict(val), **meta})
    last = {
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "scaler": s.scaler.state_dict(),
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "rng": rng,
    }
    tu.save_checkpoint(s.run_dir / "last.pt", {**base, **last, **meta})
    tu.write_log(s.run_dir, state.history)
    tu.plot_curves(state.history, s.run_dir / "curves.png", s.name)
    terms = " ".join(f"{k[6:]} {v:.4f}" for k, v in row.items() if k.startswith("train_") and k != "train_dice")
    s.log(
        f"epoch {row['epoch']}/{s.args.epochs}  loss[{terms}]  val Dice {row['val_dice']:.4f} IoU {row['val_iou']:.4f}"
        f"{'  *best*' if row['is_best'] else ''}  ({row['time_s']:.1f} s)"
    )


def export_best(s: Session) -> nn.Module:
    """Best-on-val weights → plain smp model → ``exported/`` (rank 0) → reloaded with ``smp.from_pretrained``."""
    s.ctx.barrier()  # best.pt is complete
    s.raw.load_state_dict(tu.load_checkpoint(s.run_dir / "best.pt")["model"])
    export_dir = s.run_dir / "exported"
    if s.ctx.is_main:
        plain = s.raw.export() if s.adst else copy.deepcopy(s.raw).eval()
        plain = plain.cpu()
        plain.config["encoder_weights"] = None  # the weights are in the folder: reloading downloads nothing
        plain.save_pretrained(str(export_dir), dataset=s.args.dataset)
    s.ctx.barrier()
    return smp.from_pretrained(str(export_dir)).to(s.ctx.device).eval()


def _overlays(s: Session, exported: nn.Module, test: lm.MetricAccumulator) -> None:
    """A few evenly spaced test images: image, truth, exported model's prediction, ADST maps of the best wrapper."""
    dice = dict(zip(test.names, test.values["dice"], strict=True))
    count = min(OVERLAY_IMAGES, len(s.data.test))
    picks = sorted({int(i) for i in np.linspace(0, len(s.data.test) - 1, count).round()})
    rows = []
    with torch.no_grad():
        for i in picks:
            image, mask = s.data.test[i]
            batch = image[None].to(s.ctx.device)
            prob = exported(batch).float().sigmoid()[0, 0].cpu().numpy()
            maps = {}
            if s.adst:
                out = s.raw.eval().forward_adst(batch)
                maps = {k: getattr(out, k).float().sigmoid()[0, 0].cpu().numpy() for k in ("main", "edge", "fused")}
            img = image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy()
            name = s.data.test.names[i]
            rows.append(tu.OverlayRow(name, img, mask[0].numpy(), prob, dice.get(name, math.nan), maps))
    tu.plot_overlays(rows, s.run_dir / "overlays.png", f"{s.name}, test split")


def final_test(s: Session, state: TrainState, timing: dict[str, float], t_start: float) -> dict[str, Any]:
    """Test metrics of the reloaded exported model; rank 0 writes metrics.json, overlays.png and the model card."""
    t0 = time.perf_counter()
    exported = export_best(s)
    test, _ = tu.evaluate(
        exported, s.loaders["test"], s.data.test.names, s.data.test.tags, s.ctx, s.amp_dtype,
        desc="test", progress=s.progress,
    )  # fmt: skip
    order = {name: i for i, name in enumerate(s.data.test.names)}
    keep = sorted(range(len(test)), key=lambda i: order[test.names[i]])  # split order, whatever the ranks did
    per_image: dict[str, list[Any]] = {"name": [test.names[i] for i in keep], "tag": [test.tags[i] for i in keep]}
    per_image |= {m: [test.values[m][i] for i in keep] for m in lm.METRIC_NAMES}
    best = tu.load_checkpoint(s.run_dir / "best.pt")
    result: dict[str, Any] = {
        "dataset": s.args.dataset,
        "variant": "adst" if s.adst else "baseline",
        "run_dir": str(s.run_dir),
        "test": _summary_dict(test.summary()),
    }
    if s.args.dataset == "busi":
        result["test_without_normal"] = _summary_dict(test.summary(exclude={"normal"}))
    result |= {
        "best_epoch": best["epoch"],
        "best_val": best["val"],
        "per_image": per_image,
        "params": {"train": tu.count_parameters(s.raw), "exported": tu.count_parameters(exported)},
        "timing": {
            **timing,
            "s_per_epoch": float(np.mean([row["time_s"] for row in state.history])),
            "test_s": time.perf_counter() - t0,
        },
        "world_size": s.ctx.world_size,
        "device": str(s.ctx.device),
        "amp": _amp_name(s.amp_dtype),
        "config": vars(s.args),
    }
    if s.ctx.is_main:
        _overlays(s, exported, test)
        means = {m: round(v["mean"], 4) for m, v in result["test"].items()}
        exported.generate_model_card(metrics=means, dataset=s.args.dataset).save(str(s.run_dir / "exported/README.md"))
        result["timing"]["total_s_this_session"] = time.perf_counter() - t_start
        tu.write_json(s.run_dir / "metrics.json", result)
        s.log(f"test ({len(test)} images): {test.format()}")
        if s.args.dataset == "busi":
            s.log(f"test without normal: {test.format(exclude={'normal'})}")
    s.ctx.barrier()
    return result


def _config(s: Session) -> dict[str, Any]:
    return {
        "args": vars(s.args),
        "world_size": s.ctx.world_size,
        "device": str(s.ctx.device),
        "amp": _amp_name(s.amp_dtype),
        "in_channels": s.data.in_channels,
        "sizes": {"train": len(s.data.train), "val": len(s.data.val), "test": len(s.data.test)},
        "versions": {"torch": torch.__version__, "smp": smp.__version__, "adst_plugin": adst_plugin.__version__},
        "command": sys.argv,
    }


def run(args: argparse.Namespace, ctx: tu.DistContext) -> dict[str, Any]:
    """Train, select on val, export, reload, test. Returns the metrics dict (on every rank)."""
    t_start = time.perf_counter()
    s = setup(args, ctx)
    if args.resume:
        state = restore(s)
    else:
        state = TrainState()
        if ctx.is_main:
            tu.write_json(s.run_dir / "config.json", _config(s))
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        s.model = DistributedDataParallel(s.raw, device_ids=ids, find_unused_parameters=False)
    s.log(
        f"{s.name}: {args.arch}/{args.encoder} ({tu.count_parameters(s.raw) / 1e6:.2f} M params), train "
        f"{len(s.data.train)} / val {len(s.data.val)} / test {len(s.data.test)} at {args.img_size}px, "
        f"{ctx.world_size} x {ctx.device}, amp {_amp_name(s.amp_dtype)} → {s.run_dir}"
    )
    if state.rng is not None:
        tu.set_rng_state(state.rng, ctx.device)  # last: nothing after this may draw before the first epoch
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
    ctx = tu.setup_distributed(args.device)
    try:
        return run(args, ctx)
    finally:
        tu.teardown_distributed(ctx)


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"train.py: error: {error}")
