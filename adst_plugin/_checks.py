"""Input validation shared by the package: tensors and masks (shape, dtype, values), and the numeric and named
parameters of the config, the head and the targets (:func:`check_int`, :func:`check_number`, :func:`check_choice`,
:func:`check_thresholds`), so one rule gives one message wherever it applies. Checks that belong to one contract
(the smp modes, the hand-over between a wrapper and its loss) stay with it.

Messages follow ``"<where>: expected <what>, got <actual>[. <fix>]"``; a wrong type raises ``TypeError``, a wrong
value ``ValueError``.

A validator reads its value check's verdict back to the host through :func:`values_ok`, once per call: on an
accelerator that read waits for the device (a sync). Inside :func:`deferred_value_checks` the verdict is collected
for a later read instead (:class:`~adst_plugin._step_checks.StepMaskCheck` does this in training steps), so a
validator must return the same result for valid input whichever way its verdict went.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

_DEFERRED: ContextVar[list[Tensor] | None] = ContextVar("adst_deferred_value_checks", default=None)


def _is_tracing() -> bool:
    # Data-dependent checks (value sets, NaN) cannot run under tracing/compilation.
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def values_ok(ok: Tensor) -> bool:
    """Whether the 0-dim bool ``ok`` ("every value is valid") holds: read now, or, inside
    :func:`deferred_value_checks`, collected unread and taken to hold."""
    deferred = _DEFERRED.get()
    if deferred is None:
        return bool(ok)
    deferred.append(ok.reshape(()))
    return True


@contextmanager
def deferred_value_checks() -> Iterator[list[Tensor]]:
    """Collect the verdicts of the :func:`values_ok` calls inside, unread (0-dim bool tensors on their devices)."""
    verdicts: list[Tensor] = []
    token = _DEFERRED.set(verdicts)
    try:
        yield verdicts
    finally:
        _DEFERRED.reset(token)


def check_int(value: Any, name: str, where: str, minimum: int = 1) -> int:
    """Check that ``value`` is an int (not a bool) ``>= minimum``; return it."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{where}: expected {name} to be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: expected {name} to be an int >= {minimum}, got {value!r}")
    return int(value)


def check_number(
    value: Any,
    name: str,
    where: str,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """Check that ``value`` is a real number (not a bool, not NaN) in the interval the bounds give; return it.

    Example:
        >>> check_number(1.5, "feature_grad", "ADSTConfig", low=0, high=1)
        Traceback (most recent call last):
        ValueError: ADSTConfig: expected 0 <= feature_grad <= 1, got 1.5
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{where}: expected {name} to be a real number, got {type(value).__name__}")
    above = low is None or (value > low if open_low else value >= low)
    below = high is None or (value < high if open_high else value <= high)
    if not (above and below):  # NaN fails every comparison
        below_op, above_op = "<" if open_high else "<=", ">" if open_low else ">="
        if low is not None and high is not None:
            bounds = f"{low:g} {'<' if open_low else '<='} {name} {below_op} {high:g}"
        else:
            bounds = f"{name} {above_op} {low:g}" if low is not None else f"{name} {below_op} {high:g}"
        raise ValueError(f"{where}: expected {bounds}, got {value!r}")
    return float(value)


def check_thresholds(thresh_min: Any, thresh_max: Any, where: str) -> None:
    """Check the border map's range: ``0 <= thresh_min < thresh_max <= 1``."""
    for name, value in (("thresh_min", thresh_min), ("thresh_max", thresh_max)):
        check_number(value, name, where)
    if not 0.0 <= thresh_min < thresh_max <= 1.0:
        raise ValueError(
            f"{where}: expected 0 <= thresh_min < thresh_max <= 1, got thresh_min={thresh_min!r}, "
            f"thresh_max={thresh_max!r}"
        )


def check_choice(value: Any, valid: tuple[str, ...], name: str, where: str) -> str:
    """Check that ``value`` is one of the ``valid`` names; return it."""
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected {name} to be one of {valid}, got {type(value).__name__}")
    if value not in valid:
        raise ValueError(f"{where}: unknown {name} {value!r}; valid options are {valid}")
    return value


def check_bchw(x: Any, name: str, where: str, channels: int | None = None) -> Tensor:
    """Check that ``x`` is a 4-D tensor ``(B, C, H, W)`` (optionally with ``C == channels``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{where}: expected {name} of shape (B, C, H, W), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{where}: expected {name} with {channels} channel(s) (B, {channels}, H, W), got {tuple(x.shape)}"
        )
    return x


def check_mask(mask: Any, where: str) -> Tensor:
    """Validate a binary lesion mask and return it as a ``bool`` tensor on its own device.

    Accepted: torch tensors or numpy arrays of shape ``(B, 1, H, W)`` that are ``bool``,
    integer or float with values in ``{0, 1}``, or ``uint8`` with values in ``{0, 255}``. One value check
    (:func:`values_ok`), none for bool masks or while tracing.

    Raises:
        TypeError: if ``mask`` is neither a tensor nor an array, or has a complex/unsupported dtype.
        ValueError: wrong rank, channel count, empty spatial size, NaN, or values outside the sets above.
    """
    mask = _as_tensor(mask, where)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"{where}: expected mask of shape (B, 1, H, W), got {tuple(mask.shape)}. "
            "Add the missing dims with mask[:, None] or mask[None, None]."
        )
    if mask.shape[-2] == 0 or mask.shape[-1] == 0:
        raise ValueError(f"{where}: expected a mask with non-empty H and W, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    is_zero = mask == 0
    if _is_tracing():
        return ~is_zero
    is_binary = is_zero | (mask == 1)  # NaN is neither
    ok = is_binary.all()
    if mask.dtype == torch.uint8:
        ok = ok | (is_zero | (mask == 255)).all()
    if values_ok(ok):
        return ~is_zero  # the positives of either encoding
    if mask.is_floating_point() and bool(torch.isnan(mask).any()):
        raise ValueError(f"{where}: mask contains NaN")
    bad = torch.unique(mask[~is_binary])[:5].tolist()
    raise ValueError(
        f"{where}: expected a binary mask with values in {{0, 1}} (or {{0, 255}} for uint8), "
        f"got other values such as {bad} (dtype {mask.dtype}). Threshold it first, e.g. mask > 127."
    )


def check_mask_matches(mask: Tensor, logits: Tensor, where: str) -> None:
    """Check that a ``(B, 1, H, W)`` mask has the same batch and spatial size as ``(B, 1, H, W)`` logits."""
    if mask.shape[0] != logits.shape[0] or mask.shape[-2:] != logits.shape[-2:]:
        raise ValueError(
            f"{where}: expected mask shape to match the logits {tuple(logits.shape)}, got {tuple(mask.shape)}"
        )


def _as_tensor(mask: Any, where: str) -> Tensor:
    # NumPy masks are viewed as tensors (no copy for contiguous arrays); anything else is a type error.
    if isinstance(mask, np.ndarray):
        if mask.dtype == object or not (np.issubdtype(mask.dtype, np.number) or mask.dtype == np.bool_):
            raise TypeError(f"{where}: expected a numeric or bool mask, got numpy dtype {mask.dtype}")
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where}: expected mask as torch.Tensor or numpy.ndarray, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{where}: expected a real-valued mask, got dtype {mask.dtype}")
    return mask


def _equals(m: Tensor, value: int) -> Tensor:
    # Integer tensors compare with a value they cannot hold after wrapping it (uint8 255 == -1): such a value
    # matches no pixel.
    if not m.is_floating_point() and m.dtype != torch.bool:
        info = torch.iinfo(m.dtype)
        if not info.min <= value <= info.max:
            return torch.zeros_like(m, dtype=torch.bool)
    return m == value


def check_class_mask(mask: Any, classes: int, where: str, ignore_index: int | None = None) -> Tensor:
    """Validate a multiclass mask and return it as long class indices ``(B, H, W)`` on its own device.

    Accepted: torch tensors or NumPy arrays ``(B, H, W)`` or ``(B, 1, H, W)`` of an integer (or bool) dtype, every
    value in ``[0, classes)`` or equal to ``ignore_index``. One value check (:func:`values_ok`), none while tracing
    or compiling.

    Raises:
        TypeError: a float, complex or non-numeric mask (class indices are integers).
        ValueError: a wrong shape, an empty H or W, or a value outside ``[0, classes)`` that is not ``ignore_index``.
    """
    m = _as_tensor(mask, where)
    if m.is_floating_point():
        raise TypeError(
            f"{where}: expected a multiclass mask of integer class indices, got dtype {m.dtype}. Convert a mask of "
            "whole numbers with mask.long(); a (B, C, H, W) mask in {0, 1} per class is multilabel: pass "
            "mode='multilabel'."
        )
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(
            f"{where}: expected a multiclass mask (B, H, W) or (B, 1, H, W) of class indices, got {tuple(m.shape)}. "
            "A (B, C, H, W) mask with one channel per class is multilabel (mode='multilabel'); a one-hot mask "
            "becomes class indices with mask.argmax(1)."
        )
    if m.shape[-2] == 0 or m.shape[-1] == 0:
        raise ValueError(f"{where}: expected a mask with non-empty H and W, got {tuple(m.shape)}")
    m = m.long()
    if _is_tracing() or m.numel() == 0:
        return m
    if ignore_index is None:  # one reduction instead of elementwise comparisons
        low, high = torch.aminmax(m)
        ok = (low >= 0) & (high < classes)
    else:
        ok = ~(((m < 0) | (m >= classes)) & (m != ignore_index)).any()
    if not values_ok(ok):
        bad = (m < 0) | (m >= classes)
        if ignore_index is not None:
            bad &= m != ignore_index
        values = torch.unique(m[bad])[:5].tolist()
        ignored = "" if ignore_index is None else f" or ignore_index={ignore_index}"
        raise ValueError(
            f"{where}: expected class indices in [0, {classes}){ignored} for a {classes}-class model, got values "
            f"such as {values}. Mark unlabelled pixels with ignore_index= (of the base loss or here), or build the "
            "model with as many classes as the mask has."
        )
    return m


def check_multilabel_mask(
    mask: Any, classes: int | None, where: str, ignore_index: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Validate a mask with one {0, 1} channel per class (multilabel, or binary with an ``ignore_index``).

    Accepted: torch tensors or NumPy arrays ``(B, C, H, W)`` (``C == classes`` when given): bool, {0, 1} of any
    numeric dtype, uint8 {0, 255} (without ``ignore_index``), plus ``ignore_index`` values when it is given. One
    value check (:func:`values_ok`), none for bool masks or while tracing or compiling.

    Returns:
        ``(positive, ignored)``: bool ``(B, C, H, W)`` each, on the mask's device; ``ignored`` is None without
        ``ignore_index``.

    Raises:
        TypeError: a complex or non-numeric mask.
        ValueError: a wrong shape, an empty H or W, NaN, or other values.
    """
    m = _as_tensor(mask, where)
    if m.ndim != 4 or (classes is not None and m.shape[1] != classes):
        channels = "C" if classes is None else classes
        raise ValueError(
            f"{where}: expected a mask (B, {channels}, H, W) with one {{0, 1}} channel per class, got "
            f"{tuple(m.shape)}. A (B, H, W) mask of class indices is multiclass (mode='multiclass'); make it one "
            "channel per class with F.one_hot(mask, C).permute(0, 3, 1, 2)."
        )
    if m.shape[-2] == 0 or m.shape[-1] == 0:
        raise ValueError(f"{where}: expected a mask with non-empty H and W, got {tuple(m.shape)}")
    if m.dtype == torch.bool:
        return m, None if ignore_index is None else torch.zeros_like(m)
    ignored = None if ignore_index is None else _equals(m, ignore_index)
    is_zero = m == 0
    positive = ~is_zero if ignored is None else ~is_zero & ~ignored  # the positives of either encoding
    if _is_tracing():
        return positive, ignored
    ok = is_zero | (m == 1) if ignored is None else is_zero | (m == 1) | ignored  # NaN is none of them
    verdict = ok.all()
    if ignored is None and m.dtype == torch.uint8:
        verdict = verdict | (is_zero | (m == 255)).all()
    if values_ok(verdict):
        return positive, ignored
    if m.is_floating_point() and bool(torch.isnan(m).any()):
        raise ValueError(f"{where}: mask contains NaN")
    bad = torch.unique(m[~ok])[:5].tolist()
    allowed = "{0, 1} (or {0, 255} for uint8)" if ignored is None else f"{{0, 1}} and ignore_index={ignore_index}"
    raise ValueError(
        f"{where}: expected a mask with values in {allowed}, got other values such as {bad} (dtype {m.dtype}). "
        "Threshold it first, e.g. mask > 127."
    )
