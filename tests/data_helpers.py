"""Small real NIfTI datasets for the data tests, written with nibabel."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (12, 14, 12)
FRAMES = 24


def write_scan(path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype=np.float32, tr: float = 2.0) -> Path:
    """Write ``data`` as NIfTI at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data.astype(dtype), np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    img.header.set_xyzt_units("mm", "sec")
    if data.ndim >= 4:
        img.header["pixdim"][4] = tr
    nib.save(img, path)
    return path


def random_scan(seed: int, shape=SHAPE, frames=FRAMES) -> np.ndarray:
    """A 4-D float32 scan: an ellipsoid of varying voxels, zeros outside."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g**2 for g in grid) <= 0.8
    data = np.zeros((*shape, frames), dtype=np.float32)
    data[inside] = 500 + 20 * rng.standard_normal((int(inside.sum()), frames))
    return data


def bids_dataset(root: Path, n: int = 6, rows: list[str] | None = None, frames: int = FRAMES) -> Path:
    """A BIDS tree of ``n`` random scans with participants.tsv (id, sex, score, family_id)."""
    for i in range(n):
        sid = f"sub-{i:02d}"
        write_scan(root / sid / "func" / f"{sid}_task-rest_bold.nii.gz", random_scan(i, frames=frames))
    lines = rows if rows is not None else [
        f"sub-{i:02d}\t{'M' if i % 2 else 'F'}\t{10 + i}\tfam{i // 2}" for i in range(n)
    ]
    (root / "participants.tsv").write_text("participant_id\tsex\tscore\tfamily_id\n" + "\n".join(lines) + "\n")
    return root
