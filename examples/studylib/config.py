"""The settings every run of a study shares, as one frozen object that travels to the worker processes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ENGINE", "RESUME_KEYS", "StudyConfig", "UsageError"]

#: The training engine's protocol, pinned in ``study_config.json``: runs of another protocol are not mixed in.
ENGINE = "engine-2: epoch_order batches, train_transforms per sample, evaluation at logit >= 0"
#: The settings that every run of an OUT folder must share (``study_config.json``).
RESUME_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "min_lr_ratio", "max_steps", "patience", "augment",
               "img_size", "passthrough", "split_seed", "engine")  # fmt: skip


class UsageError(Exception):
    """A bad command line or study folder, reported without a traceback."""


@dataclass(frozen=True)
class StudyConfig:
    """What a run needs besides its job: training settings, each arm's flags and model arguments, the caches."""

    out: str
    device: str
    amp: str
    #: Epochs per dataset name.
    epochs: Mapping[str, int]
    batch_size: int
    #: Peak learning rate; ``None``: :func:`~adst_examples.training.engine.default_lr` of the dataset.
    lr: float | None
    weight_decay: float
    min_lr_ratio: float
    max_steps: int | None
    #: Stop after this many epochs without a better validation Dice (0: off).
    patience: int
    augment: bool
    #: Arm name → its model flags.
    arm_flags: Mapping[str, str]
    #: Arm name → the model builder's arguments (``vars`` of the parsed flags).
    model_args: Mapping[str, Mapping[str, Any]]
    #: Dataset name → its cache file.
    cache_files: Mapping[str, str]
    img_size: int
    #: Model flags given for every arm.
    passthrough: tuple[str, ...]
    split_seed: int
    #: torch CPU threads per run.
    threads: int = 1
    #: NHWC weights (``--channels-last``): a speed setting, not pinned; each result.json records it.
    channels_last: bool = False
    engine: str = ENGINE

    def resume_view(self) -> dict[str, Any]:
        """The settings pinned in ``study_config.json``."""
        return {key: getattr(self, key) for key in RESUME_KEYS}
