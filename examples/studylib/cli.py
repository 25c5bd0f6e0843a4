"""The study's command line (``python examples/study.py``): plan, resume, run, report."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adst_examples.cli import positive_int
from adst_examples.studylib.across import parse_tie_prefer
from adst_examples.studylib.arms import ARMS, BASELINE, parse_model_flags, select_arms
from adst_examples.studylib.config import StudyConfig, UsageError
from adst_examples.studylib.datasets import parse_folders, prepare_caches
from adst_examples.studylib.markdown import format_markdown
from adst_examples.studylib.plan import check_resume, load_finished, parse_epochs, plan_jobs, read_results
from adst_examples.studylib.report import build_report
from adst_examples.studylib.schedule import SerialExecutor, choose_parallel, schedule
from adst_examples.studylib.workers import WorkerPool, load_datasets, setup_process
from adst_examples.training.checkpoints import jsonable, write_json
from adst_examples.training.distributed import resolve_amp, resolve_device

__all__ = ["RAY_RETRIES", "build_parser", "cli", "main"]

#: ``--max-retries`` when not given (Ray's own default for tasks).
RAY_RETRIES = 3


def build_parser() -> argparse.ArgumentParser:
    """study.py's own flags; every other flag goes to the model/criterion builder."""
    p = argparse.ArgumentParser(
        prog="study.py",
        allow_abbrev=False,
        description="Train every arm on every dataset for several seeds; paired intervals against the baseline.",
        epilog="Any other flag goes to the model builder (see train.py --help, group 'model'), for every arm.",
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--datasets", help="comma list: busi, kvasir, isic2018, synthetic, or a --folder NAME [synthetic]")
    g.add_argument("--arms", help="comma list of arm names (the baseline is always added) [baseline,adst]")
    g.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="define an arm and run it (it joins --arms), e.g. 'mine=--preset adst'",
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
    g.add_argument("--data-root", default="../shared/data", help="folder holding the named datasets [%(default)s]")
    g.add_argument(
        "--folder", nargs=3, action="append", default=[], metavar=("NAME", "IMAGES_DIR", "MASKS_DIR"),
        help="add a dataset NAME of your own images and same-stem masks (repeatable); name it in --datasets",
    )  # fmt: skip
    g.add_argument("--skip-bad", action="store_true", help="skip image/mask pairs that are missing or broken")
    g.add_argument("--cache-dir", default="runs/cache", help="where the dataset caches live [%(default)s]")
    g.add_argument("--rebuild-cache", action="store_true")
    g.add_argument("--prepare-cache", action="store_true", help="build the caches of --datasets, then stop")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the shared train/val/test split")
    g.add_argument("--synthetic-n", type=positive_int, default=200, help="number of synthetic images")

    g = p.add_argument_group("runtime")
    g.add_argument("--out", default="runs/study", help="study folder")
    g.add_argument("--report-only", action="store_true", help="train nothing: report the result.json files in OUT")
    g.add_argument(
        "--tie-prefer", metavar="CHEAP=OVER",
        help="across datasets: if the rule picks OVER and CHEAP ties it on validation BIoU (seed-paired interval "
        "spanning 0), CHEAP is the pick, e.g. adst-s4=adst (a cheaper head)",
    )  # fmt: skip
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument(
        "--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="auto: bf16 on CUDA, off on CPU"
    )
    g.add_argument("--parallel", type=positive_int, default=1, help="runs at once on the device")
    g.add_argument("--measure-parallel", action="store_true", help="time N = --parallel-candidates, pick N")
    g.add_argument("--parallel-candidates", default="1,2,4,8")
    g.add_argument("--bench-steps", type=positive_int, default=20, help="timed steps per worker in --measure-parallel")
    g.add_argument("--budget-min", type=float, help="start no run that would end after M minutes")
    g.add_argument("--threads", type=int, help="torch CPU threads per run [cores / parallel; Ray on CUDA: 1]")
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC weights, often faster convolutions (docs/results.md); not pinned: a folder may mix "
                   "runs with and without it, each result.json records which")  # fmt: skip
    g.add_argument("--no-progress", action="store_true")

    g = p.add_argument_group("executor")
    g.add_argument(
        "--executor", choices=("local", "ray"), default="local",
        help="local: this machine's device (worker processes); ray: one Ray task per run [%(default)s]",
    )  # fmt: skip
    g.add_argument(
        "--ray-address", metavar="ADDR",
        help="Ray cluster to join: 'auto' (started here by `ray start`), HOST:PORT or ray://HOST:PORT "
        "[start a local Ray instance]",
    )  # fmt: skip
    g.add_argument(
        "--max-retries", type=int, metavar="N",
        help=f"Ray: restarts of a run whose worker died before it is recorded as failed [{RAY_RETRIES}]",
    )  # fmt: skip
    return p


def _names(text: str | None, default: str) -> list[str]:
    return [d.strip() for d in (text or default).split(",") if d.strip()]


def _write(out: Path, report: dict[str, Any], quiet: bool) -> dict[str, Any]:
    write_json(out / "study.json", report)
    markdown = format_markdown(jsonable(report))
    (out / "study.md").write_text(markdown, encoding="utf-8")
    if not quiet:
        print(markdown, flush=True)
    return report


def _tie_prefer(text: str | None, arms: Sequence[str]) -> tuple[str, str] | None:
    try:
        pair = parse_tie_prefer(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    unknown = [a for a in pair or () if a not in arms or a == BASELINE]
    if unknown:
        raise UsageError(
            f"--tie-prefer: {', '.join(unknown)} is not an ADST arm of this study (arms: {', '.join(arms)})"
        )
    return pair


def report_only(args: argparse.Namespace, command: str, log: Callable[[str], None]) -> dict[str, Any]:
    """study.json and study.md of the result.json files already in ``--out`` (of this code or an earlier one)."""
    out = Path(args.out)
    results = read_results(out)
    if not results:
        raise UsageError(f"--report-only: no runs/<dataset>/<arm>/seed<k>/result.json under '{out}'")
    found = list(dict.fromkeys(j.dataset for j in sorted(results, key=lambda j: j.key)))
    datasets = _names(args.datasets, ",".join(found))
    names = sorted({j.arm for j in results}, key=lambda a: (a != BASELINE, a not in ARMS, a))
    arms = [BASELINE, *(a for a in _names(args.arms, ",".join(names)) if a != BASELINE)]
    flags = {j.arm: r.get("arm_flags", "") for j, r in results.items()}
    log(f"[study] reporting {len(results)} runs from {out}")
    meta = {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "report_only": True,
        "seeds": sorted({j.seed for j in results}),
        "arms_flags": {a: flags.get(a, "") for a in arms},
    }
    tie = _tie_prefer(args.tie_prefer, arms)
    return _write(out, build_report(results, datasets, arms, flags, meta, tie), args.no_progress)


def _outside_runs(outside: dict[str, float]) -> dict[str, Any]:
    """The executor's seconds per run outside the run: median, max, and the runs they come from."""
    if not outside:
        return {"outside_run_n": 0}
    values = list(outside.values())
    median, most = statistics.median(values), max(values)
    return {"outside_run_median": median, "outside_run_max": most, "outside_run_n": len(values)}


def _check_executor_flags(args: argparse.Namespace) -> None:
    if args.executor == "local":
        ray_flags = {"--ray-address": args.ray_address, "--max-retries": args.max_retries}
        given = [flag for flag, value in ray_flags.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only for the Ray executor; add --executor ray")
    elif args.measure_parallel:
        raise UsageError("--measure-parallel times worker processes on this machine; with --executor ray pass "
                         "--parallel N (runs per GPU) instead")  # fmt: skip
    if args.max_retries is not None and args.max_retries < 0:
        raise UsageError(f"--max-retries: expected 0 or more, got {args.max_retries}")


def _local_executor(
    args: argparse.Namespace, cfg: StudyConfig, device: torch.device, pending: Sequence[Any], datasets: list[str],
    arms: list[str], log: Callable[[str], None],
) -> tuple[Any, int, dict[str, float], StudyConfig]:  # fmt: skip
    """This machine: the worker pool (``--parallel`` > 1 or measured) or this process; ``(executor, parallel,
    throughput, cfg)``."""
    candidates = [int(c) for c in args.parallel_candidates.split(",")] if args.measure_parallel and pending else []
    n_workers = max([args.parallel, *candidates]) if pending else 0
    cfg = dataclasses.replace(cfg, threads=args.threads or max(1, (os.cpu_count() or 1) // max(n_workers, 1)))
    if n_workers <= 1 and not candidates:
        setup_process(device, cfg.threads)
        return SerialExecutor(cfg, load_datasets(cfg, device) if pending else {}, device), 1, {}, cfg
    pool = WorkerPool(n_workers, cfg, barrier_sizes=candidates)
    parallel, throughput = args.parallel, {}
    try:
        if candidates:
            bench_arm = next((a for a in arms if a != BASELINE), BASELINE)
            spec = {"dataset": datasets[0], "arm": bench_arm, "steps": args.bench_steps, "warmup": 3}
            parallel, throughput = choose_parallel(pool, candidates, spec, log)
            log(f"[study] chose --parallel {parallel}")
        pool.shrink(parallel)
    except BaseException:
        pool.close()
        raise
    return pool, parallel, throughput, cfg


def _ray_executor(args: argparse.Namespace, cfg: StudyConfig, device: torch.device, datasets: list[str],
                  log: Callable[[str], None]) -> Any:  # fmt: skip
    """One Ray task per run (imported here only: the local study never imports ray)."""
    from adst_examples.studylib.ray_executor import RayExecutor

    retries = RAY_RETRIES if args.max_retries is None else args.max_retries
    executor = RayExecutor(args.ray_address, parallel=args.parallel, max_retries=retries, log=log)
    try:
        executor.start(dataclasses.replace(cfg, threads=args.threads or executor.default_threads(device)), datasets)
    except BaseException:
        executor.close()
        raise
    return executor


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the study, or only report it; write study.json and study.md; return the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, passthrough = build_parser().parse_known_args(argv)
    command = "python examples/study.py " + " ".join(shlex.quote(a) for a in argv)
    log = (lambda msg: None) if args.no_progress else (lambda msg: tqdm.write(msg, file=sys.stderr))
    if args.report_only:
        return report_only(args, command, log)
    _check_executor_flags(args)
    t_start = time.time()
    deadline = t_start + 60 * args.budget_min if args.budget_min else None
    arms, registry = select_arms(args.arms or "baseline,adst", args.arm)
    tie = _tie_prefer(args.tie_prefer, arms)
    folders = parse_folders(args.folder)
    datasets = _names(args.datasets, "synthetic")
    seeds = args.seed_list if args.seed_list else list(range(args.seeds))
    epochs = parse_epochs(args.epochs, datasets)
    model_args = {a: vars(parse_model_flags([*passthrough, *shlex.split(registry[a])], f"arm {a}")) for a in arms}
    try:
        device = resolve_device(args.device)
        resolve_amp(args.amp, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    cache_files = prepare_caches(
        datasets, cache_dir=args.cache_dir, img_size=args.img_size, split_seed=args.split_seed,
        rebuild=args.rebuild_cache, data_root=args.data_root, synthetic_n=args.synthetic_n, folders=folders,
        skip_bad=args.skip_bad,
    )  # fmt: skip
    if args.prepare_cache:
        log(f"[study] caches: {cache_files}")
        return {"cache_files": cache_files}

    arm_flags = {a: registry[a] for a in arms}
    jobs = plan_jobs(datasets, arms, seeds)
    cfg = StudyConfig(
        out=str(out), device=str(device), amp=args.amp, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, min_lr_ratio=args.min_lr_ratio, max_steps=args.max_steps,
        patience=args.patience, augment=not args.no_augment, arm_flags=arm_flags, model_args=model_args,
        cache_files=cache_files, img_size=args.img_size, passthrough=tuple(passthrough), split_seed=args.split_seed,
        threads=1, channels_last=args.channels_last,
    )  # fmt: skip
    check_resume(out, cfg)  # the folder's shared settings first, then each finished run's model
    results = load_finished(out, jobs, arm_flags, model_args)
    pending = [j for j in jobs if j not in results]
    if results:
        log(f"[study] resuming: {len(results)} finished runs skipped, {len(pending)} to go")
    cpu_count = os.cpu_count() or 1
    parallel, throughput = args.parallel, {}
    t_executor = time.perf_counter()
    if args.executor == "ray" and pending:
        executor = _ray_executor(args, cfg, device, datasets, log)
    else:
        executor, parallel, throughput, cfg = _local_executor(args, cfg, device, pending, datasets, arms, log)
    executor_s = {"start": time.perf_counter() - t_executor}
    bar = tqdm(total=len(jobs), initial=len(results), desc="study", disable=args.no_progress, dynamic_ncols=True)
    failures: list[str] = []

    def failed(job: Any) -> None:
        failures.append(job.key)
        bar.set_postfix(failed=len(failures))

    try:
        like = {"channels_last": cfg.channels_last, "parallel": parallel}
        outcome = schedule(executor, pending, results, epochs, deadline, log=log, on_done=lambda job: bar.update(),
                           on_failed=failed, like=like)  # fmt: skip
    finally:  # Ctrl-C too: stop the runs in flight (the finished ones are saved)
        bar.close()
        t_close = time.perf_counter()
        executor.close()
        executor_s["close"] = time.perf_counter() - t_close

    meta = {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_count} cores)",
        "torch": torch.__version__,
        "executor": args.executor,
        "parallel": parallel,
        "parallel_throughput_steps_per_s": throughput or None,
        "executor_s": executor_s | _outside_runs(outcome.outside_s),
        "budget_min": args.budget_min,
        "wall_s": time.time() - t_start,
        "seeds": seeds,
        "arms_flags": arm_flags,
        "passthrough": passthrough,
        "not_run": outcome.not_run,
        "failed": outcome.failed,
    }
    report = build_report(outcome.results, datasets, arms, registry, meta, tie)
    return _write(out, report, args.no_progress)


def cli() -> None:
    """``python examples/study.py``: usage errors as one line, no traceback."""
    try:
        main()
    except UsageError as exc:
        sys.exit(f"study.py: error: {exc}")
    except KeyboardInterrupt:  # the executor has stopped its runs; the finished ones are saved
        print("study.py: interrupted; the same command resumes (finished runs are kept)", file=sys.stderr)
        sys.exit(130)
