"""Figures of an analysis (matplotlib, Agg).

Hand-drawn: orthogonal slices of a group map over the training subjects' mean image, in the scans' own grid
(:func:`orthogonal_slices`), and a bar chart of the top regions. Drawn with nilearn
(:func:`brain_map_figures`): a stat map over the MNI152 template that nilearn ships, and a glass brain, each
thresholded at a percentile of the map's |values| over the brain voxels.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import nibabel as nib

    from brainmt.analysis.maps import BrainGrid

FIGURE_PERCENTILE = 90.0   # nilearn figures draw the voxels whose |value| reaches this percentile over the brain
SUBJECT_FIGURES = 4        # nilearn figures of the first this many analysed subjects (sorted ids)


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


@functools.lru_cache(maxsize=1)
def mni_template() -> nib.Nifti1Image:
    """The MNI152 template (ICBM 2009a nonlinear symmetric, 1 mm) bundled with nilearn: read from the package, no
    download."""
    from nilearn.datasets import load_mni152_template

    return load_mni152_template()


def figure_threshold(values: np.ndarray, percentile: float = FIGURE_PERCENTILE) -> float:
    """The ``percentile`` of |values| over the brain voxels ``values`` (n_brain,): the smallest |value| drawn."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    return float(np.percentile(magnitude, percentile)) if magnitude.size else 0.0


def brain_map_figures(grid: BrainGrid, values: np.ndarray, stem: str | Path, title: str, signed: bool,
                      percentile: float = FIGURE_PERCENTILE) -> list[dict]:
    """nilearn figures of a map over ``grid``'s brain voxels: ``<stem>_stat.png`` (plot_stat_map over the MNI
    template, slices through the peak |value|) and ``<stem>_glass.png`` (plot_glass_brain); returns one record
    (file, threshold, percentile) a figure.

    Voxels below the ``percentile`` of |values| over the brain are not drawn. The map is placed by its affine (nilearn
    resamples it onto the template), so any grid draws; the anatomy under it is only right for MNI-registered data.
    ``signed`` uses a colour map centred on 0 (negative values drawn too); otherwise values are magnitudes.
    """
    _pyplot()
    import nibabel as nib
    from nilearn import plotting

    values = np.asarray(values, dtype=np.float32)
    threshold = figure_threshold(values, percentile)
    volume = grid.unpack(values)
    img = nib.Nifti1Image(volume, grid.affine)
    peak = np.unravel_index(int(np.argmax(np.abs(volume))), volume.shape)
    peak_mm = tuple(float(v) for v in (grid.affine[:3, :3] @ np.array(peak) + grid.affine[:3, 3]).round(1))
    vmax = float(np.abs(values).max()) or 1.0
    caption = f"{title}; |v| >= {threshold:.3g} (p{percentile:g})"
    cmap = "cold_hot" if signed else "hot"          # on the stat map's black background; the glass brain's are nilearn's
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="empty mask")    # an all-zero map (a t-map of one subject)
        stat = plotting.plot_stat_map(img, bg_img=mni_template(), threshold=threshold, cut_coords=peak_mm, cmap=cmap,
                                      symmetric_cbar=signed, vmax=vmax, draw_cross=False, title=caption, colorbar=True)
        glass = plotting.plot_glass_brain(img, threshold=threshold, plot_abs=not signed, symmetric_cbar=signed,
                                          vmax=vmax, display_mode="lyrz", colorbar=True, title=caption)
    for kind, display in (("stat", stat), ("glass", glass)):
        path = stem.with_name(f"{stem.name}_{kind}.png")
        display.savefig(str(path), dpi=100)
        display.close()
        records.append({"file": str(path), "threshold": threshold, "percentile": percentile, "peak_mm": list(peak_mm)})
    return records
