"""BUSI as three classes (``busi3``): the loader, the cache, the augmentation, per-class Dice, train.py, the study
and smp's multiclass Lightning tutorial; on a fake BUSI tree in the official layout (always) and on the real data
(when ../shared/data is there)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES_DIR, SHARED_DATA
from PIL import Image

import adst_examples.studylib as study
from adst_examples import train
from adst_examples.data import BUSI3_CLASSES, BUSI3Dataset, BUSIDataset, augment_batch, build_dataset, train_transforms
from adst_examples.data.cache import build_cache, load_cache
from adst_examples.metrics import MetricAccumulator, per_class_dice

BUSI = SHARED_DATA / "Dataset_BUSI_with_GT"
COUNTS = {"benign": 6, "malignant": 5, "normal": 3}


def write_busi_tree(root: Path) -> Path:
    """``Dataset_BUSI_with_GT/{benign,malignant,normal}/<class> (N).png`` + ``_mask.png`` (one extra ``_mask_1``),
    40x48 grayscale images with 1-bit masks; every lesion is a rectangle."""
    rng = np.random.default_rng(0)
    busi = root / "Dataset_BUSI_with_GT"
    for cls, count in COUNTS.items():
        (busi / cls).mkdir(parents=True)
        for i in range(1, count + 1):
            Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(busi / cls / f"{cls} ({i}).png")
            mask = np.zeros((40, 48), bool)
            if cls != "normal":
                mask[8 + i : 24 + i, 10 : 30 - i] = True
            Image.fromarray(mask).convert("1").save(busi / cls / f"{cls} ({i})_mask.png")
    extra = np.zeros((40, 48), bool)
    extra[30:36, 36:44] = True
    Image.fromarray(extra).convert("1").save(busi / "malignant" / "malignant (1)_mask_1.png")
    return busi


@pytest.fixture(scope="module")
def busi_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_busi_tree(tmp_path_factory.mktemp("busi3"))


def _check_against_binary(three: BUSI3Dataset, binary: BUSIDataset, indices: list[int]) -> None:
    for i in indices:
        image, mask = three[i]
        image_b, mask_b = binary[i]
        assert mask.dtype == torch.int64 and mask.shape == mask_b.shape[1:]
        torch.testing.assert_close(image, image_b, rtol=0, atol=0)
        label = {"benign": 1, "malignant": 2, "normal": 0}[three.tags[i]]
        assert torch.equal(mask, mask_b[0].long() * label)


def test_busi3_masks_are_the_binary_lesions_labelled_by_class(busi_tree: Path) -> None:
    three = build_dataset("busi3", root=busi_tree, img_size=32)
    binary = BUSIDataset(busi_tree, img_size=32)
    assert isinstance(three, BUSI3Dataset) and three.num_classes == 3 and three.class_names == BUSI3_CLASSES
    assert three.names == binary.names and len(three) == sum(COUNTS.values())
    _check_against_binary(three, binary, list(range(len(three))))
    values = {cls: set() for cls in COUNTS}
    for i in range(len(three)):
        values[three.tags[i]] |= set(three[i][1].unique().tolist())
    assert values == {"benign": {0, 1}, "malignant": {0, 2}, "normal": {0}}
    # the extra _mask_1 lesion of malignant (1) is class 2 too (union, then labelled)
    assert int(three[three.names.index("malignant (1)")][1][24:, 24:].max()) == 2


@pytest.mark.skipif(not BUSI.is_dir(), reason="BUSI not in ../shared/data")
def test_busi3_on_the_real_data() -> None:
    three, binary = BUSI3Dataset(BUSI, img_size=64), BUSIDataset(BUSI, img_size=64)
    assert len(three) == 780 and three.names == binary.names
    picks = [three.tags.index(cls) for cls in ("benign", "malignant", "normal")]
    _check_against_binary(three, binary, [*picks, three.names.index("benign (4)")])


def test_cache_stores_class_indices_and_augmentation_keeps_them(busi_tree: Path, tmp_path: Path) -> None:
    dataset = BUSI3Dataset(busi_tree, img_size=32)
    split = {"train": list(range(10)), "val": [10, 11], "test": [12, 13]}
    data = load_cache(build_cache(dataset, split, tmp_path / "busi3-32.npz", name="busi3", size=32))
    assert data.num_classes == 3 and data.class_names == BUSI3_CLASSES
    assert data.masks.dtype == torch.uint8 and data.masks.shape == (len(dataset), 32, 32)
    for i in range(len(dataset)):
        assert torch.equal(data.masks[i].long(), dataset[i][1])
    # nearest interpolation for masks: an augmented class map holds class indices only, each class kept apart
    masks = data.masks[:8].long()
    _, out = augment_batch(
        train_transforms(1, 32), data.images[:8].float() / 255, masks, torch.Generator().manual_seed(0)
    )
    assert out.dtype == torch.int64 and out.shape == masks.shape
    for before, after in zip(masks, out, strict=True):
        assert set(after.unique().tolist()) <= set(before.unique().tolist())


def test_per_class_dice_matches_an_independent_computation() -> None:
    rng = np.random.default_rng(1)
    pred, target = rng.integers(0, 3, (6, 9, 11)), rng.integers(0, 3, (6, 9, 11))
    pred[0] = 0  # an image with nothing predicted
    target[1] = np.where(target[1] == 2, 1, target[1])  # no malignant pixel: empty/empty or a false alarm
    pred[2], target[2] = 0, 0  # both empty: 1 for every class
    expected = np.zeros((6, 2))
    for b in range(6):
        for k in (1, 2):
            p, t = pred[b] == k, target[b] == k
            denom = p.sum() + t.sum()
            expected[b, k - 1] = 1.0 if denom == 0 else 2 * (p & t).sum() / denom
    got = per_class_dice(torch.from_numpy(pred), torch.from_numpy(target), 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    acc = MetricAccumulator(("dice",), small_lesions=False, class_names=BUSI3_CLASSES)
    lesion = torch.from_numpy(target > 0)[:, None]
    acc.update(lesion, lesion, class_pred=torch.from_numpy(pred), class_target=torch.from_numpy(target))
    summary = acc.summary()
    assert list(summary) == ["dice", "dice_benign", "dice_malignant", "dice_class_mean"]
    assert summary["dice_malignant"].mean == pytest.approx(expected[:, 1].mean())
    assert summary["dice_class_mean"].mean == pytest.approx(expected.mean())
    assert MetricAccumulator.from_state(acc.state()).summary()["dice_benign"].mean == pytest.approx(
        expected[:, 0].mean()
    )
    with pytest.raises(ValueError, match=r"target values in \[0, 2\], got \[1, 3\]"):
        per_class_dice(torch.from_numpy(pred), torch.from_numpy(target) + 1, 3)
    with pytest.raises(ValueError, match="class_pred= and class_target="):
        acc.update(lesion, lesion)


def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "busi3", "--root", str(root), "--encoder", "resnet18", "--img-size", "32",
            "--batch-size", "4", "--epochs", "1", "--max-steps", "2", "--workers", "0", "--no-progress",
            "--out", str(out), *extra]  # fmt: skip


@pytest.mark.slow
def test_train_py_three_classes_end_to_end(busi_tree: Path, tmp_path: Path) -> None:
    for arm, extra in (("adst", ()), ("baseline", ("--no-adst",))):
        result = train.main(_train_args(busi_tree, tmp_path / arm, *extra))
        for key in ("test", "val", "test_without_normal"):
            assert {"dice", "boundary_iou", "dice_benign", "dice_malignant", "dice_class_mean"} <= set(result[key])
        per_image = result["per_image"]
        means = np.mean([per_image["dice_benign"], per_image["dice_malignant"]], axis=0)
        np.testing.assert_allclose(per_image["dice_class_mean"], means, rtol=1e-6)
        config = json.loads((tmp_path / arm / "exported" / "config.json").read_text())
        assert config["classes"] == 3


def test_train_py_refuses_a_peer_arm_on_three_classes(busi_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(train.UsageError, match="--loss: expected a binary dataset for the peer arms, got a 3-class"):
        train.main(_train_args(busi_tree, tmp_path / "x", "--no-adst", "--loss", "tversky"))
    assert not (tmp_path / "x" / "metrics.json").exists()


@pytest.mark.slow
def test_study_three_classes_reports_per_class_dice_with_paired_intervals(busi_tree: Path, tmp_path: Path) -> None:
    argv = ["--datasets", "busi3", "--data-root", str(busi_tree.parent), "--arms", "baseline,adst", "--seeds", "2",
            "--epochs", "1", "--max-steps", "1", "--img-size", "32", "--batch-size", "4", "--encoder", "resnet18",
            "--no-progress", "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    report = study.main(argv)
    entry = report["datasets"]["busi3"]
    columns = ["dice_benign", "dice_malignant", "dice_class_mean"]
    assert entry["class_metrics"] == columns
    adst, base = entry["arms"]["adst"], entry["arms"]["baseline"]
    runs = {
        (arm, seed): json.loads(p.read_text())
        for arm in ("adst", "baseline")
        for seed in (0, 1)
        for p in [tmp_path / "s" / "runs" / "busi3" / arm / f"seed{seed}" / "result.json"]
    }
    for column in columns:
        paired = adst["paired"][column]
        diffs = [runs["adst", s]["test"][column] - runs["baseline", s]["test"][column] for s in (0, 1)]
        assert paired["n"] == 2 and paired["mean"] == pytest.approx(np.mean(diffs))
        assert base["test"][column]["mean"] == pytest.approx(
            np.mean([runs["baseline", s]["test"][column] for s in (0, 1)])
        )
    assert "Δ test Dice mean of lesion classes" in (tmp_path / "s" / "study.md").read_text()


# -- smp's multiclass Lightning tutorial ------------------------------------------------------------------------------


def test_the_multiclass_recipe_uses_no_adst_name() -> None:
    # Its four ADST lines are the binary recipe's (checked in test_lightning_busi.py), which trains it.
    tree = ast.parse((EXAMPLES_DIR / "lightning_busi_multiclass.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        a.attr for a in ast.walk(tree) if isinstance(a, ast.Attribute)
    }
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.startswith("adst_plugin") for m in modules)
    assert not names & {"wrap_with_adst", "ADSTLoss", "export"}
    lines = (EXAMPLES_DIR / "lightning_busi_multiclass.py").read_text().splitlines()
    assert not [line for line in lines if line.rstrip().endswith("# ADST")]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_multiclass_recipe_trains_with_adst_and_exports_a_plain_3_class_model(busi_tree: Path, tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from adst_examples.lightning_busi_multiclass import BUSIMulticlassModel, main
    from adst_plugin import ADSTLoss, ADSTModel

    tiny = ["--img-size", "32", "--encoder", "resnet18", "--batch-size", "4", "--workers", "0", "--limit-batches", "2"]
    result = main(["--root", str(busi_tree), "--epochs", "1", "--out", str(tmp_path / "r"), *tiny])
    module = result.module
    assert isinstance(module, BUSIMulticlassModel) and isinstance(module.loss_fn, ADSTLoss)
    assert module.loss_fn.mode == "multiclass" and isinstance(module.model, ADSTModel)
    assert type(result.exported).__name__ == "FPN" and result.exported.segmentation_head[0].out_channels == 3
    assert not any(isinstance(m, ADSTModel) for m in result.exported.modules())
    assert {"test_per_image_iou", "test_dataset_iou"} <= set(result.metrics)
