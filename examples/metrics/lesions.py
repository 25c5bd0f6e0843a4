"""Lesion scores where the ADST paper claims its gains: boundary IoU and small-lesion recall / Dice.

**Boundary IoU** (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation Evaluation", CVPR 2021),
as in their reference ``mask_to_boundary``:

1. ``d = max(1, round(0.02 * sqrt(H² + W²)))`` pixels (2 % of the image diagonal; 7 px at 256², 1 px at 32²).
2. The boundary region of a mask is the mask minus its erosion by a 3×3 square applied ``d`` times, with pixels
   outside the image counted as background. Equivalently: mask pixels whose chessboard (L∞) distance to the
   nearest background pixel, the outside of the image included, is at most ``d``.
3. Boundary IoU = |B(P) ∩ B(G)| / |B(P) ∪ B(G)|. Both masks empty → 1 (nothing to find, nothing found);
   exactly one empty → 0. A non-empty mask always has a non-empty boundary region, so these are the only
   0/0 cases.

**Small lesions**: the connected components (8-connectivity) of the ground truth whose area is below 1 % of the
image area (655 px at 256²).

- *Matching rule*: a small GT lesion is **detected** when at least one predicted lesion pixel lies inside it
  (equivalently, some 8-connected predicted component overlaps it).
- *Small-lesion recall* = detected / total small GT lesions, pooled over all images of the split.
- *Small-lesion Dice* = 2|M ∩ S| / (|M| + |S|) pooled over all images, where ``S`` is the union of the small GT
  lesions and ``M`` the union of the predicted components that overlap a small GT lesion. So a detection by a
  huge blob, or a half-found lesion, is paid for in Dice, while false alarms far from any small lesion are not
  (they are already in the image-level Dice).

Both are ``nan`` when the split holds no small lesion (JSON reports write ``null``).

Inputs are 2-D masks; :class:`~adst_examples.metrics.MetricAccumulator` applies them to each image of a batch
and pools the small-lesion counts over a split.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import numpy as np
from scipy import ndimage
from torch import Tensor

__all__ = [
    "BOUNDARY_DILATION_RATIO",
    "POOLED_NAMES",
    "SMALL_LESION_FRACTION",
    "SmallLesionCounts",
    "boundary_dilation",
    "boundary_iou",
    "boundary_region",
    "small_lesion_counts",
]

BOUNDARY_DILATION_RATIO = 0.02
SMALL_LESION_FRACTION = 0.01
#: Pooled small-lesion scores (over a split, not per image), in reporting order.
POOLED_NAMES: tuple[str, ...] = ("small_recall", "small_dice")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _mask2d(mask: np.ndarray | Tensor, name: str) -> np.ndarray:
    arr = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D mask, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def boundary_dilation(shape: tuple[int, int], ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Boundary width ``d`` in pixels: ``max(1, round(ratio * diagonal))`` (Cheng et al.'s ``dilation``)."""
    return max(1, round(ratio * math.hypot(*shape)))


def boundary_region(mask: np.ndarray | Tensor, d: int) -> np.ndarray:
    """Mask pixels within chessboard distance ``d`` of the background (outside of the image included)."""
    m = _mask2d(mask, "boundary_region")
    if d < 1:
        raise ValueError(f"boundary_region: d must be >= 1, got {d}")
    if not m.any():
        return m.copy()
    eroded = ndimage.binary_erosion(m, structure=_EIGHT_CONNECTED, iterations=d, border_value=0)
    return m & ~eroded


def boundary_iou(pred: np.ndarray | Tensor, target: np.ndarray | Tensor, d: int | None = None) -> float:
    """Boundary IoU of two 2-D masks (``d`` defaults to 2 % of the diagonal); both empty → 1."""
    p, t = _mask2d(pred, "pred"), _mask2d(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"boundary_iou: shapes differ: {p.shape} vs {t.shape}")
    d = boundary_dilation(p.shape) if d is None else d
    bp, bt = boundary_region(p, d), boundary_region(t, d)
    union = int((bp | bt).sum())
    if union == 0:
        return 1.0
    return float((bp & bt).sum()) / union


@dataclass
class SmallLesionCounts:
    """Pooled small-lesion counts: lesions found / total, and the pixel sums behind the Dice."""

    detected: int = 0
    total: int = 0
    intersection: int = 0
    pred_pixels: int = 0
    target_pixels: int = 0

    def __iadd__(self, other: SmallLesionCounts) -> SmallLesionCounts:
        self.detected += other.detected
        self.total += other.total
        self.intersection += other.intersection
        self.pred_pixels += other.pred_pixels
        self.target_pixels += other.target_pixels
        return self

    def as_list(self) -> list[int]:
        """The five counts, in field order (a plain list for JSON and ``all_gather_object``)."""
        return list(astuple(self))

    @property
    def recall(self) -> float:
        """detected / total (``nan`` without small lesions)."""
        return self.detected / self.total if self.total else math.nan

    @property
    def dice(self) -> float:
        """2|M ∩ S| / (|M| + |S|) (``nan`` without small lesions)."""
        return 2.0 * self.intersection / (self.pred_pixels + self.target_pixels) if self.total else math.nan


def small_lesion_counts(
    pred: np.ndarray | Tensor, target: np.ndarray | Tensor, fraction: float = SMALL_LESION_FRACTION
) -> SmallLesionCounts:
    """Small-lesion counts of one image (see the module docstring for the rule)."""
    p, t = _mask2d(pred, "pred"), _mask2d(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"small_lesion_counts: shapes differ: {p.shape} vs {t.shape}")
    out = SmallLesionCounts()
    if not t.any():
        return out
    labels, n = ndimage.label(t, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    small_ids = np.flatnonzero(areas < fraction * t.size)
    small_ids = small_ids[small_ids > 0]
    if small_ids.size == 0:
        return out
    small = np.isin(labels, small_ids)
    hit_ids = np.unique(labels[small & p])
    out.total = int(small_ids.size)
    out.detected = int(hit_ids.size)
    matched = np.zeros_like(p)
    if hit_ids.size:
        p_labels, _ = ndimage.label(p, structure=_EIGHT_CONNECTED)
        matched = np.isin(p_labels, np.unique(p_labels[small & p]))
    out.intersection = int((matched & small).sum())
    out.pred_pixels = int(matched.sum())
    out.target_pixels = int(small.sum())
    return out
