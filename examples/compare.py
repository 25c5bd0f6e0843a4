"""Baseline vs ADST: train both for several seeds on one shared split, then tabulate the test metrics.

::

    python examples/compare.py --dataset busi --root ../shared/data/Dataset_BUSI_with_GT --seeds 3 --epochs 50
    python -m examples.compare ...                       # the same, from the repository root

Every flag compare.py does not know is passed to train.py (``--arch``, ``--encoder``, ``--img-size``,
``--batch-size``, ``--limit``, ...). Runs go to ``OUT/{baseline,adst}-seed<S>``; a run whose ``metrics.json``
exists is reused and one with only ``last.pt`` is resumed, so an interrupted comparison continues where it
stopped. All runs share ``OUT/split.json`` (seeded by ``--split-seed``), so seeds vary only the training
randomness (initialisation, shuffling, augmentation) and every row is measured on the same test images.

Writes ``OUT/comparison.md`` (also printed) and ``OUT/comparison.json``: mean ± std over seeds of each run's
mean test Dice / IoU / precision / recall / HD95, and the paired per-seed Dice difference ADST − baseline.
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

import numpy as np

from adst_examples import train
from adst_examples.data import DATASET_NAMES
from adst_examples.metrics import METRIC_NAMES
from adst_examples.training.checkpoints import write_json

__all__ = ["VARIANTS", "aggregate", "build_parser", "format_markdown", "main"]

#: Run-folder prefix → extra train.py flags.
VARIANTS: dict[str, list[str]] = {"baseline": ["--no-adst"], "adst": []}
LABELS = {"baseline": "baseline", "adst": "ADST"}
HEADERS = {"dice": "Dice ↑", "iou": "IoU ↑", "precision": "Precision ↑", "recall": "Recall ↑", "hd95": "HD95 ↓ (px)"}
#: train.py flags that compare.py sets itself.
OWNED_FLAGS = ("--seed", "--out", "--no-adst", "--resume", "--split-seed", "--stop-after-epoch")


def build_parser() -> argparse.ArgumentParser:
    """compare.py's own flags; the rest go to train.py."""
    p = argparse.ArgumentParser(
        prog="compare.py",
        allow_abbrev=False,  # unknown flags go to train.py untouched, never matched as abbreviations
        description="Train baseline and ADST for several seeds and compare their test metrics.",
        epilog="Any other flag is passed to train.py (see `python examples/train.py --help`).",
    )
    p.add_argument("--dataset", default="synthetic", choices=DATASET_NAMES)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1")
    p.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds (overrides --seeds)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the shared split")
    p.add_argument("--out", help="comparison folder [runs/compare-<dataset>]")
    p.add_argument(
        "--adst-flags", default="", help="extra train.py flags for the ADST runs only, e.g. '--preset paper'"
    )
    p.add_argument(
        "--tag",
        default="",
        help="ablation name: ADST runs go to OUT/adst-<tag>-seed<S> and the report to comparison-<tag>.md; "
        "the baseline runs in OUT are shared by every tag",
    )
    return p


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan  # sample std over seeds
    return {"mean": float(arr.mean()) if len(arr) else math.nan, "std": std, "n": len(arr), "values": arr.tolist()}


def aggregate(runs: dict[str, dict[int, dict[str, Any]]], key: str = "test") -> dict[str, dict[str, Any]]:
    """Mean ± std over seeds of each run's mean test metric: ``{variant: {metric: {mean, std, n, values}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for variant, by_seed in runs.items():
        rows = [result[key] for _, result in sorted(by_seed.items()) if key in result]
        out[variant] = {m: _mean_std([row[m]["mean"] for row in rows]) for m in METRIC_NAMES}
        out[variant]["s_per_epoch"] = _mean_std([r["timing"]["s_per_epoch"] for r in by_seed.values()])
    return out


def _paired(runs: dict[str, dict[int, dict[str, Any]]], key: str = "test") -> dict[str, Any]:
    """Per-seed ADST − baseline Dice on split ``key`` (``test``, ``test_without_normal`` or ``best_val``)."""
    seeds = sorted(set(runs["baseline"]) & set(runs["adst"]))
    per_seed = {
        seed: {
            "baseline": runs["baseline"][seed][key]["dice"]["mean"],
            "adst": runs["adst"][seed][key]["dice"]["mean"],
        }
        for seed in seeds
    }
    for row in per_seed.values():
        row["diff"] = row["adst"] - row["baseline"]
    diffs = [row["diff"] for row in per_seed.values()]
    return {"per_seed": per_seed, **_mean_std(diffs), "adst_better": sum(d > 0 for d in diffs)}


def _fmt(stat: dict[str, Any], digits: int = 4) -> str:
    if not math.isfinite(stat["mean"]):
        return "n/a"
    if stat["n"] == 1:  # one seed: no spread to show
        return f"{stat['mean']:.{digits}f}"
    std = f"{stat['std']:.{digits}f}" if math.isfinite(stat["std"]) else "n/a"
    return f"{stat['mean']:.{digits}f} ± {std}"


def _table(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| model | " + " | ".join(HEADERS.values()) + " | s/epoch | seeds |",
        "|---" * (len(HEADERS) + 3) + "|",
    ]
    for variant, stats in summary.items():
        cells = [_fmt(stats[m], 2 if m == "hd95" else 4) for m in HEADERS]
        cells += [_fmt(stats["s_per_epoch"], 1), str(stats["dice"]["n"])]
        lines.append(f"| {LABELS[variant]} | " + " | ".join(cells) + " |")
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    """The comparison as markdown (what comparison.md holds)."""
    cfg = report["config"]
    lines = [
        f"# Baseline vs ADST on {report['dataset']}",
        "",
        *([f"ADST runs with extra flags: `{' '.join(report['adst_flags'])}`", ""] if report.get("adst_flags") else []),
        f"{cfg['arch']}/{cfg['encoder']}, {cfg['img_size']} px, {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
        f"lr {cfg['lr']}; seeds {', '.join(map(str, report['seeds']))}; shared split `{report['split_file']}` "
        f"(test: {report['test_images']} images). Each cell: mean ± sample std over seeds of the run's mean "
        "per-image test metric (best-on-val checkpoint, exported and reloaded). HD95 in pixels at the input size.",
        "",
        "## Test split",
        "",
        *_table(report["summary"]),
    ]
    if "summary_without_normal" in report:
        lines += [
            "",
            "## Test split without the lesion-free `normal` images",
            "",
            *_table(report["summary_without_normal"]),
        ]
    lines += _paired_table(report["paired_dice"], "Paired test Dice difference (ADST - baseline)")
    if "paired_val_dice" in report:
        title = "Paired validation Dice difference (best epoch; what settings are chosen on)"
        lines += _paired_table(report["paired_val_dice"], title)
    return "\n".join(lines) + "\n"


def _paired_table(paired: dict[str, Any], title: str) -> list[str]:
    lines = ["", f"## {title}", "", "| seed | baseline | ADST | Δ Dice |", "|---|---|---|---|"]
    for seed, row in paired["per_seed"].items():
        lines.append(f"| {seed} | {row['baseline']:.4f} | {row['adst']:.4f} | {row['diff']:+.4f} |")
    if paired["n"]:
        spread = f" ± {paired['std']:.4f}" if math.isfinite(paired["std"]) else ""
        lines.append(f"| **mean ± std** | | | **{paired['mean']:+.4f}{spread}** |")
        lines += ["", f"ADST better on {paired['adst_better']} of {paired['n']} seeds."]
    return lines


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
    split_file = out / "split.json"
    common = [*passthrough, "--dataset", args.dataset, "--split-seed", str(args.split_seed)]
    if not any(flag.split("=")[0] == "--split-file" for flag in passthrough):
        common += ["--split-file", str(split_file)]
    adst_flags = shlex.split(args.adst_flags)
    variants = {**VARIANTS, "adst": [*VARIANTS["adst"], *adst_flags]}
    prefix = {"baseline": "baseline", "adst": f"adst-{args.tag}" if args.tag else "adst"}
    for flags in variants.values():  # fail on bad flags before hours of training
        train.parse_args([*common, *flags, "--out", str(out / "check")])

    runs: dict[str, dict[int, dict[str, Any]]] = {variant: {} for variant in variants}
    for seed in seeds:
        for variant, flags in variants.items():
            run_dir = out / f"{prefix[variant]}-seed{seed}"
            metrics = run_dir / "metrics.json"
            if metrics.is_file():
                runs[variant][seed] = json.loads(metrics.read_text(encoding="utf-8"))
                print(f"[compare] reusing {run_dir}", flush=True)
                continue
            resume = ["--resume"] if (run_dir / "last.pt").is_file() else []
            print(f"[compare] {'resuming' if resume else 'training'} {run_dir}", flush=True)
            runs[variant][seed] = train.main([*common, *flags, *resume, "--seed", str(seed), "--out", str(run_dir)])

    first = runs["adst"][seeds[0]]
    report: dict[str, Any] = {
        "dataset": args.dataset,
        "seeds": seeds,
        "split_file": str(first["config"]["split_file"] or split_file),
        "test_images": first["test"]["dice"]["n"],
        "config": {k: first["config"][k] for k in ("arch", "encoder", "img_size", "epochs", "batch_size", "lr")},
        "train_args": common,
        "adst_flags": adst_flags,
        "summary": aggregate(runs),
        "paired_dice": _paired(runs),
        # Choices between ADST settings are made on this one; the test split is only reported.
        "paired_val_dice": _paired(runs, "best_val"),
    }
    if "test_without_normal" in first:
        report["summary_without_normal"] = aggregate(runs, "test_without_normal")
        report["paired_dice_without_normal"] = _paired(runs, "test_without_normal")
    report["runs"] = {v: {str(s): str(out / f"{prefix[v]}-seed{s}") for s in by_seed} for v, by_seed in runs.items()}
    markdown = format_markdown(report)
    if int(os.environ.get("RANK", "0")) == 0:
        name = f"comparison-{args.tag}" if args.tag else "comparison"
        (out / f"{name}.md").write_text(markdown, encoding="utf-8")
        write_json(out / f"{name}.json", report)
        print(markdown, flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except train.UsageError as error:
        sys.exit(f"compare.py: error: {error}")
