"""The file layouts of the lesion datasets: BUSI, folders of images and masks, Kvasir-SEG, ISIC 2018.

Every dataset returns ``(image, mask)``: ``float32`` ``(C, S, S)`` in ``[0, 1]`` and ``float32`` ``(1, S, S)`` in
``{0, 1}`` (see :mod:`adst_examples.data.decode`), and has ``names``, ``image_paths``, ``mask_paths``, ``tags`` and
``in_channels``; validation and decoding are :class:`~adst_examples.data.paired.PairedLesionDataset`'s.

Everything BUSI-specific (class folders, extra ``_mask_N`` files, the lesion-free ``normal`` class that is
stratified and reported apart) is in :class:`BUSIDataset`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from adst_examples.data.decode import IMAGE_EXTENSIONS, is_image_file
from adst_examples.data.paired import PairedLesionDataset, SamplePair, _Problem, _require_dir, _resolve_root
from adst_examples.data.splits import SPLIT_KEYS, natural_key

__all__ = [
    "BUSI3_CLASSES",
    "BUSI_CLASSES",
    "ISIC2018_SUBSETS",
    "BUSI3Dataset",
    "BUSIDataset",
    "FolderDataset",
    "ISIC2018Dataset",
    "KvasirSEGDataset",
]

#: BUSI class folders, in the order of the official release.
BUSI_CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")

#: The classes of :class:`BUSI3Dataset`, by index: ``normal`` images are all background.
BUSI3_CLASSES: tuple[str, ...] = ("background", "benign", "malignant")

#: ISIC 2018 Task 1 subsets: ``subset -> (input folder, ground-truth folder)``.
ISIC2018_SUBSETS: dict[str, tuple[str, str]] = {
    "training": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}


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


class BUSI3Dataset(BUSIDataset):
    """BUSI as three classes (smp's ``multiclass`` mode): each mask holds the class index of every pixel.

    The pairs, validation and splits are :class:`BUSIDataset`'s; only the mask differs: ``int64`` ``(S, S)`` with
    0 = background, 1 = benign, 2 = malignant (:data:`BUSI3_CLASSES`), the lesion pixels of a ``benign`` image
    being 1, of a ``malignant`` image 2; ``normal`` images are all background. The lesion pixels are those of the
    binary mask (union of the ``_mask*`` files, resized as 0/1 and re-thresholded), so no other value appears.

    Attributes:
        num_classes: 3, the model's ``classes``.
        class_names: :data:`BUSI3_CLASSES`.
    """

    num_classes = len(BUSI3_CLASSES)
    class_names = BUSI3_CLASSES

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """``(image, mask)``: ``float32`` ``(1, S, S)`` in ``[0, 1]`` and ``int64`` ``(S, S)`` class indices."""
        image, lesion = super().__getitem__(index)
        tag = self.tags[index]
        label = BUSI3_CLASSES.index(tag) if tag in BUSI3_CLASSES else 0  # normal: background only
        return image, (lesion[0] > 0.5).long() * label


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
