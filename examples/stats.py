"""Statistics of the examples, in one place: mean ± std, and paired arm-vs-baseline differences over seeds.

A paired difference compares two arms trained with the same seed (same initialisation seed, same batch order and
augmentation draws, same split), so the seed-to-seed variance shared by both arms cancels. For ``n`` seeds with
differences ``d_i = arm_i - baseline_i``:

- ``mean`` = mean of ``d_i``; ``std`` = sample standard deviation (``ddof=1``);
- ``ci95`` = ``mean ± t(0.975, n-1) * std / sqrt(n)`` (Student t-interval; ``[nan, nan]`` for ``n < 2``), the
  interval of ``scipy.stats.ttest_rel(arm, baseline).confidence_interval(0.95)``;
- ``better`` = number of seeds where the arm is better (``d_i > 0``, or ``d_i < 0`` for a lower-is-better metric
  such as HD95); ties count as not better.

Non-finite values (a metric that is ``nan`` for a run, e.g. no small lesion in the split) drop that seed from the
pair. :class:`MeanStd` is the same summary as an object (what the per-image metric accumulator returns).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = ["MeanStd", "interval_above_zero", "mean_std", "paired", "t_interval"]


def _finite(values: Sequence[float | None]) -> np.ndarray:
    arr = np.asarray([v if v is not None else math.nan for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


@dataclass(frozen=True)
class MeanStd:
    """Mean and standard deviation of ``n`` finite values (``nan`` where undefined)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None], *, ddof: int = 1) -> MeanStd:
        """Over the finite values; ``ddof=1`` (sample std, over seeds) or ``0`` (population std, over images)."""
        arr = _finite(values)
        mean = float(arr.mean()) if arr.size else math.nan
        return cls(mean, float(arr.std(ddof=ddof)) if arr.size > ddof else math.nan, int(arr.size))

    def as_dict(self) -> dict[str, Any]:
        """``{mean, std, n}``, the form the JSON reports hold."""
        return asdict(self)

    def __str__(self) -> str:
        """Format as ``0.8123 ± 0.1040``."""
        return f"{self.mean:.4f} ± {self.std:.4f}"


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{mean, std, n}`` over the finite values (sample std; ``nan`` where undefined)."""
    return MeanStd.of(values).as_dict()


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t confidence interval of the mean of ``values``; ``(nan, nan)`` for fewer than 2."""
    arr = _finite(values)
    if arr.size < 2:
        return (math.nan, math.nan)
    half = float(sps.t.ppf(0.5 + confidence / 2, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    mean = float(arr.mean())
    return (mean - half, mean + half)


def paired(
    arm: Mapping[Any, float | None],
    baseline: Mapping[Any, float | None],
    *,
    higher_is_better: bool = True,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Paired differences ``arm - baseline`` over the seeds both have.

    Args:
        arm: ``{seed: value}`` of the arm.
        baseline: ``{seed: value}`` of the baseline.
        higher_is_better: ``False`` for distances such as HD95 (then ``better`` counts negative differences).
        confidence: Interval level.

    Returns:
        ``{per_seed: {seed: diff}, mean, std, ci95: [lo, hi], half_width, better, n}``.
    """
    seeds = sorted(
        s
        for s in set(arm) & set(baseline)
        if arm[s] is not None
        and baseline[s] is not None
        and math.isfinite(float(arm[s]))  # type: ignore[arg-type]
        and math.isfinite(float(baseline[s]))  # type: ignore[arg-type]
    )
    diffs = {s: float(arm[s]) - float(baseline[s]) for s in seeds}  # type: ignore[arg-type]
    values = list(diffs.values())
    lo, hi = t_interval(values, confidence)
    better = sum((d > 0) if higher_is_better else (d < 0) for d in values)
    summary = MeanStd.of(values)
    return {
        "per_seed": {str(s): d for s, d in diffs.items()},
        "mean": summary.mean,
        "std": summary.std,
        "ci95": [lo, hi],
        "half_width": (hi - lo) / 2 if math.isfinite(lo) else math.nan,
        "better": int(better),
        "n": len(values),
    }


def interval_above_zero(stat: Mapping[str, Any]) -> bool:
    """True when a :func:`paired` result's interval lies entirely above 0 (``None`` bounds: no interval)."""
    lo = stat.get("ci95", [None])[0]
    return lo is not None and math.isfinite(lo) and lo > 0
