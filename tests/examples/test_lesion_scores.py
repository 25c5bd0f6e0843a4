"""Tests of adst_examples.metrics.lesions (boundary IoU, small lesions) and of their pooling by the metric
accumulator, against independent brute-force implementations (pure Python loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from adst_examples.metrics import MetricAccumulator
from adst_examples.metrics import lesions as ls

# --------------------------------------------------------------------------------------------------------------------
# Brute force: explicit windows and flood fill, nothing from scipy
# --------------------------------------------------------------------------------------------------------------------


def _bf_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """Mask pixels with a background pixel (or the outside of the image) within a (2d+1)² window."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            for yy in range(y - d, y + d + 1):
                for xx in range(x - d, x + d + 1):
                    if not (0 <= yy < h and 0 <= xx < w) or not mask[yy, xx]:
                        out[y, x] = True
    return out


def _bf_boundary_iou(p: np.ndarray, t: np.ndarray, d: int) -> float:
    bp, bt = _bf_boundary(p, d), _bf_boundary(t, d)
    union = sum(bool(a or b) for a, b in zip(bp.ravel(), bt.ravel(), strict=True))
    inter = sum(bool(a and b) for a, b in zip(bp.ravel(), bt.ravel(), strict=True))
    return 1.0 if union == 0 else inter / union


def _bf_components(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """8-connected components by flood fill."""
    h, w = mask.shape
    seen: set[tuple[int, int]] = set()
    comps = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and (y, x) not in seen:
                stack, comp = [(y, x)], set()
                seen.add((y, x))
                while stack:
                    cy, cx = stack.pop()
                    comp.add((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and (ny, nx) not in seen:
                                seen.add((ny, nx))
                                stack.append((ny, nx))
                comps.append(comp)
    return comps


def _bf_small(p: np.ndarray, t: np.ndarray, fraction: float) -> tuple[int, int, int, int, int]:
    small = [c for c in _bf_components(t) if len(c) < fraction * t.size]
    small_pixels = set().union(*small) if small else set()
    pred_comps = _bf_components(p)
    detected = sum(any(p[y, x] for y, x in c) for c in small)
    matched = set()
    for c in pred_comps:
        if c & small_pixels:
            matched |= c
    return detected, len(small), len(matched & small_pixels), len(matched), len(small_pixels)


# --------------------------------------------------------------------------------------------------------------------
# Boundary IoU
# --------------------------------------------------------------------------------------------------------------------


def test_boundary_dilation_matches_cheng() -> None:
    assert ls.boundary_dilation((256, 256)) == 7  # round(0.02 * 362.04)
    assert ls.boundary_dilation((32, 32)) == 1  # round(0.905) = 1
    assert ls.boundary_dilation((8, 8)) == 1  # at least one pixel
    assert ls.boundary_dilation((512, 512)) == 14


def test_boundary_iou_hand_example() -> None:
    # 10x10 square at d=1: boundary ring of 36 px. Shifted right by one column: ring of the same size.
    t = np.zeros((20, 20), bool)
    t[5:15, 5:15] = True
    p = np.zeros((20, 20), bool)
    p[5:15, 6:16] = True
    bt, bp = ls.boundary_region(t, 1), ls.boundary_region(p, 1)
    assert bt.sum() == 36 and bp.sum() == 36
    # The rings share the top and bottom rows over columns 6..14 (2*9) and the inner left/right columns:
    # t's right column (x=14, rows 6..13) lies on p's ring? p's ring has x in {6, 15} plus rows {5, 14}. So only
    # the rows count, plus t's left column x=5 is not in p; p's left column x=6 (rows 6..13) is t's interior.
    inter = 18
    assert (bt & bp).sum() == inter
    assert ls.boundary_iou(p, t, d=1) == pytest.approx(inter / (72 - inter))
    assert ls.boundary_iou(t, t) == 1.0


def test_boundary_iou_empty_cases() -> None:
    empty = np.zeros((16, 16), bool)
    blob = empty.copy()
    blob[4:8, 4:8] = True
    assert ls.boundary_iou(empty, empty) == 1.0
    assert ls.boundary_iou(blob, empty) == 0.0
    assert ls.boundary_iou(empty, blob) == 0.0


def test_boundary_region_touching_the_frame() -> None:
    # A mask filling the image: its boundary is the d-wide frame (the outside counts as background).
    full = np.ones((12, 12), bool)
    region = ls.boundary_region(full, 2)
    assert region.sum() == 144 - 8 * 8
    np.testing.assert_array_equal(region, _bf_boundary(full, 2))


@settings(max_examples=40, deadline=None)
@given(
    p=arrays(bool, (14, 17), elements=st.booleans()),
    t=arrays(bool, (14, 17), elements=st.booleans()),
    d=st.integers(1, 3),
)
def test_boundary_iou_matches_brute_force(p: np.ndarray, t: np.ndarray, d: int) -> None:
    np.testing.assert_array_equal(ls.boundary_region(t, d), _bf_boundary(t, d))
    assert ls.boundary_iou(p, t, d=d) == pytest.approx(_bf_boundary_iou(p, t, d))


# --------------------------------------------------------------------------------------------------------------------
# Small lesions
# --------------------------------------------------------------------------------------------------------------------


def test_small_lesions_hand_example() -> None:
    # 40x40 image: 1% = 16 px. GT: a 3x3 (small) lesion, a 2x2 (small) lesion, a 6x6 (large) lesion.
    t = np.zeros((40, 40), bool)
    t[2:5, 2:5] = True  # small A, 9 px
    t[20:22, 20:22] = True  # small B, 4 px
    t[30:36, 30:36] = True  # large, 36 px
    p = np.zeros((40, 40), bool)
    p[3:7, 3:7] = True  # overlaps A (4 px of A), component of 16 px
    p[30:36, 30:36] = True  # the large lesion: not counted
    p[10, 10] = True  # false alarm far away: not counted
    c = ls.small_lesion_counts(p, t)
    assert (c.detected, c.total) == (1, 2)
    assert (c.intersection, c.pred_pixels, c.target_pixels) == (4, 16, 13)
    assert c.recall == 0.5
    assert c.dice == pytest.approx(2 * 4 / (16 + 13))


def test_small_lesions_none() -> None:
    t = np.zeros((20, 20), bool)
    t[0:10, 0:10] = True  # 25% of the image: not small
    c = ls.small_lesion_counts(t, t)
    assert c.total == 0 and math.isnan(c.recall) and math.isnan(c.dice)
    assert ls.small_lesion_counts(t, np.zeros_like(t)).total == 0


def test_diagonal_neighbours_are_one_lesion() -> None:
    t = np.zeros((30, 30), bool)
    t[5, 5] = t[6, 6] = True  # 8-connected: one lesion of 2 px
    c = ls.small_lesion_counts(np.zeros_like(t), t)
    assert (c.detected, c.total, c.target_pixels) == (0, 1, 2)
    assert c.dice == 0.0


@settings(max_examples=40, deadline=None)
@given(
    p=arrays(bool, (12, 15), elements=st.sampled_from([False, False, True])),
    t=arrays(bool, (12, 15), elements=st.sampled_from([False, False, False, True])),
    fraction=st.sampled_from([0.01, 0.05, 0.2]),
)
def test_small_lesions_match_brute_force(p: np.ndarray, t: np.ndarray, fraction: float) -> None:
    c = ls.small_lesion_counts(p, t, fraction)
    assert (c.detected, c.total, c.intersection, c.pred_pixels, c.target_pixels) == _bf_small(p, t, fraction)


def test_accumulator_pools_over_batches() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((5, 1, 24, 24)) > 0.7
    t = rng.random((5, 1, 24, 24)) > 0.85
    acc = MetricAccumulator(["boundary_iou"])
    acc.update(torch.from_numpy(p[:2].astype(np.float32)), torch.from_numpy(t[:2]))
    acc.update(torch.from_numpy(p[2:]), torch.from_numpy(t[2:].astype(np.uint8)))
    out = acc.pooled() | {"boundary_iou": acc.summary()["boundary_iou"].mean}
    expected_b = np.mean([_bf_boundary_iou(a[0], b[0], 1) for a, b in zip(p, t, strict=True)])
    assert out["boundary_iou"] == pytest.approx(expected_b)
    totals = np.sum([_bf_small(a[0], b[0], 0.01) for a, b in zip(p, t, strict=True)], axis=0)
    assert out["small_lesions"] == totals[1]
    assert out["small_recall"] == pytest.approx(totals[0] / totals[1])
    assert out["small_dice"] == pytest.approx(2 * totals[2] / (totals[3] + totals[4]))
    # logits with threshold 0
    acc0 = MetricAccumulator(["boundary_iou"], threshold=0.0)
    acc0.update(torch.from_numpy(np.where(p, 3.0, -3.0)), torch.from_numpy(t))
    assert acc0.summary()["boundary_iou"].mean == pytest.approx(expected_b)
    # Pooled over the kept images only; the counts survive a state round trip (DDP gathering).
    tags = ["a", "b", "a", "b", "a"]
    acc1 = MetricAccumulator(["dice"])
    acc1.update(torch.from_numpy(p), torch.from_numpy(t), tags=tags)
    kept = np.sum([_bf_small(a[0], b[0], 0.01) for a, b, g in zip(p, t, tags, strict=True) if g == "a"], axis=0)
    only_a = MetricAccumulator.from_state(acc1.state()).pooled(exclude={"b"})
    assert only_a["small_lesions"] == kept[1]
    assert kept[1] > 0 and only_a["small_recall"] == pytest.approx(kept[0] / kept[1])
