"""Tests of examples/stats.py: a hand example and scipy.stats.ttest_rel."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from adst_examples import stats as st


def test_paired_hand_example() -> None:
    # diffs 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t(0.975, 2) = 4.302653, half width 4.302653 * 0.01 / sqrt(3)
    base = {0: 0.80, 1: 0.78, 2: 0.79}
    arm = {0: 0.81, 1: 0.80, 2: 0.82}
    out = st.paired(arm, base)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert out["n"] == 3 and out["better"] == 3
    assert out["mean"] == pytest.approx(0.02)
    assert out["std"] == pytest.approx(0.01)
    assert out["ci95"] == pytest.approx([0.02 - half, 0.02 + half])
    assert out["half_width"] == pytest.approx(half)
    assert out["per_seed"] == pytest.approx({"0": 0.01, "1": 0.02, "2": 0.03})


def test_paired_matches_ttest_rel() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(0.8, 0.02, 7)
    arm = base + rng.normal(0.005, 0.01, 7)
    out = st.paired(dict(enumerate(arm)), dict(enumerate(base)))
    ci = sps.ttest_rel(arm, base).confidence_interval(0.95)
    assert out["ci95"] == pytest.approx([ci.low, ci.high])
    assert out["better"] == int(np.sum(arm > base))


def test_lower_is_better_and_missing_seeds() -> None:
    base = {0: 10.0, 1: 12.0, 2: 11.0, 3: 9.0}
    arm = {0: 9.0, 1: 12.5, 2: float("nan"), 4: 1.0}  # seed 2 nan, seeds 3/4 unpaired
    out = st.paired(arm, base, higher_is_better=False)
    assert out["n"] == 2 and out["better"] == 1
    assert out["mean"] == pytest.approx(-0.25)


def test_single_seed_has_no_interval() -> None:
    out = st.paired({0: 0.9}, {0: 0.8})
    assert out["n"] == 1 and out["better"] == 1
    assert all(math.isnan(v) for v in out["ci95"]) and math.isnan(out["std"])
    empty = st.paired({}, {})
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_mean_std() -> None:
    out = st.mean_std([1.0, 2.0, None, float("nan"), 3.0])
    assert out == {"mean": 2.0, "std": 1.0, "n": 3}
