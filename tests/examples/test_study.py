"""Tests of examples/study.py: plan order, budget estimates, the report, resume, and the device script's rehearsal."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as sps

study = pytest.importorskip("adst_examples.study")

ROOT = Path(__file__).resolve().parents[2]


def _result(dataset: str, arm: str, seed: int, dice: float, val: float, s_step: float = 0.1) -> dict[str, Any]:
    metrics = {"dice": dice, "iou": dice - 0.1, "hd95": 10 - 10 * dice, "boundary_iou": dice / 2,
               "small_recall": float("nan"), "small_dice": float("nan"), "images": 5.0}  # fmt: skip
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
        "val": {**metrics, "dice": val},
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
    assert "validation" in report["rule"]
    text = study.format_markdown(study.jsonable(report))
    assert "| adst |" in text and "Chosen on validation (among the ADST arms): **adst**" in text
    json.dumps(study.jsonable(report), allow_nan=False)  # strict JSON: NaN became null


def test_parse_epochs() -> None:
    assert study._parse_epochs("7", ["a", "b"]) == {"a": 7, "b": 7}
    assert study._parse_epochs("a=5,b=4", ["a", "b"]) == {"a": 5, "b": 4}
    with pytest.raises(study.UsageError):
        study._parse_epochs("a=5", ["a", "b"])


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
    for key in ("paired", "paired_val"):
        head = arms["adst"][key]["dice"]
        assert set(head) >= {"mean", "ci95", "better", "n"}
        assert head["n"] == 2 and 0 <= head["better"] <= 2
        lo, hi = head["ci95"]
        assert lo <= head["mean"] <= hi
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
    assert math.isfinite(again["wall_s"])


def test_the_default_is_chosen_among_the_adst_arms_only() -> None:
    # A peer (--no-adst) with the best validation difference is reported, but never becomes ADST's default.
    results = {}
    for s in range(3):
        results[study.Job("busi", "baseline", s)] = _result("busi", "baseline", s, 0.80, 0.70, 0.1)
        results[study.Job("busi", "adst", s)] = _result("busi", "adst", s, 0.79, 0.69 + 0.001 * s, 0.1)
        results[study.Job("busi", "focal", s)] = _result("busi", "focal", s, 0.83, 0.75, 0.1)
    flags = {**study.ARMS, "focal": "--no-adst --loss dice+focal"}
    report = study.build_report(results, ["busi"], ["baseline", "adst", "focal"], flags)
    entry = report["datasets"]["busi"]
    assert entry["arms"]["focal"]["paired_val"]["dice"]["mean"] > entry["arms"]["adst"]["paired_val"]["dice"]["mean"]
    assert entry["choice"]["arm"] == "adst" and entry["choice"]["beats_baseline_on_val"] is False


def test_convergence_check_reads_the_validation_curves() -> None:
    # Run 0 peaks at its last epoch after a late rise; run 1 peaked early and only fell afterwards.
    curves = {0: [0.50, 0.60, 0.61, 0.62, 0.65, 0.70], 1: [0.50, 0.68, 0.66, 0.65, 0.64, 0.63]}
    runs = []
    for seed, curve in curves.items():
        r = _result("busi", "adst", seed, 0.8, max(curve))
        r.update(history=[{"epoch": e + 1, "val_dice": v} for e, v in enumerate(curve)], epochs_run=len(curve),
                 best_epoch=1 + curve.index(max(curve)))  # fmt: skip
        runs.append(r)
    conv = study._convergence(runs, last=3)
    assert conv["best_at_last"] == pytest.approx(0.5)
    assert conv["best_gain_last"]["mean"] == pytest.approx(((0.70 - 0.61) + 0.0) / 2)
    assert conv["best_gain_last"]["n"] == 2


def test_the_choice_is_compared_with_the_next_adst_arm() -> None:
    results = {}
    paper_val = [0.71, 0.70, 0.72, 0.69]
    redesign_val = [0.72, 0.705, 0.74, 0.69]
    for s in range(4):
        results[study.Job("busi", "baseline", s)] = _result("busi", "baseline", s, 0.80, 0.70)
        results[study.Job("busi", "paper", s)] = _result("busi", "paper", s, 0.80, paper_val[s])
        results[study.Job("busi", "adst", s)] = _result("busi", "adst", s, 0.80, redesign_val[s])
    report = study.build_report(results, ["busi"], ["baseline", "paper", "adst"], study.ARMS)
    choice = report["datasets"]["busi"]["choice"]
    assert choice["arm"] == "adst" and choice["vs_runner_up"]["arm"] == "paper"
    head_to_head = choice["vs_runner_up"]["paired_val_dice"]
    ci = sps.ttest_rel(redesign_val, paper_val).confidence_interval(0.95)
    assert head_to_head["ci95"] == pytest.approx([ci.low, ci.high]) and head_to_head["better"] == 3
    text = study.format_markdown(study.jsonable(report))
    assert ("a tie on validation" in text) == (ci.low <= 0 <= ci.high)


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

from adst_examples.study import exit_with_parent


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
