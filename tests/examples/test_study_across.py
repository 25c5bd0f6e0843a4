"""The rule across datasets (studylib.across): one default for several datasets, cross-checked against a direct
numpy/scipy reading of the runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

import adst_examples.studylib as study
from adst_examples.studylib.across import parse_tie_prefer
from adst_examples.training.checkpoints import jsonable, write_json

FLAGS = {**study.ARMS, "s4": "--head-stride 4", "fg": "--feature-grad 0.25", "dsv": "--no-adst --deep-supervision"}


def _run(dataset: str, arm: str, seed: int, val_dice: float, val_biou: float) -> dict[str, Any]:
    metrics = {"dice": 0.8, "iou": 0.7, "hd95": 3.0, "boundary_iou": 0.4, "small_recall": math.nan,
               "small_dice": math.nan, "images": 5.0}  # fmt: skip
    return {
        "dataset": dataset, "arm": arm, "seed": seed, "arm_flags": FLAGS[arm],
        "model_args": {"arch": "unet", "encoder": "resnet18"}, "epochs": 2, "epochs_run": 2, "best_epoch": 2,
        "steps_per_epoch": 3, "lr": 1e-3, "history": [], "device": "cpu",
        "timing": {"s_per_step": 0.1, "s_per_epoch": 0.3, "final_eval_s": 0.1, "total_s": 1.0},
        "val": {**metrics, "dice": val_dice, "boundary_iou": val_biou}, "test": metrics,
    }  # fmt: skip


def _study(values: dict[str, dict[str, list[tuple[float, float]]]], tie: tuple[str, str] | None = None):
    """``values[dataset][arm]`` = per-seed (val Dice, val BIoU); the report over them."""
    results = {
        study.Job(d, arm, s): _run(d, arm, s, dice, biou)
        for d, arms in values.items()
        for arm, seeds in arms.items()
        for s, (dice, biou) in enumerate(seeds)
    }
    arms = list(next(iter(values.values())))
    return study.build_report(results, list(values), arms, FLAGS, tie_prefer=tie)


def _reference(values: dict[str, dict[str, list[tuple[float, float]]]]) -> tuple[str | None, dict[str, float], bool]:
    """The rule read directly: eligible on every dataset, finalists with >= 12 seeds everywhere, best mean BIoU."""
    scores, seeds = {}, {}
    first = next(iter(values.values()))
    for arm in first:
        if arm in ("baseline", "dsv"):
            continue
        dice, biou, n = [], [], []
        for arms in values.values():
            a, b = np.array(arms[arm]), np.array(arms["baseline"])
            k = min(len(a), len(b))
            dice.append(np.mean(a[:k, 0] - b[:k, 0]))
            biou.append(np.mean(a[:k, 1] - b[:k, 1]))
            n.append(k)
        if min(dice) >= -0.005:
            scores[arm], seeds[arm] = float(np.mean(biou)), min(n)
    finalists = [a for a in scores if seeds[a] >= 12]
    pool = finalists or list(scores)
    pick = max(pool, key=lambda a: scores[a]) if pool else None
    return pick, scores, not finalists


_seeds = st.integers(2, 14)
_offset = st.tuples(st.floats(-0.02, 0.02), st.floats(-0.05, 0.05))


@settings(max_examples=40, deadline=None)
@given(n_datasets=st.integers(2, 3), n_seeds=st.lists(_seeds, min_size=3, max_size=3),
       offsets=st.lists(st.lists(_offset, min_size=3, max_size=3), min_size=3, max_size=3),
       noise=st.integers(0, 2**31 - 1))  # fmt: skip
def test_the_pick_across_datasets_matches_a_direct_reading(n_datasets, n_seeds, offsets, noise) -> None:
    rng = np.random.default_rng(noise)
    values: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for d in range(n_datasets):
        base = [(0.7 + rng.normal(0, 0.02), 0.3 + rng.normal(0, 0.02)) for _ in range(14)]
        arms: dict[str, list[tuple[float, float]]] = {"baseline": base}
        for (arm, n), (dd, db) in zip(zip(("adst", "s4", "fg"), n_seeds, strict=True), offsets[d], strict=True):
            arms[arm] = [(v + dd + rng.normal(0, 0.005), b + db + rng.normal(0, 0.01)) for v, b in base[:n]]
        values[f"d{d}"] = arms
    across = _study(values)["across"]
    pick, scores, provisional = _reference(values)
    assert across["arm"] == pick
    assert across["scores"] == pytest.approx(scores)
    assert set(across["eligible"]) == set(scores)
    assert set(across["excluded"]) == {"adst", "s4", "fg"} - set(scores)
    if pick is not None:
        assert across["provisional"] == provisional


def _two(adst_biou: list[float], s4_biou: list[float], s4_dice: float = 0.0, seeds: int = 12):
    """Two datasets, baseline BIoU 0.3 on every seed; adst and s4 with the given per-seed BIoU on both."""

    def arms(shift: float) -> dict[str, list[tuple[float, float]]]:
        return {
            "baseline": [(0.7, 0.3)] * seeds,
            "adst": [(0.7, b + shift) for b in adst_biou],
            "s4": [(0.7 + s4_dice, b + shift) for b in s4_biou],
        }

    return {"busi": arms(0.0), "kvasir": arms(0.01)}


def test_the_cheaper_arm_wins_a_tie_with_the_pick_and_only_a_tie() -> None:
    rng = np.random.default_rng(0)
    adst = list(0.33 + rng.normal(0, 0.01, 12))
    tied = [v - 0.001 + rng.normal(0, 0.01) for v in adst]  # slightly below adst, within noise
    values = _two(adst, tied)
    across = _study(values, ("s4", "adst"))["across"]
    # The interval the tie is read from: seed k = the mean over the two datasets, paired s4 - adst.
    per_seed = {a: np.mean([[b for _, b in values[d][a]] for d in values], axis=0) for a in ("adst", "s4")}
    ci = sps.ttest_rel(per_seed["s4"], per_seed["adst"]).confidence_interval(0.95)
    record = across["tie_prefer"]
    assert record["paired_val_boundary_iou"]["ci95"] == pytest.approx([ci.low, ci.high])
    assert ci.low <= 0 <= ci.high and record["applied"]
    assert across["rule_pick"] == "adst" and across["arm"] == "s4"
    text = study.format_markdown(jsonable(_study(values, ("s4", "adst"))))
    assert "## Across busi, kvasir" in text and "**s4** is the pick" in text
    # Clearly worse on boundary IoU: not a tie, the rule's pick stays.
    worse_study = _study(_two(adst, [v - 0.02 for v in adst]), ("s4", "adst"))
    worse = worse_study["across"]
    assert worse["arm"] == "adst" and not worse["tie_prefer"]["applied"] and "rule_pick" not in worse
    assert "not a tie: **adst** stays" in study.format_markdown(jsonable(worse_study))
    # One seed: no interval, so no tie, and the words say why.
    one = _study(_two(adst[:1], tied[:1], seeds=1), ("s4", "adst"))
    assert not one["across"]["tie_prefer"]["applied"]
    assert "no interval with fewer than 2 seeds: **adst** stays" in study.format_markdown(jsonable(one))
    # Without the preference the rule's pick stands.
    assert _study(values)["across"]["arm"] == "adst"
    # The cheaper arm out of the Dice margin on one dataset cannot win the tie.
    no_dice = _study(_two(adst, tied, s4_dice=-0.01), ("s4", "adst"))["across"]
    assert no_dice["arm"] == "adst" and "s4" in no_dice["excluded"] and "busi" in no_dice["excluded"]["s4"]
    assert no_dice["tie_prefer"]["why_not"] == "s4 is not a finalist on every dataset"


def test_an_arm_out_of_the_margin_on_one_dataset_is_not_eligible_across() -> None:
    good = [(0.7, 0.40)] * 12
    values = {
        "busi": {"baseline": [(0.7, 0.3)] * 12, "adst": [(0.7, 0.31)] * 12, "s4": good},
        "kvasir": {"baseline": [(0.7, 0.3)] * 12, "adst": [(0.7, 0.31)] * 12, "s4": [(0.69, 0.40)] * 12},
    }
    report = _study(values)
    assert report["datasets"]["busi"]["choice"]["arm"] == "s4"  # the per-dataset pick
    across = report["across"]
    assert across["arm"] == "adst" and across["excluded"]["s4"].startswith("kvasir: validation Δ Dice -1.00")
    text = study.format_markdown(jsonable(report))
    assert (
        "Not eligible on every dataset: **s4**" in text and "Chosen by the rule across the datasets: **adst**" in text
    )
    # None eligible: said plainly.
    values["busi"]["adst"] = values["kvasir"]["adst"] = [(0.6, 0.5)] * 12
    values["kvasir"]["s4"] = [(0.6, 0.5)] * 12
    assert "No ADST arm is eligible on every dataset" in study.format_markdown(jsonable(_study(values)))
    # One dataset: no across section.
    assert "across" not in _study({"busi": values["busi"]})


def test_parse_tie_prefer() -> None:
    assert parse_tie_prefer("adst-s4=adst") == ("adst-s4", "adst")
    assert parse_tie_prefer(None) is None
    for bad in ("adst-s4", "=adst", "adst=adst", "a="):
        with pytest.raises(ValueError, match="CHEAP=OVER"):
            parse_tie_prefer(bad)


def test_report_only_across_two_folders_joined_by_a_link(tmp_path: Path) -> None:
    """Two study folders (one dataset each, other epoch counts) reported together: a folder whose runs/<dataset>
    entries link to theirs."""
    values = _two(list(np.linspace(0.32, 0.34, 12)), list(np.linspace(0.321, 0.339, 12)))
    for d in values:
        for arm, seeds in values[d].items():
            for s, (dice, biou) in enumerate(seeds):
                write_json(tmp_path / d / "runs" / d / arm / f"seed{s}" / "result.json", _run(d, arm, s, dice, biou))
    both = tmp_path / "both" / "runs"
    both.mkdir(parents=True)
    for d in values:
        (both / d).symlink_to(tmp_path / d / "runs" / d, target_is_directory=True)
    report = study.main(["--out", str(both.parent), "--report-only", "--no-progress", "--tie-prefer", "s4=adst"])
    assert report["across"]["datasets"] == ["busi", "kvasir"]
    saved = json.loads((both.parent / "study.json").read_text())
    assert saved["across"]["arm"] == report["across"]["arm"]
    assert "## Across busi, kvasir" in (both.parent / "study.md").read_text()
    with pytest.raises(study.UsageError, match="--tie-prefer: fg is not an ADST arm of this study"):
        study.main(["--out", str(both.parent), "--report-only", "--no-progress", "--tie-prefer", "fg=adst"])
    with pytest.raises(study.UsageError, match="CHEAP=OVER"):
        study.main(["--out", str(both.parent), "--report-only", "--no-progress", "--tie-prefer", "s4"])
