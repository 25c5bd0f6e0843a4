"""Benchmark the AdSTNet core/border target generation (``adst_plugin.targets.adst_targets``).

Compares, on the same deterministic random lesion masks and in the same run:

1. ``adst_targets(engine="opencv")`` (OpenCV engine, threads over the batch; masks on a GPU make a host round trip)
   and ``adst_targets(engine="torch")`` (pure torch, on the masks' device), with their throughput ratio;
2. an exact SciPy reference (``scipy.ndimage.label`` + ``distance_transform_edt`` per component), written here;
3. optionally a DBNet-style polygon-offset pipeline (``cv2.findContours`` -> ``pyclipper`` offset by -D / +D ->
   ``cv2.fillPoly``; border from point-to-segment distances inside the dilated polygon). Skipped with a note when
   ``pyclipper`` is not installed. It approximates a different (polygon-based) definition, so its agreement numbers
   are for context only.

Usage::

    python examples/benchmarks/targets.py                      # 256 and 512, batch 1 and 32, CPU, 2 threads
    python examples/benchmarks/targets.py --sizes 256 --batches 32 --repeats 7 --device auto
    python examples/benchmarks/targets.py --sizes 256 --batches 1 32 256 --masks 256 --device cuda --no-polygon

Throughput is masks per second: the median over ``--repeats`` timed passes (after a warm-up pass) over the same
``--masks`` masks, fed in batches of ``--batches`` (on CUDA, timed with ``torch.cuda.synchronize``). torch's
intra-op threads are set to ``--threads`` too. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi

from adst_examples.benchmarks.scipy_reference import reference_targets
from adst_examples.training.distributed import describe_device
from adst_plugin.constants import SHRINK_RATIO, THRESH_MAX, THRESH_MIN
from adst_plugin.targets import adst_targets

Targets = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def make_masks(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Realistic random lesion masks: 0-3 blurred, noisy ellipses of varied size (about 8% empty).

    Args:
        n: Number of masks.
        size: Height and width.
        seed: RNG seed (the masks are deterministic given ``n``, ``size``, ``seed``).

    Returns:
        Bool ``(n, 1, size, size)``.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, size, size), bool)
    for i in range(n):
        if rng.random() < 0.08:
            continue
        canvas = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            # Log-uniform semi-axes from ~1% to ~25% of the image: tiny specks to large lesions.
            a = float(np.exp(rng.uniform(math.log(0.01 * size), math.log(0.25 * size))))
            b = a * float(rng.uniform(0.4, 1.0))
            centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            axes = (max(1, round(a)), max(1, round(b)))
            cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.03 * size)
        blob = cv2.GaussianBlur(canvas, (0, 0), 0.01 * size + 0.5) + 2.0 * noise
        out[i, 0] = blob > 0.5
    return out


# --------------------------------------------------------------------------------------------------------------
# Exact SciPy reference
# --------------------------------------------------------------------------------------------------------------


def scipy_targets(mask: np.ndarray, r: float, t_min: float, t_max: float) -> Targets:
    """The exact SciPy reference (:mod:`adst_examples.benchmarks.scipy_reference`), as float32 ``(B, 1, H, W)``."""
    core, border = reference_targets(mask, r, t_min, t_max)
    return core.astype(np.float32), border.astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# DBNet-style polygon-offset pipeline (optional, needs pyclipper)
# --------------------------------------------------------------------------------------------------------------


def _segment_distances(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Distance from grid points to the closed polygon ``poly`` (``(N, 2)`` x, y), as the min over its segments."""
    best = np.full(xs.shape, np.inf)
    for p, q in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        dx, dy = float(q[0] - p[0]), float(q[1] - p[1])
        length2 = max(dx * dx + dy * dy, 1e-12)  # a degenerate segment is its first end point (t = 0)
        t = np.clip(((xs - p[0]) * dx + (ys - p[1]) * dy) / length2, 0.0, 1.0)
        np.minimum(best, np.hypot(xs - (p[0] + t * dx), ys - (p[1] + t * dy)), out=best)
    return best


def polygon_targets(mask: np.ndarray, r: float, t_min: float, t_max: float, pyclipper: ModuleType) -> Targets:
    """DBNet-style targets from lesion contours: polygon offsets by ``-D`` (core) and ``+D`` (border region).

    Args:
        mask: Bool ``(B, 1, H, W)``.
        r: Shrink ratio.
        t_min: Border value far from boundaries.
        t_max: Border value on boundaries.
        pyclipper: The imported ``pyclipper`` module.

    Returns:
        ``(core, border)``: float32 ``(B, 1, H, W)``.
    """
    batch, _, height, width = mask.shape
    core = np.zeros(mask.shape, np.float32)
    border = np.zeros(mask.shape, np.float32)
    for i in range(batch):
        contours, _ = cv2.findContours(mask[i, 0].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        shrunk = np.zeros((height, width), np.uint8)
        acc = np.zeros((height, width))
        for contour in contours:
            poly = contour[:, 0, :]
            area, length = cv2.contourArea(contour), cv2.arcLength(contour, True)
            if len(poly) < 3 or area <= 0 or length <= 0:
                continue
            offset = area * (1.0 - r * r) / length
            clipper = pyclipper.PyclipperOffset()
            clipper.AddPath(poly.tolist(), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
            for path in clipper.Execute(-offset):
                cv2.fillPoly(shrunk, [np.asarray(path, np.int32)], 1)
            dilated = clipper.Execute(offset)
            if not dilated:
                continue
            outer = np.asarray(dilated[0], np.int32)
            x0, y0 = np.maximum(outer.min(axis=0), 0)
            x1, y1 = np.minimum(outer.max(axis=0), [width - 1, height - 1])
            if x1 < x0 or y1 < y0:
                continue
            ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
            region = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
            cv2.fillPoly(region, [outer - [x0, y0]], 1)
            value = np.clip(1.0 - _segment_distances(xs, ys, poly.astype(np.float64)) / offset, 0.0, 1.0)
            window = acc[y0 : y1 + 1, x0 : x1 + 1]
            np.maximum(window, value * region, out=window)
        core[i, 0] = shrunk
        border[i, 0] = t_min + (t_max - t_min) * acc
    return core, border


# --------------------------------------------------------------------------------------------------------------
# Timing and agreement
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One benchmark result."""

    size: int
    batch: int
    method: str
    masks_per_s: float
    cpu_us: float
    speedup: float
    core_iou: float
    border_mad: float


def time_method(fn: Callable[[], object], n_masks: int, repeats: int) -> tuple[float, float]:
    """Time ``fn`` (which processes ``n_masks`` masks) over ``repeats`` passes after one warm-up.

    Returns:
        ``(masks_per_s, cpu_us_per_mask)``: median wall-clock throughput, and median process CPU time (all threads)
        per mask, which is robust to other processes competing for the cores.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return n_masks / statistics.median(walls), 1e6 * statistics.median(cpus) / n_masks


def agreement(core: np.ndarray, border: np.ndarray, ref: Targets) -> tuple[float, float]:
    """Mean per-mask core IoU (1 when both empty) and border mean absolute difference vs ``ref``."""
    a, b = core.astype(bool), ref[0].astype(bool)
    inter = (a & b).sum(axis=(1, 2, 3))
    union = (a | b).sum(axis=(1, 2, 3))
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(iou.mean()), float(np.abs(border.astype(np.float64) - ref[1]).mean())


def to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Tensor or array to a NumPy array."""
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x


def main() -> None:
    """Parse arguments, run the benchmark, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="mask sizes (H = W)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes for adst_targets")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where the masks live")
    parser.add_argument("--threads", type=int, default=2, help="num_threads for adst_targets and torch threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (median reported)")
    parser.add_argument("--masks", type=int, default=64, help="masks per timed pass")
    parser.add_argument("--seed", type=int, default=0, help="mask generator seed")
    parser.add_argument("--no-polygon", action="store_true", help="skip the DBNet polygon-offset row")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    pyclipper: ModuleType | None = None
    if not args.no_polygon:
        try:
            pyclipper = importlib.import_module("pyclipper")
        except ImportError:
            print("note: pyclipper is not installed; skipping the DBNet polygon-offset row (pip install pyclipper)")

    torch.set_num_threads(args.threads)
    r, t_min, t_max = SHRINK_RATIO, THRESH_MIN, THRESH_MAX
    load_before = os.getloadavg()[0]
    cpu = describe_device(torch.device("cpu"))
    print(f"CPU: {cpu} ({os.cpu_count()} logical cores); torch {torch.__version__}, OpenCV {cv2.__version__}")
    print(f"device={device}, threads={args.threads}, masks/pass={args.masks}, repeats={args.repeats}\n")
    rows: list[Row] = []
    for size in args.sizes:
        masks = make_masks(args.masks, size, seed=args.seed)
        n_lesions = sum(ndi.label(m[0], structure=np.ones((3, 3)))[1] for m in masks)
        print(f"{size}x{size}: {args.masks} masks, {n_lesions} lesions, {np.mean(masks):.1%} foreground")
        reference = scipy_targets(masks, r, t_min, t_max)

        def run_scipy(masks: np.ndarray = masks) -> Targets:
            return scipy_targets(masks, r, t_min, t_max)

        scipy_rate, scipy_cpu = time_method(run_scipy, args.masks, args.repeats)
        polygon_rate, polygon_cpu, polygon_agreement = math.nan, math.nan, (math.nan, math.nan)
        if pyclipper is not None:

            def run_polygon(masks: np.ndarray = masks, module: ModuleType = pyclipper) -> Targets:
                return polygon_targets(masks, r, t_min, t_max, module)

            polygon_rate, polygon_cpu = time_method(run_polygon, args.masks, args.repeats)
            polygon_agreement = agreement(*run_polygon(), reference)
        for batch in args.batches:
            chunks = [torch.from_numpy(masks[i : i + batch]).to(device) for i in range(0, args.masks, batch)]

            rates = {}
            new = []
            for engine in ("opencv", "torch"):

                def run_ours(
                    chunks: list[torch.Tensor] = chunks, engine: str = engine
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
                    out = [
                        adst_targets(
                            c,
                            shrink_ratio=r,
                            thresh_min=t_min,
                            thresh_max=t_max,
                            num_threads=args.threads,
                            engine=engine,
                        )
                        for c in chunks
                    ]
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    return out

                rate, cpu_us = time_method(run_ours, args.masks, args.repeats)
                rates[engine] = rate
                outs = run_ours()
                core = np.concatenate([to_numpy(c) for c, _ in outs])
                border = np.concatenate([to_numpy(b) for _, b in outs])
                method = f"adst_targets ({'OpenCV' if engine == 'opencv' else 'torch'})"
                new.append(
                    Row(size, batch, method, rate, cpu_us, rate / scipy_rate, *agreement(core, border, reference))
                )
            print(
                f"  batch {batch:>3} torch / OpenCV engine: {rates['torch']:.1f} / {rates['opencv']:.1f} masks/s"
                f" = x{rates['torch'] / rates['opencv']:.3f}"
            )
            new.append(Row(size, batch, "scipy exact reference", scipy_rate, scipy_cpu, 1.0, 1.0, 0.0))
            if pyclipper is not None:
                speedup = polygon_rate / scipy_rate
                new.append(
                    Row(size, batch, "DBNet polygon offset", polygon_rate, polygon_cpu, speedup, *polygon_agreement)
                )
            for row in new:
                print(
                    f"  batch {batch:>3} {row.method:<24} {row.masks_per_s:>8.1f} masks/s"
                    f" {row.cpu_us:>7.0f} us CPU/mask  x{row.speedup:>6.2f} vs scipy"
                    f"  core IoU {row.core_iou:.4f}  border mean|d| {row.border_mad:.1e}"
                )
            rows.extend(new)

    print("\n| size | batch | method | masks/s | CPU us/mask | vs scipy | core IoU vs scipy | border mean abs diff |")
    print("|---:|---:|:---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.size} | {row.batch} | {row.method} | {row.masks_per_s:.0f} | {row.cpu_us:.0f} "
            f"| {row.speedup:.1f}x | {row.core_iou:.4f} | {row.border_mad:.1e} |"
        )
    print(
        f"\n{describe_device(device)}, {os.cpu_count()} logical cores, adst_targets threads={args.threads}, "
        f"device={device}; "
        f"load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}"
        " (other processes skew wall-clock rates; CPU us/mask sums all threads, OpenCV's pool included)."
        "\nscipy and polygon rows process masks one by one (batch size does not apply); the polygon pipeline uses a"
        "\ndifferent (contour-perimeter) definition of D, so its agreement columns are context, not an error."
    )


if __name__ == "__main__":
    main()
