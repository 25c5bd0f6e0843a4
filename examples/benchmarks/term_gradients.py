"""How hard each ADST loss term pulls on the exported model: gradient norms per term, side by side.

    python examples/benchmarks/term_gradients.py --arm paper --arm 'adst=--preset adst' \\
        --arm 'adst-fus1=--preset adst --fusion-grad 1' --dataset busi --train-steps 30

For each arm, every term with a nonzero weight is switched on alone (the others, ``w_mask`` included, set to 0)
and one backward pass gives the L2 norm of its gradient over the parameters ``export()`` keeps (encoder, decoder,
segmentation head), at the preset's weight. The table prints each norm and its ratio to the mask term's, on the
same batches and weights, at initialisation and again after ``--train-steps`` steps of the full loss (the ratio at
init alone can mislead: the head's maps are random there). The gradient-reach table (docs/design.md) says which
parameters a term reaches; this says by how much.
"""

from __future__ import annotations

import argparse
import copy
import shlex
from pathlib import Path

import torch

from adst_examples.benchmarks._common import build_plain_model
from adst_examples.studylib import dataset_source, parse_model_flags
from adst_examples.training.engine import Batch, Optimisation, train_step
from adst_examples.training.models import config_overrides
from adst_plugin import ADSTLoss, wrap_with_adst
from adst_plugin.presets import LOSS_WEIGHTS

EXPORTED = ("model.encoder.", "model.decoder.", "model.segmentation_head.")


def parse_arm(spec: str) -> tuple[str, dict]:
    """``name`` (a preset) or ``name=<train.py ADST flags>`` -> (name, ADSTConfig overrides incl. the preset)."""
    name, _, flags = spec.partition("=")
    args = parse_model_flags(shlex.split(flags) if flags else ["--preset", name], f"--arm {name}")
    if args.no_adst:
        raise SystemExit(f"--arm {spec!r}: an arm here is an ADST configuration; --no-adst has no terms")
    return name, {"preset": args.preset, **config_overrides(args)}


def load_batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``--batches`` training batches (images in [0, 1], float masks) of ``--dataset`` at ``--size``."""
    from adst_examples.data import cache as dcache

    # The study's dataset arguments (synthetic: its default size), so the two share their caches.
    loader, kwargs = dataset_source(args.dataset, data_root=args.data_root, synthetic_n=200, folders={})
    if "root" in kwargs and not Path(kwargs["root"]).is_dir():
        raise SystemExit(f"--dataset {args.dataset}: no folder {kwargs['root']} (see ../shared/data/README.md)")
    path = dcache.cache_dataset(args.dataset, args.size, args.cache_dir, loader=loader, **kwargs)
    data = dcache.load_cache(path)
    train = data.split["train"]
    g = torch.Generator().manual_seed(args.seed)
    order = train[torch.randperm(len(train), generator=g)]
    batches = []
    for b in range(args.batches):
        sel = order[b * args.batch : (b + 1) * args.batch]
        batches.append((data.images[sel].float() / 255.0, data.masks[sel].float()))
    return batches


def term_norms(model, config_weights: dict[str, float], batches) -> dict[str, float]:
    """Mean over batches of the exported-parameter gradient norm of each weighted term alone, keyed by weight
    field."""
    norms: dict[str, float] = {}
    for weight, value in config_weights.items():
        if value <= 0:
            continue
        alone = {w: (value if w == weight else 0.0) for w in LOSS_WEIGHTS}
        criterion = ADSTLoss(model, **alone)
        total = 0.0
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            named = model.named_parameters()
            grads = [p.grad.flatten() for n, p in named if n.startswith(EXPORTED) and p.grad is not None]
            total += float(torch.cat(grads).norm()) if grads else 0.0
        norms[weight] = total / len(batches)
    model.zero_grad(set_to_none=True)
    return norms


def _ratio(norms: dict[str, float], weight: str) -> float:
    mask = norms.get("w_mask", 0.0)
    return norms[weight] / mask if mask > 0 else float("nan")


def train(model, batches, steps: int, lr: float) -> None:
    """``steps`` steps of the training engine on the full loss (constant LR: the schedule spans 100x the steps)."""
    criterion = ADSTLoss(model)
    opt = Optimisation.build(model, lr=lr, total_steps=100 * steps, device=batches[0][0].device, min_lr_ratio=1.0)
    for step in range(steps):
        train_step(model, criterion, opt, Batch(*batches[step % len(batches)]))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", help="a preset name, or name='<train.py ADST flags>' (repeatable)")
    p.add_argument("--dataset", choices=("synthetic", "busi", "kvasir"), default="synthetic")
    p.add_argument("--data-root", default="../shared/data", help="relative to the current folder [%(default)s]")
    p.add_argument("--cache-dir", default="runs/cache", help="[%(default)s]")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="batches the norms are averaged over")
    p.add_argument("--train-steps", type=int, default=30, help="steps of the full loss before the second reading")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    arms = [parse_arm(spec) for spec in (args.arm or ["paper", "adst"])]
    batches = load_batches(args)
    base = build_plain_model(args.arch, args.encoder, batches[0][0].shape[1], seed=args.seed)
    rows = []
    print(f"{args.arch}-{args.encoder}, {args.dataset} {args.size}², batch {args.batch} x {args.batches}; "
          f"|grad| over the exported parameters, ratio to the mask term")  # fmt: skip
    print(f"| arm | term | weight | at init | ratio | after {args.train_steps} steps | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, overrides in arms:
        torch.manual_seed(args.seed)
        preset = overrides.pop("preset")
        model = wrap_with_adst(copy.deepcopy(base), preset, **overrides).train()
        weights = {w: getattr(model.config, w) for w in LOSS_WEIGHTS}
        before = term_norms(model, weights, batches)
        train(model, batches, args.train_steps, args.lr)
        after = term_norms(model, weights, batches)
        names = model.config.term_names()
        for weight in before:
            term = names[weight]
            row = {"arm": name, "term": term, "weight": weights[weight], "init": before[weight],
                   "init_ratio": _ratio(before, weight), "trained": after[weight],
                   "trained_ratio": _ratio(after, weight)}  # fmt: skip
            rows.append(row)
            print(f"| {name} | {term} | {row['weight']:g} | {row['init']:.3g} | {row['init_ratio']:.2f} | "
                  f"{row['trained']:.3g} | {row['trained_ratio']:.2f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
