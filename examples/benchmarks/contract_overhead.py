"""Per-step cost of the loss/model contract ("one training forward, then its loss"), side by side in one run.

Arms, each a full training step (forward, ``ADSTLoss`` with the targets precomputed as ``ADSTTargetCollate``
gives them, backward) on its own copy of the same wrapped model, timed in interleaved rounds:

- ``contract``: as shipped: the loss checks that its logits are the forward's output (``comes_from``) and validates
  the mask through ``StepMaskCheck`` (on CUDA, without a sync after the first batch of a shape);
- ``off``: the pairing check skipped and the mask validated at once, every step (a read-back: a sync on CUDA);
- ``deferred``: as ``contract`` but with this device's mask verdicts read back later even on the CPU, to time
  that bookkeeping where it is not the default.

Then the pieces alone, in microseconds per call: the pairing check on the output itself, a slice, a copy and
another forward's output (the error path, which walks up to ``GRAPH_STEPS`` autograd nodes), and the mask
check at once vs deferred.

    python examples/benchmarks/contract_overhead.py --device cpu --threads 1 --size 64 --batch 4 --rounds 30
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import date

import segmentation_models_pytorch as smp
import torch

from adst_plugin import ADSTLoss, _step_checks, wrap_with_adst
from adst_plugin._checks import check_mask
from adst_plugin._handover import UnclaimedHeadOutputWarning, comes_from
from adst_plugin._step_checks import StepMaskCheck
from adst_plugin.targets import adst_targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, criterion, x, y, targets) -> Callable[[], None]:
    def run() -> None:
        criterion(model(x), y, targets=targets).backward()
        model.zero_grad(set_to_none=True)

    return run


def _contract_off(model, criterion) -> None:
    """Skip the pairing check and validate every mask at once (the behaviour before the contract)."""

    def hand_over(logits=None):
        pending = model._pending
        model._drop()
        return pending

    model._hand_over = hand_over
    criterion._mask_check = lambda validate, mask, *args, immediate=False: validate(mask, *args)


class _DeferredHere(StepMaskCheck):
    """StepMaskCheck that defers this device's verdicts too (the CPU's are checked at once by default)."""

    def __call__(self, validate, mask, *args, immediate=False):
        saved = _step_checks.DEFERRED_DEVICES
        _step_checks.DEFERRED_DEVICES = (*saved, mask.device.type)
        try:
            return super().__call__(validate, mask, *args, immediate=immediate)
        finally:
            _step_checks.DEFERRED_DEVICES = saved


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int, device) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(warmup + rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # rotated: no arm always first
            fn = fns[name]
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _per_call_us(fn: Callable[[], object], calls: int, device) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    unet = smp.Unet(args.encoder, encoder_weights=None, classes=1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    y_cpu = torch.zeros(args.batch, 1, args.size, args.size)
    y_cpu[:, :, args.size // 4 : args.size // 2, args.size // 5 : args.size // 2] = 1
    targets = tuple(t.to(device) for t in adst_targets(y_cpu))
    y = y_cpu.to(device)

    arms = {}
    for name in ("contract", "off", "deferred"):
        model = wrap_with_adst(copy.deepcopy(unet)).to(device)
        criterion = ADSTLoss(model)
        if name == "off":
            _contract_off(model, criterion)
        elif name == "deferred":
            criterion._mask_check = _DeferredHere("ADSTLoss")
        arms[name] = _step(model, criterion, x, y, targets)
    medians = _interleaved(arms, args.rounds, args.warmup, device)

    print(f"contract_overhead: {date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"device={device}, threads={torch.get_num_threads()}, Unet-{args.encoder}, batch {args.batch}, {args.size}²")
    print(f"median of {args.rounds} interleaved rounds (order rotated) after {args.warmup} warm-up rounds\n")
    print(f"{'arm':<10} {'ms/step':>9} {'vs off':>8}")
    for name, seconds in medians.items():
        print(f"{name:<10} {seconds * 1e3:9.2f} {seconds / medians['off']:8.3f}")

    model = wrap_with_adst(copy.deepcopy(unet)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnclaimedHeadOutputWarning)  # two forwards without a loss, on purpose
        out, other = model(x), model(x)
    sliced, copied = out[:, :1], out.clone()
    check_at_once, deferred = StepMaskCheck("bench"), _DeferredHere("bench")
    deferred(check_mask, y, "bench")  # the first batch of the shape: at once
    pieces = {
        "pairing: the output": lambda: comes_from(out, out),
        "pairing: a slice": lambda: comes_from(sliced, out),
        "pairing: a copy (.clone())": lambda: comes_from(copied, out),
        "pairing: another forward (error path)": lambda: comes_from(other, out),
        "mask check at once": lambda: check_at_once(check_mask, y, "bench"),
        "mask check deferred": lambda: deferred(check_mask, y, "bench"),
    }
    print(f"\n{'piece':<40} {'us/call':>9}")
    for name, fn in pieces.items():
        print(f"{name:<40} {_per_call_us(fn, 200, device):9.1f}")


if __name__ == "__main__":
    main()
