"""Peer arms of the study: what a user who wants sharper lesion edges would otherwise pick.

Every peer is used as its library ships it; this module only names, combines and weights them.

* **Mask losses** (:data:`LOSSES`, ``--loss``): smp's Lovász, focal and Tversky losses, MONAI's
  ``HausdorffDTLoss`` added to our Dice+BCE, and MONAI's own ``DiceCELoss``. Each factory returns an
  ``nn.Module`` mapping ``(logits (B, 1, H, W), target (B, 1, H, W)) -> scalar``. MONAI is imported only when a
  MONAI loss is built (``pip install -e "./examples[peers]"`` from the repository root).
* **Deep supervision the mmsegmentation way** (:class:`AuxFCNModel`, :class:`AuxFCNLoss`, ``--aux-fcn 0.4``): an
  FCN head (``FCNHead(num_convs=1)``: conv3x3-BN-ReLU-Dropout(0.1)-conv1x1) on a decoder stage, trained with the
  mask loss at weight 0.4 on its logits upsampled bilinearly to the mask size, and dropped at export. It follows
  the pattern of :class:`~adst_plugin.ADSTModel` / :class:`~adst_plugin.ADSTLoss`: the model's forward returns
  exactly the wrapped model's output and keeps the aux logits; the loss, given the model once, pops them.
* :data:`ARMS` (alias :data:`PEER_ARMS`): the study's peer arms, name -> model flags.

:func:`add_peer_arguments` adds ``--loss``, ``--hausdorff-weight``, ``--aux-fcn`` and ``--aux-fcn-features``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import segmentation_models_pytorch as smp
import torch.nn.functional as F
from torch import Tensor, nn

from adst_examples.aux_loss import AuxHeadLoss
from adst_examples.cli import non_negative_float
from adst_plugin import DiceBCELoss
from adst_plugin._checks import check_bchw
from adst_plugin.functional import mask_logits
from adst_plugin.wrapper import HeadWrapper

__all__ = [
    "ARMS",
    "HAUSDORFF_REFERENCE_SIZE",
    "HAUSDORFF_WEIGHT",
    "LOSSES",
    "PEER_ARMS",
    "TVERSKY_ALPHA",
    "TVERSKY_BETA",
    "AuxFCNLoss",
    "AuxFCNModel",
    "HausdorffDTTerm",
    "SumLoss",
    "add_peer_arguments",
    "build_loss",
    "fcn_head",
]

PEERS_EXTRA = 'pip install -e "./examples[peers]" (from the repository root)'

#: smp Tversky weights: ``alpha`` multiplies the false positives, ``beta`` the false negatives
#: (``TP / (TP + alpha*FP + beta*FN)``). See :func:`tversky_loss` for why FN weigh more.
TVERSKY_ALPHA, TVERSKY_BETA = 0.3, 0.7

#: Default weight of MONAI's HausdorffDTLoss in ``dice+hausdorff``, at the reference size below.
#: Measured on BUSI and Kvasir-SEG masks at 128² (8 each), MONAI's term (alpha=2, i.e. squared pixel distances)
#: is 260-370x Dice+BCE at initialisation, 130-180x early, ~40x mid-training and ~1.3x when nearly converged
#: (gradients w.r.t. the logits: 900-1300x, 550-850x, 250-300x, 2-4x). At 0.01 it is about 0.4x Dice+BCE in value
#: (2.5-3x in gradient) mid-training, where edges are refined, and does not swamp the mask loss by more than ~10x
#: in gradient at initialisation. The weight is meant to be chosen on validation: that is a study
#: sweep (``--hausdorff-weight``), this is the starting point.
HAUSDORFF_WEIGHT = 0.01
#: MONAI's HausdorffDT term grows with the square of the image side (it averages squared pixel distances); it is
#: multiplied by ``(REF² / (H·W))`` so one weight means the same at 96², 128² and 256².
HAUSDORFF_REFERENCE_SIZE = 128


def _monai_losses() -> Any:
    try:
        import monai.losses
    except ImportError as exc:  # pragma: no cover - exercised only without monai
        raise ImportError(
            f"the MONAI peer losses need MONAI >= 1.3 (and scipy for HausdorffDTLoss without cuCIM): {PEERS_EXTRA}"
        ) from exc
    return monai.losses


def _float_target(target: Tensor, like: Tensor) -> Tensor:
    return target.to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Mask losses
# --------------------------------------------------------------------------------------------------------------------


class SumLoss(nn.Module):
    """``sum_k w_k * term_k(logits, target)``; after each call ``last_terms`` holds the detached terms and ``total``.

    Args:
        **terms: ``name=(weight, loss)`` with ``loss: (logits, target) -> scalar``.
    """

    def __init__(self, **terms: tuple[float, nn.Module]):
        super().__init__()
        if not terms:
            raise ValueError("SumLoss: expected at least one term")
        self.weights = {name: float(weight) for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: loss for name, (_, loss) in terms.items()})
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = _float_target(target, logits)
        values = {name: loss(logits, target) for name, loss in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        self.last_terms = {**{k: v.detach() for k, v in values.items()}, "total": total.detach()}
        return total

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight:g}" for name, weight in self.weights.items())


class _Float32(nn.Module):
    """Runs a MONAI loss in float32 on a float target (its distance fields and sigmoid would lose bits in bf16)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()
        return self.loss(logits, _float_target(target, logits))


class HausdorffDTTerm(_Float32):
    """MONAI's ``HausdorffDTLoss(sigmoid=True)`` on binary logits, scaled by ``reference_size² / (H·W)``.

    MONAI's loss is ``mean((p - y)² · (d_p² + d_y²))`` with ``d`` the distance transforms of the thresholded
    prediction and of the mask in pixels, so it grows with the square of the image side; the scale keeps a
    weight's meaning across image sizes. The distance transforms run on the CPU (scipy) unless cuCIM/CuPy are
    installed, so a training step pays a host round trip.
    """

    def __init__(self, reference_size: int = HAUSDORFF_REFERENCE_SIZE):
        # include_background=True: with one channel MONAI ignores False anyway, but warns on every call.
        super().__init__(_monai_losses().HausdorffDTLoss(sigmoid=True, include_background=True))
        self.reference_size = reference_size

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        h, w = logits.shape[-2:]
        return super().forward(logits, target) * (self.reference_size**2 / (h * w))


def dice_bce_loss() -> nn.Module:
    """Our :class:`~adst_plugin.DiceBCELoss` (smp Dice + BCE-with-logits): every arm's mask loss by default."""
    return DiceBCELoss()


def dice_lovasz_loss() -> nn.Module:
    """smp ``DiceLoss`` + smp ``LovaszLoss`` (binary Lovász hinge on the logits), weights 1:1."""
    return SumLoss(
        dice=(1.0, smp.losses.DiceLoss(smp.losses.BINARY_MODE, from_logits=True)),
        lovasz=(1.0, smp.losses.LovaszLoss(smp.losses.BINARY_MODE, from_logits=True)),
    )


def dice_focal_loss() -> nn.Module:
    """smp ``DiceLoss`` + smp ``FocalLoss`` (binary, gamma=2, no alpha: smp's defaults), weights 1:1."""
    return SumLoss(
        dice=(1.0, smp.losses.DiceLoss(smp.losses.BINARY_MODE, from_logits=True)),
        focal=(1.0, smp.losses.FocalLoss(smp.losses.BINARY_MODE)),
    )


def tversky_loss() -> nn.Module:
    """smp ``TverskyLoss`` with ``alpha=0.3`` (false positives), ``beta=0.7`` (false negatives).

    Why these: lesion errors at blurred edges are mostly under-segmentation (the mask stops inside the fuzzy
    rim), and small lesions are missed entirely; both are false negatives. Weighting FN above FP moves the
    boundary outward into the rim and raises small-lesion recall. 0.3/0.7 is the setting Salehi et al. (2017,
    "Tversky loss function for image segmentation using 3D fully convolutional deep networks") found best for
    lesion Dice/F2; alpha = beta = 0.5 would be plain Dice.
    """
    return smp.losses.TverskyLoss(smp.losses.BINARY_MODE, from_logits=True, alpha=TVERSKY_ALPHA, beta=TVERSKY_BETA)


def dice_hausdorff_loss(hausdorff_weight: float = HAUSDORFF_WEIGHT) -> nn.Module:
    """Our Dice+BCE + ``hausdorff_weight`` x MONAI ``HausdorffDTLoss(sigmoid=True)`` (see :class:`HausdorffDTTerm`)."""
    if not (math.isfinite(hausdorff_weight) and hausdorff_weight >= 0):
        raise ValueError(f"dice+hausdorff: expected hausdorff_weight >= 0, got {hausdorff_weight}")
    return SumLoss(dicebce=(1.0, DiceBCELoss()), hausdorff=(hausdorff_weight, HausdorffDTTerm()))


def monai_dicece_loss() -> nn.Module:
    """MONAI ``DiceCELoss(sigmoid=True)`` as shipped (per-image Dice + BCE, weights 1:1): MONAI's own baseline."""
    return _Float32(_monai_losses().DiceCELoss(sigmoid=True))


#: Base (mask) loss name -> factory. ``build_loss`` passes ``hausdorff_weight`` to ``dice+hausdorff`` only.
LOSSES: dict[str, Callable[..., nn.Module]] = {
    "dice+bce": dice_bce_loss,
    "dice+lovasz": dice_lovasz_loss,
    "dice+focal": dice_focal_loss,
    "tversky": tversky_loss,
    "dice+hausdorff": dice_hausdorff_loss,
    "monai-dicece": monai_dicece_loss,
}
#: Losses that need MONAI (the ``[peers]`` extra).
MONAI_LOSSES = frozenset({"dice+hausdorff", "monai-dicece"})


def build_loss(name: str, *, hausdorff_weight: float = HAUSDORFF_WEIGHT) -> nn.Module:
    """The mask loss called ``name`` (a key of :data:`LOSSES`).

    Raises:
        KeyError: unknown name (the message lists the valid ones). ImportError: a MONAI loss without MONAI.
    """
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; valid names are {', '.join(LOSSES)}")
    if name == "dice+hausdorff":
        return LOSSES[name](hausdorff_weight=hausdorff_weight)
    return LOSSES[name]()


# --------------------------------------------------------------------------------------------------------------------
# Deep supervision: an mmsegmentation-style auxiliary FCN head
# --------------------------------------------------------------------------------------------------------------------


def fcn_head(in_channels: int, channels: int, dropout: float = 0.1) -> nn.Sequential:
    """mmsegmentation's ``FCNHead(num_convs=1, concat_input=False)``: conv3x3-BN-ReLU, Dropout2d, conv1x1 -> 1 logit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(channels, 1, 1),
    )


class AuxFCNModel(HeadWrapper):
    """A binary segmentation model plus an auxiliary FCN head on one of its stages (training only).

    Args:
        model: an smp model (classes=1) or any module returning mask logits (B, 1, H, W) or a tuple of them first.
        features: dotted path of the submodule the head reads: ``"decoder"`` (smp's decoder output: the same
            features the ADST head reads by default, so the arm isolates "any extra head" from "ADST's targets")
            or a decoder stage such as ``"decoder.blocks.2"`` (smp Unet: stride 4 at depth 5).
        in_channels: channels of those features; inferred for smp models.
        channels: hidden channels of the head; default ``max(16, in_channels // 4)`` (mmseg's aux head: 1024 -> 256).
        dropout: Dropout2d before the classifier (mmseg: 0.1).

    ``forward`` returns exactly ``model(x)``; in training mode the head's logits, upsampled bilinearly to the mask
    logits' size, are kept until :meth:`pop_aux` (:class:`AuxFCNLoss` calls it). In eval mode the hook captures
    nothing and no head runs. :meth:`export` returns a plain deep copy of ``model`` without hooks or head.
    """

    def __init__(
        self,
        model: nn.Module,
        features: str = "decoder",
        *,
        in_channels: int | None = None,
        channels: int | None = None,
        dropout: float = 0.1,
    ):
        super().__init__(model, features, "AuxFCNModel")
        in_channels = in_channels or self._feature_channels()
        self.head = fcn_head(in_channels, channels or max(16, in_channels // 4), dropout)

    def forward(self, x: Tensor) -> Any:
        """Exactly ``self.model(x)``; in training mode the aux logits are also kept for the loss."""
        self._arm()
        output = self.model(x)
        if self.training:
            masks = check_bchw(mask_logits(output), "mask logits", "AuxFCNModel")
            aux = self.head(self._features())
            if aux.shape[-2:] != masks.shape[-2:]:
                aux = F.interpolate(aux, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            self._pending = aux
        return output

    def pop_aux(self) -> Tensor | None:
        """The aux logits (B, 1, H, W) of the last training-mode forward, handed over once."""
        return self._hand_over()

    def extra_repr(self) -> str:
        return f"features={self.features!r}"


class AuxFCNLoss(AuxHeadLoss):
    """``base(logits, y) + weight * base(aux, y)`` in training mode, ``base(logits, y)`` in eval mode.

    Args:
        model: the :class:`AuxFCNModel` (also under DDP or ``torch.compile``); the loss pops its aux logits.
        base_loss: the mask loss, also applied to the aux logits (mmseg: the same loss type); default Dice+BCE.
        weight: the aux loss weight (mmseg's ``loss_weight=0.4``).

    ``last_terms`` holds the detached ``mask``, ``aux`` (the weighted aux term, training only) and ``total``.
    """

    model_type = AuxFCNModel

    def __init__(
        self, model: nn.Module, base_loss: Callable[[Tensor, Tensor], Tensor] | None = None, weight: float = 0.4
    ):
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"AuxFCNLoss: expected weight >= 0, got {weight}")
        super().__init__(model, base_loss)
        self.weight = float(weight)

    def aux_term(self, aux: Tensor, target: Tensor, logits: Tensor) -> Tensor:
        """The mask loss of the aux logits (upsampled to the mask by the model), at :attr:`weight`."""
        return self.weight * self.base_loss(aux.to(logits.dtype), target)

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"


# --------------------------------------------------------------------------------------------------------------------
# Flags and arms
# --------------------------------------------------------------------------------------------------------------------

#: The study's peer arms: name -> model flags (parsed by the model builder, which calls :func:`add_peer_arguments`).
PEER_ARMS: dict[str, str] = {
    "lovasz": "--no-adst --loss dice+lovasz",
    "focal": "--no-adst --loss dice+focal",
    "tversky": "--no-adst --loss tversky",
    "hausdorff": "--no-adst --loss dice+hausdorff",
    "monai-dicece": "--no-adst --loss monai-dicece",
    # The same features the ADST head reads (smp's decoder output): "an extra head" vs "ADST's head".
    "auxfcn": "--no-adst --aux-fcn 0.4",
    # mmseg's placement: an intermediate stage (smp Unet depth 5: decoder.blocks.2, 64 ch at stride 4).
    "auxfcn-mid": "--no-adst --aux-fcn 0.4 --aux-fcn-features decoder.blocks.2",
    # nnU-Net: a 1x1 head on each decoder stage, downsampled masks, weights halving per scale.
    "dsv": "--no-adst --deep-supervision",
}
#: What study.py reads (``adst_examples.peers.ARMS``).
ARMS = PEER_ARMS


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--loss``, ``--hausdorff-weight``, ``--aux-fcn WEIGHT`` and ``--aux-fcn-features PATH``."""
    g = parser.add_argument_group("peer arms (adst_examples.peers)")
    g.add_argument(
        "--loss",
        choices=list(LOSSES),
        default="dice+bce",
        help=f"mask loss of every variant; {', '.join(sorted(MONAI_LOSSES))} need {PEERS_EXTRA} [%(default)s]",
    )
    g.add_argument(
        "--hausdorff-weight",
        type=non_negative_float,
        default=HAUSDORFF_WEIGHT,
        help=f"weight of MONAI's HausdorffDTLoss in --loss dice+hausdorff, as at {HAUSDORFF_REFERENCE_SIZE}² "
        "(scaled by the image area) [%(default)s]",
    )
    g.add_argument(
        "--aux-fcn",
        type=non_negative_float,
        default=0.0,
        metavar="WEIGHT",
        help="mmseg-style auxiliary FCN head with this loss weight (mmseg: 0.4; 0 = off; with --no-adst) [%(default)s]",
    )
    g.add_argument(
        "--aux-fcn-features",
        default="decoder",
        metavar="PATH",
        help="submodule the auxiliary FCN head reads, e.g. decoder.blocks.2 [%(default)s]",
    )
    g.add_argument("--deep-supervision", action="store_true", help="nnU-Net-style deep supervision (with --no-adst)")
