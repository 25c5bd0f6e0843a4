"""``main_target="sdf-clip"``: the signed distance clipped to ±SDF_CLIP, a minimum reached with finite logits.

* the clipped target is SciPy's signed distance clipped (an independent reference), and the loss is zero, with zero
  gradient, at ``tanh(main) = clip(s)``; the unclipped target keeps a gradient on every pixel beyond D however far
  the logits go, which is the pull the clip removes;
* ``clip=1`` is the default's term, value and gradient, bit for bit;
* the option flows through ``ADSTConfig`` and ``ADSTLoss`` and its term trains the features it reads.
"""

from __future__ import annotations

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adst_examples.benchmarks.scipy_reference import reference_targets
from adst_plugin import ADSTLoss, get_config, wrap_with_adst
from adst_plugin import functional as fn
from adst_plugin.constants import SDF_CLIP, THRESH_MAX, THRESH_MIN
from adst_plugin.targets import adst_targets

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _masks(draw_seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(draw_seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(0, 3)):
        cy, cx, r = [*rng.uniform(0, size, 2).tolist(), rng.uniform(2, size / 3)]
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    return mask


def _reference_sdf(mask: np.ndarray) -> np.ndarray:
    _, border = reference_targets(mask[None, None])
    depth = 1 - (border[0, 0] - THRESH_MIN) / (THRESH_MAX - THRESH_MIN)
    return np.where(mask, depth, -depth)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**20), size=st.sampled_from([16, 24, 33]))
def test_clipped_minimum_is_reached_with_finite_logits(seed, size):
    mask = _masks(seed, size)
    s = torch.from_numpy(_reference_sdf(mask)).double()[None, None]
    target = s.clamp(-SDF_CLIP, SDF_CLIP)
    main = torch.atanh(target)  # finite: |target| <= 0.9
    assert torch.isfinite(main).all() and main.abs().max() <= np.arctanh(SDF_CLIP) + 1e-9
    assert fn.sdf_loss(main, s, clip=SDF_CLIP).item() < 1e-6
    torch.testing.assert_close(fn.signed_distance(*_torch_targets(mask)), s.float(), atol=1e-5, rtol=0)  # SciPy's


def _torch_targets(mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    y = torch.from_numpy(mask).float()[None, None]
    _, border = adst_targets(y)
    return border, y, THRESH_MIN, THRESH_MAX


def test_unclipped_target_keeps_pulling_far_pixels_the_clipped_one_does_not():
    mask = _masks(3, 32)
    s = torch.from_numpy(_reference_sdf(mask)).float()[None, None]
    far = s.abs() >= 1
    assert far.any()
    for scale in (1.0, 3.0, 6.0):  # ever larger logits of the right sign beyond D
        main = torch.where(far, scale * s.sign(), torch.atanh(s.clamp(-SDF_CLIP, SDF_CLIP)))
        far_only = torch.where(far, 1.0, 0.0)
        unclipped = fn.sdf_loss(main, s, far_only).item()
        assert unclipped >= 1 - np.tanh(scale) - 1e-6 > 0  # tanh never reaches 1
        at_clip = torch.where(far, torch.atanh(torch.tensor(SDF_CLIP)) * s.sign(), main)
        assert fn.sdf_loss(at_clip, s, far_only, clip=SDF_CLIP).item() < 1e-6  # reached at 1.47


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_clip_one_is_the_default_term_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(2, 1, 12, 12, generator=g) * 2 - 1
    main = torch.randn(2, 1, 12, 12, generator=g)
    a, b = main.clone().requires_grad_(True), main.clone().requires_grad_(True)
    reference = (torch.tanh(a) - s).abs().mean()  # the documented formula, written out
    reference.backward()
    value = fn.sdf_loss(b, s)
    value.backward()
    assert torch.equal(value, reference) and torch.equal(a.grad, b.grad)


def test_sdf_clip_through_config_and_loss_trains_the_features():
    torch.manual_seed(0)
    model = wrap_with_adst(smp.Unet("resnet18", encoder_weights=None, classes=1), main_target="sdf-clip")
    assert model.config == get_config("adst", main_target="sdf-clip")
    criterion = ADSTLoss(model)
    model.train()
    x = torch.rand(2, 3, 64, 64)
    y = torch.zeros(2, 1, 64, 64)
    y[:, :, 20:40, 16:44] = 1
    logits = model(x)
    criterion(logits, y)
    main_term = criterion.last_terms["main"]
    # The logged term is the clipped one: recompute it from the head's maps and the targets.
    _, border = adst_targets(y)
    s = fn.signed_distance(border, y, THRESH_MIN, THRESH_MAX)
    model.train()
    maps = model.forward_adst(x).maps
    expected = fn.sdf_loss(maps.main, s, clip=SDF_CLIP)
    torch.testing.assert_close(main_term, expected.detach(), rtol=1e-5, atol=1e-6)
    decoder = [p for p in model.model.decoder.parameters() if p.requires_grad]
    model.zero_grad()
    expected.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder)
