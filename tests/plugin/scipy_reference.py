"""The exact SciPy reference of the ADST targets, straight from the definitions in :mod:`adst_plugin.targets`.

One per-component, full-image ``scipy.ndimage.distance_transform_edt`` per lesion: slow and obviously right. The
tests check both target engines against it, and ``targets.py`` times them against it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from adst_plugin.constants import SHRINK_RATIO, THRESH_MAX, THRESH_MIN

__all__ = ["reference_boundary", "reference_targets"]


def reference_boundary(m: np.ndarray) -> np.ndarray:
    """Boundary of a 2-D bool mask: in the mask with a 4-neighbour outside; the frame replicates (is not outside)."""
    p = np.pad(m, 1, mode="edge")
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~interior


def reference_targets(
    mask: np.ndarray, r: float = SHRINK_RATIO, t_min: float = THRESH_MIN, t_max: float = THRESH_MAX
) -> tuple[np.ndarray, np.ndarray]:
    """Core and border of a bool ``(B, 1, H, W)`` mask, straight from the definitions (float64).

    Returns:
        ``(core, border)``: ``(B, 1, H, W)`` float64 each.
    """
    core = np.zeros(mask.shape)
    border = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        m = mask[i, 0].astype(bool)
        bnd = reference_boundary(m)
        labels, n = ndimage.label(m, structure=np.ones((3, 3), int))
        best = np.zeros(m.shape)
        for c in range(1, n + 1):
            comp = labels == c
            bnd_c = bnd & comp
            if not bnd_c.any():
                core[i, 0][comp] = 1.0
                continue
            offset = comp.sum() * (1.0 - r * r) / bnd_c.sum()
            dist = ndimage.distance_transform_edt(~bnd_c)
            sel = comp & (dist >= offset)
            if not sel.any():
                sel = comp & (dist == dist[comp].max())
            core[i, 0][sel] = 1.0
            best = np.maximum(best, np.clip(1.0 - dist / offset, 0.0, 1.0))
        border[i, 0] = t_min + (t_max - t_min) * best
    return core, border
