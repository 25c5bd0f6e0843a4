"""The ADST study: every arm × dataset × seed on cached, on-device data, with paired intervals against the baseline.

::

    python examples/study.py --datasets busi,kvasir --arms baseline,adst,paper,legacy --seeds 5 \
        --epochs busi=50,kvasir=40 --img-size 256 --out runs/study --device cuda --measure-parallel --budget-min 8

What it does:

- **Data.** Each dataset is decoded once into a compact cache (:mod:`adst_examples.data.cache`: the original
  file bytes, decoded again at start; 37 MiB for BUSI + Kvasir-SEG at 256²), held on the device as ``uint8`` and
  augmented there. The split is the seeded, stratified one of train.py (``--split-seed``), shared by every run.
- **Runs.** An *arm* is a name and a string of model flags (:data:`ARMS`; ``--arm NAME=FLAGS`` adds one; peer arms
  come from ``adst_examples.peers.ARMS`` when that module exists). Every flag study.py does not know is passed to
  the model/criterion builder of train.py (``--arch``, ``--encoder``, ...), for every arm; the arm's own flags
  come last and win. Each run: AdamW, cosine LR per step, bf16 autocast on CUDA, validation Dice every epoch,
  the best-on-validation weights, optional early stopping (``--patience``), then validation and test metrics
  of the exported plain model. Seed ``k`` fixes initialisation, batch order and augmentation draws, so the runs
  of all arms with seed ``k`` are paired.
- **Order, concurrency, budget, resume.** Runs go seed by seed (every arm and dataset gets seed ``k`` before
  any gets ``k + 1``). ``--parallel N`` trains N runs at once on the device (N worker processes, each holding
  the decoded data); ``--measure-parallel`` times N = 1, 2, 4, 8 first and picks the smallest N within 5 % of
  the best throughput. ``--budget-min M`` starts no run that its measured seconds per epoch say would end after
  M minutes, and a run that falls behind stops (unsaved) at the deadline. Each finished run writes
  ``OUT/runs/<dataset>/<arm>/seed<k>/result.json``; a rerun skips those.
- **Report.** ``OUT/study.json`` and ``OUT/study.md``: per dataset and arm, test and validation Dice, IoU, HD95,
  boundary IoU, small-lesion recall and Dice (mean ± std over seeds); per arm against the baseline, the paired
  difference per seed, its mean, 95 % t-interval and better/n (``paired`` on test, ``paired_val`` on
  validation), and the training step-time ratio. **Rule, fixed before the runs: the default is the arm with the
  highest mean paired validation Dice difference; test is reported only.**
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch import nn
from tqdm.auto import tqdm

from adst_examples import lesion_scores as lsc
from adst_examples import stats
from adst_examples.cli import positive_int
from adst_examples.data import cache as dcache
from adst_examples.training.checkpoints import jsonable, write_json
from adst_examples.training.distributed import resolve_device
from adst_plugin.functional import mask_logits

__all__ = [
    "ARMS",
    "BASELINE",
    "METRICS",
    "Job",
    "arm_registry",
    "build_parser",
    "build_report",
    "format_markdown",
    "main",
    "plan_jobs",
]

#: The arms of the study: name → model flags (those of train.py's model/criterion builder).
ARMS: dict[str, str] = {
    "baseline": "--no-adst",
    "legacy": "--preset legacy",
    "paper": "--preset paper",
    "adst": "--preset adst",
}
BASELINE = "baseline"
#: Reported metrics; HD95 is a distance (lower is better), the others are overlaps/rates (higher is better).
METRICS: tuple[str, ...] = ("dice", "iou", "hd95", "boundary_iou", "small_recall", "small_dice")
LOWER_IS_BETTER = frozenset({"hd95"})
RULE = (
    "The default is chosen by the mean paired validation Dice difference against the baseline "
    "(datasets.<name>.arms.<arm>.paired_val.dice.mean); test metrics are reported, never used to choose."
)
DATA_DIRS = {"busi": "Dataset_BUSI_with_GT", "kvasir": "Kvasir-SEG", "isic2018": "ISIC2018"}


class UsageError(Exception):
    """A bad command line."""


def arm_registry() -> dict[str, str]:
    """:data:`ARMS` plus the peer arms of ``adst_examples.peers.ARMS`` (issue 12), when that module exists."""
    arms = dict(ARMS)
    if importlib.util.find_spec("adst_examples.peers") is not None:
        from adst_examples import peers

        arms.update(getattr(peers, "ARMS", {}))
    return arms


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """study.py's own flags; every other flag goes to the model/criterion builder."""
    p = argparse.ArgumentParser(
        prog="study.py",
        allow_abbrev=False,
        description="Train every arm on every dataset for several seeds; paired intervals against the baseline.",
        epilog="Any other flag goes to the model builder (see train.py --help, group 'model'), for every arm.",
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--datasets", default="synthetic", help="comma list: busi, kvasir, isic2018, synthetic")
    g.add_argument("--arms", default="baseline,adst", help="comma list of arm names (the baseline is always added)")
    g.add_argument(
        "--arm", action="append", default=[], metavar="NAME=FLAGS", help="define an arm, e.g. 'mine=--preset adst'"
    )
    g.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..S-1")
    g.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds (overrides --seeds)")
    g.add_argument("--epochs", default="50", help="epochs: N, or per dataset, e.g. busi=50,kvasir=40")
    g.add_argument("--patience", type=int, default=0, help="stop after N epochs without a better val Dice (0: off)")
    g.add_argument("--img-size", type=positive_int, default=256, help="square input size (multiple of 32)")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--lr", type=float, help="peak learning rate [synthetic 1e-3, else 3e-4]")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final LR = lr * ratio (cosine per step)")
    g.add_argument("--max-steps", type=positive_int, help="at most N steps per epoch (smoke tests)")
    g.add_argument("--no-augment", action="store_true", help="no augmentation")

    g = p.add_argument_group("data")
    g.add_argument("--data-root", default="../shared/data", help="folder holding the datasets [%(default)s]")
    g.add_argument("--cache-dir", default="runs/cache", help="where the dataset caches live [%(default)s]")
    g.add_argument("--rebuild-cache", action="store_true")
    g.add_argument("--prepare-cache", action="store_true", help="build the caches of --datasets, then stop")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the shared train/val/test split")
    g.add_argument("--synthetic-n", type=positive_int, default=200, help="number of synthetic images")

    g = p.add_argument_group("runtime")
    g.add_argument("--out", default="runs/study", help="study folder")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="auto: bf16 on CUDA, off on CPU")
    g.add_argument("--parallel", type=positive_int, default=1, help="runs at once on the device")
    g.add_argument("--measure-parallel", action="store_true", help="time N = --parallel-candidates, pick N")
    g.add_argument("--parallel-candidates", default="1,2,4,8")
    g.add_argument("--bench-steps", type=positive_int, default=20, help="timed steps per worker in --measure-parallel")
    g.add_argument("--budget-min", type=float, help="start no run that would end after M minutes")
    g.add_argument("--threads", type=int, help="torch CPU threads per run [cores / parallel]")
    g.add_argument("--no-progress", action="store_true")
    return p


def _parse_epochs(text: str, datasets: Sequence[str]) -> dict[str, int]:
    text = text.strip()
    if "=" not in text:
        return dict.fromkeys(datasets, positive_int(text))
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = positive_int(value)
    missing = [d for d in datasets if d not in out]
    if missing:
        raise UsageError(f"--epochs: no epochs given for {missing}")
    return {d: out[d] for d in datasets}


def _model_parser() -> argparse.ArgumentParser:
    from adst_examples.training.models import add_model_arguments

    p = argparse.ArgumentParser(prog="study.py (model flags)", allow_abbrev=False, add_help=False)
    add_model_arguments(p)
    return p


def parse_model_flags(flags: Sequence[str], what: str) -> argparse.Namespace:
    """Model/criterion flags → the namespace of train.py's model builder; a bad flag raises :class:`UsageError`."""
    parser = _model_parser()
    try:
        args, unknown = parser.parse_known_args(list(flags))
    except SystemExit as exc:  # argparse already printed the reason
        raise UsageError(f"{what}: bad model flags {' '.join(flags)!r}") from exc
    if unknown:
        raise UsageError(f"{what}: unknown flags {unknown} (neither study.py's nor the model builder's)")
    from adst_examples.training.models import check_model_args

    try:
        check_model_args(args)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    return args


# --------------------------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One training run."""

    dataset: str
    arm: str
    seed: int

    @property
    def key(self) -> str:
        """``dataset/arm/seed<k>``."""
        return f"{self.dataset}/{self.arm}/seed{self.seed}"


def plan_jobs(datasets: Sequence[str], arms: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Seed-major order: every dataset and arm gets seed ``k`` before any gets seed ``k + 1``."""
    return [Job(d, a, s) for s in seeds for d in datasets for a in arms]


def run_dir(out: Path, job: Job) -> Path:
    """``OUT/runs/<dataset>/<arm>/seed<k>``."""
    return out / "runs" / job.dataset / job.arm / f"seed{job.seed}"


def estimate_seconds(job: Job, results: dict[Job, dict[str, Any]], epochs: int) -> float | None:
    """Seconds a run will take, from the s/epoch (and final evaluation) measured in finished runs.

    Same dataset and arm if any; else the slowest arm of the same dataset; else ``None`` (unknown: the run starts
    and is itself the measurement).
    """

    def cost(r: dict[str, Any]) -> float:
        return epochs * r["timing"]["s_per_epoch"] + r["timing"].get("final_eval_s", 0.0)

    same = [cost(r) for j, r in results.items() if j.dataset == job.dataset and j.arm == job.arm]
    if same:
        return float(np.mean(same))
    other = [cost(r) for j, r in results.items() if j.dataset == job.dataset]
    return float(max(other)) if other else None


# --------------------------------------------------------------------------------------------------------------------
# Training one run (in this process or in a worker)
# --------------------------------------------------------------------------------------------------------------------


def _amp_dtype(cfg: dict[str, Any], device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked (``bf16``), or by default on CUDA (``auto``); off otherwise."""
    return torch.bfloat16 if cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and device.type == "cuda") else None


def _train_step(
    model: nn.Module, criterion: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor, m: torch.Tensor,
    amp: torch.dtype | None,
) -> torch.Tensor:  # fmt: skip
    """One optimizer step of a study run (also what --measure-parallel times); returns the detached loss."""
    model.train()
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        outputs = model(x)
    loss = criterion(mask_logits(outputs).float(), m)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def _predict(model: nn.Module, data: dcache.CachedData, key: str, batch: int, amp: torch.dtype | None) -> torch.Tensor:
    """Boolean predictions (logits >= 0) of split ``key``, on the data's device."""
    model.eval()
    idx = data.split[key]
    preds = []
    for start in range(0, len(idx), batch):
        sel = idx[start : start + batch]
        x = data.images[sel].float() / 255.0
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            preds.append(mask_logits(model(x)).float() >= 0)
    return torch.cat(preds) if preds else torch.zeros(0, 1, data.size, data.size, dtype=torch.bool)


def _dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per image by smp.metrics, both empty = 1 (the convention of adst_examples.metrics)."""
    tp, fp, fn, tn = smp.metrics.get_stats(pred.long(), target.long(), mode="binary")
    return smp.metrics.f1_score(tp, fp, fn, tn, reduction="none", zero_division=1.0).flatten()


def _full_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean per-image Dice, IoU, precision, recall, HD95 and the lesion scores of one split."""
    from adst_examples.metrics import per_image_metrics

    p, t = pred.cpu(), target.cpu()
    per_image = per_image_metrics(p, t)
    out = {m: float(v.mean()) if len(v) else math.nan for m, v in per_image.items()}
    acc = lsc.LesionScoreAccumulator()
    acc.update(p, t)
    out |= acc.summary()
    out["images"] = float(len(p))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(
    job: Job,
    data: dcache.CachedData,
    model_args: argparse.Namespace,
    cfg: dict[str, Any],
    device: torch.device,
    *,
    deadline: float | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | None:
    """Train and evaluate one run; the result dict (what result.json holds), or ``None`` if it hit ``deadline``."""
    from adst_examples.training.models import build_criterion, build_model, export_model

    t_start = time.perf_counter()
    amp = _amp_dtype(cfg, device)
    epochs = cfg["epochs"][job.dataset]
    torch.manual_seed(job.seed)
    model = build_model(model_args, data.in_channels).to(device)
    criterion = build_criterion(model_args, model)
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    lr = cfg["lr"] if cfg["lr"] is not None else (1e-3 if job.dataset == "synthetic" else 3e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg["weight_decay"])
    train_idx = data.split["train"]
    bs = min(cfg["batch_size"], len(train_idx))
    steps = max(1, len(train_idx) // bs)
    if cfg["max_steps"]:
        steps = min(steps, cfg["max_steps"])
    total = steps * epochs
    # Per-step cosine from lr down to lr * min_lr_ratio, the schedule of train.py.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=lr * cfg["min_lr_ratio"])
    gen = torch.Generator().manual_seed(job.seed)  # batch order and augmentation draws
    aug = dcache.AugmentConfig() if cfg["augment"] else None
    val_target = data.masks[data.split["val"]]

    best_score, best_epoch, best_state = -math.inf, 0, None
    history: list[dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = train_idx[torch.randperm(len(train_idx), generator=gen).to(train_idx.device)]
        loss_sum = torch.zeros((), device=device)
        for step in range(steps):
            sel = order[step * bs : (step + 1) * bs]
            if aug is not None:
                x, m = dcache.augment(data.images[sel], data.masks[sel], gen, aug)
            else:
                x, m = data.images[sel].float() / 255.0, data.masks[sel].float()
            loss_sum += _train_step(model, criterion, optimizer, x, m, amp)
            scheduler.step()
        _sync(device)
        train_s = time.perf_counter() - t0
        mean_loss = loss_sum.item() / steps
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"{job.key}: training loss is not finite at epoch {epoch}")
        val_dice = float(_dice_per_image(_predict(model, data, "val", cfg["eval_batch"], amp), val_target).mean())
        if val_dice > best_score:
            best_score, best_epoch = val_dice, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(
            {
                "epoch": epoch,
                "loss": mean_loss,
                "val_dice": val_dice,
                "train_s": train_s,
                "time_s": time.perf_counter() - t0,
            }
        )
        if on_epoch is not None:
            on_epoch(epoch, epochs)
        if cfg["patience"] and epoch - best_epoch >= cfg["patience"]:
            break
        if deadline is not None and epoch < epochs:
            per_epoch = float(np.mean([h["time_s"] for h in history]))
            if time.time() + (epochs - epoch) * per_epoch > deadline:
                return None
    t_eval = time.perf_counter()
    assert best_state is not None
    model.load_state_dict(best_state)
    plain = export_model(model).to(device).eval()  # the plain smp model, any auxiliary head left behind
    result_splits = {}
    for key in ("val", "test"):
        pred = _predict(plain, data, key, cfg["eval_batch"], amp)
        result_splits[key] = _full_metrics(pred, data.masks[data.split[key]])
    final_eval_s = time.perf_counter() - t_eval
    timed = history[1:] if len(history) > 1 else history  # the first epoch holds the warm-up (cudnn autotuning)
    return {
        "dataset": job.dataset,
        "arm": job.arm,
        "seed": job.seed,
        "arm_flags": cfg["arm_flags"][job.arm],
        "model_args": {k: v for k, v in vars(model_args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "epochs": epochs,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_val_dice": best_score,
        "steps_per_epoch": steps,
        "lr": lr,
        "history": history,
        "timing": {
            "s_per_step": float(np.sum([h["train_s"] for h in timed]) / (steps * len(timed))),
            "s_per_epoch": float(np.mean([h["time_s"] for h in timed])),
            "final_eval_s": final_eval_s,
            "total_s": time.perf_counter() - t_start,
            "parallel": cfg.get("parallel", 1),
        },
        "val": result_splits["val"],
        "test": result_splits["test"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }


# --------------------------------------------------------------------------------------------------------------------
# Executors: in this process, or N worker processes sharing the device
# --------------------------------------------------------------------------------------------------------------------


def _load_datasets(cfg: dict[str, Any], device: torch.device) -> dict[str, dcache.CachedData]:
    return {name: dcache.load_cache(path).to(device) for name, path in cfg["cache_files"].items()}


def _setup_torch(cfg: dict[str, Any], device: torch.device, threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _run_and_save(job: Job, datasets: dict[str, dcache.CachedData], cfg: dict[str, Any], device: torch.device,
                  deadline: float | None) -> dict[str, Any] | None:  # fmt: skip
    model_args = argparse.Namespace(**cfg["model_args"][job.arm])
    result = train_run(job, datasets[job.dataset], model_args, cfg, device, deadline=deadline)
    if result is not None:
        write_json(Path(cfg["out"]) / "runs" / job.dataset / job.arm / f"seed{job.seed}" / "result.json", result)
    return result


def _bench(datasets: dict[str, dcache.CachedData], cfg: dict[str, Any], device: torch.device, spec: dict[str, Any],
           barrier: Any) -> float:  # fmt: skip
    """Time ``spec['steps']`` training steps after a warm-up, started together with the other workers."""
    from adst_examples.training.models import build_criterion, build_model

    data = datasets[spec["dataset"]]
    args = argparse.Namespace(**cfg["model_args"][spec["arm"]])
    torch.manual_seed(0)
    model = build_model(args, data.in_channels).to(device)
    criterion = build_criterion(args, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    amp = _amp_dtype(cfg, device)
    idx = data.split["train"]

    def step() -> None:
        sel = idx[torch.randint(len(idx), (cfg["batch_size"],), generator=gen).to(idx.device)]
        x, m = dcache.augment(data.images[sel], data.masks[sel], gen)
        _train_step(model, criterion, optimizer, x, m, amp)

    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    _sync(device)
    return time.perf_counter() - t0


def exit_with_parent() -> None:
    """In a spawned worker: exit as soon as the parent process is gone, however it died.

    Without this a ``kill`` of the study (SIGTERM or SIGKILL, which skip the clean-up that stops daemonic workers)
    leaves its workers training on, orphaned, competing with the next study for the device.
    """
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # waits on the parent's sentinel: returns when the parent has exited
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker_main(rank: int, cfg: dict[str, Any], barriers: dict[int, Any], jobs: Any, results: Any) -> None:
    """A worker process: load the data onto the device once, then take jobs until ``None``."""
    exit_with_parent()
    try:
        device = torch.device(cfg["device"])
        _setup_torch(cfg, device, cfg["threads"])
        datasets = _load_datasets(cfg, device)
        results.put(("ready", rank, None))
    except BaseException as exc:  # reported to the parent
        results.put(("error", rank, f"worker {rank} failed to start: {type(exc).__name__}: {exc}"))
        return
    while True:
        item = jobs.get()
        if item is None:
            return
        kind, payload = item
        if kind == "bench":
            try:
                results.put(("bench", rank, _bench(datasets, cfg, device, payload, barriers[payload["n"]])))
            except Exception as exc:  # reported to the parent
                results.put(("error", rank, f"bench {payload}: {_describe(exc)}"))
            continue
        job, deadline = Job(**payload["job"]), payload["deadline"]
        cfg["parallel"] = payload.get("parallel", cfg.get("parallel", 1))
        try:
            results.put(("done", rank, (payload["job"], _run_and_save(job, datasets, cfg, device, deadline))))
        except Exception as exc:  # one failed run (OOM, NaN loss, ...) is recorded; the study goes on
            results.put(("failed", rank, (payload["job"], _describe(exc))))
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _describe(exc: BaseException) -> str:
    import traceback

    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc)[-6:])}"


class WorkerPool:
    """``size`` spawned worker processes, one job queue per worker."""

    def __init__(self, size: int, cfg: dict[str, Any], barrier_sizes: Sequence[int] = ()) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(size)]
        barriers = {n: ctx.Barrier(n) for n in barrier_sizes}
        self.procs = [
            ctx.Process(target=_worker_main, args=(r, cfg, barriers, self.queues[r], self.results), daemon=True)
            for r in range(size)
        ]
        for proc in self.procs:
            proc.start()
        for _ in range(size):
            kind, _, payload = self._get()
            if kind == "error":
                self.close()
                raise RuntimeError(payload)
        self.busy: dict[int, dict[str, Any]] = {}
        self.active = size

    def _get(self, timeout: float | None = None) -> tuple[str, int, Any]:
        while True:
            try:
                return self.results.get(timeout=5.0 if timeout is None else timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    codes = [self.procs[r].exitcode for r in dead]
                    raise RuntimeError(f"worker(s) {dead} died (exit codes {codes})") from None
                if timeout is not None:
                    raise

    def bench(self, n: int, spec: dict[str, Any]) -> list[float]:
        """Run the benchmark on the first ``n`` workers at once; their timed seconds."""
        for r in range(n):
            self.queues[r].put(("bench", {**spec, "n": n}))
        times = []
        for _ in range(n):
            kind, _, payload = self._get()
            if kind == "error":
                raise RuntimeError(payload)
            times.append(payload)
        return times

    def shrink(self, n: int) -> None:
        """Keep the first ``n`` workers."""
        for r in range(n, self.active):
            self.queues[r].put(None)
        self.active = n

    def free(self) -> int | None:
        """A worker without a job, if any."""
        return next((r for r in range(self.active) if r not in self.busy), None)

    def submit(self, rank: int, job: Job, deadline: float | None) -> None:
        """Start ``job`` on worker ``rank``."""
        self.busy[rank] = asdict(job)
        self.queues[rank].put(("run", {"job": asdict(job), "deadline": deadline, "parallel": self.active}))

    def wait(self) -> tuple[Job, dict[str, Any] | str | None]:
        """The next finished job and its result (``None``: stopped at the deadline; a string: it failed)."""
        kind, rank, payload = self._get()
        if kind == "error":
            raise RuntimeError(payload)
        job_dict, result = payload
        self.busy.pop(rank, None)
        return Job(**job_dict), result

    def close(self) -> None:
        """Stop every worker."""
        for q in self.queues:
            q.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def _per_seed(runs: dict[int, dict[str, Any]], split: str, metric: str) -> dict[int, float | None]:
    """``{seed: value}`` of one metric on one split, the input of :func:`stats.paired`."""
    return {seed: r[split].get(metric) for seed, r in runs.items()}


def build_report(
    results: dict[Job, dict[str, Any]],
    datasets: Sequence[str],
    arms: Sequence[str],
    arm_flags: dict[str, str],
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The study's JSON: per dataset and arm, metrics (mean ± std), paired differences, step ratio, the choice."""
    report: dict[str, Any] = {"rule": RULE, "metrics": list(METRICS), **(meta or {}), "datasets": {}}
    for name in datasets:
        by_arm: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
        for job, res in results.items():
            if job.dataset == name and job.arm in by_arm:
                by_arm[job.arm][job.seed] = res
        base = by_arm.get(BASELINE, {})
        base_step = stats.mean_std([r["timing"]["s_per_step"] for r in base.values()])["mean"]
        entry: dict[str, Any] = {"arms": {}}
        for arm in arms:
            runs = by_arm[arm]
            a: dict[str, Any] = {
                "flags": arm_flags.get(arm, ""),
                "seeds": sorted(runs),
                "n_runs": len(runs),
                "test": {m: stats.mean_std([r["test"].get(m) for r in runs.values()]) for m in METRICS},
                "val": {m: stats.mean_std([r["val"].get(m) for r in runs.values()]) for m in METRICS},
                "best_epoch": stats.mean_std([r["best_epoch"] for r in runs.values()]),
                "epochs_run": stats.mean_std([r["epochs_run"] for r in runs.values()]),
                "s_per_step": stats.mean_std([r["timing"]["s_per_step"] for r in runs.values()]),
                "s_per_epoch": stats.mean_std([r["timing"]["s_per_epoch"] for r in runs.values()]),
                "convergence": _convergence(runs.values(), _LAST),
            }
            ok = bool(base_step) and math.isfinite(base_step)
            a["step_ratio"] = a["s_per_step"]["mean"] / base_step if ok else math.nan
            if arm != BASELINE:
                for key, split in (("paired", "test"), ("paired_val", "val")):
                    a[key] = {
                        m: stats.paired(
                            _per_seed(runs, split, m),
                            _per_seed(base, split, m),
                            higher_is_better=m not in LOWER_IS_BETTER,
                        )
                        for m in METRICS
                    }
            entry["arms"][arm] = a
        # The choice is ADST's default, so it is made among the ADST arms; peers (--no-adst) are comparators.
        candidates = {
            arm: a["paired_val"]["dice"]["mean"]
            for arm, a in entry["arms"].items()
            if arm != BASELINE
            and "--no-adst" not in shlex.split(a["flags"])
            and math.isfinite(a["paired_val"]["dice"]["mean"])
        }
        if candidates:
            ranked = sorted(candidates, key=lambda k: candidates[k], reverse=True)
            best = ranked[0]
            entry["choice"] = {
                "arm": best,
                "paired_val_dice": entry["arms"][best]["paired_val"]["dice"],
                "paired_test_dice": entry["arms"][best]["paired"]["dice"],
                "beats_baseline_on_val": candidates[best] > 0,
            }
            if len(ranked) > 1:  # is the choice itself resolved, or a tie with the next ADST arm?
                runner_up = ranked[1]
                entry["choice"]["vs_runner_up"] = {
                    "arm": runner_up,
                    "paired_val_dice": stats.paired(
                        _per_seed(by_arm[best], "val", "dice"), _per_seed(by_arm[runner_up], "val", "dice")
                    ),
                }
        sample = next(iter(results.get(j) for j in results if j.dataset == name), None)
        if sample is not None:
            entry["config"] = {
                "epochs": sample["epochs"],
                "steps_per_epoch": sample["steps_per_epoch"],
                "lr": sample["lr"],
                "val_images": sample["val"].get("images"),
                "test_images": sample["test"].get("images"),
                "model": {k: sample["model_args"].get(k) for k in ("arch", "encoder") if k in sample["model_args"]},
                "device": sample.get("device"),
            }
        report["datasets"][name] = entry
    return report


_LAST = 3  # the convergence check's window: the last epochs of a run


def _convergence(runs: Iterable[dict[str, Any]], last: int = _LAST) -> dict[str, Any]:
    """Was training still improving at its end? The share of runs whose best validation epoch is the last,
    and how much the best-so-far validation Dice rose over the last ``last`` epochs (mean ± std over runs)."""
    at_last, gains = [], []
    for r in runs:
        curve = [h["val_dice"] for h in r.get("history", [])]
        at_last.append(float(r["best_epoch"] == r["epochs_run"]))
        if len(curve) > last:
            gains.append(max(curve) - max(curve[:-last]))
    return {"best_at_last": stats.mean_std(at_last)["mean"], "best_gain_last": stats.mean_std(gains), "last": last}


_POINTS = {"dice", "iou", "boundary_iou", "small_recall", "small_dice"}  # shown ×100 (points) in the markdown


def _share(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.0f} %"


def _ms(stat: dict[str, Any], metric: str) -> str:
    mean, std = stat.get("mean"), stat.get("std")
    if mean is None or not math.isfinite(mean):
        return "-"
    scale, digits = (100.0, 1) if metric in _POINTS else (1.0, 2)
    if std is None or not math.isfinite(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _pd(p: dict[str, Any] | None, metric: str) -> str:
    if not p or not p["n"] or p["mean"] is None or not math.isfinite(p["mean"]):
        return "-"
    scale, digits = (100.0, 2) if metric in _POINTS else (1.0, 2)
    lo, hi = p["ci95"]
    ci = f" [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]" if lo is not None and math.isfinite(lo) else ""
    return f"{p['mean'] * scale:+.{digits}f}{ci} {p['better']}/{p['n']}"


def format_markdown(report: dict[str, Any]) -> str:
    """study.md: per dataset, the metrics table, the paired table and the choice made on validation."""
    lines = ["# ADST study", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    info = [f"{k}: {report[k]}" for k in ("date", "device", "parallel", "budget_min") if report.get(k) is not None]
    if info:
        lines += ["; ".join(info) + ".", ""]
    lines += [f"**Rule (fixed before the runs):** {RULE}", ""]
    lines += [
        "Dice, IoU, boundary IoU (BIoU, 2 % of the diagonal) and small-lesion (< 1 % of the image) recall and Dice in "
        "points (x100), HD95 in pixels. Metrics: mean ± std over seeds of each run's mean over images (small-lesion "
        "scores pooled over the split), from the best-on-validation weights, exported. Paired Δ = arm - baseline "
        "with the same seed: mean [95 % t-interval] and better/n (for HD95, better = lower). Step ratio: mean "
        "training s/step of the arm over the baseline's, measured in this study (runs sharing the device at the "
        "same concurrency).",
        "",
    ]
    for name, entry in report["datasets"].items():
        cfg = entry.get("config", {})
        model = "/".join(str(v) for v in cfg.get("model", {}).values())
        lines += [f"## {name}", ""]
        if cfg:
            lines += [
                f"{model}, {cfg['epochs']} epochs x {cfg['steps_per_epoch']} steps, lr {cfg['lr']}; "
                f"val {int(cfg['val_images'] or 0)} / test {int(cfg['test_images'] or 0)} images; {cfg.get('device')}.",
                "",
            ]
        lines += [
            "| arm | seeds | val Dice | test Dice | IoU | HD95 | BIoU | small recall | small Dice | best epoch | "
            f"best at last epoch | gain, last {_LAST} epochs | s/step | step ratio |",
            "|---" * 14 + "|",
        ]
        for arm, a in entry["arms"].items():
            t = a["test"]
            ratio = a["step_ratio"]
            lines.append(
                f"| {arm} | {a['n_runs']} | {_ms(a['val']['dice'], 'dice')} | {_ms(t['dice'], 'dice')} | "
                f"{_ms(t['iou'], 'iou')} | {_ms(t['hd95'], 'hd95')} | {_ms(t['boundary_iou'], 'boundary_iou')} | "
                f"{_ms(t['small_recall'], 'small_recall')} | {_ms(t['small_dice'], 'small_dice')} | "
                f"{_ms(a['best_epoch'], 'epoch')} | {_share(a['convergence']['best_at_last'])} | "
                f"{_ms(a['convergence']['best_gain_last'], 'dice')} | {_ms(a['s_per_step'], 's')} | "
                f"{f'{ratio:.2f}x' if ratio is not None and math.isfinite(ratio) else '-'} |"
            )
        lines += [
            "",
            "| arm vs baseline | Δ val Dice | Δ test Dice | Δ BIoU | Δ HD95 | Δ small recall | Δ small Dice "
            "| step ratio |",
            "|---" * 8 + "|",
        ]
        for arm, a in entry["arms"].items():
            if arm == BASELINE:
                continue
            p, pv = a["paired"], a["paired_val"]
            ratio = a["step_ratio"]
            lines.append(
                f"| {arm} | {_pd(pv['dice'], 'dice')} | {_pd(p['dice'], 'dice')} | "
                f"{_pd(p['boundary_iou'], 'boundary_iou')} | {_pd(p['hd95'], 'hd95')} | "
                f"{_pd(p['small_recall'], 'small_recall')} | {_pd(p['small_dice'], 'small_dice')} | "
                f"{f'{ratio:.2f}x' if ratio is not None and math.isfinite(ratio) else '-'} |"
            )
        choice = entry.get("choice")
        if choice:
            verdict = "better than" if choice["beats_baseline_on_val"] else "not better than"
            lines += [
                "",
                f"Chosen on validation (among the ADST arms): **{choice['arm']}** "
                f"(Δ val Dice {_pd(choice['paired_val_dice'], 'dice')}; {verdict} the baseline on validation). "
                "Its test Δ Dice, reported only: "
                f"{_pd(choice['paired_test_dice'], 'dice')}.",
            ]
            runner = choice.get("vs_runner_up")
            if runner:
                pr = runner["paired_val_dice"]
                lo, hi = pr["ci95"]
                tie = pr["n"] > 1 and math.isfinite(lo) and lo <= 0 <= hi
                lines.append(
                    f"Against the next ADST arm, **{runner['arm']}**, paired Δ val Dice {_pd(pr, 'dice')}"
                    f"{': a tie on validation' if tie else ''}."
                )
        lines.append("")
    if report.get("failed"):
        lines += [f"Failed runs (see study.json): {', '.join(sorted(report['failed']))}.", ""]
    if report.get("not_run"):
        lines += [f"Not run (budget): {len(report['not_run'])} runs, e.g. {', '.join(report['not_run'][:6])}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def dataset_kwargs(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``build_dataset`` arguments of dataset ``name`` (``args.synthetic_n``, ``args.data_root``)."""
    if name == "synthetic":
        return {"n": args.synthetic_n}
    if name not in DATA_DIRS:
        raise UsageError(f"--datasets: unknown dataset {name!r}; valid: synthetic, {', '.join(DATA_DIRS)}")
    root = Path(args.data_root) / DATA_DIRS[name]
    return {"root": root}


def _prepare_caches(datasets: Sequence[str], args: argparse.Namespace) -> dict[str, str]:
    files = {}
    for name in datasets:
        path = dcache.cache_path(args.cache_dir, name, args.img_size)
        if path.is_file() and not args.rebuild_cache and name != "synthetic":
            header = dcache.read_header(path)
            if header.get("split_seed") == args.split_seed:
                files[name] = str(path)
                continue
        kwargs = dataset_kwargs(name, args)
        if "root" in kwargs and not Path(kwargs["root"]).is_dir():
            raise UsageError(f"dataset {name}: '{kwargs['root']}' not found and no cache at '{path}'")
        built = dcache.cache_dataset(
            name, args.img_size, args.cache_dir, split_seed=args.split_seed, rebuild=args.rebuild_cache, **kwargs
        )
        files[name] = str(built)
    return files


def _choose_parallel(
    pool: WorkerPool, candidates: list[int], spec: dict[str, Any], log: Callable[[str], None]
) -> tuple[int, dict[str, float]]:
    """Throughput (steps/s, all workers together) for each N; the smallest N within 5 % of the best."""
    throughput: dict[str, float] = {}
    for n in candidates:
        times = pool.bench(n, spec)
        throughput[str(n)] = n * spec["steps"] / max(times)
        log(f"[study] parallel {n}: {throughput[str(n)]:.2f} steps/s ({n} x {spec['steps']} steps, {max(times):.1f} s)")
    best = max(throughput.values())
    chosen = min(int(n) for n, v in throughput.items() if v >= 0.95 * best)
    return chosen, throughput


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the study; write study.json and study.md; return the report."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, passthrough = parser.parse_known_args(argv)
    t_start = time.time()
    deadline = t_start + 60 * args.budget_min if args.budget_min else None

    registry = arm_registry()
    for spec in args.arm:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--arm: expected NAME=FLAGS, got {spec!r}")
        registry[name.strip()] = flags
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    arms += [s.partition("=")[0].strip() for s in args.arm if s.partition("=")[0].strip() not in arms]
    arms = [BASELINE] + [a for a in dict.fromkeys(arms) if a != BASELINE]
    unknown = [a for a in arms if a not in registry]
    if unknown:
        raise UsageError(f"--arms: unknown arm(s) {unknown}; known: {', '.join(registry)} (or define one with --arm)")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    seeds = args.seed_list if args.seed_list else list(range(args.seeds))
    epochs = _parse_epochs(args.epochs, datasets)
    model_args = {a: vars(parse_model_flags([*passthrough, *shlex.split(registry[a])], f"arm {a}")) for a in arms}
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    log = (lambda msg: None) if args.no_progress else (lambda msg: tqdm.write(msg, file=sys.stderr))

    cache_files = _prepare_caches(datasets, args)
    if args.prepare_cache:
        log(f"[study] caches: {cache_files}")
        return {"cache_files": cache_files}
    parallel = args.parallel
    cfg: dict[str, Any] = {
        "out": str(out),
        "device": str(device),
        "amp": args.amp if device.type == "cuda" else ("bf16" if args.amp == "bf16" else "off"),
        "epochs": epochs,
        "batch_size": args.batch_size,
        "eval_batch": 32,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "min_lr_ratio": args.min_lr_ratio,
        "max_steps": args.max_steps,
        "patience": args.patience,
        "augment": not args.no_augment,
        "arm_flags": {a: registry[a] for a in arms},
        "model_args": model_args,
        "cache_files": cache_files,
        "img_size": args.img_size,
        "passthrough": passthrough,
        "split_seed": args.split_seed,
    }
    _check_resume(out, cfg)

    jobs = plan_jobs(datasets, arms, seeds)
    results: dict[Job, dict[str, Any]] = {}
    for job in jobs:
        path = run_dir(out, job) / "result.json"
        if path.is_file():
            res = json.loads(path.read_text(encoding="utf-8"))
            if res.get("arm_flags") != registry[job.arm]:
                raise UsageError(f"{path}: run with other flags for arm {job.arm!r}; use another --out")
            results[job] = res
    pending = [j for j in jobs if j not in results]
    if results:
        log(f"[study] resuming: {len(results)} finished runs skipped, {len(pending)} to go")

    throughput: dict[str, float] = {}
    cpu_count = os.cpu_count() or 1
    pool: WorkerPool | None = None
    candidates = [int(c) for c in args.parallel_candidates.split(",")] if args.measure_parallel and pending else []
    n_workers = max([parallel, *candidates]) if pending else 0
    not_run: list[str] = []
    failed: dict[str, str] = {}
    try:
        if n_workers > 1 or candidates:
            cfg_w = {**cfg, "threads": args.threads or max(1, cpu_count // max(n_workers, 1)), "parallel": parallel}
            pool = WorkerPool(n_workers, cfg_w, barrier_sizes=candidates)
            if candidates:
                bench_arm = next((a for a in arms if a != BASELINE), BASELINE)
                spec = {"dataset": datasets[0], "arm": bench_arm, "steps": args.bench_steps, "warmup": 3}
                parallel, throughput = _choose_parallel(pool, candidates, spec, log)
                log(f"[study] chose --parallel {parallel}")
            pool.shrink(parallel)
            cfg["parallel"] = parallel
        else:
            cfg["parallel"] = 1
        bar = tqdm(total=len(jobs), initial=len(results), desc="study", disable=args.no_progress, dynamic_ncols=True)
        if pool is None and pending:
            _setup_torch(cfg, device, args.threads or cpu_count)
            data = _load_datasets(cfg, device)
            cfg["threads"] = args.threads or cpu_count
            for i, job in enumerate(pending):
                est = estimate_seconds(job, results, epochs[job.dataset])
                if deadline is not None and est is not None and time.time() + est > deadline:
                    not_run = [j.key for j in pending[i:]]
                    break
                bar.set_postfix_str(job.key)
                try:
                    res = _run_and_save(job, data, cfg, device, deadline)
                except Exception as exc:  # one failed run is recorded; the study goes on
                    failed[job.key] = _describe(exc)
                    log(f"[study] {job.key} failed: {failed[job.key]}")
                    continue
                if res is None:
                    not_run = [j.key for j in pending[i:]]
                    break
                results[job] = res
                bar.update()
        elif pool is not None:
            queue_ = list(pending)
            stopped = False
            while queue_ or pool.busy:
                while not stopped and queue_ and pool.free() is not None:
                    job = queue_[0]
                    est = estimate_seconds(job, results, epochs[job.dataset])
                    if deadline is not None and est is not None and time.time() + est > deadline:
                        stopped = True
                        break
                    pool.submit(pool.free(), queue_.pop(0), deadline)  # type: ignore[arg-type]
                if stopped:
                    not_run += [j.key for j in queue_]
                    queue_ = []
                if not pool.busy:
                    break
                job, res = pool.wait()
                if isinstance(res, str):
                    failed[job.key] = res
                    log(f"[study] {job.key} failed: {res}")
                elif res is None:
                    not_run.append(job.key)
                else:
                    results[job] = res
                    bar.update()
                    bar.set_postfix_str(job.key)
        bar.close()
    finally:
        if pool is not None:
            pool.close()

    meta = {
        "command": "python examples/study.py " + " ".join(shlex.quote(a) for a in argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_count} cores)",
        "torch": torch.__version__,
        "parallel": cfg["parallel"],
        "parallel_throughput_steps_per_s": throughput or None,
        "budget_min": args.budget_min,
        "wall_s": time.time() - t_start,
        "seeds": seeds,
        "arms_flags": {a: registry[a] for a in arms},
        "passthrough": passthrough,
        "not_run": sorted(not_run),
        "failed": failed,
    }
    report = build_report(results, datasets, arms, registry, meta)
    write_json(out / "study.json", report)
    markdown = format_markdown(jsonable(report))
    (out / "study.md").write_text(markdown, encoding="utf-8")
    if not args.no_progress:
        print(markdown, flush=True)
    return report


_RESUME_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "min_lr_ratio", "max_steps", "patience", "augment",
                "img_size", "passthrough", "split_seed")  # fmt: skip


def _check_resume(out: Path, cfg: dict[str, Any]) -> None:
    """``OUT/study_config.json`` pins the settings every run of the folder shares; a mismatch is an error."""
    path = out / "study_config.json"
    current = jsonable({k: cfg[k] for k in _RESUME_KEYS})
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in _RESUME_KEYS if k != "epochs" and saved.get(k) != current.get(k))
        old = saved.get("epochs", {})
        changed += [f"epochs[{d}]" for d, e in current["epochs"].items() if d in old and old[d] != e]
        if changed:
            raise UsageError(f"{out} holds a study with other settings ({', '.join(changed)}); use another --out")
        current["epochs"] = {**saved.get("epochs", {}), **current["epochs"]}
    write_json(path, current)


def _cli() -> None:
    try:
        main()
    except UsageError as exc:
        sys.exit(f"study.py: error: {exc}")


if __name__ == "__main__":
    _cli()
