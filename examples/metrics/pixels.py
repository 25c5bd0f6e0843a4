"""Per-image lesion-segmentation metrics: Dice, IoU, precision, recall (via ``smp.metrics``), HD95, boundary IoU.

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
Boundary IoU is defined in :mod:`adst_examples.metrics.lesions` (both empty: 1; exactly one empty: 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import segmentation_models_pytorch as smp
import torch
from scipy import ndimage
from torch import Tensor

from adst_examples.metrics.lesions import boundary_iou

__all__ = [
    "METRIC_NAMES",
    "binarize",
    "confusion_stats",
    "hd95",
    "mask_boundary",
    "per_image_metrics",
]

#: Metrics computed by :func:`per_image_metrics`, in reporting order.
METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "precision", "recall", "hd95", "boundary_iou")

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
    p_np, t_np = p[:, 0].cpu().numpy(), t[:, 0].cpu().numpy()
    for name, fn in (("hd95", hd95), ("boundary_iou", boundary_iou)):
        if name in metrics:
            out[name] = torch.tensor([fn(a, b) for a, b in zip(p_np, t_np, strict=True)], dtype=torch.float64)
    return {m: out[m].detach().to("cpu", torch.float64) for m in METRIC_NAMES if m in out}
