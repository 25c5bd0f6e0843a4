"""The ADST auxiliary head (main, edge and fused maps) and the outputs it produces.

::

    features --pool--conv-BN-ReLU-SACA-BN-ReLU-conv--> main       (signed distance or core, at <= 1/s)
    mask logits --[sigmoid, detach]--Laplacian-------> edge       (no parameters, full resolution)
    [main, space-to-depth(edge)] --conv-BN-ReLU-ConvGLU-BN-ReLU-conv--bilinear x s--> fused

``fused`` is the logits of the threshold map T (``fused_role="threshold"``) or of a second mask
(``"mask"``, paper). The main branch and the fusion run at <= 1/s of the mask size (``head_stride`` s);
the edge map enters the fusion losslessly as s*s channels (``pixel_unshuffle``), and the fused map is
resized bilinearly, so it is smooth (no sub-pixel checkerboard). s = 1 is the paper's full-resolution
layout. All maps are logits of shape (B, C, H, W), H, W being the mask logits' size and C the model's classes:
channel c of every map belongs to channel c of the mask logits. The edge cue is taken of the model's own
probability, a sigmoid per channel (binary, multilabel) or the softmax over the classes (multiclass); in
multiclass mode the background channel (0) of the main and threshold maps carries no target.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_int, check_number
from .constants import HEAD_STRIDE, HIDDEN_CHANNELS
from .convglu import ConvGLU
from .functional import grad_scale
from .laplacian import LaplacianEdge
from .modes import BINARY_MODE, MODES, check_mode, class_probability
from .presets import EDGE_INPUTS
from .saca import SACA

__all__ = ["RENAMED", "ADSTHead", "ADSTOutput", "FusionMap", "HeadMaps", "MainMap", "renamed_attribute"]

#: Former names of this module's classes: importable for one more release, with a ``DeprecationWarning``.
RENAMED = {"MainThresholdMap": "MainMap"}
#: What the head's ``mode_code`` buffer holds: 0 while the mode is unknown, else 1 + its index in ``MODES``.
_MODE_CODES = (None, *MODES)


class HeadMaps(NamedTuple):
    """The head's three logit maps, each (B, C, H, W) (C: the model's classes).

    Attributes:
        main: the main map, regressing what ``main_target`` names: the signed distance to the edge or the core map.
        edge: the edge map (Laplacian high-pass of the mask logits or probabilities).
        fused: fusion of main and edge: threshold map T, or mask logits (paper).
    """

    main: Tensor
    edge: Tensor
    fused: Tensor


class ADSTOutput(NamedTuple):
    """Model and head outputs together, from :meth:`ADSTModel.forward_adst` (for inspection and plots).

    Attributes:
        masks: the wrapped model's mask logits (B, C, H, W): what inference uses.
        maps: the head's :class:`HeadMaps`.
        labels: the classification output of smp models built with ``aux_params``; otherwise None.
    """

    masks: Tensor
    maps: HeadMaps
    labels: Tensor | None = None


def _pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    # Same values as adaptive_avg_pool2d; a whole-number factor takes the plain average pool, about 10 % cheaper
    # forward + backward on the CPU (8 x 16 x 256² features pooled to 128², 1 thread).
    (h, w), (oh, ow) = x.shape[-2:], size
    if h % oh == 0 and w % ow == 0:
        return F.avg_pool2d(x, (h // oh, w // ow))
    return F.adaptive_avg_pool2d(x, size)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class MainMap(nn.Sequential):
    """conv(C_in -> h) -> BN -> ReLU -> SACA -> BN -> ReLU -> conv(h -> classes): the main map's branch.

    What its output regresses is the loss's choice (``ADSTConfig.main_target``), not the module's.

    Shape:
        (B, in_channels, h, w) -> (B, classes, h, w)
    """

    def __init__(self, in_channels: int, hidden_channels: int = HIDDEN_CHANNELS, classes: int = 1):
        saca = SACA(hidden_channels)  # validates hidden_channels first, with the list of valid widths
        super().__init__(
            *_conv_bn_relu(in_channels, hidden_channels, 3),
            saca,
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, classes, 1),
        )
        self.in_channels = in_channels


class FusionMap(nn.Module):
    """concat(main, edge) -> conv -> BN -> ReLU -> ConvGLU -> BN -> ReLU -> conv(-> classes), at 1/stride.

    ``main`` comes at (ceil(H/s), ceil(W/s)); ``edge`` at (H, W) is folded into s*s channels per class
    (``pixel_unshuffle``, lossless). The low-resolution output is resized bilinearly to (H, W). The classes share
    the hidden layers (their maps meet at the same edges).

    Shape:
        main (B, classes, ceil(H/s), ceil(W/s)), edge (B, classes, H, W) -> (B, classes, H, W)
    """

    def __init__(self, hidden_channels: int = HIDDEN_CHANNELS, stride: int = 1, classes: int = 1):
        super().__init__()
        self.stride = stride
        self.body = nn.Sequential(
            *_conv_bn_relu(classes * (1 + stride**2), hidden_channels, 3),
            ConvGLU(hidden_channels),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, classes, 1),
        )

    def forward(self, main: Tensor, edge: Tensor) -> Tensor:
        s = self.stride
        height, width = edge.shape[-2:]
        if s > 1:
            pad_h, pad_w = (-height) % s, (-width) % s
            if pad_h or pad_w:
                edge = F.pad(edge, (0, pad_w, 0, pad_h), mode="replicate")
            edge = F.pixel_unshuffle(edge, s)
        out = self.body(torch.cat([main, edge.to(main.dtype)], dim=1))
        if s > 1:
            out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
        return out


class ADSTHead(nn.Module):
    """Main, edge and fused maps from tapped features and the mask logits.

    Args:
        in_channels: channels of the tapped features (1 when the head reads the mask logits).
        hidden_channels: width of the main and fusion branches (checked against SACA's constraints).
        head_stride: the main branch and the fusion run at <= 1/head_stride of the mask size.
        edge_input: ``"probs"``: Laplacian of the detached sigmoid(logits), a cue no loss can push on;
            ``"logits"``: Laplacian of the mask logits, with gradient (paper).
        fusion_grad: gradient scale from the fusion into the main map (0: the fused map's loss leaves the
            main branch, and the features behind it, to the main map's own term).
        classes: C, the model's output channels; every map has one channel per class.
        mode: the smp mode (:mod:`adst_plugin.modes`), which says how the edge cue turns logits into
            probabilities. Needed with ``classes > 1`` and ``edge_input="probs"``; ``ADSTLoss`` sets it from its
            base loss when the model was wrapped without one.

    Shape:
        features (B, in_channels, h, w), mask_logits (B, C, H, W) -> :class:`HeadMaps`, each (B, C, H, W)
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = HIDDEN_CHANNELS,
        head_stride: int = HEAD_STRIDE,
        edge_input: str = "probs",
        fusion_grad: float = 0.0,
        classes: int = 1,
        mode: str | None = None,
    ):
        super().__init__()
        where = "ADSTHead"
        head_stride = check_int(head_stride, "head_stride", where)
        in_channels = check_int(in_channels, "in_channels", where)
        edge_input = check_choice(edge_input, EDGE_INPUTS, "edge_input", where)
        fusion_grad = check_number(fusion_grad, "fusion_grad", where, low=0.0, high=1.0)
        classes = check_int(classes, "classes", where)
        self.main = MainMap(in_channels, hidden_channels, classes)
        self.edge = LaplacianEdge()
        self.fusion = FusionMap(hidden_channels, head_stride, classes)
        self.head_stride = head_stride
        self.edge_input = edge_input
        self.fusion_grad = fusion_grad
        self.classes = classes
        # The mode is state (ADSTLoss may set it after construction), so the state_dict holds it, as a code: a
        # restored head turns logits into the same probability for its edge cue as the head that was saved.
        self.register_buffer("mode_code", torch.zeros((), dtype=torch.uint8))
        self.mode = None if mode is None else check_mode(mode, classes, "ADSTHead")

    @property
    def mode(self) -> str | None:
        """The smp mode, or None while it is unknown (a 1-class head needs none)."""
        return self._mode

    @mode.setter
    def mode(self, mode: str | None) -> None:
        self._mode = mode
        self.mode_code.fill_(_MODE_CODES.index(mode))

    @property
    def in_channels(self) -> int:
        """Channels the head expects from the tapped features."""
        return self.main.in_channels

    def forward(self, features: Tensor, mask_logits: Tensor) -> HeadMaps:
        s = self.head_stride
        size = mask_logits.shape[-2:]
        low_res = (-(-size[0] // s), -(-size[1] // s))
        if features.shape[-2] > low_res[0] or features.shape[-1] > low_res[1]:
            features = _pool_to(features, low_res)
        main_low = self.main(features)
        if main_low.shape[-2:] != low_res:
            main_low = F.interpolate(main_low, size=low_res, mode="bilinear", align_corners=False)
        main = main_low if s == 1 else F.interpolate(main_low, size=size, mode="bilinear", align_corners=False)
        source = mask_logits if self.edge_input == "logits" else self._probability(mask_logits.detach())
        edge = self.edge(source)
        fused = self.fusion(grad_scale(main_low, self.fusion_grad), edge)
        return HeadMaps(main, edge, fused)

    def _probability(self, logits: Tensor) -> Tensor:
        # The model's own probability, as the loss reads it (for one channel the modes agree: a 1-class head needs
        # no mode).
        if self.mode is None and self.classes > 1:
            raise RuntimeError(
                f"ADSTHead: the mode of a {self.classes}-class model is unknown, so its probability is too. Build "
                "ADSTLoss(model, base_loss=smp.losses.DiceLoss('multiclass' or 'multilabel', from_logits=True)) "
                "before the first training forward, or pass mode= to wrap_with_adst"
            )
        return class_probability(logits, self.mode or BINARY_MODE)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The saved mode, if any, becomes the head's; a head that has one keeps it (a state_dict saved before the
        # mode was part of it loads too), and a different one is an error.
        key = prefix + "mode_code"
        saved = _MODE_CODES[int(state_dict[key])] if key in state_dict else None
        if saved is not None:
            saved = check_mode(saved, self.classes, "ADSTHead.load_state_dict")
            if self.mode is not None and self.mode != saved:
                raise ValueError(
                    f"ADSTHead.load_state_dict: expected the state of a {self.mode!r} head, got one saved in mode "
                    f"{saved!r}. Load it before building the loss, into a model wrapped without mode= or with "
                    f"mode={saved!r}."
                )
            self.mode = saved
        state_dict[key] = self.mode_code.clone()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        mode = "" if self.classes == 1 else f", classes={self.classes}, mode={self.mode!r}"
        return f"head_stride={self.head_stride}, edge_input={self.edge_input!r}, fusion_grad={self.fusion_grad}{mode}"


def renamed_attribute(module: str, name: str) -> Any:
    """A module's ``__getattr__`` for the names in :data:`RENAMED`: warn, then return the class by its new name."""
    if name not in RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{name} is now {RENAMED[name]} (named after its role, whatever main_target it regresses); import "
        f"{RENAMED[name]}: the old name goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return globals()[RENAMED[name]]


def __getattr__(name: str) -> Any:
    return renamed_attribute(__name__, name)
