"""New scans through a run's own preprocessing: its grid, mask, z-scoring and background, read from its shard manifest.

The reading is ``brainmt shard``'s (:class:`~brainmt.data.nifti.OpenScan`, :func:`~brainmt.data.nifti.read_brain_series`):
a scan is reoriented to RAS+, checked, its brain voxels (the run's mask) z-scored and cast to float16, exactly as the
sharder stored the training scans. A scan on another grid is skipped, or resampled onto the run's grid with
``--resample`` (:class:`~brainmt.data.nifti.ResampledScan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmt.data.layouts import ScanSource
from brainmt.data.loader import ShardSet
from brainmt.data.nifti import BrainSeries, OpenScan, ResampledScan, ScanError, ScanHeader, load_mask, read_brain_series
from brainmt.data.shards import KIND_GRID, KIND_SCAN, grid_difference, same_affine

RESAMPLE_ORDER = 1   # trilinear: no spline overshoot outside the range of the data
KIND_FRAMES = "fewer frames than one window"
KIND_OUTPUT = "model output not finite"


class SkipScan(ValueError):
    """A scan that cannot be predicted; ``kind`` counts it, the message names the file and the reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def grid_text(shape, voxel_size) -> str:
    """``91x109x91 voxels of 2x2x2 mm``."""
    return f"{'x'.join(str(int(s)) for s in shape)} voxels of {'x'.join(f'{float(v):g}' for v in voxel_size)} mm"


@dataclass
class RunGrid:
    """What a run's shards were made with: the canonical grid and affine, the brain mask, the background rule, and the
    run's window length."""

    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    mask: np.ndarray
    mask_file: Path
    background: str
    num_frames: int

    @classmethod
    def of(cls, shards: ShardSet, num_frames: int) -> RunGrid:
        """The grid, mask and settings of ``shards``' manifest (the run's own shards)."""
        info = shards.manifest["mask"]
        mask_file = shards.root / info["file"]
        mask, _ = load_mask(mask_file)
        return cls(tuple(info["shape"]), tuple(float(v) for v in info["voxel_size"]),  # type: ignore[arg-type]
                   np.asarray(info["affine"], dtype=float), mask, mask_file,
                   shards.manifest["preprocessing"]["background"], int(num_frames))

    def text(self) -> str:
        """The grid in words."""
        return grid_text(self.shape, self.voxel_size)

    def holds(self, header: ScanHeader) -> bool:
        """True when a scan has the grid's shape and voxel size (what ``brainmt shard`` requires of a scan)."""
        return list(header.shape) == list(self.shape) and bool(np.allclose(header.voxel_size, self.voxel_size, atol=1e-3))

    def aligned(self, header: ScanHeader) -> bool:
        """True when a scan lies on the grid: shape, voxel size and canonical affine (origin included) to a hundredth
        of a voxel, as ``brainmt shard`` requires."""
        return self.holds(header) and same_affine(header.affine, self.affine, self.voxel_size)


@dataclass
class ReadScan:
    """One scan read through the run's preprocessing."""

    source: ScanSource
    header: ScanHeader
    series: BrainSeries
    resampled: bool


def read_scan(src: ScanSource, grid: RunGrid, resample: bool = False) -> ReadScan:
    """Read ``src`` as ``brainmt shard`` would have for the run; SkipScan when it cannot be predicted.

    With ``resample`` a scan not exactly on the run's grid (shape, voxel size or origin) is resampled onto it first;
    without it, such a scan is skipped with both grids named (the same matrix moved would put the mask on other
    voxels)."""
    try:
        with OpenScan(src.path) as scan:
            h = scan.header
            if not grid.holds(h) and not resample:
                raise SkipScan(KIND_GRID, f"{src.path}: grid {grid_text(h.shape, h.voxel_size)} differs from the run's "
                                          f"{grid.text()} (its mask {grid.mask_file}); pass --resample to resample "
                                          "the scan onto the run's grid")
            if not grid.aligned(h) and not resample:
                raise SkipScan(KIND_GRID, f"{src.path}: {grid_difference(h.affine, grid.affine, grid.voxel_size)}, "
                                          f"the run's grid (its mask {grid.mask_file}); pass --resample to resample "
                                          "the scan onto the run's grid")
            if h.frames < grid.num_frames:
                raise SkipScan(KIND_FRAMES, f"{src.path}: {h.frames} frames, fewer than one window of the run "
                                            f"(data.num_frames {grid.num_frames})")
            if not resample or grid.aligned(h):
                return ReadScan(src, h, read_brain_series(scan, grid.mask, grid.background), False)
        with ResampledScan(src.path, grid.shape, grid.affine, RESAMPLE_ORDER) as scan:
            return ReadScan(src, scan.source_header, read_brain_series(scan, grid.mask, grid.background), True)
    except ScanError as exc:
        raise SkipScan(KIND_SCAN, str(exc)) from None
