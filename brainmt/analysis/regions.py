"""Region tables: attribution averaged inside the parcels of an atlas, ranked.

An atlas is any integer-labelled 3-D NIfTI (Schaefer, HCP-MMP, AAL, Harvard-Oxford, ...) in the scans'
space, or one that nilearn fetches by name (:mod:`brainmt.analysis.atlases`); it is resampled to the scans'
grid by nearest neighbour through the two affines. Its label file
may be a TSV/CSV with an index and a name column, an FSL atlas XML, a FreeSurfer-style lookup table or
any text of ``<integer> <name> ...`` lines (Schaefer's ``*_order.txt``), or one name a line.

Without an atlas, :func:`builtin_lobes` parcellates the brain mask into 12 coarse regions (six lobes or
compartments a hemisphere) from MNI coordinates: a guide to where a map points, not anatomy.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from brainmt.analysis.maps import BrainGrid
from brainmt.data.nifti import ScanError, read_volume

# extent of the MNI152 brain (mm) that the built-in lobes are drawn in; masks of another size are scaled to it
MNI_BRAIN_BOX = ((-70.0, 70.0), (-106.0, 72.0), (-52.0, 80.0))
LOBES = ("frontal", "parietal", "temporal", "occipital", "deep grey (basal ganglia, thalamus)", "cerebellum, brainstem")


class AtlasError(ValueError):
    """An atlas or its label file cannot be used; the message names the file."""


def read_label_file(path: str | Path) -> dict[int, str]:
    """Label value -> name from a TSV/CSV, an FSL XML, a lookup table (``<int> <name> ...``) or one name a line."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise AtlasError(f"{path}: label file not found") from None
    except OSError as exc:
        raise AtlasError(f"{path}: unreadable label file ({exc})") from None
    if path.suffix.lower() == ".xml" or text.lstrip().startswith("<?xml"):
        # FSL atlases: <label index="i" ...>Name</label>, image value i + 1 (0 is background)
        found = re.findall(r"<label\s+index=\"(\d+)\"[^>]*>([^<]*)</label>", text)
        if not found:
            raise AtlasError(f"{path}: an XML label file without <label index=...> entries")
        return {int(i) + 1: name.strip() for i, name in found}
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise AtlasError(f"{path}: empty label file")
    delimiter = "\t" if "\t" in lines[0] else "," if "," in lines[0] else None
    if delimiter:
        rows = list(csv.reader(lines, delimiter=delimiter))
        header = [h.strip().lower() for h in rows[0]]
        index_col = next((header.index(c) for c in ("index", "label", "id", "value", "key", "roi") if c in header), None)
        name_col = next((header.index(c) for c in ("name", "label_name", "region", "roi_name", "labelname", "structure")
                         if c in header), None)
        if index_col is not None and name_col is not None and index_col != name_col:
            try:
                return {int(float(r[index_col])): r[name_col].strip() for r in rows[1:] if len(r) > max(index_col, name_col)}
            except ValueError as exc:
                raise AtlasError(f"{path}: the index column '{header[index_col]}' is not numeric ({exc})") from None
    labels: dict[int, str] = {}
    for n, line in enumerate(lines, start=1):
        parts = line.replace(",", " ").split()
        if parts[0].lstrip("-").isdigit() and len(parts) > 1:
            labels[int(parts[0])] = parts[1]
        elif not parts[0].lstrip("-").isdigit():
            labels[n] = line.strip()
    if not labels:
        raise AtlasError(f"{path}: no '<integer> <name>' lines or names found")
    return labels


def load_atlas(path: str | Path, labels_path: str | Path | None, grid: BrainGrid) -> tuple[np.ndarray, dict[int, str]]:
    """An integer-labelled atlas resampled (nearest neighbour) to the brain voxels: (n_brain,) int labels, names."""
    path = Path(path)
    try:
        data, img = read_volume(path, "atlas")
    except ScanError as exc:   # a 4-D probabilistic atlas needs thresholding into labels first
        raise AtlasError(str(exc)) from None
    packed = labels_on_grid(data, img.affine, grid, str(path))
    return packed, named_labels(packed, read_label_file(labels_path) if labels_path else {})


def labels_on_grid(data: np.ndarray, affine: np.ndarray, grid: BrainGrid, source: str) -> np.ndarray:
    """A 3-D integer label volume with ``affine`` -> (n_brain,) labels of the brain voxels, by nearest neighbour
    through the two affines (0 where the atlas does not reach); ``source`` names the atlas in errors."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise AtlasError(f"{source}: an atlas must be a 3-D label volume, got shape {data.shape} (a probabilistic "
                         "atlas needs thresholding into labels first)")
    if not np.allclose(data, np.round(data)):
        raise AtlasError(f"{source}: values are not integers; an atlas must be an integer-labelled parcellation")
    data = np.round(data).astype(np.int64)
    # world coordinates of every canonical grid voxel -> the atlas's voxel indices
    ijk = np.indices(grid.canonical_shape).reshape(3, -1)
    world = grid.canonical_affine[:3, :3] @ ijk + grid.canonical_affine[:3, 3:4]
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    idx = np.round(inv[:3, :3] @ world + inv[:3, 3:4]).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array(data.shape)[:, None]), axis=0)
    labels = np.zeros(idx.shape[1], dtype=np.int64)
    labels[inside] = data[idx[0, inside], idx[1, inside], idx[2, inside]]
    packed = grid.pack(labels.reshape(grid.canonical_shape))
    if not (packed > 0).any():
        raise AtlasError(f"{source}: no labelled atlas voxel falls inside the brain mask; is the atlas in the scans' "
                         "space (MNI)?")
    return packed


def named_labels(packed: np.ndarray, names: dict[int, str]) -> dict[int, str]:
    """``names`` with 'label <value>' added for every value in ``packed`` that has none."""
    names = dict(names)
    for value in np.unique(packed[packed > 0]):
        names.setdefault(int(value), f"label {int(value)}")
    return names


def mni_coordinates(grid: BrainGrid) -> np.ndarray:
    """(3, n_brain) coordinates of the brain voxels in MNI mm; a brain mask whose extent differs from the MNI
    brain's by more than 25% on an axis (synthetic or non-human-sized data) is scaled onto the MNI brain box."""
    ijk = np.indices(grid.canonical_shape).reshape(3, -1)
    world = grid.canonical_affine[:3, :3] @ ijk + grid.canonical_affine[:3, 3:4]
    coords = np.stack([grid.pack(w.reshape(grid.canonical_shape)) for w in world])
    lo, hi = coords.min(axis=1), coords.max(axis=1)
    box = np.array(MNI_BRAIN_BOX)
    extent, mni_extent = np.maximum(hi - lo, 1e-6), box[:, 1] - box[:, 0]
    if np.any(np.abs(extent / mni_extent - 1) > 0.25):
        coords = box[:, :1] + (coords - lo[:, None]) / extent[:, None] * mni_extent[:, None]
    return coords


def lobe_labels(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Built-in region labels 1-12 of MNI coordinates (mm), first rule that holds:
    cerebellum/brainstem z < -20 and y < -35; occipital y < -70; temporal z < 8 and |x| > 28 and y < 25;
    deep grey |x| <= 28 and -35 <= y <= 25 and -20 <= z < 15; parietal y < -20; frontal otherwise.
    Left is x < 0: labels 1-6 are the left regions in the order of :data:`LOBES`, 7-12 the right ones.
    """
    x, y, z = (np.asarray(v, dtype=float) for v in (x, y, z))
    lobe = np.zeros(x.shape, dtype=np.int64)                           # frontal
    lobe[y < -20] = 1                                                  # parietal
    lobe[(np.abs(x) <= 28) & (y >= -35) & (y <= 25) & (z >= -20) & (z < 15)] = 4
    lobe[(z < 8) & (np.abs(x) > 28) & (y < 25)] = 2                    # temporal
    lobe[y < -70] = 3                                                  # occipital
    lobe[(z < -20) & (y < -35)] = 5                                    # cerebellum, brainstem
    return lobe + 1 + 6 * (x >= 0)


def builtin_lobes(grid: BrainGrid) -> tuple[np.ndarray, dict[int, str]]:
    """The built-in parcellation of the brain voxels: (n_brain,) labels 1-12 (:func:`lobe_labels` of
    :func:`mni_coordinates`) and their names ("left frontal", ...)."""
    labels = lobe_labels(*mni_coordinates(grid))
    names = {i + 1: f"left {name}" for i, name in enumerate(LOBES)} | {i + 7: f"right {name}" for i, name in enumerate(LOBES)}
    return labels, names


def region_table(labels: np.ndarray, names: dict[int, str], group: dict[str, np.ndarray],
                 per_group_mean: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Rows per labelled region, ranked by mean |IG| (highest first).

    ``group``: the all-subject maps ``mean_ig``, ``mean_abs_ig``, ``t_ig`` (n_brain,); ``per_group_mean``: signed mean
    maps of subgroups (e.g. each class), reported as ``mean_ig_<group>``. ``share_abs_ig`` is the region's part of the
    brain's total |IG|.
    """
    total = float(np.sum(group["mean_abs_ig"])) or 1.0
    rows = []
    for value in np.unique(labels[labels > 0]):
        inside = labels == value
        row = {"label": int(value), "name": names.get(int(value), f"label {int(value)}"), "voxels": int(inside.sum()),
               "mean_abs_ig": float(group["mean_abs_ig"][inside].mean()),
               "share_abs_ig": float(group["mean_abs_ig"][inside].sum() / total),
               "mean_ig": float(group["mean_ig"][inside].mean()), "mean_t": float(group["t_ig"][inside].mean())}
        for name, values in (per_group_mean or {}).items():
            row[f"mean_ig_{name}"] = float(values[inside].mean())
        rows.append(row)
    rows.sort(key=lambda r: -r["mean_abs_ig"])
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return [{"rank": r.pop("rank"), **r} for r in rows]


def write_region_table(rows: list[dict], path: str | Path) -> Path:
    """Write the ranked rows as CSV."""
    path = Path(path)
    if not rows:
        raise AtlasError(f"{path}: no region has brain voxels")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return path
