"""smp's three segmentation modes: which one a model and a loss are in, and what the mask means in each.

=============  ========================  ========================================  ===========================
mode           model output              mask                                      target classes (K)
=============  ========================  ========================================  ===========================
``binary``     (B, 1, H, W), sigmoid     (B, 1, H, W) in {0, 1}                    the lesion (K = 1)
``multiclass`` (B, C, H, W), softmax     (B, H, W) or (B, 1, H, W) class indices   classes 1 .. C-1 (K = C - 1)
``multilabel`` (B, C, H, W), sigmoid     (B, C, H, W) in {0, 1}, may overlap      every channel (K = C)
=============  ========================  ========================================  ===========================

In ``multiclass`` mode class 0 is the background: it has no lesions, so it gets no core or border map (its "core"
would be the image far from every lesion, its band the whole background). The head keeps one channel per model
class; its background channel carries no target.

The mode is read from the user's smp loss (every smp loss has ``.mode``), from an explicit ``mode=``, or, for a
1-channel model, is ``"binary"``. :func:`resolve_mode` refuses a mode that cannot be known or that contradicts the
model. :func:`check_labels` turns a mask of the mode into :class:`Labels`, the one form the auxiliary terms read.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from segmentation_models_pytorch.losses import BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE
from torch import Tensor

from ._checks import check_class_mask, check_mask, check_multilabel_mask

__all__ = [
    "BINARY_MODE",
    "MODES",
    "MULTICLASS_MODE",
    "MULTILABEL_MODE",
    "Labels",
    "check_labels",
    "check_mode",
    "class_masks",
    "class_probability",
    "loss_ignore_index",
    "loss_mode",
    "resolve_mode",
    "target_channels",
    "target_slice",
]

#: The valid modes, smp's constants (``smp.losses.BINARY_MODE`` ...).
MODES = (BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE)

_HOW = (
    "pass base_loss=smp.losses.DiceLoss('multiclass', from_logits=True) (softmax over the classes, a mask of class "
    "indices) or DiceLoss('multilabel', from_logits=True) (a sigmoid per channel, a (B, C, H, W) mask in {0, 1}), "
    "or mode='multiclass' / mode='multilabel'"
)


def loss_mode(loss: Any) -> str | None:
    """The smp mode a loss declares (``loss.mode``, as every smp loss has), or None."""
    mode = getattr(loss, "mode", None)
    return mode if isinstance(mode, str) and mode in MODES else None


def loss_ignore_index(loss: Any) -> int | None:
    """The ``ignore_index`` a loss declares (smp losses, ``nn.CrossEntropyLoss``), or None."""
    value = getattr(loss, "ignore_index", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_mode(mode: Any, classes: int | None, where: str, source: str = "mode") -> str:
    """Validate ``mode`` against the model's number of classes (None: unknown, anything goes).

    Raises:
        ValueError: an unknown mode, ``binary`` for C > 1, or ``multiclass`` for C = 1.
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{where}: expected {source} to be one of {list(MODES)}, got {mode!r}")
    if classes is None:
        return mode
    if mode == BINARY_MODE and classes != 1:
        raise ValueError(
            f"{where}: expected a {mode!r} {source} for a 1-class model, got a {classes}-class model; {_HOW}"
        )
    if mode == MULTICLASS_MODE and classes < 2:
        raise ValueError(
            f"{where}: expected at least 2 classes for {source}={mode!r} (a softmax over one class is constant), "
            "got a 1-class model; use a 'binary' loss (or mode='binary'), or build the model with classes=C"
        )
    return mode


def resolve_mode(
    classes: int | None,
    where: str,
    *,
    mode: str | None = None,
    base_loss: Any = None,
    model_mode: str | None = None,
) -> str:
    """The mode of a model and its loss, from every source that states one; they must agree.

    Sources, any of which may be absent: an explicit ``mode``, ``base_loss.mode`` (smp losses), and the mode the
    model was wrapped with. None of them: ``"binary"`` for a 1-channel (or unknown) model; a C > 1 model then raises.

    Raises:
        ValueError: the sources contradict each other or the model, or the mode of a C > 1 model is unknown.
    """
    sources = (("mode", mode), ("base_loss.mode", loss_mode(base_loss)), ("the model's mode", model_mode))
    stated = [(source, value) for source, value in sources if value is not None]
    for source, value in stated:
        check_mode(value, classes, where, source)
    if len({value for _, value in stated}) > 1:
        said = ", ".join(f"{source}={value!r}" for source, value in stated)
        raise ValueError(f"{where}: expected one mode, got {said}. Pass the same mode everywhere (or drop mode=).")
    if stated:
        return stated[0][1]
    if classes is None or classes == 1:
        return BINARY_MODE
    raise ValueError(f"{where}: cannot tell the mode of a {classes}-class model; {_HOW}")


def target_channels(mode: str, classes: int) -> int:
    """K, the number of target classes (channels of the core and border maps): 1, C - 1 or C."""
    return classes - 1 if mode == MULTICLASS_MODE else classes


def target_slice(x: Tensor, mode: str) -> Tensor:
    """The target-class channels of a (B, C, H, W) map: all of them, or 1 .. C-1 in multiclass mode."""
    return x[:, 1:] if mode == MULTICLASS_MODE else x


def class_probability(logits: Tensor, mode: str) -> Tensor:
    """The model's own probability of each class, in float32: softmax over C (multiclass), else a sigmoid.

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """
    if mode == MULTICLASS_MODE:
        return torch.softmax(logits.float(), dim=1)
    return torch.sigmoid(logits.float())


def class_masks(
    index: Tensor, classes: int, ignore_index: int | None = None, *, present_only: bool = False
) -> tuple[Tensor, Tensor]:
    """The target classes' masks of a multiclass mask: the one place that says which pixel belongs to which class
    (the loss's own targets and :func:`~adst_plugin.targets.adst_targets` both read it).

    Pixels equal to ``ignore_index`` belong to no class, whichever value it is: 255, -1, or a class index in
    [1, C) that a label set reserves for "unlabelled".

    Shape:
        long (B, H, W) ->
        ``(index, masks)``: the indices with ignored pixels set to 0, long (B, H, W), and bool (B, C - 1, H, W),
        channel k for class k + 1; with ``present_only``, ``(pairs, masks)``: the flat (image, class - 1) indices
        into (B * (C - 1)) of the pairs whose class is present, and their bool (N, H, W) masks, found by one count
        over the mask (the cost does not grow with C).
    """
    # Comparisons, not F.one_hot / a scatter: a value the (possibly deferred) check has yet to reject must not
    # crash a device kernel before that check reports it.
    labelled = (index >= 0) & (index < classes)
    if ignore_index is not None:
        labelled &= index != ignore_index
    index = torch.where(labelled, index, 0)
    if not present_only:
        return index, index[:, None] == torch.arange(1, classes, device=index.device).view(1, -1, 1, 1)
    batch, channels = index.shape[0], classes - 1
    offsets = torch.arange(batch, device=index.device).view(batch, 1, 1) * classes
    counts = torch.bincount((index + offsets).view(-1), minlength=batch * classes).view(batch, classes)
    pairs = counts[:, 1:].reshape(-1).nonzero().squeeze(1)
    wanted = (pairs % channels + 1).view(-1, 1, 1)
    return pairs, index[torch.div(pairs, channels, rounding_mode="floor")] == wanted


class Labels(NamedTuple):
    """A validated mask, in the forms the loss reads.

    Attributes:
        y: bool (B, K, H, W): pixel p belongs to target class k (ignored pixels belong to none).
        base: the mask as the base loss takes it: float {0, 1} (B, 1 or C, H, W) in binary / multilabel mode, long
            class indices (B, H, W) in multiclass mode; ``ignore_index`` values are kept for the base loss to skip.
        valid: bool, broadcastable to ``y``: False on ignored pixels; None when nothing is ignored (no
            ``ignore_index``).
        index: multiclass mode: long (B, H, W) class indices with ignored pixels set to 0; otherwise None.
    """

    y: Tensor
    base: Tensor
    valid: Tensor | None = None
    index: Tensor | None = None


def check_labels(mask: Any, mode: str, classes: int, where: str, ignore_index: int | None = None) -> Labels:
    """Validate a mask of ``mode`` for a ``classes``-channel model and return its :class:`Labels` (same device).

    A binary mask without ``ignore_index`` takes the binary check, :func:`~adst_plugin._checks.check_mask` (bool,
    {0, 1} or uint8 {0, 255}). With ``ignore_index`` the values are {0, 1} and ``ignore_index``.

    Raises:
        TypeError, ValueError: see :func:`~adst_plugin._checks.check_mask`,
            :func:`~adst_plugin._checks.check_class_mask` and :func:`~adst_plugin._checks.check_multilabel_mask`.
    """
    if mode == MULTICLASS_MODE:
        base = check_class_mask(mask, classes, where, ignore_index)
        index, y = class_masks(base, classes, ignore_index)
        valid = None if ignore_index is None else (base != ignore_index)[:, None]
        return Labels(y, base, valid, index)
    if mode == BINARY_MODE and ignore_index is None:
        y = check_mask(mask, where)
        return Labels(y, y)
    y, ignored = check_multilabel_mask(mask, classes, where, ignore_index)
    if ignored is None:
        return Labels(y, y)
    base = y.float().masked_fill(ignored, float(ignore_index))  # type: ignore[arg-type]
    return Labels(y & ~ignored, base, ~ignored)
