"""Per-image lesion-segmentation metrics: Dice, IoU, precision, recall (via ``smp.metrics``) and HD95.

Inputs are batches ``(B, 1, H, W)``: predictions are probabilities (binarised with ``>= threshold``, default 0.5,
the same rule as ``smp.metrics.get_stats``; pass ``threshold=0.0`` for logits) or ``bool`` masks; targets are
``{0, 1}`` floats/ints or ``bool``. Every metric is computed **per image** and then averaged over images
(mean ± std), which is how lesion-segmentation papers usually report them.

Empty-mask conventions (``P`` = predicted lesion pixels, ``G`` = ground-truth lesion pixels):

==================  =====  =====  =========  ======  ===========================
case                Dice   IoU    precision  recall  HD95
==================  =====  =====  =========  ======  ===========================
P and G empty       1      1      1          1       0
P empty, G not      0      0      0 (*)      0       image diagonal sqrt(H²+W²)
G empty, P not      0      0      0          0 (*)   image diagonal sqrt(H²+W²)
==================  =====  =====  =========  ======  ===========================

(*) 0/0 in smp: resolved with ``zero_division=0`` (an empty prediction gets no precision credit for a missed
lesion; a false alarm on a lesion-free image gets no recall credit). Dice and IoU use ``zero_division=1``, which
can only trigger when both masks are empty. The diagonal is the largest distance two pixels of the image can
(roughly) have, so a missed or hallucinated lesion scores the worst possible HD95.

HD95 (in pixels, unit spacing) is defined exactly as follows (the ``medpy.metric.hd95`` definition):

1. The boundary of a mask is the set of its pixels that have at least one 4-neighbour outside the mask; pixels
   outside the image count as outside (so a mask touching the frame has boundary pixels on the frame).
2. For every boundary pixel of ``P`` take the Euclidean distance to the nearest boundary pixel of ``G``
   (``scipy.ndimage.distance_transform_edt`` of the complement of ``G``'s boundary), and vice versa.
3. Pool both directed distance sets into one array and take its 95th percentile with ``numpy.percentile``
   (default linear interpolation).

HD95 is hand-written (and cross-checked against a brute-force pixel-pair computation in the tests) because
``smp.metrics`` has no distance metric and MedPy / MONAI would each add a heavy dependency for one function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
from scipy import ndimage
from torch import Tensor

__all__ = [
    "METRIC_NAMES",
    "MeanStd",
    "MetricAccumulator",
    "binarize",
    "confusion_stats",
    "hd95",
    "mask_boundary",
    "per_image_metrics",
]

#: Metrics computed by :func:`per_image_metrics`, in reporting order.
METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "precision", "recall", "hd95")

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def binarize(x: Tensor | np.ndarray, threshold: float = 0.5, *, name: str = "pred") -> Tensor:
    """Turn a ``(B, 1, H, W)`` batch into a ``bool`` tensor.

    ``bool`` input is returned as is; floating input is ``x >= threshold``; integer input is ``x != 0``.

    Raises:
        TypeError: ``x`` is neither a tensor nor an array.
        ValueError: wrong shape, or NaN values.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name}: expected shape (B, 1, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.bool:
        return x
    if x.is_floating_point():
        if torch.isnan(x).any():
            raise ValueError(f"{name}: contains NaN")
        return x >= threshold
    return x != 0


def confusion_stats(pred: Tensor, target: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image ``tp, fp, fn, tn`` pixel counts (each ``(B, 1)`` long) via ``smp.metrics.get_stats``.

    Args:
        pred: ``(B, 1, H, W)`` probabilities or bool.
        target: ``(B, 1, H, W)`` ``{0, 1}`` or bool.
        threshold: Probability threshold for floating ``pred`` (``>=``).
    """
    p = binarize(pred, threshold, name="pred")
    t = binarize(target, 0.5, name="target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    return smp.metrics.get_stats(p.long(), t.to(p.device).long(), mode="binary")


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary of a 2-D ``bool`` mask: mask pixels with a 4-neighbour outside the mask (or outside the image)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_FOUR_CONNECTED, border_value=0)


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance (pixels) between two 2-D masks; see the module docstring.

    Both empty → 0; exactly one empty → ``sqrt(H² + W²)``.
    """
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(target, dtype=bool)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"hd95: expected two 2-D masks of the same shape, got {p.shape} and {t.shape}")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if not p_any or not t_any:
        return math.hypot(*p.shape)
    bp, bt = mask_boundary(p), mask_boundary(t)
    # All boundary pixels lie in the bounding box of P ∪ G, so the distance transforms can be computed there.
    rows = np.flatnonzero((p | t).any(axis=1))
    cols = np.flatnonzero((p | t).any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    bp, bt = bp[box], bt[box]
    d_pt = ndimage.distance_transform_edt(~bt)[bp]
    d_tp = ndimage.distance_transform_edt(~bp)[bt]
    return float(np.percentile(np.concatenate([d_pt, d_tp]), 95))


def per_image_metrics(
    pred: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    *,
    threshold: float = 0.5,
    metrics: Sequence[str] = METRIC_NAMES,
) -> dict[str, Tensor]:
    """Per-image metrics of a batch.

    Args:
        pred: ``(B, 1, H, W)`` probabilities (``>= threshold`` is lesion) or bool.
        target: ``(B, 1, H, W)`` ``{0, 1}`` or bool.
        threshold: Probability threshold.
        metrics: Subset of :data:`METRIC_NAMES` to compute (skip ``"hd95"`` to save time).

    Returns:
        ``{metric: float64 CPU tensor of shape (B,)}`` following the empty-case table of the module docstring.
    """
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {list(METRIC_NAMES)}")
    p = binarize(pred, threshold, name="pred")
    t = binarize(target, 0.5, name="target").to(p.device)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    tp, fp, fn, tn = smp.metrics.get_stats(p.long(), t.long(), mode="binary")
    both_empty = (tp + fp + fn == 0).squeeze(1)
    out: dict[str, Tensor] = {}
    if "dice" in metrics:
        out["dice"] = smp.metrics.f1_score(tp, fp, fn, tn, reduction="none", zero_division=1.0).squeeze(1)
    if "iou" in metrics:
        out["iou"] = smp.metrics.iou_score(tp, fp, fn, tn, reduction="none", zero_division=1.0).squeeze(1)
    if "precision" in metrics:
        value = smp.metrics.precision(tp, fp, fn, tn, reduction="none", zero_division=0.0).squeeze(1)
        out["precision"] = torch.where(both_empty, torch.ones_like(value), value)
    if "recall" in metrics:
        value = smp.metrics.recall(tp, fp, fn, tn, reduction="none", zero_division=0.0).squeeze(1)
        out["recall"] = torch.where(both_empty, torch.ones_like(value), value)
    if "hd95" in metrics:
        p_np = p[:, 0].cpu().numpy()
        t_np = t[:, 0].cpu().numpy()
        out["hd95"] = torch.tensor([hd95(a, b) for a, b in zip(p_np, t_np, strict=True)], dtype=torch.float64)
    return {m: out[m].detach().to("cpu", torch.float64) for m in METRIC_NAMES if m in out}


@dataclass(frozen=True)
class MeanStd:
    """Mean and standard deviation of a metric over ``n`` images (``nan`` when ``n == 0``)."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        """Format as ``0.8123 ± 0.1040``."""
        return f"{self.mean:.4f} ± {self.std:.4f}"


class MetricAccumulator:
    """Collect per-image metric values (with optional per-image tag and name) and summarise them.

    Typical use::

        acc = MetricAccumulator()
        for image, mask in loader:
            acc.update(model(image).sigmoid(), mask, tags=batch_classes)
        acc.summary()                      # all images
        acc.summary(exclude={"normal"})    # e.g. BUSI without the lesion-free images

    Across DDP ranks, gather the plain-list :meth:`state` of every rank and :meth:`merge` them (or call
    :meth:`gather`). ``DistributedSampler`` pads ranks with repeated samples; pass ``names`` to :meth:`update`
    and call :meth:`drop_duplicates` after merging to count each image once.
    """

    def __init__(self, metrics: Sequence[str] = METRIC_NAMES, *, threshold: float = 0.5) -> None:
        """Create an empty accumulator.

        Args:
            metrics: Metrics to collect (subset of :data:`METRIC_NAMES`).
            threshold: Probability threshold used by :meth:`update`.
        """
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown or not metrics:
            raise ValueError(f"unknown or no metrics {list(metrics)}; valid: {list(METRIC_NAMES)}")
        self.metrics: tuple[str, ...] = tuple(metrics)
        self.threshold = threshold
        self.values: dict[str, list[float]] = {m: [] for m in self.metrics}
        self.tags: list[str | None] = []
        self.names: list[str | None] = []

    def __len__(self) -> int:
        """Number of images collected."""
        return len(self.tags)

    def reset(self) -> None:
        """Forget every collected value."""
        self.values = {m: [] for m in self.metrics}
        self.tags = []
        self.names = []

    def update(
        self,
        pred: Tensor | np.ndarray,
        target: Tensor | np.ndarray,
        tags: Sequence[str | None] | None = None,
        names: Sequence[str | None] | None = None,
    ) -> dict[str, Tensor]:
        """Compute the metrics of a batch and append them.

        Args:
            pred: ``(B, 1, H, W)`` probabilities or bool.
            target: ``(B, 1, H, W)`` ``{0, 1}`` or bool.
            tags: Optional tag per image (e.g. BUSI class).
            names: Optional identifier per image.

        Returns:
            The batch's per-image values (as from :func:`per_image_metrics`).
        """
        batch = per_image_metrics(pred, target, threshold=self.threshold, metrics=self.metrics)
        self.add(batch, tags=tags, names=names)
        return batch

    def add(
        self,
        values: Mapping[str, Sequence[float] | Tensor | np.ndarray],
        tags: Sequence[str | None] | None = None,
        names: Sequence[str | None] | None = None,
    ) -> None:
        """Append precomputed per-image values (one sequence of equal length per collected metric)."""
        missing = [m for m in self.metrics if m not in values]
        if missing:
            raise ValueError(f"add: values lack metrics {missing}")
        columns = {m: [float(v) for v in _as_list(values[m])] for m in self.metrics}
        count = len(columns[self.metrics[0]])
        if any(len(col) != count for col in columns.values()):
            raise ValueError(f"add: metric lists have different lengths {[len(c) for c in columns.values()]}")
        tag_list = [None] * count if tags is None else list(tags)
        name_list = [None] * count if names is None else list(names)
        if len(tag_list) != count or len(name_list) != count:
            raise ValueError(f"add: {count} images but {len(tag_list)} tags and {len(name_list)} names")
        for m in self.metrics:
            self.values[m].extend(columns[m])
        self.tags.extend(tag_list)
        self.names.extend(name_list)

    def _keep(self, exclude: Iterable[str | None] | None) -> np.ndarray:
        excluded = set(exclude or ())
        return np.array([tag not in excluded for tag in self.tags], dtype=bool)

    def per_image(self, metric: str, exclude: Iterable[str | None] | None = None) -> list[float]:
        """Values of one metric, skipping images whose tag is in ``exclude``."""
        keep = self._keep(exclude)
        return [v for v, k in zip(self.values[metric], keep, strict=True) if k]

    def summary(self, exclude: Iterable[str | None] | None = None, *, ddof: int = 0) -> dict[str, MeanStd]:
        """Mean ± std of every metric over the images whose tag is not in ``exclude``.

        Args:
            exclude: Tags to leave out, e.g. ``{"normal"}``.
            ddof: Delta degrees of freedom of the std (0: population std, as ``numpy.std``).

        Returns:
            ``{metric: MeanStd}``; with no images left the mean and std are ``nan``.
        """
        keep = self._keep(exclude)
        n = int(keep.sum())
        out: dict[str, MeanStd] = {}
        for m in self.metrics:
            arr = np.asarray(self.values[m], dtype=np.float64)[keep]
            if n == 0:
                out[m] = MeanStd(math.nan, math.nan, 0)
            else:
                std = float(arr.std(ddof=ddof)) if n > ddof else math.nan
                out[m] = MeanStd(float(arr.mean()), std, n)
        return out

    def format(self, exclude: Iterable[str | None] | None = None) -> str:
        """One-line summary, e.g. ``"dice 0.8123 ± 0.1040 | iou ... (n=120)"``."""
        summary = self.summary(exclude)
        n = next(iter(summary.values())).n
        return " | ".join(f"{m} {s}" for m, s in summary.items()) + f" (n={n})"

    def state(self) -> dict[str, Any]:
        """Plain-Python copy of the collected values (picklable; for ``all_gather_object``)."""
        return {
            "metrics": list(self.metrics),
            "values": {m: list(v) for m, v in self.values.items()},
            "tags": list(self.tags),
            "names": list(self.names),
        }

    def merge(self, other: MetricAccumulator | Mapping[str, Any]) -> None:
        """Append the values of another accumulator or of a :meth:`state` dict (same metrics required)."""
        state = other.state() if isinstance(other, MetricAccumulator) else other
        if list(state["metrics"]) != list(self.metrics):
            raise ValueError(f"merge: metrics differ: {list(state['metrics'])} vs {list(self.metrics)}")
        self.add(state["values"], tags=state["tags"], names=state["names"])

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *, threshold: float = 0.5) -> MetricAccumulator:
        """Rebuild an accumulator from :meth:`state`."""
        acc = cls(state["metrics"], threshold=threshold)
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
        merged = MetricAccumulator(self.metrics, threshold=self.threshold)
        for state in states:
            merged.merge(state)
        return merged


def _as_list(values: Sequence[float] | Tensor | np.ndarray) -> list[Any]:
    if isinstance(values, Tensor):
        return values.detach().cpu().reshape(-1).tolist()
    if isinstance(values, np.ndarray):
        return values.reshape(-1).tolist()
    return list(values)
