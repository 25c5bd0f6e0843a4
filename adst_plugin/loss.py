"""``ADSTLoss``: the mask loss plus the auxiliary terms of the ADST head.

``total = w_mask * base(masks, y)
        + aux_scale * (w_main * BCE(main, core(y)) + w_edge * BCE(edge, border(y)) + w_fused * fused_loss(fused, y))``

``fused_loss`` is ``base`` unless given.

``core`` and ``border`` are built on the fly from ``y`` (on its device) by :mod:`adst_plugin.targets`,
or passed in precomputed (e.g. from DataLoader workers). ``aux_scale`` (1 by default) lets a training
loop fade the auxiliary terms out.
"""

from __future__ import annotations

from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch.nn.functional as F
from torch import Tensor, nn

from . import constants as C
from ._checks import check_bchw, check_mask, check_mask_matches
from .targets import adst_targets
from .wrapper import ADSTOutput

__all__ = ["ADSTLoss", "DiceBCELoss"]


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


class ADSTLoss(nn.Module):
    """Loss for :class:`~adst_plugin.ADSTModel` outputs; plain tensors get the base loss alone.

    Args:
        base_loss: any ``(logits, target) -> scalar`` callable for the mask and fused logits
            (default :class:`DiceBCELoss`, e.g. ``smp.losses.DiceLoss("binary")`` works too).
        fused_loss: a different callable for the fused logits only (default: ``base_loss``).
        w_mask, w_main, w_edge, w_fused: term weights.
        shrink_ratio, thresh_min, thresh_max: target parameters (see :mod:`adst_plugin.targets`).
        aux_scale: multiplier of the three auxiliary terms; a training loop may change it per epoch.

    After each call ``last_terms`` holds the detached terms (``mask``, ``main``, ``edge``, ``fused``,
    ``total``) for logging.

    Example:
        >>> criterion = ADSTLoss()
        >>> loss = criterion(model(images), masks)   # ADSTOutput in train mode, tensor in eval mode
    """

    def __init__(
        self,
        base_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        fused_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        w_mask: float = C.W_MASK,
        w_main: float = C.W_MAIN,
        w_edge: float = C.W_EDGE,
        w_fused: float = C.W_FUSED,
        shrink_ratio: float = C.SHRINK_RATIO,
        thresh_min: float = C.THRESH_MIN,
        thresh_max: float = C.THRESH_MAX,
        aux_scale: float = 1.0,
    ):
        super().__init__()
        weights = {"w_mask": w_mask, "w_main": w_main, "w_edge": w_edge, "w_fused": w_fused, "aux_scale": aux_scale}
        for name, value in weights.items():
            if not value >= 0:
                raise ValueError(f"ADSTLoss: expected {name} >= 0, got {value}")
        for name, fn in (("base_loss", base_loss), ("fused_loss", fused_loss)):
            if fn is not None and not callable(fn):
                raise TypeError(f"ADSTLoss: expected {name} to be callable, got {type(fn).__name__}")
        self.base_loss = base_loss if base_loss is not None else DiceBCELoss()
        self.fused_loss = fused_loss if fused_loss is not None else self.base_loss
        self.w_mask, self.w_main, self.w_edge, self.w_fused = w_mask, w_main, w_edge, w_fused
        self.aux_scale = aux_scale
        self.target_kwargs = {"shrink_ratio": shrink_ratio, "thresh_min": thresh_min, "thresh_max": thresh_max}
        self.last_terms: dict[str, Tensor] = {}

    def forward(
        self, outputs: ADSTOutput | Tensor, mask: Tensor, targets: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Total loss.

        Args:
            outputs: :class:`ADSTOutput` (train mode) or mask logits (B, 1, H, W) (eval mode).
            mask: ground truth (B, 1, H, W): bool, {0, 1} or uint8 {0, 255}.
            targets: optional precomputed ``(core, border)`` from :func:`adst_plugin.targets.adst_targets`.
        Returns:
            Scalar loss.
        """
        if isinstance(outputs, ADSTOutput):
            logits = outputs.masks
        elif isinstance(outputs, Tensor):
            logits = outputs
        else:
            raise TypeError(
                f"ADSTLoss: expected ADSTOutput or mask logits Tensor, got {type(outputs).__name__}. "
                "For models with aux_params in eval mode pass outputs[0]."
            )
        check_bchw(logits, "mask logits", "ADSTLoss", channels=1)
        target = check_mask(mask, "ADSTLoss")
        check_mask_matches(target, logits, "ADSTLoss")
        target = target.to(device=logits.device, dtype=logits.dtype)
        mask_term = self.base_loss(logits, target)
        if not isinstance(outputs, ADSTOutput):
            self.last_terms = {"mask": mask_term.detach(), "total": mask_term.detach()}
            return mask_term

        if targets is None:
            core, border = adst_targets(target, **self.target_kwargs)
        else:
            core, border = targets
            for name, value in (("core", core), ("border", border)):
                check_bchw(value, name, "ADSTLoss", channels=1)
                check_mask_matches(value, logits, f"ADSTLoss ({name})")
        main_term = F.binary_cross_entropy_with_logits(outputs.main.float(), core.to(logits.device).float())
        edge_term = F.binary_cross_entropy_with_logits(outputs.edge.float(), border.to(logits.device).float())
        fused_term = self.fused_loss(outputs.fused, target.to(outputs.fused.dtype))
        aux = self.w_main * main_term + self.w_edge * edge_term + self.w_fused * fused_term
        total = self.w_mask * mask_term + self.aux_scale * aux
        self.last_terms = {
            "mask": mask_term.detach(),
            "main": main_term.detach(),
            "edge": edge_term.detach(),
            "fused": fused_term.detach(),
            "total": total.detach(),
        }
        return total

    def extra_repr(self) -> str:
        return (
            f"w_mask={self.w_mask}, w_main={self.w_main}, w_edge={self.w_edge}, w_fused={self.w_fused}, "
            f"aux_scale={self.aux_scale}, {', '.join(f'{k}={v}' for k, v in self.target_kwargs.items())}"
        )
