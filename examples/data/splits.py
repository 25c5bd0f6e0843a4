"""Seeded train/val/test splits of sample names (optionally stratified), saved as JSON, and the split's view.

Hand-written instead of scikit-learn's ``train_test_split``: that would add a dependency, take two chained calls
for three splits and depend on the input order; this one depends only on the set of names and the seed, and its
largest-remainder rounding makes the counts always sum to ``n``.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import tv_tensors

__all__ = [
    "SPLIT_KEYS",
    "LesionSplit",
    "get_or_create_split",
    "load_split",
    "make_split",
    "natural_key",
    "save_split",
    "split_indices",
]

#: Split names produced by :func:`make_split`.
SPLIT_KEYS: tuple[str, str, str] = ("train", "val", "test")

_MAX_LISTED = 20  # duplicate names listed in one error message


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``"benign (2)"`` before ``"benign (10)"``."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", text)]


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions`` (sums to ``n``; ties go to the earlier split)."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any((not math.isfinite(f)) or f < 0 for f in fractions):
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {tuple(fractions)}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)} (sum {sum(fractions)})")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def make_split(
    names: Sequence[str],
    *,
    seed: int,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    labels: Sequence[Any] | None = None,
) -> dict[str, list[str]]:
    """Deterministic random train/val/test split of sample names.

    The result depends only on the set of names (not their order), ``seed``, ``fractions`` and ``labels``.
    Counts use largest-remainder rounding, so they sum to ``len(names)``. With ``labels`` (e.g. BUSI classes)
    the split is stratified: every label group is split separately with the same fractions.

    Args:
        names: Unique sample identifiers.
        seed: Seed of the permutation.
        fractions: ``(train, val, test)`` fractions, non-negative, summing to 1.
        labels: Optional label per name for stratification.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each list in natural sort order.

    Raises:
        ValueError: duplicate names, bad fractions, or ``labels`` of the wrong length.
    """
    fracs = _check_fractions(fractions)
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})[:_MAX_LISTED]
        raise ValueError(f"make_split: duplicate sample names: {dupes}")
    if labels is not None and len(labels) != len(names):
        raise ValueError(f"make_split: {len(labels)} labels for {len(names)} names")
    label_list = [None] * len(names) if labels is None else list(labels)
    groups: dict[str, list[str]] = {}
    for name, label in zip(names, label_list, strict=True):
        groups.setdefault(str(label), []).append(name)
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {key: [] for key in SPLIT_KEYS}
    for label in sorted(groups):
        members = sorted(groups[label], key=natural_key)
        members = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for key, count in zip(SPLIT_KEYS, _split_counts(len(members), fracs), strict=True):
            split[key].extend(members[start : start + count])
            start += count
    return {key: sorted(value, key=natural_key) for key, value in split.items()}


def _validate_split(split: Any, source: str) -> dict[str, list[str]]:
    if not isinstance(split, dict) or set(split) != set(SPLIT_KEYS):
        keys = sorted(split) if isinstance(split, dict) else type(split).__name__
        raise ValueError(f"{source}: expected a dict with keys {list(SPLIT_KEYS)}, got {keys}")
    out: dict[str, list[str]] = {}
    for key in SPLIT_KEYS:
        value = split[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{source}: '{key}' must be a list of sample-name strings")
        out[key] = list(value)
    seen: dict[str, str] = {}
    for key in SPLIT_KEYS:
        for name in out[key]:
            if name in seen:
                raise ValueError(f"{source}: sample '{name}' appears in both '{seen[name]}' and '{key}'")
            seen[name] = key
    return out


def save_split(split: dict[str, list[str]], path: str | Path) -> Path:
    """Write a split as JSON (``{"train": [...], "val": [...], "test": [...]}``); creates parent folders.

    Returns:
        The path written.
    """
    split = _validate_split(split, "save_split")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=2) + "\n", encoding="utf-8")
    return path


def load_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split written by :func:`save_split`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not valid JSON, wrong structure, or a sample in two splits.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"split file '{path}' is not valid JSON: {exc}") from exc
    return _validate_split(data, f"split file '{path}'")


def get_or_create_split(
    names: Sequence[str],
    path: str | Path,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    *,
    labels: Sequence[Any] | None = None,
) -> dict[str, list[str]]:
    """Load the split at ``path`` if it exists, else create it with :func:`make_split` and save it.

    An existing file is reused as is (``seed``/``fractions``/``labels`` are then ignored). Samples of the dataset
    that the file does not mention trigger a warning (they belong to no split).

    Raises:
        ValueError: the existing file names samples that are not in ``names``.
    """
    path = Path(path)
    if path.exists():
        split = load_split(path)
        known = set(names)
        unknown = sorted((n for key in SPLIT_KEYS for n in split[key] if n not in known), key=natural_key)
        if unknown:
            raise ValueError(
                f"split file '{path}' names {len(unknown)} sample(s) not in the dataset, e.g. {unknown[:5]}; "
                "delete it or point to another split file"
            )
        covered = {n for key in SPLIT_KEYS for n in split[key]}
        missing = [n for n in names if n not in covered]
        if missing:
            warnings.warn(
                f"split file '{path}' does not cover {len(missing)} sample(s) of the dataset, e.g. {missing[:5]}",
                stacklevel=2,
            )
        return split
    split = make_split(names, seed=seed, fractions=fractions, labels=labels)
    save_split(split, path)
    return split


def split_indices(names: Sequence[str], split: dict[str, list[str]]) -> dict[str, list[int]]:
    """Map a name split to dataset indices (``names`` is the dataset's ``names`` list).

    Raises:
        KeyError: a split name is not in ``names``.
    """
    index = {name: i for i, name in enumerate(names)}
    out: dict[str, list[int]] = {}
    for key, members in split.items():
        missing = [m for m in members if m not in index]
        if missing:
            raise KeyError(f"split '{key}' names samples not in the dataset, e.g. {missing[:5]}")
        out[key] = [index[m] for m in members]
    return out


class LesionSplit(Subset):
    """One split of a lesion dataset: a ``Subset`` whose items are ``(index, image, mask)``.

    The index (into the split) lets evaluation name every image even when a ``DistributedSampler`` reorders and
    pads the batches. An optional joint transform (e.g. :func:`~adst_examples.data.transforms.train_transforms`) is
    called as ``transform(tv_tensors.Image(image), tv_tensors.Mask(mask))``; outputs are plain contiguous tensors.

    Attributes:
        names, tags: The split's sample names and tags, index-aligned with its items.
        in_channels: Image channels of the dataset.
    """

    def __init__(
        self,
        dataset: Dataset[tuple[Tensor, Tensor]],
        indices: Sequence[int],
        transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    ) -> None:
        super().__init__(dataset, list(indices))
        self.transform = transform
        self.names: list[str] = [dataset.names[i] for i in self.indices]  # type: ignore[attr-defined]
        self.tags: list[str | None] = [dataset.tags[i] for i in self.indices]  # type: ignore[attr-defined]
        self.in_channels: int = dataset.in_channels  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> tuple[int, Tensor, Tensor]:  # type: ignore[override]
        """``(index, image, mask)`` of the split's item ``index``, transformed."""
        image, mask = super().__getitem__(index)
        if self.transform is not None:
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
            image, mask = image.as_subclass(Tensor).contiguous(), mask.as_subclass(Tensor).contiguous()
        return index, image, mask

    def __getitems__(self, indices: list[int]) -> list[tuple[int, Tensor, Tensor]]:  # type: ignore[override]
        """The DataLoader's batched fetch: one :meth:`__getitem__` per index."""
        return [self[i] for i in indices]
