"""The base of the file-based datasets: a validated list of image/mask pairs, decoded lazily.

Pairs are validated when the dataset is built (PIL header + ``verify()`` of every file, image/mask sizes), so a
broken release fails before the first epoch with :class:`BadPairsError`; ``skip_bad=True`` drops bad pairs with
one warning instead.
"""

from __future__ import annotations

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
    BadFileError,
    decode_image,
    decode_mask,
    probe_size,
    resize_mask,
)

__all__ = ["BadPairsError", "MissingPairsError", "PairedLesionDataset", "SamplePair"]

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


class BadPairsError(ValueError):
    """Some image/mask pairs are unreadable, mismatched or ambiguous (a :class:`MissingPairsError` when every
    problem is a missing file). ``str()`` tells the Python user to pass ``skip_bad=True``; a command line names
    its own flag with :meth:`with_fix`."""

    def __init__(self, description: str, problems: Sequence[str]) -> None:
        self.description, self.problems = description, list(problems)
        super().__init__(self.with_fix("pass skip_bad=True to skip them"))

    def with_fix(self, fix: str) -> str:
        """The message, ending with ``Fix the files or <fix>.``"""
        listed = _format_list(self.problems)
        return f"{self.description}: {len(self.problems)} bad image/mask pair(s):\n{listed}\nFix the files or {fix}."


class MissingPairsError(BadPairsError, FileNotFoundError):
    """Every bad pair lacks a file (a mask, usually)."""


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
                raise (MissingPairsError if only_missing else BadPairsError)(description, messages)
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
