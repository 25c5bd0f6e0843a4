import pytest
import torch
from torch import nn

from adst_plugin.convglu import ConvGLU


@pytest.mark.parametrize(("cin", "hidden", "cout"), [(16, None, None), (16, 8, 4), (3, 12, 1), (2, None, 16)])
def test_shapes_including_out_not_equal_in(cin, hidden, cout):
    module = ConvGLU(cin, hidden, cout)
    y = module(torch.rand(2, cin, 11, 6))
    assert y.shape == (2, cout or cin, 11, 6)


def test_gate_closed_gives_constant_output():
    module = ConvGLU(4, 6, 3)
    with torch.no_grad():  # zero the gate half of fc1: the GLU product vanishes, only fc2's bias is left
        module.fc1.weight[6:].zero_()
        module.fc1.bias[6:].zero_()
    y = module(torch.randn(2, 4, 5, 5))
    assert torch.allclose(y, module.fc2.bias.view(1, 3, 1, 1).expand_as(y))


def test_even_kernel_is_rejected():
    with pytest.raises(ValueError, match="odd kernel_size"):
        ConvGLU(4, kernel_size=4)


def test_custom_activation_and_gradcheck():
    module = ConvGLU(3, 4, 2, act_layer=nn.Tanh).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))
