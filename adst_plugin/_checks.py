"""Input validation. The only place that builds shape/dtype/value error messages.

Messages follow ``"<where>: expected <what>, got <actual>[. <fix>]"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def _is_tracing() -> bool:
    # Data-dependent checks (value sets, NaN) cannot run under tracing/compilation.
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


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
    integer or float with values in ``{0, 1}``, or ``uint8`` with values in ``{0, 255}``.

    Raises:
        TypeError: if ``mask`` is neither a tensor nor an array, or has a complex/unsupported dtype.
        ValueError: wrong rank, channel count, empty spatial size, NaN, or values outside the sets above.
    """
    if isinstance(mask, np.ndarray):
        if mask.dtype == object or not (np.issubdtype(mask.dtype, np.number) or mask.dtype == np.bool_):
            raise TypeError(f"{where}: expected a numeric or bool mask, got numpy dtype {mask.dtype}")
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where}: expected mask as torch.Tensor or numpy.ndarray, got {type(mask).__name__}")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"{where}: expected mask of shape (B, 1, H, W), got {tuple(mask.shape)}. "
            "Add the missing dims with mask[:, None] or mask[None, None]."
        )
    if mask.shape[-2] == 0 or mask.shape[-1] == 0:
        raise ValueError(f"{where}: expected a mask with non-empty H and W, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{where}: expected a real-valued mask, got dtype {mask.dtype}")
    if _is_tracing():
        return mask > 0
    if mask.is_floating_point() and bool(torch.isnan(mask).any()):
        raise ValueError(f"{where}: mask contains NaN")
    is_zero, is_one = mask == 0, mask == 1
    if bool((is_zero | is_one).all()):
        return is_one
    if mask.dtype == torch.uint8 and bool((is_zero | (mask == 255)).all()):
        return mask == 255
    bad = torch.unique(mask[~(is_zero | is_one)])[:5].tolist()
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
