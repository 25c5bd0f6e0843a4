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
  engine is correct but far slower than OpenCV (measured on a 2-core CPU at 256^2: ~40-50 vs ~3,000-3,700 masks/s,
  ``examples/benchmarks/targets.py``), which is why ``"auto"`` uses it only off the CPU.

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
import torch.nn.functional as F
from torch import Tensor

from adst_plugin._checks import check_mask
from adst_plugin.constants import SHRINK_RATIO, THRESH_MAX, THRESH_MIN

__all__ = ["ENGINES", "adst_targets", "border_map", "boundary_map", "core_map"]

#: Valid values of the ``engine`` argument.
ENGINES = ("auto", "opencv", "torch")

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
    out = _boundary_torch(check_mask(mask, where="boundary_map"))
    if isinstance(mask, np.ndarray):
        return out.cpu().numpy()
    return out


def core_map(
    mask: ArrayT, *, shrink_ratio: float = SHRINK_RATIO, num_threads: int | None = None, engine: str = "auto"
) -> ArrayT:
    """Core (shrunk lesion) map: pixels at distance ``>= D_c`` from their lesion's boundary.

    See the module docstring for the exact definition and the degenerate cases (thin lesions keep their innermost
    pixels; a full mask is entirely core).

    Args:
        mask: Binary mask ``(B, 1, H, W)``, torch tensor or NumPy array.
        shrink_ratio: DBNet shrink ratio ``r`` in ``(0, 1)``; the offset is ``D = A (1 - r^2) / L``.
        num_threads: OpenCV engine: worker threads over the batch; ``None`` uses ``torch.get_num_threads()``.
            (The torch engine uses torch's own intra-op threads.)
        engine: ``"auto"`` (torch engine for masks on an accelerator, OpenCV engine otherwise), ``"opencv"`` or
            ``"torch"``; see the module docstring. Both give the same maps.

    Returns:
        Float32 ``(B, 1, H, W)`` with values in ``{0, 1}``, same container type and device as ``mask``.

    Raises:
        ValueError, TypeError: on an invalid mask or argument.
    """
    core, _ = _targets(mask, shrink_ratio, THRESH_MIN, THRESH_MAX, num_threads, engine, where="core_map")
    return core


def border_map(
    mask: ArrayT,
    *,
    shrink_ratio: float = SHRINK_RATIO,
    thresh_min: float = THRESH_MIN,
    thresh_max: float = THRESH_MAX,
    num_threads: int | None = None,
    engine: str = "auto",
) -> ArrayT:
    """Border (threshold) map: ``thresh_max`` on lesion boundaries, fading to ``thresh_min`` at distance ``D_c``.

    Args:
        mask: Binary mask ``(B, 1, H, W)``, torch tensor or NumPy array.
        shrink_ratio: DBNet shrink ratio ``r`` in ``(0, 1)``.
        thresh_min: Value far from any boundary, ``0 <= thresh_min < thresh_max``.
        thresh_max: Value on a boundary, ``thresh_max <= 1``.
        num_threads: OpenCV engine: worker threads over the batch; ``None`` uses ``torch.get_num_threads()``.
            (The torch engine uses torch's own intra-op threads.)
        engine: ``"auto"`` (torch engine for masks on an accelerator, OpenCV engine otherwise), ``"opencv"`` or
            ``"torch"``; see the module docstring. Both give the same maps.

    Returns:
        Float32 ``(B, 1, H, W)`` in ``[thresh_min, thresh_max]``, same container type and device as ``mask``.

    Raises:
        ValueError, TypeError: on an invalid mask or argument.
    """
    _, border = _targets(mask, shrink_ratio, thresh_min, thresh_max, num_threads, engine, where="border_map")
    return border


def adst_targets(
    mask: ArrayT,
    *,
    shrink_ratio: float = SHRINK_RATIO,
    thresh_min: float = THRESH_MIN,
    thresh_max: float = THRESH_MAX,
    num_threads: int | None = None,
    engine: str = "auto",
) -> tuple[ArrayT, ArrayT]:
    """Core and border maps in one pass (shared labelling and distance transforms).

    Args:
        mask: Binary mask ``(B, 1, H, W)``, torch tensor (any device) or NumPy array; bool, ``{0, 1}`` of any
            numeric dtype, or uint8 ``{0, 255}``.
        shrink_ratio: DBNet shrink ratio ``r`` in ``(0, 1)``; the offset is ``D = A (1 - r^2) / L``.
        thresh_min: Border value far from any boundary, ``0 <= thresh_min < thresh_max``.
        thresh_max: Border value on a boundary, ``thresh_max <= 1``.
        num_threads: OpenCV engine: worker threads over the batch; ``None`` uses ``torch.get_num_threads()``.
            (The torch engine uses torch's own intra-op threads.)
        engine: ``"auto"`` (torch engine for masks on an accelerator, OpenCV engine otherwise), ``"opencv"`` or
            ``"torch"``; see the module docstring. Both give the same maps.

    Returns:
        ``(core, border)``: float32 ``(B, 1, H, W)`` each; ``core`` in ``{0, 1}``, ``border`` in
        ``[thresh_min, thresh_max]``. Tensors on ``mask``'s device for a tensor mask, NumPy arrays for a NumPy mask.

    Raises:
        ValueError, TypeError: on an invalid mask or argument.
    """
    return _targets(mask, shrink_ratio, thresh_min, thresh_max, num_threads, engine, where="adst_targets")


# --------------------------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------------------------


def _check_params(
    shrink_ratio: float, thresh_min: float, thresh_max: float, num_threads: int | None, engine: str, where: str
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
    if not isinstance(engine, str):
        raise TypeError(f"{where}: expected engine to be one of {list(ENGINES)}, got {type(engine).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"{where}: expected engine to be one of {list(ENGINES)}, got engine={engine!r}")


def _use_torch_engine(mask: object, engine: str) -> bool:
    """``engine="auto"``: the torch engine exactly when the mask is a tensor on a non-CPU device."""
    if engine == "auto":
        return isinstance(mask, Tensor) and mask.device.type != "cpu"
    return engine == "torch"


def _targets(
    mask: ArrayT,
    shrink_ratio: float,
    thresh_min: float,
    thresh_max: float,
    num_threads: int | None,
    engine: str,
    where: str,
) -> tuple[ArrayT, ArrayT]:
    """Validate, run the selected engine, and return ``(core, border)`` as ``(B, 1, H, W)`` like ``mask``."""
    _check_params(shrink_ratio, thresh_min, thresh_max, num_threads, engine, where)
    m = check_mask(mask, where=where)
    batch, _, height, width = m.shape
    if _use_torch_engine(mask, engine):
        core_t, border_t = _targets_torch(
            m.detach().reshape(batch, height, width), float(shrink_ratio), float(thresh_min), float(thresh_max)
        )
        core_t, border_t = core_t.view(batch, 1, height, width), border_t.view(batch, 1, height, width)
        if isinstance(mask, np.ndarray):
            return core_t.numpy(), border_t.numpy()
        return core_t, border_t
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


# --------------------------------------------------------------------------------------------------------------
# Engine (pure torch, on the mask's device)
# --------------------------------------------------------------------------------------------------------------

# Pixels per batched distance transform (crops of one chunk are stacked into one (n, Hc, Wc) tensor).
_TORCH_CHUNK_PIXELS = 1 << 22
# Crops stacked in one chunk differ in area by at most this factor (limits the padding wasted on small lesions).
_TORCH_AREA_RATIO = 4
# Label-propagation steps before the first convergence check (a check is one tiny device -> host read).
_TORCH_FIRST_CHECK = 6


def _boundary_torch(m: Tensor) -> Tensor:
    """Boundary of a bool ``(..., H, W)`` mask: in the mask with a 4-neighbour outside (replicate frame)."""
    interior = m.clone()
    interior[..., 1:, :] &= m[..., :-1, :]
    interior[..., :-1, :] &= m[..., 1:, :]
    interior[..., :, 1:] &= m[..., :, :-1]
    interior[..., :, :-1] &= m[..., :, 1:]
    return m & ~interior


def _max3x3_cpu(x: Tensor, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> Tensor:
    """``max_pool2d(x, 3, stride=1, padding=1)`` for non-negative ``x``, separably by shifted maxima.

    Same result, several times faster than ``max_pool2d`` on CPU (on accelerators ``max_pool2d`` is used).
    """
    rows = x.clone()
    torch.maximum(rows[..., 1:], x[..., :-1], out=rows[..., 1:])
    torch.maximum(rows[..., :-1], x[..., 1:], out=rows[..., :-1])
    out = rows.clone()
    torch.maximum(out[..., 1:, :], rows[..., :-1, :], out=out[..., 1:, :])
    torch.maximum(out[..., :-1, :], rows[..., 1:, :], out=out[..., :-1, :])
    return out


def _label_torch(m: Tensor) -> Tensor:
    """8-connected components of a bool ``(B, H, W)`` mask by label propagation with pointer jumping.

    Every mask pixel starts with its own (1-based, per-image) linear index as label, background with 0. One step
    takes the maximum label of the 3x3 neighbourhood within the mask, then twice replaces each label ``l`` by the
    label of pixel ``l`` (pointer jumping: that pixel is in the same component and its label is ``>= l``, so labels
    only grow and never leave their component; a leading 0 column makes background map to 0 without masking). At
    the fixed point every pixel carries the largest index of its component. Convergence is checked after
    ``_TORCH_FIRST_CHECK`` steps and then after blocks of doubling length (each check is one scalar read from the
    device; on CPU every second step), so a typical batch costs one check; long snakes and spirals only cost more
    steps, never a wrong answer.

    Returns:
        int64 ``(B, H * W)``: the 0-based index of the component's last pixel (row-major), ``-1`` on background.
    """
    batch, height, width = m.shape
    n = height * width
    on_cpu = m.device.type == "cpu"
    # Labels are pooled with max_pool2d on accelerators (floating point, exact below 2**24) and by shifted maxima
    # on CPU (int64, which gather takes directly).
    dtype = torch.int64 if on_cpu else torch.float32 if n < 2**24 else torch.float64
    pool = _max3x3_cpu if on_cpu else F.max_pool2d
    fm = m.to(dtype).view(batch, 1, height, width)
    # Three (B, 1 + n) buffers whose column 0 stays 0 (gathering index 0, background, returns 0); a step never
    # writes into the buffer holding its input, so the input survives for the convergence test.
    bufs = [torch.zeros(batch, 1 + n, dtype=dtype, device=m.device) for _ in range(3)]
    lab = bufs[0][:, 1:]
    torch.mul(torch.arange(1, n + 1, device=m.device, dtype=dtype), fm.view(batch, n), out=lab)

    def step(lab: Tensor) -> Tensor:
        a, b = [buf for buf in bufs if buf.data_ptr() != lab.data_ptr() - lab.element_size()]
        pooled = pool(lab.view(batch, 1, height, width), 3, stride=1, padding=1).view(batch, n)
        torch.mul(pooled, fm.view(batch, n), out=a[:, 1:])
        for src, dst in ((a, b), (b, a)):
            torch.gather(src, 1, src[:, 1:] if on_cpu else src[:, 1:].long(), out=dst[:, 1:])
        return a[:, 1:]

    block = 2 if on_cpu else _TORCH_FIRST_CHECK
    while True:
        for _ in range(block - 1):
            lab = step(lab)
        new = step(lab)
        if torch.equal(new, lab):  # one scalar device -> host read per block
            break
        lab = new
        if not on_cpu:
            block = min(2 * block, 256)
    return new.long() - 1


def _sq_distances_torch(bnd: Tensor, cap: int) -> Tensor:
    """Squared Euclidean distance from every pixel to the nearest ``True`` pixel of its map, exact up to ``cap``.

    Separable two-pass method: pass 1 (columns) gives ``g``, the distance to the nearest boundary pixel in the same
    column (cumulative max / min of boundary row indices); pass 2 (rows) takes ``min_x' (x - x')^2 + g(x')^2``
    over ``|x - x'| <= cap``. A pixel whose distance is ``<= cap`` has its nearest boundary pixel in that window, so
    its value is exact; every other pixel gets a value ``> cap^2`` (``g`` is capped at ``cap + 1``). Integer
    arithmetic throughout.

    Args:
        bnd: bool ``(n, h, w)``, at least one ``True`` pixel per map.
        cap: Non-negative int.

    Returns:
        int32 ``(n, h, w)``.
    """
    h, w = bnd.shape[-2:]
    big = 1 << 20
    rows = torch.arange(h, device=bnd.device, dtype=torch.int32).view(1, h, 1)
    above = torch.where(bnd, rows, -big).cummax(1).values
    below = torch.where(bnd, rows, big).flip(1).cummin(1).values.flip(1)
    g = torch.minimum(rows - above, below - rows).clamp_max_(cap + 1)
    g2 = g * g
    d2 = g2.clone()
    for s in range(1, min(cap, w - 1) + 1):
        c = s * s
        right, left = d2[..., s:], d2[..., :-s]
        torch.minimum(right, g2[..., :-s] + c, out=right)
        torch.minimum(left, g2[..., s:] + c, out=left)
    return d2


@torch.no_grad()
def _targets_torch(m: Tensor, shrink_ratio: float, thresh_min: float, thresh_max: float) -> tuple[Tensor, Tensor]:
    """Core and border maps of a bool ``(B, H, W)`` mask batch, computed on the mask's device.

    Steps: boundary (4-neighbourhood, replicate frame); 8-connected components (:func:`_label_torch`); per component
    its area, boundary length and bounding box (scatter reductions indexed by the component's root pixel); one
    device -> host read of that small table (it sizes the batched crops below); then, for chunks of components with
    crops of similar size, the component's crop (its bounding box grown by ``ceil(D_c) - 1`` and clipped to the
    frame, as in the OpenCV engine) is gathered, its exact squared distance to the component's own boundary is
    computed (:func:`_sq_distances_torch`, window ``ceil(D_c)``), and core / border values are scattered back with
    ``amax``. Results are identical to the OpenCV engine's (core bit-for-bit; border up to one float32 ulp where
    ``d_c == D_c``, where this engine writes ``thresh_min`` exactly).

    Returns:
        ``(core, border)``: float32 ``(B, H, W)`` each.
    """
    batch, height, width = m.shape
    n = height * width
    device = m.device
    core = torch.zeros(batch * n, dtype=torch.float32, device=device)
    border = torch.full((batch * n,), thresh_min, dtype=torch.float32, device=device)

    bnd = _boundary_torch(m).view(-1)
    root = _label_torch(m)  # (B, n)
    own = torch.arange(n, device=device)
    is_root = (root == own).view(-1)
    # Slot of every pixel: its component's root pixel (global flat index), background -> dummy slot batch * n.
    offsets = torch.arange(batch, device=device).view(batch, 1) * n
    slot = torch.where(root >= 0, root + offsets, batch * n).view(-1)
    size = batch * n + 1
    ones = torch.ones(batch * n, dtype=torch.int64, device=device)
    area = torch.zeros(size, dtype=torch.int64, device=device).index_add_(0, slot, ones)
    length = torch.zeros(size, dtype=torch.int64, device=device).index_add_(0, slot, bnd.long())
    ys = (own // width).repeat(batch)
    xs = (own % width).repeat(batch)
    y_lo = torch.full((size,), height, dtype=torch.int64, device=device).scatter_reduce_(0, slot, ys, "amin")
    x_lo = torch.full((size,), width, dtype=torch.int64, device=device).scatter_reduce_(0, slot, xs, "amin")
    x_hi = torch.full((size,), -1, dtype=torch.int64, device=device).scatter_reduce_(0, slot, xs, "amax")
    roots = is_root.nonzero().squeeze(1)  # device -> host: number of components
    if roots.numel() == 0:
        return core.view(batch, height, width), border.view(batch, height, width)
    n_comp = roots.numel()
    comp_of_slot = torch.full((size,), -1, dtype=torch.int64, device=device)
    comp_of_slot[roots] = torch.arange(n_comp, device=device)
    comp = comp_of_slot[slot]  # component number of every pixel, -1 on background
    table = torch.stack([roots, area[roots], length[roots], y_lo[roots], x_lo[roots], x_hi[roots]], 1).tolist()

    shrink = 1.0 - shrink_ratio * shrink_ratio
    spread = thresh_max - thresh_min
    items = []  # (crop area, crop h, crop w, component, image, y0, x0, D)
    full_frame = []
    for c, (g, a, length_c, y0, x0, x1) in enumerate(table):
        img, y1 = divmod(g, n)[0], (g % n) // width  # the root is the component's last pixel: its row is the last
        if length_c == 0:  # no boundary at all: the whole frame is lesion
            full_frame.append(img)
            continue
        offset = a * shrink / length_c
        pad = math.ceil(offset) - 1
        cy0, cy1 = max(y0 - pad, 0), min(y1 + pad, height - 1)
        cx0, cx1 = max(x0 - pad, 0), min(x1 + pad, width - 1)
        hc, wc = cy1 - cy0 + 1, cx1 - cx0 + 1
        items.append((hc * wc, hc, wc, c, img, cy0, cx0, offset))
    for img in full_frame:
        core[img * n : (img + 1) * n] = 1.0
    if not items:
        return core.view(batch, height, width), border.view(batch, height, width)

    # Chunks of components with crops of similar area, largest first; one crop size (the chunk's max) per chunk.
    items.sort(key=lambda it: -it[0])
    chunks: list[tuple[int, int, int, int]] = []  # (start, stop, crop h, crop w)
    start = 0
    while start < len(items):
        hc, wc = items[start][1], items[start][2]
        stop = start + 1
        while stop < len(items):
            nh, nw = max(hc, items[stop][1]), max(wc, items[stop][2])
            if items[stop][0] * _TORCH_AREA_RATIO < nh * nw or (stop - start + 1) * nh * nw > _TORCH_CHUNK_PIXELS:
                break
            hc, wc, stop = nh, nw, stop + 1
        chunks.append((start, stop, hc, wc))
        start = stop
    # Per-component parameters, sent to the device in one copy each (no copy inside the chunk loop).
    ints, floats = [], []
    for start, stop, hc, wc in chunks:
        for _, _, _, c, img, cy0, cx0, offset in items[start:stop]:
            oy, ox = min(cy0, height - hc), min(cx0, width - wc)
            ints.append((c, img * n + oy * width + ox, _min_sq_distance(offset)))
            floats.append(float(np.float32(-spread / offset)))
    ints_d = torch.tensor(ints, dtype=torch.int64).to(device)
    coef_d = torch.tensor(floats, dtype=torch.float32).to(device)
    t_max = float(np.float32(thresh_max))
    comp_flat, bnd_flat = comp, bnd
    for start, stop, hc, wc in chunks:
        cid, origin, k_min = ints_d[start:stop].unbind(1)
        local = (
            torch.arange(hc, device=device).view(hc, 1) * width + torch.arange(wc, device=device).view(1, wc)
        ).view(1, hc, wc)
        idx = origin.view(-1, 1, 1) + local  # (c, hc, wc) global flat indices of the crops
        in_c = comp_flat[idx] == cid.view(-1, 1, 1)
        cap = max(math.ceil(items[i][7]) for i in range(start, stop))
        d2 = _sq_distances_torch(bnd_flat[idx] & in_c, cap)
        k_min = k_min.view(-1, 1, 1)
        # Core: d >= D (squared: d2 >= k_min); too thin to shrink: the innermost pixels (max d over the component).
        sel = in_c & (d2 >= k_min)
        has_core = sel.flatten(1).any(1).view(-1, 1, 1)
        innermost = torch.where(in_c, d2, -1).flatten(1).amax(1).view(-1, 1, 1)
        sel = torch.where(has_core, sel, in_c & (d2 == innermost))
        core.scatter_reduce_(0, idx.view(-1), sel.view(-1).float(), "amax")
        # Border: thresh_max + d * (-spread / D), in float32 in the OpenCV engine's order; thresh_min where d >= D.
        # The square root is taken in float64 (correctly rounded to float32 after the cast; torch's float32 sqrt
        # on CPU is not always correctly rounded).
        value = d2.double().sqrt_().float().mul_(coef_d[start:stop].view(-1, 1, 1)).add_(t_max)
        value = torch.where(d2 < k_min, value, thresh_min)
        border.scatter_reduce_(0, idx.view(-1), value.view(-1), "amax")
    return core.view(batch, height, width), border.view(batch, height, width)
