"""train.py's run: epochs of the engine with validation, checkpoints and logs; then export, reload and test.

Every rank runs :func:`run`; only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.utils.data import DistributedSampler

import adst_plugin
from adst_examples.metrics import MetricAccumulator
from adst_examples.stats import MeanStd
from adst_examples.training.batches import EpochSampler, epoch_seed, loader_batches
from adst_examples.training.checkpoints import (
    CHECKPOINT_FORMAT,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    write_json,
    write_log,
)
from adst_examples.training.distributed import DistContext, describe_device
from adst_examples.training.engine import fade_factor, train_epoch
from adst_examples.training.evaluation import (
    VALIDATION_METRICS,
    evaluate,
    head_maps,
    loader_eval_batches,
    selection_metric,
)
from adst_examples.training.models import count_params, export_model
from adst_examples.training.parts import RunParts, TrainState, build_parts, restore
from adst_examples.training.plots import OverlayRow, plot_curves, plot_overlays

__all__ = ["run"]

OVERLAY_IMAGES = 6


def _amp_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype else "off"


def _summary_dict(summary: dict[str, MeanStd]) -> dict[str, dict[str, Any]]:
    return {m: s.as_dict() for m, s in summary.items()}


def _evaluate(s: RunParts, model: nn.Module, split: str, **kwargs: Any) -> tuple[MetricAccumulator, float]:
    loader = s.val_loader if split == "val" else s.test_loader
    data = s.data.val if split == "val" else s.data.test
    return evaluate(
        model, loader_eval_batches(loader), device=s.ctx.device, amp_dtype=s.opt.amp_dtype, names=data.names,
        tags=data.tags, class_names=s.data.class_names, ctx=s.ctx, desc=split, progress=s.progress, **kwargs,
    )  # fmt: skip


def run_epoch(s: RunParts, state: TrainState, epoch: int) -> tuple[dict[str, Any], dict[str, MeanStd]]:
    """Train one epoch and validate; appends the log row to ``state.history`` and updates the best score."""
    args, t0 = s.args, time.perf_counter()
    aux_scale = fade_factor(args.aux_fade, epoch - 1, args.epochs)
    # Shuffle order and worker seeds from (seed, epoch, rank) alone, so a resumed epoch replays exactly.
    s.train_gen.manual_seed(epoch_seed(args.seed, epoch, s.ctx.rank))
    if isinstance(s.train_loader.sampler, (DistributedSampler, EpochSampler)):
        s.train_loader.sampler.set_epoch(epoch)
    row: dict[str, Any] = {"epoch": epoch}
    row |= train_epoch(
        s.trained, s.criterion, s.opt, loader_batches(s.train_loader, s.ctx.device), steps=s.steps_per_epoch,
        device=s.ctx.device, aux_scale=aux_scale, reduce=s.ctx.all_reduce_mean, desc=f"epoch {epoch}/{args.epochs}",
        progress=s.progress,
    )  # fmt: skip
    val, val_loss = _evaluate(s, s.model, "val", metrics=VALIDATION_METRICS, small_lesions=False, criterion=s.criterion)
    summary = val.summary()
    score = summary[selection_metric(summary)].mean
    is_best = state.best_epoch == 0 or score > state.best_score
    if is_best:
        state.best_score, state.best_epoch = score, epoch
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


def save_epoch(s: RunParts, state: TrainState, row: dict[str, Any], val: dict[str, MeanStd]) -> None:
    """``best.pt`` (if best), ``last.pt``, logs and curves. Every rank calls it (RNG states are gathered)."""
    rng = s.ctx.all_gather_object(get_rng_state(s.ctx.device))  # after everything that drew random numbers
    if not s.ctx.is_main:
        return
    base = {"format": CHECKPOINT_FORMAT, "epoch": row["epoch"], "model": s.model.state_dict()}
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
    skip = ("train_dice", "train_s")
    terms = " ".join(f"{k[6:]} {v:.4f}" for k, v in row.items() if k.startswith("train_") and k not in skip)
    s.log(
        f"epoch {row['epoch']}/{s.args.epochs}  loss[{terms}]  val Dice {row['val_dice']:.4f} IoU {row['val_iou']:.4f}"
        f"{'  *best*' if row['is_best'] else ''}  ({row['time_s']:.1f} s)"
    )


def export_best(s: RunParts) -> nn.Module:
    """Best-on-val weights → plain smp model → ``exported/`` (rank 0) → reloaded with ``smp.from_pretrained``."""
    s.ctx.barrier()  # best.pt is complete
    s.model.load_state_dict(load_checkpoint(s.run_dir / "best.pt")["model"])
    export_dir = s.run_dir / "exported"
    if s.ctx.is_main:
        plain = export_model(s.model).cpu()
        plain.config["encoder_weights"] = None  # the weights are in the folder: reloading downloads nothing
        plain.save_pretrained(str(export_dir), dataset=s.args.dataset)
    s.ctx.barrier()
    return smp.from_pretrained(str(export_dir)).to(s.ctx.device).eval()


def _overlays(s: RunParts, exported: nn.Module, test: MetricAccumulator) -> None:
    """A few evenly spaced test images: image, truth, exported model's prediction, ADST maps of the best wrapper."""
    dice = dict(zip(test.names, test.values["dice"], strict=True))
    count = min(OVERLAY_IMAGES, len(s.data.test))
    picks = sorted({int(i) for i in np.linspace(0, len(s.data.test) - 1, count).round()})
    rows = []
    with torch.no_grad():
        for i in picks:
            _, image, mask = s.data.test[i]
            batch = image[None].to(s.ctx.device)
            logits = exported(batch).float()
            # Lesion probability: the sigmoid, or 1 - P(background) of a multi-class model.
            prob = (logits.sigmoid()[0, 0] if logits.shape[1] == 1 else 1 - logits.softmax(1)[0, 0]).cpu().numpy()
            # The ADST maps of the last class (the only one of a binary model).
            maps = {key: value[0, -1].cpu().numpy() for key, value in head_maps(s.model, batch).items()}
            mask = (mask > 0).reshape(1, *image.shape[-2:]).float()  # any lesion
            img = image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy()
            name = s.data.test.names[i]
            row = OverlayRow(name, img, mask[0].numpy(), prob, dice.get(name, math.nan), maps)
            rows.append(row)
    plot_overlays(rows, s.run_dir / "overlays.png", f"{s.name}, test split")


def _split_result(acc: MetricAccumulator, key: str, lesion_free: str | None) -> dict[str, Any]:
    """``{key: per-image summary, key_pooled: small-lesion scores}``, and the same without the lesion-free tag."""
    out: dict[str, Any] = {key: _summary_dict(acc.summary()), f"{key}_pooled": acc.pooled()}
    if lesion_free is not None:
        out[f"{key}_without_{lesion_free}"] = _summary_dict(acc.summary(exclude={lesion_free}))
    return out


def final_test(s: RunParts, state: TrainState, timing: dict[str, float], t_start: float) -> dict[str, Any]:
    """Validation and test metrics of the reloaded exported model; rank 0 writes metrics.json, overlays.png and the
    model card."""
    t0 = time.perf_counter()
    exported = export_best(s)
    val, _ = _evaluate(s, exported, "val")
    test, _ = _evaluate(s, exported, "test")
    order = {name: i for i, name in enumerate(s.data.test.names)}
    keep = sorted(range(len(test)), key=lambda i: order[test.names[i]])  # split order, whatever the ranks did
    per_image: dict[str, list[Any]] = {"name": [test.names[i] for i in keep], "tag": [test.tags[i] for i in keep]}
    per_image |= {m: [test.values[m][i] for i in keep] for m in test.columns}
    best = load_checkpoint(s.run_dir / "best.pt")
    lesion_free = s.data.lesion_free_tag
    timed = state.history[1:] if len(state.history) > 1 else state.history  # epoch 1 holds the warm-up
    result: dict[str, Any] = {
        "dataset": s.args.dataset,
        "variant": "adst" if s.adst else "baseline",
        "run_dir": str(s.run_dir),
        **_split_result(test, "test", lesion_free),
        **_split_result(val, "val", None),
        "best_epoch": best["epoch"],
        "best_val": best["val"],
        "steps_per_epoch": s.steps_per_epoch,
        "per_image": per_image,
        "params": {"train": count_params(s.model), "exported": count_params(exported)},
        "timing": {
            **timing,
            "s_per_epoch": float(np.mean([row["time_s"] for row in timed])),
            "s_per_step": float(np.mean([row.get("train_s", math.nan) for row in timed])) / s.steps_per_epoch,
            "test_s": time.perf_counter() - t0,
        },
        "world_size": s.ctx.world_size,
        "device": str(s.ctx.device),
        "amp": _amp_name(s.opt.amp_dtype),
        "config": vars(s.args),
        "history": state.history,
    }
    if s.ctx.is_main:
        _overlays(s, exported, test)
        means = {m: round(v["mean"], 4) for m, v in result["test"].items()}
        exported.generate_model_card(metrics=means, dataset=s.args.dataset).save(str(s.run_dir / "exported/README.md"))
        result["timing"]["total_s_since_start"] = time.perf_counter() - t_start
        write_json(s.run_dir / "metrics.json", result)
        s.log(f"test ({len(test)} images): {test.format()}")
        if lesion_free is not None:
            s.log(f"test without {lesion_free}: {test.format(exclude={lesion_free})}")
    s.ctx.barrier()
    return result


def _config(s: RunParts) -> dict[str, Any]:
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
    s = build_parts(args, ctx)
    if args.resume:
        state = restore(s)
    else:
        state = TrainState()
        if ctx.is_main:
            write_json(s.run_dir / "config.json", _config(s))
    s.log(
        f"{s.name}: {args.arch}/{args.encoder} ({count_params(s.model) / 1e6:.2f} M params), train "
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
    timing = {"train_s_since_start": time.perf_counter() - t_train}
    return final_test(s, state, timing, t_start)
