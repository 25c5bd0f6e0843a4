"""Collect per-image metrics (and per-image small-lesion counts) over batches, ranks and splits; summarise them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adst_examples.metrics.classes import class_metric_names, per_class_dice
from adst_examples.metrics.lesions import SmallLesionCounts, small_lesion_counts
from adst_examples.metrics.pixels import METRIC_NAMES, binarize, per_image_metrics
from adst_examples.stats import MeanStd

__all__ = ["MetricAccumulator"]


class MetricAccumulator:
    """Per-image metric values (with optional per-image tag and name), summarised as mean ± std over images.

    Typical use::

        acc = MetricAccumulator()
        for image, mask in loader:
            acc.update(model(image) >= 0, mask, tags=batch_classes)
        acc.summary()                      # all images
        acc.summary(exclude={"normal"})    # e.g. BUSI without the lesion-free images
        acc.pooled()                       # small-lesion recall and Dice, pooled over the images

    Across DDP ranks, gather the plain-list :meth:`state` of every rank and :meth:`merge` them (or call
    :meth:`gather`). ``DistributedSampler`` pads ranks with repeated samples; pass ``names`` to :meth:`update`
    and call :meth:`drop_duplicates` after merging to count each image once.
    """

    def __init__(
        self,
        metrics: Sequence[str] = METRIC_NAMES,
        *,
        threshold: float = 0.5,
        small_lesions: bool = True,
        class_names: Sequence[str] = (),
    ) -> None:
        """Create an empty accumulator.

        Args:
            metrics: Per-image metrics to collect (subset of :data:`METRIC_NAMES`).
            threshold: Probability threshold used by :meth:`update` for floating predictions.
            small_lesions: Also count small lesions per image, for :meth:`pooled`.
            class_names: Of a multi-class task, every class by index (background first): :meth:`update` then also
                takes the class-index maps and collects the per-class Dice
                (:func:`~adst_examples.metrics.classes.class_metric_names`); ``()``: binary.
        """
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown or not metrics:
            raise ValueError(f"unknown or no metrics {list(metrics)}; valid: {list(METRIC_NAMES)}")
        self.metrics: tuple[str, ...] = tuple(metrics)
        self.threshold = threshold
        self.small_lesions = small_lesions
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.class_metrics: tuple[str, ...] = class_metric_names(class_names) if class_names else ()
        #: Every collected column: the metrics, then the per-class Dice.
        self.columns: tuple[str, ...] = self.metrics + self.class_metrics
        self.reset()

    def __len__(self) -> int:
        """Number of images collected."""
        return len(self.tags)

    def reset(self) -> None:
        """Forget every collected value."""
        self.values: dict[str, list[float]] = {m: [] for m in self.columns}
        self.small: list[list[int]] = []
        self.tags: list[str | None] = []
        self.names: list[str | None] = []

    def update(
        self,
        pred: Tensor | np.ndarray,
        target: Tensor | np.ndarray,
        tags: Sequence[str | None] | None = None,
        names: Sequence[str | None] | None = None,
        *,
        class_pred: Tensor | None = None,
        class_target: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the metrics of a ``(B, 1, H, W)`` batch and append them (``pred``: probabilities or bool).

        A multi-class accumulator (``class_names``) also needs ``class_pred`` and ``class_target``, the ``(B, H, W)``
        class indices; ``pred`` and ``target`` are then their "any lesion" masks (class > 0).

        Returns:
            The batch's per-image values (as from :func:`per_image_metrics`, plus the per-class Dice).
        """
        batch = per_image_metrics(pred, target, threshold=self.threshold, metrics=self.metrics)
        if self.class_metrics:
            if class_pred is None or class_target is None:
                raise ValueError("update: a multi-class accumulator (class_names) needs class_pred= and class_target=")
            dice = per_class_dice(class_pred, class_target, len(self.class_names)).cpu()
            batch |= dict(zip(self.class_metrics[:-1], dice.unbind(1), strict=True))
            batch[self.class_metrics[-1]] = dice.mean(1)
        small = None
        if self.small_lesions:
            p = binarize(pred, self.threshold, name="pred")[:, 0].cpu().numpy()
            t = binarize(target, 0.5, name="target")[:, 0].cpu().numpy()
            small = [small_lesion_counts(a, b).as_list() for a, b in zip(p, t, strict=True)]
        self.add(batch, tags=tags, names=names, small=small)
        return batch

    def add(
        self,
        values: Mapping[str, Sequence[float] | Tensor | np.ndarray],
        tags: Sequence[str | None] | None = None,
        names: Sequence[str | None] | None = None,
        small: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Append precomputed per-image values (one sequence of equal length per collected metric)."""
        missing = [m for m in self.columns if m not in values]
        if missing:
            raise ValueError(f"add: values lack metrics {missing}")
        columns = {m: [float(v) for v in _as_list(values[m])] for m in self.columns}
        count = len(columns[self.metrics[0]])
        if any(len(col) != count for col in columns.values()):
            raise ValueError(f"add: metric lists have different lengths {[len(c) for c in columns.values()]}")
        tag_list = [None] * count if tags is None else list(tags)
        name_list = [None] * count if names is None else list(names)
        if len(tag_list) != count or len(name_list) != count:
            raise ValueError(f"add: {count} images but {len(tag_list)} tags and {len(name_list)} names")
        if self.small_lesions:
            if small is None or len(small) != count:
                raise ValueError(f"add: {count} images need {count} small-lesion counts (small_lesions=True)")
            self.small.extend([int(c) for c in row] for row in small)
        for m in self.columns:
            self.values[m].extend(columns[m])
        self.tags.extend(tag_list)
        self.names.extend(name_list)

    def _keep(self, exclude: Iterable[str | None] | None) -> list[bool]:
        excluded = set(exclude or ())
        return [tag not in excluded for tag in self.tags]

    def per_image(self, metric: str, exclude: Iterable[str | None] | None = None) -> list[float]:
        """Values of one metric, skipping images whose tag is in ``exclude``."""
        return [v for v, k in zip(self.values[metric], self._keep(exclude), strict=True) if k]

    def summary(self, exclude: Iterable[str | None] | None = None, *, ddof: int = 0) -> dict[str, MeanStd]:
        """Mean ± std of every metric over the images whose tag is not in ``exclude``.

        Args:
            exclude: Tags to leave out, e.g. ``{"normal"}``.
            ddof: Delta degrees of freedom of the std (0: population std, as ``numpy.std``).

        Returns:
            ``{metric: MeanStd}``; with no images left the mean and std are ``nan``.
        """
        return {m: MeanStd.of(self.per_image(m, exclude), ddof=ddof) for m in self.columns}

    def pooled(self, exclude: Iterable[str | None] | None = None) -> dict[str, float]:
        """Small-lesion ``small_recall`` and ``small_dice`` pooled over the kept images, and ``small_lesions``."""
        if not self.small_lesions:
            return {}
        total = SmallLesionCounts()
        for row, keep in zip(self.small, self._keep(exclude), strict=True):
            if keep:
                total += SmallLesionCounts(*row)
        return {"small_recall": total.recall, "small_dice": total.dice, "small_lesions": float(total.total)}

    def means(self, exclude: Iterable[str | None] | None = None) -> dict[str, float]:
        """The flat record of a split: per-image means, the pooled scores and the number of images."""
        summary = self.summary(exclude)
        n = next(iter(summary.values())).n
        return {m: s.mean for m, s in summary.items()} | self.pooled(exclude) | {"images": float(n)}

    def format(self, exclude: Iterable[str | None] | None = None) -> str:
        """One-line summary, e.g. ``"dice 0.8123 ± 0.1040 | iou ... (n=120)"``."""
        summary = self.summary(exclude)
        n = next(iter(summary.values())).n
        return " | ".join(f"{m} {s}" for m, s in summary.items()) + f" (n={n})"

    def state(self) -> dict[str, Any]:
        """Plain-Python copy of the collected values (picklable; for ``all_gather_object``)."""
        return {
            "metrics": list(self.metrics),
            "class_names": list(self.class_names),
            "values": {m: list(v) for m, v in self.values.items()},
            "small": [list(row) for row in self.small] if self.small_lesions else None,
            "tags": list(self.tags),
            "names": list(self.names),
        }

    def merge(self, other: MetricAccumulator | Mapping[str, Any]) -> None:
        """Append the values of another accumulator or of a :meth:`state` dict (same metrics required)."""
        state = other.state() if isinstance(other, MetricAccumulator) else other
        if list(state["metrics"]) != list(self.metrics):
            raise ValueError(f"merge: metrics differ: {list(state['metrics'])} vs {list(self.metrics)}")
        if list(state.get("class_names", ())) != list(self.class_names):
            raise ValueError(f"merge: classes differ: {list(state.get('class_names', ()))} vs {list(self.class_names)}")
        self.add(state["values"], tags=state["tags"], names=state["names"], small=state.get("small"))

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *, threshold: float = 0.5) -> MetricAccumulator:
        """Rebuild an accumulator from :meth:`state`."""
        acc = cls(
            state["metrics"],
            threshold=threshold,
            small_lesions=state.get("small") is not None,
            class_names=state.get("class_names", ()),
        )
        acc.merge(state)
        return acc

    def drop_duplicates(self) -> int:
        """Keep only the first image of each non-``None`` name; returns how many were dropped."""
        seen: set[str] = set()
        keep: list[int] = []
        for i, name in enumerate(self.names):
            if name is None or name not in seen:
                keep.append(i)
                if name is not None:
                    seen.add(name)
        dropped = len(self.names) - len(keep)
        if dropped:
            self.values = {m: [v[i] for i in keep] for m, v in self.values.items()}
            self.small = [self.small[i] for i in keep] if self.small_lesions else []
            self.tags = [self.tags[i] for i in keep]
            self.names = [self.names[i] for i in keep]
        return dropped

    def gather(self) -> MetricAccumulator:
        """Return a new accumulator holding the values of every DDP rank (a copy of this one without DDP).

        Must be called on all ranks (uses ``torch.distributed.all_gather_object``).
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return MetricAccumulator.from_state(self.state(), threshold=self.threshold)
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state())
        merged = MetricAccumulator(
            self.metrics, threshold=self.threshold, small_lesions=self.small_lesions, class_names=self.class_names
        )
        for state in states:
            merged.merge(state)
        return merged


def _as_list(values: Sequence[float] | Tensor | np.ndarray) -> list[Any]:
    if isinstance(values, Tensor):
        return values.detach().cpu().reshape(-1).tolist()
    if isinstance(values, np.ndarray):
        return values.reshape(-1).tolist()
    return list(values)
