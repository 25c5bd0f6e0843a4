"""Shared fixtures: the device and tiny smp models built without downloads; paths of the checkout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

ROOT = Path(__file__).resolve().parents[1]
#: The examples package (installed as adst_examples), for tests that run its scripts as files.
EXAMPLES_DIR = ROOT / "examples"
#: ../shared/data beside the checkout (absent on a user's machine: tests that need it skip).
SHARED_DATA = ROOT.parent / "shared" / "data"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def tiny_unet(in_channels: int = 3, encoder_name: str = "resnet18", classes: int = 1, **kwargs) -> torch.nn.Module:
    """A small smp Unet (resnet18 by default, depth 3) that runs a step in well under a second on CPU."""
    return smp.Unet(
        encoder_name,
        encoder_weights=None,
        encoder_depth=3,
        decoder_channels=(32, 16, 16),
        in_channels=in_channels,
        classes=classes,
        **kwargs,
    )


@pytest.fixture
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_unet()


def pytest_configure(config: pytest.Config) -> None:
    # Two cores: intra-op threads beyond that only add contention between test workers.
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Run small-tensor tests single-threaded (as DataLoader workers do); restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_lesion_folder(root: Path, n: int = 12, size: int = 32, *, channels: int = 3) -> tuple[Path, Path]:
    """``root/images/case<i>.png`` and ``root/masks/case<i>.png``: noisy images with one or two bright discs, the
    discs as 8-bit masks (a dataset of the user's own, for ``--dataset folder`` and ``--folder``)."""
    from PIL import Image

    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(1 + i % 2):
            cy, cx, r = rng.integers(6, size - 6), rng.integers(6, size - 6), rng.integers(3, 7)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        gray = np.clip(60 + 120 * mask + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray) if channels == 1 else Image.fromarray(np.stack([gray] * 3, axis=-1))
        image.save(images / f"case{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"case{i}.png")
    return images, masks
