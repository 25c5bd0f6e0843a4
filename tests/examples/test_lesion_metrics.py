"""Tests of adst_examples.metrics: hand-computed overlap metrics, HD95 vs brute force, empty cases, accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import cdist

from adst_examples import metrics
from adst_examples.stats import MeanStd

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _batch(*masks: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


def _rect(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[top:bottom, left:right] = True
    return m


# --------------------------------------------------------------------------------------------------------------------
# Overlap metrics
# --------------------------------------------------------------------------------------------------------------------


def test_overlap_metrics_hand_computed() -> None:
    # case 0: pred 2x2 inside target 3x2 -> tp 4, fp 0, fn 2
    # case 1: pred rows 0-1, target rows 1-2 (4 columns) -> tp 4, fp 4, fn 4
    # case 2: pred 3x3 = 9 px, target 1 px inside -> tp 1, fp 8, fn 0
    pred = _batch(_rect(8, 8, 2, 2, 4, 4), _rect(8, 8, 0, 0, 2, 4), _rect(8, 8, 0, 0, 3, 3))
    target = _batch(_rect(8, 8, 2, 2, 5, 4), _rect(8, 8, 1, 0, 3, 4), _rect(8, 8, 1, 1, 2, 2))
    out = metrics.per_image_metrics(pred, target)
    assert list(out) == list(metrics.METRIC_NAMES)
    np.testing.assert_allclose(out["dice"].numpy(), [8 / 10, 8 / 16, 2 / 10], rtol=1e-6)
    np.testing.assert_allclose(out["iou"].numpy(), [4 / 6, 4 / 12, 1 / 9], rtol=1e-6)
    np.testing.assert_allclose(out["precision"].numpy(), [1.0, 0.5, 1 / 9], rtol=1e-6)
    np.testing.assert_allclose(out["recall"].numpy(), [4 / 6, 0.5, 1.0], rtol=1e-6)
    assert all(v.dtype == torch.float64 and v.shape == (3,) for v in out.values())
    tp, fp, fn, tn = metrics.confusion_stats(pred, target)
    assert tp[:, 0].tolist() == [4, 4, 1] and fp[:, 0].tolist() == [0, 4, 8] and fn[:, 0].tolist() == [2, 4, 0]
    assert (tp + fp + fn + tn)[:, 0].tolist() == [64, 64, 64]


def test_threshold_and_input_types() -> None:
    target = _batch(_rect(4, 4, 0, 0, 2, 2))
    probs = torch.zeros(1, 1, 4, 4)
    probs[0, 0, :2, :2] = torch.tensor([[0.5, 0.9], [0.7, 0.6]])
    probs[0, 0, 3, 3] = 0.4999
    assert metrics.per_image_metrics(probs, target)["dice"].item() == 1.0  # >= 0.5 is lesion, 0.4999 is not
    assert metrics.per_image_metrics(probs, target, threshold=0.55)["recall"].item() == pytest.approx(0.75)
    as_bool = metrics.per_image_metrics(probs.numpy() >= 0.5, target.bool())
    assert as_bool["dice"].item() == 1.0 and as_bool["hd95"].item() == 0.0
    assert metrics.per_image_metrics(target.long() * 255, target)["iou"].item() == 1.0
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        metrics.per_image_metrics(probs[0], target[0])
    with pytest.raises(ValueError, match="differ"):
        metrics.per_image_metrics(probs, torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        metrics.per_image_metrics(torch.full((1, 1, 4, 4), math.nan), target)
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.per_image_metrics(probs, target, metrics=["dice", "f2"])
    only = metrics.per_image_metrics(probs, target, metrics=["hd95", "dice"])
    assert list(only) == ["dice", "hd95"]


def test_empty_case_conventions() -> None:
    h, w = 6, 8
    empty, lesion = np.zeros((h, w), dtype=bool), _rect(h, w, 1, 1, 3, 3)
    pred = _batch(empty, empty, lesion)
    target = _batch(empty, lesion, empty)
    out = {k: v.tolist() for k, v in metrics.per_image_metrics(pred, target).items()}
    assert out["dice"] == [1.0, 0.0, 0.0]
    assert out["iou"] == [1.0, 0.0, 0.0]
    assert out["precision"] == [1.0, 0.0, 0.0]
    assert out["recall"] == [1.0, 0.0, 0.0]
    assert out["hd95"] == [0.0, 10.0, 10.0]  # sqrt(6² + 8²)
    assert metrics.hd95(empty, lesion) == metrics.hd95(lesion, empty) == math.hypot(h, w)


# --------------------------------------------------------------------------------------------------------------------
# HD95
# --------------------------------------------------------------------------------------------------------------------


def _brute_boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask; outside the image counts as outside."""
    padded = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if mask[y, x]:
                py, px = y + 1, x + 1
                neighbours = (padded[py - 1, px], padded[py + 1, px], padded[py, px - 1], padded[py, px + 1])
                out[y, x] = not all(neighbours)
    return out


def _brute_hd95(pred: np.ndarray, target: np.ndarray) -> float:
    a = np.argwhere(_brute_boundary(pred)).astype(float)
    b = np.argwhere(_brute_boundary(target)).astype(float)
    d = cdist(a, b)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def test_hd95_hand_computed() -> None:
    a, b = np.zeros((10, 10), dtype=bool), np.zeros((10, 10), dtype=bool)
    a[1, 1], b[4, 5] = True, True  # 3-4-5 triangle
    assert metrics.hd95(a, b) == pytest.approx(5.0)
    square = _rect(12, 12, 2, 2, 8, 8)
    assert metrics.hd95(square, square) == 0.0
    shifted = _rect(12, 12, 2, 4, 8, 10)  # shifted right by 2 px
    assert metrics.hd95(square, shifted) == pytest.approx(_brute_hd95(square, shifted))
    full = np.ones((5, 7), dtype=bool)
    np.testing.assert_array_equal(metrics.mask_boundary(full), _brute_boundary(full))  # frame is boundary
    assert metrics.hd95(full, full) == 0.0


@st.composite
def _mask_pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    elements = st.booleans()
    a = draw(arrays(np.bool_, (h, w), elements=elements))
    b = draw(arrays(np.bool_, (h, w), elements=elements))
    return a, b


@settings(max_examples=150, deadline=None)
@given(_mask_pair())
def test_hd95_matches_brute_force(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    np.testing.assert_array_equal(metrics.mask_boundary(a), _brute_boundary(a))
    value = metrics.hd95(a, b)
    assert value == metrics.hd95(b, a)  # symmetric by construction
    if not a.any() and not b.any():
        assert value == 0.0
    elif not a.any() or not b.any():
        assert value == math.hypot(*a.shape)
    else:
        assert value == pytest.approx(_brute_hd95(a, b), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(_mask_pair())
def test_overlap_metrics_match_numpy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    out = metrics.per_image_metrics(_batch(a), _batch(b), metrics=["dice", "iou", "precision", "recall"])
    tp, fp, fn = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    if tp + fp + fn == 0:
        expected = dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0)
    else:
        expected = dict(
            dice=2 * tp / (2 * tp + fp + fn),
            iou=tp / (tp + fp + fn),
            precision=tp / (tp + fp) if tp + fp else 0.0,
            recall=tp / (tp + fn) if tp + fn else 0.0,
        )
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-6), key


# --------------------------------------------------------------------------------------------------------------------
# Accumulator
# --------------------------------------------------------------------------------------------------------------------


def test_accumulator_mean_std_and_exclusion() -> None:
    acc = metrics.MetricAccumulator()
    h = w = 8
    empty, lesion = np.zeros((h, w), dtype=bool), _rect(h, w, 2, 2, 6, 6)
    half = _rect(h, w, 2, 2, 6, 4)  # half of the lesion -> dice 2*8/(8+16) = 2/3
    acc.update(_batch(lesion, half), _batch(lesion, lesion), tags=["benign", "malignant"], names=["a", "b"])
    acc.update(_batch(empty), _batch(empty), tags=["normal"], names=["c"])
    assert len(acc) == 3 and acc.tags == ["benign", "malignant", "normal"]
    dice = [1.0, 2 / 3, 1.0]
    summary = acc.summary()
    assert summary["dice"].mean == pytest.approx(np.mean(dice)) and summary["dice"].n == 3
    assert summary["dice"].std == pytest.approx(np.std(dice))
    assert acc.summary(ddof=1)["dice"].std == pytest.approx(np.std(dice, ddof=1))
    no_normal = acc.summary(exclude={"normal"})
    assert no_normal["dice"].mean == pytest.approx(np.mean(dice[:2])) and no_normal["dice"].n == 2
    assert acc.per_image("dice", exclude={"normal"}) == pytest.approx(dice[:2])
    nothing = acc.summary(exclude={"benign", "malignant", "normal"})
    assert nothing["iou"].n == 0 and math.isnan(nothing["iou"].mean)
    assert str(MeanStd(0.81234, 0.1, 5)) == "0.8123 ± 0.1000"
    assert acc.format(exclude={"normal"}).endswith("(n=2)") and "dice 0.8333 ± 0.1667" in acc.format({"normal"})


def test_accumulator_state_merge_and_duplicates() -> None:
    a = metrics.MetricAccumulator(["dice", "hd95"], small_lesions=False)
    a.add({"dice": [0.5, 1.0], "hd95": torch.tensor([3.0, 0.0])}, tags=["x", "y"], names=["n1", "n2"])
    b = metrics.MetricAccumulator(["dice", "hd95"], small_lesions=False)
    b.add({"dice": np.array([0.25]), "hd95": [7.0]}, tags=["x"], names=["n1"])  # DDP padding duplicate
    state = a.state()
    state["values"]["dice"].append(99.0)  # state is a copy
    assert a.values["dice"] == [0.5, 1.0]
    merged = metrics.MetricAccumulator.from_state(a.state())
    merged.merge(b.state())
    merged.merge(metrics.MetricAccumulator(["dice", "hd95"], small_lesions=False))
    assert merged.values["dice"] == [0.5, 1.0, 0.25] and merged.names == ["n1", "n2", "n1"]
    assert merged.drop_duplicates() == 1
    assert merged.values == {"dice": [0.5, 1.0], "hd95": [3.0, 0.0]} and merged.tags == ["x", "y"]
    copy = a.gather()  # no process group: a copy
    assert copy is not a and copy.state() == a.state()
    with pytest.raises(ValueError, match="metrics differ"):
        a.merge(metrics.MetricAccumulator(["dice"]))
    with pytest.raises(ValueError, match="different lengths"):
        a.add({"dice": [1.0], "hd95": [1.0, 2.0]})
    with pytest.raises(ValueError, match="tags"):
        a.add({"dice": [1.0], "hd95": [1.0]}, tags=["x", "y"])
    with pytest.raises(ValueError, match="lack"):
        a.add({"dice": [1.0]})
    a.reset()
    assert len(a) == 0 and a.values == {"dice": [], "hd95": []}
