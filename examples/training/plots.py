"""Figures of a run: loss and validation curves, and test overlays (matplotlib's object API, no pyplot state).

``*_figure`` builds the figure (what the tests inspect); ``plot_*`` saves it as a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["OverlayRow", "curves_figure", "loss_keys", "overlay_figure", "plot_curves", "plot_overlays"]

#: Score-panel columns of a log row.
SCORE_KEYS = ("val_dice", "val_iou", "train_dice")
#: ``train_*`` columns that are not loss terms.
NOT_LOSS = frozenset({"train_dice", "train_s"})


def loss_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The loss columns the run logged: every ``train_<term>`` (``total`` first, then in logging order) and
    ``val_loss``. Whatever terms the preset trains (``core``/``threshold``/``binary``, ``main``/``edge``/``fused``,
    a peer's ``aux``) are drawn."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k.startswith("train_") and k not in NOT_LOSS and k not in keys]
    keys.sort(key=lambda k: k != "train_total")
    return keys + (["val_loss"] if any("val_loss" in row for row in history) else [])


_DPI = 110


def curves_figure(history: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Two panels: training loss terms (and validation loss) and validation Dice/IoU per epoch."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_val = fig.subplots(1, 2)

    def draw(ax: Any, key: str, style: str = "-") -> None:
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            ax.plot(epochs, [math.nan if v is None else v for v in values], style, marker=".", label=key)

    for key in loss_keys(history):
        draw(ax_loss, key, "--" if key == "val_loss" else "-")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    for key in SCORE_KEYS:
        draw(ax_val, key)
    best = [row["epoch"] for row in history if row.get("is_best")]
    if best:
        ax_val.axvline(best[-1], color="gray", linestyle=":", label=f"best (epoch {best[-1]})")
    ax_val.set(xlabel="epoch", ylabel="score", title="Dice / IoU", ylim=(0, 1))
    for ax in (ax_loss, ax_val):
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Save :func:`curves_figure` as a PNG."""
    curves_figure(history, title).savefig(path, dpi=_DPI)


@dataclass
class OverlayRow:
    """One test image of ``overlays.png``.

    Attributes:
        name: Sample name (the row's title).
        image: ``(H, W)`` gray or ``(H, W, 3)`` RGB, values in ``[0, 1]``.
        target: ``(H, W)`` ground truth in ``{0, 1}``.
        prob: ``(H, W)`` predicted lesion probability.
        dice: The image's test Dice.
        maps: Extra ``(H, W)`` probability maps drawn after the prediction (ADST ``main``, ``edge``, ``fused``).
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    prob: np.ndarray
    dice: float
    maps: dict[str, np.ndarray] = field(default_factory=dict)


def overlay_figure(rows: Sequence[OverlayRow], title: str = "") -> Figure:
    """Grid: image | ground truth | prediction (red, ground-truth contour green) | maps, one row per image."""
    map_names = list(rows[0].maps) if rows else []
    cols = 3 + len(map_names)
    fig = Figure(figsize=(2.2 * cols, 2.3 * len(rows)))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for ax, row in zip(axes, rows, strict=True):
        rgb = row.image if row.image.ndim == 3 else np.stack([row.image] * 3, axis=-1)
        overlay = rgb.astype(np.float32).copy()
        pred = row.prob >= 0.5
        overlay[pred] = 0.5 * overlay[pred] + 0.5 * np.array([1.0, 0.0, 0.0], dtype=np.float32)
        ax[0].imshow(row.image, cmap="gray" if row.image.ndim == 2 else None, vmin=0, vmax=1)
        ax[1].imshow(row.target, cmap="gray", vmin=0, vmax=1)
        ax[2].imshow(overlay)
        if row.target.any():
            ax[2].contour(row.target, levels=[0.5], colors="lime", linewidths=0.8)
        for c, key in enumerate(map_names, start=3):
            ax[c].imshow(row.maps[key], cmap="magma", vmin=0, vmax=1)
        titles = [row.name, "ground truth", f"prediction (Dice {row.dice:.3f})", *(f"ADST {k}" for k in map_names)]
        for a, text in zip(ax, titles, strict=True):
            a.set_title(text, fontsize=7)
            a.set_xticks([])
            a.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_overlays(rows: Sequence[OverlayRow], path: Path, title: str = "") -> None:
    """Save :func:`overlay_figure` as a PNG."""
    overlay_figure(rows, title).savefig(path, dpi=_DPI)
