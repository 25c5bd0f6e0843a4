"""One study run: train on the cached data with the engine, keep the best-on-validation weights, then evaluate the
exported plain model on validation and test. What ``OUT/runs/<dataset>/<arm>/seed<k>/result.json`` holds."""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from adst_examples.data import train_transforms
from adst_examples.data.cache import CachedData
from adst_examples.studylib.config import StudyConfig
from adst_examples.studylib.plan import Job
from adst_examples.training.batches import cached_eval_batches, cached_train_batches
from adst_examples.training.checkpoints import seed_everything
from adst_examples.training.distributed import place_model, resolve_amp
from adst_examples.training.engine import Optimisation, default_lr, steps_per_epoch, train_epoch
from adst_examples.training.evaluation import VALIDATION_METRICS, evaluate, selection_metric
from adst_examples.training.models import build_criterion, build_model, export_model, head_settings

__all__ = ["build_run", "train_run"]


def build_run(
    job: Job, data: CachedData, cfg: StudyConfig, device: torch.device
) -> tuple[nn.Module, nn.Module, Optimisation, int]:
    """The seeded model, its loss, the optimisation over the run's steps, and the steps per epoch."""
    args = argparse.Namespace(**cfg.model_args[job.arm])
    seed_everything(job.seed)  # the initialisation depends on the seed alone, as in train.py
    model = place_model(build_model(args, data.in_channels, data.num_classes), device, channels_last=cfg.channels_last)
    criterion = build_criterion(args, model, data.num_classes).to(device)
    steps = steps_per_epoch(len(data.split["train"]), cfg.batch_size, cfg.max_steps)
    lr = cfg.lr if cfg.lr is not None else default_lr(job.dataset)
    opt = Optimisation.build(
        model, lr=lr, total_steps=steps * cfg.epochs[job.dataset], device=device,
        amp_dtype=resolve_amp(cfg.amp, device), weight_decay=cfg.weight_decay, min_lr_ratio=cfg.min_lr_ratio,
    )  # fmt: skip
    return model, criterion, opt, steps


def _split_metrics(model: nn.Module, data: CachedData, key: str, cfg: StudyConfig, opt: Optimisation,
                   device: torch.device, **kwargs: Any) -> Any:  # fmt: skip
    acc, _ = evaluate(
        model, cached_eval_batches(data, key, cfg.batch_size), device=device, amp_dtype=opt.amp_dtype,
        names=data.names, tags=data.tags, class_names=data.class_names, **kwargs,
    )  # fmt: skip
    return acc


def train_run(
    job: Job,
    data: CachedData,
    cfg: StudyConfig,
    device: torch.device,
    *,
    deadline: float | None = None,
    parallel: int = 1,
    on_epoch: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | None:
    """Train and evaluate one run; the result dict (what result.json holds), or ``None`` if it hit ``deadline``."""
    t_start = time.perf_counter()
    epochs = cfg.epochs[job.dataset]
    model, criterion, opt, steps = build_run(job, data, cfg, device)
    batch = min(cfg.batch_size, len(data.split["train"]))
    transform = train_transforms(data.in_channels, data.size) if cfg.augment else None
    best_score, best_epoch, best_state = -math.inf, 0, None
    history: list[dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        batches = cached_train_batches(data, seed=job.seed, epoch=epoch, batch_size=batch, steps=steps,
                                       transform=transform)  # fmt: skip
        row: dict[str, Any] = {
            "epoch": epoch,
            **train_epoch(model, criterion, opt, batches, steps=steps, device=device),
        }
        val = _split_metrics(model, data, "val", cfg, opt, device, metrics=VALIDATION_METRICS, small_lesions=False)
        summary = val.summary()
        score = summary[selection_metric(summary)].mean
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        row |= {"loss": row["train_total"], "val_dice": summary["dice"].mean, "val_iou": summary["iou"].mean}
        history.append(row | {"time_s": time.perf_counter() - t0})
        if on_epoch is not None:
            on_epoch(epoch, epochs)
        if cfg.patience and epoch - best_epoch >= cfg.patience:
            break
        if deadline is not None and epoch < epochs:
            per_epoch = float(np.mean([h["time_s"] for h in history]))
            if time.time() + (epochs - epoch) * per_epoch > deadline:
                return None
    t_eval = time.perf_counter()
    assert best_state is not None
    model.load_state_dict(best_state)
    plain = export_model(model).to(device).eval()  # the plain smp model, any auxiliary head left behind
    splits = {key: _split_metrics(plain, data, key, cfg, opt, device).means() for key in ("val", "test")}
    timed = history[1:] if len(history) > 1 else history  # the first epoch holds the warm-up (cudnn autotuning)
    return {
        "dataset": job.dataset,
        "arm": job.arm,
        "seed": job.seed,
        "arm_flags": cfg.arm_flags[job.arm],
        "model_args": {
            k: v for k, v in cfg.model_args[job.arm].items() if isinstance(v, (int, float, str, bool, type(None)))
        },
        "adst_config": head_settings(argparse.Namespace(**cfg.model_args[job.arm])),
        "epochs": epochs,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_val_dice": best_score,
        "steps_per_epoch": steps,
        "channels_last": cfg.channels_last,
        "lr": opt.optimizer.defaults["lr"],
        "history": history,
        "timing": {
            "s_per_step": float(np.sum([h["train_s"] for h in timed]) / (steps * len(timed))),
            "s_per_epoch": float(np.mean([h["time_s"] for h in timed])),
            "final_eval_s": time.perf_counter() - t_eval,
            "total_s": time.perf_counter() - t_start,
            "parallel": parallel,
        },
        "val": splits["val"],
        "test": splits["test"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
