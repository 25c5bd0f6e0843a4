"""Tests of adst_examples.data: official layouts, failures, synthetic data, splits, augmentation, real data."""

from __future__ import annotations

import io
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image
from scipy import ndimage
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from adst_examples import data

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# --------------------------------------------------------------------------------------------------------------------
# Fixture helpers
# --------------------------------------------------------------------------------------------------------------------


def _rect_mask(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _gray(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(arr: np.ndarray, path: Path, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def _save_1bit(mask: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(bool))
    assert img.mode == "1"
    img.save(path)
    return path


def _corrupt(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size=300, dtype=np.uint8).tobytes())
    return path


H, W = 30, 40  # native fixture size (H x W), deliberately not square


@pytest.fixture
def busi_root(tmp_path: Path) -> Path:
    """BUSI tree: second masks (_mask_1, _mask_2), an RGB image, an 8-bit mask, an all-zero normal mask."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    b = root / "benign"
    _save(_gray(H, W, 1), b / "benign (1).png")
    _save_1bit(_rect_mask(H, W, 2, 3, 10, 12), b / "benign (1)_mask.png")
    _save(_gray(H, W, 2), b / "benign (2).png")
    _save_1bit(_rect_mask(H, W, 0, 0, 5, 5), b / "benign (2)_mask.png")
    _save_1bit(_rect_mask(H, W, 20, 30, 25, 38), b / "benign (2)_mask_1.png")
    _save_1bit(_rect_mask(H, W, 12, 0, 14, 40), b / "benign (2)_mask_2.png")
    _save(_gray(H, W, 10), b / "benign (10).png")
    _save_1bit(_rect_mask(H, W, 5, 5, 25, 35), b / "benign (10)_mask.png")
    (b / "Thumbs.db").write_bytes(b"junk")
    m = root / "malignant"
    _save(_rgb(H, W, 3), m / "malignant (1).png")
    _save(_rect_mask(H, W, 4, 4, 9, 9).astype(np.uint8) * 255, m / "malignant (1)_mask.png")  # 8-bit mask
    n = root / "normal"
    _save(_gray(H, W, 4), n / "normal (1).png")
    _save_1bit(np.zeros((H, W), dtype=bool), n / "normal (1)_mask.png")
    return root


def _jpeg_mask(mask: np.ndarray, path: Path) -> Path:
    return _save(mask.astype(np.uint8) * 255, path, quality=70)


@pytest.fixture
def kvasir_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "Kvasir-SEG"
    truth = {}
    for i, name in enumerate(["cju0a", "cju0b", "cju0c"]):
        yy, xx = np.mgrid[0:H, 0:W]
        mask = (yy - 15) ** 2 / (6 + 2 * i) ** 2 + (xx - 18 - i) ** 2 / 10**2 <= 1
        _save(_rgb(H, W, i), root / "images" / f"{name}.jpg", quality=90)
        _jpeg_mask(mask, root / "masks" / f"{name}.jpg")
        truth[name] = mask
    (root / "kavsir_bboxes.json").write_text("{}")
    return root, truth


@pytest.fixture
def isic_root(tmp_path: Path) -> Path:
    root = tmp_path / "isic"
    tr_in, tr_gt = (root / d for d in data.ISIC2018_SUBSETS["training"])
    va_in, va_gt = (root / d for d in data.ISIC2018_SUBSETS["validation"])
    for i, ident in enumerate(["ISIC_0000000", "ISIC_0000001", "ISIC_0000003"]):
        _save(_rgb(H, W, i), tr_in / f"{ident}.jpg")
        _save(_rect_mask(H, W, 3, 3, 20 + i, 20).astype(np.uint8) * 255, tr_gt / f"{ident}_segmentation.png")
    _save(_rgb(H, W, 9), va_in / "ISIC_0012255.jpg")
    _save(_rect_mask(H, W, 1, 1, 8, 8).astype(np.uint8) * 255, va_gt / "ISIC_0012255_segmentation.png")
    for folder in (tr_in, tr_gt, va_in, va_gt):
        (folder / "LICENSE.txt").write_text("CC-BY-NC")
        (folder / "ATTRIBUTION.txt").write_text("ISIC")
    return root


@pytest.fixture
def folder_pair(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    _save(_rgb(H, W, 1), images / "a.png")
    _save(_rgb(H, W, 2), images / "b.jpg")
    _save(_rgb(H, W, 3), images / "c.bmp")
    _save(_rect_mask(H, W, 0, 0, 10, 10).astype(np.uint8) * 255, masks / "a_mask.png")
    _save(_rect_mask(H, W, 5, 5, 15, 15).astype(np.uint8) * 255, masks / "b_mask.tif")
    _save(_rect_mask(H, W, 2, 2, 8, 30).astype(np.uint8) * 255, masks / "c_mask.png")
    return images, masks


def _check_item(image: torch.Tensor, mask: torch.Tensor, channels: int, size: int) -> None:
    assert image.shape == (channels, size, size) and image.dtype == torch.float32
    assert mask.shape == (1, size, size) and mask.dtype == torch.float32
    img, msk = image.numpy(), mask.numpy()
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert set(np.unique(msk).tolist()) <= {0.0, 1.0}


# --------------------------------------------------------------------------------------------------------------------
# Official layouts
# --------------------------------------------------------------------------------------------------------------------


def test_busi_layout(busi_root: Path) -> None:
    ds = data.BUSIDataset(busi_root, img_size=32)
    assert ds.in_channels == 1
    assert ds.names == ["benign (1)", "benign (2)", "benign (10)", "malignant (1)", "normal (1)"]
    assert ds.classes == ["benign", "benign", "benign", "malignant", "normal"]
    assert [len(m) for m in ds.mask_paths] == [1, 3, 1, 1, 1]
    assert ds.image_paths[3].name == "malignant (1).png"
    for i in range(len(ds)):
        _check_item(*ds[i], channels=1, size=32)
    assert ds[4][1].sum() == 0  # normal: no lesion
    assert ds[3][1].sum() > 0  # 8-bit mask thresholded

    native = data.BUSIDataset(busi_root.parent, img_size=None)  # parent folder accepted too
    image, mask = native[1]
    assert image.shape == (1, H, W)
    expected = _rect_mask(H, W, 0, 0, 5, 5) | _rect_mask(H, W, 20, 30, 25, 38) | _rect_mask(H, W, 12, 0, 14, 40)
    np.testing.assert_array_equal(mask[0].numpy().astype(bool), expected)
    # RGB image is loaded as one luma channel
    rgb = Image.open(busi_root / "malignant" / "malignant (1).png").convert("L")
    np.testing.assert_allclose(native[3][0][0].numpy(), np.asarray(rgb, dtype=np.float32) / 255.0)

    no_normal = data.BUSIDataset(busi_root, include_normal=False)
    assert "normal (1)" not in no_normal.names and len(no_normal) == 4


def test_busi_missing_mask_and_class_folder(busi_root: Path) -> None:
    (busi_root / "benign" / "benign (10)_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"benign \(10\)_mask\.png"):
        data.BUSIDataset(busi_root)
    with pytest.warns(UserWarning, match=r"benign \(10\)"):
        ds = data.BUSIDataset(busi_root, skip_bad=True)
    assert "benign (10)" not in ds.names and len(ds) == 4
    for p in (busi_root / "normal").iterdir():
        p.unlink()
    (busi_root / "normal").rmdir()
    with pytest.raises(FileNotFoundError, match="include_normal=False"):
        data.BUSIDataset(busi_root, skip_bad=True)


def test_kvasir_layout_jpeg_masks(kvasir_root: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, truth = kvasir_root
    raw = np.asarray(Image.open(root / "masks" / "cju0a.jpg").convert("L"))
    assert len(np.unique(raw)) > 2  # the fixture really has JPEG noise
    ds = data.KvasirSEGDataset(root, img_size=None)
    assert ds.in_channels == 3 and ds.names == ["cju0a", "cju0b", "cju0c"]
    for i, name in enumerate(ds.names):
        image, mask = ds[i]
        assert image.shape == (3, H, W)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask[0].numpy().astype(bool) != truth[name]).mean() < 0.01
    resized = data.KvasirSEGDataset(root.parent, img_size=24)  # parent folder accepted
    _check_item(*resized[0], channels=3, size=24)


def test_isic_layout(isic_root: Path) -> None:
    ds = data.ISIC2018Dataset(isic_root, img_size=16)
    assert ds.in_channels == 3 and len(ds) == 4
    assert ds.names == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003", "ISIC_0012255"]
    assert ds.tags == ["training"] * 3 + ["validation"]
    assert ds.subsets == ["training", "validation"]
    assert all(p.suffix == ".jpg" for p in ds.image_paths)
    _check_item(*ds[0], channels=3, size=16)
    assert ds.official_split() == {
        "train": ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003"],
        "val": ["ISIC_0012255"],
        "test": [],
    }
    assert data.ISIC2018Dataset(isic_root, subsets=["validation"]).names == ["ISIC_0012255"]
    with pytest.raises(FileNotFoundError, match="ISIC2018_Task1-2_Test_Input"):
        data.ISIC2018Dataset(isic_root, subsets=["test"])
    with pytest.raises(ValueError, match="unknown subsets"):
        data.ISIC2018Dataset(isic_root, subsets=["train"])
    # test inputs without ground truth: skipped with a warning when subsets are auto-detected
    _save(_rgb(H, W, 5), isic_root / data.ISIC2018_SUBSETS["test"][0] / "ISIC_0036309.jpg")
    with pytest.warns(UserWarning, match="Test_GroundTruth"):
        assert len(data.ISIC2018Dataset(isic_root)) == 4


def test_isic_missing_mask(isic_root: Path) -> None:
    (isic_root / data.ISIC2018_SUBSETS["training"][1] / "ISIC_0000001_segmentation.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ISIC_0000001_segmentation\.png"):
        data.ISIC2018Dataset(isic_root)


def test_folder_layout(folder_pair: tuple[Path, Path]) -> None:
    images, masks = folder_pair
    ds = data.FolderDataset(images, masks, mask_suffix="_mask", img_size=20)
    assert ds.names == ["a", "b", "c"] and ds.in_channels == 3
    assert [p[0].name for p in ds.mask_paths] == ["a_mask.png", "b_mask.tif", "c_mask.png"]
    for i in range(3):
        _check_item(*ds[i], channels=3, size=20)
    gray = data.FolderDataset(images, masks, mask_suffix="_mask", channels=1, img_size=None)
    image, mask = gray[0]
    assert image.shape == (1, H, W)
    np.testing.assert_array_equal(mask[0].numpy().astype(bool), _rect_mask(H, W, 0, 0, 10, 10))
    with pytest.raises(FileNotFoundError, match=r"a\.png"):  # without the suffix nothing matches
        data.FolderDataset(images, masks)


def test_folder_same_directory_and_ambiguity(tmp_path: Path) -> None:
    d = tmp_path / "both"
    _save(_gray(H, W, 0), d / "x.png")
    _save(_rect_mask(H, W, 1, 1, 4, 4).astype(np.uint8) * 255, d / "x_segmentation.png")
    ds = data.FolderDataset(d, d, mask_suffix="_segmentation", channels=1)
    assert ds.names == ["x"]
    with pytest.raises(ValueError, match="mask_suffix"):
        data.FolderDataset(d, d)
    _save(_rect_mask(H, W, 1, 1, 4, 4).astype(np.uint8) * 255, d / "x_segmentation.bmp")
    _save(_gray(H, W, 0), d / "x.jpg")
    with pytest.raises(ValueError, match="several images share the stem 'x'"):
        data.FolderDataset(d, d, mask_suffix="_segmentation")


def test_mask_threshold_option(tmp_path: Path) -> None:
    _save(_gray(H, W, 0), tmp_path / "i" / "p.png")
    _save(_rect_mask(H, W, 0, 0, 6, 6).astype(np.uint8), tmp_path / "m" / "p.png")  # stored as 0/1
    default = data.FolderDataset(tmp_path / "i", tmp_path / "m", channels=1, img_size=None)
    assert default[0][1].sum() == 0  # documented: 8-bit masks are > 127
    zero = data.FolderDataset(tmp_path / "i", tmp_path / "m", channels=1, img_size=None, mask_threshold=0)
    assert zero[0][1].sum() == 36


# --------------------------------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------------------------------


def test_missing_mask_error_names_file(folder_pair: tuple[Path, Path]) -> None:
    images, masks = folder_pair
    (masks / "b_mask.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.jpg.*b_mask"):
        data.FolderDataset(images, masks, mask_suffix="_mask")


def test_corrupt_file_error_names_file(folder_pair: tuple[Path, Path]) -> None:
    images, masks = folder_pair
    _corrupt(images / "d.png")
    _save(_rect_mask(H, W, 0, 0, 3, 3).astype(np.uint8) * 255, masks / "d_mask.png")
    with pytest.raises(ValueError, match=r"d\.png"):
        data.FolderDataset(images, masks, mask_suffix="_mask")


def test_corrupt_mask_and_truncated_png(folder_pair: tuple[Path, Path]) -> None:
    images, masks = folder_pair
    _corrupt(masks / "c_mask.png")
    buf = io.BytesIO()
    Image.fromarray(_gray(H, W, 7)).save(buf, format="PNG")
    (images / "a.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # valid header, truncated data
    with pytest.raises(ValueError, match=r"(?s)a\.png.*c_mask\.png"):
        data.FolderDataset(images, masks, mask_suffix="_mask")


def test_size_mismatch_error_names_both(folder_pair: tuple[Path, Path]) -> None:
    images, masks = folder_pair
    _save(_rect_mask(H + 2, W, 0, 0, 3, 3).astype(np.uint8) * 255, masks / "a_mask.png")
    with pytest.raises(ValueError, match=r"size mismatch.*a\.png.*a_mask\.png"):
        data.FolderDataset(images, masks, mask_suffix="_mask")


def test_busi_extra_mask_size_mismatch(busi_root: Path) -> None:
    _save_1bit(np.zeros((H, W + 1), dtype=bool), busi_root / "benign" / "benign (2)_mask_1.png")
    with pytest.raises(ValueError, match=r"benign \(2\)_mask_1\.png"):
        data.BUSIDataset(busi_root)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="no image files"):
        data.FolderDataset(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.FolderDataset(tmp_path / "nowhere", tmp_path / "masks")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.BUSIDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="images"):
        data.KvasirSEGDataset(tmp_path / "masks")
    with pytest.raises(FileNotFoundError, match="none of the official folder pairs"):
        data.ISIC2018Dataset(tmp_path)


def test_skip_bad_warns_once_and_skips(folder_pair: tuple[Path, Path]) -> None:
    images, masks = folder_pair
    (masks / "b_mask.tif").unlink()
    _corrupt(masks / "c_mask.png")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = data.FolderDataset(images, masks, mask_suffix="_mask", skip_bad=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert "b.jpg" in message and "c_mask.png" in message and "2 bad" in message
    assert ds.names == ["a"] and len(ds.skipped) == 2
    _corrupt(images / "a.png")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable"):
        data.FolderDataset(images, masks, mask_suffix="_mask", skip_bad=True)


def test_decode_error_in_getitem_names_file(folder_pair: tuple[Path, Path]) -> None:
    images, masks = folder_pair
    ds = data.FolderDataset(images, masks, mask_suffix="_mask")
    _corrupt(images / "a.png")  # file changed after validation
    with pytest.raises(ValueError, match=r"a\.png"):
        ds[0]


# --------------------------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------------------------


def test_synthetic_deterministic_per_index() -> None:
    a = data.SyntheticLesionDataset(n=12, img_size=64, seed=3)
    b = data.SyntheticLesionDataset(n=12, img_size=64, seed=3)
    late = b[7]  # accessed first: must not depend on order
    for i in range(12):
        x, y = a[i]
        _check_item(x, y, channels=1, size=64)
    xa, ya = a[7]
    assert torch.equal(xa, late[0]) and torch.equal(ya, late[1])
    assert torch.equal(a[-1][0], a[11][0])
    c = data.SyntheticLesionDataset(n=12, img_size=64, seed=4)
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(12))
    with pytest.raises(IndexError):
        a[12]
    assert a.in_channels == 1 and a.names[0] == "synthetic_00000" and a.image_paths[0] is None


def test_synthetic_content() -> None:
    ds = data.SyntheticLesionDataset(n=40, img_size=256, seed=0)
    assert {"empty", "single", "multi"} <= set(ds.tags)
    small = False
    inside, outside = [], []
    for i in range(len(ds)):
        image, mask = ds[i]
        m = mask[0].numpy().astype(bool)
        labels, count = ndimage.label(m, structure=np.ones((3, 3)))
        assert count == ds.num_lesions[i], (i, count, ds.num_lesions[i])
        if count:
            areas = ndimage.sum(m, labels, index=range(1, count + 1))
            small |= bool(np.min(np.sqrt(np.asarray(areas) / np.pi)) <= 8.0)
            inside.append(float(image[0].numpy()[m].mean()))
            outside.append(float(image[0].numpy()[~m].mean()))
        assert image.std() > 0.05  # textured, not flat
    assert small, "expected at least one small lesion (equivalent radius <= 8 px)"
    assert np.mean(inside) < 0.7 * np.mean(outside)  # hypoechoic lesions


# --------------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------------


def test_make_split_reproducible_and_disjoint() -> None:
    names = [f"s{i}" for i in range(100)]
    split = data.make_split(names, seed=1)
    assert [len(split[k]) for k in ("train", "val", "test")] == [70, 10, 20]
    all_names = split["train"] + split["val"] + split["test"]
    assert sorted(all_names) == sorted(names) and len(set(all_names)) == 100
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert data.make_split(shuffled, seed=1) == split  # independent of input order
    assert data.make_split(names, seed=2) != split
    odd = data.make_split([f"x{i}" for i in range(7)], seed=0, fractions=(0.5, 0.25, 0.25))
    assert sum(len(v) for v in odd.values()) == 7
    with pytest.raises(ValueError, match="sum to 1"):
        data.make_split(names, seed=0, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="duplicate"):
        data.make_split(["a", "a", "b"], seed=0)


def test_make_split_stratified() -> None:
    names = [f"b{i}" for i in range(50)] + [f"m{i}" for i in range(30)] + [f"n{i}" for i in range(20)]
    labels = ["benign"] * 50 + ["malignant"] * 30 + ["normal"] * 20
    split = data.make_split(names, seed=0, labels=labels)
    for prefix, n in (("b", 50), ("m", 30), ("n", 20)):
        counts = [sum(s.startswith(prefix) for s in split[k]) for k in ("train", "val", "test")]
        assert counts == [round(0.7 * n), round(0.1 * n), round(0.2 * n)]
    with pytest.raises(ValueError, match="labels"):
        data.make_split(names, seed=0, labels=labels[:-1])


def test_split_save_load_get_or_create(tmp_path: Path) -> None:
    names = [f"s{i}" for i in range(20)]
    path = tmp_path / "sub" / "split.json"
    split = data.get_or_create_split(names, path, seed=5)
    assert path.exists() and data.load_split(path) == split
    assert data.get_or_create_split(names, path, seed=99) == split  # reused, seed ignored
    with pytest.raises(ValueError, match="not in the dataset"):
        data.get_or_create_split(names[:10], path, seed=5)
    with pytest.warns(UserWarning, match="does not cover 1"):
        data.get_or_create_split([*names, "new"], path, seed=5)
    indices = data.split_indices(names, split)
    assert sorted(indices["train"] + indices["val"] + indices["test"]) == list(range(20))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["a"], "val": ["a"], "test": []}))
    with pytest.raises(ValueError, match="appears in both"):
        data.load_split(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.load_split(bad)


# --------------------------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------------------------


class _ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, images: list[torch.Tensor], masks: list[torch.Tensor], channels: int) -> None:
        self.images, self.masks, self.in_channels = images, masks, channels
        self.names = [f"item{i}" for i in range(len(images))]
        self.tags = ["t"] * len(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.masks[i]


def _blocky(size: int, seed: int, channels: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(channels, size // 8, size // 8, generator=gen)
    return coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)


def test_augmentation_keeps_masks_binary_and_aligned() -> None:
    torch.manual_seed(0)
    size = 64
    images = [_blocky(size, s) for s in range(4)]
    masks = [(img > 0.5).float() for img in images]
    ds = _ArrayDataset(images, masks, channels=1)

    everything = range(len(ds))
    geometric = data.LesionSplit(ds, everything, data.train_transforms(1, size, affine=False, color=False))
    for _ in range(4):
        for i in range(len(geometric)):
            _, image, mask = geometric[i]
            assert torch.equal(mask, (image > 0.5).float())  # flips/rot90 are exact and joint

    full = data.LesionSplit(ds, [0, 2], data.train_transforms(1, size))
    agreement = []
    for _ in range(10):
        for i in range(len(full)):
            index, image, mask = full[i]
            assert index == i
            _check_item(image, mask, channels=1, size=size)
            assert image.is_contiguous() and type(mask) is torch.Tensor
    affine_only = data.LesionSplit(ds, everything, data.train_transforms(1, size, color=False))
    for _ in range(10):
        for i in range(len(affine_only)):
            _, image, mask = affine_only[i]
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            agreement.append(float((mask == (image > 0.5).float()).float().mean()))
    assert min(agreement) > 0.9  # bilinear image vs nearest mask differ only at block edges


def test_augmentation_rgb_and_batching() -> None:
    torch.manual_seed(1)
    images = [_blocky(32, s, channels=3) for s in range(6)]
    masks = [(img[:1] > 0.3).float() for img in images]
    subset = data.LesionSplit(_ArrayDataset(images, masks, 3), range(6), data.train_transforms(3, 32))
    _, batch_images, batch_masks = next(iter(DataLoader(subset, batch_size=6)))
    assert batch_images.shape == (6, 3, 32, 32) and batch_masks.shape == (6, 1, 32, 32)
    assert float(batch_images.min()) >= 0.0 and float(batch_images.max()) <= 1.0
    assert set(batch_masks.unique().tolist()) <= {0.0, 1.0}
    resized = data.train_transforms(3, 16)(tv_tensors.Image(images[0]), tv_tensors.Mask(masks[0]))
    assert resized[0].shape == (3, 16, 16) and set(resized[1].unique().tolist()) <= {0.0, 1.0}


def test_random_rot90_is_exact() -> None:
    torch.manual_seed(0)
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 5, 5)
    rot = data.random_rot90()
    seen = set()
    for _ in range(40):
        image, mask = rot(tv_tensors.Image(x), tv_tensors.Mask(x[:1]))
        k = next(k for k in range(4) if torch.equal(image, torch.rot90(x, k, dims=(-2, -1))))
        assert torch.equal(mask, torch.rot90(x[:1], k, dims=(-2, -1)))
        seen.add(k)
    assert seen == {0, 1, 2, 3}


def test_lesion_split_is_a_named_view_of_its_indices() -> None:
    images = [torch.full((1, 8, 8), float(i)) for i in range(5)]
    ds = _ArrayDataset(images, [(img > 2).float() for img in images], channels=1)
    ds.tags = ["a", "b", "a", "b", "a"]
    split = data.LesionSplit(ds, [4, 1, 3])
    assert len(split) == 3 and split.in_channels == 1
    assert split.names == ["item4", "item1", "item3"] and split.tags == ["a", "b", "b"]
    for position, source in enumerate([4, 1, 3]):
        index, image, mask = split[position]
        assert index == position and torch.equal(image, images[source]) and torch.equal(mask, ds.masks[source])


def test_build_dataset_factory(busi_root: Path, folder_pair: tuple[Path, Path]) -> None:
    assert len(data.build_dataset("busi", root=busi_root, img_size=16)) == 5
    images, masks = folder_pair
    ds = data.build_dataset("folder", images=images, masks=masks, mask_suffix="_mask", channels=1, img_size=16)
    assert ds.in_channels == 1
    syn = data.build_dataset("Synthetic", n=3, seed=1, img_size=32)
    assert len(syn) == 3 and syn[0][0].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="busi, busi3, isic2018, kvasir, folder, synthetic"):
        data.build_dataset("cvc")
    with pytest.raises(ValueError, match="root"):
        data.build_dataset("kvasir")
    with pytest.raises(ValueError, match="images"):
        data.build_dataset("folder", images=images)


def test_datasets_needing_reads_the_registry() -> None:
    assert data.datasets_needing("root") == ["busi", "busi3", "isic2018", "kvasir"]
    assert data.datasets_needing("masks") == ["folder"]
    assert data.datasets_needing("nothing") == []


# --------------------------------------------------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent)
# --------------------------------------------------------------------------------------------------------------------


def _sample_indices(n: int, k: int = 50) -> list[int]:
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def test_real_busi() -> None:
    root = SHARED_DATA / "Dataset_BUSI_with_GT"
    if not root.is_dir():
        pytest.skip(f"real BUSI data not found at {root}")
    ds = data.BUSIDataset(root)  # validates all 780 pairs (headers, verify, sizes)
    assert len(ds) == 780
    assert {c: ds.classes.count(c) for c in data.BUSI_CLASSES} == {"benign": 437, "malignant": 210, "normal": 133}
    assert sum(len(m) > 1 for m in ds.mask_paths) == 17
    assert all(p.is_file() for p in ds.image_paths) and all(p.is_file() for m in ds.mask_paths for p in m)
    for i in _sample_indices(len(ds)):
        image, mask = ds[i]
        _check_item(image, mask, channels=1, size=256)
        assert (mask.sum() == 0) == (ds.classes[i] == "normal"), ds.names[i]


def test_real_kvasir() -> None:
    root = SHARED_DATA / "Kvasir-SEG"
    if not root.is_dir():
        pytest.skip(f"real Kvasir-SEG data not found at {root}")
    ds = data.KvasirSEGDataset(root)
    assert len(ds) == 1000 and ds.in_channels == 3
    assert all(p.is_file() for p in ds.image_paths)
    for i in _sample_indices(len(ds)):
        image, mask = ds[i]
        _check_item(image, mask, channels=3, size=256)
        assert mask.sum() > 0, ds.names[i]
