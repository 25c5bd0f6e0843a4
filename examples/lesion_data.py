"""Lesion-segmentation datasets, splits and joint augmentation for the ADST examples.

Every dataset returns ``(image, mask)`` pairs:

* ``image``: ``float32`` tensor ``(C, H, W)`` with values in ``[0, 1]`` (``C`` is the dataset's ``in_channels``).
* ``mask``: ``float32`` tensor ``(1, H, W)`` with values exactly in ``{0, 1}`` (1 = lesion).

Both are resized to ``img_size x img_size`` (default 256; ``img_size=None`` keeps the native size). Images are
resized bilinearly with antialiasing; masks are resized bilinearly as ``0/1`` floats and re-thresholded
(``> 0.5``), so no value other than 0 or 1 ever appears.

Datasets on disk are validated when they are constructed (file discovery plus a cheap PIL header check and
``verify()`` of every file, and image/mask size comparison), so a broken release fails before the first epoch
rather than in the middle of it. Pixels are decoded lazily in ``__getitem__``. With ``skip_bad=True`` bad pairs
are dropped with a single warning that lists them.

The module is meant to be imported with ``examples/`` on ``sys.path`` (``import lesion_data``).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "BUSI_CLASSES",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "ISIC2018_SUBSETS",
    "BUSIDataset",
    "FolderDataset",
    "ISIC2018Dataset",
    "KvasirSEGDataset",
    "PairedLesionDataset",
    "RandomRot90",
    "SamplePair",
    "SyntheticLesionDataset",
    "TransformedSubset",
    "build_dataset",
    "get_or_create_split",
    "load_split",
    "make_split",
    "save_split",
    "split_indices",
    "train_transforms",
]

#: File extensions recognised as images or masks (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Names accepted by :func:`build_dataset`.
DATASET_NAMES: tuple[str, ...] = ("busi", "isic2018", "kvasir", "folder", "synthetic")

#: BUSI class folders, in the order of the official release.
BUSI_CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")

#: ISIC 2018 Task 1 subsets: ``subset -> (input folder, ground-truth folder)``.
ISIC2018_SUBSETS: dict[str, tuple[str, str]] = {
    "training": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}

#: Split names produced by :func:`make_split`.
SPLIT_KEYS: tuple[str, str, str] = ("train", "val", "test")

_MAX_LISTED = 20  # problems listed in one error/warning message


# --------------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------------


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``"benign (2)"`` before ``"benign (10)"``."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", text)]


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


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


class _BadFileError(Exception):
    """Internal: a file could not be opened/verified."""


# --------------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------------

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _probe_size(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` of an image file after a cheap header read and ``verify()``.

    Raises:
        _BadFileError: if PIL cannot identify or verify the file.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise _BadFileError(f"cannot read '{path}': {type(exc).__name__}: {exc}") from exc
    return size


def _resize_float(channel: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased (PIL widens the filter support when downscaling) resize of a float32 ``(H, W)``."""
    resized = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def _decode_image(path: Path, channels: int, size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file to ``float32`` ``(C, S, S)`` in ``[0, 1]`` (``C`` = 1 gray or 3 RGB).

    Resizing is done by PIL (bilinear with antialiasing), single-threaded, so it is cheap in DataLoader workers.

    Returns:
        The array and the native ``(H, W)`` of the file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            native = (im.height, im.width)
            if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
                gray = np.asarray(im, dtype=np.float32)
                if im.mode != "F":
                    gray = gray / (255.0 if gray.max(initial=0) <= 255 else 65535.0)
                if size is not None:
                    gray = _resize_float(gray, size)
                arr = np.clip(gray, 0.0, 1.0)[None]
                return (np.repeat(arr, 3, axis=0) if channels == 3 else arr), native
            converted = im.convert("L" if channels == 1 else "RGB")
            if size is not None and converted.size != (size, size):
                converted = converted.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(converted, dtype=np.float32) / 255.0
    except Exception as exc:
        raise ValueError(f"failed to decode image '{path}': {type(exc).__name__}: {exc}") from exc
    arr = arr[None] if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))
    return arr, native


def _decode_mask(path: Path, threshold: int = 127) -> np.ndarray:
    """Decode a mask file to a ``bool`` ``(H, W)`` array (True = lesion).

    Conventions: 1-bit PNG → pixel set; palette (``P``) → palette index > 0; 8-bit gray/RGB(A) →
    gray value ``> threshold`` (default 127, robust to JPEG noise); 16/32-bit integer → ``> 0`` when the mask
    only holds 0/1, otherwise ``> threshold`` rescaled to 16 bit; float → ``> 0.5``.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                return np.array(im, dtype=bool)
            if im.mode == "P":
                return np.asarray(im) > 0
            if im.mode in _SIXTEEN_BIT_MODES or im.mode == "I":
                arr = np.asarray(im, dtype=np.int64)
                if arr.max(initial=0) <= 1:
                    return arr > 0
                return arr > (threshold * 257 if im.mode in _SIXTEEN_BIT_MODES else threshold)
            if im.mode == "F":
                return np.asarray(im, dtype=np.float32) > 0.5
            return np.asarray(im.convert("L")) > threshold
    except Exception as exc:
        raise ValueError(f"failed to decode mask '{path}': {type(exc).__name__}: {exc}") from exc


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a ``bool`` mask: bilinear (antialiased) on 0/1 floats, then ``> 0.5``; stays exactly binary."""
    if mask.shape == (size, size):
        return mask
    return _resize_float(mask.astype(np.float32), size) > 0.5


# --------------------------------------------------------------------------------------------------------------------
# File-based datasets
# --------------------------------------------------------------------------------------------------------------------


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
            image_size = _probe_size(pair.image)
            mask_sizes = [(m, _probe_size(m)) for m in pair.masks]
        except _BadFileError as exc:
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
        image, native = _decode_image(pair.image, self.in_channels, self.img_size)
        mask: np.ndarray | None = None
        for mask_path in pair.masks:
            part = _decode_mask(mask_path, self.mask_threshold)
            if part.shape != native:
                raise ValueError(
                    f"{self.description}: size mismatch between '{pair.image}' {native} and "
                    f"'{mask_path}' {part.shape} (HxW)"
                )
            mask = part if mask is None else (mask | part)
        assert mask is not None  # every pair has >= 1 mask
        if self.img_size is not None:
            mask = _resize_mask(mask, self.img_size)
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
        classes = BUSI_CLASSES if include_normal else BUSI_CLASSES[:2]
        mask_re = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<extra>\d+))?$")
        pairs: list[SamplePair] = []
        problems: list[_Problem] = []
        for cls in classes:
            cls_dir = root / cls
            if not cls_dir.is_dir():
                hint = " (pass include_normal=False if you only have benign/malignant)" if cls == "normal" else ""
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
            for image in sorted(images, key=lambda p: _natural_key(p.name)):
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
    image_files = [p for p in images_dir.iterdir() if _is_image_file(p) and p.suffix.lower() in exts]
    mask_files = [p for p in masks_dir.iterdir() if _is_image_file(p)]
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
    for stem in sorted(images_by_stem, key=_natural_key):
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


# --------------------------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------------------------


class SyntheticLesionDataset(Dataset[tuple[Tensor, Tensor]]):
    """Procedural ultrasound-like images with blurred lesions (the examples' built-in default data).

    Each image has 0-3 hypoechoic lesions (about 15% none, 55% one, 20% two, 10% three) with irregular
    elliptical/blobby outlines (an ellipse whose radius is modulated by a few random harmonics), blurred
    boundaries (Gaussian, sigma 0.5-3 px at 256), on a background with depth attenuation, smooth tissue
    texture, horizontal layers and multiplicative speckle. About 30% of lesions are small (radius 3-8 px
    at 256), the others 10-45 px. Lesions do not overlap, so multi-lesion masks have separate components.
    The mask is the sharp lesion shape.

    Item ``i`` is generated from ``numpy.random.default_rng([seed, i])``: it does not depend on access order,
    worker, or other items.

    Attributes:
        names: ``synthetic_00000`` ...
        tags: ``"empty"``, ``"single"`` or ``"multi"`` (number of lesions).
        image_paths / mask_paths: ``None`` for every sample (no files), index-aligned with ``names``.
        in_channels: 1.
    """

    in_channels: int = 1

    def __init__(self, n: int = 200, img_size: int = 256, seed: int = 0) -> None:
        """Create the generator.

        Args:
            n: Number of samples.
            img_size: Side length (>= 16).
            seed: Non-negative base seed.
        """
        if n < 1:
            raise ValueError(f"SyntheticLesionDataset: n must be >= 1, got {n}")
        if img_size < 16:
            raise ValueError(f"SyntheticLesionDataset: img_size must be >= 16, got {img_size}")
        if seed < 0:
            raise ValueError(f"SyntheticLesionDataset: seed must be >= 0, got {seed}")
        self.n = n
        self.img_size = img_size
        self.seed = seed
        self.names: list[str] = [f"synthetic_{i:05d}" for i in range(n)]
        self.image_paths: list[Path | None] = [None] * n
        self.mask_paths: list[tuple[Path, ...] | None] = [None] * n
        counts = [self._lesion_count(self._rng(i)) for i in range(n)]
        self.num_lesions: list[int] = counts
        self.tags: list[str | None] = ["empty" if c == 0 else "single" if c == 1 else "multi" for c in counts]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    @staticmethod
    def _lesion_count(rng: np.random.Generator) -> int:
        return int(rng.choice(4, p=[0.15, 0.55, 0.2, 0.1]))

    def __len__(self) -> int:
        """Number of samples."""
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Generate sample ``index`` (negative indices count from the end)."""
        if not -self.n <= index < self.n:
            raise IndexError(f"SyntheticLesionDataset index {index} out of range for {self.n} samples")
        image, mask = self.generate(index % self.n)
        return torch.from_numpy(image)[None], torch.from_numpy(mask.astype(np.float32))[None]

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image float32 (H, W) in [0, 1], mask bool (H, W))`` for sample ``index``."""
        rng = self._rng(index)
        count = self._lesion_count(rng)  # first draw: must match the tag computed in __init__
        s = self.img_size
        k = s / 256.0
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)

        # Background echo: depth attenuation * (tissue texture + horizontal layers).
        depth = yy / (s - 1)
        gain = rng.uniform(0.75, 0.95) - rng.uniform(0.15, 0.4) * depth
        tissue = ndimage.gaussian_filter(rng.standard_normal((s, s)).astype(np.float32), sigma=8.0 * k)
        tissue /= tissue.std() + 1e-6
        layers = np.zeros_like(yy)
        for _ in range(int(rng.integers(1, 4))):
            freq = rng.uniform(2.0, 6.0) * 2 * math.pi / s
            tilt = rng.uniform(-0.15, 0.15)
            layers += np.sin(freq * (yy + tilt * xx) + rng.uniform(0, 2 * math.pi))
        echo = gain * (0.6 + 0.1 * tissue + 0.06 * layers)

        mask = np.zeros((s, s), dtype=bool)
        placed: list[tuple[float, float, float]] = []  # (cy, cx, extent)
        for _ in range(count):
            small = rng.uniform() < 0.3
            radius = max(1.5, (rng.uniform(3.0, 8.0) if small else rng.uniform(10.0, 45.0)) * k)
            cy, cx, radius = self._place(rng, placed, radius, s)
            lesion = self._lesion_shape(rng, yy, xx, cy, cx, radius)
            placed.append((cy, cx, 1.35 * radius))
            contrast = rng.uniform(0.15, 0.5)  # lesion echo relative to the background
            sigma = min(rng.uniform(0.5, 3.0) * k, 0.5 * radius)
            soft = ndimage.gaussian_filter(lesion.astype(np.float32), sigma=sigma)
            echo = echo * (1.0 - (1.0 - contrast) * soft)
            mask |= lesion

        # Multiplicative speckle: magnitude of a smoothed complex Gaussian field (Rayleigh-like grains).
        grain = max(0.6, 1.0 * k)
        re_part = ndimage.gaussian_filter(rng.standard_normal((s, s)).astype(np.float32), sigma=grain)
        im_part = ndimage.gaussian_filter(rng.standard_normal((s, s)).astype(np.float32), sigma=grain)
        speckle = np.hypot(re_part, im_part)
        speckle /= speckle.mean() + 1e-6
        strength = rng.uniform(0.35, 0.65)
        image = echo * (1.0 - strength + strength * speckle)
        image += rng.normal(0.0, 0.02, size=(s, s)).astype(np.float32)
        return np.clip(image, 0.0, 1.0).astype(np.float32), mask

    @staticmethod
    def _place(
        rng: np.random.Generator, placed: list[tuple[float, float, float]], radius: float, s: int
    ) -> tuple[float, float, float]:
        """Pick a centre so the lesion lies inside the image and away from the others (shrinking if needed)."""
        cy = cx = s / 2.0
        for attempt in range(200):
            if attempt and attempt % 20 == 0:
                radius = max(1.5, radius * 0.8)
            extent = 1.35 * radius
            lo, hi = extent + 1.0, s - extent - 1.0
            if hi <= lo:
                continue
            cy, cx = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            if all(math.hypot(cy - py, cx - px) > extent + pe + 3.0 for py, px, pe in placed):
                return cy, cx, radius
        return cy, cx, radius  # crowded tiny image: accept a possible overlap

    @staticmethod
    def _lesion_shape(
        rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float
    ) -> np.ndarray:
        """Rotated ellipse with a harmonically perturbed radius; at least one pixel is set."""
        ry = radius * rng.uniform(0.55, 1.0)
        theta = rng.uniform(0.0, math.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * math.cos(theta) + dy * math.sin(theta)) / radius
        v = (-dx * math.sin(theta) + dy * math.cos(theta)) / ry
        rho = np.hypot(u, v)
        phi = np.arctan2(v, u)
        boundary = np.ones_like(rho)
        for harmonic in range(2, 6):
            amp = rng.uniform(0.0, 0.16 / harmonic * 2)
            boundary += amp * np.cos(harmonic * phi + rng.uniform(0, 2 * math.pi))
        lesion = rho <= np.maximum(boundary, 0.5)
        if not lesion.any():
            lesion[min(round(cy), yy.shape[0] - 1), min(round(cx), yy.shape[1] - 1)] = True
        return lesion


# --------------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------------


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions`` (sums to ``n``; ties go to the earlier split)."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any((not math.isfinite(f)) or f < 0 for f in fractions):
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {tuple(fractions)}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)} (sum {sum(fractions)})")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def make_split(
    names: Sequence[str],
    *,
    seed: int,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    labels: Sequence[Any] | None = None,
) -> dict[str, list[str]]:
    """Deterministic random train/val/test split of sample names.

    The result depends only on the set of names (not their order), ``seed``, ``fractions`` and ``labels``.
    Counts use largest-remainder rounding, so they sum to ``len(names)``. With ``labels`` (e.g. BUSI classes)
    the split is stratified: every label group is split separately with the same fractions.

    Args:
        names: Unique sample identifiers.
        seed: Seed of the permutation.
        fractions: ``(train, val, test)`` fractions, non-negative, summing to 1.
        labels: Optional label per name for stratification.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each list in natural sort order.

    Raises:
        ValueError: duplicate names, bad fractions, or ``labels`` of the wrong length.
    """
    fracs = _check_fractions(fractions)
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})[:_MAX_LISTED]
        raise ValueError(f"make_split: duplicate sample names: {dupes}")
    if labels is not None and len(labels) != len(names):
        raise ValueError(f"make_split: {len(labels)} labels for {len(names)} names")
    label_list = [None] * len(names) if labels is None else list(labels)
    groups: dict[str, list[str]] = {}
    for name, label in zip(names, label_list, strict=True):
        groups.setdefault(str(label), []).append(name)
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {key: [] for key in SPLIT_KEYS}
    for label in sorted(groups):
        members = sorted(groups[label], key=_natural_key)
        members = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for key, count in zip(SPLIT_KEYS, _split_counts(len(members), fracs), strict=True):
            split[key].extend(members[start : start + count])
            start += count
    return {key: sorted(value, key=_natural_key) for key, value in split.items()}


def _validate_split(split: Any, source: str) -> dict[str, list[str]]:
    if not isinstance(split, dict) or set(split) != set(SPLIT_KEYS):
        keys = sorted(split) if isinstance(split, dict) else type(split).__name__
        raise ValueError(f"{source}: expected a dict with keys {list(SPLIT_KEYS)}, got {keys}")
    out: dict[str, list[str]] = {}
    for key in SPLIT_KEYS:
        value = split[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{source}: '{key}' must be a list of sample-name strings")
        out[key] = list(value)
    seen: dict[str, str] = {}
    for key in SPLIT_KEYS:
        for name in out[key]:
            if name in seen:
                raise ValueError(f"{source}: sample '{name}' appears in both '{seen[name]}' and '{key}'")
            seen[name] = key
    return out


def save_split(split: dict[str, list[str]], path: str | Path) -> Path:
    """Write a split as JSON (``{"train": [...], "val": [...], "test": [...]}``); creates parent folders.

    Returns:
        The path written.
    """
    split = _validate_split(split, "save_split")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=2) + "\n", encoding="utf-8")
    return path


def load_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split written by :func:`save_split`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not valid JSON, wrong structure, or a sample in two splits.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"split file '{path}' is not valid JSON: {exc}") from exc
    return _validate_split(data, f"split file '{path}'")


def get_or_create_split(
    names: Sequence[str],
    path: str | Path,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    *,
    labels: Sequence[Any] | None = None,
) -> dict[str, list[str]]:
    """Load the split at ``path`` if it exists, else create it with :func:`make_split` and save it.

    An existing file is reused as is (``seed``/``fractions``/``labels`` are then ignored). Samples of the dataset
    that the file does not mention trigger a warning (they belong to no split).

    Raises:
        ValueError: the existing file names samples that are not in ``names``.
    """
    path = Path(path)
    if path.exists():
        split = load_split(path)
        known = set(names)
        unknown = sorted((n for key in SPLIT_KEYS for n in split[key] if n not in known), key=_natural_key)
        if unknown:
            raise ValueError(
                f"split file '{path}' names {len(unknown)} sample(s) not in the dataset, e.g. {unknown[:5]}; "
                "delete it or point to another split file"
            )
        covered = {n for key in SPLIT_KEYS for n in split[key]}
        missing = [n for n in names if n not in covered]
        if missing:
            warnings.warn(
                f"split file '{path}' does not cover {len(missing)} sample(s) of the dataset, e.g. {missing[:5]}",
                stacklevel=2,
            )
        return split
    split = make_split(names, seed=seed, fractions=fractions, labels=labels)
    save_split(split, path)
    return split


def split_indices(names: Sequence[str], split: dict[str, list[str]]) -> dict[str, list[int]]:
    """Map a name split to dataset indices (``names`` is the dataset's ``names`` list).

    Raises:
        KeyError: a split name is not in ``names``.
    """
    index = {name: i for i, name in enumerate(names)}
    out: dict[str, list[int]] = {}
    for key, members in split.items():
        missing = [m for m in members if m not in index]
        if missing:
            raise KeyError(f"split '{key}' names samples not in the dataset, e.g. {missing[:5]}")
        out[key] = [index[m] for m in members]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------------------------


class RandomRot90(v2.Transform):
    """Rotate by a uniformly random multiple of 90 degrees (0, 90, 180 or 270), exactly (``torch.rot90``).

    Applies the same rotation to every tv_tensor in the sample (image, mask, ...). Uses the torch RNG, so
    DataLoader worker seeding applies.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the number of quarter turns."""
        return {"quarter_turns": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Rotate one input (``expand=True`` so non-square inputs swap H and W instead of being cropped)."""
        turns = params["quarter_turns"]
        if turns == 0:
            return inpt
        return self._call_kernel(TF.rotate, inpt, angle=90.0 * turns, expand=True)

    # torchvision < 0.21 calls the private names.
    def _get_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return self.make_params(flat_inputs)

    def _transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self.transform(inpt, params)


def train_transforms(
    in_channels: int,
    img_size: int,
    *,
    flips: bool = True,
    rot90: bool = True,
    affine: bool = True,
    color: bool = True,
) -> v2.Compose:
    """Joint image/mask training augmentation (apply to ``(tv_tensors.Image, tv_tensors.Mask)``).

    Pipeline: resize to ``img_size`` if needed (no-op for datasets already at that size); random horizontal and
    vertical flips (p=0.5 each); random rotation by a multiple of 90°; small random affine (±10°, translate 5%,
    scale 0.9-1.1; images bilinear, masks nearest — torchvision always uses nearest for ``Mask`` — so masks stay
    exactly ``{0, 1}``); color jitter on the image only (brightness/contrast 0.2; saturation 0.1 and hue 0.02
    only for RGB).

    Args:
        in_channels: 1 or 3.
        img_size: Expected side length.
        flips: Enable the random flips.
        rot90: Enable the random quarter turns.
        affine: Enable the small random affine.
        color: Enable the color jitter.

    Returns:
        A ``v2.Compose`` called as ``transform(image, mask)``.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"train_transforms: in_channels must be 1 or 3, got {in_channels}")
    ops: list[Callable[..., Any]] = [v2.Resize((img_size, img_size), antialias=True)]
    if flips:
        ops += [v2.RandomHorizontalFlip(p=0.5), v2.RandomVerticalFlip(p=0.5)]
    if rot90:
        ops.append(RandomRot90())
    if affine:
        ops.append(
            v2.RandomAffine(
                degrees=10.0,
                translate=(0.05, 0.05),
                scale=(0.9, 1.1),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=0,
            )
        )
    if color:
        rgb = in_channels == 3
        ops.append(
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1 if rgb else None, hue=0.02 if rgb else None)
        )
    return v2.Compose(ops)


class TransformedSubset(Dataset[tuple[Tensor, Tensor]]):
    """A subset of a lesion dataset with a joint image/mask transform (like ``torch.utils.data.Subset``).

    The transform is called as ``transform(tv_tensors.Image(image), tv_tensors.Mask(mask))`` and must return the
    pair; outputs are returned as plain contiguous tensors.

    Attributes:
        dataset: The wrapped dataset.
        indices: Indices into ``dataset``.
        transform: Joint transform or ``None``.
    """

    def __init__(
        self,
        dataset: Dataset[tuple[Tensor, Tensor]],
        indices: Sequence[int] | None = None,
        transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    ) -> None:
        """Wrap ``dataset``.

        Args:
            dataset: A lesion dataset (``names`` / ``in_channels`` are forwarded when present).
            indices: Indices to expose (``None``: all).
            transform: Joint transform, e.g. :func:`train_transforms`.
        """
        self.dataset = dataset
        if indices is None:
            indices = range(len(dataset))  # type: ignore[arg-type]
        self.indices: list[int] = [int(i) for i in indices]
        self.transform = transform

    @property
    def in_channels(self) -> int:
        """Image channels of the wrapped dataset."""
        return int(self.dataset.in_channels)  # type: ignore[attr-defined]

    @property
    def names(self) -> list[str]:
        """Names of the exposed samples."""
        names = self.dataset.names  # type: ignore[attr-defined]
        return [names[i] for i in self.indices]

    @property
    def tags(self) -> list[str | None]:
        """Tags of the exposed samples (``None`` when the dataset has none)."""
        tags = getattr(self.dataset, "tags", None)
        return [None] * len(self.indices) if tags is None else [tags[i] for i in self.indices]

    def __len__(self) -> int:
        """Number of exposed samples."""
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Load ``dataset[indices[index]]`` and apply the joint transform."""
        image, mask = self.dataset[self.indices[index]]
        if self.transform is None:
            return image, mask
        image_out, mask_out = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image_out.as_subclass(Tensor).contiguous(), mask_out.as_subclass(Tensor).contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------------------


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
        name: One of :data:`DATASET_NAMES` (case-insensitive): ``busi``, ``isic2018``, ``kvasir`` (need ``root``),
            ``folder`` (needs ``images`` and ``masks``), ``synthetic`` (no files).
        root: Dataset root for ``busi`` / ``isic2018`` / ``kvasir``.
        images: Images folder for ``folder``.
        masks: Masks folder for ``folder``.
        img_size: Output side length.
        **kw: Passed to the dataset class, e.g. ``include_normal``, ``subsets``, ``mask_suffix``, ``channels``,
            ``skip_bad``, ``n``, ``seed``.

    Raises:
        ValueError: unknown name or missing required argument.
    """
    key = name.lower().strip()
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if key == "synthetic":
        return SyntheticLesionDataset(img_size=img_size, **kw)
    if key == "folder":
        if images is None or masks is None:
            raise ValueError("dataset 'folder' needs both images=<images dir> and masks=<masks dir>")
        return FolderDataset(images, masks, img_size=img_size, **kw)
    if root is None:
        raise ValueError(f"dataset {key!r} needs root=<dataset folder>")
    if key == "busi":
        return BUSIDataset(root, img_size=img_size, **kw)
    if key == "isic2018":
        return ISIC2018Dataset(root, img_size=img_size, **kw)
    return KvasirSEGDataset(root, img_size=img_size, **kw)
