"""Helpers of ``examples/train.py``: seeding, DDP, AMP, checkpoints, logs and plots.

Kept free of argparse and of the training loop so that each piece can be tested and reused on its own.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lesion_metrics as lm
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from adst_plugin import ADSTLoss, ADSTOutput
from adst_plugin.targets import adst_targets

__all__ = [
    "CHECKPOINT_FORMAT",
    "DistContext",
    "IndexedDataset",
    "OverlayRow",
    "TargetCollate",
    "autocast",
    "batch_dice",
    "cosine_factor",
    "count_parameters",
    "epoch_seed",
    "evaluate",
    "fade_factor",
    "get_rng_state",
    "load_checkpoint",
    "plot_curves",
    "plot_overlays",
    "resolve_amp",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "setup_distributed",
    "teardown_distributed",
    "train_one_epoch",
    "worker_init_fn",
    "write_json",
    "write_log",
]

#: Tag stored in every checkpoint written by train.py (bumped if the layout changes).
CHECKPOINT_FORMAT = "adst-train-v1"


# --------------------------------------------------------------------------------------------------------------------
# Seeding and RNG state
# --------------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed that depends only on ``(seed, epoch, rank)``, so that an epoch's shuffle does not depend on history."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def worker_init_fn(worker_id: int) -> None:
    """Seed NumPy and ``random`` in a DataLoader worker from the torch seed that the loader gave it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """RNG states as plain lists and tensors, so that checkpoints load with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
        "cuda": None,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# --------------------------------------------------------------------------------------------------------------------
# Device, AMP and DDP
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` / ``world_size`` (1 without DDP) and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """True when a process group is used."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """``dist.barrier()`` under DDP, nothing otherwise."""
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """Mean over ranks of a dict of floats (same keys on every rank)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA if available else CPU; ``cuda`` picks ``cuda:<local_rank>``.

    Raises:
        ValueError: ``cuda`` asked for but not available, or an unknown name.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def setup_distributed(device_name: str) -> DistContext:
    """Read torchrun's environment; with ``WORLD_SIZE > 1`` join the process group (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistContext(rank, world_size, local_rank, device)


def teardown_distributed(ctx: DistContext) -> None:
    """Leave the process group (only if this process is part of one)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp``: ``auto`` is bf16 on CUDA when supported, else fp16 on CUDA, off on CPU.

    Raises:
        ValueError: unknown mode, or fp16 requested off CUDA (CPU autocast supports bf16 only).
    """
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16 or --amp off")
        return torch.float16
    raise ValueError(f"--amp: expected auto, bf16, fp16 or off, got {mode!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """``torch.autocast`` for ``dtype``, or a disabled one when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# --------------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------------


def cosine_factor(step: int, total: int, min_ratio: float) -> float:
    """Cosine decay of the learning-rate factor from 1 (step 0) to ``min_ratio`` (step ``total``)."""
    progress = min(step, total) / max(total, 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fade_factor(mode: str, epoch: int, epochs: int) -> float:
    """``aux_scale`` of 0-based ``epoch``: 1 throughout (``none``), or faded from 1 (first) to 0 (last epoch)."""
    if mode == "none" or epochs <= 1:
        return 1.0
    t = epoch / (epochs - 1)
    if mode == "linear":
        return 1.0 - t
    if mode == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"--aux-fade: expected none, linear or cosine, got {mode!r}")


# --------------------------------------------------------------------------------------------------------------------
# Data, models, files
# --------------------------------------------------------------------------------------------------------------------


class IndexedDataset(Dataset[tuple[int, Tensor, Tensor]]):
    """Yield ``(index, image, mask)`` so that evaluation knows each image's name and tag."""

    def __init__(self, dataset: Dataset[tuple[Tensor, Tensor]]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Tensor, Tensor]:
        image, mask = self.dataset[index]
        return index, image, mask


class TargetCollate:
    """Collate ``(index, image, mask)`` samples and add the ADST targets of the batch's (augmented) masks.

    Used as the training DataLoader's ``collate_fn``, so the targets are built in the worker processes, in
    parallel with the training step, instead of on its critical path (on CUDA the loss would otherwise copy the
    masks to the host and back every step). Picklable, so it works with any worker start method.

    Shape:
        -> ``(index (B,), images (B, C, H, W), masks (B, 1, H, W), (core, border) each (B, 1, H, W) float32)``
    """

    def __init__(self, **target_kwargs: float) -> None:
        self.target_kwargs = target_kwargs

    def __call__(
        self, samples: list[tuple[int, Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        index, images, masks = default_collate(samples)
        return index, images, masks, adst_targets(masks, **self.target_kwargs)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename, so a kill during the write never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a train.py checkpoint on the CPU (plain tensors and lists only, so ``weights_only=True`` is safe).

    ``load_state_dict`` of modules and optimizers moves the tensors to their parameters' device.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a train.py checkpoint.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"'{path}' is not a train.py checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def _jsonable(obj: Any) -> Any:
    # Strict JSON has no NaN/inf: write them as null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (NaN → null), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_log(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``log.csv`` and ``log.json`` from the full history (one row per epoch).

    Rewriting instead of appending keeps the logs exact after ``--resume``: the history lives in the checkpoint.
    """
    write_json(run_dir / "log.json", list(history))
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    tmp = run_dir / "log.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    os.replace(tmp, run_dir / "log.csv")


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


# --------------------------------------------------------------------------------------------------------------------
# Training and evaluation loops
# --------------------------------------------------------------------------------------------------------------------


def _float_outputs(outputs: Any) -> Any:
    # The loss runs outside autocast, in float32, whatever dtype the forward produced.
    if isinstance(outputs, ADSTOutput):
        return ADSTOutput(*(t.float() if isinstance(t, Tensor) else t for t in outputs))
    return outputs.float()


def batch_dice(logits: Tensor, masks: Tensor) -> Tensor:
    """Mean hard Dice of a batch of logits (empty prediction and target count as 1), for progress display."""
    pred, target = logits > 0, masks > 0.5
    inter = (pred & target).sum((1, 2, 3)).float()
    denom = (pred.sum((1, 2, 3)) + target.sum((1, 2, 3))).float()
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)).mean()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: ADSTLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ctx: DistContext,
    amp_dtype: torch.dtype | None,
    *,
    steps: int,
    desc: str = "train",
    progress: bool = False,
) -> dict[str, float]:
    """``steps`` optimizer steps (LR scheduler stepped per step); mean loss terms and Dice over steps and ranks.

    Returns:
        ``{"train_<term>": mean}`` for every key of ``criterion.last_terms`` plus ``train_dice``.
    Raises:
        FloatingPointError: the mean loss is not finite.
    """
    device = ctx.device
    model.train()
    sums: dict[str, Tensor] = {}
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (_, images, masks, *precomputed) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            outputs = model(images)
        outputs = _float_outputs(outputs)
        # Targets built by TargetCollate in the workers (ADST runs); the loss builds them itself otherwise.
        targets = tuple(t.to(device, non_blocking=True) for t in precomputed[0]) if precomputed else None
        loss = criterion(outputs, masks, targets=targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        logits = outputs.masks if isinstance(outputs, ADSTOutput) else outputs
        # Summed on the device: no host sync per step unless a progress bar shows them.
        for key, value in {**criterion.last_terms, "dice": batch_dice(logits.detach(), masks)}.items():
            sums[key] = sums.get(key, torch.zeros((), device=device)) + value.float()
        bar.update()
        if progress:
            done = step + 1
            bar.set_postfix(loss=f"{sums['total'].item() / done:.4f}", dice=f"{sums['dice'].item() / done:.3f}")
    bar.close()
    means = {f"train_{k}": v.item() / max(steps, 1) for k, v in sums.items()}
    if not math.isfinite(means.get("train_total", 0.0)):
        raise FloatingPointError(f"{desc}: the training loss is not finite; lower --lr, or try --amp off")
    return ctx.all_reduce_mean(means)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    names: Sequence[str],
    tags: Sequence[str | None],
    ctx: DistContext,
    amp_dtype: torch.dtype | None,
    metrics: Sequence[str] = lm.METRIC_NAMES,
    criterion: ADSTLoss | None = None,
    *,
    desc: str = "eval",
    progress: bool = False,
) -> tuple[lm.MetricAccumulator, float]:
    """Per-image metrics of a loader of ``(index, image, mask)``, gathered over ranks, each image once.

    Args:
        names, tags: per dataset index (``subset.names`` / ``subset.tags``).
        criterion: if given, also the mean mask loss.
    Returns:
        The merged accumulator (identical on every rank) and the mean loss (``nan`` without ``criterion``).
    """
    model.eval()
    acc = lm.MetricAccumulator(metrics)
    loss_sum, count = 0.0, 0
    for index, images, masks in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        with autocast(ctx.device, amp_dtype):
            outputs = model(images.to(ctx.device, non_blocking=True))
        logits = (outputs[0] if isinstance(outputs, (tuple, list)) else outputs).float()
        if criterion is not None:
            loss_sum += criterion(logits, masks.to(ctx.device)).item() * len(index)
            count += len(index)
        ids = index.tolist()
        acc.update(logits.sigmoid().cpu(), masks, tags=[tags[i] for i in ids], names=[names[i] for i in ids])
    gathered = acc.gather()
    gathered.drop_duplicates()  # DistributedSampler pads the last ranks with repeated images
    totals = ctx.all_reduce_mean({"loss": loss_sum, "count": float(count)})
    return gathered, totals["loss"] / totals["count"] if totals["count"] else math.nan


# --------------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: runs on servers and in DDP workers
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Training loss terms and validation Dice/IoU per epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_total", "train_mask", "train_main", "train_edge", "train_fused", "val_loss"):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            style = "--" if key == "val_loss" else "-"
            ax_loss.plot(epochs, [math.nan if v is None else v for v in values], style, marker=".", label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend(fontsize=8)
    for key in ("val_dice", "val_iou", "train_dice"):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            ax_val.plot(epochs, [math.nan if v is None else v for v in values], marker=".", label=key)
    best = [row["epoch"] for row in history if row.get("is_best")]
    if best:
        ax_val.axvline(best[-1], color="gray", linestyle=":", label=f"best (epoch {best[-1]})")
    ax_val.set(xlabel="epoch", ylabel="score", title="Dice / IoU", ylim=(0, 1))
    ax_val.legend(fontsize=8)
    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class OverlayRow:
    """One test image of ``overlays.png``: image (H, W) gray or (H, W, 3) RGB, other arrays (H, W); ``maps`` holds
    ADST maps (probabilities)."""

    name: str
    image: np.ndarray
    target: np.ndarray
    prob: np.ndarray
    dice: float
    maps: dict[str, np.ndarray]


def plot_overlays(rows: Sequence[OverlayRow], path: Path, title: str = "") -> None:
    """Grid: image | ground truth | prediction (red, ground-truth contour green) | ADST maps, one row per image."""
    plt = _pyplot()
    map_names = list(rows[0].maps) if rows else []
    cols = 3 + len(map_names)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        ax = axes[r]
        ax[0].imshow(row.image, cmap="gray" if row.image.ndim == 2 else None, vmin=0, vmax=1)
        ax[0].set_title(row.name, fontsize=7)
        ax[1].imshow(row.target, cmap="gray", vmin=0, vmax=1)
        ax[1].set_title("ground truth", fontsize=7)
        pred = row.prob >= 0.5
        rgb = row.image if row.image.ndim == 3 else np.stack([row.image] * 3, axis=-1)  # RGB (H, W, 3) or gray (H, W)
        overlay = rgb.astype(np.float32).copy()
        overlay[pred] = 0.5 * overlay[pred] + 0.5 * np.array([1.0, 0.0, 0.0], dtype=np.float32)
        ax[2].imshow(overlay)
        if row.target.any():
            ax[2].contour(row.target, levels=[0.5], colors="lime", linewidths=0.8)
        ax[2].set_title(f"prediction (Dice {row.dice:.3f})", fontsize=7)
        for c, key in enumerate(map_names, start=3):
            ax[c].imshow(row.maps[key], cmap="magma", vmin=0, vmax=1)
            ax[c].set_title(f"ADST {key}", fontsize=7)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
