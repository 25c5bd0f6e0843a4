"""DBNet-style training targets (core and border maps) from binary lesion masks.

AdSTNet supervises its auxiliary head with two maps derived from the ground-truth mask, following DBNet:

* the **core** ("shrink") map: each lesion shrunk inwards by an offset ``D``;
* the **border** ("threshold") map: ``thresh_max`` on the lesion boundary, decaying linearly with the distance to
  it and reaching ``thresh_min`` at distance ``D`` (inside and outside the lesion).

Definitions (all exact, pixel-centre Euclidean geometry, every lesion handled separately):

* **Boundary**: a mask pixel with at least one 4-neighbour outside the mask. The image frame does *not* count as
  outside (out-of-frame neighbours are read with replicate padding): a lesion cut by the frame continues beyond the
  field of view, so the frame is not a lesion edge.
* **Components**: 8-connected components of the mask. For component ``c``: ``A_c`` pixels, ``L_c`` boundary pixels,
  offset ``D_c = A_c (1 - r^2) / L_c`` with ``r = shrink_ratio``, and ``d_c(p)`` the Euclidean distance from pixel
  ``p`` to the nearest boundary pixel of ``c`` (``0`` on that boundary).
* **Core**: the pixels of ``c`` with ``d_c >= D_c``, union over the components.
* **Border**: ``thresh_min + (thresh_max - thresh_min) * max_c clip(1 - d_c / D_c, 0, 1)`` at every pixel.

Degenerate cases (deliberate choices):

* A component too small or too thin to shrink (no pixel reaches ``D_c``: 1-pixel lesions, 1-pixel-wide lines,
  thin shapes) is never lost from the core map: its *innermost* pixels are kept instead, i.e. the pixels of ``c``
  where ``d_c`` equals its maximum over ``c`` (all ties).
* A component without boundary pixels (only possible when the whole frame is lesion) is entirely core, and the
  border map is ``thresh_min`` everywhere. An empty mask gives an empty core and ``thresh_min`` everywhere.

Engines (``engine="auto" | "opencv" | "torch"``; both give the same maps: core bit-for-bit, border bit-for-bit in
practice and always within one float32 ulp; the tests check both against an independent SciPy reference):

* ``"opencv"`` (used by ``"auto"`` for NumPy masks and CPU tensors): the mask batch is moved to CPU once; for each
  mask the lesion bounding box is labelled with OpenCV (8-connectivity), and for each component an exact Euclidean
  distance transform (``cv2.distanceTransform(..., cv2.DIST_L2, cv2.DIST_MASK_PRECISE)``) is run on the component's
  bounding box expanded by ``ceil(D_c) - 1``. That is exact: all of the component's boundary pixels lie in the crop,
  and outside the crop ``d_c >= D_c`` contributes nothing. OpenCV's float32 distances are snapped to the square root
  of the nearest integer squared distance, so distances are exact (for distances below ~1000 px) and results are
  bit-for-bit deterministic: independent of threading and batch composition, and equivariant under flips and
  90-degree rotations. Masks of a batch are processed by ``num_threads`` threads (default
  ``torch.get_num_threads()``, which is 1 inside DataLoader workers); OpenCV and large NumPy operations release the
  GIL, but the per-component glue does not, so threads pay off mostly for large masks. OpenCV also parallelises
  large transforms on its own pool (``cv2.setNumThreads``), which this module leaves alone. The cost is dominated by
  the lesion area plus a ring of width ``D`` around each lesion; masks made of hundreds of specks are handled exactly
  but more slowly. A CUDA mask makes one round trip through host memory.
* ``"torch"`` (used by ``"auto"`` for tensors on any non-CPU device, e.g. CUDA): pure torch on the mask's device,
  the targets never leave it. Connected components by label propagation (3x3 max of pixel indices within the
  mask, plus two pointer jumps per step, until a fixed point); per component ``A_c``, ``L_c`` and the bounding box
  by scatter reductions; then, batched over all components of the batch (chunks of components whose crops have a
  similar size, stacked as one ``(n, h, w)`` tensor), the same crops as the OpenCV engine and the exact squared
  Euclidean distance to each component's *own* boundary by the separable two-pass method (pass 1: distance to the
  nearest boundary pixel in the same column, by cumulative max / min of row indices; pass 2: ``min_x' (x - x')^2 +
  g(x')^2`` over ``|x - x'| <= ceil(D_c)``, which is all the targets need: farther pixels are ``>= D_c`` either way),
  in integers; core and border values are scattered back with ``amax``. Host synchronisation: one convergence test
  of the labelling per block of steps (a typical batch needs one) and one small read of the component table (count,
  areas, lengths, boxes: it sizes the crops); the masks and targets themselves never leave the device. On CPU this
  engine is correct but far slower than OpenCV (docs/results.md, "Target generation"), which is why ``"auto"`` uses
  it only off the CPU.

Modes (``mode=``, smp's, see :mod:`adst_plugin.modes`): ``"binary"`` (the default) takes a ``(B, 1, H, W)`` mask and
gives ``(B, 1, H, W)`` maps. ``"multiclass"`` takes ``(B, H, W)`` or ``(B, 1, H, W)`` class indices and
``classes=C``, and gives ``(B, C - 1, H, W)`` maps, channel k for class k + 1 (class 0 is the background, which has
no lesions). ``"multilabel"`` takes a ``(B, C, H, W)`` mask and gives ``(B, C, H, W)`` maps. Each channel is
exactly the binary targets of that class's mask (its own lesions, its own offsets; the classes do not interact).
The engines run only on the (image, class) pairs whose class is present in the image, so the cost grows with the
lesions, not with C; absent pairs are filled with the empty mask's maps (core 0, border ``thresh_min``). Pixels equal
to ``ignore_index`` belong to no class (an object bordering an unlabelled region ends there).

All functions are pure and gradient-free. A ``torch.Tensor`` mask gives ``torch`` outputs on the mask's device; a
NumPy mask gives NumPy outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from ._checks import (
    check_choice,
    check_class_mask,
    check_int,
    check_mask,
    check_multilabel_mask,
    check_number,
    check_thresholds,
)
from ._engine_opencv import _targets_numpy
from ._engine_torch import _boundary_torch, _targets_torch
from .constants import SHRINK_RATIO, THRESH_MAX, THRESH_MIN
from .modes import BINARY_MODE, MULTICLASS_MODE, check_mode, class_masks

__all__ = ["ENGINES", "adst_targets", "border_map", "boundary_map", "core_map"]

#: Valid values of the ``engine`` argument.
ENGINES = ("auto", "opencv", "torch")

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)

# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def boundary_map(mask: ArrayT) -> ArrayT:
    """Lesion boundary: mask pixels with a 4-neighbour outside the mask (the image frame is not outside).

    Computed on the mask's own device.

    Args:
        mask: Binary mask ``(B, 1, H, W)``, torch tensor or NumPy array (bool, ``{0, 1}``, or uint8 ``{0, 255}``).

    Returns:
        Bool ``(B, 1, H, W)``, same container type (and device, for tensors) as ``mask``.

    Raises:
        ValueError, TypeError: if ``mask`` is not a valid binary ``(B, 1, H, W)`` mask.
    """
    out = _boundary_torch(check_mask(mask, where="boundary_map"))
    if isinstance(mask, np.ndarray):
        return out.cpu().numpy()
    return out


def core_map(
    mask: ArrayT,
    *,
    shrink_ratio: float = SHRINK_RATIO,
    num_threads: int | None = None,
    engine: str = "auto",
    mode: str = BINARY_MODE,
    classes: int | None = None,
    ignore_index: int | None = None,
) -> ArrayT:
    """Core (shrunk lesion) map: pixels at distance ``>= D_c`` from their lesion's boundary (thin lesions keep
    their innermost pixels; a full mask is entirely core: see the module docstring).

    Arguments, returns and errors: those of :func:`adst_targets`, whose ``core`` this is.
    """
    spec = _Spec(shrink_ratio=shrink_ratio, num_threads=num_threads, engine=engine, mode=mode, classes=classes,
                 ignore_index=ignore_index)  # fmt: skip
    return _targets(mask, spec, "core_map")[0]


def border_map(
    mask: ArrayT,
    *,
    shrink_ratio: float = SHRINK_RATIO,
    thresh_min: float = THRESH_MIN,
    thresh_max: float = THRESH_MAX,
    num_threads: int | None = None,
    engine: str = "auto",
    mode: str = BINARY_MODE,
    classes: int | None = None,
    ignore_index: int | None = None,
) -> ArrayT:
    """Border (threshold) map: ``thresh_max`` on lesion boundaries, fading to ``thresh_min`` at distance ``D_c``.

    Arguments, returns and errors: those of :func:`adst_targets`, whose ``border`` this is.
    """
    spec = _Spec(shrink_ratio=shrink_ratio, thresh_min=thresh_min, thresh_max=thresh_max, num_threads=num_threads,
                 engine=engine, mode=mode, classes=classes, ignore_index=ignore_index)  # fmt: skip
    return _targets(mask, spec, "border_map")[1]


def adst_targets(
    mask: ArrayT,
    *,
    shrink_ratio: float = SHRINK_RATIO,
    thresh_min: float = THRESH_MIN,
    thresh_max: float = THRESH_MAX,
    num_threads: int | None = None,
    engine: str = "auto",
    mode: str = BINARY_MODE,
    classes: int | None = None,
    ignore_index: int | None = None,
) -> tuple[ArrayT, ArrayT]:
    """Core and border maps in one pass (shared labelling and distance transforms).

    Args:
        mask: Binary mask ``(B, 1, H, W)``, torch tensor (any device) or NumPy array; bool, ``{0, 1}`` of any
            numeric dtype, or uint8 ``{0, 255}``. In the other modes: ``(B, H, W)`` / ``(B, 1, H, W)`` integer
            class indices (multiclass) or a ``(B, C, H, W)`` mask in ``{0, 1}`` (multilabel).
        shrink_ratio: DBNet shrink ratio ``r`` in ``(0, 1)``; the offset is ``D = A (1 - r^2) / L``.
        thresh_min: Border value far from any boundary, ``0 <= thresh_min < thresh_max``.
        thresh_max: Border value on a boundary, ``thresh_max <= 1``.
        num_threads: OpenCV engine: worker threads over the batch; ``None`` uses ``torch.get_num_threads()``.
            (The torch engine uses torch's own intra-op threads.)
        engine: ``"auto"`` (torch engine for masks on an accelerator, OpenCV engine otherwise), ``"opencv"`` or
            ``"torch"``; see the module docstring. Both give the same maps.
        mode: ``"binary"`` (default), ``"multiclass"`` or ``"multilabel"``; see the module docstring.
        classes: C, the model's classes: required for ``"multiclass"`` (indices alone do not tell C), checked
            against the mask's channels for ``"multilabel"``.
        ignore_index: mask value of unlabelled pixels (they belong to no class); None: every value must be valid.

    Returns:
        ``(core, border)``: float32 ``(B, K, H, W)`` each (K = 1 binary, C - 1 multiclass, C multilabel); ``core``
        in ``{0, 1}``, ``border`` in ``[thresh_min, thresh_max]``. Tensors on ``mask``'s device for a tensor mask,
        NumPy arrays for a NumPy mask.

    Raises:
        ValueError, TypeError: on an invalid mask or argument.
    """
    spec = _Spec(shrink_ratio=shrink_ratio, thresh_min=thresh_min, thresh_max=thresh_max, num_threads=num_threads,
                 engine=engine, mode=mode, classes=classes, ignore_index=ignore_index)  # fmt: skip
    return _targets(mask, spec, "adst_targets")


# --------------------------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """The arguments of one call of the public functions (see :func:`adst_targets`), validated by :meth:`check`."""

    shrink_ratio: float = SHRINK_RATIO
    thresh_min: float = THRESH_MIN
    thresh_max: float = THRESH_MAX
    num_threads: int | None = None
    engine: str = "auto"
    mode: str = BINARY_MODE
    classes: int | None = None
    ignore_index: int | None = None

    @property
    def params(self) -> tuple[float, float, float]:
        """What the engines take: ``(shrink_ratio, thresh_min, thresh_max)``."""
        return float(self.shrink_ratio), float(self.thresh_min), float(self.thresh_max)

    def check(self, where: str) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming the argument, on an invalid one or a mode that does not fit."""
        check_number(self.shrink_ratio, "shrink_ratio", where, low=0.0, high=1.0, open_low=True, open_high=True)
        check_thresholds(self.thresh_min, self.thresh_max, where)
        if self.num_threads is not None:
            check_int(self.num_threads, "num_threads", where)
        check_choice(self.engine, ENGINES, "engine", where)
        if self.classes is not None:
            check_int(self.classes, "classes", where)
        index = self.ignore_index
        if index is not None and (isinstance(index, bool) or not isinstance(index, Integral)):
            raise TypeError(f"{where}: expected ignore_index to be an int or None, got {type(index).__name__}")
        check_mode(self.mode, self.classes, where)
        if self.mode == MULTICLASS_MODE and self.classes is None:
            raise ValueError(
                f"{where}: expected classes=<C> with mode='multiclass' (class indices alone do not tell how many "
                "classes the model has), got classes=None"
            )


def _use_torch_engine(mask: object, engine: str) -> bool:
    """``engine="auto"``: the torch engine exactly when the mask is a tensor on a non-CPU device."""
    if engine == "auto":
        return isinstance(mask, Tensor) and mask.device.type != "cpu"
    return engine == "torch"


def _engine(m: Tensor, use_torch: bool, spec: _Spec):
    """``(core, border)`` float32 ``(N, H, W)`` of a bool ``(N, H, W)`` batch: tensors on its device from the torch
    engine, NumPy arrays from the OpenCV engine."""
    if use_torch:
        return _targets_torch(m.detach(), *spec.params)
    m_np = m.detach().cpu().contiguous().numpy().view(np.uint8)
    return _targets_numpy(m_np, *spec.params, _threads(spec))


def _threads(spec: _Spec) -> int:
    return torch.get_num_threads() if spec.num_threads is None else int(spec.num_threads)


def _targets(mask: ArrayT, spec: _Spec, where: str) -> tuple[ArrayT, ArrayT]:
    """Validate, run the selected engine, and return ``(core, border)`` as ``(B, K, H, W)`` like ``mask``."""
    spec.check(where)
    use_torch = _use_torch_engine(mask, spec.engine)
    if spec.mode == BINARY_MODE and spec.ignore_index is None:
        m = check_mask(mask, where=where)
        batch, _, height, width = m.shape
        core, border = _engine(m.reshape(batch, height, width), use_torch, spec)
        shape = (batch, 1, height, width)
        return _like_mask(core.reshape(shape), mask), _like_mask(border.reshape(shape), mask)
    pairs, masks, shape = _present_pairs(mask, spec.mode, spec.classes, spec.ignore_index, where)
    rows = (shape[0] * shape[1], *shape[2:])
    if use_torch:
        core = torch.zeros(rows, dtype=torch.float32, device=masks.device)
        border = torch.full(rows, spec.thresh_min, dtype=torch.float32, device=masks.device)
        if len(masks):
            core[pairs], border[pairs] = _targets_torch(masks.detach(), *spec.params)
    else:  # the engine writes each present pair's maps straight into its row
        core, border = np.zeros(rows, np.float32), np.full(rows, np.float32(spec.thresh_min))
        if len(masks):
            m_np = masks.detach().cpu().contiguous().numpy().view(np.uint8)
            _targets_numpy(m_np, *spec.params, _threads(spec), rows=pairs.tolist(), out=(core, border))
    return _like_mask(core.reshape(shape), mask), _like_mask(border.reshape(shape), mask)


def _present_pairs(
    mask: ArrayT, mode: str, classes: int | None, ignore_index: int | None, where: str
) -> tuple[Tensor, Tensor, tuple[int, int, int, int]]:
    """The (image, target class) pairs whose class is present, as flat indices into ``(B * K)``, with their bool
    ``(N, H, W)`` masks and the output shape ``(B, K, H, W)``. One pass over the mask finds them."""
    if mode == MULTICLASS_MODE:
        index = check_class_mask(mask, classes, where, ignore_index)  # type: ignore[arg-type]
        pairs, masks = class_masks(index, classes, ignore_index, present_only=True)  # type: ignore[arg-type]
        return pairs, masks, (index.shape[0], classes - 1, *index.shape[1:])  # type: ignore[operator]
    positive, ignored = check_multilabel_mask(mask, classes, where, ignore_index)
    if ignored is not None:
        positive = positive & ~ignored
    batch, channels, height, width = positive.shape
    flat = positive.reshape(batch * channels, height, width)
    pairs = flat.flatten(1).any(1).nonzero().squeeze(1)
    return pairs, flat[pairs], (batch, channels, height, width)


def _like_mask(x: Tensor | np.ndarray, mask: object) -> Tensor | np.ndarray:
    """A result in the mask's container: NumPy for NumPy masks, else a tensor on the mask's device."""
    if isinstance(mask, np.ndarray):
        return x.cpu().numpy() if isinstance(x, Tensor) else x
    tensor = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return tensor.to(mask.device)  # type: ignore[union-attr]
