"""The OpenCV engine of :mod:`adst_plugin.targets`: exact per-lesion distance transforms on the host, threaded over
the batch. See that module's docstring for the definitions and the engine's design."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import cv2
import numpy as np

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


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
    m: np.ndarray,
    shrink_ratio: float,
    thresh_min: float,
    thresh_max: float,
    num_threads: int,
    rows: list[int] | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Core and border maps of a batch of masks.

    Args:
        m: uint8 ``(B, H, W)`` with values in ``{0, 1}``, C-contiguous.
        shrink_ratio: Validated ``r``.
        thresh_min: Validated minimum border value.
        thresh_max: Validated maximum border value.
        num_threads: Threads over the batch (>= 1).
        rows, out: optionally, float32 ``(N, H, W)`` arrays (core zero-initialised) that mask i's maps are written
            into, at row ``rows[i]`` (the per-class targets fill their output in place, with no copy).

    Returns:
        ``(core, border)``: float32 ``(B, H, W)`` each (``out`` when given).
    """
    if out is None:
        core, border = np.zeros(m.shape, np.float32), np.empty(m.shape, np.float32)
    else:
        core, border = out
    index = list(range(m.shape[0])) if rows is None else rows

    def one(i: int) -> None:
        _targets_one(m[i], core[index[i]], border[index[i]], shrink_ratio, thresh_min, thresh_max)

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
