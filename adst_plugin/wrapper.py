"""``wrap_with_adst``: add the ADST head to a segmentation model for training; ``export()`` removes it.

The wrapper owns the user's model (``.model``, trained in place), the head (``.head``) and its
configuration (``.config``, an :class:`~adst_plugin.presets.ADSTConfig`).

``forward`` returns exactly what the wrapped model returns, in training and in eval mode, so every line of
a training loop that uses the output (``.sigmoid()``, metrics, thresholding) works unchanged. In training
mode (with grad enabled) the head also runs, on the features that a hook registered once at construction
captured, and its maps are kept on the wrapper, with the forward's mask logits, until
:class:`~adst_plugin.ADSTLoss` takes them (``pop_maps``): the maps reach the loss through the model object the
loss was given, explicitly, with no global state. The loss checks that its logits are that forward's output, and
a training forward whose predecessor's maps were never taken warns (:mod:`adst_plugin._handover`). In eval mode,
and under ``torch.no_grad()``, the hook does nothing and no head runs.

Hook lifecycle: one hook on the tapped submodule, registered in ``__init__`` (so ``torch.compile(...,
fullgraph=True)`` traces the training forward without a graph break) and removed by :meth:`ADSTModel.remove_hooks`,
on ``with`` exit, and when the wrapper is garbage-collected. ``export()`` hands back a deep copy without it.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ._checks import check_bchw, check_int
from ._handover import WARNS_WHEN_COMPILED, comes_from, mismatch_message, warn_unclaimed
from .functional import grad_scale
from .head import ADSTHead, ADSTOutput, HeadMaps
from .hooks import FeatureTap, _convs, feature_channels, resolve_module, strip_captures
from .modes import check_mode
from .presets import DEFAULT_PRESET, ADSTConfig, get_config, renamed_fields

__all__ = ["ADSTModel", "HeadWrapper", "unwrap_model", "wrap_with_adst"]

ModelT = TypeVar("ModelT", bound=nn.Module)


def unwrap_model(model: Any, cls: type[ModelT]) -> ModelT | None:
    """The ``cls`` instance inside ``model``: ``model`` itself, or found behind DDP (``.module``) and
    ``torch.compile`` (``._orig_mod``), up to four layers deep; None if there is none."""
    for _ in range(4):
        if isinstance(model, cls):  # not an attribute test: a compiled module forwards attribute look-ups
            return model
        inner = getattr(model, "module", None)
        model = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
    return model if isinstance(model, cls) else None


def _model_classes(model: nn.Module) -> int | None:
    head_convs = _convs(getattr(model, "segmentation_head", None))  # smp: classes = last conv's out_channels
    return head_convs[-1].out_channels if head_convs else None


def _check_binary(model: nn.Module, where: str) -> None:
    classes = _model_classes(model)
    if classes is not None and classes != 1:
        raise ValueError(
            f"{where}: expected a binary model (classes=1), got classes={classes}. This head supports binary "
            "models only; wrap_with_adst supports every smp mode."
        )


def _resolve_classes(model: nn.Module, classes: int | None, where: str) -> int:
    # smp models say it (their segmentation head); other modules return 1 channel unless classes= says otherwise.
    found = _model_classes(model)
    if classes is None:
        return 1 if found is None else found
    classes = check_int(classes, "classes", where)
    if found is not None and found != classes:
        raise ValueError(
            f"{where}: expected classes={classes} to match the model's segmentation head, got {found} output "
            "channels. Drop classes= (it is read off smp models)."
        )
    return classes


def _split_output(output: Any, classes: int = 1) -> tuple[Tensor, Tensor | None]:
    masks, labels = (output[0], output[1]) if isinstance(output, (tuple, list)) else (output, None)
    check_bchw(masks, "mask logits", "ADSTModel")
    if masks.shape[1] != classes:
        raise ValueError(
            f"ADSTModel: expected mask logits with {classes} channel(s) (classes={classes}), got "
            f"{tuple(masks.shape)}. Pass classes=<C> to wrap_with_adst for a model that is not an smp model."
        )
    return masks, labels


def _drop_weight_download(model: nn.Module) -> None:
    # smp.from_pretrained builds the model from its saved config before loading the saved weights; a config that
    # still says encoder_weights="imagenet" would download the ImageNet encoder first, and fail offline.
    config = getattr(model, "_hub_mixin_config", None)
    if isinstance(config, dict) and config.get("encoder_weights") is not None:
        config["encoder_weights"] = None


class HeadWrapper(nn.Module):
    """A model plus a training-only head read through one forward hook; the plumbing every such wrapper shares.

    Subclasses build ``self.head`` and implement :meth:`_head_output` (the head's output for a training forward's
    output, and its mask logits; :meth:`_features` gives the tapped features). ``forward`` returns exactly the
    model's output and, in training mode with grad enabled, keeps the head's output with the forward's mask logits;
    the loss takes it with :meth:`_hand_over` (given the logits it got, it checks the pairing:
    :mod:`adst_plugin._handover`). This class owns the hook (one :class:`~adst_plugin.hooks.FeatureTap`, or none
    when ``features`` is None), switches it with the training mode, and leaves the model behind on :meth:`export`.
    The ADST wrapper and the study's peer heads (``adst_examples.peers``, ``adst_examples.deep_supervision``) build
    on it.

    At most one training forward's head output (and its mask logits) is kept: a later training forward replaces it
    (warning that it was never taken), and the loss call, ``train()``, ``eval()``, ``remove_hooks()`` and a copy
    (``copy.deepcopy``, pickling) drop it.

    Args:
        model: the segmentation model; returns mask logits (B, 1, H, W), or a tuple whose first item is them.
        features: dotted path of the submodule whose output the head reads, or None for no hook.
        where: the wrapper's name, for error messages.
    """

    #: Whether the head serves 1-class models only (checked at construction); ADSTModel serves every smp mode.
    binary_only = True
    #: The loss class that takes the head's output, named by the warning of a forgotten loss.
    loss_name = "ADSTLoss"

    def __init__(self, model: nn.Module, features: str | None, where: str):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
        if isinstance(model, HeadWrapper):
            raise TypeError(f"{where}: the model is already wrapped; wrap the plain model")
        if self.binary_only:
            _check_binary(model, where)
        self.model = model
        self.features = features
        self._where = where
        self._pending: Any = None  # the head output of the last training forward, until its loss takes it
        self._pending_output: Tensor | None = None  # that forward's mask logits: the loss checks it got them
        self._unclaimed = False  # a plain bool (not `_pending is not None`): a cheap guard under torch.compile
        self._tap = FeatureTap(resolve_module(model, features, where)) if features is not None else None
        if self._tap is not None:
            self._tap.capture.active = self.training

    def _feature_channels(self) -> int:
        # Only called by subclasses that tap features (features is not None).
        return feature_channels(self.model, str(self.features), self._tap.module, self._where)  # type: ignore[union-attr]

    def _arm(self) -> None:
        # Called at every forward, not only in train(): Lightning restores submodules' `training` flags directly.
        # A no_grad forward (BN recalibration, an EMA or pseudo-label forward) runs no head: nothing to capture.
        if self._tap is not None:
            self._tap.capture.active = self.training and torch.is_grad_enabled()

    def _features(self) -> Tensor:
        """The tapped features of the forward that just ran."""
        features = self._tap.pop() if self._tap is not None else None
        if features is None:
            raise RuntimeError(f"{self._where}: {self.features!r} did not run during forward; check features=")
        return features

    def forward(self, x: Tensor) -> Any:
        """Exactly ``self.model(x)``; in training mode with grad enabled the head's output is also kept for the loss."""
        self._arm()
        try:
            output = self.model(x)
            if self.training and torch.is_grad_enabled():
                # Here, not in a helper: under torch.compile a logging call in a nested function is dropped.
                if self._unclaimed and (WARNS_WHEN_COMPILED or not torch.compiler.is_compiling()):
                    warn_unclaimed(self._where, self.loss_name)
                self._pending, self._pending_output = self._head_output(output)
                self._unclaimed = True
        finally:
            if self._tap is not None:  # a forward that failed half-way keeps no features either
                self._tap.pop()
        return output

    def _head_output(self, output: Any) -> tuple[Any, Tensor]:
        """The head's output for a training forward's ``output``, and that forward's mask logits (subclasses)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _head_output(output)")

    def _hand_over(self, logits: Any = None) -> Any:
        """The kept head output, once. Given the logits the loss got, first check that they are the kept forward's
        output (or computed from it); on a mismatch the kept output is dropped all the same, then ValueError."""
        pending, output = self._pending, self._pending_output
        self._drop()
        checked = output is not None and isinstance(logits, Tensor)  # subclasses that set _pending directly: no check
        if checked and not comes_from(logits, output):
            raise ValueError(mismatch_message(self.loss_name, logits))
        return pending

    def _drop(self) -> None:
        self._pending, self._pending_output, self._unclaimed = None, None, False

    def train(self, mode: bool = True) -> HeadWrapper:
        super().train(mode)
        self._drop()  # the head output of an unfinished training step never reaches a later loss
        self._arm()
        return self

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) starts with nothing kept: a kept output belongs to this wrapper's step, and
        # deepcopy cannot copy a tensor in an autograd graph anyway.
        state = super().__getstate__()
        state.update(_pending=None, _pending_output=None, _unclaimed=False)
        return state

    def export(self) -> nn.Module:
        """A standalone deep copy of the wrapped model, in eval mode: same class, same state-dict keys,
        no hooks of ours, no head. The wrapper is untouched and can keep training.

        The copy's smp config records ``encoder_weights=None``: its trained weights are in its ``state_dict``, so the
        folder ``save_pretrained`` writes reloads with ``smp.from_pretrained`` without a network."""
        plain = copy.deepcopy(self.model)
        strip_captures(plain)
        _drop_weight_download(plain)
        return plain.eval()

    def plain_state_dict(self) -> dict[str, Tensor]:
        """The wrapped model's own ``state_dict`` (no head keys): loads into a fresh plain model."""
        return self.model.state_dict()

    def remove_hooks(self) -> None:
        """Remove the feature hook from the wrapped model (the wrapper can no longer train). Safe to repeat."""
        if self._tap is not None:
            self._tap.remove()
        self._drop()

    def __enter__(self) -> HeadWrapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()


class ADSTModel(HeadWrapper):
    """A segmentation model plus the ADST auxiliary head. Build it with :func:`wrap_with_adst`.

    Args:
        model: the segmentation model (returns mask logits (B, C, H, W), or a tuple whose first item is them).
        config: the head and loss configuration.
        in_channels: channels of the tapped features (``head_input="features"`` only); inferred for smp models.
        classes: C, the model's output channels; read off smp models, else 1 unless given.
        mode: the smp mode (``"binary"``, ``"multiclass"``, ``"multilabel"``); None lets ``ADSTLoss`` set it
            from its base loss.

    Shape:
        (B, C_in, H, W) -> whatever the wrapped model returns, in both modes.
    """

    binary_only = False

    def __init__(
        self,
        model: nn.Module,
        config: ADSTConfig,
        in_channels: int | None = None,
        classes: int | None = None,
        mode: str | None = None,
    ):
        if not isinstance(config, ADSTConfig):
            raise TypeError(f"ADSTModel: expected an ADSTConfig, got {type(config).__name__}")
        features = config.features if config.head_input == "features" else None
        super().__init__(model, features, "wrap_with_adst")
        self.config = config
        self.classes = _resolve_classes(model, classes, "wrap_with_adst")
        if mode is not None:
            check_mode(mode, self.classes, "wrap_with_adst")
        if features is None and in_channels is not None:
            raise ValueError(
                f"wrap_with_adst: expected no in_channels with head_input='logits' (the head reads the "
                f"{self.classes}-channel mask logits), got in_channels={in_channels!r}. Drop in_channels=, or pass "
                "head_input='features' to read the features it counts."
            )
        if in_channels is None:
            in_channels = self._feature_channels() if features is not None else self.classes
        self.head = ADSTHead(
            in_channels,
            config.hidden_channels,
            config.head_stride,
            config.edge_input,
            config.fusion_grad,
            self.classes,
            mode,
        )

    @property
    def mode(self) -> str | None:
        """The smp mode of the model and its loss: given to ``wrap_with_adst``, or set by ``ADSTLoss``."""
        return self.head.mode

    def _bind_mode(self, mode: str) -> None:
        # ADSTLoss resolved the mode (its checks include this model's): the head's probability follows it. A
        # 1-class head needs none (sigmoid either way), so a binary and a multilabel loss may share it.
        if self.classes > 1:
            self.head.mode = check_mode(mode, self.classes, "ADSTLoss")

    def _head_output(self, output: Any) -> tuple[HeadMaps, Tensor]:
        masks, _ = _split_output(output, self.classes)
        return self._run_head(masks), masks

    def _run_head(self, masks: Tensor) -> HeadMaps:
        features = masks if self._tap is None else self._features()
        if features.shape[1] != self.head.in_channels:
            raise ValueError(
                f"ADSTModel: expected {self.head.in_channels}-channel features from {self.config.features!r}, "
                f"got {tuple(features.shape)}. Pass in_channels= to wrap_with_adst."
            )
        return self.head(grad_scale(features, float(self.config.feature_grad)), masks)

    def pop_maps(self, logits: Tensor | None = None) -> HeadMaps | None:
        """The head's maps from the last training forward, handed over once (then forgotten).

        Args:
            logits: the mask logits the loss got; if given, they must be that forward's output or computed from it
                (else ValueError, after the maps are dropped).
        """
        return self._hand_over(logits)

    def forward_adst(self, x: Tensor) -> ADSTOutput:
        """Model and head together in either mode, e.g. to look at the maps of an eval batch."""
        if self._tap is not None:
            self._tap.capture.active = True
        try:
            masks, labels = _split_output(self.model(x), self.classes)
            maps = self._run_head(masks)
        finally:
            self._arm()
            if self._tap is not None:
                self._tap.pop()
        return ADSTOutput(masks, maps, labels)

    def extra_repr(self) -> str:
        c = self.config
        return f"head_input={c.head_input!r}, features={c.features!r}, feature_grad={c.feature_grad}"


def wrap_with_adst(
    model: nn.Module,
    preset: str | ADSTConfig = DEFAULT_PRESET,
    *,
    in_channels: int | None = None,
    classes: int | None = None,
    mode: str | None = None,
    **overrides: Any,
) -> ADSTModel:
    """Wrap a segmentation model (binary, multiclass or multilabel) with the ADST head for training.

    Args:
        model: an smp model (any of the 12 architectures) or any ``nn.Module`` returning mask logits
            (B, C, H, W), or a tuple whose first item is them.
        preset: a name from :data:`~adst_plugin.presets.PRESETS` (``"adst"``, ``"paper"``, ``"legacy"``) or an
            :class:`~adst_plugin.presets.ADSTConfig`.
        in_channels: channels of the tapped features (``head_input="features"`` only); inferred for smp models.
        classes: C, the model's output channels; read off smp models (other modules: 1 unless given).
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"`` (smp's modes). Optional: ``ADSTLoss`` reads it
            from its smp base loss (``.mode``); a 1-class model is binary.
        **overrides: any :class:`~adst_plugin.presets.ADSTConfig` field, e.g. ``feature_grad=0.5``,
            ``features="decoder.blocks.3"``, ``w_boundary=0``.
    Returns:
        :class:`ADSTModel`; train it with ``ADSTLoss(model)`` and call ``.export()`` for the plain model.
    Raises:
        KeyError: unknown preset. TypeError: unknown option. ValueError: bad values, a ``mode`` that does not
        fit the model's classes, unknown ``features`` path, invalid ``hidden_channels``, ``in_channels`` with
        ``head_input="logits"``.
    """
    config = get_config(preset, **renamed_fields(overrides, "wrap_with_adst"))
    return ADSTModel(model, config, in_channels=in_channels, classes=classes, mode=mode)
