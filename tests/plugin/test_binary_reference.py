"""Binary mode, pinned: ``ADSTLoss``'s value, each term and the gradients (on the logits, the head's maps and every
parameter) of the default and ``paper`` presets equal an independent computation: the documented formulas
(docs/design.md, "The loss terms") on the exact SciPy targets, with smp's Dice and torch's BCE for the mask loss.
The multiclass binarisation must leave this path alone."""

from __future__ import annotations

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from conftest import tiny_unet

from adst_examples.benchmarks.scipy_reference import reference_targets
from adst_plugin import ADSTLoss, wrap_with_adst
from adst_plugin.presets import LOSS_WEIGHTS

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZE = 48


def _mask() -> torch.Tensor:
    """(2, 1, 48, 48) {0, 1}: a disc; a disc and a block cut by the frame (image 1)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - 20) ** 2 + (xx - 18) ** 2 <= 100
    mask = np.stack([disc, disc | ((yy >= 34) & (xx < 20))])[:, None]
    return torch.from_numpy(mask.astype(np.float32))


def _mask_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return smp.losses.DiceLoss("binary", from_logits=True)(logits, y) + F.binary_cross_entropy_with_logits(logits, y)


def _reference_terms(config, logits, maps, y) -> dict[str, torch.Tensor]:
    """The binary terms from their formulas, keyed by the names ``ADSTLoss.last_terms`` gives them."""
    core, border = (torch.from_numpy(t).float() for t in reference_targets(y.bool().numpy()))
    lo, hi = config.thresh_min, config.thresh_max
    band = torch.where(border >= hi, 1.0, ((border - lo) / (hi - lo)).clamp(0, 1))
    main_name = config.term_names()[LOSS_WEIGHTS[1]]  # the main map's term, named after what it regresses
    if config.main_target == "sdf":
        depth = 1 - band  # d / D: 0 on the boundary, 1 from depth D on
        terms = {main_name: (torch.tanh(maps.main) - torch.where(y > 0, depth, -depth)).abs().mean()}
    else:
        terms = {main_name: F.binary_cross_entropy_with_logits(maps.main, core)}
    if config.fused_role == "threshold":  # the default: T on the band, B = sigmoid(k (P - sg[T])) against the mask
        on_band = (band > 0).float()
        terms["threshold"] = ((torch.sigmoid(maps.fused) - border).abs() * on_band).sum() / on_band.sum()
        k = config.db_steepness
        b = k * (torch.sigmoid(logits) - torch.sigmoid(maps.fused).detach())
        terms["binary"] = F.binary_cross_entropy_with_logits(b, y) / k
    else:  # paper: the Laplacian edge map against the border map, the fused map as a second mask
        terms["edge"] = F.binary_cross_entropy_with_logits(maps.edge, border)
        terms["fused"] = _mask_loss(maps.fused, y)
    return terms


@pytest.mark.parametrize("preset", ["adst", "paper"])
def test_binary_loss_terms_and_gradients_equal_the_formulas(preset):
    torch.manual_seed(0)
    model = wrap_with_adst(tiny_unet(), preset=preset)
    criterion = ADSTLoss(model)
    y = _mask()
    logits = model(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
    maps = model._pending  # the maps the loss is about to take
    total = criterion(logits, y)
    config = criterion.config
    terms = _reference_terms(config, logits, maps, y)
    expected = config.w_mask * _mask_loss(logits, y)
    torch.testing.assert_close(criterion.last_terms["mask"], (expected / config.w_mask).detach())
    weights = {name: getattr(config, weight) for weight, name in config.term_names().items()}
    assert set(criterion.last_terms) == {"mask", *terms, "total"}
    for name, value in terms.items():
        torch.testing.assert_close(criterion.last_terms[name], value.detach(), rtol=1e-6, atol=1e-7, msg=name)
        expected = expected + weights[name] * value
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-7)
    # Gradients on the same graph: the logits, each map, every parameter the two totals reach.
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = [t for t in (logits, maps.main, maps.edge, maps.fused, *params) if t.requires_grad]
    got = torch.autograd.grad(total, inputs, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(expected, inputs, allow_unused=True)
    assert sum(g is not None for g in got) > 4  # the terms reach the model, not only the maps
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)  # float32 sums taken in another order
