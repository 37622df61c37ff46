"""Synthetic 4-D scans with a planted, known effect, for the demo and the tests."""

from __future__ import annotations

import numpy as np


def brain_mask(volume_shape: tuple[int, int, int] | list[int]) -> np.ndarray:
    """An ellipsoid 'brain' filling most of the volume: bool array of ``volume_shape``."""
    axes = [np.linspace(-1, 1, s) for s in volume_shape]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(g**2 for g in grid) <= 0.85**2


def effect_region(volume_shape: tuple[int, int, int] | list[int]) -> tuple[slice, slice, slice]:
    """The box, inside the brain, whose signal carries the planted effect (one corner octant's centre)."""
    return tuple(slice(s // 4, s // 4 + max(2, s // 5)) for s in volume_shape)  # type: ignore[return-value]


def synthetic_scans(
    num_subjects: int,
    num_frames: int,
    volume_shape: tuple[int, int, int] | list[int],
    seed: int = 0,
    effect_size: float = 1.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Scans (N, T, 1, D, H, W) float32, z-scored over brain voxels, and targets (N,) ~ N(0, 1).

    Each brain voxel is AR(1) noise; inside :func:`effect_region` the signal is raised by
    ``effect_size * target``, so the target is recoverable from that region alone. The background
    holds the minimum z value, as the paper's preprocessing does.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(volume_shape)
    mask = brain_mask(shape)
    region = effect_region(shape)
    targets = rng.standard_normal(num_subjects).astype(np.float32)
    scans = np.empty((num_subjects, num_frames, 1, *shape), dtype=np.float32)
    for i in range(num_subjects):
        noise = rng.standard_normal((num_frames, *shape)).astype(np.float32)
        for t in range(1, num_frames):
            noise[t] = 0.6 * noise[t - 1] + 0.8 * noise[t]
        noise[(slice(None), *region)] += effect_size * targets[i]
        brain = noise[:, mask]
        z = (noise - brain.mean()) / brain.std()
        z[:, ~mask] = z[:, mask].min()
        scans[i, :, 0] = z
    return scans, targets
