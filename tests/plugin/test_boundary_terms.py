"""The boundary-aimed terms: signed-distance regression and the symmetric threshold target.

* ``signed_distance`` is checked against an independent SciPy EDT (one lesion at a time) and by a hypothesis
  property over random masks: its sign is the mask away from boundary pixels, |s| <= 1, 0 exactly on them;
* ``sdf_loss`` and the symmetric ``threshold_loss`` are minimised by their targets (Adam from noise);
* the binarisation against the symmetric target puts its zero-margin line on the edge: P = 0.5 ± eps is right
  just inside / outside, where the border map's target is 0.7 on both sides;
* the options flow through ``ADSTConfig`` and ``ADSTLoss`` (term names, gradients into the exported model).
"""

from __future__ import annotations

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from adst_examples.benchmarks.scipy_reference import reference_boundary, reference_targets
from adst_plugin import ADSTLoss, get_config, wrap_with_adst
from adst_plugin import functional as fn
from adst_plugin.constants import THRESH_MAX, THRESH_MIN
from adst_plugin.targets import adst_targets

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _disc(size: int, radius: float, centre: tuple[float, float]) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _scipy_signed_distance(mask: np.ndarray) -> np.ndarray:
    """Independent reference: the SciPy targets' per-lesion ``clip(1 - d / D, 0, 1)``, signed by the mask."""
    _, border = reference_targets(mask[None, None])
    depth = 1 - (border[0, 0] - THRESH_MIN) / (THRESH_MAX - THRESH_MIN)
    return np.where(mask, depth, -depth)


def _sdf(mask: np.ndarray) -> torch.Tensor:
    y = torch.from_numpy(mask.astype(np.float32))[None, None]
    _, border = adst_targets(y)
    return fn.signed_distance(border, y, THRESH_MIN, THRESH_MAX)


def test_signed_distance_matches_scipy_reference() -> None:
    mask = _disc(48, 12, (14, 14)) | _disc(48, 6, (34, 34))
    np.testing.assert_allclose(_sdf(mask)[0, 0].numpy(), _scipy_signed_distance(mask), atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(6, 24), st.floats(0.2, 0.8))
def test_signed_distance_sign_is_the_mask(seed: int, size: int, density: float) -> None:
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((size, size)) < density)
    s = _sdf(mask)[0, 0].numpy()
    boundary = reference_boundary(mask)
    assert np.all(np.abs(s) <= 1)
    assert np.all(s[boundary] == 0)
    assert np.all(s[mask & ~boundary] > 0) and np.all(s[~mask] < 0)
    np.testing.assert_allclose(s, _scipy_signed_distance(mask), atol=1e-5)


def _minimise(loss_fn, shape: tuple[int, ...], steps: int = 400) -> torch.Tensor:
    torch.manual_seed(0)
    x = (0.1 * torch.randn(shape)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)  # L1 terms oscillate at a fixed step size
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
        decay.step()
    return x.detach()


def test_sdf_loss_minimiser_is_the_signed_distance() -> None:
    s = _sdf(_disc(32, 10, (15.5, 15.5)))
    main = _minimise(lambda x: fn.sdf_loss(x, s), s.shape)
    inside = s.abs() < 0.99  # tanh cannot reach +-1 exactly
    assert (torch.tanh(main) - s)[inside].abs().max() < 0.02
    assert fn.sdf_loss(main, s) < fn.sdf_loss(torch.zeros_like(s), s)


def test_symmetric_threshold_minimiser_and_range() -> None:
    s = _sdf(_disc(32, 10, (15.5, 15.5)))
    target = fn.symmetric_threshold(s, THRESH_MIN, THRESH_MAX)
    assert target.min() >= THRESH_MIN - 1e-6 and target.max() <= THRESH_MAX + 1e-6
    weights = torch.ones_like(s)
    t = _minimise(lambda x: fn.threshold_loss(x, target, weights), s.shape)
    assert (torch.sigmoid(t) - target).abs().max() < 0.01


def test_symmetric_threshold_puts_the_zero_margin_on_the_edge() -> None:
    mask = _disc(32, 10, (15.5, 15.5))
    y = torch.from_numpy(mask.astype(np.float32))[None, None]
    s = _sdf(mask)
    outside_ring = torch.from_numpy(ndimage.binary_dilation(mask) & ~mask)[None, None]
    symmetric = fn.symmetric_threshold(s, THRESH_MIN, THRESH_MAX)
    _, border = adst_targets(y)
    # The border map demands more than 0.5 on the outside ring too: P in (0.5, 0.7) there is "right".
    assert torch.all(border[outside_ring] > 0.6)
    assert torch.all(symmetric[outside_ring] < 0.5)
    # A probability map at 0.55 everywhere on the outside ring (a one-pixel bleed at threshold 0.5) costs more
    # with the symmetric target than with the border map.
    probs = torch.where(y.bool(), torch.full_like(y, 0.99), torch.full_like(y, 0.01))
    probs[outside_ring] = 0.55
    logits = torch.logit(probs)

    def cost(threshold: torch.Tensor) -> float:
        return float(fn.binarization_loss(logits, torch.logit(threshold), y, 50.0))

    assert cost(symmetric) > 2 * cost(border)


@pytest.mark.parametrize(
    ("overrides", "terms"),
    [
        ({"main_target": "core"}, {"mask", "main", "threshold", "binary", "total"}),
        ({"threshold_target": "symmetric"}, {"mask", "main", "threshold", "binary", "total"}),
    ],
)
def test_options_flow_through_the_loss(overrides: dict, terms: set[str]) -> None:
    torch.manual_seed(0)
    model = wrap_with_adst(
        smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 16), classes=1),
        **overrides,
    )
    criterion = ADSTLoss(model)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 1, 32, 32)
    y[:, :, 8:20, 10:24] = 1
    loss = criterion(model(x), y)
    assert set(criterion.last_terms) == terms
    loss.backward()
    assert model.model.decoder.blocks[-1].conv1[0].weight.grad.abs().sum() > 0


def test_unknown_targets_are_rejected_with_the_valid_options() -> None:
    with pytest.raises(ValueError, match=r"main_target 'edt'.*\('core', 'sdf', 'sdf-clip'\)"):
        get_config(main_target="edt")
    with pytest.raises(ValueError, match=r"threshold_target 'flat'.*\('border', 'symmetric'\)"):
        get_config(threshold_target="flat")
