"""The rule across datasets: one default for several datasets, decided on validation (:data:`ACROSS_RULE`).

Each dataset's own pick (:func:`~adst_examples.studylib.report.choose_default`) can differ from dataset to
dataset; the product has one default. The arm chosen here must be eligible (non-inferior on validation Dice) on every
dataset and is the one with the best mean of its per-dataset mean paired validation boundary-IoU differences. The
intervals between arms pair the runs by seed: seed ``k``'s value is the mean over the datasets of that seed's runs,
so the mean of the paired differences equals the difference of the deciding scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from adst_examples import stats
from adst_examples.studylib.arms import BASELINE, is_adst
from adst_examples.studylib.thresholds import MIN_SEEDS, finalist_pool, not_eligible

__all__ = ["ACROSS_RULE", "choose_across", "parse_tie_prefer"]

ACROSS_RULE = (
    "Across datasets: the ADST arm eligible (mean paired validation Dice difference >= -0.5 points) on every dataset "
    "with the best mean of its per-dataset mean paired validation boundary-IoU differences, decided among the arms "
    f"with >= {MIN_SEEDS} paired seeds on every dataset (the finalists); with none, the pick is provisional. "
    "With a tie preference CHEAP=OVER: if the pick is OVER and CHEAP is in the same pool, CHEAP wins when the "
    "seed-paired interval of CHEAP - OVER on validation boundary IoU (seed k: the mean over the datasets) spans 0."
)

Runs = Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]]  # dataset -> arm -> seed -> result


def parse_tie_prefer(text: str | None) -> tuple[str, str] | None:
    """``"adst-s4=adst"`` -> ``("adst-s4", "adst")``: the first arm wins a validation-BIoU tie with the second."""
    if not text:
        return None
    cheap, sep, over = (part.strip() for part in text.partition("="))
    if not (sep and cheap and over) or cheap == over:
        raise ValueError(f"--tie-prefer {text!r}: expected CHEAP=OVER with two different arm names, e.g. adst-s4=adst")
    return cheap, over


def _seed_means(runs: Runs, arm: str, datasets: list[str]) -> dict[int, float | None]:
    """``{seed: mean over the datasets of the run's val BIoU}`` for the seeds this arm finished on every dataset."""
    seeds = set.intersection(*(set(runs[d].get(arm, {})) for d in datasets))
    out: dict[int, float | None] = {}
    for seed in sorted(seeds):
        values = [runs[d][arm][seed]["val"].get("boundary_iou") for d in datasets]
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        out[seed] = sum(finite) / len(finite) if len(finite) == len(values) else None
    return out


def _between(runs: Runs, arm: str, other: str, datasets: list[str]) -> dict[str, Any]:
    """Seed-paired ``arm - other`` on validation BIoU, each seed averaged over the datasets."""
    return stats.paired(_seed_means(runs, arm, datasets), _seed_means(runs, other, datasets))


def choose_across(
    entries: Mapping[str, Mapping[str, Any]], runs: Runs, tie_prefer: tuple[str, str] | None = None
) -> dict[str, Any]:
    """:data:`ACROSS_RULE` over the report's dataset entries (``report["datasets"]``) and their runs.

    Returns:
        ``{datasets, arm, eligible, excluded, scores, per_dataset, provisional, short, vs_runner_up, tie_prefer}``;
        ``arm`` is ``None`` when no ADST arm is eligible on every dataset. ``scores``: arm -> the mean over the
        datasets of its mean paired Δ val BIoU (the deciding number); ``per_dataset``: arm -> dataset ->
        ``{dice, boundary_iou, n}`` (mean paired Δ val Dice and BIoU, paired validation seeds).
    """
    datasets = list(entries)
    first = entries[datasets[0]]["arms"]
    adst = [a for a in first if a != BASELINE and is_adst(first[a]["flags"])
            and all(a in entries[d]["arms"] for d in datasets)]  # fmt: skip
    per_dataset: dict[str, dict[str, dict[str, Any]]] = {}
    excluded: dict[str, str] = {}
    scores: dict[str, float] = {}
    for arm in adst:
        rows = {}
        for d in datasets:
            pv = entries[d]["arms"][arm]["paired_val"]
            rows[d] = {"dice": pv["dice"]["mean"], "boundary_iou": pv["boundary_iou"]["mean"],
                       "n": pv["boundary_iou"]["n"]}  # fmt: skip
        per_dataset[arm] = rows
        reasons = {d: not_eligible(entries[d]["arms"][arm]["paired_val"]) for d in datasets}
        if any(reasons.values()):
            excluded[arm] = "; ".join(f"{d}: {why}" for d, why in reasons.items() if why)
        else:
            scores[arm] = sum(r["boundary_iou"] for r in rows.values()) / len(rows)
    ranked = sorted(scores, key=lambda a: scores[a], reverse=True)
    out: dict[str, Any] = {"datasets": datasets, "rule": ACROSS_RULE, "arm": None, "eligible": ranked,
                           "excluded": excluded, "scores": scores, "per_dataset": per_dataset}  # fmt: skip
    if not ranked:
        return out
    seeds = {a: min(r["n"] for r in per_dataset[a].values()) for a in ranked}
    pool, fields = finalist_pool(ranked, seeds)
    out.update(fields)
    if len(pool) > 1:
        out["vs_runner_up"] = {"arm": pool[1], "paired_val_boundary_iou": _between(runs, pool[0], pool[1], datasets)}
    if tie_prefer is not None:
        cheap, over = tie_prefer
        record: dict[str, Any] = {"cheap": cheap, "over": over, "applied": False}
        if out["arm"] == over and cheap in pool:
            between = _between(runs, cheap, over, datasets)
            lo, hi = between["ci95"]
            record["paired_val_boundary_iou"] = between
            record["applied"] = bool(between["n"] > 1 and math.isfinite(lo) and lo <= 0 <= hi)
            if record["applied"]:
                out["rule_pick"], out["arm"], out["paired_seeds"] = over, cheap, seeds[cheap]
        elif out["arm"] != over:
            record["why_not"] = f"the pick is {out['arm']}, not {over}"
        else:
            record["why_not"] = f"{cheap} is not {'eligible' if out['provisional'] else 'a finalist'} on every dataset"
        out["tie_prefer"] = record
    return out
