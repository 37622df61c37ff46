"""Synthetic 4-D scans with a planted, known effect, for the demo and the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def brain_mask(volume_shape: tuple[int, int, int] | list[int]) -> np.ndarray:
    """An ellipsoid 'brain' filling most of the volume: bool array of ``volume_shape``."""
    axes = [np.linspace(-1, 1, s) for s in volume_shape]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(g**2 for g in grid) <= 0.85**2


PLANTED = {
    "region-a": "slow signal s_a (coupled with region-b)",
    "region-b": "g * (c * s_a + sqrt(1 - c^2) * s_b) with c = 0.9, g = 2 for males (sex M) and c = 0.1, g = 1 for "
                "females: sex changes region b's coupling with region a and its amplitude",
    "region-c": "amplitude (1 + 0.5 * z(cognition)) * s_c: cognition scales this region's slow signal",
}


def _sphere(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum((g - c * (s - 1)) ** 2 for g, c, s in zip(grid, centre, shape)) <= radius**2


def planted_regions(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The three regions carrying the planted effects, as bool masks (inside :func:`brain_mask`)."""
    radius = max(1.5, min(shape) / 7)
    return {
        "region-a": _sphere(shape, (0.32, 0.55, 0.55), radius),
        "region-b": _sphere(shape, (0.68, 0.55, 0.55), radius),
        "region-c": _sphere(shape, (0.5, 0.3, 0.4), radius),
    }


def mni_like_affine(shape: tuple[int, int, int], voxel: float = 2.0) -> np.ndarray:
    """An FSL-style MNI affine (x flipped: LAS on disk) centred on the volume."""
    aff = np.diag([-voxel, voxel, voxel, 1.0])
    aff[:3, 3] = [voxel * (shape[0] - 1) / 2, -voxel * (shape[1] - 1) / 2, -voxel * (shape[2] - 1) / 2]
    return aff


def _slow(rng: np.random.Generator, frames: int, rho: float = 0.9) -> np.ndarray:
    x = np.empty(frames)
    x[0] = rng.standard_normal()
    for t in range(1, frames):
        x[t] = rho * x[t - 1] + np.sqrt(1 - rho**2) * rng.standard_normal()
    return (x - x.mean()) / (x.std() + 1e-8)


def synthetic_scan(rng: np.random.Generator, shape: tuple[int, int, int], frames: int, sex: int, cognition_z: float,
                   patterns: np.ndarray, regions: dict[str, np.ndarray], mask: np.ndarray,
                   anatomy: np.ndarray | None = None) -> np.ndarray:
    """One 4-D scan (X, Y, Z, T) float32: smooth networks, AR(1) noise, drift, planted effects; 0 outside the brain.

    ``anatomy`` (n_brain,) is a smooth baseline intensity map shared by all subjects (default flat).
    """
    n_vox = int(mask.sum())
    tcs = np.stack([_slow(rng, frames, 0.8) for _ in range(len(patterns))], axis=1)   # (T, K)
    signal = (tcs @ patterns).astype(np.float32)                                       # (T, n_vox)
    noise = rng.standard_normal((frames, n_vox)).astype(np.float32)
    for t in range(1, frames):
        noise[t] = 0.5 * noise[t - 1] + 0.87 * noise[t]
    signal += 0.7 * noise
    s_a, s_b, s_c = (_slow(rng, frames).astype(np.float32) for _ in range(3))
    coupling, gain = (0.9, 2.0) if sex == 1 else (0.1, 1.0)
    local = {
        "region-a": 2.0 * s_a,
        "region-b": 2.0 * gain * (coupling * s_a + np.sqrt(1 - coupling**2) * s_b),
        "region-c": 2.0 * max(0.1, 1.0 + 0.5 * cognition_z) * s_c,
    }
    for name, series in local.items():
        in_brain = regions[name][mask]
        signal[:, in_brain] += series[:, None]
    drift = np.linspace(0, 1, frames, dtype=np.float32)[:, None] * rng.normal(0, 0.5, n_vox).astype(np.float32)
    shared = np.zeros(n_vox, np.float32) if anatomy is None else anatomy
    baseline = 800 + 100 * shared + 5 * rng.standard_normal(n_vox).astype(np.float32)
    vol = np.zeros((frames, *shape), dtype=np.float32)
    vol[:, mask] = baseline + 10.0 * (signal + drift)
    return np.moveaxis(vol, 0, -1)


def write_synthetic_bids(out: str | Path, subjects: int, frames: int, shape: tuple[int, int, int] | list[int],
                         seed: int = 0, tr: float = 0.735, workers: int = 1, compress: bool = True) -> Path:
    """Write a BIDS dataset of synthetic resting-state scans with planted effects; returns ``out``.

    Layout: ``sub-XXXX/func/sub-XXXX_task-rest_bold.nii.gz`` (int16 with scaling, LAS like FSL's MNI
    files), ``participants.tsv`` (participant_id, sex, cognition, family_id), and
    ``derivatives/planted/region-*_mask.nii.gz`` with ``planted_effects.json`` describing each effect.
    """
    import nibabel as nib

    out = Path(out)
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    mask = brain_mask(shape)
    regions = {k: v & mask for k, v in planted_regions(shape).items()}
    affine = mni_like_affine(shape)
    # smooth "network" patterns: Gaussian blobs, shared by all subjects
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij"), -1)[mask]
    centres = rng.random((8, 3)) * 0.6 + 0.2
    patterns = np.exp(-((grid[None] - centres[:, None]) ** 2).sum(-1) / (2 * 0.12**2)).astype(np.float32)
    tissue = rng.random((6, 3)) * 0.6 + 0.2   # a smooth "anatomy": baseline intensity shared by all subjects
    anatomy = np.exp(-((grid[None] - tissue[:, None]) ** 2).sum(-1) / (2 * 0.2**2)).sum(0).astype(np.float32)
    sexes = rng.permutation(np.arange(subjects) % 2)
    cognition = rng.normal(100, 15, subjects)
    families, fam = [], 0
    while len(families) < subjects:
        size = int(rng.choice([1, 1, 2, 3]))
        families += [f"fam{fam:04d}"] * size
        fam += 1
    families = families[:subjects]
    (out / "derivatives" / "planted").mkdir(parents=True, exist_ok=True)
    for name, region in regions.items():
        nib.save(nib.Nifti1Image(np.flip(region, 0).astype(np.uint8), affine),
                 out / "derivatives" / "planted" / f"{name}_mask.nii.gz")
    (out / "derivatives" / "planted" / "planted_effects.json").write_text(json.dumps(
        {"seed": seed, "effects": PLANTED, "orientation": "masks are stored like the scans (LAS)"}, indent=1) + "\n")
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "brainmt synthetic resting state", "BIDSVersion": "1.9.0", "DatasetType": "raw"}, indent=1) + "\n")
    rows = ["participant_id\tsex\tcognition\tfamily_id"]
    jobs = []
    for i in range(subjects):
        sid = f"sub-{i + 1:04d}"
        rows.append(f"{sid}\t{'M' if sexes[i] else 'F'}\t{cognition[i]:.2f}\t{families[i]}")
        name = f"{sid}_task-rest_bold.nii{'.gz' if compress else ''}"
        jobs.append((out / sid / "func" / name, int(rng.integers(2**31)), int(sexes[i]),
                     float((cognition[i] - 100) / 15)))
    args = [(path, s, frames, shape, sex, cz, patterns, regions, mask, affine, tr, anatomy) for path, s, sex, cz in jobs]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, args))
    else:
        for a in args:
            _write_one(a)
    (out / "participants.tsv").write_text("\n".join(rows) + "\n")
    return out


def _write_one(args: tuple) -> None:
    import nibabel as nib

    path, seed, frames, shape, sex, cz, patterns, regions, mask, affine, tr, anatomy = args
    vol = synthetic_scan(np.random.default_rng(seed), shape, frames, sex, cz, patterns, regions, mask, anatomy)
    img = nib.Nifti1Image(np.flip(vol, 0), affine)   # stored LAS, as FSL writes MNI data
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
