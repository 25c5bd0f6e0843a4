import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adst_plugin.head import ADSTHead, FusionMap, _pool_to


@pytest.mark.parametrize("head_stride", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("feature_size", "mask_size"), [((64, 48), (64, 48)), ((16, 12), (64, 48)), ((33, 47), (33, 47))]
)
def test_maps_come_at_the_mask_size(head_stride, feature_size, mask_size):
    head = ADSTHead(24, head_stride=head_stride)
    maps = head(torch.rand(2, 24, *feature_size), torch.randn(2, 1, *mask_size))
    for m in maps:
        assert m.shape == (2, 1, *mask_size)


@pytest.mark.parametrize(("edge_input", "logits_get_grad"), [("probs", False), ("logits", True)])
def test_every_parameter_trains_and_only_the_paper_edge_reaches_the_logits(edge_input, logits_get_grad):
    head = ADSTHead(8, edge_input=edge_input)
    features = torch.rand(2, 8, 32, 32, requires_grad=True)
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    sum(m.square().mean() for m in head(features, logits)).backward()
    assert [n for n, p in head.named_parameters() if p.grad is None] == []
    assert features.grad.abs().sum() > 0
    assert (logits.grad is not None and bool(logits.grad.abs().sum() > 0)) is logits_get_grad


def test_probs_edge_is_the_laplacian_of_the_probabilities():
    head = ADSTHead(8)
    logits = torch.randn(1, 1, 20, 20)
    maps = head(torch.rand(1, 8, 20, 20), logits)
    assert torch.allclose(maps.edge, head.edge(torch.sigmoid(logits)))


def _block_roughness(x: torch.Tensor) -> float:
    # Differences inside 2x2 blocks relative to those between blocks: ~1 for independent sub-pixels
    # (a sub-pixel checkerboard), ~0.5 for a bilinear x2 resize of a smooth map.
    inside = (x[..., 0::2, :] - x[..., 1::2, :]).abs().mean()
    between = (x[..., 1:-1:2, :] - x[..., 2::2, :]).abs().mean()
    return float(inside / between)


def test_fused_map_is_smooth_no_subpixel_checkerboard():
    torch.manual_seed(0)
    fusion = FusionMap(16, stride=2).eval()
    main, edge = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        fused = fusion(main, edge)
        assert fused.shape == (4, 1, 64, 64)
        assert _block_roughness(fused) < 0.75
        # Negative control: the old sub-pixel layout (pixel_shuffle of 4 independent channels) is rough.
        subpixel = F.pixel_shuffle(torch.randn(4, 4, 32, 32), 2)
        assert _block_roughness(subpixel) > 0.9


def test_fusion_sees_every_full_resolution_edge_pixel():
    torch.manual_seed(0)
    fusion = FusionMap(8, stride=2).eval()
    main, edge = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        base = fusion(main, edge)
        for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # each sub-pixel of a block matters
            bumped = edge.clone()
            bumped[0, 0, 6 + i, 6 + j] += 5.0
            assert (fusion(main, bumped) - base).abs().max() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown edge_input 'grad'"):
        ADSTHead(8, edge_input="grad")
    with pytest.raises(ValueError, match="head_stride"):
        ADSTHead(8, head_stride=0)
    with pytest.raises(ValueError, match="channels=12 does not fit"):
        ADSTHead(8, hidden_channels=12)
    with pytest.raises(ValueError, match="in_channels to be an int >= 1, got 0"):
        ADSTHead(0)
    with pytest.raises(TypeError, match=r"head_stride to be an int >= 1, got 2\.0"):
        ADSTHead(8, head_stride=2.0)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), out_h=st.integers(1, 12), out_w=st.integers(1, 12))
def test_feature_pooling_is_the_adaptive_average(h, w, out_h, out_w):
    # The head pools features with avg_pool2d when the factor is whole (cheaper backward on the CPU): same values
    # and gradient as adaptive_avg_pool2d, whole factor or not.
    out_h, out_w = min(out_h, h), min(out_w, w)
    x = torch.randn(2, 3, h, w, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    weights = torch.randn(2, 3, out_h, out_w)
    (_pool_to(x, (out_h, out_w)) * weights).sum().backward()
    (F.adaptive_avg_pool2d(x_ref, (out_h, out_w)) * weights).sum().backward()
    torch.testing.assert_close(_pool_to(x, (out_h, out_w)), F.adaptive_avg_pool2d(x_ref, (out_h, out_w)))
    torch.testing.assert_close(x.grad, x_ref.grad)
