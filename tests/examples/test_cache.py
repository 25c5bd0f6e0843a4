"""Tests of examples/data/cache.py: exact round trip (file bytes and raw), augmentation determinism and shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from adst_examples.data import augment_batch, cache, train_transforms

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"


class _FileDataset:
    """Decodes like the examples' loader (PIL convert + bilinear resize, /255); masks from arrays."""

    def __init__(self, files: list[Path], masks: list[np.ndarray], channels: int, size: int) -> None:
        self.image_paths = files
        self._masks = masks
        self.in_channels = channels
        self.size = size
        self.names = [f.stem if f is not None else "" for f in files]
        self.tags = ["a" if i % 2 else None for i in range(len(files))]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.image_paths[i]) as im:
            im = im.convert("L" if self.in_channels == 1 else "RGB").resize((self.size, self.size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
        arr = arr[None] if self.in_channels == 1 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr)), torch.from_numpy(self._masks[i].astype(np.float32))[None]


class _FloatDataset(_FileDataset):
    """No files: float images that are not multiples of 1/255 (like the synthetic data)."""

    def __init__(self, n: int, size: int) -> None:
        rng = np.random.default_rng(0)
        self._images = rng.random((n, 1, size, size)).astype(np.float32)
        super().__init__([None] * n, [rng.random((size, size)) > 0.7 for _ in range(n)], 1, size)
        self.names = [f"s{i}" for i in range(n)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self._images[i]), torch.from_numpy(self._masks[i].astype(np.float32))[None]


def _write_files(tmp_path: Path, n: int, fmt: str, mode: str) -> list[Path]:
    rng = np.random.default_rng(1)
    files = []
    for i in range(n):
        h, w = 20 + 3 * i, 24
        arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
        path = tmp_path / f"img{i}.{fmt}"
        Image.fromarray(arr, mode).save(path)
        files.append(path)
    return files


@pytest.mark.parametrize(("fmt", "mode", "channels"), [("png", "L", 1), ("jpg", "RGB", 3), ("png", "RGB", 1)])
def test_round_trip_is_exact(tmp_path: Path, fmt: str, mode: str, channels: int) -> None:
    size = 16
    files = _write_files(tmp_path, 5, fmt, mode)
    rng = np.random.default_rng(2)
    masks = [rng.random((size, size)) > 0.6 for _ in files]
    ds = _FileDataset(files, masks, channels, size)
    split = {"train": [0, 1, 2], "val": [3], "test": [4]}
    path = cache.build_cache(ds, split, cache.cache_path(tmp_path / "c", "toy", size), name="toy", size=size)
    assert path.name == "toy-16.npz"
    data = cache.load_cache(path)
    assert data.header["stored_as_file_bytes"] == 5  # original bytes kept, decoded to the very same pixels
    assert data.images.dtype == torch.uint8 and data.images.shape == (5, channels, size, size)
    assert data.masks.dtype == torch.bool and data.masks.shape == (5, 1, size, size)
    for i in range(5):
        image, mask = ds[i]
        torch.testing.assert_close(data.images[i].float() / 255, image, rtol=0, atol=0)
        assert torch.equal(data.masks[i], mask > 0.5)
    assert data.names == ds.names and data.tags == ds.tags
    assert {k: v.tolist() for k, v in data.split.items()} == split
    assert data.subset_names("val") == ["img3"]


def test_raw_fallback_quantises(tmp_path: Path) -> None:
    ds = _FloatDataset(4, 8)
    path = cache.build_cache(ds, {"train": [0, 1], "val": [2], "test": [3]}, tmp_path / "f.npz", name="f", size=8)
    data = cache.load_cache(path)
    assert data.header["stored_as_file_bytes"] == 0
    for i in range(4):
        image, mask = ds[i]
        assert (data.images[i].float() / 255 - image).abs().max() <= 0.5 / 255 + 1e-7
        assert torch.equal(data.masks[i], mask > 0.5)


def test_wrong_size_is_refused(tmp_path: Path) -> None:
    ds = _FloatDataset(2, 8)
    with pytest.raises(ValueError, match="expected"):
        cache.build_cache(ds, {"train": [0], "val": [1], "test": []}, tmp_path / "x.npz", name="x", size=16)


# The study's augmentation: train.py's torchvision pipeline, applied per sample to cached batches on the device.


def _batch(b: int = 6, c: int = 3, s: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (b, c, s, s), generator=g, dtype=torch.uint8).float() / 255
    masks = torch.zeros(b, 1, s, s)
    masks[:, :, 6:15, 4:12] = 1
    return images, masks


def _augment(images, masks, seed: int, **switches: bool):
    transform = train_transforms(images.shape[1], images.shape[-1], **switches)
    return augment_batch(transform, images, masks, torch.Generator().manual_seed(seed))


def test_augment_batch_is_deterministic_per_sample_and_leaves_the_global_rng() -> None:
    images, masks = _batch()
    state = torch.get_rng_state()
    a, b, c = _augment(images, masks, 3), _augment(images, masks, 3), _augment(images, masks, 4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    same = images[:1].expand_as(images).contiguous()  # identical inputs: different draws per sample
    out, _ = _augment(same, masks, 3)
    assert not all(torch.equal(out[0], out[i]) for i in range(1, len(out)))


def test_augment_batch_is_train_transforms_applied_to_each_sample() -> None:
    images, masks = _batch(c=1)
    x, m = _augment(images, masks, 7)
    seeds = torch.randint(0, 2**62, (len(images),), generator=torch.Generator().manual_seed(7)).tolist()
    transform = train_transforms(1, 24)
    for i, seed in enumerate(seeds):  # what LesionSplit does to one sample in a DataLoader worker
        torch.manual_seed(seed)
        xi, mi = transform(tv_tensors.Image(images[i]), tv_tensors.Mask(masks[i]))
        assert torch.equal(x[i], xi.as_subclass(torch.Tensor)) and torch.equal(m[i], mi.as_subclass(torch.Tensor))


def test_augment_batch_shapes_ranges_and_binary_masks() -> None:
    images, masks = _batch(c=1)
    for seed in range(5):
        x, m = _augment(images, masks, seed)
        assert x.shape == images.shape and m.shape == masks.shape
        assert x.dtype == torch.float32 and m.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
        assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_flips_and_quarter_turns_alone_are_exact_permutations() -> None:
    images, masks = _batch(b=16)
    x, m = _augment(images, masks, 0, affine=False, color=False)
    for i in range(len(x)):
        candidates = [torch.rot90(r, k, (1, 2)) for r in (images[i], images[i].flip(2)) for k in range(4)]
        assert any(torch.equal(x[i], cand) for cand in candidates)
        assert m[i].sum() == masks[i].sum()  # a permutation keeps every mask pixel


def test_no_augmentation_is_identity() -> None:
    images, masks = _batch()
    x, m = _augment(images, masks, 0, flips=False, rot90=False, affine=False, color=False)
    assert torch.equal(x, images) and torch.equal(m, masks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_batch_same_draws_on_cuda() -> None:
    images, masks = _batch()
    cpu = _augment(images, masks, 3)
    gpu = _augment(images.cuda(), masks.cuda(), 3)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=0)
    assert torch.equal(gpu[1].cpu(), cpu[1])


@pytest.mark.skipif(not (SHARED_DATA / "Dataset_BUSI_with_GT").is_dir(), reason="needs ../shared/data")
def test_real_busi_subset_round_trip(tmp_path: Path) -> None:
    from adst_examples.data import build_dataset

    ds = build_dataset("busi", root=SHARED_DATA / "Dataset_BUSI_with_GT", img_size=64)
    idx = [0, 1, len(ds) - 1]

    class Sub:
        def __init__(self) -> None:
            self.in_channels = ds.in_channels
            self.names = [ds.names[i] for i in idx]
            self.tags = [ds.tags[i] for i in idx]
            self.image_paths = [ds.image_paths[i] for i in idx]

        def __len__(self) -> int:
            return len(idx)

        def __getitem__(self, i: int):
            return ds[idx[i]]

    path = cache.build_cache(Sub(), {"train": [0], "val": [1], "test": [2]}, tmp_path / "b.npz", name="busi", size=64)
    data = cache.load_cache(path)
    assert data.header["stored_as_file_bytes"] == 3
    for i, j in enumerate(idx):
        image, mask = ds[j]
        torch.testing.assert_close(data.images[i].float() / 255, image, rtol=0, atol=0)
        assert torch.equal(data.masks[i], mask > 0.5)
