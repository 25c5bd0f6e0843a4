"""Baseline vs ADST with train.py: train both for several seeds on one shared split, then report them as the study does.

::

    python examples/compare.py --dataset busi --root ../shared/data/Dataset_BUSI_with_GT --seeds 3 --epochs 50
    python examples/compare.py ... --adst-flags "--preset paper" --tag paper   # an ablation, same baselines

Every flag compare.py does not know is passed to train.py (``--arch``, ``--encoder``, ``--img-size``,
``--batch-size``, ``--limit``, ...). Runs go to ``OUT/<arm>-seed<S>`` (arms ``baseline``, ``adst`` and
``adst-<tag>``); a run whose ``metrics.json`` exists is reused and one with only ``last.pt`` is resumed, so an
interrupted comparison continues where it stopped. All runs share ``OUT/split.json`` (seeded by ``--split-seed``).

compare.py is a front end of the study's report (:mod:`adst_examples.studylib.report`): each run also leaves a
study record (``result.json``), and ``OUT/comparison.md`` / ``comparison.json`` hold the study's tables over every
arm in OUT (every tag so far): metrics over seeds, paired differences with 95 % t-intervals on validation and test,
and the default chosen on validation by the study's rule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adst_examples import train
from adst_examples.data import DATASET_NAMES
from adst_examples.studylib import Job, build_report, format_markdown
from adst_examples.studylib.arms import BASELINE
from adst_examples.training.checkpoints import jsonable, write_json

__all__ = ["build_parser", "main", "study_record"]

#: train.py flags that compare.py sets itself.
OWNED_FLAGS = ("--seed", "--out", "--no-adst", "--resume", "--split-seed", "--stop-after-epoch")


def build_parser() -> argparse.ArgumentParser:
    """compare.py's own flags; the rest go to train.py."""
    p = argparse.ArgumentParser(
        prog="compare.py",
        allow_abbrev=False,  # unknown flags go to train.py untouched, never matched as abbreviations
        description="Train baseline and ADST for several seeds; paired intervals against the baseline.",
        epilog="Any other flag is passed to train.py (see `python examples/train.py --help`).",
    )
    p.add_argument("--dataset", default="synthetic", choices=DATASET_NAMES)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1")
    p.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds (overrides --seeds)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the shared split")
    p.add_argument("--out", help="comparison folder [runs/compare-<dataset>]")
    p.add_argument("--adst-flags", default="", help="extra train.py flags for the ADST runs, e.g. '--preset paper'")
    p.add_argument(
        "--tag", default="", help="ablation name: its ADST runs are the arm adst-<tag> (OUT/adst-<tag>-seed<S>)"
    )
    return p


def _means(summary: dict[str, Any], pooled: dict[str, Any] | None) -> dict[str, float]:
    flat = {m: s["mean"] for m, s in summary.items()}
    n = next(iter(summary.values()), {}).get("n")
    return flat | (pooled or {}) | {"images": n}


def study_record(metrics: dict[str, Any], arm: str, seed: int, flags: str) -> dict[str, Any]:
    """A train.py ``metrics.json`` as the study's per-run record (what the study's report reads).

    Validation metrics are those of the exported model; metrics.json files without them contribute the
    best epoch's validation Dice and IoU.
    """
    cfg, history = metrics["config"], metrics.get("history", [])
    val = _means(metrics["val"], metrics.get("val_pooled")) if "val" in metrics else _means(metrics["best_val"], None)
    return {
        "dataset": metrics["dataset"],
        "arm": arm,
        "seed": seed,
        "arm_flags": flags,
        "model_args": {"arch": cfg["arch"], "encoder": cfg["encoder"]},
        "epochs": cfg["epochs"],
        "epochs_run": len(history) or cfg["epochs"],
        "best_epoch": metrics["best_epoch"],
        "steps_per_epoch": metrics.get("steps_per_epoch"),
        "lr": cfg["lr"],
        "history": history,
        "timing": {k: metrics["timing"].get(k, math.nan) for k in ("s_per_step", "s_per_epoch")},
        "val": val,
        "test": _means(metrics["test"], metrics.get("test_pooled")),
        "device": metrics.get("device"),
    }


def _glue_adst_flags(argv: list[str]) -> list[str]:
    """``--adst-flags --no-detach-threshold`` → ``--adst-flags=--no-detach-threshold``: argparse would read the value as
    an option of its own ("expected one argument") whenever it starts with a dash and has no space."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--adst-flags" and out[i + 1].startswith("-"):
            out[i : i + 2] = [f"--adst-flags={out[i + 1]}"]
            break
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or reuse) every baseline/ADST run, write comparison.md/.json, return the report."""
    parser = build_parser()
    args, passthrough = parser.parse_known_args(_glue_adst_flags(sys.argv[1:] if argv is None else list(argv)))
    owned = [flag for flag in passthrough if flag.split("=")[0] in OWNED_FLAGS]
    if owned:
        parser.error(f"{', '.join(owned)}: set by compare.py itself; use --seeds/--seed-list/--out/--split-seed")
    seeds = args.seed_list if args.seed_list else list(range(args.seeds))
    if not seeds or min(seeds) < 0:
        parser.error(f"expected at least one seed >= 0, got {seeds}")
    out = Path(args.out) if args.out else Path("runs") / f"compare-{args.dataset}"
    common = [*passthrough, "--dataset", args.dataset, "--split-seed", str(args.split_seed)]
    if not any(flag.split("=")[0] == "--split-file" for flag in passthrough):
        common += ["--split-file", str(out / "split.json")]
    arm = f"adst-{args.tag}" if args.tag else "adst"
    arms = {BASELINE: "--no-adst", arm: args.adst_flags}
    for flags in arms.values():  # fail on bad flags before hours of training
        train.parse_args([*common, *shlex.split(flags), "--out", str(out / "check")])

    for seed in seeds:
        for name, flags in arms.items():
            run_dir = out / f"{name}-seed{seed}"
            if (run_dir / "metrics.json").is_file():
                print(f"[compare] reusing {run_dir}", flush=True)
                metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            else:
                resume = ["--resume"] if (run_dir / "last.pt").is_file() else []
                print(f"[compare] {'resuming' if resume else 'training'} {run_dir}", flush=True)
                argv_run = [*common, *shlex.split(flags), *resume, "--seed", str(seed), "--out", str(run_dir)]
                metrics = train.main(argv_run)
            if int(os.environ.get("RANK", "0")) == 0:
                write_json(run_dir / "result.json", study_record(metrics, name, seed, flags))

    results = {}
    for path in sorted(out.glob("*-seed*/result.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        results[Job(record["dataset"], record["arm"], int(record["seed"]))] = record
    names = [BASELINE, *sorted({j.arm for j in results} - {BASELINE})]
    flags_of = {j.arm: r["arm_flags"] for j, r in results.items()}
    meta = {"command": "python examples/compare.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
            "seeds": sorted({j.seed for j in results}), "train_args": common}  # fmt: skip
    report = build_report(results, [args.dataset], names, flags_of, meta)
    markdown = format_markdown(jsonable(report), title=f"Baseline vs ADST on {args.dataset}")
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "comparison.md").write_text(markdown, encoding="utf-8")
        write_json(out / "comparison.json", report)
        print(markdown, flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except train.UsageError as error:
        sys.exit(f"compare.py: error: {error}")
