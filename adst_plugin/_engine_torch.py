"""The pure-torch engine of :mod:`adst_plugin.targets`: the same targets on the mask's device. See that module's
docstring for the definitions and the engine's design."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._engine_opencv import _min_sq_distance

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
