"""What the peers' auxiliary-head losses share: the model found behind DDP or ``torch.compile``, the mask loss on
the model's logits, an auxiliary term in training mode only, and ``last_terms`` for logging.

:class:`~adst_examples.peers.AuxFCNLoss` (mmseg's FCN head) and
:class:`~adst_examples.deep_supervision.DeepSupervisionLoss` (nnU-Net's scales) differ only in :meth:`aux_term`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from adst_plugin import DiceBCELoss
from adst_plugin._checks import check_bchw, check_mask, check_mask_matches
from adst_plugin.functional import mask_logits
from adst_plugin.wrapper import unwrap_model

__all__ = ["AuxHeadLoss"]


class AuxHeadLoss(nn.Module):
    """``main_weight * base(logits, y) + aux_term(aux, y)`` in training mode, ``base(logits, y)`` in eval mode.

    The model keeps its auxiliary outputs of the last training forward (``pop_aux()``); the loss, given the model
    once, pops them, as :class:`~adst_plugin.ADSTLoss` pops the ADST maps. ``last_terms`` holds the detached
    ``mask``, ``aux`` (the weighted auxiliary term, training only) and ``total``.
    """

    #: The model class whose auxiliary outputs this loss reads.
    model_type: ClassVar[type[nn.Module]]
    #: Weight of the mask loss on the model's own logits in training mode.
    main_weight: float = 1.0

    def __init__(self, model: nn.Module, base_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        wrapped = unwrap_model(model, self.model_type)
        if wrapped is None:
            raise TypeError(f"{name}: expected a {self.model_type.__name__}, got {type(model).__name__}")
        if base_loss is not None and not callable(base_loss):
            raise TypeError(f"{name}: expected base_loss to be callable, got {type(base_loss).__name__}")
        self.__dict__["model"] = wrapped  # not a submodule: the loss must not own the model
        self.base_loss = base_loss if base_loss is not None else DiceBCELoss()
        self.last_terms: dict[str, Tensor] = {}

    def aux_term(self, aux: Any, target: Tensor, logits: Tensor) -> Tensor:
        """The weighted auxiliary term of what ``pop_aux()`` returned (``target`` is float, like ``logits``)."""
        raise NotImplementedError

    def forward(self, logits: Tensor | tuple[Tensor, ...], mask: Tensor) -> Tensor:
        name = type(self).__name__
        logits = check_bchw(mask_logits(logits), "mask logits", name, channels=1)
        target = check_mask(mask, name)
        check_mask_matches(target, logits, name)
        target = target.to(device=logits.device, dtype=logits.dtype)
        main = self.base_loss(logits, target)
        aux = self.model.pop_aux()
        if not self.model.training:
            self.last_terms = {"mask": main.detach(), "total": main.detach()}
            return main
        if aux is None:
            raise RuntimeError(
                f"{name}: the model is in training mode but ran no training forward since the last loss call; "
                "call model(images) once before each criterion(logits, masks)"
            )
        aux_total = self.aux_term(aux, target, logits)
        total = self.main_weight * main + aux_total
        self.last_terms = {"mask": main.detach(), "aux": aux_total.detach(), "total": total.detach()}
        return total
