"""What a study runs, in which order, what is already done, and how long the rest will take."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adst_examples.cli import positive_int
from adst_examples.studylib.config import RESUME_KEYS, StudyConfig, UsageError
from adst_examples.training.checkpoints import jsonable, write_json
from adst_examples.training.models import CONFIG_FIELDS, config_flag, head_settings
from adst_plugin.presets import RENAMED_FIELDS, renamed_fields

__all__ = [
    "Job",
    "check_resume",
    "estimate_seconds",
    "load_finished",
    "parse_epochs",
    "plan_jobs",
    "read_results",
    "recorded_head",
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


def load_finished(
    out: Path, jobs: Sequence[Job], arm_flags: dict[str, str], model_args: dict[str, dict[str, Any]]
) -> dict[Job, dict[str, Any]]:
    """The planned runs already finished in ``out``; one trained as another model than its arm's is an error.

    ``model_args`` (arm -> its parsed model flags) says what "the same model" is: the same head settings (what the
    flags resolve to, so a preset whose defaults changed since the run is caught) and the same other model flags.
    An arm may so spell a finished run's model with other flags (``--preset adst --main-target core`` for a run of
    ``--preset adst`` made before 2026-12-03). A run whose head cannot be told needs the same flags string.
    """
    heads = {arm: head_settings(argparse.Namespace(**model_args[arm])) for arm in {job.arm for job in jobs}}
    results = {}
    for job in jobs:
        path = run_dir(out, job) / "result.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text(encoding="utf-8"))
        same_flags = res.get("arm_flags") == arm_flags[job.arm]
        then_head = recorded_head(res)
        same_model = then_head is not _UNKNOWN and then_head == heads[job.arm]
        if not same_flags and not (same_model and _same_other_args(res["model_args"], model_args[job.arm])):
            raise UsageError(f"{path}: run with other flags for arm {job.arm!r}; use another --out")
        if then_head is not _UNKNOWN:
            _check_head(path, job.arm, arm_flags[job.arm], then_head, heads[job.arm])
        results[job] = res
    return results


_UNKNOWN: Any = object()


def recorded_head(res: dict[str, Any]) -> Any:
    """The head settings a finished run was trained with (``None``: no ADST head; ``_UNKNOWN`` if unrecorded).

    Runs from before the settings were recorded (no ``adst_config``) are resolved from their model flags as today,
    except the one default that changed since: ``--preset adst`` meant ``main_target="core"`` until 2026-12-03.
    Fields recorded under a former name (``w_core``) are read under today's (``presets.RENAMED_FIELDS``).
    """
    if "adst_config" in res:
        return None if res["adst_config"] is None else renamed_fields(res["adst_config"])
    args = res.get("model_args", {})
    if not {"no_adst", "preset"} <= set(args):
        return _UNKNOWN
    try:
        head = head_settings(argparse.Namespace(**{f: None for f in CONFIG_FIELDS} | args))
    except (TypeError, ValueError):
        return _UNKNOWN
    legacy = head is not None and args["preset"] == "adst" and args.get("main_target") is None
    return {**head, "main_target": "core"} if legacy else head


def _same_other_args(then: dict[str, Any], now: dict[str, Any]) -> bool:
    """The recorded model flags that are not head settings match today's (architecture, encoder, loss, peers)."""
    skip = {*CONFIG_FIELDS, *RENAMED_FIELDS, "preset"}
    return all(now.get(k) == v for k, v in then.items() if k not in skip)


def _check_head(path: Path, arm: str, flags: str, then: dict[str, Any] | None, now: dict[str, Any] | None) -> None:
    if then == now:
        return
    if then is None or now is None:
        changed = "an ADST head" if then is None else "no ADST head"
        raise UsageError(f"{path}: arm {arm!r} now builds {changed}; use another --out")
    keys = [k for k in sorted(now) if then.get(k) != now[k]]
    diffs = ", ".join(f"{k}: {then.get(k)!r} then, {now[k]!r} now" for k in keys)
    pins = " ".join(_flag(k, then.get(k)) for k in keys)
    raise UsageError(
        f"{path}: arm {arm!r} was trained with other head settings ({diffs}): a preset's defaults changed since. "
        f"To continue those runs, spell their head: --arm '{arm}={flags} {pins}'; or use another --out, "
        "or --report-only to report the folder"
    )


def _flag(field: str, value: Any) -> str:
    """The model flag that sets an ADSTConfig field to ``value`` (``--main-target core``, ``--no-detach-threshold``)."""
    flag = config_flag(field)
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {value}"


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


def estimate_seconds(
    job: Job, results: dict[Job, dict[str, Any]], epochs: int, like: dict[str, Any] | None = None
) -> float | None:
    """Seconds a run will take, from the s/epoch (and final evaluation) measured in finished runs.

    Same dataset and arm if any; else the slowest arm of the same dataset; else ``None`` (unknown: the run starts
    and is itself the measurement). ``like`` (some of :func:`run_settings`, e.g. ``{"channels_last": bool,
    "parallel": int}``, the settings the run will have): among those runs, the ones measured with these settings
    if any, so runs of an earlier layout or concurrency do not stand for this one.
    """

    def cost(r: dict[str, Any]) -> float:
        return epochs * r["timing"]["s_per_epoch"] + r["timing"].get("final_eval_s", 0.0)

    def alike(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not like:
            return runs
        matching = [r for r in runs if all(run_settings(r)[key] == value for key, value in like.items())]
        return matching or runs

    same = alike([r for j, r in results.items() if j.dataset == job.dataset and j.arm == job.arm])
    if same:
        return float(np.mean([cost(r) for r in same]))
    other = alike([r for j, r in results.items() if j.dataset == job.dataset])
    return float(max(cost(r) for r in other)) if other else None


def run_settings(result: dict[str, Any]) -> dict[str, Any]:
    """What a finished run's speed depends on besides its model: ``channels_last`` (False before it was
    recorded), ``parallel`` (runs sharing the device, from its timing) and ``device``."""
    return {
        "channels_last": bool(result.get("channels_last", False)),
        "parallel": result["timing"].get("parallel"),
        "device": result.get("device"),
    }
