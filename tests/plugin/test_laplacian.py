import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adst_plugin.laplacian import (
    LaplacianEdge,
    binomial_kernel1d,
    binomial_kernel2d,
    edge_map,
    laplacian_pyramid,
    pyr_down,
    pyr_up,
)


def test_kernel_values():
    k = binomial_kernel2d(dtype=torch.float64)
    row = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
    assert k.shape == (5, 5)
    assert torch.equal(k * 256, torch.outer(row, row))
    assert k.sum().item() == pytest.approx(1.0)
    taps = binomial_kernel1d(dtype=torch.float64)
    assert torch.equal(torch.outer(taps, taps), k)


def test_blur_matches_a_plain_5x5_convolution():
    # Independent check of the shifted-add blur and of expand's zero-insertion against conv2d with the 2-D kernel.
    x = torch.rand(2, 3, 21, 18, dtype=torch.float64)
    k = binomial_kernel2d(dtype=torch.float64).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=3)
    assert torch.allclose(pyr_down(x), blurred[..., ::2, ::2], atol=1e-12)
    low = pyr_down(x)
    up = torch.zeros(2, 3, 2 * low.shape[-2], 2 * low.shape[-1], dtype=torch.float64)
    up[..., ::2, ::2] = low
    expanded = F.conv2d(F.pad(up, (2, 2, 2, 2), mode="reflect"), 4 * k, groups=3)[..., :21, :18]
    assert torch.allclose(pyr_up(low, (21, 18)), expanded, atol=1e-12)


@pytest.mark.parametrize("size", [(250, 250), (255, 255), (257, 257), (33, 40), (1, 1), (2, 3), (3, 7)])
def test_edge_map_keeps_odd_and_non_square_sizes(size):
    x = torch.rand(2, 3, *size)
    assert edge_map(x).shape == x.shape
    assert pyr_down(x).shape[-2:] == ((size[0] + 1) // 2, (size[1] + 1) // 2)


@given(h=st.integers(3, 40), w=st.integers(3, 40), c=st.floats(-5, 5))
@settings(max_examples=30, deadline=None)
def test_constant_input_has_no_edges(h, w, c):
    x = torch.full((1, 1, h, w), c, dtype=torch.float64)
    assert torch.allclose(edge_map(x), torch.zeros_like(x), atol=1e-12)


def test_linear_ramp_is_not_an_edge_in_the_interior():
    # The binomial blur and the interpolating expand both reproduce linear functions away from the frame.
    ramp = torch.arange(32.0, dtype=torch.float64)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    x = (0.3 * yy - 0.7 * xx)[None, None]
    assert edge_map(x)[..., 4:-4, 4:-4].abs().max() < 1e-10


def test_step_edge_response_peaks_at_the_step():
    x = torch.zeros(1, 1, 32, 32)
    x[..., :, 16:] = 1.0
    response = edge_map(x).abs()[0, 0, 16]
    assert response.argmax().item() in (15, 16)
    assert response[:10].max() < 1e-6 and response[22:].max() < 1e-6


def test_pyramid_reconstructs_input():
    x = torch.rand(2, 1, 37, 50, dtype=torch.float64)
    bands = laplacian_pyramid(x, levels=3)
    assert [b.shape[-2:] for b in bands] == [(37, 50), (19, 25), (10, 13), (5, 7)]
    recon = bands[-1]
    for band in reversed(bands[:-1]):
        recon = band + pyr_up(recon, tuple(band.shape[-2:]))
    assert torch.allclose(recon, x, atol=1e-12)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        edge_map(torch.rand(8, 8))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        edge_map([[1.0]])
    with pytest.raises(ValueError, match="levels >= 1"):
        laplacian_pyramid(torch.rand(1, 1, 8, 8), levels=0)
    with pytest.raises(ValueError, match="ceil"):
        pyr_up(torch.rand(1, 1, 4, 4), (12, 8))


def test_gradcheck():
    x = torch.rand(1, 2, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(edge_map, (x,))


def test_module_matches_function_and_has_no_state(device):
    module = LaplacianEdge().to(device)
    x = torch.rand(2, 1, 31, 20, device=device)
    assert torch.equal(module(x), edge_map(x))
    assert list(module.parameters()) == [] and module.state_dict() == {}
    assert module.taps.device.type == device.type


def test_module_follows_input_dtype():
    module = LaplacianEdge()
    assert module(torch.rand(1, 1, 16, 16, dtype=torch.float64)).dtype == torch.float64
    assert module(torch.rand(1, 1, 16, 16).bfloat16()).dtype == torch.bfloat16
