import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from adst_plugin import ADSTLoss, ADSTOutput, DiceBCELoss
from adst_plugin.targets import adst_targets


def outputs(b=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, 1, h, w, generator=g, requires_grad=True) for _ in range(4)]
    return ADSTOutput(*maps)


def mask(b=2, h=16, w=16):
    m = torch.zeros(b, 1, h, w)
    m[:, :, 4:11, 3:9] = 1
    return m


def test_total_is_the_weighted_sum_of_the_terms():
    out, y = outputs(), mask()
    criterion = ADSTLoss(w_mask=1.0, w_main=0.5, w_edge=2.0, w_fused=0.25)
    total = criterion(out, y)
    core, border = adst_targets(y)
    base = DiceBCELoss()
    terms = {
        "mask": base(out.masks, y),
        "main": F.binary_cross_entropy_with_logits(out.main, core),
        "edge": F.binary_cross_entropy_with_logits(out.edge, border),
        "fused": base(out.fused, y),
    }
    expected = terms["mask"] + 0.5 * terms["main"] + 2.0 * terms["edge"] + 0.25 * terms["fused"]
    assert torch.allclose(total, expected)
    for name, value in terms.items():
        assert torch.allclose(criterion.last_terms[name], value)
    total.backward()
    assert all(m.grad is not None for m in out[:4])


def test_dice_bce_matches_smp_plus_bce():
    logits, y = torch.randn(2, 1, 8, 8), mask(2, 8, 8)
    expected = smp.losses.DiceLoss("binary")(logits, y) + F.binary_cross_entropy_with_logits(logits, y)
    assert torch.allclose(DiceBCELoss()(logits, y), expected)


def test_plain_tensor_gives_the_base_loss_only():
    logits, y = torch.randn(2, 1, 16, 16), mask()
    assert torch.allclose(ADSTLoss()(logits, y), DiceBCELoss()(logits, y))


def test_custom_base_loss_and_aux_scale():
    out, y = outputs(), mask()
    dice = smp.losses.DiceLoss("binary")
    criterion = ADSTLoss(base_loss=dice, aux_scale=0.0)
    assert torch.allclose(criterion(out, y), dice(out.masks, y))
    criterion.aux_scale = 1.0
    assert criterion(out, y) > dice(out.masks, y)


def test_fused_loss_replaces_the_base_loss_on_the_fused_term_only():
    out, y = outputs(), mask()
    criterion = ADSTLoss(fused_loss=torch.nn.BCEWithLogitsLoss())
    criterion(out, y)
    assert torch.allclose(criterion.last_terms["fused"], F.binary_cross_entropy_with_logits(out.fused, y))
    assert torch.allclose(criterion.last_terms["mask"], DiceBCELoss()(out.masks, y))  # the mask keeps Dice + BCE


def test_precomputed_targets_equal_on_the_fly():
    out, y = outputs(), mask()
    criterion = ADSTLoss()
    assert torch.allclose(criterion(out, y), criterion(out, y, targets=adst_targets(y)))


@pytest.mark.parametrize("y", [mask().bool(), (mask() * 255).to(torch.uint8), mask().long()])
def test_mask_encodings_agree(y):
    out = outputs()
    assert torch.allclose(ADSTLoss()(out, y), ADSTLoss()(out, mask()))


def test_bad_inputs_name_the_problem():
    out = outputs()
    criterion = ADSTLoss()
    with pytest.raises(ValueError, match="match the logits"):
        criterion(out, mask(2, 8, 8))
    with pytest.raises(ValueError, match="binary mask"):
        criterion(out, mask() * 0.5)
    with pytest.raises(ValueError, match="NaN"):
        criterion(out, mask() * float("nan"))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        criterion(out, mask()[:, 0])
    with pytest.raises(TypeError, match="outputs\\[0\\]"):
        criterion((out.masks, torch.zeros(2, 3)), mask())
    with pytest.raises(ValueError, match="1 channel"):
        criterion(torch.randn(2, 2, 16, 16), mask())
    with pytest.raises(ValueError, match="w_edge >= 0"):
        ADSTLoss(w_edge=-1)
    with pytest.raises(TypeError, match="callable"):
        ADSTLoss(base_loss="dice")
    with pytest.raises(TypeError, match="fused_loss to be callable"):
        ADSTLoss(fused_loss="bce")
