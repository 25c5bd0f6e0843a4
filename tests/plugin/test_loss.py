import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from conftest import tiny_unet

from adst_examples.benchmarks.scipy_reference import reference_targets
from adst_plugin import ADSTLoss, DiceBCELoss, wrap_with_adst
from adst_plugin.targets import adst_targets


def mask(b=2, h=32, w=32):
    m = torch.zeros(b, 1, h, w)
    m[:, :, 8:22, 6:18] = 1
    m[-1, :, 25:28, 25:28] = 1
    return m


def wrapped(preset="adst", seed=0, **overrides):
    torch.manual_seed(seed)
    return wrap_with_adst(tiny_unet(), preset, **overrides)


def images(b=2, h=32, w=32, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def expected_terms(criterion, logits, maps, y):
    # Written out from the definitions, on SciPy's exact targets (examples/benchmarks/scipy_reference.py).
    c = criterion.config
    core, border = (torch.from_numpy(t).float() for t in reference_targets(y.numpy().astype(bool)))
    band = ((border - c.thresh_min) / (c.thresh_max - c.thresh_min)).clamp(0, 1)
    if c.main_target == "sdf":
        sdf = torch.where(y.bool(), 1 - band, band - 1)  # +d/D inside, -d/D outside, clipped to [-1, 1]
        terms = {"main": (torch.tanh(maps.main) - sdf).abs().mean()}
    else:
        terms = {"main": F.binary_cross_entropy_with_logits(maps.main, core)}
    if c.fused_role == "mask":
        terms["edge"] = F.binary_cross_entropy_with_logits(maps.edge, border)
        terms["fused"] = DiceBCELoss()(maps.fused, y)
    else:
        terms["threshold"] = (torch.sigmoid(maps.fused) - border).abs()[band > 0].mean()
        margin = 50.0 * (torch.sigmoid(logits) - torch.sigmoid(maps.fused))
        terms["binary"] = F.binary_cross_entropy_with_logits(margin, y) / 50.0
        terms["boundary"] = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * band).sum() / band.sum()
    return terms


@pytest.mark.parametrize("preset", ["adst", "paper"])
def test_total_is_the_weighted_sum_of_the_terms(preset):
    model = wrapped(preset)
    weights = {"w_mask": 0.5, "w_main": 0.25}
    weights.update({"w_edge": 2.0, "w_fused": 0.75} if preset == "paper" else {"w_threshold": 3.0, "w_boundary": 1.5})
    criterion = ADSTLoss(model, **weights)
    y = mask()
    logits = model(images())
    maps = model._pending
    total = criterion(logits, y)
    terms = expected_terms(criterion, logits, maps, y)
    c = criterion.config
    expected = c.w_mask * DiceBCELoss()(logits, y)
    for name, value in terms.items():
        assert torch.allclose(criterion.last_terms[name], value, atol=1e-5), name
        expected = expected + getattr(c, f"w_{name}") * value
    assert torch.allclose(total, expected, atol=1e-5)
    assert set(criterion.last_terms) == {"mask", "total", *terms}


def test_eval_mode_and_no_model_give_the_base_loss_only():
    model = wrapped()
    criterion = ADSTLoss(model)
    y = mask()
    model.eval()
    logits = model(images())
    assert torch.allclose(criterion(logits, y), DiceBCELoss()(logits, y))
    assert set(criterion.last_terms) == {"mask", "total"}
    assert torch.allclose(ADSTLoss()(logits, y), DiceBCELoss()(logits, y))


def test_training_loss_without_a_forward_fails_clearly():
    model = wrapped()
    criterion = ADSTLoss(model)
    logits = model(images())
    criterion(logits, mask())
    with pytest.raises(RuntimeError, match="ran no training forward"):
        criterion(logits, mask())  # the maps were handed over once


def test_custom_base_loss_aux_scale_and_switching_terms_off():
    model = wrapped()
    dice = smp.losses.DiceLoss("binary")
    criterion = ADSTLoss(model, dice, aux_scale=0.0)
    y = mask()
    logits = model(images())
    assert torch.allclose(criterion(logits, y), dice(logits, y))
    criterion.aux_scale = 1.0
    logits = model(images())
    assert criterion(logits, y) > dice(logits, y)
    assert "boundary" not in criterion.last_terms  # off in the adst preset
    with_boundary = ADSTLoss(model, w_boundary=1.0)
    with_boundary(model(images()), y)
    assert "boundary" in with_boundary.last_terms
    assert model.config.w_boundary == 0.0  # the override changes the loss's copy only


def test_fused_loss_replaces_the_base_loss_on_the_paper_fused_term_only():
    model = wrapped("paper")
    criterion = ADSTLoss(model, fused_loss=torch.nn.BCEWithLogitsLoss())
    y = mask()
    logits = model(images())
    fused = model._pending.fused
    criterion(logits, y)
    assert torch.allclose(criterion.last_terms["fused"], F.binary_cross_entropy_with_logits(fused, y))
    assert torch.allclose(criterion.last_terms["mask"], DiceBCELoss()(logits, y))


def test_precomputed_targets_equal_on_the_fly():
    y = mask()
    losses = []
    for targets in (None, adst_targets(y)):
        model = wrapped()
        losses.append(ADSTLoss(model)(model(images()), y, targets=targets))
    assert torch.allclose(losses[0], losses[1])


@pytest.mark.parametrize("y", [mask().bool(), (mask() * 255).to(torch.uint8), mask().long()])
def test_mask_encodings_agree(y):
    losses = []
    for target in (y, mask()):
        model = wrapped()
        losses.append(ADSTLoss(model)(model(images()), target))
    assert torch.allclose(losses[0], losses[1])


def test_the_loss_finds_the_wrapper_behind_ddp_style_and_compile_wrappers():
    model = wrapped()

    class Holder(torch.nn.Module):  # DistributedDataParallel keeps the wrapper in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert ADSTLoss(Holder(model)).model is model
    assert ADSTLoss(torch.compile(model, backend="eager")).model is model
    with pytest.raises(TypeError, match="wrap_with_adst"):
        ADSTLoss(tiny_unet())


def test_bad_inputs_name_the_problem():
    model = wrapped()
    criterion = ADSTLoss(model)
    logits = model(images())
    with pytest.raises(ValueError, match="match the logits"):
        criterion(logits, mask(2, 16, 16))
    with pytest.raises(ValueError, match="binary mask"):
        criterion(logits, mask() * 0.5)
    with pytest.raises(ValueError, match="NaN"):
        criterion(logits, mask() * float("nan"))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        criterion(logits, mask()[:, 0])
    with pytest.raises(ValueError, match="1 channel"):
        criterion(torch.randn(2, 2, 32, 32), mask())
    with pytest.raises(ValueError, match=r"maps .* do not match the logits"):
        criterion(model(images())[:1], mask(1))  # each failed call above dropped its forward's maps
    with pytest.raises(ValueError, match="w_edge >= 0"):
        ADSTLoss(model, w_edge=-1)
    with pytest.raises(ValueError, match=r"w_fused=1\.0 needs fused_role=.mask."):
        ADSTLoss(model, w_fused=1.0)
    with pytest.raises(TypeError, match="unknown option"):
        ADSTLoss(model, feature_grad=0.0)  # a head option: set it on wrap_with_adst
    with pytest.raises(TypeError, match="callable"):
        ADSTLoss(model, base_loss="dice")
    with pytest.raises(TypeError, match="fused_loss to be callable"):
        ADSTLoss(model, fused_loss="bce")


def test_targets_meet_the_logits_on_their_device_whether_built_or_given():
    # Masks from a CPU DataLoader with logits on an accelerator: the targets, built from the mask or given, and the
    # mask itself are moved to the logits' device. The meta device stands in for the accelerator (a CPU tensor
    # that reached the terms would fail to meet it), as this check must run without one.
    model = wrapped()
    criterion = ADSTLoss(model)
    model.to("meta")
    y = mask()
    for targets in (None, adst_targets(y)):
        loss = criterion(model(torch.empty(2, 3, 32, 32, device="meta")), y, targets)
        assert loss.device.type == "meta"
        assert set(criterion.last_terms) == {"mask", "main", "threshold", "binary", "total"}
        assert all(value.device.type == "meta" for value in criterion.last_terms.values())
