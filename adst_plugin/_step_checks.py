"""Mask validation in the training step without a device -> host sync, after the first batch of each shape.

Reading a value check's verdict back to the host (``bool(tensor)``) waits for every kernel queued on the device: a
sync per training step. :class:`StepMaskCheck` runs a validator (which reports its verdict through
:func:`~adst_plugin._checks.values_ok`) so that:

- masks on the CPU (e.g. straight from the DataLoader) are checked at once, on the host: no device is involved;
- on CUDA, the first batch of each (shape, dtype, device) is checked at once (one sync; the error names the bad
  values). Later batches are checked on the device with the verdict left unread: it is copied to pinned host
  memory without blocking, and read at a later call once a CUDA event says the copy is done. A bad mask then
  raises there, naming the call it came from. Eval-mode calls (validation) wait for every verdict first;
- on other accelerators (MPS, XPU) every batch is checked at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from ._checks import deferred_value_checks

__all__ = ["StepMaskCheck"]

T = TypeVar("T")

#: Device types whose value checks are read back later, without a sync.
DEFERRED_DEVICES: tuple[str, ...] = ("cuda",)


class _Verdict:
    """A 0-dim bool on the device, on its way to the host: a non-blocking copy into pinned memory and an event."""

    def __init__(self, ok: Tensor, call: int):
        self.call = call
        self.event: Any = None
        if ok.device.type == "cuda":
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(ok, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:  # a device type added to DEFERRED_DEVICES in tests: read in place
            self.host = ok

    def arrived(self) -> bool:
        return self.event is None or self.event.query()

    def holds(self) -> bool:
        if self.event is not None:
            self.event.synchronize()  # a no-op once arrived(); waits only when validation flushes
        return bool(self.host)


class StepMaskCheck:
    """Run a mask validator once per training call, with its verdict read back without a sync where it can be.

    Args:
        where: the caller's name, for error messages.

    Example:
        >>> check = StepMaskCheck("ADSTLoss")
        >>> y = check(check_mask, mask, "ADSTLoss")  # check_mask(mask, "ADSTLoss"); immediate=True in eval mode
    """

    def __init__(self, where: str):
        self.where = where
        self._seen: set[tuple[Any, ...]] = set()
        self._pending: deque[_Verdict] = deque()
        self._calls = 0

    def __call__(self, validate: Callable[..., T], mask: Any, *args: Any, immediate: bool = False) -> T:
        """``validate(mask, *args)``; ``immediate``: read every verdict now (no training step)."""
        self._calls += 1
        self.raise_failed(wait=immediate)
        device = mask.device if isinstance(mask, Tensor) else None
        if immediate or device is None or device.type not in DEFERRED_DEVICES:
            return validate(mask, *args)
        key = (tuple(mask.shape), mask.dtype, device)
        if key not in self._seen:
            result = validate(mask, *args)
            self._seen.add(key)
            return result
        with deferred_value_checks() as verdicts:
            result = validate(mask, *args)
        if verdicts:
            ok = verdicts[0] if len(verdicts) == 1 else torch.stack(verdicts).all()
            self._pending.append(_Verdict(ok, self._calls))
        return result

    def raise_failed(self, wait: bool = False) -> None:
        """Raise ValueError if a verdict that has arrived (``wait``: every verdict) says a mask was invalid."""
        while self._pending and (wait or self._pending[0].arrived()):
            verdict = self._pending.popleft()
            if not verdict.holds():  # the rest stay queued: each bad mask is reported at a call of its own
                raise ValueError(
                    f"{self.where}: expected valid masks, got invalid values in the masks of call {verdict.call} "
                    f"(checked on the device without a sync, so reported {self._calls - verdict.call} call(s) "
                    "later). Give the loss the masks before .to(device): masks on the CPU are checked at once, "
                    "with the bad values named."
                )

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickling) starts afresh: CUDA events cannot be copied.
        return {"where": self.where, "_seen": set(), "_pending": deque(), "_calls": 0}
