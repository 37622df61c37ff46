"""Features of the classic pipeline: a parcellation of the brain voxels, ROI time series, connectomes, amplitudes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from brainmt.data.loader import ShardSet

KINDS = ("connectome", "amplitude")


def builtin_parcels(shards: ShardSet, size_mm: float = 25.0, min_fraction: float = 0.25) -> tuple[np.ndarray, dict]:
    """A parcellation that needs no download: cubes of ``size_mm`` (MNI mm; synthetic brains are scaled onto the MNI
    brain box) cut by the brain mask; parcels under ``min_fraction`` of a full cube join their nearest neighbour.
    Returns (n_brain,) labels 1..R and {label: name}."""
    from brainmt.analysis.maps import BrainGrid
    from brainmt.analysis.regions import mni_coordinates

    coords = mni_coordinates(BrainGrid(shards))                       # (3, n_brain) mm
    cell = np.floor((coords - coords.min(axis=1, keepdims=True)) / size_mm).astype(np.int64)
    _, labels = np.unique(cell, axis=1, return_inverse=True)
    labels = labels.reshape(-1)
    full = (size_mm / _voxel_mm(coords)) ** 3
    while True:
        counts = np.bincount(labels)
        small = [p for p in np.flatnonzero(counts) if counts[p] < min_fraction * full]
        if not small or len(np.flatnonzero(counts)) <= 2:
            break
        centres = np.stack([np.bincount(labels, weights=c) / np.maximum(counts, 1) for c in coords], axis=1)
        p = min(small, key=lambda q: counts[q])
        others = [q for q in np.flatnonzero(counts) if q != p]
        nearest = others[int(np.argmin(((centres[others] - centres[p]) ** 2).sum(axis=1)))]
        labels[labels == p] = nearest
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(-1) + 1
    centres = np.stack([np.bincount(labels, weights=c)[1:] / np.bincount(labels)[1:] for c in coords], axis=1)
    names = {i + 1: f"cube at ({x:.0f}, {y:.0f}, {z:.0f}) mm" for i, (x, y, z) in enumerate(centres)}
    return labels, names


def _voxel_mm(coords: np.ndarray) -> float:
    """The edge of one voxel in the (possibly scaled) MNI coordinates."""
    steps = [np.diff(np.unique(np.round(c, 4))) for c in coords]
    return float(np.median(np.concatenate([s[s > 1e-6] for s in steps if len(s)])))


def parcellation(shards: ShardSet, atlas: str | None = None, atlas_labels: str | None = None,
                 size_mm: float = 25.0) -> tuple[np.ndarray, dict, str]:
    """(n_brain,) labels (0: no parcel), names and a description: a user atlas in the scans' space, or cubes."""
    if atlas:
        from brainmt.analysis.maps import BrainGrid
        from brainmt.analysis.regions import load_atlas

        labels, names = load_atlas(atlas, atlas_labels, BrainGrid(shards))
        return labels, names, f"atlas {atlas}"
    labels, names = builtin_parcels(shards, size_mm)
    return labels, names, f"built-in cubes of {size_mm:g} mm"


def parcel_labels(labels: np.ndarray) -> np.ndarray:
    """The parcels' labels present in ``labels`` (0: none), sorted: the order of the feature columns. An atlas's
    labels need not run 1..R (1001, 1002, 2001, ...)."""
    return np.unique(labels[labels > 0])


def roi_timeseries(shards: ShardSet, scan: str, labels: np.ndarray, block: int = 64) -> np.ndarray:
    """(T, R) mean signal of each parcel (:func:`parcel_labels`' order) over a scan's frames, read ``block``
    frames at a time."""
    frames = shards.scans[scan]["frames"]
    inside = labels > 0
    _, index = np.unique(labels[inside], return_inverse=True)
    counts = np.bincount(index)
    n_parcels = len(counts)
    out = np.empty((frames, n_parcels))
    for start in range(0, frames, block):
        x = shards.read_frames(scan, start, min(block, frames - start))[:, inside].astype(np.float64)
        sums = np.zeros((x.shape[0], n_parcels))
        np.add.at(sums.T, index, x.T)
        out[start:start + x.shape[0]] = sums / np.maximum(counts, 1)
    return out


def connectome(ts: np.ndarray) -> np.ndarray:
    """Fisher-z Pearson correlations of the parcels' time series (T, R): the upper triangle, R(R-1)/2 values."""
    sd = ts.std(axis=0)
    z = (ts - ts.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    r = (z.T @ z) / len(ts)
    r[sd == 0, :] = 0.0
    r[:, sd == 0] = 0.0
    return np.arctanh(np.clip(r[np.triu_indices(len(r), 1)], -0.999999, 0.999999))


def amplitude(ts: np.ndarray) -> np.ndarray:
    """Each parcel's temporal standard deviation (the z-scored scans keep relative amplitudes): R values."""
    return ts.std(axis=0)


def extract(shards: ShardSet, scans: list[str], labels: np.ndarray, kind: str, cache: Path | None = None) -> np.ndarray:
    """(n_scans, F) features of ``kind`` for ``scans``; cached in ``cache`` (an .npz keyed by the parcellation)."""
    if kind not in KINDS:
        raise ValueError(f"unknown feature kind {kind!r} (one of {', '.join(KINDS)})")
    key = hashlib.sha256(labels.astype(np.int64).tobytes() + json.dumps(
        [shards.manifest.get("created"), kind, "columns: the labels present"]).encode()).hexdigest()[:16]
    stored: dict[str, np.ndarray] = {}
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                stored = {k: z[k] for k in z.files if k != "key"}
    fn = connectome if kind == "connectome" else amplitude
    rows = []
    for scan in scans:
        if scan not in stored:
            stored[scan] = fn(roi_timeseries(shards, scan, labels))
        rows.append(stored[scan])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, key=np.array(key), **stored)
        tmp.replace(cache)
    return np.stack(rows)
