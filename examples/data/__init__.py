"""Lesion-segmentation data of the ADST examples: datasets by name, synthetic data, splits and augmentation.

Every dataset returns ``(image, mask)`` pairs, ``float32`` ``(C, S, S)`` in ``[0, 1]`` and ``float32`` ``(1, S, S)``
in ``{0, 1}``, and has ``names``, ``tags`` and ``in_channels``; a multi-class dataset (``busi3``) returns ``int64``
``(S, S)`` class-index masks instead and has ``num_classes`` and ``class_names`` (:func:`num_classes`).
:data:`DATASETS` is the one list of dataset names:
what class each builds and which folder arguments it needs; the per-dataset rules (stratify the split by tag, a
lesion-free tag reported apart) are class attributes of the dataset classes.

Rooms: ``decode`` (files → arrays), ``paired`` (validated image/mask pairs), ``datasets`` (file layouts),
``synthetic``, ``splits``, ``transforms`` (the one augmentation), ``cache`` (a whole dataset in one file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from adst_examples.data.datasets import (
    BUSI3_CLASSES,
    BUSI_CLASSES,
    ISIC2018_SUBSETS,
    BUSI3Dataset,
    BUSIDataset,
    FolderDataset,
    ISIC2018Dataset,
    KvasirSEGDataset,
)
from adst_examples.data.decode import IMAGE_EXTENSIONS
from adst_examples.data.paired import BadPairsError, MissingPairsError, PairedLesionDataset, SamplePair
from adst_examples.data.splits import (
    SPLIT_KEYS,
    LesionSplit,
    get_or_create_split,
    load_split,
    make_split,
    save_split,
    split_indices,
)
from adst_examples.data.synthetic import SyntheticLesionDataset
from adst_examples.data.transforms import augment_batch, random_rot90, train_transforms

__all__ = [
    "BUSI3_CLASSES",
    "BUSI_CLASSES",
    "DATASETS",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "ISIC2018_SUBSETS",
    "SPLIT_KEYS",
    "BUSI3Dataset",
    "BUSIDataset",
    "BadPairsError",
    "DatasetEntry",
    "FolderDataset",
    "ISIC2018Dataset",
    "KvasirSEGDataset",
    "LesionSplit",
    "MissingPairsError",
    "PairedLesionDataset",
    "SamplePair",
    "SyntheticLesionDataset",
    "augment_batch",
    "build_dataset",
    "datasets_needing",
    "get_or_create_split",
    "load_split",
    "make_split",
    "num_classes",
    "random_rot90",
    "save_split",
    "split_indices",
    "train_transforms",
]


@dataclass(frozen=True)
class DatasetEntry:
    """How :func:`build_dataset` builds one named dataset.

    Attributes:
        cls: The dataset class; its ``stratify_by_tag`` and ``lesion_free_tag`` attributes are its rules.
        needs: The folder arguments of :func:`build_dataset` that ``cls`` takes positionally, in order.
    """

    cls: type[Dataset[tuple[Tensor, Tensor]]]
    needs: tuple[str, ...] = ()


#: Every dataset name, in the order they are listed to users.
DATASETS: dict[str, DatasetEntry] = {
    "busi": DatasetEntry(BUSIDataset, ("root",)),
    "busi3": DatasetEntry(BUSI3Dataset, ("root",)),
    "isic2018": DatasetEntry(ISIC2018Dataset, ("root",)),
    "kvasir": DatasetEntry(KvasirSEGDataset, ("root",)),
    "folder": DatasetEntry(FolderDataset, ("images", "masks")),
    "synthetic": DatasetEntry(SyntheticLesionDataset),
}
#: The names of :data:`DATASETS` (for ``argparse`` choices).
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def num_classes(dataset: Any) -> int:
    """The model's ``classes`` for ``dataset``: its ``num_classes`` (multi-class masks of class indices), else 1."""
    return int(getattr(dataset, "num_classes", 1))


def datasets_needing(argument: str) -> list[str]:
    """Names of the datasets that take ``argument`` (``root``, ``images`` or ``masks``)."""
    return [name for name, entry in DATASETS.items() if argument in entry.needs]


def build_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    images: str | Path | None = None,
    masks: str | Path | None = None,
    img_size: int = 256,
    **kw: Any,
) -> Dataset[tuple[Tensor, Tensor]]:
    """Build a dataset by name.

    Args:
        name: A key of :data:`DATASETS` (case-insensitive): ``busi``, ``busi3`` (BUSI as three classes),
            ``isic2018``, ``kvasir`` (need ``root``),
            ``folder`` (needs ``images`` and ``masks``), ``synthetic`` (no files).
        root: Dataset root for ``busi`` / ``isic2018`` / ``kvasir``.
        images: Images folder for ``folder``.
        masks: Masks folder for ``folder``.
        img_size: Output side length.
        **kw: Passed to the dataset class, e.g. ``include_normal``, ``subsets``, ``mask_suffix``, ``channels``,
            ``skip_bad``, ``n``, ``seed``.

    Raises:
        ValueError: unknown name or missing folder argument.
    """
    key = name.lower().strip()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    entry = DATASETS[key]
    given = {"root": root, "images": images, "masks": masks}
    if any(given[arg] is None for arg in entry.needs):
        raise ValueError(f"dataset {key!r} needs {' and '.join(f'{arg}=<folder>' for arg in entry.needs)}")
    return entry.cls(*(given[arg] for arg in entry.needs), img_size=img_size, **kw)  # type: ignore[call-arg]
