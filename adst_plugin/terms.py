"""The auxiliary terms of one batch: which term each :class:`~adst_plugin.presets.ADSTConfig` field asks for, read
on which channels of the head's maps, against which targets.

Every map of the head has one channel per model class; the terms read the target-class channels
(:func:`~adst_plugin.modes.target_slice`: all of them, or classes 1 .. C-1 in multiclass mode) against the
(B, K, H, W) core and border maps. Pixels that ``valid`` marks False (the base loss's ``ignore_index``) carry no
weight in any term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .constants import SDF_CLIP
from .functional import (
    band_weights,
    binarization_loss,
    boundary_loss,
    core_loss,
    edge_loss,
    sdf_loss,
    signed_distance,
    symmetric_threshold,
    threshold_loss,
)
from .head import HeadMaps
from .modes import BINARY_MODE, MULTICLASS_MODE, target_slice
from .presets import ADSTConfig

__all__ = ["aux_terms"]


def aux_terms(
    config: ADSTConfig,
    maps: HeadMaps,
    logits: Tensor,
    target: Tensor,
    core: Tensor,
    border: Tensor,
    *,
    fused_loss: Callable[[Tensor, Tensor], Tensor],
    fused_target: Tensor,
    mode: str = BINARY_MODE,
    valid: Tensor | None = None,
    index: Tensor | None = None,
) -> dict[str, tuple[float, Tensor]]:
    """``{name: (weight, value)}`` of the auxiliary terms that ``config`` defines.

    Args:
        config: weights, roles and target parameters.
        maps: the head's maps (B, C, H, W).
        logits: the model's mask logits (B, C, H, W).
        target: the target classes (B, K, H, W) in {0, 1}, float.
        core, border: the targets (B, K, H, W).
        fused_loss: the loss of ``"paper"``'s fused mask, taking ``fused_target`` (the base loss's form of the mask).
        fused_target: the mask as the base loss takes it.
        mode: the smp mode.
        valid: optional, broadcastable to ``target``: 1 where a pixel counts, 0 on ignored pixels.
        index: multiclass mode: long class indices (B, H, W), ignored pixels set to 0 (the boundary term's CE).
    """
    c = config
    weight = None if valid is None else valid.float()
    band = band_weights(border, c.thresh_min, c.thresh_max)
    if weight is not None:
        band = band * weight
    # The signed distance only for the options that read it: the default's step does not pay for it.
    regresses_sdf = c.main_target in ("sdf", "sdf-clip")
    needs_sdf = regresses_sdf or (c.fused_role == "threshold" and c.threshold_target == "symmetric")
    sdf = signed_distance(border, target, c.thresh_min, c.thresh_max) if needs_sdf else None
    main = target_slice(maps.main, mode)
    if regresses_sdf:
        main_term = sdf_loss(main, sdf, weight, clip=SDF_CLIP if c.main_target == "sdf-clip" else 1.0)
    else:
        main_term = core_loss(main, core, weight)
    terms: dict[str, tuple[float, Tensor]] = {"main": (c.w_main, main_term)}
    if c.edge_input == "logits":
        terms["edge"] = (c.w_edge, edge_loss(target_slice(maps.edge, mode), border, weight))
    if c.fused_role == "mask":
        fused = fused_target.to(maps.fused.dtype) if fused_target.is_floating_point() else fused_target
        terms["fused"] = (c.w_fused, fused_loss(maps.fused, fused))
    else:
        threshold = target_slice(maps.fused, mode)
        if c.threshold_target == "symmetric":  # every pixel: T is centred on the edge, not only near it
            everywhere = torch.ones_like(band) if weight is None else weight.expand_as(band)
            t_target, t_where = symmetric_threshold(sdf, c.thresh_min, c.thresh_max), everywhere
        else:
            t_target, t_where = border, band
        terms["threshold"] = (c.w_threshold, threshold_loss(threshold, t_target, t_where))
        binary = binarization_loss(
            logits, threshold, target, c.db_steepness, c.detach_threshold, mode=mode, weight=weight
        )
        terms["binary"] = (c.w_binary, binary)
    if c.w_boundary > 0:
        labels = index if mode == MULTICLASS_MODE else target
        terms["boundary"] = (c.w_boundary, boundary_loss(logits, labels, band, mode=mode))
    return terms
