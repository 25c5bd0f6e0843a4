"""``ADSTLoss``: the mask loss plus the auxiliary terms of the ADST head.

``ADSTLoss(model)`` is given the wrapped model once; ``criterion(logits, mask)`` then takes the same mask
logits a plain loss takes and collects the head's maps from ``model.pop_maps()``. In training mode::

    total = w_mask * base(logits, y) + aux_scale * sum_t w_t * term_t

with the terms of the model's :class:`~adst_plugin.presets.ADSTConfig` (pure functions in
:mod:`adst_plugin.functional`; ``core`` and ``border`` targets built on the fly on the mask's device, or
passed in). In eval mode (or with ``model=None``) the loss is ``base(logits, y)`` alone, so a logged
validation loss is comparable with a plain model's. ``aux_scale`` (1 by default) lets a loop fade the
auxiliary terms out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_bchw, check_mask, check_mask_matches
from .functional import (
    band_weights,
    binarization_loss,
    boundary_loss,
    core_loss,
    edge_loss,
    mask_logits,
    sdf_loss,
    signed_distance,
    symmetric_threshold,
    threshold_loss,
)
from .presets import LOSS_WEIGHTS, ADSTConfig, get_config
from .targets import adst_targets

if TYPE_CHECKING:
    from .wrapper import ADSTModel

__all__ = ["ADSTLoss", "DiceBCELoss"]

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


class DiceBCELoss(nn.Module):
    """smp's binary Dice loss plus BCE-with-logits, both on logits (B, 1, H, W).

    Shape:
        logits (B, 1, H, W), target (B, 1, H, W) in [0, 1] -> scalar
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0):
        super().__init__()
        self.dice = smp.losses.DiceLoss(smp.losses.BINARY_MODE, from_logits=True)
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = target.to(logits.dtype)
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * F.binary_cross_entropy_with_logits(
            logits, target
        )


def _unwrap(model: Any) -> Any:
    # DDP keeps the module in .module, torch.compile in ._orig_mod.
    for _ in range(4):
        if hasattr(type(model), "pop_maps"):  # the class: OptimizedModule forwards attribute look-ups
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return model


class ADSTLoss(nn.Module):
    """Loss for a model wrapped with :func:`~adst_plugin.wrap_with_adst`.

    Args:
        model: the :class:`~adst_plugin.ADSTModel` (also accepted under DDP or ``torch.compile``); ``None``
            gives the plain base loss (a baseline with the same loss class).
        base_loss: any ``(logits, target) -> scalar`` callable for the mask logits (default :class:`DiceBCELoss`;
            e.g. ``smp.losses.DiceLoss("binary")``).
        fused_loss: a different callable for the paper preset's fused mask (default: ``base_loss``).
        aux_scale: multiplier of every auxiliary term; a training loop may change it per epoch.
        **overrides: loss weights (``w_mask``, ``w_core``, ``w_edge``, ``w_fused``, ``w_threshold``, ``w_binary``,
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
        **overrides: Any,
    ):
        super().__init__()
        for name, fn in (("base_loss", base_loss), ("fused_loss", fused_loss)):
            if fn is not None and not callable(fn):
                raise TypeError(f"ADSTLoss: expected {name} to be callable, got {type(fn).__name__}")
        unknown = sorted(set(overrides) - set(LOSS_FIELDS))
        if unknown:
            raise TypeError(f"ADSTLoss: unknown option(s) {unknown}; valid options are {list(LOSS_FIELDS)}")
        if not aux_scale >= 0:
            raise ValueError(f"ADSTLoss: expected aux_scale >= 0, got {aux_scale}")
        wrapped = _unwrap(model) if model is not None else None
        if model is not None and wrapped is None:
            raise TypeError(
                f"ADSTLoss: expected the model returned by wrap_with_adst (or None), got {type(model).__name__}"
            )
        base_config = wrapped.config if wrapped is not None else get_config()
        self.config: ADSTConfig = base_config.replace(**overrides) if overrides else base_config
        # A plain attribute, not a submodule: the loss must not own (or save, or move) the model.
        self.__dict__["model"] = wrapped
        self.base_loss = base_loss if base_loss is not None else DiceBCELoss()
        self.fused_loss = fused_loss if fused_loss is not None else self.base_loss
        self.aux_scale = aux_scale
        self.last_terms: dict[str, Tensor] = {}

    @property
    def target_kwargs(self) -> dict[str, float]:
        """The target parameters, for :func:`~adst_plugin.targets.adst_targets` (e.g. in DataLoader workers)."""
        c = self.config
        return {"shrink_ratio": c.shrink_ratio, "thresh_min": c.thresh_min, "thresh_max": c.thresh_max}

    def forward(
        self, logits: Tensor | tuple[Tensor, ...], mask: Tensor, targets: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Total loss.

        Args:
            logits: the model's output: mask logits (B, 1, H, W), or a tuple whose first item is them
                (smp ``aux_params``).
            mask: ground truth (B, 1, H, W): bool, {0, 1} or uint8 {0, 255}.
            targets: optional precomputed ``(core, border)`` from :func:`adst_plugin.targets.adst_targets`.
        Returns:
            Scalar loss.
        Raises:
            RuntimeError: the model is in training mode but ran no training forward since the last loss call.
        """
        logits = check_bchw(mask_logits(logits), "mask logits", "ADSTLoss", channels=1)
        target = check_mask(mask, "ADSTLoss")
        check_mask_matches(target, logits, "ADSTLoss")
        target = target.to(device=logits.device, dtype=logits.dtype)
        mask_term = self.base_loss(logits, target)
        model = self.model
        maps = model.pop_maps() if model is not None else None
        if model is None or not model.training:
            self.last_terms = {"mask": mask_term.detach(), "total": mask_term.detach()}
            return mask_term
        if maps is None:
            raise RuntimeError(
                "ADSTLoss: the model is in training mode but ran no training forward since the last loss call; "
                "call model(images) once before each criterion(logits, masks)"
            )
        if maps.main.shape[0] != logits.shape[0] or maps.main.shape[-2:] != logits.shape[-2:]:
            raise ValueError(
                f"ADSTLoss: the head's maps {tuple(maps.main.shape)} do not match the logits {tuple(logits.shape)}; "
                "pass the output of the model's last forward"
            )
        c = self.config
        if targets is None:
            core, border = adst_targets(target, **self.target_kwargs)
        else:
            core, border = targets
            for name, value in (("core", core), ("border", border)):
                check_bchw(value, name, "ADSTLoss", channels=1)
                check_mask_matches(value, logits, f"ADSTLoss ({name})")
            core, border = core.to(logits.device), border.to(logits.device)
        band = band_weights(border, c.thresh_min, c.thresh_max)
        sdf = signed_distance(border, target, c.thresh_min, c.thresh_max)
        terms: dict[str, tuple[float, Tensor]] = {}
        if c.main_target == "sdf":
            terms["sdf"] = (c.w_core, sdf_loss(maps.main, sdf))
        else:
            terms["core"] = (c.w_core, core_loss(maps.main, core))
        if c.edge_input == "logits":
            terms["edge"] = (c.w_edge, edge_loss(maps.edge, border))
        if c.fused_role == "mask":
            terms["fused"] = (c.w_fused, self.fused_loss(maps.fused, target.to(maps.fused.dtype)))
        else:
            if c.threshold_target == "symmetric":  # every pixel: T is centred on the edge, not only near it
                t_target, t_where = symmetric_threshold(sdf, c.thresh_min, c.thresh_max), torch.ones_like(band)
            else:
                t_target, t_where = border, band
            terms["threshold"] = (c.w_threshold, threshold_loss(maps.fused, t_target, t_where))
            binary = binarization_loss(logits, maps.fused, target, c.db_steepness, c.detach_threshold)
            terms["binary"] = (c.w_binary, binary)
        if c.w_boundary > 0:
            terms["boundary"] = (c.w_boundary, boundary_loss(logits, target, band))
        aux = sum(weight * value for weight, value in terms.values())
        total = c.w_mask * mask_term + self.aux_scale * aux
        self.last_terms = {"mask": mask_term.detach(), **{k: v.detach() for k, (_, v) in terms.items()}}
        self.last_terms["total"] = total.detach()
        return total

    def extra_repr(self) -> str:
        weights = ", ".join(f"{name}={getattr(self.config, name)}" for name in LOSS_WEIGHTS)
        return f"{weights}, aux_scale={self.aux_scale}"
