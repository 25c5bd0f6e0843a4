"""``ADSTLoss``: the mask loss plus the auxiliary terms of the ADST head.

``ADSTLoss(model)`` is given the wrapped model once; ``criterion(logits, mask)`` then takes the same mask
logits a plain loss takes and collects the head's maps from ``model.pop_maps()``. The smp mode (binary,
multiclass, multilabel; :mod:`adst_plugin.modes`) comes from the base loss's ``.mode``, ``mode=`` or the model,
and ``ignore_index`` from the base loss or ``ignore_index=``. In training mode::

    total = w_mask * base(logits, y) + aux_scale * sum_t w_t * term_t

with the terms of the model's :class:`~adst_plugin.presets.ADSTConfig` (:mod:`adst_plugin.terms`). The ``core``
and ``border`` targets are passed in, or built on the fly where the mask is (:mod:`adst_plugin.targets`); either
way they, and the mask, meet the logits on the logits' device. In eval mode (or with ``model=None``) the loss is
``base(logits, y)`` alone, so a logged validation loss is comparable with a plain model's. ``aux_scale`` (1 by
default) lets a loop fade the auxiliary terms out.

A call goes down the package once: the hand-over of the maps (:mod:`adst_plugin.wrapper`), every check of the
inputs (:mod:`adst_plugin._checks`, :mod:`adst_plugin.modes`), the targets, then the terms
(:mod:`adst_plugin.terms` over :mod:`adst_plugin.functional`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_bchw, check_mask_matches
from ._step_checks import StepMaskCheck
from .functional import mask_logits
from .head import HeadMaps
from .mask_losses import DiceBCELoss, DiceCELoss, default_mask_loss
from .modes import (
    BINARY_MODE,
    MULTILABEL_MODE,
    Labels,
    check_labels,
    loss_ignore_index,
    resolve_mode,
    target_channels,
)
from .presets import LOSS_WEIGHTS, ADSTConfig, get_config, renamed_fields
from .targets import adst_targets
from .terms import aux_terms
from .wrapper import ADSTModel, unwrap_model

__all__ = ["ADSTLoss", "DiceBCELoss", "DiceCELoss"]

#: Config fields the loss may override (the head's structure stays the model's).
LOSS_FIELDS = (
    *LOSS_WEIGHTS,
    "db_steepness",
    "detach_threshold",
    "main_target",
    "threshold_target",
    "shrink_ratio",
    "thresh_min",
    "thresh_max",
)


class ADSTLoss(nn.Module):
    """Loss for a model wrapped with :func:`~adst_plugin.wrap_with_adst`.

    Args:
        model: the :class:`~adst_plugin.ADSTModel` (also accepted under DDP or ``torch.compile``); ``None``
            gives the plain base loss (a baseline with the same loss class).
        base_loss: any ``(logits, target) -> scalar`` callable for the mask logits, e.g.
            ``smp.losses.DiceLoss("multiclass", from_logits=True)``: its ``.mode`` and ``.ignore_index`` are read.
            Default: :class:`DiceBCELoss` (binary, multilabel) or :class:`DiceCELoss` (multiclass).
        fused_loss: a different callable for the paper preset's fused mask (default: ``base_loss``).
        aux_scale: multiplier of every auxiliary term; a training loop may change it per epoch.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``; needed only when neither the base loss
            (``.mode``) nor the model says it and the model has C > 1 classes. Must agree with both.
        ignore_index: mask value of pixels that train no term; default: the base loss's ``ignore_index``.
        **overrides: loss weights (``w_mask``, ``w_main``, ``w_edge``, ``w_fused``, ``w_threshold``, ``w_binary``,
            ``w_boundary``) and target/binarisation parameters; the rest come from ``model.config``.

    After each call ``last_terms`` holds the detached terms (``mask``, the auxiliary terms of the config, and
    ``total``) for logging.

    Example:
        >>> criterion = ADSTLoss(model)
        >>> loss = criterion(model(images), masks)   # the same call in train and eval mode
    """

    def __init__(
        self,
        model: ADSTModel | nn.Module | None = None,
        base_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        fused_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        aux_scale: float = 1.0,
        mode: str | None = None,
        ignore_index: int | None = None,
        **overrides: Any,
    ):
        super().__init__()
        for name, fn in (("base_loss", base_loss), ("fused_loss", fused_loss)):
            if fn is not None and not callable(fn):
                raise TypeError(f"ADSTLoss: expected {name} to be callable, got {type(fn).__name__}")
        overrides = renamed_fields(overrides, "ADSTLoss")
        unknown = sorted(set(overrides) - set(LOSS_FIELDS))
        if unknown:
            raise TypeError(f"ADSTLoss: unknown option(s) {unknown}; valid options are {list(LOSS_FIELDS)}")
        if not aux_scale >= 0:
            raise ValueError(f"ADSTLoss: expected aux_scale >= 0, got {aux_scale}")
        wrapped = unwrap_model(model, ADSTModel) if model is not None else None
        if model is not None and wrapped is None:
            raise TypeError(
                f"ADSTLoss: expected the model returned by wrap_with_adst (or None), got {type(model).__name__}"
            )
        base_config = wrapped.config if wrapped is not None else get_config()
        self.config: ADSTConfig = base_config.replace(**overrides) if overrides else base_config
        self.classes: int | None = wrapped.classes if wrapped is not None else None
        model_mode = wrapped.mode if wrapped is not None else None
        self.mode = resolve_mode(self.classes, "ADSTLoss", mode=mode, base_loss=base_loss, model_mode=model_mode)
        self.ignore_index = _resolve_ignore_index(ignore_index, base_loss)
        if wrapped is not None:
            wrapped._bind_mode(self.mode)  # the head's edge cue takes the same probability as the loss
        # A plain attribute, not a submodule: the loss must not own (or save, or move) the model.
        self.__dict__["model"] = wrapped
        self.base_loss = base_loss if base_loss is not None else default_mask_loss(self.mode, self.ignore_index)
        self.fused_loss = fused_loss if fused_loss is not None else self.base_loss
        self.aux_scale = aux_scale
        self.last_terms: dict[str, Tensor] = {}
        self._mask_check = StepMaskCheck("ADSTLoss")  # no host sync after the first batch of each shape

    @property
    def target_kwargs(self) -> dict[str, Any]:
        """The target parameters, for :func:`~adst_plugin.targets.adst_targets` (e.g. in DataLoader workers):
        ``shrink_ratio``, ``thresh_min``, ``thresh_max``, and ``mode``, ``classes``, ``ignore_index``."""
        c = self.config
        return {
            "shrink_ratio": c.shrink_ratio,
            "thresh_min": c.thresh_min,
            "thresh_max": c.thresh_max,
            "mode": self.mode,
            "classes": self.classes,
            "ignore_index": self.ignore_index,
        }

    def forward(
        self, logits: Tensor | tuple[Tensor, ...], mask: Tensor, targets: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Total loss.

        Args:
            logits: the model's output: mask logits (B, C, H, W), or a tuple whose first item is them
                (smp ``aux_params``).
            mask: ground truth: binary (B, 1, H, W) bool, {0, 1} or uint8 {0, 255}; multiclass (B, H, W) or
                (B, 1, H, W) integer class indices; multilabel (B, C, H, W) in {0, 1}. Values equal to
                ``ignore_index`` are ignored. On any device: it is moved to the logits'.
            targets: optional precomputed ``(core, border)`` from :func:`adst_plugin.targets.adst_targets`,
                (B, K, H, W) each, on any device.
        Returns:
            Scalar loss.
        Raises:
            RuntimeError: the model is in training mode but ran no training forward (with grad enabled) since the
                last loss call.
            ValueError: the logits are not the output of the model's last training forward (or computed from it);
                bad masks (on CUDA, after the first batch of a shape, at a later call: see ``_step_checks``).
        """
        maps, logits = self._take_maps(logits)
        labels = self._validate(logits, mask, maps, targets)
        on_logits = _to_logits(labels, logits)
        mask_term = self.base_loss(logits, on_logits.base)
        if maps is None:
            return self._log(mask_term, {}, mask_term)
        core, border = self._targets(labels, targets, logits.device)
        terms = aux_terms(
            self.config,
            maps,
            logits,
            on_logits.y,
            core,
            border,
            fused_loss=self.fused_loss,
            fused_target=on_logits.base,
            mode=self.mode,
            valid=on_logits.valid,
            index=on_logits.index,
        )
        aux = sum(weight * value for weight, value in terms.values())
        return self._log(mask_term, terms, self.config.w_mask * mask_term + self.aux_scale * aux)

    def _take_maps(self, output: Tensor | tuple[Tensor, ...]) -> tuple[HeadMaps | None, Tensor]:
        # The mask logits, and the head's maps of the training forward they came from (None in eval mode, without a
        # model, or when no training forward ran: _validate says which). Taken first, so that whatever fails below,
        # they are taken and never reach a later call.
        logits = mask_logits(output)
        if self.model is None:
            return None, logits
        training = self.model.training
        return self.model.pop_maps(logits if training else None), logits  # checks the pairing in training

    def _validate(
        self, logits: Tensor, mask: Any, maps: HeadMaps | None, targets: tuple[Tensor, Tensor] | None
    ) -> Labels:
        # Every check of the call, before any term: the inputs, the mask's one value check (a training step reads its
        # verdict back later, without a sync, where it can: _step_checks), the maps a training call needs, and given
        # targets. Returns the mask's forms on the mask's device.
        check_bchw(logits, "mask logits", "ADSTLoss", channels=self.classes)
        training = self.model is not None and self.model.training
        in_step = training if self.model is not None else logits.requires_grad  # no model: logits with a graph
        args = (self.mode, logits.shape[1], "ADSTLoss", self.ignore_index)
        labels = self._mask_check(check_labels, mask, *args, immediate=not in_step)
        check_mask_matches(labels.y, logits, "ADSTLoss")
        if training and maps is None:
            raise RuntimeError(
                "ADSTLoss: the model is in training mode but ran no training forward since the last loss call; "
                "call model(images) once before each criterion(logits, masks), with grad enabled (a forward under "
                "torch.no_grad() runs no head; for a validation loss call model.eval() first)"
            )
        if maps is not None and (maps.main.shape[0] != logits.shape[0] or maps.main.shape[-2:] != logits.shape[-2:]):
            raise ValueError(
                f"ADSTLoss: the head's maps {tuple(maps.main.shape)} do not match the logits {tuple(logits.shape)}; "
                "give the loss the model's output uncropped (the maps cannot be cropped the same way)"
            )
        if maps is not None and targets is not None:
            channels = target_channels(self.mode, logits.shape[1])
            for name, value in zip(("core", "border"), targets, strict=True):
                check_bchw(value, name, "ADSTLoss", channels=channels)
                check_mask_matches(value, logits, f"ADSTLoss ({name})")
        return labels

    def _targets(
        self, labels: Labels, targets: tuple[Tensor, Tensor] | None, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        # The core and border maps: given, or built where the mask is (the OpenCV engine for a CPU mask); on the
        # logits' device either way.
        if targets is None:
            # From the validated target classes, one {0, 1} channel each: no second value check. A binary mask
            # without ignored pixels keeps the binary form; every other is K binary channels.
            binary = self.mode == BINARY_MODE and labels.valid is None
            kwargs = {**self.target_kwargs, "ignore_index": None, "classes": labels.y.shape[1]}
            targets = adst_targets(labels.y, **{**kwargs, "mode": BINARY_MODE if binary else MULTILABEL_MODE})
        core, border = targets
        return core.to(device), border.to(device)

    def _log(self, mask_term: Tensor, terms: dict[str, tuple[float, Tensor]], total: Tensor) -> Tensor:
        # last_terms, detached, for logging; returns the total.
        self.last_terms = {"mask": mask_term.detach(), **{k: v.detach() for k, (_, v) in terms.items()}}
        self.last_terms["total"] = total.detach()
        return total

    def extra_repr(self) -> str:
        weights = ", ".join(f"{name}={getattr(self.config, name)}" for name in LOSS_WEIGHTS)
        return f"mode={self.mode!r}, {weights}, aux_scale={self.aux_scale}"


def _resolve_ignore_index(ignore_index: int | None, base_loss: Any) -> int | None:
    declared = loss_ignore_index(base_loss)
    if ignore_index is None:
        return declared
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ADSTLoss: expected ignore_index to be an int or None, got {type(ignore_index).__name__}")
    if declared is not None and declared != ignore_index:
        raise ValueError(
            f"ADSTLoss: expected ignore_index={ignore_index} to match the base loss's ignore_index, got {declared}. "
            "Drop ignore_index= (the base loss's is used) or build the base loss with the same one."
        )
    return ignore_index


def _to_logits(labels: Labels, logits: Tensor) -> Labels:
    # The mask's forms on the logits' device: the target classes in the logits' dtype, the base loss's mask as it
    # takes it (long class indices, else the logits' dtype).
    device = logits.device
    y = labels.y.to(device=device, dtype=logits.dtype)
    if labels.base is labels.y:
        base = y
    else:
        base = labels.base.to(device) if labels.base.dtype == torch.long else labels.base.to(device, logits.dtype)
    valid = None if labels.valid is None else labels.valid.to(device)
    index = None if labels.index is None else labels.index.to(device)
    return Labels(y, base, valid, index)
