"""ConvGLU of the fusion enhancement (TransNeXt, Shi, CVPR 2024; used by AdSTNet's fusion map).

A gated MLP made of 1x1 convolutions: one half of the expanded features goes through a 3x3
depth-wise convolution and an activation and gates the other half. Unlike the reference's
``Linear`` + ``view`` version, it works on (B, C, H, W) directly, so ``out_channels`` may differ
from ``in_channels``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvGLU"]


class ConvGLU(nn.Module):
    """Convolutional gated linear unit.

    Args:
        in_channels: input channels.
        hidden_channels: width of the gated branch (default: ``in_channels``).
        out_channels: output channels (default: ``in_channels``).
        act_layer: activation applied to the depth-wise branch before gating.
        kernel_size: depth-wise kernel (odd).

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W)

    Example:
        >>> ConvGLU(16, out_channels=4)(torch.rand(2, 16, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int | None = None,
        out_channels: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        kernel_size: int = 3,
    ):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"ConvGLU: expected an odd kernel_size, got {kernel_size}")
        hidden_channels = hidden_channels or in_channels
        out_channels = out_channels or in_channels
        self.fc1 = nn.Conv2d(in_channels, 2 * hidden_channels, 1)
        self.dwconv = nn.Conv2d(
            hidden_channels, hidden_channels, kernel_size, padding=kernel_size // 2, groups=hidden_channels
        )
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.fc1(x).chunk(2, dim=1)
        return self.fc2(self.act(self.dwconv(x)) * gate)
