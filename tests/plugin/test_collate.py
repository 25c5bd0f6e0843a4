"""Tests for ``adst_plugin.collate.ADSTTargetCollate`` (targets built in DataLoader workers)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from adst_plugin.collate import ADSTTargetCollate
from adst_plugin.targets import adst_targets


def _data(n: int = 12, size: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for i in range(n):
        cy, cx, r = torch.randint(0, size, (3,), generator=g).tolist()
        masks[i, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= (r % 9) ** 2).to(torch.uint8) * 255
    masks[0] = 0  # an empty mask
    return TensorDataset(images, masks)


@pytest.mark.parametrize("context", [pytest.param("spawn", marks=pytest.mark.slow), "fork"])  # spawn: a worker pool
def test_dataloader_workers_match_adst_targets(context: str) -> None:
    if context not in torch.multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {context} not available")
    data = _data()
    collate = ADSTTargetCollate(shrink_ratio=0.5, thresh_min=0.2, thresh_max=0.8)
    loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=collate, multiprocessing_context=context)
    seen = 0
    for b, (images, masks, (core, border)) in enumerate(loader):
        sl = slice(4 * b, 4 * b + 4)
        assert torch.equal(images, data.tensors[0][sl]) and torch.equal(masks, data.tensors[1][sl])
        ref_core, ref_border = adst_targets(masks, shrink_ratio=0.5, thresh_min=0.2, thresh_max=0.8)
        assert core.dtype == border.dtype == torch.float32 and core.shape == masks.shape
        assert torch.equal(core, ref_core) and torch.equal(border, ref_border)
        seen += len(images)
    assert seen == len(data)


def test_in_process_defaults_and_custom_collate() -> None:
    data = _data(4)
    samples = [data[i] for i in range(4)]
    _, _, (core, border) = ADSTTargetCollate()(samples)
    ref = adst_targets(default_collate(samples)[1])
    assert torch.equal(core, ref[0]) and torch.equal(border, ref[1])
    # A custom collate_fn (e.g. a list of images of different sizes) and the torch engine.
    collate = ADSTTargetCollate(lambda s: ([x for x, _ in s], torch.stack([m for _, m in s])), engine="torch")
    images, _, (core_t, border_t) = collate(samples)
    assert isinstance(images, list) and len(images) == 4
    assert torch.equal(core_t, ref[0])
    np.testing.assert_allclose(border_t.numpy(), ref[1].numpy(), rtol=0, atol=1e-6)


def test_picklable() -> None:
    collate = ADSTTargetCollate(shrink_ratio=0.3, engine="opencv", num_threads=1)
    clone = pickle.loads(pickle.dumps(collate))
    assert repr(clone) == repr(collate) and "default_collate" in repr(clone)
    samples = [_data(2)[i] for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(clone(samples)[2], collate(samples)[2], strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shrink_ratio": 1.5}, ValueError, r"ADSTTargetCollate: expected 0 < shrink_ratio < 1"),
        ({"thresh_min": 0.8, "thresh_max": 0.2}, ValueError, "thresh_min < thresh_max"),
        ({"engine": "cuda"}, ValueError, r"unknown engine 'cuda'; valid options are \('auto', 'opencv', 'torch'\)"),
        ({"num_threads": 0}, ValueError, "num_threads"),
        ({"collate_fn": 3}, TypeError, "collate_fn to be callable"),
    ],
)
def test_bad_parameters(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ADSTTargetCollate(**kwargs)


def test_bad_samples() -> None:
    collate = ADSTTargetCollate()
    image, mask = torch.zeros(3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool)
    with pytest.raises(TypeError, match="non-empty list of"):
        collate([])
    with pytest.raises(TypeError, match=r"same number of fields \(2\), got tuple of length 3 at index 1"):
        collate([(image, mask), (0, image, mask)])
    with pytest.raises(TypeError, match=r"\(image, mask\) pair .*got tuple of length 1 at index 0"):
        collate([(image,)])
    with pytest.raises(ValueError, match=r"each mask of shape \(1, H, W\), got \(8, 8\)"):
        collate([(image, mask[0])])
    with pytest.raises(ValueError, match="binary mask"):
        collate([(image, torch.full((1, 8, 8), 0.5))])
    with pytest.raises(TypeError, match="collate_fn to return"):
        ADSTTargetCollate(lambda s: s[0][0])([(image, mask)])


def test_extra_leading_fields_are_collated_and_kept() -> None:
    image = torch.zeros(3, 8, 8)
    masks = [torch.zeros(1, 8, 8, dtype=torch.bool) for _ in range(2)]
    masks[1][0, 2:6, 2:6] = True
    index, images, _, (core, border) = ADSTTargetCollate()([(7, image, masks[0]), (9, image, masks[1])])
    assert index.tolist() == [7, 9] and images.shape == (2, 3, 8, 8)
    expected = adst_targets(torch.stack(masks))
    assert torch.equal(core, expected[0]) and torch.equal(border, expected[1])
