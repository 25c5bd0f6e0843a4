"""What a study runs, in which order, what is already done, and how long the rest will take."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adst_examples.cli import positive_int
from adst_examples.studylib.config import RESUME_KEYS, StudyConfig, UsageError
from adst_examples.training.checkpoints import jsonable, write_json

__all__ = [
    "Job",
    "check_resume",
    "estimate_seconds",
    "load_finished",
    "parse_epochs",
    "plan_jobs",
    "read_results",
    "run_dir",
]


@dataclass(frozen=True)
class Job:
    """One training run."""

    dataset: str
    arm: str
    seed: int

    @property
    def key(self) -> str:
        """``dataset/arm/seed<k>``."""
        return f"{self.dataset}/{self.arm}/seed{self.seed}"


def parse_epochs(text: str, datasets: Sequence[str]) -> dict[str, int]:
    """``--epochs``: ``N`` for every dataset, or ``name=N,...`` naming each of them."""
    text = text.strip()
    if "=" not in text:
        return dict.fromkeys(datasets, positive_int(text))
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = positive_int(value)
    missing = [d for d in datasets if d not in out]
    if missing:
        raise UsageError(f"--epochs: no epochs given for {missing}")
    return {d: out[d] for d in datasets}


def plan_jobs(datasets: Sequence[str], arms: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Seed-major order: every dataset and arm gets seed ``k`` before any gets seed ``k + 1``."""
    return [Job(d, a, s) for s in seeds for d in datasets for a in arms]


def run_dir(out: Path, job: Job) -> Path:
    """``OUT/runs/<dataset>/<arm>/seed<k>``."""
    return out / "runs" / job.dataset / job.arm / f"seed{job.seed}"


def read_results(out: Path) -> dict[Job, dict[str, Any]]:
    """Every ``OUT/runs/<dataset>/<arm>/seed<k>/result.json`` (what the report is built from)."""
    results = {}
    for path in sorted(out.glob("runs/*/*/seed*/result.json")):
        res = json.loads(path.read_text(encoding="utf-8"))
        results[Job(res["dataset"], res["arm"], int(res["seed"]))] = res
    return results


def load_finished(out: Path, jobs: Sequence[Job], arm_flags: dict[str, str]) -> dict[Job, dict[str, Any]]:
    """The planned runs already finished in ``out``; one trained with other flags for its arm is an error."""
    results = {}
    for job in jobs:
        path = run_dir(out, job) / "result.json"
        if path.is_file():
            res = json.loads(path.read_text(encoding="utf-8"))
            if res.get("arm_flags") != arm_flags[job.arm]:
                raise UsageError(f"{path}: run with other flags for arm {job.arm!r}; use another --out")
            results[job] = res
    return results


def check_resume(out: Path, cfg: StudyConfig) -> None:
    """``OUT/study_config.json`` pins the settings every run of the folder shares; a mismatch is an error.

    New datasets may join (their epochs are added); anything else that differs names itself in the error.
    """
    path = out / "study_config.json"
    current = jsonable(cfg.resume_view())
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in RESUME_KEYS if k != "epochs" and saved.get(k) != current.get(k))
        old = saved.get("epochs", {})
        changed += [f"epochs[{d}]" for d, e in current["epochs"].items() if d in old and old[d] != e]
        if changed:
            raise UsageError(
                f"{out} holds a study with other settings ({', '.join(changed)}); use another --out "
                "(or --report-only to report it)"
            )
        current["epochs"] = {**saved.get("epochs", {}), **current["epochs"]}
    write_json(path, current)


def estimate_seconds(job: Job, results: dict[Job, dict[str, Any]], epochs: int) -> float | None:
    """Seconds a run will take, from the s/epoch (and final evaluation) measured in finished runs.

    Same dataset and arm if any; else the slowest arm of the same dataset; else ``None`` (unknown: the run starts
    and is itself the measurement).
    """

    def cost(r: dict[str, Any]) -> float:
        return epochs * r["timing"]["s_per_epoch"] + r["timing"].get("final_eval_s", 0.0)

    same = [cost(r) for j, r in results.items() if j.dataset == job.dataset and j.arm == job.arm]
    if same:
        return float(np.mean(same))
    other = [cost(r) for j, r in results.items() if j.dataset == job.dataset]
    return float(max(other)) if other else None
