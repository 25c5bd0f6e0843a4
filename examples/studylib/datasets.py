"""The study's datasets: the named ones under ``--data-root``, the synthetic one, and the user's ``--folder`` sets.

Each is decoded once into a cache (:mod:`adst_examples.data.cache`) with the seeded split of train.py; the runs
read the caches. A bad folder gets train.py's errors, with the study's flags in the fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adst_examples.data import BadPairsError
from adst_examples.data import cache as dcache
from adst_examples.studylib.config import UsageError

__all__ = ["DATA_DIRS", "FolderSpec", "dataset_source", "parse_folders", "prepare_caches"]

#: The named datasets: name → folder under ``--data-root`` (``busi3``: BUSI as three classes, benign/malignant).
DATA_DIRS = {
    "busi": "Dataset_BUSI_with_GT",
    "busi3": "Dataset_BUSI_with_GT",
    "kvasir": "Kvasir-SEG",
    "isic2018": "ISIC2018",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class FolderSpec:
    """``--folder NAME IMAGES_DIR MASKS_DIR``: a dataset of image files and same-stem mask files."""

    name: str
    images: str
    masks: str


def parse_folders(specs: Sequence[Sequence[str]]) -> dict[str, FolderSpec]:
    """The ``--folder`` triples by name; a name that is taken, repeated or unusable as a file name is refused."""
    folders: dict[str, FolderSpec] = {}
    for name, images, masks in specs:
        if not _NAME.fullmatch(name):
            raise UsageError(f"--folder {name}: expected a name of letters, digits, '_', '-' or '.', got {name!r}")
        if name in DATA_DIRS or name == "synthetic" or name in folders:
            raise UsageError(f"--folder {name}: the name is already taken; choose another NAME")
        folders[name] = FolderSpec(name, images, masks)
    return folders


def dataset_source(
    name: str, *, data_root: str, synthetic_n: int, folders: dict[str, FolderSpec], skip_bad: bool = False
) -> tuple[str, dict[str, Any]]:
    """The ``build_dataset`` loader name and keywords of dataset ``name``."""
    if name == "synthetic":
        return "synthetic", {"n": synthetic_n}
    if name in folders:
        spec = folders[name]
        return "folder", {"images": spec.images, "masks": spec.masks, "skip_bad": skip_bad}
    if name not in DATA_DIRS:
        known = ["synthetic", *DATA_DIRS, *folders]
        raise UsageError(f"--datasets: unknown dataset {name!r}; valid: {', '.join(known)} (or add one with --folder)")
    return name, {"root": str(Path(data_root) / DATA_DIRS[name]), "skip_bad": skip_bad}


def prepare_caches(
    datasets: Sequence[str],
    *,
    cache_dir: str,
    img_size: int,
    split_seed: int,
    rebuild: bool = False,
    **source: Any,
) -> dict[str, str]:
    """Build (or reuse) the cache of every dataset; ``source`` are :func:`dataset_source`'s keywords."""
    files = {}
    for name in datasets:
        loader, kwargs = dataset_source(name, **source)
        where = f"--folder {name}" if loader == "folder" else f"dataset {name}"
        if "root" in kwargs and not Path(kwargs["root"]).is_dir():
            # A cache carried without its dataset (e.g. to a GPU machine) is used as it is.
            path = dcache.cache_path(cache_dir, name, img_size)
            header = dcache.read_header(path) if path.is_file() and not rebuild else {}
            if (header.get("version"), header.get("split_seed")) == (dcache.CACHE_VERSION, split_seed):
                files[name] = str(path)
                continue
            raise UsageError(f"{where}: '{kwargs['root']}' not found and no cache at '{path}'; set --data-root")
        try:
            built = dcache.cache_dataset(
                name, img_size, cache_dir, loader=loader, split_seed=split_seed, rebuild=rebuild, **kwargs
            )
        except BadPairsError as exc:
            raise UsageError(f"{where}: {exc.with_fix('pass --skip-bad to skip them')}") from None
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"{where}: {exc}") from None
        files[name] = str(built)
    return files
