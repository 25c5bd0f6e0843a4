"""What a run leaves on disk and needs to resume: checkpoints, RNG states, seeds, JSON and CSV logs.

Checkpoints hold plain tensors and lists only, so they load with ``torch.load(weights_only=True)``; every file is
written to a temporary name and renamed, so a kill during a write never leaves a torn file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "get_rng_state",
    "jsonable",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "write_json",
    "write_log",
]

#: Tag stored in every checkpoint written by train.py (bumped if the layout changes).
CHECKPOINT_FORMAT = "adst-train-v1"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """RNG states as plain lists and tensors, so that checkpoints load with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
        "cuda": None,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename, so a kill during the write never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a train.py checkpoint on the CPU (plain tensors and lists only, so ``weights_only=True`` is safe).

    ``load_state_dict`` of modules and optimizers moves the tensors to their parameters' device.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a train.py checkpoint.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"'{path}' is not a train.py checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def jsonable(obj: Any) -> Any:
    """Strict-JSON-ready copy: NaN/inf → None, tuples → lists, NumPy scalars → Python, paths → str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (NaN → null), atomically; creates the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_log(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``log.csv`` and ``log.json`` from the full history (one row per epoch).

    Rewriting instead of appending keeps the logs exact after ``--resume``: the history lives in the checkpoint.
    """
    write_json(run_dir / "log.json", list(history))
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    tmp = run_dir / "log.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    os.replace(tmp, run_dir / "log.csv")


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value
