"""Pure tensor functions behind the ADST loss terms and the head's gradient path.

Every term here has a stated minimiser (its target), checked on discs, rings and two-lesion masks by
``tests/plugin/test_functional.py`` (the signed-distance terms by ``tests/plugin/test_boundary_terms.py``):

======================  ==================================  =============================================
term                    inputs                              minimised by
======================  ==================================  =============================================
``core_loss``           main logits, core map               main > 0 exactly on the core
``threshold_loss``      threshold logits T, border map      sigmoid(T) = border on the border band
``binarization_loss``   mask logits, T, mask                sigmoid(logits) > T exactly on the mask;
                                                            multiclass: each pixel's argmax is its class
``boundary_loss``       mask logits, mask, border map       the mask on every band pixel
``sdf_loss``            main logits, signed distance s      tanh(main) = s (zero level set: the lesion edge)
``threshold_loss``      T, symmetric_threshold(s)           sigmoid(T) = 0.5 on the edge, rising inside
``edge_loss`` (paper)   edge map, border map                *not* the mask (kept for the paper preset)
======================  ==================================  =============================================

Every term takes (B, K, H, W) maps, one channel per target class (K = 1 in binary mode; see
:mod:`adst_plugin.modes`), and averages over all of them, so each class weighs the same. An optional ``weight``
(broadcastable, 0 on ``ignore_index`` pixels) takes pixels out of a term: their values then change no gradient.

Computations are done in float32 (safe under autocast); every function returns a scalar.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .modes import BINARY_MODE, MULTICLASS_MODE, class_probability, target_slice

__all__ = [
    "band_weights",
    "binarization_loss",
    "boundary_loss",
    "class_probability",
    "core_loss",
    "edge_loss",
    "grad_scale",
    "mask_logits",
    "sdf_loss",
    "signed_distance",
    "symmetric_threshold",
    "threshold_loss",
]


def mask_logits(output: Any) -> Any:
    """The mask logits of a segmentation model's output: the output itself, or the first item of smp's
    ``(masks, labels)`` tuple (``aux_params``). Shapes are checked by the callers, which know what they expect."""
    return output[0] if isinstance(output, (tuple, list)) else output


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass.

    ``scale = 0`` is ``x.detach()``, ``scale = 1`` is ``x``. Compile- and DDP-safe (plain autograd ops).

    Example:
        >>> x = torch.ones(2, requires_grad=True); grad_scale(x, 0.25).sum().backward(); x.grad
        tensor([0.2500, 0.2500])
    """
    if scale == 1.0:
        return x
    detached = x.detach()
    if scale == 0.0:
        return detached
    return detached + scale * (x - detached)


def band_weights(border: Tensor, thresh_min: float, thresh_max: float) -> Tensor:
    """The border band as weights: 1 on a lesion boundary, falling linearly to 0 at distance D.

    Args:
        border: border map (B, K, H, W) in [thresh_min, thresh_max].
    Returns:
        (B, K, H, W) in [0, 1]; 0 farther than D from every boundary (and everywhere for empty masks).
    """
    band = ((border.float() - thresh_min) / (thresh_max - thresh_min)).clamp_(0.0, 1.0)
    return band.masked_fill_(border.float() >= thresh_max, 1.0)  # exactly 1 (the ratio rounds to 1 - 6e-8)


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    # Normalised by the band's mass; 0 (with a gradient path) when the batch has no band at all.
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _mean(values: Tensor, weight: Tensor | None) -> Tensor:
    # The plain mean, or the mean over the pixels that ``weight`` keeps (expanded: a (B, 1, H, W) weight counts
    # once per channel).
    if weight is None:
        return values.mean()
    return _weighted_mean(values, weight.float().expand_as(values))


def core_loss(main_logits: Tensor, core: Tensor, weight: Tensor | None = None) -> Tensor:
    """BCE of the main map against the core map: ``(B, K, H, W), (B, K, H, W) -> ()``."""
    if weight is None:
        return F.binary_cross_entropy_with_logits(main_logits.float(), core.float())
    bce = F.binary_cross_entropy_with_logits(main_logits.float(), core.float(), reduction="none")
    return _mean(bce, weight)


def edge_loss(edge: Tensor, border: Tensor, weight: Tensor | None = None) -> Tensor:
    """The paper's edge term: BCE of the Laplacian edge map against the border map.

    Its minimiser is an edge map equal to the border map in [0.3, 0.7]; taken of the mask logits, that is
    *not* the mask, so confident correct logits are penalised. Kept for ``preset="paper"`` only.
    """
    if weight is None:
        return F.binary_cross_entropy_with_logits(edge.float(), border.float())
    return _mean(F.binary_cross_entropy_with_logits(edge.float(), border.float(), reduction="none"), weight)


def threshold_loss(threshold_logits: Tensor, border: Tensor, band: Tensor) -> Tensor:
    """L1 of sigmoid(T) against the border map, averaged over the border band (DBNet's threshold loss).

    Args:
        threshold_logits: T logits (B, K, H, W).
        border: border map (B, K, H, W).
        band: band weights (B, K, H, W) from :func:`band_weights`; DBNet uses the band's indicator. Multiply
            it by the valid pixels to leave ignored ones out.
    """
    thresh = torch.sigmoid(threshold_logits.float())
    return _weighted_mean((thresh - border.float()).abs(), (band > 0).float())


def binarization_loss(
    mask_logits: Tensor,
    threshold_logits: Tensor,
    mask: Tensor,
    steepness: float,
    detach_threshold: bool = True,
    *,
    mode: str = BINARY_MODE,
    weight: Tensor | None = None,
) -> Tensor:
    """BCE of the differentiable binarisation ``B = sigmoid(k (P - T))`` against the mask, scaled by 1/k.

    P = sigmoid(mask logits) is the exported model's own probability, so the gradient reaches the exported
    logits: ``d/dP = B - y``, i.e. a BCE in P's space that is sharpened at the threshold. Divided by k, the term
    is a smooth hinge on the margin ``P - T``: about ``|P - T|`` on the wrong side, ~0 once the margin is
    ``>> 1/k``; its gradient never vanishes for confidently wrong pixels (a Dice on B would, like exp(-k |P - T|)).
    For any fixed T in (0, 1) the loss decreases as P moves towards the mask.

    Multiclass mode binarises every class's softmax probability, the background's too, on every pixel, absent
    classes included, against a bar held on the target's side of 1/2: ``max(T_c, 1/2)`` on class c, ``min(T_c,
    1/2)`` elsewhere, 1/2 for the background (it has no T). T still raises the bar near edges but can no longer
    lower it past 1/2, so the term is ~0 only where P_y > 1/2 for each pixel's class y: its argmax. Multilabel
    mode: each channel's sigmoid against T, as in binary mode.

    Args:
        mask_logits: (B, C, H, W), the model's logits.
        threshold_logits: T (B, K, H, W), one channel per target class.
        mask: (B, K, H, W) in {0, 1}, the target classes.
        steepness: k (DBNet: 50).
        detach_threshold: T enters detached (this term then trains the logits only).
        mode: the smp mode of the logits (:mod:`adst_plugin.modes`).
        weight: optional, 0 on ignored pixels.
    """
    thresh = torch.sigmoid(threshold_logits.float())
    if detach_threshold:
        thresh = thresh.detach()
    if mode == MULTICLASS_MODE:
        # P_k < T_k for the lesion classes alone leaves the argmax open for C > 2 (0.33, 0.39, 0.28 meets T = 0.5
        # and predicts class 1). Every class, the background too (at 1/2: it has no T), against a bar held on the
        # target's side of 1/2 decides it: P_c > 1/2 makes c the argmax.
        mask = torch.cat([1.0 - mask.float().amax(1, keepdim=True), mask.float()], 1)
        thresh = torch.cat([torch.full_like(thresh[:, :1], 0.5), thresh], 1)
        bar = torch.where(mask.bool(), thresh.clamp_min(0.5), thresh.clamp_max(0.5))
        logits = steepness * (class_probability(mask_logits, mode) - bar)
    else:
        logits = steepness * (target_slice(class_probability(mask_logits, mode), mode) - thresh)
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, mask.float()) / steepness
    bce = F.binary_cross_entropy_with_logits(logits, mask.float(), reduction="none")
    return _mean(bce, weight) / steepness


def boundary_loss(mask_logits: Tensor, mask: Tensor, band: Tensor, *, mode: str = BINARY_MODE) -> Tensor:
    """BCE of the mask logits weighted by the border band, averaged over the band's mass.

    The weights come from the exact per-lesion distances of the targets (1 on the boundary, 0 at D), so
    the term concentrates the mask loss where lesion edges are decided. Minimised by the mask on every band
    pixel; pixels farther than D from every boundary carry no weight (the mask term covers them).

    Multiclass mode: the cross-entropy of the softmax, weighted per pixel by the largest band of any target class
    (``mask`` is then the long class indices (B, H, W), ``band`` (B, C - 1, H, W)). Binary and multilabel: the BCE
    of each channel weighted by its own band. Zero the band on ignored pixels to leave them out.
    """
    if mode == MULTICLASS_MODE:
        ce = F.cross_entropy(
            mask_logits.float(), mask.long().reshape(band.shape[0], *band.shape[-2:]), reduction="none"
        )
        return _weighted_mean(ce, band.float().amax(1))
    bce = F.binary_cross_entropy_with_logits(mask_logits.float(), mask.float(), reduction="none")
    return _weighted_mean(bce, band)


def signed_distance(border: Tensor, mask: Tensor, thresh_min: float, thresh_max: float) -> Tensor:
    """Truncated, normalised signed distance to the nearest lesion boundary, read off the exact border map.

    ``s = +d/D`` inside a lesion and ``-d/D`` outside, clipped to [-1, 1]: 0 on the lesion's boundary pixels,
    +1 at depth >= D, -1 at distance >= D (and everywhere in an empty mask). ``d/D`` is the border map's own
    ``1 - band`` (per-lesion Euclidean distance over that lesion's offset D), so no second distance transform runs.

    Shape:
        border (B, K, H, W) in [thresh_min, thresh_max], mask (B, K, H, W) in {0, 1} -> (B, K, H, W) float32
    """
    depth = 1.0 - band_weights(border, thresh_min, thresh_max)
    return torch.where(mask.bool(), depth, -depth)


def sdf_loss(main_logits: Tensor, sdf: Tensor, weight: Tensor | None = None, clip: float = 1.0) -> Tensor:
    """L1 of ``tanh(main)`` against the signed distance ``s`` clipped to ``[-clip, clip]``:
    ``(B, K, H, W), (B, K, H, W) -> ()``.

    Minimised by ``tanh(main) = clip(s)``: at ``clip = 1`` (``s`` as it is) beyond distance D of every edge only at
    infinite logits, at ``clip < 1`` everywhere with finite logits. Unlike the core map (a binary blob inside each
    lesion), ``s`` changes sign exactly at the lesion edge and varies linearly across it, so features that regress it
    must locate the edge.
    """
    target = sdf.float() if clip >= 1.0 else sdf.float().clamp(-clip, clip)
    return _mean((torch.tanh(main_logits.float()) - target).abs(), weight)


def symmetric_threshold(sdf: Tensor, thresh_min: float, thresh_max: float) -> Tensor:
    """A threshold target centred on the edge: 0.5 on the boundary, up to ``0.5 + (max - min) / 2`` at depth D
    inside and down to ``0.5 - (max - min) / 2`` at distance D outside (0.7 / 0.3 with the defaults).

    With it the binarisation ``sigmoid(k (P - T))`` asks for P > 0.5 just inside the edge and P < 0.5 just outside:
    its zero-margin line is the true edge, where the border map (``thresh_max`` on both sides of the boundary)
    asks inside pixels for P > 0.7 and lets outside pixels sit anywhere below 0.7.
    """
    return 0.5 + 0.5 * (thresh_max - thresh_min) * sdf.float()
