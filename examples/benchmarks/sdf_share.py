"""Where the signed-distance term comes from: its value and gradient by distance to the lesion edge, while training.

    python examples/benchmarks/sdf_share.py --root data/Dataset_BUSI_with_GT --encoder tu-efficientnet_lite0 \\
        --encoder-weights imagenet --size 128 --steps 60 --every 20

The default's main map regresses ``s`` (+d/D inside a lesion, -d/D outside, clipped to [-1, 1]) with
``|tanh(main) - s|``. Beyond distance D from every edge ``s = ±1``, which ``tanh`` reaches only at infinite logits,
so those pixels keep a gradient ``1 - tanh²(main)`` however well the edge is found. This script trains the default
(the engine's own step) and, every ``--every`` steps, reads the term on a fixed validation batch split into the
band (|s| < 1) and the far pixels (|s| = 1): each region's share of the pixels, of the term's value and of the
summed gradient magnitude with respect to the main map's logits.
"""

from __future__ import annotations

import argparse
import datetime as dt

import torch

from adst_examples.data import BUSIDataset
from adst_examples.training.distributed import describe_device
from adst_examples.training.encoder_weights import build_smp_model
from adst_examples.training.engine import Batch, Optimisation, train_step
from adst_examples.training.models import parse_encoder_weights
from adst_plugin import ADSTLoss, wrap_with_adst
from adst_plugin.functional import signed_distance
from adst_plugin.targets import adst_targets


def region_shares(main_logits: torch.Tensor, sdf: torch.Tensor) -> dict[str, float]:
    """Shares of the far pixels (|s| = 1) in pixels, term value and gradient magnitude; the term's mean value."""
    t = torch.tanh(main_logits.float())
    value = (t - sdf).abs()
    grad = 1.0 - t**2  # |d|tanh(m) - s| / dm|
    far = sdf.abs() >= 1.0
    return {
        "pixels": far.float().mean().item(),
        "value": (value[far].sum() / value.sum().clamp_min(1e-12)).item(),
        "gradient": (grad[far].sum() / grad.sum().clamp_min(1e-12)).item(),
        "term": value.mean().item(),
        "far_tanh": t[far].abs().mean().item(),
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="Dataset_BUSI_with_GT folder")
    p.add_argument("--encoder", default="tu-efficientnet_lite0")
    p.add_argument("--encoder-weights", type=parse_encoder_weights, default=None)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = BUSIDataset(args.root, img_size=args.size)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()

    def stack(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [data[i] for i in indices]
        return torch.stack([im for im, _ in items]).float(), torch.stack([m for _, m in items]).float()

    probe_x, probe_y = stack(order[: args.batch])  # held out of training
    train = order[args.batch :]
    model = wrap_with_adst(build_smp_model("Unet", args.encoder, args.encoder_weights, data.in_channels, 1))
    criterion = ADSTLoss(model)
    opt = Optimisation.build(model, lr=args.lr, total_steps=args.steps, device=torch.device("cpu"), amp_dtype=None)
    _, border = adst_targets(probe_y)
    sdf = signed_distance(border, probe_y, model.config.thresh_min, model.config.thresh_max)
    rows = []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            model.train()
            with torch.no_grad():
                main_map = model.forward_adst(probe_x).maps.main
            rows.append({"step": step, **region_shares(main_map, sdf)})
        if step < args.steps:
            start = (step * args.batch) % max(1, len(train) - args.batch)
            train_step(model, criterion, opt, Batch(*stack(train[start : start + args.batch])))
    print(f"\n# Signed-distance term by region — {describe_device(torch.device('cpu'))} — {dt.date.today()}")
    print(f"Unet-{args.encoder} ({args.encoder_weights or 'random init'}), BUSI {args.size}², batch {args.batch}\n")
    print("| step | far pixels | far share of the term | far share of the gradient | term | mean tanh far |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['step']} | {r['pixels']:.0%} | {r['value']:.0%} | {r['gradient']:.0%} | {r['term']:.3f} "
            f"| {r['far_tanh']:.3f} |"
        )
    return rows


if __name__ == "__main__":
    main()
