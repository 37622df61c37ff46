"""Figures of an analysis (matplotlib, Agg): orthogonal slices of a group map, a bar chart of the top regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def orthogonal_slices(volume: np.ndarray, underlay: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                      path: str | Path, title: str, signed: bool = False, show_fraction: float = 0.5) -> Path:
    """Sagittal, coronal and axial slices through the peak of ``volume`` over ``underlay`` (canonical RAS+ arrays
    with ``affine``; slices are labelled in mm).

    The map is drawn where it is inside ``mask`` and among the ``show_fraction`` largest |values|; ``signed``
    uses a diverging colour map centred on 0.
    """
    plt = _pyplot()
    magnitude = np.where(mask, np.abs(volume), 0.0)
    peak = np.unravel_index(int(np.argmax(magnitude)), volume.shape)
    mm = (np.asarray(affine)[:3, :3] @ np.array(peak) + np.asarray(affine)[:3, 3]).round(1)
    threshold = np.quantile(magnitude[mask], 1 - show_fraction) if mask.any() else 0.0
    shown = np.ma.masked_where(~mask | (magnitude < threshold), volume)
    vmax = float(magnitude.max()) or 1.0
    vmin, cmap = (-vmax, "RdBu_r") if signed else (0.0, "hot")
    under = np.ma.masked_where(~mask, underlay)
    vx, vy, vz = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    views = [(f"sagittal, x = {mm[0]:g} mm", (peak[0],), vz / vy, "posterior → anterior", "inferior → superior"),
             (f"coronal, y = {mm[1]:g} mm", (slice(None), peak[1]), vz / vx, "left → right", "inferior → superior"),
             (f"axial, z = {mm[2]:g} mm", (slice(None), slice(None), peak[2]), vy / vx, "left → right",
              "posterior → anterior")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    image = None
    for ax, (name, index, aspect, xlabel, ylabel) in zip(axes, views):
        ax.imshow(under[index].T, origin="lower", cmap="gray", aspect=aspect, interpolation="nearest")
        image = ax.imshow(shown[index].T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect,
                          interpolation="nearest", alpha=0.9)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="t" if signed else "attribution")
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def top_regions_chart(rows: list[dict], path: str | Path, top: int, title: str) -> Path:
    """Horizontal bars of the ``top`` regions' mean |IG| (rows ranked as in regions.csv)."""
    plt = _pyplot()
    shown = rows[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(shown) + 1.2))
    ax.barh([r["name"] for r in shown], [r["mean_abs_ig"] for r in shown], color="tab:red")
    ax.set_xlabel("mean |IG| per voxel")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
