import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adst_plugin.saca import CRU, SACA, SRU, saca_channel_problems


@pytest.mark.parametrize("channels", [8, 16, 24, 32, 64])
def test_valid_widths_keep_shape(channels):
    x = torch.rand(2, channels, 9, 12)
    assert SACA(channels)(x).shape == x.shape


@pytest.mark.parametrize("channels", [4, 6, 10, 12, 14, 20])
def test_invalid_widths_raise_a_clear_error(channels):
    # The reference implementation crashes deep inside for these widths.
    assert saca_channel_problems(channels)
    with pytest.raises(ValueError, match=rf"channels={channels} does not fit.*Valid widths include \[8, 16"):
        SACA(channels)


def test_every_parameter_gets_a_gradient():
    module = SACA(16)
    module(torch.randn(2, 16, 8, 8)).square().mean().backward()
    missing = [name for name, p in module.named_parameters() if p.grad is None]
    assert missing == []
    assert module.sru.gn.weight.grad.abs().sum() > 0


def test_sru_is_identity_when_every_channel_is_informative():
    sru = SRU(8)
    with torch.no_grad():
        sru.gn.bias.fill_(100.0)  # sigmoid gate ~1 everywhere -> nothing redundant to cross-add
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(sru(x), x)


def test_sru_cross_adds_redundant_halves():
    # Nothing passes a gate of 1: both parts are the gate-weighted input, so each half is their cross sum.
    sru = SRU(8, gate_threshold=1.0)
    x = torch.randn(1, 8, 4, 4)
    gate = torch.sigmoid(sru.gn(x) * (sru.gn.weight / sru.gn.weight.sum()).view(1, -1, 1, 1))
    weighted = gate * x
    cross = weighted[:, :4] + weighted[:, 4:]
    expected = torch.cat([cross, cross], dim=1)
    assert torch.allclose(sru(x), expected, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), threshold=st.floats(0.0, 1.0), bias=st.floats(-3.0, 3.0))
def test_sru_matches_the_reference_gating_in_value_and_gradient(seed, threshold, bias):
    # The reference's formulation: informative gates replaced by ones / zeros, then multiplied by x.
    torch.manual_seed(seed)
    sru = SRU(8, gate_threshold=threshold)
    with torch.no_grad():
        sru.gn.bias.fill_(bias)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    gate = torch.sigmoid(sru.gn(x_ref) * (sru.gn.weight / sru.gn.weight.sum()).view(1, -1, 1, 1))
    informative = gate > threshold
    info = torch.where(informative, torch.ones_like(gate), gate) * x_ref
    redundant = torch.where(informative, torch.zeros_like(gate), gate) * x_ref
    expected = torch.cat([info[:, :4] + redundant[:, 4:], info[:, 4:] + redundant[:, :4]], dim=1)
    weights = torch.randn_like(expected)
    out = sru(x)
    torch.testing.assert_close(out, expected)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_cru_shapes():
    cru = CRU(16)
    x = torch.randn(3, 16, 7, 5)
    assert cru(x).shape == x.shape
    assert cru.gwc.groups == 2 and cru.gwc.in_channels == 4


def test_cru_softmax_fuse_weights_the_two_branches():
    # Zero every conv but the group-wise conv's bias b: the rich branch is b on its C channels, the cheap branch 0
    # on its C. The channel softmax of the pooled 2C features gives e^b / (C (e^b + 1)) to each rich channel, and
    # the two halves are summed: b e^b / (C (e^b + 1)) everywhere (a plain sum would give b).
    channels, b = 16, 2.0
    cru = CRU(channels)
    with torch.no_grad():
        for conv in (cru.squeeze_up, cru.squeeze_low, cru.gwc, cru.pwc_up, cru.pwc_low):
            conv.weight.zero_()
        cru.gwc.bias.fill_(b)
    out = cru(torch.randn(2, channels, 5, 6))
    expected = b * math.exp(b) / (channels * (math.exp(b) + 1))
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-6)


def test_gradcheck():
    torch.manual_seed(0)
    module = SACA(8).double()
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), atol=1e-5)
