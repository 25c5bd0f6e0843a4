"""File-based lesion datasets: a validated list of image/mask pairs, decoded lazily.

Every dataset returns ``(image, mask)``: ``float32`` ``(C, S, S)`` in ``[0, 1]`` and ``float32`` ``(1, S, S)`` in
``{0, 1}`` (see :mod:`adst_examples.data.decode`), and has ``names``, ``image_paths``, ``mask_paths``, ``tags`` and
``in_channels``. Pairs are validated when the dataset is built (PIL header + ``verify()`` of every file,
image/mask sizes), so a broken release fails before the first epoch; ``skip_bad=True`` drops bad pairs with one
warning.

Everything BUSI-specific (class folders, extra ``_mask_N`` files, the lesion-free ``normal`` class that is
stratified and reported apart) is in :class:`BUSIDataset`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from adst_examples.data.decode import (
    IMAGE_EXTENSIONS,
    BadFileError,
    decode_image,
    decode_mask,
    is_image_file,
    probe_size,
    resize_mask,
)
from adst_examples.data.splits import SPLIT_KEYS, natural_key

__all__ = [
    "BUSI_CLASSES",
    "ISIC2018_SUBSETS",
    "BUSIDataset",
    "FolderDataset",
    "ISIC2018Dataset",
    "KvasirSEGDataset",
    "PairedLesionDataset",
    "SamplePair",
]

#: BUSI class folders, in the order of the official release.
BUSI_CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")

#: ISIC 2018 Task 1 subsets: ``subset -> (input folder, ground-truth folder)``.
ISIC2018_SUBSETS: dict[str, tuple[str, str]] = {
    "training": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}

_MAX_LISTED = 20  # problems listed in one error/warning message


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: directory '{path}' does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: '{path}' is not a directory")
    return path


def _resolve_root(root: str | Path, official_name: str, what: str) -> Path:
    """Accept either the dataset folder itself or a parent folder that contains ``official_name``."""
    root = Path(root).expanduser()
    _require_dir(root, what)
    nested = root / official_name
    return nested if nested.is_dir() else root


def _format_list(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    lines = [f"  - {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


@dataclass(frozen=True)
class SamplePair:
    """One image with its mask file(s) (several masks are merged by union).

    Attributes:
        name: Sample identifier, unique within a dataset (usually the image file stem).
        image: Path of the image file.
        masks: Paths of the mask files; their union is the ground truth.
        tag: Optional per-sample label (BUSI class, ISIC subset, ...).
    """

    name: str
    image: Path
    masks: tuple[Path, ...]
    tag: str | None = None


@dataclass(frozen=True)
class _Problem:
    kind: str  # "missing", "unreadable", "size", "ambiguous"
    message: str


class PairedLesionDataset(Dataset[tuple[Tensor, Tensor]]):
    """Base class: a validated list of :class:`SamplePair` decoded lazily.

    Subclasses discover the pairs of their official layout; this class validates them and decodes them.

    Attributes:
        names: Sample identifiers (unique), index-aligned with the items.
        image_paths: Image file of each sample.
        mask_paths: Mask file(s) of each sample (merged by union).
        tags: Per-sample tag (e.g. BUSI class) or ``None``.
        in_channels: Number of image channels (1 or 3).
        img_size: Output side length, or ``None`` for native size.
        skipped: Messages of the pairs dropped because of ``skip_bad=True``.
    """

    #: Split each tag group separately (the tags are classes worth keeping balanced across splits).
    stratify_by_tag: ClassVar[bool] = False
    #: Tag of the lesion-free images, reported apart and optionally left out of training (``None``: no such tag).
    lesion_free_tag: ClassVar[str | None] = None

    def __init__(
        self,
        pairs: Sequence[SamplePair],
        *,
        in_channels: int,
        img_size: int | None = 256,
        skip_bad: bool = False,
        mask_threshold: int = 127,
        description: str = "dataset",
        problems: Sequence[_Problem] = (),
    ) -> None:
        """Validate ``pairs`` (headers, sizes, unique names) and keep the good ones.

        Args:
            pairs: Candidate pairs found by discovery.
            in_channels: 1 (grayscale) or 3 (RGB).
            img_size: Square output size (``None`` keeps the native size).
            skip_bad: Drop bad pairs with one warning instead of raising.
            mask_threshold: 8-bit mask values ``> mask_threshold`` are lesion.
            description: Used in messages, e.g. ``"BUSI dataset at /data/Dataset_BUSI_with_GT"``.
            problems: Problems already found during discovery (e.g. missing masks).

        Raises:
            FileNotFoundError: when pairs are missing a mask file (and ``skip_bad`` is False) or nothing was found.
            ValueError: unreadable files, image/mask size mismatches, duplicate names, bad arguments.
        """
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"{description}: in_channels must be 1 or 3, got {in_channels}")
        if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
            raise ValueError(f"{description}: img_size must be a positive int or None, got {img_size!r}")
        self.in_channels = in_channels
        self.img_size = img_size
        self.mask_threshold = mask_threshold
        self.description = description

        all_problems = list(problems)
        good: list[SamplePair] = []
        seen: dict[str, Path] = {}
        for pair in pairs:
            problem = self._check_pair(pair)
            if problem is None and pair.name in seen:
                problem = _Problem(
                    "ambiguous", f"duplicate sample name '{pair.name}': '{seen[pair.name]}' and '{pair.image}'"
                )
            if problem is None:
                seen[pair.name] = pair.image
                good.append(pair)
            else:
                all_problems.append(problem)

        self.skipped: list[str] = []
        if all_problems:
            messages = [p.message for p in all_problems]
            if not skip_bad:
                only_missing = all(p.kind == "missing" for p in all_problems)
                exc_type: type[Exception] = FileNotFoundError if only_missing else ValueError
                raise exc_type(
                    f"{description}: {len(messages)} bad image/mask pair(s):\n{_format_list(messages)}\n"
                    "Fix the files or pass skip_bad=True to skip them."
                )
            self.skipped = messages
            warnings.warn(
                f"{description}: skipping {len(messages)} bad image/mask pair(s):\n{_format_list(messages)}",
                stacklevel=3,
            )
        if not good:
            if all_problems:
                raise ValueError(f"{description}: no usable image/mask pairs left after skipping bad ones")
            raise FileNotFoundError(f"{description}: no image/mask pairs found")

        self._pairs: list[SamplePair] = good
        self.names: list[str] = [p.name for p in good]
        self.image_paths: list[Path] = [p.image for p in good]
        self.mask_paths: list[tuple[Path, ...]] = [p.masks for p in good]
        self.tags: list[str | None] = [p.tag for p in good]

    @staticmethod
    def _check_pair(pair: SamplePair) -> _Problem | None:
        try:
            image_size = probe_size(pair.image)
            mask_sizes = [(m, probe_size(m)) for m in pair.masks]
        except BadFileError as exc:
            return _Problem("unreadable", str(exc))
        for mask_path, mask_size in mask_sizes:
            if mask_size != image_size:
                return _Problem(
                    "size",
                    f"size mismatch: image '{pair.image}' is {image_size[0]}x{image_size[1]} (WxH) but mask "
                    f"'{mask_path}' is {mask_size[0]}x{mask_size[1]}",
                )
        return None

    def __len__(self) -> int:
        """Number of valid samples."""
        return len(self._pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Decode sample ``index``.

        Returns:
            ``(image, mask)``: ``float32`` ``(C, S, S)`` in ``[0, 1]`` and ``float32`` ``(1, S, S)`` in ``{0, 1}``.
        """
        pair = self._pairs[index]
        image, native = decode_image(pair.image, self.in_channels, self.img_size)
        mask: np.ndarray | None = None
        for mask_path in pair.masks:
            part = decode_mask(mask_path, self.mask_threshold)
            if part.shape != native:
                raise ValueError(
                    f"{self.description}: size mismatch between '{pair.image}' {native} and "
                    f"'{mask_path}' {part.shape} (HxW)"
                )
            mask = part if mask is None else (mask | part)
        assert mask is not None  # every pair has >= 1 mask
        if self.img_size is not None:
            mask = resize_mask(mask, self.img_size)
        return torch.from_numpy(image), torch.from_numpy(mask.astype(np.float32))[None]

    def __repr__(self) -> str:
        """Short summary."""
        return (
            f"{type(self).__name__}(n={len(self)}, in_channels={self.in_channels}, img_size={self.img_size}, "
            f"source={self.description!r})"
        )


class BUSIDataset(PairedLesionDataset):
    """Breast Ultrasound Images (BUSI), official ``Dataset_BUSI_with_GT`` layout.

    Layout: ``<root>/{benign,malignant,normal}/<class> (N).png`` with ``<class> (N)_mask.png`` and optional
    extra masks ``<class> (N)_mask_1.png``, ``_mask_2.png``, ... (merged by union). ``root`` may be the
    ``Dataset_BUSI_with_GT`` folder itself or its parent. Images are loaded as 1-channel grayscale (the few RGB
    images are converted with ITU-R 601-2 luma). ``normal`` masks are all zero.

    Attributes:
        classes: Class of each sample (``"benign"``, ``"malignant"`` or ``"normal"``); same as ``tags``.
    """

    stratify_by_tag = True
    lesion_free_tag = "normal"

    def __init__(
        self,
        root: str | Path,
        *,
        img_size: int | None = 256,
        include_normal: bool = True,
        skip_bad: bool = False,
    ) -> None:
        """Discover and validate the BUSI pairs.

        Args:
            root: ``Dataset_BUSI_with_GT`` folder (or its parent).
            img_size: Square output size (``None``: native size).
            include_normal: Include the ``normal`` class (images without lesion, all-zero masks).
            skip_bad: Skip bad pairs with one warning instead of raising.

        Raises:
            FileNotFoundError: missing root/class folder, missing ``_mask.png``, no images.
            ValueError: unreadable files or image/mask size mismatch.
        """
        root = _resolve_root(root, "Dataset_BUSI_with_GT", "BUSI dataset")
        self.root = root
        classes = [c for c in BUSI_CLASSES if include_normal or c != self.lesion_free_tag]
        mask_re = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<extra>\d+))?$")
        pairs: list[SamplePair] = []
        problems: list[_Problem] = []
        for cls in classes:
            cls_dir = root / cls
            if not cls_dir.is_dir():
                hint = (
                    " (pass include_normal=False if you only have benign/malignant)"
                    if cls == self.lesion_free_tag
                    else ""
                )
                raise FileNotFoundError(f"BUSI dataset at '{root}': class folder '{cls_dir}' not found{hint}")
            files = [p for p in cls_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"]
            masks: dict[str, dict[int, Path]] = {}
            images: list[Path] = []
            for path in files:
                match = mask_re.match(path.stem)
                if match is None:
                    images.append(path)
                else:
                    extra = match.group("extra")
                    masks.setdefault(match.group("stem"), {})[0 if extra is None else int(extra) + 1] = path
            for image in sorted(images, key=lambda p: natural_key(p.name)):
                found = masks.get(image.stem, {})
                if 0 not in found:
                    expected = image.with_name(f"{image.stem}_mask.png")
                    problems.append(_Problem("missing", f"image '{image}' has no mask '{expected}'"))
                    continue
                mask_files = tuple(found[k] for k in sorted(found))
                pairs.append(SamplePair(image.stem, image, mask_files, cls))
        super().__init__(
            pairs,
            in_channels=1,
            img_size=img_size,
            skip_bad=skip_bad,
            description=f"BUSI dataset at '{root}'",
            problems=problems,
        )

    @property
    def classes(self) -> list[str | None]:
        """Class (``benign``/``malignant``/``normal``) of each sample."""
        return self.tags


def _pair_by_stem(
    images_dir: Path,
    masks_dir: Path,
    *,
    mask_suffix: str,
    image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
    tag: str | None = None,
) -> tuple[list[SamplePair], list[_Problem]]:
    """Match ``images_dir/<stem>.<ext>`` with ``masks_dir/<stem><mask_suffix>.<ext>`` (any allowed extension)."""
    same_dir = images_dir.resolve() == masks_dir.resolve()
    if same_dir and not mask_suffix:
        raise ValueError(f"images and masks share the folder '{images_dir}': a mask_suffix (e.g. '_mask') is required")
    exts = tuple(e.lower() for e in image_extensions)
    image_files = [p for p in images_dir.iterdir() if is_image_file(p) and p.suffix.lower() in exts]
    mask_files = [p for p in masks_dir.iterdir() if is_image_file(p)]
    if same_dir:
        image_files = [p for p in image_files if not p.stem.endswith(mask_suffix)]
    masks_by_stem: dict[str, list[Path]] = {}
    for path in mask_files:
        masks_by_stem.setdefault(path.stem, []).append(path)
    images_by_stem: dict[str, list[Path]] = {}
    for path in image_files:
        images_by_stem.setdefault(path.stem, []).append(path)

    pairs: list[SamplePair] = []
    problems: list[_Problem] = []
    for stem in sorted(images_by_stem, key=natural_key):
        images = sorted(images_by_stem[stem])
        if len(images) > 1:
            names = ", ".join(f"'{p}'" for p in images)
            problems.append(_Problem("ambiguous", f"several images share the stem '{stem}': {names}"))
            continue
        image = images[0]
        candidates = sorted(masks_by_stem.get(stem + mask_suffix, []))
        if not candidates:
            wanted = f"{stem}{mask_suffix}{{{','.join(IMAGE_EXTENSIONS)}}}"
            problems.append(_Problem("missing", f"image '{image}' has no mask '{masks_dir / wanted}'"))
            continue
        if len(candidates) > 1:
            same_ext = [p for p in candidates if p.suffix.lower() == image.suffix.lower()]
            if len(same_ext) != 1:
                names = ", ".join(f"'{p}'" for p in candidates)
                problems.append(_Problem("ambiguous", f"image '{image}' matches several masks: {names}"))
                continue
            candidates = same_ext
        pairs.append(SamplePair(stem, image, (candidates[0],), tag))
    return pairs, problems


class FolderDataset(PairedLesionDataset):
    """Generic ``images_dir`` / ``masks_dir`` pairs matched by file stem (e.g. CVC-ClinicDB).

    An image ``<stem>.<ext>`` is paired with the mask ``<stem><mask_suffix>.<ext2>``; extensions are any of
    :data:`IMAGE_EXTENSIONS`. If two masks match, the one with the image's extension wins. Images and masks may
    share one folder when ``mask_suffix`` is non-empty.
    """

    def __init__(
        self,
        images_dir: str | Path,
        masks_dir: str | Path,
        *,
        mask_suffix: str = "",
        channels: int = 3,
        img_size: int | None = 256,
        mask_threshold: int = 127,
        skip_bad: bool = False,
        description: str | None = None,
    ) -> None:
        """Discover and validate the folder pairs.

        Args:
            images_dir: Folder of images.
            masks_dir: Folder of masks (may equal ``images_dir`` when ``mask_suffix`` is set).
            mask_suffix: Text after the image stem in mask names, e.g. ``"_mask"`` or ``"_segmentation"``.
            channels: 1 (grayscale) or 3 (RGB).
            img_size: Square output size (``None``: native size).
            mask_threshold: 8-bit mask values ``> mask_threshold`` are lesion (use 0 for masks stored as 0/1).
            skip_bad: Skip bad pairs with one warning instead of raising.
            description: Name used in messages.

        Raises:
            FileNotFoundError: missing folders, missing masks, no images.
            ValueError: unreadable files, size mismatches, ambiguous matches.
        """
        images_dir = _require_dir(Path(images_dir).expanduser(), "images folder")
        masks_dir = _require_dir(Path(masks_dir).expanduser(), "masks folder")
        self.images_dir = images_dir
        self.masks_dir = masks_dir
        pairs, problems = _pair_by_stem(images_dir, masks_dir, mask_suffix=mask_suffix)
        if not pairs and not problems:
            raise FileNotFoundError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in '{images_dir}'"
                + (f" (masks folder '{masks_dir}')" if masks_dir != images_dir else "")
            )
        super().__init__(
            pairs,
            in_channels=channels,
            img_size=img_size,
            skip_bad=skip_bad,
            mask_threshold=mask_threshold,
            description=description or f"folder dataset '{images_dir}' + '{masks_dir}'",
            problems=problems,
        )


class KvasirSEGDataset(FolderDataset):
    """Kvasir-SEG polyps: ``<root>/images/*.jpg`` + ``<root>/masks/*.jpg`` with identical names.

    ``root`` may be the ``Kvasir-SEG`` folder or its parent. JPEG masks carry compression noise and are
    thresholded at 127. Images are RGB (3 channels). Extra files (``kavsir_bboxes.json``) are ignored.
    """

    def __init__(self, root: str | Path, *, img_size: int | None = 256, skip_bad: bool = False) -> None:
        """Discover and validate the Kvasir-SEG pairs.

        Args:
            root: ``Kvasir-SEG`` folder (or its parent).
            img_size: Square output size (``None``: native size).
            skip_bad: Skip bad pairs with one warning instead of raising.
        """
        root = _resolve_root(root, "Kvasir-SEG", "Kvasir-SEG dataset")
        self.root = root
        super().__init__(
            _require_dir(root / "images", "Kvasir-SEG images"),
            _require_dir(root / "masks", "Kvasir-SEG masks"),
            channels=3,
            img_size=img_size,
            mask_threshold=127,
            skip_bad=skip_bad,
            description=f"Kvasir-SEG dataset at '{root}'",
        )


class ISIC2018Dataset(PairedLesionDataset):
    """ISIC 2018 Task 1 (skin lesion boundary segmentation), official folder names.

    ``<root>/ISIC2018_Task1-2_<Subset>_Input/ISIC_XXXXXXX.jpg`` with
    ``<root>/ISIC2018_Task1_<Subset>_GroundTruth/ISIC_XXXXXXX_segmentation.png`` for the subsets ``training``,
    ``validation`` and ``test``. Only files named ``ISIC_<digits>.jpg`` are images; stray files such as
    ``LICENSE.txt`` / ``ATTRIBUTION.txt`` are ignored. RGB, 3 channels. The tag of each sample is its subset.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        subsets: Sequence[str] | None = None,
        img_size: int | None = 256,
        skip_bad: bool = False,
    ) -> None:
        """Discover and validate the ISIC 2018 pairs.

        Args:
            root: Folder that holds the official ``ISIC2018_*`` folders.
            subsets: Any of ``"training"``, ``"validation"``, ``"test"``. ``None`` uses every subset whose input
                and ground-truth folders are both present (a subset with inputs but no ground truth is skipped
                with a warning).
            img_size: Square output size (``None``: native size).
            skip_bad: Skip bad pairs with one warning instead of raising.

        Raises:
            FileNotFoundError: missing root, requested subset folders missing, no subset present, missing masks.
            ValueError: unknown subset names, unreadable files, size mismatches.
        """
        root = _require_dir(Path(root).expanduser(), "ISIC 2018 dataset")
        self.root = root
        if subsets is None:
            chosen: list[str] = []
            for subset, (inp, gt) in ISIC2018_SUBSETS.items():
                if (root / inp).is_dir() and (root / gt).is_dir():
                    chosen.append(subset)
                elif (root / inp).is_dir():
                    warnings.warn(
                        f"ISIC 2018 at '{root}': '{inp}' has no ground-truth folder '{gt}'; subset '{subset}' skipped",
                        stacklevel=2,
                    )
            if not chosen:
                expected = ", ".join(f"'{inp}' + '{gt}'" for inp, gt in ISIC2018_SUBSETS.values())
                raise FileNotFoundError(f"ISIC 2018 at '{root}': none of the official folder pairs found ({expected})")
        else:
            chosen = [s.lower() for s in subsets]
            unknown = [s for s in chosen if s not in ISIC2018_SUBSETS]
            if unknown or not chosen:
                raise ValueError(f"ISIC 2018: unknown subsets {unknown}; valid: {sorted(ISIC2018_SUBSETS)}")
            for subset in chosen:
                for folder in ISIC2018_SUBSETS[subset]:
                    _require_dir(root / folder, f"ISIC 2018 subset '{subset}'")
        self.subsets: list[str] = chosen

        image_re = re.compile(r"^ISIC_\d+$")
        pairs: list[SamplePair] = []
        problems: list[_Problem] = []
        for subset in chosen:
            inp, gt = ISIC2018_SUBSETS[subset]
            images = [
                p
                for p in (root / inp).iterdir()
                if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png") and image_re.match(p.stem)
            ]
            if not images:
                problems.append(_Problem("missing", f"no ISIC_*.jpg images in '{root / inp}'"))
            for image in sorted(images, key=lambda p: p.name):
                mask = root / gt / f"{image.stem}_segmentation.png"
                if not mask.is_file():
                    problems.append(_Problem("missing", f"image '{image}' has no mask '{mask}'"))
                    continue
                pairs.append(SamplePair(image.stem, image, (mask,), subset))
        super().__init__(
            pairs,
            in_channels=3,
            img_size=img_size,
            skip_bad=skip_bad,
            description=f"ISIC 2018 dataset at '{root}'",
            problems=problems,
        )

    def official_split(self) -> dict[str, list[str]]:
        """Official partition as a split dict: training → ``train``, validation → ``val``, test → ``test``."""
        mapping = {"training": "train", "validation": "val", "test": "test"}
        split: dict[str, list[str]] = {key: [] for key in SPLIT_KEYS}
        for name, tag in zip(self.names, self.tags, strict=True):
            split[mapping[str(tag)]].append(name)
        return split
