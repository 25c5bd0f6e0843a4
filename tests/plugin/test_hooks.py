import copy

import pytest
import torch
from torch import nn

from adst_plugin.hooks import Capture, FeatureTap, resolve_module, strip_captures


class TupleOut(nn.Module):
    def forward(self, x):
        return x * 2, x


def net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))


def test_captures_pops_and_removes():
    model = net()
    tap = FeatureTap(model[1])
    x = torch.rand(1, 1, 8, 8)
    model(x)
    feats = tap.pop()
    assert feats.shape == (1, 4, 8, 8) and feats.requires_grad
    assert tap.pop() is None
    tap.capture.active = False
    model(x)
    assert tap.pop() is None  # an inactive capture keeps nothing
    tap.remove()
    tap.remove()  # idempotent
    assert len(model[1]._forward_hooks) == 0 and not tap.attached
    tap.capture.active = True
    model(x)
    assert tap.pop() is None


def test_context_manager_removes_hooks_even_on_error():
    module = nn.Identity()
    with pytest.raises(RuntimeError), FeatureTap(module):
        assert len(module._forward_hooks) == 1
        raise RuntimeError("boom")
    assert len(module._forward_hooks) == 0


def test_removal_leaves_other_hooks_alone():
    model = net()
    calls = []
    other = model[1].register_forward_hook(lambda *_: calls.append(1))
    FeatureTap(model[1]).remove()
    model(torch.rand(1, 1, 4, 4))
    assert calls == [1]
    other.remove()


def test_deep_copies_have_their_own_capture_and_strip_removes_it():
    model = net()
    tap = FeatureTap(model[1])
    twin = copy.deepcopy(model)
    twin_hooks = list(twin[1]._forward_hooks.values())
    assert len(twin_hooks) == 1 and isinstance(twin_hooks[0], Capture) and twin_hooks[0] is not tap.capture
    twin(torch.rand(1, 1, 4, 4))
    assert tap.pop() is None  # the copy's forward fills the copy's capture
    assert strip_captures(twin) == 1 and len(twin[1]._forward_hooks) == 0
    assert tap.attached


def test_tuple_outputs_take_the_first_item_and_non_tensors_fail():
    with FeatureTap(mod := TupleOut()) as tap:
        mod(torch.ones(1, 1, 2, 2))
        assert torch.equal(tap.pop(), torch.full((1, 1, 2, 2), 2.0))
    with FeatureTap(lin := nn.Flatten()), pytest.raises(TypeError, match=r"\(B, C, H, W\) tensor"):
        lin(torch.ones(1, 1, 2, 2))


def test_resolve_module_lists_children():
    model = nn.Sequential()
    model.add_module("encoder", nn.Identity())
    assert resolve_module(model, "encoder") is model.encoder
    with pytest.raises(ValueError, match=r"no submodule 'decoder'.*\['encoder'\]"):
        resolve_module(model, "decoder")
