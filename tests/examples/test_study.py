"""Tests of the study (examples/study.py, the package adst_examples.studylib): plan order, budget estimates, the
report and its rule, report-only, resume, and the device script's rehearsal."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

import adst_examples.studylib as study
from adst_examples.studylib.plan import _flag, load_finished, recorded_head, run_dir
from adst_examples.studylib.report import _convergence
from adst_examples.training.checkpoints import jsonable, write_json
from adst_examples.training.models import head_settings
from adst_plugin import ADSTConfig, get_config

ROOT = Path(__file__).resolve().parents[2]


def _result(
    dataset: str, arm: str, seed: int, dice: float, val: float, s_step: float = 0.1, val_biou: float | None = None
) -> dict[str, Any]:
    metrics = {"dice": dice, "iou": dice - 0.1, "hd95": 10 - 10 * dice, "boundary_iou": dice / 2,
               "small_recall": float("nan"), "small_dice": float("nan"), "images": 5.0}  # fmt: skip
    val_metrics = {**metrics, "dice": val, "boundary_iou": val / 2 if val_biou is None else val_biou}
    return {
        "dataset": dataset,
        "arm": arm,
        "seed": seed,
        "arm_flags": study.ARMS.get(arm, ""),
        "model_args": {"arch": "unet", "encoder": "resnet18"},
        "epochs": 3,
        "epochs_run": 3,
        "best_epoch": 2,
        "best_val_dice": val,
        "steps_per_epoch": 4,
        "lr": 1e-3,
        "history": [],
        "timing": {"s_per_step": s_step, "s_per_epoch": 10 * s_step, "final_eval_s": 1.0, "total_s": 31 * s_step},
        "val": val_metrics,
        "test": metrics,
        "device": "cpu",
    }


def test_plan_is_seed_major() -> None:
    jobs = study.plan_jobs(["busi", "kvasir"], ["baseline", "adst"], [0, 1])
    assert [j.key for j in jobs[:4]] == ["busi/baseline/seed0", "busi/adst/seed0", "kvasir/baseline/seed0",
                                         "kvasir/adst/seed0"]  # fmt: skip
    assert all(j.seed == 1 for j in jobs[4:])


def test_estimate_seconds() -> None:
    job = study.Job("busi", "adst", 1)
    assert study.estimate_seconds(job, {}, 50) is None
    res = {study.Job("busi", "baseline", 0): _result("busi", "baseline", 0, 0.8, 0.8, s_step=0.2)}
    assert study.estimate_seconds(job, res, 50) == pytest.approx(50 * 2.0 + 1.0)  # other arm of the dataset
    res[study.Job("busi", "adst", 0)] = _result("busi", "adst", 0, 0.8, 0.8, s_step=0.3)
    assert study.estimate_seconds(job, res, 50) == pytest.approx(50 * 3.0 + 1.0)
    assert study.estimate_seconds(study.Job("kvasir", "adst", 0), res, 50) is None
    # A slow first run in another layout and concurrency does not stand for runs with today's settings.
    fast = _result("busi", "adst", 1, 0.8, 0.8, s_step=0.1)
    fast["channels_last"], fast["timing"]["parallel"] = True, 2
    res[study.Job("busi", "adst", 1)] = fast
    like = {"channels_last": True, "parallel": 2}
    assert study.estimate_seconds(job, res, 50, like) == pytest.approx(50 * 1.0 + 1.0)
    assert study.estimate_seconds(job, res, 50) == pytest.approx(50 * 2.0 + 1.0)  # no settings: every run
    # No run measured like this: every run of the arm.
    assert study.estimate_seconds(job, res, 50, {"channels_last": False, "parallel": 4}) == pytest.approx(51.0 + 50)


def test_report_does_not_depend_on_the_order_runs_finished_in() -> None:
    # (0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3) in floats: a report summed in finishing order differs in its last bits
    # between two executors that ran the same seeds.
    dice = [0.1, 0.2, 0.3]
    jobs = [(study.Job("busi", arm, s), _result("busi", arm, s, dice[s], dice[s])) for arm in ("baseline", "adst")
            for s in range(3)]  # fmt: skip
    in_order = study.build_report(dict(jobs), ["busi"], ["baseline", "adst"], study.ARMS)
    finished = study.build_report(dict(reversed(jobs)), ["busi"], ["baseline", "adst"], study.ARMS)
    assert jsonable(finished) == jsonable(in_order)
    assert in_order["datasets"]["busi"]["arms"]["adst"]["test"]["dice"]["mean"] == (0.1 + 0.2 + 0.3) / 3


def test_report_fields_and_intervals() -> None:
    base = [0.80, 0.78, 0.79, 0.81]
    arm = [0.82, 0.79, 0.80, 0.80]
    vals_b, vals_a = [0.70, 0.72, 0.71, 0.69], [0.72, 0.73, 0.70, 0.72]
    results = {}
    for s in range(4):
        results[study.Job("busi", "baseline", s)] = _result("busi", "baseline", s, base[s], vals_b[s], 0.1)
        results[study.Job("busi", "adst", s)] = _result("busi", "adst", s, arm[s], vals_a[s], 0.11)
    report = study.build_report(results, ["busi"], ["baseline", "adst"], study.ARMS)
    entry = report["datasets"]["busi"]["arms"]["adst"]
    head = entry["paired"]["dice"]
    ci = sps.ttest_rel(arm, base).confidence_interval(0.95)
    assert head["n"] == 4 and head["better"] == 3
    assert head["mean"] == pytest.approx(sum(arm) / 4 - sum(base) / 4)
    assert head["ci95"] == pytest.approx([ci.low, ci.high])
    assert entry["paired_val"]["dice"]["better"] == 3
    assert entry["paired"]["hd95"]["better"] == 3  # lower HD95 is better
    assert entry["step_ratio"] == pytest.approx(1.1)
    assert entry["test"]["dice"]["n"] == 4
    assert "paired" not in report["datasets"]["busi"]["arms"]["baseline"]
    assert report["datasets"]["busi"]["choice"]["arm"] == "adst"
    assert "validation boundary IoU" in report["rule"]
    text = study.format_markdown(jsonable(report))
    assert report["datasets"]["busi"]["choice"]["provisional"] is True  # 4 paired seeds < MIN_SEEDS
    assert "| adst |" in text and "Provisional pick (no eligible arm has 12 paired seeds; this one has 4)" in text
    assert "Chosen on validation" not in text
    json.dumps(jsonable(report), allow_nan=False)  # strict JSON: NaN became null


def test_the_step_ratio_pairs_runs_made_with_the_same_settings() -> None:
    steps = {"baseline": [0.10, 0.20, 0.30], "adst": [0.12, 0.20, 0.15]}
    results = {study.Job("busi", arm, s): _result("busi", arm, s, 0.8, 0.7, t)
               for arm, times in steps.items() for s, t in enumerate(times)}  # fmt: skip
    # Seed 2's arm ran with NHWC weights, its baseline without: a layout's speed, not the head's cost.
    results[study.Job("busi", "adst", 2)]["channels_last"] = True
    arms = study.build_report(results, ["busi"], ["baseline", "adst"], study.ARMS)["datasets"]["busi"]["arms"]
    assert arms["adst"]["step_ratio"] == pytest.approx(math.sqrt(1.2 * 1.0))
    assert arms["adst"]["step_ratio_pairs"] == 2 and arms["baseline"]["step_ratio"] == pytest.approx(1.0)
    results[study.Job("busi", "adst", 0)]["timing"]["parallel"] = 2
    results[study.Job("busi", "adst", 1)]["device"] = "cuda"
    arms = study.build_report(results, ["busi"], ["baseline", "adst"], study.ARMS)["datasets"]["busi"]["arms"]
    assert math.isnan(arms["adst"]["step_ratio"]) and arms["adst"]["step_ratio_pairs"] == 0


@pytest.mark.parametrize("seeds_b", [1, study.MIN_SEEDS - 1, study.MIN_SEEDS])
@pytest.mark.parametrize("b_better", [False, True])
def test_the_rule_decides_among_the_finalists(seeds_b: int, b_better: bool) -> None:
    # Arm a has MIN_SEEDS paired seeds; arm b (also eligible) has seeds_b. Only arms with MIN_SEEDS are chosen
    # from; a better arm with fewer seeds is reported, not picked.
    results = {}
    for s in range(study.MIN_SEEDS):
        results[study.Job("busi", "baseline", s)] = _result("busi", "baseline", s, 0.80, 0.70)
        results[study.Job("busi", "a", s)] = _result("busi", "a", s, 0.80, 0.71, val_biou=0.40 + s / 1000)
        if s < seeds_b:
            b_biou = 0.50 if b_better else 0.30
            results[study.Job("busi", "b", s)] = _result("busi", "b", s, 0.80, 0.71, val_biou=b_biou + s / 1000)
    flags = {"baseline": "--no-adst", "a": "--preset adst", "b": "--preset adst --w-main 0"}
    for job in results:
        results[job]["arm_flags"] = flags[job.arm]
    report = study.build_report(results, ["busi"], ["baseline", "a", "b"], flags)
    choice = report["datasets"]["busi"]["choice"]
    b_counts = seeds_b >= study.MIN_SEEDS
    expected = "b" if (b_better and b_counts) else "a"
    assert choice["provisional"] is False and choice["arm"] == expected
    assert choice["paired_seeds"] == (seeds_b if expected == "b" else study.MIN_SEEDS)
    assert choice["short"] == ({} if b_counts else {"b": seeds_b})
    assert choice["eligible"] == (["b", "a"] if b_better else ["a", "b"])  # every eligible arm, best first
    assert ("vs_runner_up" in choice) is b_counts  # the runner-up is another finalist
    text = study.format_markdown(jsonable(report))
    assert f"Chosen on validation among the eligible ADST arms with >= 12 paired seeds: **{expected}**" in text
    assert ("Reported, not in the decision (fewer than 12 paired seeds): **b**" in text) is not b_counts


def test_an_excluded_finalist_is_named_and_the_pick_stays_provisional() -> None:
    # Arm a has MIN_SEEDS paired seeds but loses 1 Dice point on validation; arm b (one seed) is eligible.
    results = {}
    for s in range(study.MIN_SEEDS):
        results[study.Job("busi", "baseline", s)] = _result("busi", "baseline", s, 0.80, 0.70)
        results[study.Job("busi", "a", s)] = _result("busi", "a", s, 0.80, 0.69, val_biou=0.40)
    results[study.Job("busi", "b", 0)] = _result("busi", "b", 0, 0.80, 0.70, val_biou=0.30)
    flags = {"baseline": "--no-adst", "a": "--preset adst", "b": "--preset adst --w-main 0"}
    for job in results:
        results[job]["arm_flags"] = flags[job.arm]
    report = study.build_report(results, ["busi"], ["baseline", "a", "b"], flags)
    choice = report["datasets"]["busi"]["choice"]
    assert choice["excluded_finalists"] == ["a"] and choice["provisional"] is True and choice["arm"] == "b"
    text = study.format_markdown(jsonable(report))
    assert "No arm with >= 12 paired seeds is eligible (**a**: excluded above)." in text


def test_with_no_finalist_the_pick_is_provisional_among_all_eligible_arms() -> None:
    results = {}
    for s in range(3):
        results[study.Job("busi", "baseline", s)] = _result("busi", "baseline", s, 0.80, 0.70)
        results[study.Job("busi", "a", s)] = _result("busi", "a", s, 0.80, 0.71, val_biou=0.40 + s / 1000)
    results[study.Job("busi", "b", 0)] = _result("busi", "b", 0, 0.80, 0.71, val_biou=0.50)
    flags = {"baseline": "--no-adst", "a": "--preset adst", "b": "--preset adst --w-main 0"}
    for job in results:
        results[job]["arm_flags"] = flags[job.arm]
    choice = study.build_report(results, ["busi"], ["baseline", "a", "b"], flags)["datasets"]["busi"]["choice"]
    assert choice["provisional"] is True and choice["arm"] == "b" and choice["paired_seeds"] == 1
    assert choice["short"] == {} and choice["vs_runner_up"]["arm"] == "a"


def test_parse_epochs() -> None:
    assert study.parse_epochs("7", ["a", "b"]) == {"a": 7, "b": 7}
    assert study.parse_epochs("a=5,b=4", ["a", "b"]) == {"a": 5, "b": 4}
    with pytest.raises(study.UsageError):
        study.parse_epochs("a=5", ["a", "b"])


def test_bad_arms_and_flags(tmp_path: Path) -> None:
    base = ["--datasets", "synthetic", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c")]
    with pytest.raises(study.UsageError, match="unknown arm"):
        study.main([*base, "--arms", "nope"])
    with pytest.raises(study.UsageError, match="NAME=FLAGS"):
        study.main([*base, "--arm", "=x"])
    with pytest.raises(study.UsageError, match="unknown flags"):
        study.main([*base, "--not-a-flag", "3"])


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    argv = ["--datasets", "synthetic", "--img-size", "32", "--epochs", "1", "--seeds", "1", "--synthetic-n", "16",
            "--max-steps", "1", "--batch-size", "4", "--encoder", "resnet18", "--no-progress", "--arms", "baseline",
            "--arm", "broken=--preset adst --hidden-channels 3",  # parses, but SACA refuses 3 channels at build time
            "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    report = study.main(argv)
    assert list(report["failed"]) == ["synthetic/broken/seed0"]
    assert "SACA" in report["failed"]["synthetic/broken/seed0"]
    arms = report["datasets"]["synthetic"]["arms"]
    assert arms["baseline"]["n_runs"] == 1 and arms["broken"]["n_runs"] == 0
    assert arms["broken"]["paired"]["dice"]["n"] == 0
    assert "Failed runs" in (tmp_path / "s" / "study.md").read_text()


def test_registry_has_the_planned_arms() -> None:
    arms = study.arm_registry()
    assert arms["baseline"] == "--no-adst"
    assert {"legacy", "paper", "adst"} <= set(arms)
    for name, flags in arms.items():  # every registered arm, peers included, parses
        study.parse_model_flags(shlex.split(flags), name)


# --------------------------------------------------------------------------------------------------------------------
# The rehearsal: device_run.sh on the CPU at tiny size, then a resume that trains nothing
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_device_script_rehearsal_and_resume(tmp_path: Path) -> None:
    out, study_dir = tmp_path / "out", tmp_path / "study"
    env = {
        **os.environ,
        "OUT": str(out),
        "STUDY_DIR": str(study_dir),
        "CACHE_DIR": str(tmp_path / "cache"),
        "PYTHON": sys.executable,
        "PARALLEL": "measure",  # as on the device: worker processes, N measured
        "STUDY_ARGS": "--synthetic-n 16 --max-steps 1 --batch-size 4 --encoder resnet18 --no-progress "
        "--parallel-candidates 1,2 --bench-steps 2",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "benchmarks" / "device_run.sh"), "--rehearse"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"env.txt", "study.json", "study.md", "study.log", "study_runs.tar.gz"} <= names
    assert {"bench_train_overhead.txt", "bench_inference.txt", "bench_targets.txt"} <= names
    assert len(names) <= 8  # what a device call brings back
    for bench in ("train_overhead", "inference", "targets"):
        assert "exit: 0" in (out / f"bench_{bench}.txt").read_text(), (out / f"bench_{bench}.txt").read_text()[-2000:]

    report = json.loads((out / "study.json").read_text())
    log = (out / "study.log").read_text()[-3000:]
    assert not report["not_run"] and not report["failed"], log
    assert set(report["parallel_throughput_steps_per_s"]) == {"1", "2"} and report["parallel"] in (1, 2)
    arms = report["datasets"]["synthetic"]["arms"]
    assert set(arms) == {"baseline", "adst"}
    # The paired differences, from the runs' own result.json files, against SciPy's paired t-test interval.
    runs = {(p.parent.parent.name, p.parent.name): json.loads(p.read_text()) for p in study_dir.rglob("result.json")}
    for key, split in (("paired", "test"), ("paired_val", "val")):
        diffs = [runs["adst", f"seed{s}"][split]["dice"] - runs["baseline", f"seed{s}"][split]["dice"] for s in (0, 1)]
        head = arms["adst"][key]["dice"]
        assert head["n"] == 2 and head["better"] == sum(d > 0 for d in diffs)
        assert head["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-12)
        adst = [runs["adst", f"seed{s}"][split]["dice"] for s in (0, 1)]
        base = [runs["baseline", f"seed{s}"][split]["dice"] for s in (0, 1)]
        reference = sps.ttest_rel(adst, base).confidence_interval(0.95) if diffs[0] != diffs[1] else diffs[:1] * 2
        assert head["ci95"] == pytest.approx(list(reference), rel=1e-9, abs=1e-12)
    assert arms["adst"]["step_ratio"] > 0 and arms["baseline"]["step_ratio"] == pytest.approx(1.0)
    for arm in arms.values():
        for split in ("test", "val"):
            assert set(arm[split]) == set(study.METRICS)
            assert arm[split]["dice"]["n"] == 2
    assert "Rule (fixed before the runs)" in (out / "study.md").read_text()

    # Resume: the same command again trains nothing and reports the same runs.
    results = sorted(study_dir.glob("runs/*/*/*/result.json"))
    assert len(results) == 4
    stamps = [p.stat().st_mtime_ns for p in results]
    argv = shlex.split(report["command"])[2:]
    again = study.main(argv)
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert again["datasets"]["synthetic"]["arms"]["adst"]["paired"]["dice"]["mean"] == pytest.approx(
        arms["adst"]["paired"]["dice"]["mean"]
    )
    # A different setting in the same folder is refused rather than mixed in.
    with pytest.raises(study.UsageError, match="other settings"):
        study.main([*argv, "--lr", "0.5"])
    # Each run records the head its flags resolved to; a run made under other preset defaults is refused.
    by_arm = {p.parent.parent.name: p for p in results}
    assert json.loads(by_arm["baseline"].read_text())["adst_config"] is None
    adst_run = json.loads(by_arm["adst"].read_text())
    assert adst_run["adst_config"] == dataclasses.asdict(get_config("adst"))
    write_json(by_arm["adst"], {**adst_run, "adst_config": {**adst_run["adst_config"], "main_target": "core"}})
    with pytest.raises(study.UsageError, match="main_target: 'core' then, 'sdf' now"):
        study.main(argv)
    assert math.isfinite(again["wall_s"])


def _rule_study(val_dice: dict[str, list[float]], val_biou: dict[str, list[float]]) -> dict[str, Any]:
    """A report over arms whose per-seed validation Dice and BIoU are given (test metrics all equal)."""
    results, flags = {}, {**study.ARMS, "focal": "--no-adst --loss dice+focal"}
    for arm in val_dice:
        for s, (dice, biou) in enumerate(zip(val_dice[arm], val_biou[arm], strict=True)):
            results[study.Job("busi", arm, s)] = _result("busi", arm, s, 0.8, dice, val_biou=biou)
    return study.build_report(results, ["busi"], list(val_dice), flags)["datasets"]["busi"]


def test_the_rule_picks_the_best_boundary_iou_among_non_inferior_adst_arms() -> None:
    base = [0.70, 0.72, 0.71]
    entry = _rule_study(
        {"baseline": base, "adst": [v - 0.002 for v in base], "paper": [v - 0.010 for v in base],
         "legacy": [v + 0.01 for v in base], "focal": [v + 0.02 for v in base]},
        {"baseline": [0.30, 0.31, 0.32], "adst": [0.32, 0.335, 0.33], "paper": [0.40, 0.43, 0.41],
         "legacy": [0.31, 0.325, 0.33], "focal": [0.50, 0.51, 0.50]},
    )  # fmt: skip
    choice = entry["choice"]
    # paper has the best BIoU but loses 1 point of Dice (< -0.5: not eligible); focal is a peer, never the default.
    assert set(choice["excluded"]) == {"paper"} and "-1.00 points" in choice["excluded"]["paper"]
    assert choice["eligible"] == ["adst", "legacy"] and choice["arm"] == "adst"
    assert choice["paired_val_boundary_iou"]["mean"] == pytest.approx(np.mean([0.02, 0.025, 0.01]))
    assert choice["paired_test_dice"]["mean"] == pytest.approx(0.0)  # reported, not used
    assert choice["vs_runner_up"]["arm"] == "legacy"
    # Evidence statements: which ADST arms' BIoU intervals lie above 0 (paper's does; adst's and legacy's?).
    for arm in ("adst", "paper", "legacy"):
        diffs = np.subtract(
            {"adst": [0.32, 0.335, 0.33], "paper": [0.40, 0.43, 0.41], "legacy": [0.31, 0.325, 0.33]}[arm],
            [0.30, 0.31, 0.32],
        )
        lo = sps.ttest_1samp(diffs, 0).confidence_interval(0.95).low
        assert (arm in choice["biou_above_zero_val"]) == (lo > 0), arm
    text = study.format_markdown(jsonable({"datasets": {"busi": entry}}))
    assert "Not eligible: **paper**" in text and "**adst**" in text


def test_the_rule_says_plainly_when_no_arm_raises_boundary_iou() -> None:
    entry = _rule_study(
        {"baseline": [0.70, 0.72, 0.71], "adst": [0.70, 0.72, 0.71]},
        {"baseline": [0.30, 0.31, 0.32], "adst": [0.29, 0.33, 0.31]},
    )
    assert entry["choice"]["arm"] == "adst" and entry["choice"]["biou_above_zero_val"] == []
    text = study.format_markdown(jsonable({"datasets": {"busi": entry}}))
    assert "No ADST arm raises validation boundary IoU with a 95 % interval above 0." in text
    assert "No ADST arm raises test boundary IoU with a 95 % interval above 0." in text
    none = _rule_study({"baseline": [0.70, 0.72], "adst": [0.60, 0.62]}, {"baseline": [0.3, 0.3], "adst": [0.4, 0.4]})
    assert none["choice"]["arm"] is None
    assert "No ADST arm is eligible" in study.format_markdown(jsonable({"datasets": {"busi": none}}))


def test_convergence_check_reads_the_validation_curves() -> None:
    # Run 0 peaks at its last epoch after a late rise; run 1 peaked early and only fell afterwards.
    curves = {0: [0.50, 0.60, 0.61, 0.62, 0.65, 0.70], 1: [0.50, 0.68, 0.66, 0.65, 0.64, 0.63]}
    runs = []
    for seed, curve in curves.items():
        r = _result("busi", "adst", seed, 0.8, max(curve))
        r.update(history=[{"epoch": e + 1, "val_dice": v} for e, v in enumerate(curve)], epochs_run=len(curve),
                 best_epoch=1 + curve.index(max(curve)))  # fmt: skip
        runs.append(r)
    conv = _convergence(runs, last=3)
    assert conv["best_at_last"] == pytest.approx(0.5)
    assert conv["best_gain_last"]["mean"] == pytest.approx(((0.70 - 0.61) + 0.0) / 2)
    assert conv["best_gain_last"]["n"] == 2


def test_the_choice_is_compared_with_the_next_adst_arm() -> None:
    base = [0.30, 0.30, 0.30, 0.30]
    paper_biou, adst_biou = [0.31, 0.30, 0.32, 0.29], [0.32, 0.305, 0.34, 0.29]
    entry = _rule_study({a: [0.7] * 4 for a in ("baseline", "paper", "adst")},
                        {"baseline": base, "paper": paper_biou, "adst": adst_biou})  # fmt: skip
    choice = entry["choice"]
    assert choice["arm"] == "adst" and choice["vs_runner_up"]["arm"] == "paper"
    head_to_head = choice["vs_runner_up"]["paired_val_boundary_iou"]
    ci = sps.ttest_rel(adst_biou, paper_biou).confidence_interval(0.95)
    assert head_to_head["ci95"] == pytest.approx([ci.low, ci.high]) and head_to_head["better"] == 3
    text = study.format_markdown(jsonable({"datasets": {"busi": entry}}))
    assert ("a tie on validation" in text) == (ci.low <= 0 <= ci.high)


FIXTURE = Path(__file__).parent / "fixtures" / "study_v1"


def test_report_only_reads_the_runs_of_the_earlier_study_code(tmp_path: Path) -> None:
    """fixtures/study_v1: result.json files and study_config.json written by the earlier single-file study.py
    (synthetic 32², 2 epochs, baseline/adst/paper, seeds 0-2)."""
    out = tmp_path / "old"
    shutil.copytree(FIXTURE, out)
    report = study.main(["--out", str(out), "--report-only", "--no-progress"])
    runs = {
        (p.parent.parent.name, int(p.parent.name[4:])): json.loads(p.read_text())
        for p in out.glob("runs/*/*/*/result.json")
    }
    entry = report["datasets"]["synthetic"]
    assert list(entry["arms"]) == ["baseline", "adst", "paper"] and report["report_only"]
    for arm in ("adst", "paper"):
        assert entry["arms"][arm]["n_runs"] == 3 and entry["arms"][arm]["flags"] == f"--preset {arm}"
        for split, key in (("val", "paired_val"), ("test", "paired")):
            for metric in ("dice", "boundary_iou"):
                diffs = [runs[arm, s][split][metric] - runs["baseline", s][split][metric] for s in range(3)]
                assert entry["arms"][arm][key][metric]["mean"] == pytest.approx(np.mean(diffs)), (arm, key, metric)
    # The rule, recomputed from the files.
    eligible = {a: entry["arms"][a]["paired_val"] for a in ("adst", "paper")
                if entry["arms"][a]["paired_val"]["dice"]["mean"] >= -0.005}  # fmt: skip
    expected = max(eligible, key=lambda a: eligible[a]["boundary_iou"]["mean"]) if eligible else None
    assert entry["choice"]["arm"] == expected
    text = (out / "study.md").read_text()
    assert "| paper |" in text and "Rule (fixed before the runs)" in text
    # Training into that folder is refused: its runs were made by another engine; --report-only is named.
    with pytest.raises(study.UsageError, match=r"other settings \(engine\).*--report-only"):
        study.main(["--out", str(out), "--datasets", "synthetic", "--img-size", "32", "--epochs", "2",
                    "--max-steps", "1", "--batch-size", "4", "--encoder", "resnet18", "--no-progress",
                    "--cache-dir", str(tmp_path / "cache"), "--synthetic-n", "16", "--arms", "adst,paper"])  # fmt: skip
    with pytest.raises(study.UsageError, match="no runs"):
        study.main(["--out", str(tmp_path / "empty"), "--report-only"])


@pytest.mark.slow
def test_every_peer_arm_runs_in_a_tiny_study(tmp_path: Path) -> None:
    pytest.importorskip("monai")
    peers = sorted(a for a, flags in study.arm_registry().items() if "--no-adst" in flags and a != "baseline")
    argv = ["--datasets", "synthetic", "--img-size", "32", "--epochs", "1", "--seeds", "1", "--synthetic-n", "16",
            "--max-steps", "1", "--batch-size", "4", "--encoder", "resnet18", "--no-progress",
            "--arms", ",".join(["baseline", "adst", *peers]),
            "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    report = study.main(argv)
    assert not report.get("failed")
    arms = report["datasets"]["synthetic"]["arms"]
    assert {"lovasz", "focal", "tversky", "hausdorff", "monai-dicece", "auxfcn"} <= set(peers)
    for arm in peers:
        assert arms[arm]["n_runs"] == 1 and arms[arm]["paired"]["dice"]["n"] == 1, arm
        assert math.isfinite(arms[arm]["step_ratio"]), arm
    assert report["datasets"]["synthetic"]["choice"]["arm"] == "adst"  # peers never become ADST's default


_ORPHAN_SCRIPT = """
import multiprocessing as mp
import time

from adst_examples.studylib import exit_with_parent


def worker(watch, ready):
    if watch:
        exit_with_parent()
    ready.send(True)
    time.sleep(120)


if __name__ == "__main__":
    import sys
    ctx = mp.get_context("spawn")
    ready, done = ctx.Pipe(duplex=False)  # a pipe, not an Event: no semaphore left behind by the kill
    child = ctx.Process(target=worker, args=(sys.argv[1] == "watch", done), daemon=True)
    child.start()
    ready.recv()  # the child is set up (imports done): the test's wait measures the reaction only
    print(child.pid, flush=True)
    time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; nobody may be left to reap it


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("watch", [True, False])
def test_a_killed_study_leaves_no_worker_training(tmp_path, watch):
    """SIGKILL of the study skips the clean-up that stops daemonic workers; exit_with_parent stops them anyway.
    Without it (watch=False) the worker is still running: the check can tell the two apart."""
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), "watch" if watch else "no"], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path)  # fmt: skip
    try:
        child = int(parent.stdout.readline())
        assert _running(child)
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _running(child) is not watch
    finally:
        parent.kill()
        if _running(child):
            os.kill(child, 9)


def _args(flags: str) -> Any:
    return study.parse_model_flags(["--encoder", "resnet18", *shlex.split(flags)], "test arm")


@pytest.mark.parametrize(
    ("flags", "then_target"),
    [("--preset adst", "core"), ("--preset adst --main-target sdf", "sdf"), ("--preset adst --main-target core",
     "core"), ("--preset paper", "core")],
)  # fmt: skip
def test_runs_from_before_the_recorded_settings_resolve_to_the_preset_of_their_day(flags: str, then_target: str):
    args = _args(flags)
    today = head_settings(args)
    res = {"model_args": vars(args)}  # what result.json held before ``adst_config``
    assert recorded_head(res) == {**today, "main_target": then_target}
    assert recorded_head({**res, "adst_config": today}) == today  # a recorded run is read as recorded
    assert recorded_head({"model_args": vars(_args("--no-adst"))}) is None


RECORDED_STUDY = Path(__file__).resolve().parents[2] / "docs" / "studies" / "boundary128"


def test_runs_recorded_with_the_former_field_name_resume_and_report(tmp_path: Path) -> None:
    # docs/studies/boundary128: runs whose adst_config and model_args hold w_core, w_main's former name.
    out = tmp_path / "b128"
    shutil.copytree(RECORDED_STUDY, out)
    path = next(out.glob("runs/busi/adst/seed0/result.json"))
    res = json.loads(path.read_text())
    assert "w_core" in res["adst_config"] and "w_core" in res["model_args"]  # as recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # reading a record is no use of the former name
        then = recorded_head(res)
    assert then == dataclasses.asdict(ADSTConfig(**then)) and then["w_main"] == res["adst_config"]["w_core"]
    # The arms spelled with today's flags (pinning any head default that changed since) resume every run.
    pins = " ".join(_flag(k, v) for k, v in then.items() if v != getattr(get_config("adst"), k))
    flags = {"baseline": "--no-adst", "adst": f"--preset adst {pins}".strip()}
    args = {arm: vars(_args(f)) for arm, f in flags.items()}
    jobs = [study.Job("busi", arm, s) for arm in flags for s in range(3)]
    assert set(load_finished(out, jobs, flags, args)) == set(jobs)
    # Runs of an arm that gave --w-core on its command line resume under an arm that spells it --w-main.
    for run in out.glob("runs/busi/adst/*/result.json"):
        recorded = json.loads(run.read_text())
        recorded["model_args"]["w_core"], recorded["arm_flags"] = 1.0, f"{flags['adst']} --w-core 1"
        write_json(run, recorded)
    same = flags["adst"] + " --w-main 1"
    assert set(load_finished(out, jobs, {**flags, "adst": same}, {**args, "adst": vars(_args(same))})) == set(jobs)
    other = flags["adst"] + " --w-main 0.5"  # the main term weighted otherwise is another model
    with pytest.raises(study.UsageError, match="run with other flags for arm 'adst'"):
        load_finished(out, jobs, {**flags, "adst": other}, {**args, "adst": vars(_args(other))})
    # A run from before adst_config was recorded, with --w-core on its command line, resolves it as w_main.
    before = {"model_args": {**vars(_args("--preset adst")), "w_core": 0.0}}
    assert recorded_head(before) == {**head_settings(_args("--preset adst --main-target core")), "w_main": 0.0}
    report = study.main(["--out", str(out), "--report-only", "--no-progress"])
    assert [report["datasets"]["busi"]["arms"][arm]["n_runs"] for arm in ("baseline", "adst")] == [3, 3]


def test_the_former_flag_still_works_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="--w-core is now --w-main"):
        former = _args("--preset adst --w-core 0")
    assert head_settings(former) == head_settings(_args("--preset adst --w-main 0"))
    with pytest.warns(DeprecationWarning), pytest.raises(study.UsageError, match="both w_core= and w_main="):
        _args("--preset adst --w-core 0 --w-main 1")


def _legacy_run(tmp_path: Path, job: Any, flags: str) -> Path:
    path = run_dir(tmp_path, job) / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**_result(job.dataset, job.arm, job.seed, 0.8, 0.8), "arm_flags": flags,
                      "model_args": vars(_args(flags))})  # fmt: skip
    return path


def test_resume_refuses_a_run_of_the_same_flags_with_another_head(tmp_path: Path) -> None:
    job = study.Job("busi", "adst", 0)
    now = {"adst": vars(_args("--preset adst"))}
    path = _legacy_run(tmp_path, job, "--preset adst")  # made when the preset meant main_target="core"
    with pytest.raises(study.UsageError, match=r"arm 'adst' was trained with other head settings \(main_target") as err:
        load_finished(tmp_path, [job], {"adst": "--preset adst"}, now)
    assert "--arm 'adst=--preset adst --main-target core'" in str(err.value)  # the action it names works:
    # The same run, spelled with today's flags for its head, resumes.
    pinned = "--preset adst --main-target core"
    assert set(load_finished(tmp_path, [job], {"adst": pinned}, {"adst": vars(_args(pinned))})) == {job}
    # Other flags that spell another model are refused, as is a run recorded with another head.
    other = "--preset adst --main-target core --head-stride 1"
    with pytest.raises(study.UsageError, match="run with other flags"):
        load_finished(tmp_path, [job], {"adst": other}, {"adst": vars(_args(other))})
    with pytest.raises(study.UsageError, match="run with other flags"):
        load_finished(tmp_path, [job], {"adst": pinned}, {"adst": vars(_args(pinned + " --encoder resnet34"))})
    write_json(path, {**json.loads(path.read_text()), "adst_config": head_settings(_args("--preset adst"))})
    assert set(load_finished(tmp_path, [job], {"adst": "--preset adst"}, now)) == {job}
    with pytest.raises(study.UsageError, match="now builds no ADST head"):
        load_finished(tmp_path, [job], {"adst": "--preset adst"}, {"adst": vars(_args("--preset adst --no-adst"))})
