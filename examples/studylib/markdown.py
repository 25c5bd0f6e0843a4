"""``study.md``: the study's report as tables, and the default chosen by the rule, said plainly."""

from __future__ import annotations

import math
from typing import Any

from adst_examples.studylib.arms import BASELINE
from adst_examples.studylib.report import CONVERGENCE_WINDOW, MIN_SEEDS, RULE

__all__ = ["format_markdown"]

_POINTS = {"dice", "iou", "boundary_iou", "small_recall", "small_dice"}  # shown ×100 (points); so is dice_<class>


def _share(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.0f} %"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _ms(stat: dict[str, Any], metric: str) -> str:
    mean, std = stat.get("mean"), stat.get("std")
    if not _finite(mean):
        return "-"
    scale, digits = (100.0, 1) if metric in _POINTS else (1.0, 2)
    if not _finite(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _pd(p: dict[str, Any] | None, metric: str) -> str:
    if not p or not p["n"] or not _finite(p["mean"]):
        return "-"
    scale = 100.0 if metric in _POINTS else 1.0
    lo, hi = p["ci95"]
    ci = f" [{lo * scale:+.2f}, {hi * scale:+.2f}]" if _finite(lo) else ""
    return f"{p['mean'] * scale:+.2f}{ci} {p['better']}/{p['n']}"


def _points(value: float | None) -> str:
    return f"{100 * value:+.2f}" if _finite(value) else "-"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if _finite(value) else "-"


def _tables(entry: dict[str, Any]) -> list[str]:
    lines = [
        "| arm | seeds | val Dice | test Dice | IoU | HD95 | BIoU | small recall | small Dice | best epoch | "
        f"best at last epoch | gain, last {CONVERGENCE_WINDOW} epochs | s/step | step ratio |",
        "|---" * 14 + "|",
    ]
    for arm, a in entry["arms"].items():
        t, conv = a["test"], a["convergence"]
        lines.append(
            f"| {arm} | {a['n_runs']} | {_ms(a['val']['dice'], 'dice')} | {_ms(t['dice'], 'dice')} | "
            f"{_ms(t['iou'], 'iou')} | {_ms(t['hd95'], 'hd95')} | {_ms(t['boundary_iou'], 'boundary_iou')} | "
            f"{_ms(t['small_recall'], 'small_recall')} | {_ms(t['small_dice'], 'small_dice')} | "
            f"{_ms(a['best_epoch'], 'epoch')} | {_share(conv['best_at_last'])} | "
            f"{_ms(conv['best_gain_last'], 'dice')} | {_ms(a['s_per_step'], 's')} | {_ratio(a['step_ratio'])} |"
        )
    lines += [
        "",
        "| arm vs baseline | Δ val Dice | Δ val BIoU | Δ test Dice | Δ test BIoU | Δ HD95 | Δ small recall "
        "| Δ small Dice | step ratio |",
        "|---" * 9 + "|",
    ]
    for arm, a in entry["arms"].items():
        if arm == BASELINE:
            continue
        p, pv = a["paired"], a["paired_val"]
        lines.append(
            f"| {arm} | {_pd(pv['dice'], 'dice')} | {_pd(pv['boundary_iou'], 'boundary_iou')} | "
            f"{_pd(p['dice'], 'dice')} | {_pd(p['boundary_iou'], 'boundary_iou')} | {_pd(p['hd95'], 'hd95')} | "
            f"{_pd(p['small_recall'], 'small_recall')} | {_pd(p['small_dice'], 'small_dice')} | "
            f"{_ratio(a['step_ratio'])} |"
        )
    return lines


def _choice(choice: dict[str, Any]) -> list[str]:
    lines = [""]
    for arm, why in choice.get("excluded", {}).items():
        lines.append(f"Not eligible: **{arm}** ({why}).")
    if choice.get("arm") is None:
        return [*lines, "No ADST arm is eligible under the rule: no default is chosen on this dataset."]
    short = choice.get("short", {})
    if short:
        counts = ", ".join(f"**{arm}** ({n})" for arm, n in short.items())
        lines.append(f"Reported, not in the decision (fewer than {MIN_SEEDS} paired seeds): {counts}.")
    if choice.get("provisional") and choice.get("excluded_finalists"):
        names = ", ".join(f"**{a}**" for a in choice["excluded_finalists"])
        lines.append(f"No arm with >= {MIN_SEEDS} paired seeds is eligible ({names}: excluded above).")
    if choice.get("provisional"):
        lead = (
            f"Provisional pick (no eligible arm has {MIN_SEEDS} paired seeds; this one has "
            f"{choice['paired_seeds']}), on validation among the eligible ADST arms: **{choice['arm']}** "
        )
    else:
        lead = (
            f"Chosen on validation among the eligible ADST arms with >= {MIN_SEEDS} paired seeds: **{choice['arm']}** "
        )
    lines.append(
        lead + f"(Δ val BIoU {_pd(choice['paired_val_boundary_iou'], 'boundary_iou')}, "
        f"Δ val Dice {_pd(choice['paired_val_dice'], 'dice')}). Its test differences, reported only: "
        f"Δ BIoU {_pd(choice['paired_test_boundary_iou'], 'boundary_iou')}, "
        f"Δ Dice {_pd(choice['paired_test_dice'], 'dice')}."
    )
    runner = choice.get("vs_runner_up")
    if runner:
        pr = runner["paired_val_boundary_iou"]
        lo, hi = pr["ci95"]
        tie = pr["n"] > 1 and _finite(lo) and lo <= 0 <= hi
        lines.append(
            f"Against the next {'eligible' if choice.get('provisional') else 'finalist'} ADST arm, "
            f"**{runner['arm']}**, paired Δ val BIoU "
            f"{_pd(pr, 'boundary_iou')}{': a tie on validation' if tie else ''}."
        )
    for split, name in (("val", "validation"), ("test", "test")):
        above = choice.get(f"biou_above_zero_{split}", [])
        if above:
            lines.append(f"ADST arms whose paired {name} BIoU interval lies above 0: {', '.join(above)}.")
        else:
            lines.append(f"No ADST arm raises {name} boundary IoU with a 95 % interval above 0.")
    return lines


def _across(across: dict[str, Any]) -> list[str]:
    """The one default across the datasets: per arm its per-dataset means, its score, and the pick said plainly."""
    datasets = across["datasets"]
    lines = [f"## Across {', '.join(datasets)}", "", f"**Rule (fixed before the runs):** {across['rule']}", ""]
    head = " | ".join(f"{d}: Δ val Dice | {d}: Δ val BIoU | {d}: seeds" for d in datasets)
    lines += [f"| arm | {head} | mean Δ val BIoU |", "|---" * (2 + 3 * len(datasets)) + "|"]
    for arm, rows in across["per_dataset"].items():
        cells = " | ".join(f"{_points(r['dice'])} | {_points(r['boundary_iou'])} | {r['n']}" for r in rows.values())
        lines.append(f"| {arm} | {cells} | {_points(across['scores'].get(arm))} |")
    lines.append("")
    for arm, why in across.get("excluded", {}).items():
        lines.append(f"Not eligible on every dataset: **{arm}** ({why}).")
    if across.get("arm") is None:
        return [*lines, "No ADST arm is eligible on every dataset: no default is chosen across them.", ""]
    short = across.get("short", {})
    if short:
        counts = ", ".join(f"**{arm}** ({n})" for arm, n in short.items())
        lines.append(f"Reported, not in the decision (fewer than {MIN_SEEDS} paired seeds on some dataset): {counts}.")
    tie = across.get("tie_prefer")
    pick = across.get("rule_pick", across["arm"])
    kind = "Provisional pick" if across.get("provisional") else "Chosen"
    lines.append(
        f"{kind} by the rule across the datasets: **{pick}** (mean Δ val BIoU {_points(across['scores'][pick])})."
    )
    runner = across.get("vs_runner_up")
    if runner:
        pr = _pd(runner["paired_val_boundary_iou"], "boundary_iou")
        lines.append(f"Against the next arm, **{runner['arm']}**, seed-paired Δ val BIoU {pr}.")
    if tie:
        pr = tie.get("paired_val_boundary_iou")
        if tie["applied"]:
            lines.append(
                f"Tie preference {tie['cheap']}={tie['over']}: **{tie['cheap']}** against {tie['over']}, seed-paired "
                f"Δ val BIoU {_pd(pr, 'boundary_iou')}, a tie: **{tie['cheap']}** is the pick."
            )
        elif pr:
            verdict = "not a tie" if pr["n"] > 1 else "no interval with fewer than 2 seeds"
            lines.append(
                f"Tie preference {tie['cheap']}={tie['over']}: {tie['cheap']} against {tie['over']}, seed-paired "
                f"Δ val BIoU {_pd(pr, 'boundary_iou')}, {verdict}: **{pick}** stays."
            )
        else:
            lines.append(f"Tie preference {tie['cheap']}={tie['over']} not applied: {tie['why_not']}.")
    return [*lines, ""]


def _class_table(entry: dict[str, Any]) -> list[str]:
    """Multi-class datasets: per-class test Dice per arm, and the paired differences (val and test)."""
    columns = entry.get("class_metrics") or []
    if not columns:
        return []
    heads = [c.removeprefix("dice_").replace("class_mean", "mean of lesion classes") for c in columns]
    lines = ["", "| arm | " + " | ".join(f"test Dice {h}" for h in heads) + " |", "|---" * (1 + len(heads)) + "|"]
    for arm, a in entry["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(_ms(a["test"][c], "dice") for c in columns) + " |")
    lines += [
        "",
        "| arm vs baseline | " + " | ".join(f"Δ val Dice {h} | Δ test Dice {h}" for h in heads) + " |",
        "|---" * (1 + 2 * len(heads)) + "|",
    ]
    for arm, a in entry["arms"].items():
        if arm != BASELINE:
            cells = [f"{_pd(a['paired_val'][c], 'dice')} | {_pd(a['paired'][c], 'dice')}" for c in columns]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def format_markdown(report: dict[str, Any], title: str = "ADST study") -> str:
    """study.md: per dataset, the metrics table, the paired table and the choice made on validation."""
    lines = [f"# {title}", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    info = [f"{k}: {report[k]}" for k in ("date", "device", "parallel", "budget_min") if report.get(k) is not None]
    if info:
        lines += ["; ".join(info) + ".", ""]
    lines += [f"**Rule (fixed before the runs):** {report.get('rule', RULE)}", ""]
    lines += [
        "Dice, IoU, boundary IoU (BIoU, 2 % of the diagonal) and small-lesion (< 1 % of the image) recall and Dice in "
        "points (x100), HD95 in pixels. Metrics: mean ± std over seeds of each run's mean over images (small-lesion "
        "scores pooled over the split), from the best-on-validation weights, exported. Paired Δ = arm - baseline "
        "with the same seed: mean [95 % t-interval] and better/n (for HD95, better = lower). Step ratio: the "
        "arm's training s/step over the baseline's of the same seed, geometric mean over the seeds whose two runs "
        "had the same layout, concurrency and device (a study's timings, not a benchmark: runs share the device).",
        "",
    ]
    for name, entry in report["datasets"].items():
        cfg = entry.get("config", {})
        lines += [f"## {name}", ""]
        if cfg:
            model = "/".join(str(v) for v in cfg.get("model", {}).values())
            lines += [
                f"{model}, {cfg['epochs']} epochs x {cfg['steps_per_epoch']} steps, lr {cfg['lr']}; "
                f"val {int(cfg['val_images'] or 0)} / test {int(cfg['test_images'] or 0)} images; {cfg.get('device')}.",
                "",
            ]
        lines += _tables(entry)
        lines += _class_table(entry)
        lines += _choice(entry.get("choice", {}))
        lines.append("")
    if report.get("across"):
        lines += _across(report["across"])
    if report.get("failed"):
        lines += [f"Failed runs (see study.json): {', '.join(sorted(report['failed']))}.", ""]
    if report.get("not_run"):
        lines += [f"Not run (budget): {len(report['not_run'])} runs, e.g. {', '.join(report['not_run'][:6])}.", ""]
    return "\n".join(lines)
