"""The ADST study: every arm × dataset × seed on cached, on-device data, with paired intervals against the baseline.

This package is the study, split by job: ``arms`` (names → model flags), ``datasets`` (caches, ``--folder``),
``plan`` (jobs, resume, estimates), ``run`` (one run on the engine), ``workers`` (processes sharing the device),
``schedule`` (the one scheduling loop), ``report`` (study.json and the rule), ``markdown`` (study.md), ``cli``.
``examples/study.py`` is its command line.

::

    python examples/study.py --datasets busi,kvasir --arms baseline,adst,paper,legacy --seeds 5 \
        --epochs busi=50,kvasir=40 --img-size 256 --out runs/study --device cuda --measure-parallel --budget-min 8

What it does:

- **Data.** Each dataset (a named one, ``synthetic``, or the user's ``--folder NAME IMAGES_DIR MASKS_DIR``) is
  decoded once into a compact cache (:mod:`adst_examples.data.cache`: the original file bytes, decoded again at
  start; 37 MiB for BUSI + Kvasir-SEG at 256²), held on the device as ``uint8`` and augmented there with train.py's
  pipeline. The split is the seeded, stratified one of train.py (``--split-seed``), shared by every run.
- **Runs.** An *arm* is a name and a string of model flags (:data:`ARMS`; ``--arm NAME=FLAGS`` adds one; peer arms
  come from ``adst_examples.peers.ARMS``). Every flag study.py does not know is passed to the model/criterion
  builder of train.py (``--arch``, ``--encoder``, ...), for every arm; the arm's own flags come last and win.
  Each run is train.py's computation on the engine (:mod:`adst_examples.training.engine`): AdamW, cosine LR per
  step, autocast on CUDA, validation Dice every epoch, the best-on-validation weights, optional early stopping
  (``--patience``), then validation and test metrics of the exported plain model. Seed ``k`` fixes
  initialisation, batch order and augmentation draws, so the runs of all arms with seed ``k`` are paired.
- **Order, concurrency, budget, resume.** Runs go seed by seed (every arm and dataset gets seed ``k`` before
  any gets ``k + 1``). ``--parallel N`` trains N runs at once on the device (N worker processes, each holding
  the decoded data); ``--measure-parallel`` times N = 1, 2, 4, 8 first and picks the smallest N within 5 % of
  the best throughput. ``--budget-min M`` starts no run that its measured seconds per epoch say would end after
  M minutes, and a run that falls behind stops (unsaved) at the deadline. Each finished run writes
  ``OUT/runs/<dataset>/<arm>/seed<k>/result.json``, with the head settings its flags resolved to
  (``adst_config``); a rerun skips those, and refuses a folder whose finished runs of an arm were trained with
  other flags or other head settings (a preset whose defaults changed since).
- **Report.** ``OUT/study.json`` and ``OUT/study.md``: per dataset and arm, test and validation Dice, IoU, HD95,
  boundary IoU, small-lesion recall and Dice (mean ± std over seeds); per arm against the baseline, the paired
  difference per seed, its mean, 95 % t-interval and better/n (``paired`` on test, ``paired_val`` on
  validation), and the training step-time ratio. **Rule, fixed before the runs: the default is the ADST arm with
  the best mean paired validation boundary IoU among the ADST arms whose mean paired validation Dice difference
  is >= -0.5 points; test is reported, never used to choose; if no arm's paired BIoU interval lies above 0, the
  report says so.** ``--report-only`` builds the report from the result.json files already in OUT. With several
  datasets the report also names one default across them (``across``: eligible on every dataset, best mean of the
  per-dataset mean paired validation BIoU; ``--tie-prefer CHEAP=OVER`` for a cheaper arm that ties).
"""

from adst_examples.studylib.across import ACROSS_RULE, choose_across
from adst_examples.studylib.arms import ARMS, BASELINE, arm_registry, parse_model_flags
from adst_examples.studylib.cli import build_parser, cli, main
from adst_examples.studylib.config import StudyConfig, UsageError
from adst_examples.studylib.datasets import dataset_source
from adst_examples.studylib.markdown import format_markdown
from adst_examples.studylib.plan import Job, estimate_seconds, parse_epochs, plan_jobs
from adst_examples.studylib.report import METRICS, MIN_SEEDS, RULE, build_report, choose_default
from adst_examples.studylib.workers import exit_with_parent

__all__ = [
    "ACROSS_RULE",
    "ARMS",
    "BASELINE",
    "METRICS",
    "MIN_SEEDS",
    "RULE",
    "Job",
    "StudyConfig",
    "UsageError",
    "arm_registry",
    "build_parser",
    "build_report",
    "choose_across",
    "choose_default",
    "cli",
    "dataset_source",
    "estimate_seconds",
    "exit_with_parent",
    "format_markdown",
    "main",
    "parse_epochs",
    "parse_model_flags",
    "plan_jobs",
]
