"""``wrap_with_adst``: add the ADST head to a segmentation model for training; ``export()`` removes it.

The wrapper owns the user's model (``.model``, trained in place) and the head (``.head``). In training
mode ``forward`` hooks the tapped submodule for the duration of that one call (the hook is removed before
``forward`` returns, so no hook ever outlives a call) and returns :class:`ADSTOutput`. In eval mode it
calls the model and returns exactly what the model returns: no hook, no head, no extra work.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import NamedTuple

from torch import Tensor, nn

from . import constants as C
from ._checks import check_bchw
from .head import ADSTHead
from .hooks import FeatureTap, resolve_module

__all__ = ["TAPS", "ADSTModel", "ADSTOutput", "wrap_with_adst"]

#: Where the head reads from: a submodule's output features, or the model's mask logits (paper-faithful).
TAPS = ("decoder", "logits")


class ADSTOutput(NamedTuple):
    """Training-mode output of :class:`ADSTModel`; all maps are logits of shape (B, 1, H, W).

    Attributes:
        masks: the wrapped model's own mask logits (what inference will use).
        main: main threshold map (core localisation), supervised by the shrunk core map.
        edge: edge threshold map (Laplacian high-pass of ``masks``), supervised by the border map.
        fused: fusion of main and edge, supervised like ``masks``.
        labels: the classification output of models built with smp ``aux_params``; otherwise None.
    """

    masks: Tensor
    main: Tensor
    edge: Tensor
    fused: Tensor
    labels: Tensor | None = None


def _first_conv(module: nn.Module | None, last: bool = False) -> nn.Conv2d | None:
    if module is None:
        return None
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return (convs[-1] if last else convs[0]) if convs else None


def _infer_in_channels(model: nn.Module, features: str, tapped: nn.Module) -> int:
    if features == "decoder":
        head_conv = _first_conv(getattr(model, "segmentation_head", None))
        if head_conv is not None:
            return head_conv.in_channels
    out_channels = getattr(tapped, "out_channels", None)
    if isinstance(out_channels, int):
        return out_channels
    last_conv = _first_conv(tapped, last=True)
    if last_conv is not None:
        return last_conv.out_channels
    raise ValueError(
        f"wrap_with_adst: cannot infer the channels of {features!r}'s output; pass in_channels=<C> explicitly"
    )


def _check_binary(model: nn.Module) -> None:
    # smp models: classes = out_channels of the segmentation head's last conv.
    head_conv = _first_conv(getattr(model, "segmentation_head", None), last=True)
    if head_conv is not None and head_conv.out_channels != 1:
        raise ValueError(
            f"wrap_with_adst: expected a binary model (classes=1), got classes={head_conv.out_channels}. "
            "ADST targets are defined for binary lesion masks; multi-class support is not implemented yet."
        )


class ADSTModel(nn.Module):
    """A segmentation model plus the ADST auxiliary head. Build it with :func:`wrap_with_adst`.

    Shape:
        train: (B, C_in, H, W) -> ADSTOutput with maps (B, 1, H, W)
        eval: (B, C_in, H, W) -> whatever the wrapped model returns
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        features: str = "decoder",
        tap: str = "decoder",
        in_channels: int | None = None,
        hidden_channels: int = C.HIDDEN_CHANNELS,
        fusion: str = "convglu",
        feature_grad: bool = C.FEATURE_GRAD,
        db_steepness: float = C.DB_STEEPNESS,
        head_stride: int = C.HEAD_STRIDE,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"wrap_with_adst: expected an nn.Module, got {type(model).__name__}")
        if isinstance(model, ADSTModel):
            raise TypeError("wrap_with_adst: the model is already wrapped")
        if tap not in TAPS:
            raise ValueError(f"wrap_with_adst: unknown tap {tap!r}; valid options are {TAPS}")
        _check_binary(model)
        self.model = model
        self.features = features
        self.tap = tap
        self.feature_grad = feature_grad
        if tap == "decoder":
            tapped = resolve_module(model, features)
            in_channels = in_channels or _infer_in_channels(model, features, tapped)
        else:
            in_channels = 1
        self.head = ADSTHead(in_channels, hidden_channels, fusion, db_steepness, head_stride)

    def forward(self, x: Tensor) -> ADSTOutput | Tensor | tuple[Tensor, ...]:
        """Train mode: :class:`ADSTOutput`. Eval mode: exactly ``self.model(x)``."""
        if not self.training:
            return self.model(x)
        return self.forward_adst(x)

    def forward_adst(self, x: Tensor) -> ADSTOutput:
        """Model and head together, in either mode (e.g. to look at the maps of an eval batch)."""
        tapped = resolve_module(self.model, self.features) if self.tap == "decoder" else None
        with FeatureTap(tapped) if tapped is not None else nullcontext() as feature_tap:
            output = self.model(x)
            features = feature_tap.pop() if feature_tap is not None else None
        masks, labels = (output[0], output[1]) if isinstance(output, (tuple, list)) else (output, None)
        check_bchw(masks, "mask logits", "ADSTModel")
        if masks.shape[1] != 1:
            raise ValueError(f"ADSTModel: expected mask logits with 1 channel (classes=1), got {tuple(masks.shape)}")
        if self.tap == "logits":
            features = masks
        if features is None:
            raise RuntimeError(f"ADSTModel: {self.features!r} did not run during forward; check features=")
        expected = self.head.main[0].in_channels
        if features.shape[1] != expected:
            raise ValueError(
                f"ADSTModel: expected {expected}-channel features from {self.features!r}, got {tuple(features.shape)}. "
                "Pass in_channels= to wrap_with_adst."
            )
        if not self.feature_grad:
            features = features.detach()
        main, edge, fused = self.head(features, masks)
        return ADSTOutput(masks, main, edge, fused, labels)

    def export(self) -> nn.Module:
        """A standalone deep copy of the wrapped model, in eval mode: same class, same state-dict keys,
        no hooks, no head. The wrapper is untouched and can keep training."""
        plain = copy.deepcopy(self.model)
        return plain.eval()

    def extra_repr(self) -> str:
        return f"tap={self.tap!r}, features={self.features!r}, feature_grad={self.feature_grad}"


def wrap_with_adst(
    model: nn.Module,
    features: str = "decoder",
    *,
    tap: str = "decoder",
    in_channels: int | None = None,
    hidden_channels: int = C.HIDDEN_CHANNELS,
    fusion: str = "convglu",
    feature_grad: bool = C.FEATURE_GRAD,
    db_steepness: float = C.DB_STEEPNESS,
    head_stride: int = C.HEAD_STRIDE,
) -> ADSTModel:
    """Wrap a binary segmentation model with the ADST head for training.

    Args:
        model: an smp model (any of the 12 architectures) or any ``nn.Module`` returning mask logits
            (B, 1, H, W), or a tuple whose first item is them.
        features: dotted path of the submodule whose output the head reads (``tap="decoder"``).
        tap: ``"decoder"``: head reads ``features``; ``"logits"``: head reads the mask logits (paper).
        in_channels: channels of the tapped features; inferred for smp models.
        hidden_channels: head width (SACA constraints apply; 16 by default).
        fusion: ``"convglu"`` (paper) or ``"db"`` (DB binarization of main vs edge).
        feature_grad: if True the head's main and fused losses also train the tapped features; False by
            default (chosen on validation, see docs/results.md), so they train the head alone. The edge term,
            computed on the mask logits, always reaches the model.
        db_steepness: k of the DB binarization.
        head_stride: the head's working stride (1 = paper layout at full resolution; 2 by default,
            measured to keep the training overhead small without losing edge detail, see docs/results.md).
    Returns:
        :class:`ADSTModel`; call ``.export()`` after training for the plain model.
    Raises:
        ValueError: unknown ``tap``/``fusion``/``features``, ``classes != 1``, invalid ``hidden_channels``.
    """
    return ADSTModel(
        model,
        features=features,
        tap=tap,
        in_channels=in_channels,
        hidden_channels=hidden_channels,
        fusion=fusion,
        feature_grad=feature_grad,
        db_steepness=db_steepness,
        head_stride=head_stride,
    )
