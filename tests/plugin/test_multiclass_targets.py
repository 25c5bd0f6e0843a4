"""Targets in multiclass and multilabel mode: each channel is exactly the binary targets of its class (checked
against the SciPy reference, one class at a time), with both engines; the engines run only on the (image, class)
pairs whose class is present; ``ignore_index``; ``ADSTTargetCollate`` and ``ADSTLoss`` pass the mode through."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiclass_cases import class_indices, images, multilabel_mask, smp_loss, tiny_model
from torch.utils.data import DataLoader, TensorDataset

from adst_examples.benchmarks.scipy_reference import reference_targets
from adst_plugin import ADSTLoss, ADSTTargetCollate, modes, wrap_with_adst
from adst_plugin import targets as targets_module
from adst_plugin.constants import THRESH_MIN
from adst_plugin.targets import adst_targets, border_map, core_map

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _shapes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A bool (h, w) mask: a few discs and rectangles (some cut by the frame, some with holes) or speckle."""
    if rng.random() < 0.15:
        return rng.random((h, w)) < rng.uniform(0.05, 0.6)
    mask = np.zeros((h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(int(rng.integers(0, 4))):
        y0, x0 = int(rng.integers(-2, h + 2)), int(rng.integers(-2, w + 2))
        if rng.random() < 0.5:
            mask |= (yy - y0) ** 2 + (xx - x0) ** 2 <= rng.uniform(0.5, max(h, w) / 3) ** 2
        else:
            y1, x1 = y0 + int(rng.integers(1, h // 2 + 2)), x0 + int(rng.integers(1, w // 2 + 2))
            mask[max(y0, 0) : y1, max(x0, 0) : x1] = True
            if rng.random() < 0.3:
                mask[max(y0 + 1, 0) : y1 - 1, max(x0 + 1, 0) : x1 - 1] = False
    return mask


@st.composite
def class_masks(draw: st.DrawFn, max_side: int = 40) -> tuple[np.ndarray, int]:
    """``(index (B, H, W) int64, C)``: later classes paint over earlier ones, so classes touch and cut each other."""
    classes = draw(st.integers(2, 5))
    batch = draw(st.integers(1, 3))
    h, w = draw(st.integers(2, max_side)), draw(st.integers(2, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    index = np.zeros((batch, h, w), np.int64)
    for b in range(batch):
        for k in range(1, classes):
            if rng.random() < 0.7:  # some classes are absent from some images
                index[b][_shapes(rng, h, w)] = k
    return index, classes


@st.composite
def label_masks(draw: st.DrawFn, max_side: int = 40) -> np.ndarray:
    """Bool (B, C, H, W) multilabel masks: independent, overlapping channels."""
    classes, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    h, w = draw(st.integers(2, max_side)), draw(st.integers(2, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return np.stack([np.stack([_shapes(rng, h, w) for _ in range(classes)]) for _ in range(batch)])


params = st.tuples(st.floats(0.1, 0.9), st.floats(0.0, 0.45), st.floats(0.55, 1.0))


def per_class_reference(channels: list[np.ndarray], r: float, t_min: float, t_max: float) -> tuple:
    """The binary SciPy reference, one (B, H, W) class mask at a time, stacked as (B, K, H, W)."""
    refs = [reference_targets(m[:, None], r, t_min, t_max) for m in channels]
    return np.concatenate([c for c, _ in refs], 1), np.concatenate([b for _, b in refs], 1)


@SETTINGS
@given(case=class_masks(), p=params, engine=st.sampled_from(["opencv", "torch"]))
def test_multiclass_targets_are_the_binary_targets_of_each_class(case, p, engine):
    index, classes = case
    r, t_min, t_max = p
    kwargs = {"shrink_ratio": r, "thresh_min": t_min, "thresh_max": t_max, "engine": engine}
    core, border = adst_targets(torch.from_numpy(index), mode="multiclass", classes=classes, **kwargs)
    assert core.shape == border.shape == (index.shape[0], classes - 1, *index.shape[1:])
    ref_core, ref_border = per_class_reference([index == k for k in range(1, classes)], r, t_min, t_max)
    np.testing.assert_array_equal(core.numpy(), ref_core)
    np.testing.assert_allclose(border.numpy(), ref_border, rtol=0, atol=1e-5)


@SETTINGS
@given(mask=label_masks(), p=params, engine=st.sampled_from(["opencv", "torch"]))
def test_multilabel_targets_are_the_binary_targets_of_each_channel(mask, p, engine):
    r, t_min, t_max = p
    kwargs = {"shrink_ratio": r, "thresh_min": t_min, "thresh_max": t_max, "engine": engine}
    core, border = adst_targets(mask, mode="multilabel", **kwargs)  # NumPy in, NumPy out
    assert isinstance(core, np.ndarray) and core.shape == mask.shape and core.dtype == np.float32
    ref_core, ref_border = per_class_reference([mask[:, k] for k in range(mask.shape[1])], r, t_min, t_max)
    np.testing.assert_array_equal(core, ref_core)
    np.testing.assert_allclose(border, ref_border, rtol=0, atol=1e-5)


def test_one_class_and_one_channel_equal_the_binary_targets():
    index = class_indices(3, 40)
    binary = adst_targets((index > 0)[:, None])
    two_class = adst_targets((index > 0).long(), mode="multiclass", classes=2)
    one_label = adst_targets((index > 0)[:, None].float(), mode="multilabel")
    for got in (two_class, one_label):
        assert all(torch.equal(a, b) for a, b in zip(got, binary, strict=True))


def test_absent_classes_get_the_empty_masks_targets():
    index = class_indices(3, 32)  # image 1 has no class 2, image 2 nothing
    core, border = adst_targets(index, mode="multiclass", classes=5)
    absent = [(1, 1), (2, 0), (2, 1), *[(b, k) for b in range(3) for k in (2, 3)]]
    for b, k in absent:
        assert not core[b, k].any() and (border[b, k] == THRESH_MIN).all()
    assert core[0, 0].any() and core[0, 1].any() and core[1, 0].any()


def _count_engine_masks(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    seen: list[int] = []
    real = getattr(targets_module, name)

    def counting(m, *args, **kwargs):
        seen.append(int(m.shape[0]))
        return real(m, *args, **kwargs)

    monkeypatch.setattr(targets_module, name, counting)
    return seen


@pytest.mark.parametrize(("engine", "name"), [("opencv", "_targets_numpy"), ("torch", "_targets_torch")])
def test_engines_run_only_on_present_classes_so_cost_does_not_grow_with_c(monkeypatch, engine, name):
    seen = _count_engine_masks(monkeypatch, name)
    index = class_indices(4, 32)  # present (image, class) pairs: (0, 1), (0, 2), (1, 1)
    few = adst_targets(index, mode="multiclass", classes=3, engine=engine)
    many = adst_targets(index, mode="multiclass", classes=60, engine=engine)
    assert seen == [3, 3]  # one engine call of the 3 present pairs, whether C is 3 or 60
    assert all(torch.equal(a, b[:, :2]) for a, b in zip(few, many, strict=True))
    labels = torch.zeros(4, 50, 32, 32, dtype=torch.bool)
    labels[0, 7, 3:9, 3:9] = labels[3, 44, 10:20, 5:6] = True
    adst_targets(labels, mode="multilabel", engine=engine)
    assert seen[-1] == 2
    adst_targets(torch.zeros(2, 8, 8, dtype=torch.long), mode="multiclass", classes=4, engine=engine)
    assert len(seen) == 3  # nothing present: no engine call at all


def test_ignored_pixels_belong_to_no_class():
    index = class_indices(2, 32)
    index[0, 10:14, :] = 255  # a band of unlabelled pixels through class 1 and class 2
    core, border = adst_targets(index, mode="multiclass", classes=3, ignore_index=255)
    cut = index.masked_fill(index == 255, 0)
    expected = adst_targets(cut, mode="multiclass", classes=3)
    assert torch.equal(core, expected[0]) and torch.equal(border, expected[1])
    labels = multilabel_mask().masked_fill(torch.arange(32).view(1, 1, 32, 1) < 6, -1)
    core, _ = adst_targets(labels, mode="multilabel", ignore_index=-1)
    assert not core[:, :, :6].any()
    with pytest.raises(ValueError, match=r"\[255\]"):
        adst_targets(index, mode="multiclass", classes=3)  # not declared: an unknown class, not clipped


def test_core_and_border_maps_take_the_mode_too():
    index = class_indices()
    core, border = adst_targets(index, mode="multiclass", classes=3)
    assert torch.equal(core_map(index, mode="multiclass", classes=3), core)
    assert torch.equal(border_map(index, mode="multiclass", classes=3), border)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"mode": "multiclass"}, ValueError, r"classes=<C> with mode='multiclass'"),
        ({"mode": "softmax", "classes": 3}, ValueError, r"expected mode to be one of"),
        ({"mode": "binary", "classes": 3}, ValueError, r"got a 3-class model"),
        ({"mode": "multiclass", "classes": 0}, ValueError, r"classes to be an int >= 1"),
        ({"mode": "multiclass", "classes": 3, "ignore_index": "x"}, TypeError, r"ignore_index to be an int"),
        ({"mode": "multiclass", "classes": 2}, ValueError, r"class indices in \[0, 2\).*\[2\]"),
        ({"mode": "multilabel", "classes": 2}, ValueError, r"expected a mask \(B, 2, H, W\)"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, error, pattern):
    with pytest.raises(error, match=f"adst_targets: .*{pattern}"):
        adst_targets(class_indices(), **kwargs)


# --------------------------------------------------------------------------------------------------------------
# The collate and the loss
# --------------------------------------------------------------------------------------------------------------


def test_collate_builds_multiclass_and_multilabel_targets():
    index = class_indices(4, 24)
    data = TensorDataset(images(4, 24), index)  # per-sample (H, W) class maps
    loader = DataLoader(data, batch_size=2, collate_fn=ADSTTargetCollate(mode="multiclass", classes=3))
    for b, (_, masks, (core, border)) in enumerate(loader):
        expected = adst_targets(index[2 * b : 2 * b + 2], mode="multiclass", classes=3)
        assert masks.shape == (2, 24, 24) and core.shape == (2, 2, 24, 24)
        assert torch.equal(core, expected[0]) and torch.equal(border, expected[1])
    labels = multilabel_mask(2, 24)
    _, _, (core, _) = ADSTTargetCollate(mode="multilabel", classes=3)([(images(1, 24)[0], m) for m in labels])
    assert torch.equal(core, adst_targets(labels, mode="multilabel")[0])
    with pytest.raises(ValueError, match=r"classes=<C> with mode='multiclass'"):
        ADSTTargetCollate(mode="multiclass")
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        ADSTTargetCollate(mode="multiclass", classes=2)([(images(1, 24)[0], m) for m in index[:2]])


@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
def test_targets_from_the_criterions_kwargs_equal_the_ones_built_in_the_loss(mode):
    y = class_indices() if mode == "multiclass" else multilabel_mask()
    totals = []
    for precomputed in (False, True):
        model = wrap_with_adst(tiny_model(3))
        criterion = ADSTLoss(model, base_loss=smp_loss(mode))
        samples = [(x, m) for x, m in zip(images(), y, strict=True)]
        _, masks, targets = ADSTTargetCollate(**criterion.target_kwargs)(samples)
        totals.append(criterion(model(images()), masks, targets if precomputed else None))
    assert torch.equal(totals[0], totals[1])
    with pytest.raises(ValueError, match=r"core with 2 channel\(s\)"):
        model = wrap_with_adst(tiny_model(3))
        ADSTLoss(model, mode="multiclass")(model(images()), class_indices(), (torch.zeros(2, 3, 32, 32),) * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_masks_stay_on_the_device_and_match_the_host():
    index = class_indices(3, 48)
    core, border = adst_targets(index.cuda(), mode="multiclass", classes=4)
    assert core.device.type == "cuda" and border.device.type == "cuda"
    expected = adst_targets(index, mode="multiclass", classes=4)
    assert torch.equal(core.cpu(), expected[0])
    torch.testing.assert_close(border.cpu(), expected[1], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# One definition of the per-class masks, for the loss's targets and adst_targets alike
# --------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(case=class_masks(), ignore=st.sampled_from([None, 1, 2, 255, -1]))
def test_class_masks_dense_and_present_pairs_agree_with_the_definition(case, ignore):
    index, classes = case
    index = torch.from_numpy(index)
    if ignore is not None:  # unlabelled pixels over a third of each image, whatever their class was
        index[..., : index.shape[-1] // 3] = ignore
    labelled, dense = modes.class_masks(index, classes, ignore)
    keep = index != ignore if ignore is not None else torch.ones_like(index, dtype=torch.bool)
    for k in range(1, classes):
        assert torch.equal(dense[:, k - 1], (index == k) & keep)
    assert torch.equal(labelled, torch.where(keep, index, 0))
    pairs, masks = modes.class_masks(index, classes, ignore, present_only=True)
    flat = dense.flatten(0, 1)
    assert torch.equal(pairs, flat.flatten(1).any(1).nonzero().squeeze(1))
    assert torch.equal(masks, flat[pairs])


def _with_unlabelled(ignore_index: int, classes: int) -> torch.Tensor:
    """Class indices with a stripe of ``ignore_index`` across class 1's disc and class 2's block of image 0."""
    index = class_indices(2, 32)
    index[0, 14:19, :] = ignore_index
    index[1, :, 28:] = ignore_index
    if classes > 3:
        index[1, 2:9, 2:12] = 3
    return index


@pytest.mark.parametrize(("classes", "ignore_index"), [(3, 1), (3, 2), (4, 2), (3, 255)])
def test_an_unlabelled_value_inside_the_classes_is_in_no_class_on_both_paths(classes, ignore_index):
    """A label set may reserve a class index in [1, C) for "unlabelled": its pixels are then in no class, in the
    loss's own targets as in ADSTTargetCollate's, and the two paths give the same targets and the same loss."""
    index = _with_unlabelled(ignore_index, classes)
    cut = index.masked_fill(index == ignore_index, 0)  # the same mask without the unlabelled stripe
    expected = adst_targets(cut, mode="multiclass", classes=classes)
    collated = adst_targets(index, mode="multiclass", classes=classes, ignore_index=ignore_index)
    labels = modes.check_labels(index, "multiclass", classes, "here", ignore_index)
    from_loss = adst_targets(labels.y, mode="multilabel")  # what the loss builds from its labels
    for got in (collated, from_loss):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    if 1 <= ignore_index < classes:
        assert not labels.y[:, ignore_index - 1].any() and not expected[0][:, ignore_index - 1].any()
    assert (labels.index == cut).all()
    totals = []
    for precomputed in (False, True):
        model = wrap_with_adst(tiny_model(classes))
        criterion = ADSTLoss(model, base_loss=smp_loss("multiclass", ignore_index=ignore_index))
        samples = [(x, m) for x, m in zip(images(), index, strict=True)]
        _, masks, targets = ADSTTargetCollate(**criterion.target_kwargs)(samples)
        totals.append(criterion(model(images()), masks, targets if precomputed else None))
    assert torch.equal(totals[0], totals[1])
