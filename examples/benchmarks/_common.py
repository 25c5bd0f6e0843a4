"""Helpers shared by the benchmark scripts: model building, device choice, interleaved timing, machine info."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch
from torch import nn

#: The 12 smp architectures, by class name.
ARCHS = [cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()]


def build_model(arch: str, encoder: str, in_channels: int = 3, seed: int = 0) -> nn.Module:
    """A binary smp model from random init (no downloads); DPT gets a small ViT since it needs one."""
    torch.manual_seed(seed)
    kwargs: dict = {"encoder_weights": None, "in_channels": in_channels, "classes": 1}
    if arch == "DPT" and "vit" not in encoder:
        encoder = "tu-vit_tiny_patch16_224"
        kwargs["dynamic_img_size"] = True
    return smp.create_model(arch, encoder_name=encoder, **kwargs)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, steps: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each fn, timed A/B/A/B... after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + steps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
