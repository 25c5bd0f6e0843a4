"""ADST examples: training scripts, data, metrics and benchmarks around the ``adst_plugin`` package.

Installed as ``adst_examples`` (``pip install -e .``), so the scripts import their helpers as
``from adst_examples.<room> import ...`` and run both as ``python examples/train.py`` and, from the repository root,
as ``python -m examples.train``.

Layout::

    data/            datasets by name (build_dataset, DATASETS), decoding, synthetic data, splits, augmentation
    training/        models (build_model, build_criterion), loop (loaders, train/evaluate), checkpoints and logs,
                     distributed (DDP, device, AMP), plots
    metrics.py       per-image Dice, IoU, precision, recall, HD95 and their accumulator
    train.py         the training CLI: train, validate, export, test one run
    compare.py       baseline vs ADST over seeds on one shared split
    ablations.py     one table of the ablations compare.py wrote
    benchmarks/      training overhead, inference cost, target building (scripts; _common.py is shared)
"""
