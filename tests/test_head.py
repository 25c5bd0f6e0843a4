import pytest
import torch

from adst_plugin.head import ADSTHead, DBFusion, FusionMap


@pytest.mark.parametrize("head_stride", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("feature_size", "mask_size"), [((64, 48), (64, 48)), ((16, 12), (64, 48)), ((33, 47), (33, 47))]
)
def test_maps_come_at_the_mask_size(head_stride, feature_size, mask_size):
    head = ADSTHead(24, head_stride=head_stride)
    maps = head(torch.rand(2, 24, *feature_size), torch.randn(2, 1, *mask_size))
    for m in maps:
        assert m.shape == (2, 1, *mask_size)


def test_every_parameter_gets_a_gradient_and_reaches_inputs():
    head = ADSTHead(8)
    features = torch.rand(2, 8, 32, 32, requires_grad=True)
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    sum(m.square().mean() for m in head(features, logits)).backward()
    assert [n for n, p in head.named_parameters() if p.grad is None] == []
    assert features.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_fusion_stride_one_is_the_plain_layout():
    fusion = FusionMap(16, stride=1)
    assert fusion.body[0].in_channels == 2 and fusion.body[-1].out_channels == 1


def test_subpixel_fusion_keeps_full_resolution_detail():
    # Each output pixel depends on its own sub-pixel input: perturbing one input pixel changes its block only.
    torch.manual_seed(0)
    fusion = FusionMap(8, stride=2).eval()
    x = torch.randn(1, 2, 16, 16)
    y0 = fusion(x)
    x2 = x.clone()
    x2[0, 1, 7, 9] += 5.0
    diff = (fusion(x2) - y0).abs()[0, 0]
    assert diff[7, 9] > 0
    assert diff[:2].max() == 0 and diff[12:].max() == 0  # beyond the two 3x3 convs' receptive field


def test_db_fusion_is_db_binarization():
    main, edge = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
    fused = DBFusion(50.0)(torch.cat([main, edge], 1))
    expected = 1 / (1 + torch.exp(-50 * (torch.sigmoid(main) - torch.sigmoid(edge))))
    assert torch.allclose(torch.sigmoid(fused), expected, atol=1e-6)
    head = ADSTHead(4, fusion="db")
    assert not any(n.startswith("fusion") for n, _ in head.named_parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown fusion 'sum'"):
        ADSTHead(8, fusion="sum")
    with pytest.raises(ValueError, match="head_stride"):
        ADSTHead(8, head_stride=0)
    with pytest.raises(ValueError, match="channels=12 does not fit"):
        ADSTHead(8, hidden_channels=12)
