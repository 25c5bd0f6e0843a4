"""Training overhead of ADST: forward + backward + optimizer step, wrapped vs plain, same model and batch.

    python examples/benchmarks/train_overhead.py                       # Unet-resnet34, 256², batch 8
    python examples/benchmarks/train_overhead.py --all-archs --size 128 --batch 4 --steps 10
    python examples/benchmarks/train_overhead.py --breakdown             # where the extra time goes
    python examples/benchmarks/train_overhead.py --also-main-target core # two main-map targets, one loop
    python examples/benchmarks/train_overhead.py --also-head-stride 4    # the default and a cheaper head, one loop
    python examples/benchmarks/train_overhead.py --also-channels-last    # both steps again, --channels-last

Steps are interleaved A/B/A/B after a warm-up; the ratio of the medians is printed. Each step is the training
engine's :func:`~adst_examples.training.engine.train_step`, the one train.py and the study run (forward under
autocast, loss in float32 outside it, optimizer and scheduler step). The ADST step includes everything a user pays
for: the head, the on-the-fly targets and the auxiliary loss terms. ``--breakdown`` times those three parts alone
in the same interleaved loop (head forward + backward on the tapped features, targets of the batch's masks, the
auxiliary terms + backward on fixed maps), so their share of the step's extra time is read off one run.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt

import torch
from torch.utils.flop_counter import FlopCounterMode

from adst_examples.benchmarks._common import ARCH_NAMES, build_plain_model, interleaved_medians
from adst_examples.training.distributed import describe_device, place_model, resolve_device
from adst_examples.training.engine import Batch, Optimisation, train_step
from adst_examples.training.models import count_params
from adst_plugin import DEFAULT_PRESET, PRESETS, ADSTLoss, wrap_with_adst
from adst_plugin.head import HeadMaps
from adst_plugin.hooks import resolve_module
from adst_plugin.presets import HEAD_INPUTS, MAIN_TARGETS
from adst_plugin.targets import adst_targets
from adst_plugin.terms import aux_terms

#: The ADSTConfig fields the command line can set (the rest are the preset's).
OVERRIDES = ("head_input", "head_stride", "feature_grad", "main_target")


def adst_config(args: argparse.Namespace) -> str:
    config = PRESETS[args.preset]
    return ", ".join(
        f"{k} {getattr(args, k) if getattr(args, k) is not None else getattr(config, k)}" for k in OVERRIDES
    )


def also_overrides(args: argparse.Namespace) -> dict:
    """The settings of the second ADST head (``--also-*``) that differ from the first's."""
    also = {"main_target": args.also_main_target, "head_stride": args.also_head_stride}
    return {k: v for k, v in also.items() if v is not None}


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(arch: str, args: argparse.Namespace, device: torch.device) -> dict:
    base = build_plain_model(arch, args.encoder, args.in_channels)
    plain = copy.deepcopy(base).to(device)
    overrides = {k: v for k in OVERRIDES if (v := getattr(args, k)) is not None}
    adst = wrap_with_adst(copy.deepcopy(base), args.preset, **overrides).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    plain, adst = plain.to(memory_format=fmt), adst.to(memory_format=fmt)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, args.in_channels, args.size, args.size, generator=generator)
    x = x.to(device).to(memory_format=fmt)
    yy, xx = torch.meshgrid(torch.arange(args.size), torch.arange(args.size), indexing="ij")
    disk = ((yy - args.size / 2) ** 2 + (xx - args.size / 3) ** 2) < (args.size / 5) ** 2
    y = disk.expand(args.batch, 1, -1, -1).float().to(device)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    batch = Batch(x, y)
    total = 3 * (args.steps + args.warmup)  # the Timer's own warm-up calls step too

    def step_fn(model, criterion):
        opt = Optimisation.build(model, lr=1e-4, total_steps=total, device=device, amp_dtype=amp_dtype)
        return lambda: train_step(model, criterion, opt, batch)

    # The plain model's loss is what train.py builds for --no-adst: ADSTLoss without a model (Dice + BCE).
    steps = {"plain": step_fn(plain, ADSTLoss(None)), "adst": step_fn(adst, ADSTLoss(adst))}
    if also_overrides(args):  # a second ADST head, timed in the same interleaved loop
        other = wrap_with_adst(copy.deepcopy(base), args.preset, **(overrides | also_overrides(args)))
        other = other.to(device).to(memory_format=fmt)
        steps["also"] = step_fn(other, ADSTLoss(other))
    if args.also_channels_last:  # both steps again as --channels-last trains them (NHWC weights), in the same loop
        plain_nhwc = place_model(copy.deepcopy(plain), device, channels_last=True)
        adst_nhwc = place_model(copy.deepcopy(adst), device, channels_last=True)
        steps["plain_nhwc"] = step_fn(plain_nhwc, ADSTLoss(None))
        steps["adst_nhwc"] = step_fn(adst_nhwc, ADSTLoss(adst_nhwc))
    if args.breakdown:
        steps.update(part_fns(plain, adst, x, y))
    medians = interleaved_medians(steps, args.steps, args.warmup)
    head_flops = flops(lambda: adst(x)) - flops(lambda: plain(x))  # forward FLOPs the head adds
    return {
        "arch": arch,
        "plain_s": medians["plain"],
        "adst_s": medians["adst"],
        "ratio": medians["adst"] / medians["plain"],
        "also_s": medians.get("also"),
        "nhwc_s": {k: medians[f"{k}_nhwc"] for k in ("plain", "adst")} if args.also_channels_last else None,
        "head_params": count_params(adst.head),
        "model_params": count_params(plain),
        "head_gflops": head_flops / 1e9,
        "parts": {name: medians[name] for name in PARTS if name in medians},
    }


#: The parts of the ADST step that ``--breakdown`` times alone.
PARTS = ("head", "targets", "terms")


def part_fns(plain: torch.nn.Module, adst, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The head (forward + backward), the targets and the auxiliary terms (+ backward), each alone."""
    config = adst.config
    captured: list[torch.Tensor] = []
    tap = resolve_module(plain, config.features) if config.head_input == "features" else None
    handle = tap.register_forward_hook(lambda m, a, out: captured.append(out)) if tap is not None else None
    try:
        with torch.no_grad():
            logits = plain(x)
    finally:
        if handle is not None:
            handle.remove()
    features = (captured[0] if captured else logits).detach().requires_grad_(True)
    logits = logits.detach().requires_grad_(True)
    adst.train()

    def head() -> None:
        sum(m.float().sum() for m in adst.head(features, logits)).backward()

    core, border = adst_targets(y)
    maps = HeadMaps(*(torch.randn_like(logits).requires_grad_(True) for _ in range(3)))
    base = ADSTLoss(None).base_loss

    def terms() -> None:
        values = aux_terms(config, maps, logits, y, core, border, fused_loss=base, fused_target=y)
        sum(w * v for w, v in values.values()).backward()

    return {"head": head, "targets": lambda: adst_targets(y), "terms": terms}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="Unet", choices=ARCH_NAMES)
    parser.add_argument("--all-archs", action="store_true", help="measure every smp architecture")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    parser.add_argument("--head-input", choices=HEAD_INPUTS, help="[the preset's]")
    parser.add_argument("--head-stride", type=int, help="[the preset's]")
    parser.add_argument("--feature-grad", type=float, help="gradient scale into the features [the preset's]")
    parser.add_argument("--main-target", choices=MAIN_TARGETS, help="[the preset's]")
    parser.add_argument("--also-main-target", choices=MAIN_TARGETS, help="time a second ADST step with this main "
                        "target in the same loop (its ratio to the plain step is printed too)")  # fmt: skip
    parser.add_argument("--also-head-stride", type=int, help="time a second ADST step with this head stride in the "
                        "same loop (combines with --also-main-target)")  # fmt: skip
    parser.add_argument("--also-channels-last", action="store_true", help="time the plain and ADST steps again with "
                        "NHWC weights, as train.py --channels-last runs them, in the same loop")  # fmt: skip
    parser.add_argument("--breakdown", action="store_true", help="also time the head, targets and terms alone")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = [measure(arch, args, device) for arch in (ARCH_NAMES if args.all_archs else [args.arch])]

    print(f"\n# Training overhead — {describe_device(device)} — {dt.date.today()}")
    print(
        f"encoder {args.encoder}, {args.size}², batch {args.batch}, amp {args.amp}, channels_last "
        f"{args.channels_last}, preset {args.preset} ({adst_config(args)}), "
        f"median of {args.steps} steps\n"
    )
    print("| arch | plain s/step | ADST s/step | ratio | head params | model params | head fwd GFLOPs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['plain_s']:.3f} | {r['adst_s']:.3f} | {r['ratio']:.2f}x | {r['head_params']:,} "
            f"| {r['model_params']:,} | {r['head_gflops']:.2f} |"
        )
    for r in rows:
        if r["also_s"] is not None:
            also = ", ".join(f"{k} {v}" for k, v in also_overrides(args).items())
            print(f"\n{r['arch']}, {also} in the same loop: {r['also_s']:.3f} s/step, "
                  f"{r['also_s'] / r['plain_s']:.2f}x the plain step, {r['also_s'] / r['adst_s']:.2f}x the ADST step "
                  "above")  # fmt: skip
    for r in rows:
        if r["nhwc_s"] is not None:
            nhwc = r["nhwc_s"]
            print(f"\n{r['arch']}, NHWC weights (--channels-last) in the same loop: plain {nhwc['plain']:.3f} s/step "
                  f"({r['plain_s'] / nhwc['plain']:.2f}x faster), ADST {nhwc['adst']:.3f} s/step "
                  f"({r['adst_s'] / nhwc['adst']:.2f}x faster); ADST/plain "
                  f"{nhwc['adst'] / nhwc['plain']:.2f}x")  # fmt: skip
    for r in rows:
        if r["parts"]:
            extra = r["adst_s"] - r["plain_s"]
            print(f"\n{r['arch']}: the parts alone, against the step's extra time ({extra:.3f} s)\n")
            print("| part | s/call | share of the extra time |")
            print("|---|---|---|")
            for name, seconds in r["parts"].items():
                share = f"{seconds / extra:.0%}" if extra > 0 else "-"
                print(f"| {name} | {seconds:.3f} | {share} |")
    return rows


if __name__ == "__main__":
    main()
