"""Metrics of the examples, in one place: per-image overlap and distance metrics, boundary IoU, small lesions.

- ``pixels``: Dice, IoU, precision, recall (``smp.metrics``), HD95 and boundary IoU per image, with the empty-mask
  conventions.
- ``lesions``: boundary IoU (Cheng et al., CVPR 2021) and the small-lesion counts.
- ``classes``: per-class Dice of multi-class (class-index) masks and their mean over the lesion classes.
- ``accumulator``: :class:`MetricAccumulator`, which collects both over batches and DDP ranks and summarises them.

Statistics over seeds (paired intervals) are in :mod:`adst_examples.stats`.
"""

from adst_examples.metrics.accumulator import MetricAccumulator
from adst_examples.metrics.classes import CLASS_MEAN, class_metric_names, per_class_dice
from adst_examples.metrics.lesions import (
    BOUNDARY_DILATION_RATIO,
    POOLED_NAMES,
    SMALL_LESION_FRACTION,
    SmallLesionCounts,
    boundary_dilation,
    boundary_iou,
    boundary_region,
    small_lesion_counts,
)
from adst_examples.metrics.pixels import (
    METRIC_NAMES,
    binarize,
    confusion_stats,
    hd95,
    mask_boundary,
    per_image_metrics,
)

__all__ = [
    "BOUNDARY_DILATION_RATIO",
    "CLASS_MEAN",
    "METRIC_NAMES",
    "POOLED_NAMES",
    "SMALL_LESION_FRACTION",
    "MetricAccumulator",
    "SmallLesionCounts",
    "binarize",
    "boundary_dilation",
    "boundary_iou",
    "boundary_region",
    "class_metric_names",
    "confusion_stats",
    "hd95",
    "mask_boundary",
    "per_class_dice",
    "per_image_metrics",
    "small_lesion_counts",
]
