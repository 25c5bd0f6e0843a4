"""The ADST auxiliary head: main threshold map, edge threshold map and their fusion.

::

    features --conv-BN-ReLU-SACA-BN-ReLU-conv--> main   (core localisation, at the features' stride,
                                                          then resized to the mask size)
    mask logits --Laplacian high-pass----------> edge   (no parameters)
    [main, edge] --conv-BN-ReLU-ConvGLU-BN-ReLU-conv--> fused     (fusion="convglu")
                 or k * (sigmoid(main) - sigmoid(edge))           (fusion="db", DB binarization logits)

All three outputs are logits of shape (B, 1, H, W), H, W being the mask logits' size.

``head_stride`` s trades resolution for speed without losing the edge detail: the main branch reads the
features average-pooled to at most (H/s, W/s), and the ConvGLU fusion runs on space-to-depth
(``pixel_unshuffle``) copies of the full-resolution main and edge maps, predicting s*s sub-pixels that
``pixel_shuffle`` puts back at full resolution (sub-pixel convolution). s = 1 is the paper's layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import constants as C
from .convglu import ConvGLU
from .laplacian import LaplacianEdge
from .saca import SACA

__all__ = ["FUSIONS", "ADSTHead", "DBFusion", "FusionMap", "HeadMaps", "MainThresholdMap"]

#: Fusion variants of :class:`ADSTHead`.
FUSIONS = ("convglu", "db")


class HeadMaps(NamedTuple):
    """The head's three logit maps, each (B, 1, H, W)."""

    main: Tensor
    edge: Tensor
    fused: Tensor


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class MainThresholdMap(nn.Sequential):
    """conv(C -> h) -> BN -> ReLU -> SACA -> BN -> ReLU -> conv(h -> 1).

    Shape:
        (B, in_channels, h, w) -> (B, 1, h, w)
    """

    def __init__(self, in_channels: int, hidden_channels: int = C.HIDDEN_CHANNELS):
        saca = SACA(hidden_channels)  # validates hidden_channels first, with the list of valid widths
        super().__init__(
            *_conv_bn_relu(in_channels, hidden_channels, 3),
            saca,
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, 1, 1),
        )


class FusionMap(nn.Module):
    """concat(main, edge) -> conv -> BN -> ReLU -> ConvGLU -> BN -> ReLU -> conv(-> 1), at 1/stride.

    The input is folded into ``stride**2`` channels per map (``pixel_unshuffle``, lossless) and the output
    unfolded back (``pixel_shuffle``), so every full-resolution pixel gets its own logit.

    Shape:
        (B, 2, H, W) -> (B, 1, H, W)
    """

    def __init__(self, hidden_channels: int = C.HIDDEN_CHANNELS, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.body = nn.Sequential(
            *_conv_bn_relu(2 * stride**2, hidden_channels, 3),
            ConvGLU(hidden_channels),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, stride**2, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        if s == 1:
            return self.body(x)
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % s, (-width) % s
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        out = F.pixel_shuffle(self.body(F.pixel_unshuffle(x, s)), s)
        return out[..., :height, :width]


class DBFusion(nn.Module):
    """DB-style differentiable binarization: logits ``k (sigmoid(main) - sigmoid(edge))``.

    ``sigmoid`` of the output is DBNet's ``1 / (1 + exp(-k (P - T)))`` with P = sigmoid(main),
    T = sigmoid(edge). No parameters.

    Shape:
        (B, 2, H, W) -> (B, 1, H, W)
    """

    def __init__(self, steepness: float = C.DB_STEEPNESS):
        super().__init__()
        self.steepness = steepness

    def forward(self, x: Tensor) -> Tensor:
        main, edge = x.float().chunk(2, dim=1)
        return (self.steepness * (torch.sigmoid(main) - torch.sigmoid(edge))).to(x.dtype)


class ADSTHead(nn.Module):
    """Main, edge and fused threshold maps from tapped features and the mask logits.

    Args:
        in_channels: channels of the tapped features (1 when the head reads the mask logits).
        hidden_channels: width of the main and fusion branches (checked against SACA's constraints).
        fusion: ``"convglu"`` (paper) or ``"db"`` (DB binarization of main vs edge, no parameters).
        db_steepness: k of the DB binarization.
        head_stride: the main branch runs at <= 1/head_stride of the mask size and the fusion on
            head_stride x head_stride sub-pixel blocks (1 = paper, full resolution).

    Shape:
        features (B, in_channels, h, w), mask_logits (B, 1, H, W) -> three maps (B, 1, H, W)
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = C.HIDDEN_CHANNELS,
        fusion: str = "convglu",
        db_steepness: float = C.DB_STEEPNESS,
        head_stride: int = C.HEAD_STRIDE,
    ):
        super().__init__()
        if not isinstance(head_stride, int) or head_stride < 1:
            raise ValueError(f"ADSTHead: expected head_stride to be an int >= 1, got {head_stride!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"ADSTHead: unknown fusion {fusion!r}; valid options are {FUSIONS}")
        if in_channels < 1:
            raise ValueError(f"ADSTHead: expected in_channels >= 1, got {in_channels}")
        self.main = MainThresholdMap(in_channels, hidden_channels)
        self.edge = LaplacianEdge()
        self.head_stride = head_stride
        self.fusion = FusionMap(hidden_channels, head_stride) if fusion == "convglu" else DBFusion(db_steepness)

    def forward(self, features: Tensor, mask_logits: Tensor) -> HeadMaps:
        s = self.head_stride
        low_res = (-(-mask_logits.shape[-2] // s), -(-mask_logits.shape[-1] // s))
        if features.shape[-2] > low_res[0] or features.shape[-1] > low_res[1]:
            features = F.adaptive_avg_pool2d(features, low_res)
        main = self.main(features)
        if main.shape[-2:] != mask_logits.shape[-2:]:
            main = F.interpolate(main, size=mask_logits.shape[-2:], mode="bilinear", align_corners=False)
        edge = self.edge(mask_logits)
        fused = self.fusion(torch.cat([main, edge.to(main.dtype)], dim=1))
        return HeadMaps(main, edge, fused)
