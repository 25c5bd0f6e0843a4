"""The study's report (``study.json``): per dataset and arm, metrics over seeds, paired differences against the
baseline, the step-time ratio, and the default chosen by the rule fixed before the runs (:data:`RULE`).

It reads nothing but the runs' result.json records, so any folder of them can be reported (``--report-only``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from adst_examples import stats
from adst_examples.studylib.across import choose_across
from adst_examples.studylib.arms import BASELINE, is_adst
from adst_examples.studylib.plan import Job, run_settings
from adst_examples.studylib.thresholds import MIN_SEEDS, NON_INFERIORITY, finalist_pool, not_eligible

__all__ = [
    "CONVERGENCE_WINDOW",
    "LOWER_IS_BETTER",
    "METRICS",
    "MIN_SEEDS",
    "NON_INFERIORITY",
    "RULE",
    "build_report",
    "choose_default",
    "class_metrics",
]

#: Reported metrics; HD95 is a distance (lower is better), the others are overlaps/rates (higher is better).
METRICS: tuple[str, ...] = ("dice", "iou", "hd95", "boundary_iou", "small_recall", "small_dice")
LOWER_IS_BETTER = frozenset({"hd95"})
RULE = (
    "The default is the ADST arm with the best mean paired validation boundary IoU difference against the baseline "
    "(datasets.<name>.arms.<arm>.paired_val.boundary_iou.mean), among the ADST arms whose mean paired validation "
    "Dice difference is >= -0.5 points (non-inferior). Test metrics are reported, never used to choose. If no arm's "
    "paired boundary-IoU interval lies above 0, the report says so. "
    f"The rule decides among the eligible arms with >= {MIN_SEEDS} paired seeds (the finalists); arms with fewer are "
    "reported, not chosen. While no eligible arm has that many, its pick among all eligible arms is provisional."
)
#: The convergence check's window: the last epochs of a run.
CONVERGENCE_WINDOW = 3


def _per_seed(runs: dict[int, dict[str, Any]], split: str, metric: str) -> dict[int, float | None]:
    """``{seed: value}`` of one metric on one split, the input of :func:`stats.paired`."""
    return {seed: r[split].get(metric) for seed, r in runs.items()}


def _convergence(runs: Iterable[dict[str, Any]], last: int = CONVERGENCE_WINDOW) -> dict[str, Any]:
    """Was training still improving at its end? The share of runs whose best validation epoch is the last,
    and how much the best-so-far validation Dice rose over the last ``last`` epochs (mean ± std over runs)."""
    at_last, gains = [], []
    for r in runs:
        curve = [h["val_dice"] for h in r.get("history", [])]
        at_last.append(float(r["best_epoch"] == r.get("epochs_run", len(curve))))
        if len(curve) > last:
            gains.append(max(curve) - max(curve[:-last]))
    return {"best_at_last": stats.mean_std(at_last)["mean"], "best_gain_last": stats.mean_std(gains), "last": last}


def class_metrics(results: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    """The per-class Dice columns of multi-class runs (``dice_<class>`` ..., ``dice_class_mean``), in their order;
    ``()`` for binary ones."""
    for r in results:
        return tuple(m for m in r["test"] if m.startswith("dice_"))
    return ()


def _step_ratio(runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]) -> tuple[float, int]:
    """Geometric mean over the seeds of the arm's s/step over the baseline's, of the pairs run with the same
    settings (:func:`~adst_examples.studylib.plan.run_settings`), and the number of such pairs; ``nan`` with none."""
    ratios = [
        runs[s]["timing"]["s_per_step"] / base[s]["timing"]["s_per_step"]
        for s in sorted(set(runs) & set(base))
        if run_settings(runs[s]) == run_settings(base[s]) and base[s]["timing"]["s_per_step"] > 0
    ]
    return (math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else math.nan), len(ratios)


def _arm_entry(runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]], flags: str, is_baseline: bool,
               metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:  # fmt: skip
    a: dict[str, Any] = {
        "flags": flags,
        "seeds": sorted(runs),
        "n_runs": len(runs),
        "test": {m: stats.mean_std([r["test"].get(m) for r in runs.values()]) for m in metrics},
        "val": {m: stats.mean_std([r["val"].get(m) for r in runs.values()]) for m in metrics},
        "best_epoch": stats.mean_std([r["best_epoch"] for r in runs.values()]),
        "epochs_run": stats.mean_std([r.get("epochs_run", r["epochs"]) for r in runs.values()]),
        "s_per_step": stats.mean_std([r["timing"]["s_per_step"] for r in runs.values()]),
        "s_per_epoch": stats.mean_std([r["timing"]["s_per_epoch"] for r in runs.values()]),
        "convergence": _convergence(runs.values()),
    }
    a["step_ratio"], a["step_ratio_pairs"] = _step_ratio(runs, base)
    if not is_baseline:
        for key, split in (("paired", "test"), ("paired_val", "val")):
            a[key] = {
                m: stats.paired(
                    _per_seed(runs, split, m), _per_seed(base, split, m), higher_is_better=m not in LOWER_IS_BETTER
                )
                for m in metrics
            }
    return a


def choose_default(arms: dict[str, dict[str, Any]], by_arm: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The rule (:data:`RULE`) applied to one dataset's arm entries.

    Returns:
        ``{arm, eligible, excluded, paired_val_boundary_iou, paired_val_dice, paired_test_boundary_iou,
        paired_test_dice, paired_seeds, provisional, biou_above_zero_val, biou_above_zero_test, vs_runner_up}``;
        ``arm`` is ``None`` when no ADST arm is eligible. The pick is made among the *finalists*, the eligible arms
        with >= :data:`MIN_SEEDS` paired validation seeds (``short``: the other eligible arms and their seed
        counts, reported but not chosen); with no finalist it is made among all eligible arms and is
        ``provisional``. ``paired_seeds``: the pick's paired validation seeds.
    """
    adst = {a: e for a, e in arms.items() if a != BASELINE and is_adst(e["flags"])}
    eligible, excluded = {}, {}
    for arm, e in adst.items():
        why = not_eligible(e["paired_val"])
        if why:
            excluded[arm] = why
        else:
            eligible[arm] = e["paired_val"]["boundary_iou"]["mean"]
    ranked = sorted(eligible, key=lambda a: eligible[a], reverse=True)
    out: dict[str, Any] = {
        "arm": ranked[0] if ranked else None,
        "eligible": ranked,
        "excluded": excluded,
        # Statements of evidence, not part of the choice: which ADST arms raise BIoU with an interval above 0.
        "biou_above_zero_val": [a for a in adst if stats.interval_above_zero(adst[a]["paired_val"]["boundary_iou"])],
        "biou_above_zero_test": [a for a in adst if stats.interval_above_zero(adst[a]["paired"]["boundary_iou"])],
    }
    # Finalists the Dice margin excluded: with none eligible, the pick below falls to arms with fewer seeds.
    out["excluded_finalists"] = [a for a in excluded if adst[a]["paired_val"]["boundary_iou"]["n"] >= MIN_SEEDS]
    if not ranked:
        return out
    ranked, fields = finalist_pool(ranked, {a: arms[a]["paired_val"]["boundary_iou"]["n"] for a in ranked})
    out.update(fields)
    best = arms[ranked[0]]
    for key, split in (("val", "paired_val"), ("test", "paired")):
        out[f"paired_{key}_boundary_iou"] = best[split]["boundary_iou"]
        out[f"paired_{key}_dice"] = best[split]["dice"]
    if len(ranked) > 1:  # is the choice itself resolved, or a tie with the next eligible arm?
        runner_up = ranked[1]
        out["vs_runner_up"] = {
            "arm": runner_up,
            "paired_val_boundary_iou": stats.paired(
                _per_seed(by_arm[ranked[0]], "val", "boundary_iou"), _per_seed(by_arm[runner_up], "val", "boundary_iou")
            ),
        }
    return out


def build_report(
    results: dict[Job, dict[str, Any]],
    datasets: Sequence[str],
    arms: Sequence[str],
    arm_flags: dict[str, str],
    meta: dict[str, Any] | None = None,
    tie_prefer: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The study's JSON: per dataset and arm, metrics (mean ± std), paired differences, step ratio, the choice;
    with several datasets also the one default across them (``across``, :func:`choose_across`; ``tie_prefer``:
    its ``CHEAP=OVER`` tie preference)."""
    report: dict[str, Any] = {"rule": RULE, "metrics": list(METRICS), **(meta or {}), "datasets": {}}
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    # Seed order, not the order runs finished in: the same runs give the same report, float sums included.
    results = dict(sorted(results.items(), key=lambda item: (item[0].dataset, item[0].arm, item[0].seed)))
    for name in datasets:
        by_arm: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
        for job, res in results.items():
            if job.dataset == name and job.arm in by_arm:
                by_arm[job.arm][job.seed] = res
        runs[name] = by_arm
        base = by_arm.get(BASELINE, {})
        per_class = class_metrics(r for j, r in results.items() if j.dataset == name)
        metrics = METRICS + per_class
        entry: dict[str, Any] = {
            "arms": {a: _arm_entry(by_arm[a], base, arm_flags.get(a, ""), a == BASELINE, metrics) for a in arms},
            "class_metrics": list(per_class),
        }
        entry["choice"] = choose_default(entry["arms"], by_arm)
        sample = next((r for j, r in results.items() if j.dataset == name), None)
        if sample is not None:
            entry["config"] = {
                "epochs": sample["epochs"],
                "steps_per_epoch": sample.get("steps_per_epoch"),
                "lr": sample.get("lr"),
                "val_images": sample["val"].get("images"),
                "test_images": sample["test"].get("images"),
                "model": {k: sample["model_args"].get(k) for k in ("arch", "encoder") if k in sample["model_args"]},
                "device": sample.get("device"),
            }
        report["datasets"][name] = entry
    if len(report["datasets"]) > 1:
        report["across"] = choose_across(report["datasets"], runs, tie_prefer)
    return report
