"""ADSTLoss and the head with C > 1 classes: the terms against an independent computation, the head's channels and
probabilities, the unsupervised background channel, the boundary-aimed options, and ``ignore_index`` (predictions
on ignored pixels change no term and no gradient)."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from multiclass_cases import MODES, class_indices, images, mode_mask, multilabel_mask, smp_loss, tiny_model

from adst_plugin import ADSTLoss, DiceBCELoss, DiceCELoss, get_config, wrap_with_adst
from adst_plugin import functional as fn
from adst_plugin.head import HeadMaps
from adst_plugin.laplacian import edge_map
from adst_plugin.modes import check_labels
from adst_plugin.targets import adst_targets
from adst_plugin.terms import aux_terms

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _one_hot(index: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(index, classes).permute(0, 3, 1, 2).float()


def _expected_terms(mode: str, logits, maps, y, config) -> dict[str, torch.Tensor]:
    """The auxiliary terms written out by hand for C > 1: targets per target class, the model's own probability."""
    if mode == "multiclass":
        core, border = adst_targets(y, mode="multiclass", classes=3)
        target = _one_hot(y, 3)[:, 1:]
        probs, main, fused = torch.softmax(logits, 1)[:, 1:], maps.main[:, 1:], maps.fused[:, 1:]
    else:
        core, border = adst_targets(y, mode="multilabel")
        target, probs, main, fused = y, torch.sigmoid(logits), maps.main, maps.fused
    band = ((border - config.thresh_min) / (config.thresh_max - config.thresh_min)).clamp(0, 1)
    band[border >= config.thresh_max] = 1.0
    k = config.db_steepness
    depth = 1.0 - band  # d / D, 0 on the boundary pixels
    if config.main_target == "sdf":
        terms = {"main": (torch.tanh(main) - torch.where(target > 0, depth, -depth)).abs().mean()}
    else:
        terms = {"main": F.binary_cross_entropy_with_logits(main, core)}
    thresh = torch.sigmoid(fused)
    if mode == "multiclass":  # every class, the background at 1/2; the bar on the target's side of 1/2
        probs, target = torch.softmax(logits, 1), _one_hot(y, 3)
        thresh = torch.cat([torch.full_like(thresh[:, :1], 0.5), thresh], 1)
        thresh = torch.where(target > 0, thresh.clamp(min=0.5), thresh.clamp(max=0.5))
    terms |= {
        "threshold": (torch.sigmoid(fused) - border).abs()[band > 0].mean(),
        "binary": F.binary_cross_entropy_with_logits(k * (probs - thresh), target) / k,
    }
    if mode == "multiclass":
        weight = band.amax(1)
        ce = F.cross_entropy(logits, y, reduction="none")
    else:
        weight = band
        ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    terms["boundary"] = (ce * weight).sum() / weight.sum()
    return terms


@pytest.mark.parametrize("mode", MODES)
def test_total_is_the_weighted_sum_of_terms_computed_by_hand(mode):
    model = wrap_with_adst(tiny_model(3))
    criterion = ADSTLoss(model, mode=mode, w_boundary=0.5, w_threshold=3.0)
    y = mode_mask(mode)
    logits = model(images())
    maps = model._pending  # the maps the loss is about to take
    total = criterion(logits, y)
    expected_mask = (DiceCELoss() if mode == "multiclass" else DiceBCELoss(mode="multilabel"))(logits, y)
    torch.testing.assert_close(criterion.last_terms["mask"], expected_mask.detach())
    expected = expected_mask
    for name, value in _expected_terms(mode, logits, maps, y, criterion.config).items():
        torch.testing.assert_close(criterion.last_terms[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
        expected = expected + getattr(criterion.config, f"w_{name}") * value
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_head_maps_have_one_channel_per_class_and_read_the_models_probability(mode):
    model = wrap_with_adst(tiny_model(4), mode=mode)
    model.eval()
    with torch.no_grad():
        out = model.forward_adst(images())
    assert out.masks.shape == (2, 4, 32, 32) and all(m.shape == (2, 4, 32, 32) for m in out.maps)
    probs = torch.softmax(out.masks, 1) if mode == "multiclass" else torch.sigmoid(out.masks)
    torch.testing.assert_close(out.maps.edge, edge_map(probs))


def test_the_multiclass_background_channel_carries_no_target():
    model = wrap_with_adst(tiny_model(3))
    ADSTLoss(model, mode="multiclass")(model(images()), class_indices()).backward()
    for last in (model.head.main[-1], model.head.fusion.body[-1]):
        assert torch.equal(last.weight.grad[0], torch.zeros_like(last.weight.grad[0]))
        assert last.bias.grad[0] == 0 and bool(last.weight.grad[1:].ne(0).all())
    labels = wrap_with_adst(tiny_model(3))
    ADSTLoss(labels, mode="multilabel")(labels(images()), multilabel_mask()).backward()
    assert bool(labels.head.main[-1].bias.grad.ne(0).all())  # multilabel: every channel is a target class


@pytest.mark.parametrize("mode", MODES)
def test_boundary_aimed_options_are_per_class(mode):
    model = wrap_with_adst(tiny_model(3))
    criterion = ADSTLoss(model, mode=mode, main_target="sdf", threshold_target="symmetric")
    y = mode_mask(mode)
    logits = model(images())
    maps = model._pending  # the maps the loss is about to take
    criterion(logits, y).backward()
    assert set(criterion.last_terms) == {"mask", "main", "threshold", "binary", "total"}
    labels = check_labels(y, mode, 3, "test")
    _, border = adst_targets(labels.y, mode="multilabel")
    sdf = fn.signed_distance(border, labels.y.float(), 0.3, 0.7)
    main = maps.main[:, 1:] if mode == "multiclass" else maps.main
    torch.testing.assert_close(criterion.last_terms["main"], fn.sdf_loss(main, sdf).detach())
    for k in range(labels.y.shape[1]):  # each channel is the binary signed distance of its class
        _, border_k = adst_targets(labels.y[:, k : k + 1])
        torch.testing.assert_close(sdf[:, k : k + 1], fn.signed_distance(border_k, labels.y[:, k : k + 1], 0.3, 0.7))


def test_paper_preset_with_classes():
    model = wrap_with_adst(tiny_model(3), "paper")
    criterion = ADSTLoss(model, base_loss=smp_loss("multiclass"))
    logits = model(images())
    maps = model._pending  # the maps the loss is about to take
    criterion(logits, class_indices()).backward()
    assert model.head.in_channels == 3  # the paper's head reads the 3-channel logits
    _, border = adst_targets(class_indices(), mode="multiclass", classes=3)
    torch.testing.assert_close(criterion.last_terms["edge"], fn.edge_loss(maps.edge[:, 1:], border).detach())
    torch.testing.assert_close(criterion.last_terms["fused"], smp_loss("multiclass")(maps.fused, class_indices()))


# --------------------------------------------------------------------------------------------------------------
# ignore_index
# --------------------------------------------------------------------------------------------------------------

IGNORE = 255


def _ignored_case(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask with ignored pixels, and where they are as a (B, C, H, W) bool over the model's channels."""
    if mode == "multiclass":
        y = class_indices()
        y[:, 12:18, :] = IGNORE  # a band across both lesion classes
        return y, (y == IGNORE)[:, None].expand(-1, 3, -1, -1)
    if mode == "multilabel":
        y = multilabel_mask()
        y[:, 0, 12:18, :] = IGNORE  # only channel 0 is unlabelled there
        return y, y == IGNORE
    y = mode_mask("binary")
    y[:, :, 12:18, :] = IGNORE
    return y, y == IGNORE


CONFIGS = {
    "adst": get_config("adst", w_boundary=1.0),
    "adst-sdf-symmetric": get_config("adst", w_boundary=1.0, main_target="sdf", threshold_target="symmetric"),
    "paper": get_config("paper"),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("mode", [*MODES, "binary"])
def test_predictions_on_ignored_pixels_change_no_auxiliary_gradient(mode, config):
    c = CONFIGS[config]
    classes = 1 if mode == "binary" else 3
    y, ignored = _ignored_case(mode)
    labels = check_labels(y, mode, classes, "test", ignore_index=IGNORE)
    core, border = adst_targets(labels.y, mode="multilabel")
    base = smp.losses.DiceLoss(mode, from_logits=True, ignore_index=IGNORE)
    generator = torch.Generator().manual_seed(0)
    originals = [torch.randn(2, classes, 32, 32, generator=generator) for _ in range(4)]  # logits, main, edge, fused
    changed = [torch.where(ignored, 5 * torch.randn(x.shape, generator=generator), x) for x in originals]

    def run(values: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
        leaves = [v.clone().requires_grad_() for v in values]
        terms = aux_terms(
            c, HeadMaps(*leaves[1:]), leaves[0], labels.y.float(), core, border, fused_loss=base,
            fused_target=labels.base.float() if mode != "multiclass" else labels.base,
            mode=mode, valid=labels.valid, index=labels.index,
        )  # fmt: skip
        out = {}
        for name, (_, value) in terms.items():
            grads = torch.autograd.grad(value, leaves, allow_unused=True, retain_graph=True)
            zeros = [torch.zeros_like(v) if g is None else g for v, g in zip(values, grads, strict=True)]
            out[name] = (value.detach(), zeros)
        return out

    before, after = run(originals), run(changed)
    assert before.keys() == after.keys() and len(before) >= 3
    for name, (value, grads) in before.items():
        assert torch.equal(value, after[name][0]), name
        for i, (g, h) in enumerate(zip(grads, after[name][1], strict=True)):
            assert torch.equal(g, h), (name, i)
            assert not g[ignored].any(), (name, i)  # and an ignored pixel itself is never trained
    assert any(bool(g.ne(0).any()) for _, grads in before.values() for g in grads)  # not vacuous


def test_ignored_pixels_end_to_end():
    # Through the wrapper and the loss: each term averages over the labelled pixels only.
    y, ignored = _ignored_case("multiclass")
    model = wrap_with_adst(tiny_model(3), main_target="core")  # the core term's BCE is checked by hand
    criterion = ADSTLoss(model, base_loss=smp_loss("multiclass", ignore_index=IGNORE))
    logits = model(images())
    maps = model._pending
    criterion(logits, y)
    core, _ = adst_targets(y, mode="multiclass", classes=3, ignore_index=IGNORE)
    valid = ~ignored[:, 1:]
    bce = F.binary_cross_entropy_with_logits(maps.main[:, 1:], core, reduction="none")
    torch.testing.assert_close(criterion.last_terms["main"], bce[valid].mean().detach())
    assert criterion.ignore_index == IGNORE and criterion.target_kwargs["ignore_index"] == IGNORE
    with pytest.raises(ValueError, match=r"\[255\]"):  # the same mask without ignore_index is refused
        model = wrap_with_adst(tiny_model(3))
        ADSTLoss(model, base_loss=smp_loss("multiclass"))(model(images()), y)
