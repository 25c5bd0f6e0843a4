"""What the benchmark scripts share: a plain model from random init and interleaved timing.

Device choice, machine description and parameter counts come from :mod:`adst_examples.training` (one source each).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.utils import benchmark

from adst_examples.training.models import ARCHS

__all__ = ["ARCH_NAMES", "build_plain_model", "interleaved_medians"]

#: The smp architectures by class name (``--arch`` choices).
ARCH_NAMES: list[str] = list(ARCHS.values())


def build_plain_model(arch: str, encoder: str, in_channels: int = 3, seed: int = 0) -> nn.Module:
    """A binary smp model from random init (no downloads); DPT gets a small ViT since it needs one."""
    torch.manual_seed(seed)
    kwargs: dict = {"encoder_weights": None, "in_channels": in_channels, "classes": 1}
    if arch == "DPT" and "vit" not in encoder:
        encoder = "tu-vit_tiny_patch16_224"
        kwargs["dynamic_img_size"] = True
    return smp.create_model(arch, encoder_name=encoder, **kwargs)


def interleaved_medians(fns: dict[str, Callable[[], object]], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed A/B/A/B... after ``warmup`` rounds (so drift hits all alike).

    Each call is timed by ``torch.utils.benchmark.Timer.timeit(1)``, which synchronises the accelerator around it
    and runs two untimed warm-up calls before it; torch keeps its current thread count (the Timer's default would
    be one thread).
    """
    timers = {
        name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=name, num_threads=torch.get_num_threads())
        for name, fn in fns.items()
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + steps):
        for name, timer in timers.items():
            seconds = timer.timeit(1).median
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}
