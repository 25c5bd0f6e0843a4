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

Engine: the mask batch is moved to CPU once; for each mask the lesion bounding box is labelled with OpenCV
(8-connectivity), and for each component an exact Euclidean distance transform
(``cv2.distanceTransform(..., cv2.DIST_L2, cv2.DIST_MASK_PRECISE)``) is run on the component's bounding box
expanded by ``ceil(D_c) - 1``. That is exact: all of the component's boundary pixels lie in the crop, and outside
the crop ``d_c >= D_c`` contributes nothing. OpenCV's float32 distances are snapped to the square root of the nearest
integer squared distance, so distances are exact (for distances below ~1000 px) and results are bit-for-bit
deterministic: independent of threading and batch composition, and equivariant under flips and 90-degree rotations.
Masks of a batch are processed by ``num_threads`` threads (default ``torch.get_num_threads()``, which is 1 inside
DataLoader workers); OpenCV and large NumPy operations release the GIL, but the per-component glue does not, so
threads pay off mostly for large masks. OpenCV also parallelises large transforms on its own pool
(``cv2.setNumThreads``), which this module leaves alone. The cost is dominated by the lesion area plus a ring of
width ``D`` around each lesion; masks made of hundreds of specks (noise) are handled exactly but more slowly.

All functions are pure and gradient-free. A ``torch.Tensor`` mask gives ``torch`` outputs on the mask's device; a
NumPy mask gives NumPy outputs.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from numbers import Integral, Real
from typing import TypeVar

import cv2
import numpy as np
import torch
from torch import Tensor

from adst_plugin._checks import check_mask
from adst_plugin.constants import SHRINK_RATIO, THRESH_MAX, THRESH_MIN

__all__ = ["adst_targets", "border_map", "boundary_map", "core_map"]

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


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
    m = check_mask(mask, where="boundary_map")
    interior = m.clone()
    # A pixel is interior iff all of its in-frame 4-neighbours are in the mask (replicate padding at the frame).
    interior[..., 1:, :] &= m[..., :-1, :]
    interior[..., :-1, :] &= m[..., 1:, :]
    interior[..., :, 1:] &= m[..., :, :-1]
    interior[..., :, :-1] &= m[..., :, 1:]
    out = m & ~interior
    if isinstance(mask, np.ndarray):
        return out.cpu().numpy()
    return out


def core_map(mask: ArrayT, *, shrink_ratio: float = SHRINK_RATIO, num_threads: int | None = None) -> ArrayT:
    """Core (shrunk lesion) map: pixels at distance ``>= D_c`` from their lesion's boundary.

    See the module docstring for the exact definition and the degenerate cases (thin lesions keep their innermost
    pixels; a full mask is entirely core).

    Args:
        mask: Binary mask ``(B, 1, H, W)``, torch tensor or NumPy array.
        shrink_ratio: DBNet shrink ratio ``r`` in ``(0, 1)``; the offset is ``D = A (1 - r^2) / L``.
        num_threads: Worker threads over the batch; ``None`` uses ``torch.get_num_threads()``.

    Returns:
        Float32 ``(B, 1, H, W)`` with values in ``{0, 1}``, same container type and device as ``mask``.

    Raises:
        ValueError, TypeError: on an invalid mask or argument.
    """
    core, _ = _targets(mask, shrink_ratio, THRESH_MIN, THRESH_MAX, num_threads, where="core_map")
    return core


def border_map(
    mask: ArrayT,
    *,
    shrink_ratio: float = SHRINK_RATIO,
    thresh_min: float = THRESH_MIN,
    thresh_max: float = THRESH_MAX,
    num_threads: int | None = None,
) -> ArrayT:
    """Border (threshold) map: ``thresh_max`` on lesion boundaries, fading to ``thresh_min`` at distance ``D_c``.

    Args:
        mask: Binary mask ``(B, 1, H, W)``, torch tensor or NumPy array.
        shrink_ratio: DBNet shrink ratio ``r`` in ``(0, 1)``.
        thresh_min: Value far from any boundary, ``0 <= thresh_min < thresh_max``.
        thresh_max: Value on a boundary, ``thresh_max <= 1``.
        num_threads: Worker threads over the batch; ``None`` uses ``torch.get_num_threads()``.

    Returns:
        Float32 ``(B, 1, H, W)`` in ``[thresh_min, thresh_max]``, same container type and device as ``mask``.

    Raises:
        ValueError, TypeError: on an invalid mask or argument.
    """
    _, border = _targets(mask, shrink_ratio, thresh_min, thresh_max, num_threads, where="border_map")
    return border


def adst_targets(
    mask: ArrayT,
    *,
    shrink_ratio: float = SHRINK_RATIO,
    thresh_min: float = THRESH_MIN,
    thresh_max: float = THRESH_MAX,
    num_threads: int | None = None,
) -> tuple[ArrayT, ArrayT]:
    """Core and border maps in one pass (shared labelling and distance transforms).

    Args:
        mask: Binary mask ``(B, 1, H, W)``, torch tensor (any device) or NumPy array; bool, ``{0, 1}`` of any
            numeric dtype, or uint8 ``{0, 255}``.
        shrink_ratio: DBNet shrink ratio ``r`` in ``(0, 1)``; the offset is ``D = A (1 - r^2) / L``.
        thresh_min: Border value far from any boundary, ``0 <= thresh_min < thresh_max``.
        thresh_max: Border value on a boundary, ``thresh_max <= 1``.
        num_threads: Worker threads over the batch; ``None`` uses ``torch.get_num_threads()``.

    Returns:
        ``(core, border)``: float32 ``(B, 1, H, W)`` each; ``core`` in ``{0, 1}``, ``border`` in
        ``[thresh_min, thresh_max]``. Tensors on ``mask``'s device for a tensor mask, NumPy arrays for a NumPy mask.

    Raises:
        ValueError, TypeError: on an invalid mask or argument.
    """
    return _targets(mask, shrink_ratio, thresh_min, thresh_max, num_threads, where="adst_targets")


# --------------------------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------------------------


def _check_params(
    shrink_ratio: float, thresh_min: float, thresh_max: float, num_threads: int | None, where: str
) -> None:
    """Raise ``TypeError`` / ``ValueError`` (naming the parameter and its value) on invalid arguments."""
    for name, value in (("shrink_ratio", shrink_ratio), ("thresh_min", thresh_min), ("thresh_max", thresh_max)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{where}: expected {name} to be a real number, got {type(value).__name__}")
    if not 0.0 < shrink_ratio < 1.0:
        raise ValueError(f"{where}: expected 0 < shrink_ratio < 1, got shrink_ratio={shrink_ratio!r}")
    if not 0.0 <= thresh_min < thresh_max <= 1.0:
        raise ValueError(
            f"{where}: expected 0 <= thresh_min < thresh_max <= 1, "
            f"got thresh_min={thresh_min!r}, thresh_max={thresh_max!r}"
        )
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, Integral)):
        raise TypeError(f"{where}: expected num_threads to be an int or None, got {type(num_threads).__name__}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"{where}: expected num_threads >= 1, got num_threads={num_threads}")


def _targets(
    mask: ArrayT,
    shrink_ratio: float,
    thresh_min: float,
    thresh_max: float,
    num_threads: int | None,
    where: str,
) -> tuple[ArrayT, ArrayT]:
    """Validate, run the engine on CPU, and return ``(core, border)`` as ``(B, 1, H, W)`` like ``mask``."""
    _check_params(shrink_ratio, thresh_min, thresh_max, num_threads, where)
    m = check_mask(mask, where=where)
    batch, _, height, width = m.shape
    m_np = m.detach().cpu().contiguous().numpy().reshape(batch, height, width).view(np.uint8)
    core, border = _targets_numpy(
        m_np,
        float(shrink_ratio),
        float(thresh_min),
        float(thresh_max),
        torch.get_num_threads() if num_threads is None else int(num_threads),
    )
    core, border = core.reshape(batch, 1, height, width), border.reshape(batch, 1, height, width)
    if isinstance(mask, np.ndarray):
        return core, border
    return torch.from_numpy(core).to(mask.device), torch.from_numpy(border).to(mask.device)


# --------------------------------------------------------------------------------------------------------------
# Thread pool (lazily created, recreated in forked children, e.g. DataLoader workers)
# --------------------------------------------------------------------------------------------------------------

# One pool per process, created on first use and never resized (it spawns threads only as tasks need them). A forked
# child (e.g. a DataLoader worker) inherits the object but not its threads, so the pool is dropped after a fork.
_POOL_MAX_WORKERS = max(32, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _reset_pool_after_fork() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_POOL_MAX_WORKERS, thread_name_prefix="adst_targets")
        return _pool


def _run_parallel(fn: Callable[[int], None], n_items: int, n_threads: int) -> None:
    """Call ``fn(i)`` for every ``i in range(n_items)`` on up to ``n_threads`` threads, the caller being one of them.

    Items are handed out one at a time (dynamic load balancing: masks differ a lot in cost).
    """
    n_threads = min(n_threads, n_items, _POOL_MAX_WORKERS + 1)
    if n_threads <= 1:
        for i in range(n_items):
            fn(i)
        return
    lock = threading.Lock()
    next_item = [0]

    def drain() -> None:
        while True:
            with lock:
                i = next_item[0]
                next_item[0] += 1
            if i >= n_items:
                return
            fn(i)

    pool = _get_pool()
    futures = [pool.submit(drain) for _ in range(n_threads - 1)]
    try:
        drain()
    finally:
        wait(futures)  # never return (or raise) while workers still write into the outputs
    for future in futures:
        future.result()  # re-raise a worker's exception


# --------------------------------------------------------------------------------------------------------------
# Engine (NumPy / OpenCV)
# --------------------------------------------------------------------------------------------------------------


def _targets_numpy(
    m: np.ndarray, shrink_ratio: float, thresh_min: float, thresh_max: float, num_threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """Core and border maps of a batch of masks.

    Args:
        m: uint8 ``(B, H, W)`` with values in ``{0, 1}``, C-contiguous.
        shrink_ratio: Validated ``r``.
        thresh_min: Validated minimum border value.
        thresh_max: Validated maximum border value.
        num_threads: Threads over the batch (>= 1).

    Returns:
        ``(core, border)``: float32 ``(B, H, W)`` each.
    """
    core = np.zeros(m.shape, np.float32)
    border = np.empty(m.shape, np.float32)

    def one(i: int) -> None:
        _targets_one(m[i], core[i], border[i], shrink_ratio, thresh_min, thresh_max)

    _run_parallel(one, m.shape[0], num_threads)
    return core, border


def _min_sq_distance(offset: float) -> int:
    """Smallest integer ``k >= 0`` with ``sqrt(k) >= offset`` in float64 (``d >= D`` on squared distances)."""
    k = math.ceil(offset * offset)
    while k > 0 and math.sqrt(k - 1) >= offset:
        k -= 1
    while math.sqrt(k) < offset:
        k += 1
    return k


# Above this many components, per-component bounding boxes come from OpenCV's statistics pass instead.
_MAX_COMPONENTS_FOR_BBOX_SCAN = 8


def _components(
    sub: np.ndarray, bnd: np.ndarray, bbox: tuple[int, int, int, int]
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int, int]]]:
    """8-connected components of a lesion window with their bounding boxes, areas and boundary lengths.

    Args:
        sub: uint8 ``(h, w)`` in ``{0, 1}``, the lesion window.
        bnd: uint8 ``(h, w)`` in ``{0, 1}``, its boundary pixels.
        bbox: ``(x, y, w, h)`` of all lesion pixels in window coordinates.

    Returns:
        ``(labels, comps)``: int32 labels ``(h, w)`` (0 = background, components ``1..n``), and for each component
        ``(x, y, w, h, area, boundary_length)`` in window coordinates.
    """
    n_labels, labels = cv2.connectedComponents(sub, connectivity=8, ltype=cv2.CV_32S)
    if n_labels == 2:
        return labels, [(*bbox, cv2.countNonZero(sub), cv2.countNonZero(bnd))]
    lengths = np.bincount(labels[bnd.view(np.bool_)], minlength=n_labels).tolist()
    if n_labels - 1 > _MAX_COMPONENTS_FOR_BBOX_SCAN:
        stats = cv2.connectedComponentsWithStats(sub, connectivity=8, ltype=cv2.CV_32S)[2].tolist()
        return labels, [(*stats[c], lengths[c]) for c in range(1, n_labels)]
    areas = np.bincount(labels.ravel(), minlength=n_labels).tolist()
    comps = []
    for c in range(1, n_labels):
        x, y, w, h = cv2.boundingRect((labels == c).view(np.uint8))
        comps.append((x, y, w, h, areas[c], lengths[c]))
    return labels, comps


def _targets_one(
    m: np.ndarray, core: np.ndarray, border: np.ndarray, shrink_ratio: float, thresh_min: float, thresh_max: float
) -> None:
    """Fill ``core`` (zero-initialised) and ``border`` (uninitialised) for one mask.

    Args:
        m: uint8 ``(H, W)`` in ``{0, 1}``.
        core: float32 ``(H, W)`` output, already zero.
        border: float32 ``(H, W)`` output, written entirely.
        shrink_ratio: ``r``.
        thresh_min: Border value far from boundaries.
        thresh_max: Border value on boundaries.
    """
    border.fill(thresh_min)
    x, y, w, h = cv2.boundingRect(m)
    if w == 0:  # empty mask
        return
    height, width = m.shape
    # Lesion window with a 1-pixel background margin where the frame allows: its edges are background or the frame.
    y0, y1, x0, x1 = max(y - 1, 0), min(y + h + 1, height), max(x - 1, 0), min(x + w + 1, width)
    sub = m[y0:y1, x0:x1]
    # erode's default border value acts as "inside": out-of-frame neighbours never make a boundary (replicate rule).
    bnd = cv2.subtract(sub, cv2.erode(sub, _CROSS))
    labels, comps = _components(sub, bnd, (x - x0, y - y0, w, h))
    single = len(comps) == 1
    if single and comps[0][5] == 0:  # no boundary at all: the whole frame is lesion
        core.fill(1.0)
        return
    shrink = 1.0 - shrink_ratio * shrink_ratio
    spread = thresh_max - thresh_min
    t_max = np.float32(thresh_max)
    for c, (cx, cy, cw, ch, area, length) in enumerate(comps, start=1):
        offset = area * shrink / length
        # Expanded crop: a pixel k pixels (Chebyshev) outside the component's bbox has d_c >= k, so it contributes to
        # the border only if k < D, i.e. k <= ceil(D) - 1; the core lies inside the bbox.
        pad = math.ceil(offset) - 1
        fy, fx = y0 + cy, x0 + cx  # component bbox origin in frame coordinates
        gy0, gy1 = max(fy - pad, 0), min(fy + ch + pad, height)
        gx0, gx1 = max(fx - pad, 0), min(fx + cw + pad, width)
        oy, ox = fy - gy0, fx - gx0
        bnd_c = bnd[cy : cy + ch, cx : cx + cw]
        if single:
            in_c = sub[cy : cy + ch, cx : cx + cw].view(np.bool_)
            not_bnd = (bnd_c == 0).view(np.uint8)
        else:
            in_c = labels[cy : cy + ch, cx : cx + cw] == c
            not_bnd = np.logical_not(bnd_c.view(np.bool_) & in_c).view(np.uint8)
        src = cv2.copyMakeBorder(not_bnd, oy, gy1 - fy - ch, ox, gx1 - fx - cw, cv2.BORDER_CONSTANT, value=1)
        # Exact Euclidean distance to the component's boundary pixels (float32, within ~1 ulp).
        dist = cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        # Snap to exact integer squared distances: OpenCV's float32 distances carry ~1-ulp errors that depend on its
        # internal SIMD / thread split, so this makes the results exact, deterministic and symmetric.
        np.multiply(dist, dist, out=dist)
        np.rint(dist, out=dist)
        # Core: d >= D, i.e. squared distance >= k_min.
        sq_c = dist[oy : oy + ch, ox : ox + cw]
        sel = sq_c >= _min_sq_distance(offset)
        sel &= in_c
        if not sel.any():  # too small / thin to shrink: keep the innermost pixels (all ties)
            sel = in_c & (sq_c == sq_c[in_c].max())
        core[fy : fy + ch, fx : fx + cw][sel] = 1.0
        # Border: max(thresh_min, thresh_max - spread * d / D), exactly thresh_max where d == 0.
        np.sqrt(dist, out=dist)
        dist *= np.float32(-spread / offset)
        dist += t_max
        region = border[gy0:gy1, gx0:gx1]
        np.maximum(region, dist, out=region)
