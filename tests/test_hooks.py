import pytest
import torch
from torch import nn

from adst_plugin.hooks import FeatureTap, resolve_module


class TupleOut(nn.Module):
    def forward(self, x):
        return x * 2, x


def test_captures_pops_and_removes():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
    tap = FeatureTap(net[1])
    x = torch.rand(1, 1, 8, 8)
    net(x)
    feats = tap.pop()
    assert feats.shape == (1, 4, 8, 8) and feats.requires_grad
    assert tap.pop() is None
    tap.remove()
    tap.remove()  # idempotent
    assert len(net[1]._forward_hooks) == 0
    net(x)
    assert tap.output is None


def test_context_manager_removes_hooks_even_on_error():
    net = nn.Identity()
    with pytest.raises(RuntimeError), FeatureTap(net):
        assert len(net._forward_hooks) == 1
        raise RuntimeError("boom")
    assert len(net._forward_hooks) == 0


def test_tuple_outputs_take_the_first_item_and_non_tensors_fail():
    with FeatureTap(mod := TupleOut()) as tap:
        mod(torch.ones(1, 1, 2, 2))
        assert torch.equal(tap.pop(), torch.full((1, 1, 2, 2), 2.0))
    with FeatureTap(lin := nn.Flatten()), pytest.raises(TypeError, match=r"\(B, C, H, W\) tensor"):
        lin(torch.ones(1, 1, 2, 2))


def test_resolve_module_lists_children():
    net = nn.Sequential()
    net.add_module("encoder", nn.Identity())
    assert resolve_module(net, "encoder") is net.encoder
    with pytest.raises(ValueError, match=r"no submodule 'decoder'.*\['encoder'\]"):
        resolve_module(net, "decoder")
