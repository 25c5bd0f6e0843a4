"""Tests for ``adst_plugin.targets``: exactness against an independent SciPy reference, properties, edge cases."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from adst_examples.benchmarks.scipy_reference import reference_boundary, reference_targets
from adst_plugin import _engine_opencv, _engine_torch
from adst_plugin import targets as targets_module
from adst_plugin.constants import SHRINK_RATIO, THRESH_MAX, THRESH_MIN
from adst_plugin.targets import ENGINES, adst_targets, border_map, boundary_map, core_map

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool arrays; 1 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# --------------------------------------------------------------------------------------------------------------
# Mask generators
# --------------------------------------------------------------------------------------------------------------

KINDS = ("blobs", "rects", "noise", "disks", "lines", "empty", "full")


def random_mask(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    """One random bool ``(h, w)`` mask of the given kind (multiple components, holes, thin parts, frame contact)."""
    if kind == "empty":
        return np.zeros((h, w), bool)
    if kind == "full":
        return np.ones((h, w), bool)
    if kind == "noise":
        return rng.random((h, w)) < rng.uniform(0.05, 0.95)
    if kind == "blobs":
        field = ndimage.gaussian_filter(rng.standard_normal((h, w)), rng.uniform(0.5, 4.0), mode="reflect")
        return field > rng.uniform(-0.3, 0.6) * field.std()
    m = np.zeros((h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(int(rng.integers(1, 6))):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        if kind == "rects":
            y1, x1 = y0 + int(rng.integers(1, h + 1)), x0 + int(rng.integers(1, w + 1))
            m[y0:y1, x0:x1] = True
            if rng.random() < 0.4:  # punch a hole
                m[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = False
        elif kind == "disks":
            radius = rng.uniform(0.5, max(h, w) / 2)
            disk = (yy - y0) ** 2 + (xx - x0) ** 2 <= radius**2
            m = m ^ disk if rng.random() < 0.3 else m | disk
        else:  # lines: 1-pixel-wide horizontal / vertical / diagonal segments
            length = int(rng.integers(1, max(h, w) + 1))
            dy, dx = [(0, 1), (1, 0), (1, 1), (1, -1)][int(rng.integers(0, 4))]
            for t in range(length):
                y, x = y0 + t * dy, x0 + t * dx
                if 0 <= y < h and 0 <= x < w:
                    m[y, x] = True
    return m


@st.composite
def masks(draw: st.DrawFn, max_side: int = 48, max_batch: int = 3) -> np.ndarray:
    """Bool ``(B, 1, H, W)`` masks with odd / non-square sizes in ``1..max_side``, each item of a random kind."""
    b = draw(st.integers(1, max_batch))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=b, max_size=b))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return np.stack([random_mask(rng, h, w, kind)[None] for kind in kinds])


params = st.tuples(
    st.floats(0.05, 0.95),
    st.floats(0.0, 0.45),
    st.floats(0.55, 1.0),
)

# --------------------------------------------------------------------------------------------------------------
# Agreement with the reference
# --------------------------------------------------------------------------------------------------------------


@settings(SETTINGS, max_examples=800)
@given(mask=masks(), p=params)
def test_matches_reference(mask: np.ndarray, p: tuple[float, float, float]) -> None:
    r, t_min, t_max = p
    core, border = adst_targets(mask, shrink_ratio=r, thresh_min=t_min, thresh_max=t_max)
    ref_core, ref_border = reference_targets(mask, r, t_min, t_max)
    for i in range(mask.shape[0]):
        assert iou(core[i] > 0.5, ref_core[i] > 0.5) >= 0.99
        assert np.abs(border[i] - ref_border[i]).mean() <= 1e-3
    # In fact both are exact up to float32 rounding.
    np.testing.assert_array_equal(core, ref_core)
    np.testing.assert_allclose(border, ref_border, rtol=0, atol=1e-5)


@SETTINGS
@given(mask=masks())
def test_boundary_matches_reference(mask: np.ndarray) -> None:
    expected = np.stack([reference_boundary(m[0])[None] for m in mask])
    np.testing.assert_array_equal(boundary_map(mask), expected)
    np.testing.assert_array_equal(boundary_map(torch.from_numpy(mask)).numpy(), expected)


def test_matches_reference_larger_realistic() -> None:
    """Larger masks with big smooth lesions (large offsets D, crops clipped by the frame), on several threads."""
    rng = np.random.default_rng(1234)
    mask = np.stack([random_mask(rng, 96, 130, kind)[None] for kind in ["blobs", "disks", "rects", "blobs"] * 2])
    core, border = adst_targets(torch.from_numpy(mask), num_threads=4)
    ref_core, ref_border = reference_targets(mask)
    np.testing.assert_array_equal(core.numpy(), ref_core)
    np.testing.assert_allclose(border.numpy(), ref_border, rtol=0, atol=1e-5)


def _square(size: int, y0: int, x0: int, side: int) -> np.ndarray:
    m = np.zeros((1, 1, size, size), bool)
    m[0, 0, y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_square_exact() -> None:
    # 5x5 square: A = 25, L = 16, D = 25 * 0.84 / 16 = 1.3125; d = 0 on the ring, 1 on the next ring, 2 at the centre.
    mask = _square(9, 2, 2, 5)
    core, border = adst_targets(mask)
    expected_core = np.zeros((9, 9), np.float32)
    expected_core[4, 4] = 1.0
    np.testing.assert_array_equal(core[0, 0], expected_core)
    offset = 25 * (1 - SHRINK_RATIO**2) / 16
    yy, xx = np.mgrid[:9, :9]
    ring = reference_boundary(mask[0, 0])
    ring_pts = np.argwhere(ring)
    dist = np.sqrt(((np.stack([yy, xx], -1)[:, :, None, :] - ring_pts) ** 2).sum(-1)).min(-1)
    expected_border = THRESH_MIN + (THRESH_MAX - THRESH_MIN) * np.clip(1 - dist / offset, 0, 1)
    np.testing.assert_allclose(border[0, 0], expected_border, rtol=0, atol=1e-6)
    assert border[0, 0, 2, 2] == np.float32(THRESH_MAX)
    assert border[0, 0, 0, 0] == np.float32(THRESH_MIN)


HAND_BUILT: dict[str, Callable[[], np.ndarray]] = {
    "big square": lambda: _square(40, 5, 7, 25),
    "square in corner (frame is not boundary)": lambda: _square(20, 0, 0, 12),
    "ring with hole": lambda: _square(30, 3, 3, 20) & ~_square(30, 9, 9, 8),
    "two squares touching diagonally (one component)": lambda: _square(20, 2, 2, 6) | _square(20, 8, 8, 6),
    "two separate lesions": lambda: _square(32, 1, 1, 10) | _square(32, 15, 18, 14),
    "lesion inside a hole": lambda: (_square(30, 2, 2, 26) & ~_square(30, 6, 6, 18)) | _square(30, 12, 12, 6),
}


@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_hand_built_exact(name: str) -> None:
    mask = HAND_BUILT[name]()
    core, border = adst_targets(mask)
    ref_core, ref_border = reference_targets(mask)
    np.testing.assert_array_equal(core, ref_core)
    np.testing.assert_allclose(border, ref_border, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(mask=masks(), p=params)
def test_properties(mask: np.ndarray, p: tuple[float, float, float]) -> None:
    r, t_min, t_max = p
    core, border = adst_targets(torch.from_numpy(mask), shrink_ratio=r, thresh_min=t_min, thresh_max=t_max)
    core_b, border = core.numpy() > 0.5, border.numpy()
    assert not (core_b & ~mask).any(), "core must lie inside the mask"
    assert set(np.unique(core.numpy())) <= {0.0, 1.0}
    assert border.min() >= np.float32(t_min) and border.max() <= np.float32(t_max)
    bnd = boundary_map(mask)
    assert (border[bnd] == np.float32(t_max)).all(), "border is exactly thresh_max on the boundary"
    assert (border[~bnd] < np.float32(t_max)).all(), "and only there"
    for i in range(mask.shape[0]):
        labels, n = ndimage.label(mask[i, 0], structure=np.ones((3, 3), int))
        for c in range(1, n + 1):
            assert core_b[i, 0][labels == c].any(), "every lesion keeps at least one core pixel"


@SETTINGS
@given(mask=masks())
def test_equivariance(mask: np.ndarray) -> None:
    x = torch.from_numpy(mask)
    core, border = adst_targets(x)
    for name, fwd, inv in [
        ("flip H", lambda t: torch.flip(t, dims=[-2]), lambda t: torch.flip(t, dims=[-2])),
        ("flip W", lambda t: torch.flip(t, dims=[-1]), lambda t: torch.flip(t, dims=[-1])),
        *[
            (
                f"rot90 k={k}",
                lambda t, k=k: torch.rot90(t, k, dims=[-2, -1]),
                lambda t, k=k: torch.rot90(t, -k, [-2, -1]),
            )
            for k in (1, 2, 3)
        ],
    ]:
        c, b = adst_targets(fwd(x))
        assert torch.equal(inv(c), core), name
        torch.testing.assert_close(inv(b), border, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(inv(boundary_map(fwd(x))), boundary_map(x)), name


@SETTINGS
@given(mask=masks(max_side=32, max_batch=6))
def test_batch_items_independent(mask: np.ndarray) -> None:
    core, border = adst_targets(mask, num_threads=3)
    for i in range(mask.shape[0]):
        c, b = adst_targets(mask[i : i + 1], num_threads=1)
        np.testing.assert_array_equal(core[i : i + 1], c)
        np.testing.assert_array_equal(border[i : i + 1], b)


@SETTINGS
@given(mask=masks(max_side=40))
def test_internal_paths_agree(mask: np.ndarray) -> None:
    """Force the rarely-taken engine path (OpenCV component statistics instead of per-component bbox scans)."""
    core, border = adst_targets(mask)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_engine_opencv, "_MAX_COMPONENTS_FOR_BBOX_SCAN", 0)
        core2, border2 = adst_targets(mask)
    np.testing.assert_array_equal(core, core2)
    np.testing.assert_array_equal(border, border2)


def test_min_sq_distance() -> None:
    for offset in [1e-9, 0.5, 0.84, 1.0, 1.3125, 2.0, np.nextafter(2.0, 3.0), 7.5, 1234.5678]:
        k = _engine_opencv._min_sq_distance(float(offset))
        assert np.sqrt(k) >= offset and (k == 0 or np.sqrt(k - 1) < offset)


def test_core_and_border_maps_match_adst_targets() -> None:
    mask = HAND_BUILT["two separate lesions"]()
    core, border = adst_targets(mask, shrink_ratio=0.6, thresh_min=0.1, thresh_max=0.9)
    np.testing.assert_array_equal(core_map(mask, shrink_ratio=0.6), core)
    np.testing.assert_array_equal(border_map(mask, shrink_ratio=0.6, thresh_min=0.1, thresh_max=0.9), border)


# --------------------------------------------------------------------------------------------------------------
# Degenerate cases
# --------------------------------------------------------------------------------------------------------------


def test_empty_mask() -> None:
    core, border = adst_targets(np.zeros((2, 1, 7, 5), bool))
    assert (core == 0).all() and (border == np.float32(THRESH_MIN)).all()
    assert not boundary_map(np.zeros((1, 1, 4, 4), bool)).any()


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (6, 9)])
def test_full_mask(shape: tuple[int, int]) -> None:
    core, border = adst_targets(np.ones((1, 1, *shape), bool))
    assert (core == 1).all() and (border == np.float32(THRESH_MIN)).all()
    assert not boundary_map(np.ones((1, 1, *shape), bool)).any()


def test_lesion_touching_frame() -> None:
    # Left part of the image: only the interface column is boundary, not the frame.
    mask = np.zeros((1, 1, 10, 14), bool)
    mask[..., :8] = True
    bnd = boundary_map(mask)[0, 0]
    expected = np.zeros((10, 14), bool)
    expected[:, 7] = True
    np.testing.assert_array_equal(bnd, expected)
    core, border = adst_targets(mask)
    # A = 80, L = 10, D = 6.72: the core is the columns at distance >= 6.72 from column 7, i.e. column 0 only.
    expected_core = np.zeros((10, 14), np.float32)
    expected_core[:, 0] = 1
    np.testing.assert_array_equal(core[0, 0], expected_core)
    assert (border[0, 0, :, 7] == np.float32(THRESH_MAX)).all()
    assert (border[0, 0, :, 0] == np.float32(THRESH_MIN)).all()
    np.testing.assert_allclose(border[0, 0, :, 4], THRESH_MIN + (THRESH_MAX - THRESH_MIN) * (1 - 3 / 6.72), atol=1e-6)


def test_holes_have_boundary() -> None:
    mask = HAND_BUILT["ring with hole"]()
    bnd = boundary_map(mask)[0, 0]
    # The pixels around the hole (rows/cols 8 and 17 around the 8x8 hole at 9..16) are boundary.
    assert bnd[8, 9:17].all() and bnd[17, 9:17].all() and bnd[9:17, 8].all() and bnd[9:17, 17].all()
    assert not bnd[9:17, 9:17].any()
    core, border = adst_targets(mask)
    assert not core[0, 0, 8, 9:17].any()
    assert (border[0, 0, 9:17, 9:17] > np.float32(THRESH_MIN)).any()


def test_one_pixel_lesion() -> None:
    mask = np.zeros((1, 1, 7, 7), bool)
    mask[0, 0, 3, 3] = True
    core, border = adst_targets(mask)
    np.testing.assert_array_equal(core[0, 0], mask[0, 0].astype(np.float32))
    assert border[0, 0, 3, 3] == np.float32(THRESH_MAX)
    # D = 0.84: the 4-neighbours (d = 1) are already at thresh_min.
    assert border[0, 0, 2, 3] == np.float32(THRESH_MIN)


@pytest.mark.parametrize("orientation", ["horizontal", "vertical", "diagonal"])
def test_one_pixel_wide_line(orientation: str) -> None:
    mask = np.zeros((1, 1, 12, 12), bool)
    idx = np.arange(2, 10)
    if orientation == "horizontal":
        mask[0, 0, 5, idx] = True
    elif orientation == "vertical":
        mask[0, 0, idx, 5] = True
    else:
        mask[0, 0, idx, idx] = True
    core, border = adst_targets(mask)
    np.testing.assert_array_equal(core[0, 0], mask[0, 0].astype(np.float32))
    assert (border[0, 0][mask[0, 0]] == np.float32(THRESH_MAX)).all()


def test_tiny_two_by_two_lesion() -> None:
    mask = _square(6, 2, 2, 2)
    core, _ = adst_targets(mask)
    np.testing.assert_array_equal(core, mask.astype(np.float32))


def test_thick_lesion_shrinks() -> None:
    mask = _square(64, 8, 8, 40)
    core = core_map(mask)
    assert 0 < core.sum() < 0.5 * mask.sum()


# --------------------------------------------------------------------------------------------------------------
# Input forms
# --------------------------------------------------------------------------------------------------------------


def _forms() -> dict[str, Callable[[np.ndarray], object]]:
    return {
        "numpy bool": lambda m: m,
        "numpy uint8 01": lambda m: m.astype(np.uint8),
        "numpy uint8 0/255": lambda m: m.astype(np.uint8) * 255,
        "numpy float64": lambda m: m.astype(np.float64),
        "numpy int64": lambda m: m.astype(np.int64),
        "torch bool": lambda m: torch.from_numpy(m),
        "torch uint8 01": lambda m: torch.from_numpy(m).to(torch.uint8),
        "torch uint8 0/255": lambda m: torch.from_numpy(m).to(torch.uint8) * 255,
        "torch float32": lambda m: torch.from_numpy(m).float(),
        "torch int64": lambda m: torch.from_numpy(m).long(),
        "torch non-contiguous": lambda m: torch.from_numpy(np.ascontiguousarray(m.transpose(0, 1, 3, 2))).mT,
    }


@pytest.mark.parametrize("form", list(_forms()))
def test_input_forms(form: str) -> None:
    mask = HAND_BUILT["two separate lesions"]()
    x = _forms()[form](mask)
    core, border = adst_targets(x)
    ref_core, ref_border = adst_targets(mask)
    bnd = boundary_map(x)
    if isinstance(x, torch.Tensor):
        assert isinstance(core, torch.Tensor) and isinstance(border, torch.Tensor) and isinstance(bnd, torch.Tensor)
        assert core.dtype == border.dtype == torch.float32 and bnd.dtype == torch.bool
        assert core.device == border.device == bnd.device == x.device
        core, border, bnd = core.numpy(), border.numpy(), bnd.numpy()
    else:
        assert isinstance(core, np.ndarray) and isinstance(border, np.ndarray) and isinstance(bnd, np.ndarray)
        assert core.dtype == border.dtype == np.float32 and bnd.dtype == np.bool_
    assert core.shape == border.shape == bnd.shape == mask.shape
    np.testing.assert_array_equal(core, ref_core)
    np.testing.assert_array_equal(border, ref_border)
    np.testing.assert_array_equal(bnd, boundary_map(mask))


def test_outputs_are_gradient_free() -> None:
    x = torch.from_numpy(HAND_BUILT["big square"]()).float().requires_grad_(True)
    core, border = adst_targets(x)
    assert not core.requires_grad and not border.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_in_cuda_out() -> None:
    mask = HAND_BUILT["two separate lesions"]()
    x = torch.from_numpy(mask).cuda()
    core, border = adst_targets(x)
    bnd = boundary_map(x)
    assert core.is_cuda and border.is_cuda and bnd.is_cuda
    ref_core, ref_border = adst_targets(mask)
    np.testing.assert_array_equal(core.cpu().numpy(), ref_core)
    np.testing.assert_allclose(border.cpu().numpy(), ref_border, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(bnd.cpu().numpy(), boundary_map(mask))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_works_in_forked_child_after_parent_used_threads() -> None:
    """DataLoader workers are forked: the parent's thread pool must not be reused (it would deadlock)."""
    mask = np.concatenate([HAND_BUILT["two separate lesions"]()] * 4)
    expected = adst_targets(mask, num_threads=2)
    pid = os.fork()
    if pid == 0:  # child
        ok = False
        try:
            core, border = adst_targets(mask, num_threads=2)
            ok = np.array_equal(core, expected[0]) and np.array_equal(border, expected[1])
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("adst_targets hung in a forked child")


# --------------------------------------------------------------------------------------------------------------
# Torch engine (device-native): exact agreement with the reference and with the OpenCV engine
# --------------------------------------------------------------------------------------------------------------


@settings(SETTINGS, max_examples=250)
@given(mask=masks(), p=params)
def test_torch_engine_matches_reference_and_opencv(mask: np.ndarray, p: tuple[float, float, float]) -> None:
    r, t_min, t_max = p
    kwargs = {"shrink_ratio": r, "thresh_min": t_min, "thresh_max": t_max}
    core, border = adst_targets(torch.from_numpy(mask), engine="torch", **kwargs)
    ref_core, ref_border = reference_targets(mask, r, t_min, t_max)
    np.testing.assert_array_equal(core.numpy(), ref_core)
    np.testing.assert_allclose(border.numpy(), ref_border, rtol=0, atol=1e-6)
    cv_core, cv_border = adst_targets(mask, engine="opencv", **kwargs)
    np.testing.assert_array_equal(core.numpy(), cv_core)
    np.testing.assert_allclose(border.numpy(), cv_border, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_torch_engine_hand_built_exact(name: str) -> None:
    mask = HAND_BUILT[name]()
    core, border = adst_targets(mask, engine="torch")
    ref_core, ref_border = reference_targets(mask)
    np.testing.assert_array_equal(core, ref_core)
    np.testing.assert_allclose(border, ref_border, rtol=0, atol=1e-6)


def _spiral(size: int) -> np.ndarray:
    """A 1-pixel-wide square spiral (one component whose labels must travel far: many propagation steps)."""
    m = np.zeros((size, size), bool)
    y, x, dy, dx = 0, 0, 0, 1
    lo, hi = 0, size - 1
    while lo <= hi:
        m[y, x] = True
        ny, nx = y + dy, x + dx
        if not (lo <= ny <= hi and lo <= nx <= hi) or ((dy, dx) == (-1, 0) and ny == lo + 1):
            if (dy, dx) == (-1, 0):
                lo, hi = lo + 2, hi - 2
            dy, dx = dx, -dy  # turn right
            ny, nx = y + dy, x + dx
            if not (lo <= ny <= hi + 2 and lo - 2 <= nx <= hi + 2) or m[ny, nx]:
                break
        y, x = ny, nx
    return m


def test_torch_engine_realistic_and_hard_shapes() -> None:
    """Larger masks (big offsets, crops clipped by the frame), mixed crop sizes, a spiral and many specks."""
    rng = np.random.default_rng(1234)
    kinds = ["blobs", "disks", "rects", "blobs", "noise", "lines", "empty", "full"]
    mask = np.stack([random_mask(rng, 96, 130, kind)[None] for kind in kinds])
    spiral = np.zeros((1, 1, 96, 130), bool)
    spiral[0, 0, :61, :61] = _spiral(61)
    assert ndimage.label(spiral[0, 0], structure=np.ones((3, 3)))[1] == 1
    mask = np.concatenate([mask, spiral])
    core, border = adst_targets(torch.from_numpy(mask), engine="torch")
    ref_core, ref_border = reference_targets(mask)
    np.testing.assert_array_equal(core.numpy(), ref_core)
    np.testing.assert_allclose(border.numpy(), ref_border, rtol=0, atol=1e-6)


def test_torch_engine_labels_match_scipy() -> None:
    rng = np.random.default_rng(7)
    mask = np.stack([random_mask(rng, 40, 57, kind) for kind in ["noise", "blobs", "lines", "rects", "empty"]])
    mask = np.concatenate([mask, _spiral(57)[None, :40]])
    root = _engine_torch._label_torch(torch.from_numpy(mask)).numpy().reshape(mask.shape)
    for i in range(mask.shape[0]):
        labels, n = ndimage.label(mask[i], structure=np.ones((3, 3), int))
        assert ((root[i] >= 0) == mask[i]).all()
        # Same partition: a bijection between scipy's labels and ours.
        pairs = {(int(a), int(b)) for a, b in zip(labels[mask[i]], root[i][mask[i]], strict=True)}
        assert len(pairs) == n == len({b for _, b in pairs})


def test_torch_engine_degenerate_cases() -> None:
    shapes = [(1, 1), (1, 9), (7, 1), (5, 8)]
    for h, w in shapes:
        for fill in (False, True):
            mask = np.full((2, 1, h, w), fill)
            core, border = adst_targets(torch.from_numpy(mask), engine="torch")
            assert torch.equal(core, torch.full_like(core, float(fill)))
            assert (border == np.float32(THRESH_MIN)).all()
    # A full image next to an empty one and a normal one in the same batch.
    mask = np.zeros((3, 1, 9, 9), bool)
    mask[0] = True
    mask[2, 0, 2:7, 2:7] = True
    core, border = adst_targets(mask, engine="torch")
    ref_core, ref_border = reference_targets(mask)
    np.testing.assert_array_equal(core, ref_core)
    np.testing.assert_allclose(border, ref_border, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fn", [adst_targets, core_map, border_map])
def test_torch_engine_outputs(fn: Callable[..., object]) -> None:
    mask = HAND_BUILT["two separate lesions"]()
    x = torch.from_numpy(mask).float().requires_grad_(True)
    out = fn(x, engine="torch")
    expected = fn(mask, engine="opencv")
    outs, refs = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
    for o, e in zip(outs, refs, strict=True):
        assert isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.device == x.device
        assert o.shape == x.shape and not o.requires_grad and o.grad_fn is None
        np.testing.assert_allclose(o.numpy(), e, rtol=0, atol=1e-6)
    # NumPy in, NumPy out, with either engine.
    out_np = fn(mask, engine="torch")
    for o in out_np if isinstance(out_np, tuple) else (out_np,):
        assert isinstance(o, np.ndarray) and o.dtype == np.float32 and o.shape == mask.shape


def test_auto_engine_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto``: OpenCV for NumPy and CPU tensors, torch for tensors on other devices (checked with a fake)."""
    mask = HAND_BUILT["two separate lesions"]()
    calls: list[str] = []
    real_torch, real_numpy = targets_module._targets_torch, targets_module._targets_numpy
    monkeypatch.setattr(targets_module, "_targets_torch", lambda *a: calls.append("torch") or real_torch(*a))
    monkeypatch.setattr(targets_module, "_targets_numpy", lambda *a: calls.append("opencv") or real_numpy(*a))
    adst_targets(mask)
    adst_targets(torch.from_numpy(mask))
    adst_targets(torch.from_numpy(mask), engine="torch")
    adst_targets(mask, engine="opencv")
    assert calls == ["opencv", "opencv", "torch", "opencv"]
    meta = torch.zeros(1, 1, 4, 4, dtype=torch.bool, device="meta")
    assert targets_module._use_torch_engine(meta, "auto")
    assert not targets_module._use_torch_engine(meta, "opencv")
    assert targets_module._use_torch_engine(mask, "torch")


@pytest.mark.parametrize("fn", [adst_targets, core_map, border_map])
def test_bad_engine(fn: Callable[..., object]) -> None:
    assert ENGINES == ("auto", "opencv", "torch")
    with pytest.raises(ValueError, match=r"unknown engine 'gpu'; valid options are \('auto', 'opencv', 'torch'\)"):
        fn(_one(), engine="gpu")
    with pytest.raises(TypeError, match=r"engine to be one of .*got NoneType"):
        fn(_one(), engine=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_uses_torch_engine_and_stays_on_device(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    mask = np.stack([random_mask(rng, 64, 80, kind)[None] for kind in KINDS])
    monkeypatch.setattr(targets_module, "_targets_numpy", lambda *a: pytest.fail("auto used OpenCV on CUDA"))
    x = torch.from_numpy(mask).cuda()
    core, border = adst_targets(x)
    assert core.is_cuda and border.is_cuda and core.dtype == border.dtype == torch.float32
    ref_core, ref_border = reference_targets(mask)
    np.testing.assert_array_equal(core.cpu().numpy(), ref_core)
    np.testing.assert_allclose(border.cpu().numpy(), ref_border, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------


def _one() -> np.ndarray:
    return _square(8, 2, 2, 3)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.where(_one(), np.nan, 0.0), "NaN"),
        (_one().astype(np.int64) * 2, "binary mask"),
        (_one().astype(np.float32) * 0.5, "binary mask"),
        (torch.full((1, 1, 4, 4), 0.5), "binary mask"),
        (np.zeros((1, 8, 8), bool), r"shape \(B, 1, H, W\)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.bool), r"shape \(B, 1, H, W\)"),
        (np.zeros((1, 1, 0, 8), bool), "non-empty H and W"),
    ],
)
@pytest.mark.parametrize("fn", [adst_targets, core_map, border_map, boundary_map])
def test_bad_masks(mask: object, match: str, fn: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match=match):
        fn(mask)


def test_bad_mask_type() -> None:
    with pytest.raises(TypeError, match="mask"):
        adst_targets([[0, 1]])


@pytest.mark.parametrize("value", [0, 1, -0.1, 1.5, float("nan")])
def test_bad_shrink_ratio(value: float) -> None:
    for fn in (adst_targets, core_map, border_map):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: expected 0 < shrink_ratio < 1, got {value}"):
            fn(_one(), shrink_ratio=value)


@pytest.mark.parametrize(
    ("t_min", "t_max"), [(0.5, 0.5), (0.7, 0.3), (-0.1, 0.7), (0.3, 1.1), (float("nan"), 0.7), (0.3, float("nan"))]
)
def test_bad_thresholds(t_min: float, t_max: float) -> None:
    for fn in (adst_targets, border_map):
        with pytest.raises(ValueError, match=rf"thresh_min < thresh_max .*thresh_min={t_min}, thresh_max={t_max}"):
            fn(_one(), thresh_min=t_min, thresh_max=t_max)


def test_bad_types_and_threads() -> None:
    with pytest.raises(TypeError, match="shrink_ratio"):
        adst_targets(_one(), shrink_ratio="0.4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_threads"):
        adst_targets(_one(), num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        adst_targets(_one(), num_threads=2.0)  # type: ignore[arg-type]
