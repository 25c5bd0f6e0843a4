"""SACA attention of the main threshold map: SRU followed by CRU.

AdSTNet (Chen et al., Appl. Sci. 2025) builds its core-localisation attention from the two units of
SCConv (Li et al., "SCConv: Spatial and Channel Reconstruction Convolution", CVPR 2023):

* SRU, spatial reconstruction: GroupNorm scale factors rate how informative each channel is; a
  sigmoid gate splits the features into an informative and a redundant part, which are cross-added.
* CRU, channel reconstruction: split channels (alpha), squeeze both parts, a rich group-wise +
  point-wise transform on one and a cheap point-wise one on the other, then a softmax-pooled fuse.

SRU gates as the reference code does: ``torch.where`` sets gates above the threshold to 1 (informative)
and 0 (redundant) and passes the gates below it softly, as their value. The GroupNorm weight and bias get a
gradient, through the normalised features and the channel weights ``gamma / sum(gamma)`` (in the reference
too; same outputs for the same weights), so DDP needs no ``find_unused_parameters``. The one difference is
that the channel constraints are validated up front, with a message that lists valid widths, instead of
failing inside a convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .constants import (
    SACA_ALPHA,
    SACA_GATE_THRESHOLD,
    SACA_GROUP_KERNEL_SIZE,
    SACA_GROUP_NUM,
    SACA_GROUP_SIZE,
    SACA_SQUEEZE_RATIO,
)

__all__ = ["CRU", "SACA", "SRU", "saca_channel_problems"]


def saca_channel_problems(
    channels: int,
    *,
    group_num: int = SACA_GROUP_NUM,
    alpha: float = SACA_ALPHA,
    squeeze_ratio: int = SACA_SQUEEZE_RATIO,
    group_size: int = SACA_GROUP_SIZE,
) -> list[str]:
    """Reasons why ``channels`` does not fit SACA's group/split constraints (empty list when it fits)."""
    problems = []
    if channels < 2 or channels % 2:
        problems.append("SRU splits channels in halves, so channels must be even and >= 2")
    if channels % group_num:
        problems.append(f"SRU's GroupNorm needs channels divisible by group_num={group_num}")
    up = int(alpha * channels)
    low = channels - up
    if up // squeeze_ratio < 1 or low // squeeze_ratio < 1:
        problems.append(f"CRU's squeeze (ratio {squeeze_ratio}) leaves no channels for a split of {up}/{low}")
    elif (up // squeeze_ratio) % group_size or channels % group_size:
        problems.append(
            f"CRU's group-wise conv needs {up // squeeze_ratio} squeezed and {channels} output channels "
            f"divisible by group_size={group_size}"
        )
    return problems


def _check_channels(channels: int, **kwargs: float) -> None:
    problems = saca_channel_problems(channels, **kwargs)
    if problems:
        valid = [c for c in range(1, 129) if not saca_channel_problems(c, **kwargs)][:6]
        raise ValueError(
            f"SACA: channels={channels} does not fit: {'; '.join(problems)}. Valid widths include {valid}."
        )


class SRU(nn.Module):
    """Spatial reconstruction unit.

    Args:
        channels: input/output channels (even, divisible by ``group_num``).
        group_num: GroupNorm groups.
        gate_threshold: sigmoid weights above it count as informative.

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, group_num: int = SACA_GROUP_NUM, gate_threshold: float = SACA_GATE_THRESHOLD):
        super().__init__()
        if channels % 2 or channels % group_num:
            raise ValueError(f"SRU: expected channels even and divisible by group_num={group_num}, got {channels}")
        self.gn = nn.GroupNorm(group_num, channels)
        self.gate_threshold = gate_threshold

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.gn.weight
        channel_weight = (gamma / gamma.sum()).view(1, -1, 1, 1)
        gate = torch.sigmoid(self.gn(x) * channel_weight)
        informative = gate > self.gate_threshold
        gated = gate * x  # informative gates count as 1 in x_info and 0 in x_redundant (hard), the rest as gate
        x_info = torch.where(informative, x, gated)
        x_redundant = gated.masked_fill(informative, 0.0)
        info_a, info_b = x_info.chunk(2, dim=1)
        red_a, red_b = x_redundant.chunk(2, dim=1)
        return torch.cat([info_a + red_b, info_b + red_a], dim=1)


class CRU(nn.Module):
    """Channel reconstruction unit.

    Args:
        channels: input/output channels.
        alpha: share of channels routed to the rich (group-wise + point-wise) branch.
        squeeze_ratio: 1x1 squeeze factor of both branches.
        group_size: groups of the group-wise convolution.
        group_kernel_size: kernel of the group-wise convolution.

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(
        self,
        channels: int,
        alpha: float = SACA_ALPHA,
        squeeze_ratio: int = SACA_SQUEEZE_RATIO,
        group_size: int = SACA_GROUP_SIZE,
        group_kernel_size: int = SACA_GROUP_KERNEL_SIZE,
    ):
        super().__init__()
        _check_channels(channels, group_num=1, alpha=alpha, squeeze_ratio=squeeze_ratio, group_size=group_size)
        self.up_channels = int(alpha * channels)
        self.low_channels = channels - self.up_channels
        up_sq, low_sq = self.up_channels // squeeze_ratio, self.low_channels // squeeze_ratio
        self.squeeze_up = nn.Conv2d(self.up_channels, up_sq, 1, bias=False)
        self.squeeze_low = nn.Conv2d(self.low_channels, low_sq, 1, bias=False)
        self.gwc = nn.Conv2d(up_sq, channels, group_kernel_size, padding=group_kernel_size // 2, groups=group_size)
        self.pwc_up = nn.Conv2d(up_sq, channels, 1, bias=False)
        self.pwc_low = nn.Conv2d(low_sq, channels - low_sq, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        up, low = torch.split(x, [self.up_channels, self.low_channels], dim=1)
        up, low = self.squeeze_up(up), self.squeeze_low(low)
        rich = self.gwc(up) + self.pwc_up(up)
        cheap = torch.cat([self.pwc_low(low), low], dim=1)
        out = torch.cat([rich, cheap], dim=1)
        out = F.softmax(F.adaptive_avg_pool2d(out, 1), dim=1) * out
        first, second = out.chunk(2, dim=1)
        return first + second


class SACA(nn.Module):
    """SACA attention = SRU then CRU (SCConv), used in the main threshold map.

    Args:
        channels: input/output channels; validated against every group/split constraint.
        group_num, gate_threshold: :class:`SRU`'s arguments.
        **cru_kwargs: :class:`CRU`'s arguments (``alpha``, ``squeeze_ratio``, ``group_size``,
            ``group_kernel_size``); their defaults live in :class:`CRU` alone.

    Shape:
        (B, C, H, W) -> (B, C, H, W)

    Example:
        >>> SACA(16)(torch.rand(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        group_num: int = SACA_GROUP_NUM,
        gate_threshold: float = SACA_GATE_THRESHOLD,
        **cru_kwargs: float,
    ):
        super().__init__()
        split = {k: v for k, v in cru_kwargs.items() if k in ("alpha", "squeeze_ratio", "group_size")}
        _check_channels(channels, group_num=group_num, **split)  # one message for every constraint
        self.sru = SRU(channels, group_num, gate_threshold)
        self.cru = CRU(channels, **cru_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.cru(self.sru(x))
