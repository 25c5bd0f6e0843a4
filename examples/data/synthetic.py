"""Synthetic ultrasound-like lesion images: the examples' built-in default data (no download, no files)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["SyntheticLesionDataset"]


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
    #: Same rules as the file datasets (:class:`~adst_examples.data.datasets.PairedLesionDataset`): none apply.
    stratify_by_tag: ClassVar[bool] = False
    lesion_free_tag: ClassVar[str | None] = None

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
