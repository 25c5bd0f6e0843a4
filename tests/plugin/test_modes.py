"""smp's three modes: how the mode is found (base loss, ``mode=``, the model), the errors when it cannot be known
or contradicts the model or the mask, the mask validators of each mode, and the default mask losses."""

from __future__ import annotations

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from multiclass_cases import class_indices, images, mode_mask, multilabel_mask, smp_loss, tiny_model
from torch import nn

from adst_plugin import ADSTLoss, DiceBCELoss, DiceCELoss, wrap_with_adst
from adst_plugin._checks import check_class_mask, check_multilabel_mask, deferred_value_checks
from adst_plugin.modes import MODES, check_labels, class_probability, loss_ignore_index, loss_mode, resolve_mode

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_modes_are_smps_constants():
    assert MODES == (smp.losses.BINARY_MODE, smp.losses.MULTICLASS_MODE, smp.losses.MULTILABEL_MODE)
    assert loss_mode(smp.losses.DiceLoss("multilabel")) == "multilabel" and loss_mode(nn.BCEWithLogitsLoss()) is None
    assert loss_ignore_index(smp.losses.DiceLoss("multiclass", ignore_index=255)) == 255
    assert loss_ignore_index(smp.losses.DiceLoss("multiclass")) is None
    assert loss_ignore_index(nn.CrossEntropyLoss(ignore_index=7)) == 7


# --------------------------------------------------------------------------------------------------------------
# How the mode is found
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
def test_the_mode_is_read_from_the_users_smp_loss_as_written(mode):
    model = wrap_with_adst(tiny_model(3))
    assert model.classes == 3 and model.mode is None
    criterion = ADSTLoss(model, base_loss=smp.losses.DiceLoss(mode, from_logits=True))
    assert criterion.mode == mode and model.mode == mode  # the head's edge cue follows the loss
    y = mode_mask(mode)
    loss = criterion(model(images()), y)
    loss.backward()
    assert set(criterion.last_terms) == {"mask", "main", "threshold", "binary", "total"}
    assert [n for n, p in model.head.named_parameters() if p.grad is None] == []


def test_resolve_mode_sources_and_defaults():
    dice = smp_loss("multiclass")
    assert resolve_mode(3, "here", base_loss=dice) == "multiclass"
    assert resolve_mode(3, "here", mode="multilabel", base_loss=nn.BCEWithLogitsLoss()) == "multilabel"
    assert resolve_mode(3, "here", model_mode="multiclass") == "multiclass"
    assert resolve_mode(3, "here", mode="multiclass", base_loss=dice, model_mode="multiclass") == "multiclass"
    assert resolve_mode(1, "here") == "binary" and resolve_mode(None, "here") == "binary"
    assert resolve_mode(1, "here", base_loss=smp_loss("multilabel")) == "multilabel"  # a 1-channel multilabel


def test_unknown_mode_of_a_multiclass_model_says_what_to_pass():
    model = wrap_with_adst(tiny_model(3))
    with pytest.raises(ValueError, match=r"cannot tell the mode of a 3-class model.*DiceLoss\('multiclass'.*mode="):
        ADSTLoss(model)
    with pytest.raises(ValueError, match="cannot tell the mode"):
        ADSTLoss(model, base_loss=nn.CrossEntropyLoss())  # no .mode
    assert ADSTLoss(model, base_loss=nn.CrossEntropyLoss(), mode="multiclass").mode == "multiclass"


def test_a_binary_loss_on_a_three_class_model_is_refused():
    model = wrap_with_adst(tiny_model(3))
    with pytest.raises(ValueError, match=r"base_loss\.mode.*1-class model, got a 3-class model.*'multiclass'"):
        ADSTLoss(model, base_loss=smp_loss("binary"))
    with pytest.raises(ValueError, match=r"mode.*got a 3-class model"):
        ADSTLoss(model, mode="binary")
    with pytest.raises(ValueError, match=r"at least 2 classes for base_loss\.mode='multiclass'"):
        ADSTLoss(wrap_with_adst(tiny_model(1)), base_loss=smp_loss("multiclass"))


def test_contradicting_modes_are_refused_naming_both():
    model = wrap_with_adst(tiny_model(3))
    with pytest.raises(ValueError, match=r"mode='multilabel', base_loss\.mode='multiclass'"):
        ADSTLoss(model, base_loss=smp_loss("multiclass"), mode="multilabel")
    ADSTLoss(model, base_loss=smp_loss("multiclass"))  # binds the model ...
    with pytest.raises(ValueError, match=r"base_loss\.mode='multilabel', the model's mode='multiclass'"):
        ADSTLoss(model, base_loss=smp_loss("multilabel"))  # ... so a second loss of another mode is refused
    wrapped = wrap_with_adst(tiny_model(3), mode="multilabel")
    with pytest.raises(ValueError, match="the model's mode='multilabel'"):
        ADSTLoss(wrapped, base_loss=smp_loss("multiclass"))
    with pytest.raises(ValueError, match="expected mode to be one of"):
        ADSTLoss(model, mode="softmax")


def test_wrap_with_adst_mode_and_classes():
    with pytest.raises(ValueError, match=r"got a 3-class model"):
        wrap_with_adst(tiny_model(3), mode="binary")
    with pytest.raises(ValueError, match=r"classes=2 to match the model's segmentation head, got 3"):
        wrap_with_adst(tiny_model(3), classes=2)
    model = wrap_with_adst(tiny_model(4), mode="multiclass")
    assert model.mode == "multiclass" and model.head.main[-1].out_channels == 4
    assert ADSTLoss(model).mode == "multiclass"  # the wrapper's mode serves the loss too
    assert isinstance(ADSTLoss(model).base_loss, DiceCELoss)

    class Net(nn.Module):  # not an smp model: classes= says how many channels it returns
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.out = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.out(self.body(x))

    generic = wrap_with_adst(Net(), features="body", classes=3, mode="multilabel")
    generic(images(size=16))
    assert generic.pop_maps().fused.shape == (2, 3, 16, 16)
    unknown = wrap_with_adst(Net(), features="body")  # 1 channel assumed
    with pytest.raises(ValueError, match=r"expected mask logits with 1 channel.*Pass classes=<C> to wrap_with_adst"):
        unknown(images(size=16))


def test_a_training_forward_before_the_mode_is_known_fails_clearly():
    model = wrap_with_adst(tiny_model(3))
    with pytest.raises(RuntimeError, match=r"mode of a 3-class model is unknown.*ADSTLoss\(model, base_loss="):
        model(images())
    model.eval()
    assert model(images()).shape == (2, 3, 32, 32)  # eval runs no head: nothing to know
    paper = wrap_with_adst(tiny_model(3), "paper")  # the paper's edge is of the logits: no probability needed
    paper(images())
    assert paper.pop_maps().edge.shape == (2, 3, 32, 32)


# --------------------------------------------------------------------------------------------------------------
# Masks of each mode
# --------------------------------------------------------------------------------------------------------------


def test_class_mask_accepts_both_layouts_and_integer_dtypes():
    index = class_indices()
    for mask in (index, index[:, None], index.to(torch.uint8), index.int().numpy()):
        out = check_class_mask(mask, 3, "here")
        assert out.dtype == torch.long and out.shape == (2, 32, 32) and torch.equal(out, index)


@pytest.mark.parametrize(
    ("bad", "error", "pattern"),
    [
        (lambda m: m.masked_fill(m == 2, 3), ValueError, r"class indices in \[0, 3\) for a 3-class model, got .*\[3\]"),
        (lambda m: m - 1, ValueError, r"got values such as \[-1\]"),
        (lambda m: m.float(), TypeError, r"integer class indices, got dtype torch\.float32.*mode='multilabel'"),
        (lambda m: F.one_hot(m, 3).permute(0, 3, 1, 2), ValueError, r"\(B, H, W\) or \(B, 1, H, W\).*argmax"),
        (lambda m: m[0], ValueError, r"expected a multiclass mask \(B, H, W\)"),
    ],
)
def test_bad_class_masks_name_the_problem(bad, error, pattern):
    with pytest.raises(error, match=pattern):
        check_class_mask(bad(class_indices()), 3, "here")
    model = wrap_with_adst(tiny_model(3))
    criterion = ADSTLoss(model, base_loss=smp_loss("multiclass"))
    logits = model(images())
    with pytest.raises(error, match=pattern.replace("here", "ADSTLoss")):
        criterion(logits, bad(class_indices()))


def test_ignore_index_values_pass_and_nothing_is_clipped():
    index = class_indices()
    index[0, :3] = 255
    assert torch.equal(check_class_mask(index, 3, "here", ignore_index=255), index)
    with pytest.raises(ValueError, match=r"\[255\]"):
        check_class_mask(index, 3, "here")  # without ignore_index 255 is an unknown class
    index[1, 0, 0] = 3
    with pytest.raises(ValueError, match=r"or ignore_index=255 .*\[3\]"):
        check_class_mask(index, 3, "here", ignore_index=255)


def test_multilabel_masks():
    mask = multilabel_mask()
    for encoding in (mask, mask.bool(), (mask * 255).to(torch.uint8), mask.long()):
        positive, ignored = check_multilabel_mask(encoding, 3, "here")
        assert torch.equal(positive, mask.bool()) and ignored is None
    with pytest.raises(ValueError, match=r"expected a mask \(B, 3, H, W\).*mode='multiclass'"):
        check_multilabel_mask(class_indices(), 3, "here")
    with pytest.raises(ValueError, match=r"expected a mask \(B, 3, H, W\)"):
        check_multilabel_mask(mask[:, :2], 3, "here")
    with pytest.raises(ValueError, match=r"values in \{0, 1\}.*\[0\.5\]"):
        check_multilabel_mask(mask * 0.5, 3, "here")
    with pytest.raises(ValueError, match="NaN"):
        check_multilabel_mask(mask * float("nan"), 3, "here")
    with pytest.raises(ValueError, match=r"such as \[255\]"):
        check_multilabel_mask(mask.masked_fill(mask == 0, 255).to(torch.uint8), 3, "here", ignore_index=-1)
    ignored_mask = mask.masked_fill(torch.arange(32).view(1, 1, 1, 32) < 4, -1)
    positive, ignored = check_multilabel_mask(ignored_mask, 3, "here", ignore_index=-1)
    assert ignored.sum() == 2 * 3 * 32 * 4 and not (positive & ignored).any()


def test_mode_mismatched_masks_are_refused():
    criterion_of = {
        m: ADSTLoss(wrap_with_adst(tiny_model(3)), base_loss=smp_loss(m)) for m in ("multiclass", "multilabel")
    }
    logits = criterion_of["multiclass"].model(images())
    with pytest.raises(TypeError, match="is multilabel"):
        criterion_of["multiclass"](logits, multilabel_mask())  # float: not class indices
    logits = criterion_of["multiclass"].model(images())
    with pytest.raises(ValueError, match="is multilabel"):
        criterion_of["multiclass"](logits, multilabel_mask().long())  # integer, but (B, C, H, W)
    logits = criterion_of["multilabel"].model(images())
    with pytest.raises(ValueError, match="is multiclass"):
        criterion_of["multilabel"](logits, class_indices())
    binary = ADSTLoss(wrap_with_adst(tiny_model(1)))
    with pytest.raises(ValueError, match=r"with 1 channel\(s\)"):
        binary(torch.randn(2, 3, 32, 32), class_indices()[:, None])


def test_labels_of_each_mode():
    index = class_indices()
    labels = check_labels(index, "multiclass", 3, "here")
    assert labels.y.shape == (2, 2, 32, 32) and labels.valid is None and labels.base is not None
    for k in (1, 2):
        assert torch.equal(labels.y[:, k - 1], index == k)  # channel k - 1 is class k; no background channel
    index[0, 0] = 9
    ignored = check_labels(index, "multiclass", 3, "here", ignore_index=9)
    assert not ignored.y[0, :, 0].any() and not ignored.valid[0, 0, 0].any() and ignored.valid[0, 0, 1:].all()
    assert (ignored.index[0, 0] == 0).all() and ignored.base[0, 0, 0] == 9  # the base loss sees 9 and skips it
    multi = check_labels(multilabel_mask(), "multilabel", 3, "here")
    assert multi.y.shape == (2, 3, 32, 32) and multi.valid is None


def test_a_deferred_value_check_never_crashes_on_a_bad_mask():
    # Training steps on CUDA defer the verdict; until it is read, the bad values must flow through harmlessly.
    bad = class_indices().masked_fill(class_indices() == 2, 7)
    with deferred_value_checks() as verdicts:
        labels = check_labels(bad, "multiclass", 3, "here")
    assert len(verdicts) == 1 and not bool(verdicts[0])
    assert labels.index.max() < 3 and not labels.y.any(1)[bad == 7].any()


def test_class_probability():
    logits = torch.randn(2, 3, 4, 4)
    assert torch.allclose(class_probability(logits, "multiclass").sum(1), torch.ones(2, 4, 4))
    assert torch.equal(class_probability(logits, "multilabel"), torch.sigmoid(logits))


# --------------------------------------------------------------------------------------------------------------
# ignore_index and the default mask losses
# --------------------------------------------------------------------------------------------------------------


def test_ignore_index_comes_from_the_base_loss_or_the_keyword():
    model = wrap_with_adst(tiny_model(3))
    assert ADSTLoss(model, base_loss=smp_loss("multiclass", ignore_index=255)).ignore_index == 255
    criterion = ADSTLoss(model, mode="multiclass", ignore_index=255)
    assert criterion.ignore_index == 255 and criterion.base_loss.ignore_index == 255  # the default loss honours it
    assert criterion.target_kwargs["ignore_index"] == 255 and criterion.target_kwargs["classes"] == 3
    with pytest.raises(ValueError, match="ignore_index=7 to match the base loss's ignore_index, got 255"):
        ADSTLoss(model, base_loss=smp_loss("multiclass", ignore_index=255), ignore_index=7)
    with pytest.raises(TypeError, match="ignore_index to be an int"):
        ADSTLoss(model, mode="multiclass", ignore_index=1.5)


def test_default_mask_losses_are_smp_dice_plus_ce_or_bce():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 32, 32)
    index = class_indices()
    dice_mc = smp.losses.DiceLoss("multiclass", from_logits=True)(logits, index)
    torch.testing.assert_close(DiceCELoss()(logits, index), dice_mc + F.cross_entropy(logits, index))
    torch.testing.assert_close(DiceCELoss()(logits, index[:, None]), DiceCELoss()(logits, index))
    labels = multilabel_mask()
    dice_ml = smp.losses.DiceLoss("multilabel", from_logits=True)(logits, labels)
    expected = dice_ml + F.binary_cross_entropy_with_logits(logits, labels)
    torch.testing.assert_close(DiceBCELoss(mode="multilabel")(logits, labels), expected)
    with pytest.raises(ValueError, match="Use DiceCELoss"):
        DiceBCELoss(mode="multiclass")
    assert ADSTLoss(wrap_with_adst(tiny_model(3)), mode="multilabel").base_loss.mode == "multilabel"


def test_default_losses_ignore_the_ignored_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 32, 32)
    index = class_indices()
    index[:, :, :5] = 255
    changed = logits.clone()
    changed[:, :, :, :5] = torch.randn(2, 3, 32, 5)  # other predictions on the ignored pixels
    loss = DiceCELoss(ignore_index=255)
    assert torch.equal(loss(logits, index), loss(changed, index))
    labels = multilabel_mask().masked_fill(torch.arange(32).view(1, 1, 1, 32) < 5, -1)
    loss = DiceBCELoss(mode="multilabel", ignore_index=-1)
    torch.testing.assert_close(loss(logits, labels), loss(changed, labels), rtol=0, atol=1e-6)
    valid = labels != -1
    bce = F.binary_cross_entropy_with_logits(logits[valid], labels[valid])
    dice = smp.losses.DiceLoss("multilabel", from_logits=True, ignore_index=-1)(logits, labels)
    torch.testing.assert_close(loss(logits, labels), dice + bce)


def test_numpy_masks_and_1_channel_multilabel_equal_binary():
    y = mode_mask("binary")
    losses = []
    for mode in ("binary", "multilabel"):
        model = wrap_with_adst(tiny_model(1))
        criterion = ADSTLoss(model, base_loss=smp_loss(mode))
        losses.append((criterion(model(images()), np.asarray(y)), dict(criterion.last_terms)))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=0, atol=1e-6)
    assert losses[0][1].keys() == losses[1][1].keys()
