"""DataLoader-side target building: :class:`ADSTTargetCollate` builds the ADST targets in the worker processes.

>>> loader = DataLoader(dataset, batch_size=16, num_workers=4, collate_fn=ADSTTargetCollate())
>>> for images, masks, (core, border) in loader:
...     ...

The targets (see :mod:`adst_plugin.targets`) then cost nothing on the training step's critical path: they are built
on the CPU workers, in parallel with the step, and travel to the device with the batch (``pin_memory`` applies to
them too). Build them *after* augmentation, i.e. here and not in the dataset's cache, so they always match the masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torch.utils.data import default_collate

from adst_plugin.constants import SHRINK_RATIO, THRESH_MAX, THRESH_MIN
from adst_plugin.modes import BINARY_MODE, MULTICLASS_MODE
from adst_plugin.targets import _Spec, adst_targets

__all__ = ["ADSTTargetCollate"]

_WHERE = "ADSTTargetCollate"


class ADSTTargetCollate:
    """Collate ``(image, mask)`` samples and add the ADST targets ``(core, border)`` of the batch's masks.

    Use it as a ``DataLoader``'s ``collate_fn``: the targets are computed in the worker processes (or in the main
    process with ``num_workers=0``) with exactly :func:`~adst_plugin.targets.adst_targets`. Picklable, so it works
    with every worker start method (``fork``, ``spawn``, ``forkserver``).

    Args:
        collate_fn: Collates the list of samples into ``(images, masks)``; default
            :func:`torch.utils.data.default_collate`.
        shrink_ratio: DBNet shrink ratio ``r`` in ``(0, 1)``.
        thresh_min: Border value far from any boundary, ``0 <= thresh_min < thresh_max``.
        thresh_max: Border value on a boundary, ``thresh_max <= 1``.
        num_threads: Threads over the batch for the OpenCV engine; ``None`` uses ``torch.get_num_threads()``
            (1 inside DataLoader workers, which already run in parallel).
        engine: ``"auto"``, ``"opencv"`` or ``"torch"``, as in :func:`~adst_plugin.targets.adst_targets`
            (collated masks are CPU tensors, so ``"auto"`` is the OpenCV engine).
        mode, classes, ignore_index: the smp mode, the model's classes and the unlabelled value, as in
            :func:`~adst_plugin.targets.adst_targets` (``ADSTTargetCollate(**criterion.target_kwargs)`` passes
            the loss's).

    Shape:
        samples: a sequence of ``(image, mask)`` pairs (or of tuples whose last item is the mask, e.g.
        ``(index, image, mask)``); each mask ``(1, H, W)``, binary (bool, ``{0, 1}`` or uint8 ``{0, 255}``); in
        multiclass mode ``(H, W)`` or ``(1, H, W)`` class indices, in multilabel mode ``(C, H, W)``.
        -> ``(images, masks, (core, border))`` (or ``(*other_fields, masks, (core, border))``): whatever
        ``collate_fn`` makes of the other fields, masks as collated, and ``core`` / ``border`` float32
        ``(B, K, H, W)`` (K = 1 binary, C - 1 multiclass, C multilabel).

    Raises:
        TypeError, ValueError: at construction on invalid parameters; at call time on samples that are not
        ``(image, mask)`` pairs or masks that are not ``(1, H, W)`` binary masks.
    """

    def __init__(
        self,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        *,
        shrink_ratio: float = SHRINK_RATIO,
        thresh_min: float = THRESH_MIN,
        thresh_max: float = THRESH_MAX,
        num_threads: int | None = None,
        engine: str = "auto",
        mode: str = BINARY_MODE,
        classes: int | None = None,
        ignore_index: int | None = None,
    ) -> None:
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"{_WHERE}: expected collate_fn to be callable or None, got {type(collate_fn).__name__}")
        self.spec = _Spec(shrink_ratio=shrink_ratio, thresh_min=thresh_min, thresh_max=thresh_max,
                          num_threads=num_threads, engine=engine, mode=mode, classes=classes,
                          ignore_index=ignore_index)  # fmt: skip
        self.spec.check(_WHERE)  # at construction, not in a worker
        self.collate_fn = default_collate if collate_fn is None else collate_fn

    def __repr__(self) -> str:
        name = getattr(self.collate_fn, "__name__", type(self.collate_fn).__name__)
        spec = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.spec).items())
        return f"{type(self).__name__}(collate_fn={name}, {spec})"

    def __call__(self, samples: Sequence[Any]) -> tuple[Any, ...]:
        if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence) or len(samples) == 0:
            raise TypeError(f"{_WHERE}: expected a non-empty list of (image, mask) samples, got {_describe(samples)}")
        for i, sample in enumerate(samples):
            if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence) or len(sample) < 2:
                raise TypeError(
                    f"{_WHERE}: expected every sample to be an (image, mask) pair (or a tuple ending with the mask), "
                    f"got {_describe(sample)} at index {i}. Return (image, mask) from the dataset, or wrap its output "
                    "in a custom collate_fn."
                )
            if len(sample) != len(samples[0]):
                raise TypeError(
                    f"{_WHERE}: expected every sample to have the same number of fields ({len(samples[0])}), "
                    f"got {_describe(sample)} at index {i}"
                )
        collated = self.collate_fn(list(samples))
        if not isinstance(collated, Sequence) or len(collated) != len(samples[0]):
            raise TypeError(
                f"{_WHERE}: expected collate_fn to return one batch per sample field ({len(samples[0])}), "
                f"got {_describe(collated)}"
            )
        *rest, masks = collated
        if not isinstance(masks, Tensor):
            raise TypeError(f"{_WHERE}: expected the collated masks to be a torch.Tensor, got {_describe(masks)}")
        if masks.ndim == 3 and self.spec.mode != MULTICLASS_MODE:
            raise ValueError(
                f"{_WHERE}: expected each mask of shape (1, H, W), got {tuple(masks.shape[1:])}. "
                "Add the channel dim in the dataset, e.g. mask[None]."
            )
        return (*rest, masks, adst_targets(masks, **dataclasses.asdict(self.spec)))


def _describe(obj: object) -> str:
    """Short type (and length / shape) of ``obj`` for error messages."""
    if isinstance(obj, Tensor):
        return f"Tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} of length {len(obj)}"
    return type(obj).__name__
