"""Where a process runs: torchrun's DDP context, the device choice, the model's placement and memory format,
autocast and a one-line machine description."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "autocast",
    "configure_backends",
    "describe_device",
    "place_model",
    "resolve_amp",
    "resolve_device",
    "setup_distributed",
    "teardown_distributed",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` / ``world_size`` (1 without DDP) and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """True when a process group is used."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """``dist.barrier()`` under DDP, nothing otherwise."""
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """Mean over ranks of a dict of floats (same keys on every rank)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA if available else CPU; ``cuda`` picks ``cuda:<local_rank>``.

    Raises:
        ValueError: ``cuda`` asked for but not available, or an unknown name.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def setup_distributed(device_name: str) -> DistContext:
    """Read torchrun's environment; with ``WORLD_SIZE > 1`` join the process group (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown_distributed(ctx: DistContext) -> None:
    """Leave the process group (only if this process is part of one)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp``: ``auto`` is bf16 on CUDA when supported, else fp16 on CUDA, off on CPU.

    Raises:
        ValueError: unknown mode, or fp16 requested off CUDA (CPU autocast supports bf16 only).
    """
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16 or --amp off")
        return torch.float16
    raise ValueError(f"--amp: expected auto, bf16, fp16 or off, got {mode!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """``torch.autocast`` for ``dtype``, or a disabled one when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def configure_backends(device: torch.device, *, deterministic: bool = False) -> None:
    """The numerics every run uses: cuDNN autotuning and TF32 matmuls on CUDA, unless ``deterministic``."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


def place_model(model: torch.nn.Module, device: torch.device, *, channels_last: bool = False) -> torch.nn.Module:
    """The model on ``device``; with ``channels_last`` its 4-D weights in NHWC order (``--channels-last``).

    Convolutions take the weights' layout, so the batches need no change. The values are the same, only float
    rounding differs; ``save_pretrained`` writes the export contiguous, so the saved model does not depend on it.
    """
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's thread count, e.g. ``"AMD EPYC 7B13, 2 threads"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"
