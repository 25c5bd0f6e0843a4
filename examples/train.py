"""Train an smp segmentation model with (default) or without (``--no-adst``) the ADST auxiliary head.

``python examples/train.py`` (or ``python -m examples.train``) with no arguments trains an ADST Unet on the built-in
synthetic data into ``runs/synthetic-adst`` in a few minutes on a laptop CPU. Real data::

    python examples/train.py --dataset busi --root ../shared/data/Dataset_BUSI_with_GT --epochs 100 --out runs/busi-adst
    torchrun --nproc_per_node=2 examples/train.py --dataset kvasir --root data/Kvasir-SEG   # DDP

Pipeline: seeded 70/10/20 split (``split.json``) → training with joint augmentation, cosine LR per step, AMP on
CUDA → validation Dice every epoch (``best.pt`` by val Dice, ``last.pt`` for ``--resume``) → the best weights are
exported to a plain smp model (``exported/``, ``save_pretrained``), reloaded with ``smp.from_pretrained`` and
evaluated on the validation and test splits (``metrics.json``, ``overlays.png``). This file is the command line;
the run is :func:`adst_examples.training.fit.run` over the engine (:mod:`adst_examples.training.engine`). See
docs/examples.md, "Training CLI".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adst_examples.cli import non_negative_int, positive_int
from adst_examples.data import DATASET_NAMES, DATASETS, datasets_needing
from adst_examples.training.distributed import resolve_amp, resolve_device, setup_distributed, teardown_distributed
from adst_examples.training.engine import AUX_FADES, DEFAULT_LR, SYNTHETIC_LR
from adst_examples.training.fit import run
from adst_examples.training.models import add_model_arguments, check_model_args
from adst_examples.training.parts import UsageError

__all__ = ["UsageError", "build_parser", "main", "parse_args"]

#: Defaults of --img-size, --epochs and --lr: the synthetic data's are small, so the no-argument run takes minutes.
DEFAULTS: dict[str, Any] = {"img_size": 256, "epochs": 100, "lr": DEFAULT_LR}
SYNTHETIC_DEFAULTS: dict[str, Any] = {"img_size": 128, "epochs": 8, "lr": SYNTHETIC_LR}
#: Flags that may change when resuming: where and how the same computation runs (--amp and --channels-last change
#: its rounding, not what it computes).
RUNTIME_KEYS = frozenset(
    {"resume", "device", "workers", "no_progress", "stop_after_epoch", "out", "amp", "channels_last"}
)


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
    g.add_argument("--skip-bad", action="store_true", help="skip image/mask pairs that are missing or broken")
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
        "--aux-fade", choices=AUX_FADES, default="none",
        help="fade the auxiliary terms from 1 (first epoch) to 0 (last epoch) [%(default)s]",
    )  # fmt: skip

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, help=f"epochs {_by_dataset('epochs')}")
    g.add_argument("--batch-size", type=positive_int, default=8, help="per-process batch size [%(default)s]")
    g.add_argument("--lr", type=float, help=f"peak learning rate {_by_dataset('lr')}")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final LR = lr * ratio (cosine) [%(default)s]")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW: decoupled, Adam: L2 [%(default)s]")
    g.add_argument("--optimizer", choices=("adamw", "adam"), default="adamw", help="optimizer [%(default)s]")
    g.add_argument("--no-augment", action="store_true", help="no training augmentation")

    g = p.add_argument_group("runtime")
    g.add_argument("--out", help="run folder [runs/<dataset>-adst or runs/<dataset>-baseline]")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = CUDA if any [%(default)s]")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast: auto = bf16 (or fp16 + GradScaler) on CUDA, off on CPU [%(default)s]")  # fmt: skip
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC weights, often faster convolutions (docs/results.md); same export")  # fmt: skip
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
    if args.skip_bad and not entry.needs:
        parser.error(f"--skip-bad applies to datasets read from files; --dataset {args.dataset} has none")
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
