"""ADST examples: training scripts, data, metrics, the study and benchmarks around the ``adst_plugin`` package.

A project of its own (``examples/pyproject.toml``, installed with ``pip install -e ./examples``) whose package is
``adst_examples``, so the scripts import their helpers as ``from adst_examples.<room> import ...`` and run both as
``python examples/train.py`` and, from the repository root, as ``python -m examples.train``.

Layout (imports point down this list: a room imports only rooms below it)::

    train.py, compare.py, study.py, lightning_busi.py   command lines
    studylib/        the study: arms, datasets (--folder), plan/resume, one run, workers, scheduling, report, markdown
    training/        fit (train.py's run), parts (what it builds), engine (the step and the epoch), batches (DataLoader
                     or cache), evaluation, models (build_model, build_criterion), checkpoints, distributed, plots
    peers.py, deep_supervision.py   the study's peer heads and losses
    data/            datasets by name, decoding, splits, the one augmentation, the dataset cache
    metrics/         per-image Dice, IoU, precision, recall, HD95, boundary IoU; small lesions; the accumulator
    stats.py         mean ± std and paired intervals over seeds
    benchmarks/      training overhead, inference cost, target building, term gradients, the GPU script
"""
