"""Peer arm: nnU-Net-style multi-scale deep supervision, dropped at export.

nnU-Net (Isensee et al., Nature Methods 2021) puts a 1x1 segmentation conv on every decoder stage but the
lowest, supervises each with the mask loss against the mask downsampled (nearest) to that stage's size, and
weighs the scales ``1, 1/2, 1/4, ...`` from the full-resolution output down, the lowest at 0, normalised to
sum 1. :class:`DeepSupervisionModel` / :class:`DeepSupervisionLoss` do that for an smp model: the full-resolution
output is the model's own mask logits, and the 1x1 heads read the other decoder stages through forward hooks
(registered once, removed on export). Like the ADST head, they exist only while training.

Export path: every auxiliary term trains its 1x1 conv and, through the tapped stage, the encoder and the
decoder blocks up to that stage; ``export()`` keeps those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adst_examples.aux_loss import AuxHeadLoss
from adst_plugin._checks import check_bchw
from adst_plugin.functional import mask_logits
from adst_plugin.hooks import FeatureTap, feature_channels, resolve_module
from adst_plugin.wrapper import HeadWrapper

__all__ = ["DeepSupervisionLoss", "DeepSupervisionModel", "default_stages", "scale_weights"]


def default_stages(model: nn.Module) -> list[str]:
    """The decoder stages nnU-Net supervises: every ``decoder.blocks`` entry but the last (whose output the
    segmentation head already reads) and the first (the lowest resolution, weight 0 in nnU-Net), deepest last."""
    blocks = getattr(getattr(model, "decoder", None), "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) < 3:
        raise ValueError(
            f"DeepSupervisionModel: {type(model).__name__} has no decoder.blocks list with >= 3 stages; "
            "pass stages=['decoder.<path>', ...] naming the decoder stages to supervise"
        )
    return [f"decoder.blocks.{i}" for i in range(len(blocks) - 2, 0, -1)]


def scale_weights(n_aux: int) -> list[float]:
    """nnU-Net's weights for the full-resolution output and ``n_aux`` coarser stages: ``1/2**i``, normalised."""
    raw = [0.5**i for i in range(n_aux + 1)]
    return [w / sum(raw) for w in raw]


class DeepSupervisionModel(HeadWrapper):
    """A segmentation model plus a 1x1 logit conv on each of several decoder stages (training only).

    Args:
        model: an smp model (classes=1) returning mask logits (B, 1, H, W), or a tuple whose first item is them.
        stages: dotted paths of the stages to supervise, finest first; default :func:`default_stages`.

    ``forward`` returns exactly ``model(x)``; in training mode the stages' logits (each at its own size) are kept
    until :meth:`pop_aux`. :meth:`export` returns the plain model without hooks or heads.
    """

    def __init__(self, model: nn.Module, stages: Sequence[str] | None = None):
        super().__init__(model, None, "DeepSupervisionModel")
        self.stages = list(stages) if stages is not None else default_stages(model)
        modules = [resolve_module(model, path, "DeepSupervisionModel") for path in self.stages]
        self._taps = [FeatureTap(module) for module in modules]
        channels = [
            feature_channels(model, p, m, "DeepSupervisionModel") for p, m in zip(self.stages, modules, strict=True)
        ]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in channels)
        self._arm()

    def _arm(self) -> None:
        for tap in getattr(self, "_taps", ()):
            tap.capture.active = self.training

    def forward(self, x: Tensor) -> Any:
        """Exactly ``self.model(x)``; in training mode the stages' aux logits are also kept for the loss."""
        self._arm()
        output = self.model(x)
        if self.training:
            check_bchw(mask_logits(output), "mask logits", "DeepSupervisionModel", channels=1)
            aux = []
            for path, tap, head in zip(self.stages, self._taps, self.heads, strict=True):
                features = tap.pop()
                if features is None:
                    raise RuntimeError(f"DeepSupervisionModel: {path!r} did not run during forward; check stages=")
                aux.append(head(features))
            self._pending = tuple(aux)
        return output

    def pop_aux(self) -> tuple[Tensor, ...] | None:
        """The stages' logits of the last training-mode forward, finest first, handed over once."""
        return self._hand_over()

    def remove_hooks(self) -> None:
        for tap in self._taps:
            tap.remove()

    def extra_repr(self) -> str:
        return f"stages={self.stages}"


class DeepSupervisionLoss(AuxHeadLoss):
    """``sum_i w_i base(logits_i, mask_i)`` over the full-resolution output and the stages, nnU-Net's weights.

    Args:
        model: the :class:`DeepSupervisionModel` (also under DDP or ``torch.compile``).
        base_loss: the mask loss at every scale (default Dice+BCE).

    In eval mode the loss is ``base(logits, mask)`` alone. ``last_terms`` holds ``mask``, ``aux`` (the weighted
    stage terms, training only) and ``total``.
    """

    model_type = DeepSupervisionModel

    def __init__(self, model: nn.Module, base_loss: Callable[[Tensor, Tensor], Tensor] | None = None):
        super().__init__(model, base_loss)
        self.weights = scale_weights(len(self.model.stages))
        self.main_weight = self.weights[0]

    def aux_term(self, aux: tuple[Tensor, ...], target: Tensor, logits: Tensor) -> Tensor:
        """Each stage's mask loss against the mask downsampled (nearest) to its size, at its scale's weight."""
        total = torch.zeros((), device=logits.device)
        for weight, stage in zip(self.weights[1:], aux, strict=True):
            small = F.interpolate(target, size=stage.shape[-2:], mode="nearest-exact")
            total = total + weight * self.base_loss(stage.to(logits.dtype), small)
        return total

    def extra_repr(self) -> str:
        return "weights=[" + ", ".join(f"{w:.3f}" for w in self.weights) + "]"
