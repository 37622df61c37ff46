"""Brain maps: packed brain-voxel vectors back into the scans' own grid (crop, mask and orientation undone), NIfTI.

Shards hold only the brain voxels of the mask's bounding box, in canonical (RAS+) orientation. A map
over those voxels, shape ``(n_brain,)``, goes back to the full canonical grid (zeros outside the brain)
and then to the orientation the scans had on disk, so that it overlays the input scans voxel for voxel:
same shape, same affine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from brainmt.data.loader import ShardSet
from brainmt.data.nifti import ScanError, read_volume
from brainmt.fileio import replacing

log = logging.getLogger("brainmt.analysis")
CANONICAL = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)   # RAS+


class MapError(ValueError):
    """A map cannot be placed on (or read from) the scans' grid; the message names the file."""


def _scan_source_affine(meta: dict) -> np.ndarray | None:
    """The on-disk affine of a scan: from the manifest, else from its source file's header (older shards)."""
    if meta.get("source_affine") is not None:
        return np.asarray(meta["source_affine"], dtype=float)
    source = meta.get("source")
    if source and Path(source).exists():
        try:
            return np.asarray(nib.load(source).affine, dtype=float)
        except Exception as exc:  # nibabel raises many types for a bad header
            log.warning("%s: cannot read its header (%s)", source, exc)
    return None


def gaussian_filter3d(volumes: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) volumes, each convolved with a Gaussian of ``sigma_vox`` voxels per axis (zero padding; separable,
    the kernel cut at 3 sigma); float64."""
    import torch

    x = torch.from_numpy(np.asarray(volumes, dtype=np.float64))[:, None]
    for axis, sigma in enumerate(float(s) for s in sigma_vox):
        radius = int(np.ceil(3 * sigma))
        if radius < 1:
            continue
        kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
        shape, padding = [1, 1, 1, 1, 1], [0, 0, 0]
        shape[2 + axis], padding[axis] = 2 * radius + 1, radius
        x = torch.nn.functional.conv3d(x, (kernel / kernel.sum()).view(shape), padding=tuple(padding))
    return x[:, 0].numpy()


class BrainGrid:
    """The geometry of a shard directory's packed voxels, and the orientation maps are written in.

    ``values`` of shape (..., n_brain) are in mask order (C order of the cropped canonical volume),
    exactly as the loader stores frames.
    """

    def __init__(self, shards: ShardSet, scans: list[str] | None = None) -> None:
        m = shards.manifest["mask"]
        self.canonical_shape: tuple[int, int, int] = tuple(m["shape"])  # type: ignore[assignment]
        self.canonical_affine = np.asarray(m["affine"], dtype=float)
        self.box = tuple(slice(a, b) for a, b in m["bbox"])
        self.cropped_shape: tuple[int, int, int] = tuple(m["cropped_shape"])  # type: ignore[assignment]
        self.brain_index = np.asarray(shards.brain_index)
        self.n_brain = int(shards.n_brain)
        self.affine, self.ornt = self.canonical_affine, CANONICAL
        scans = sorted(shards.scans) if scans is None else scans
        found = [_scan_source_affine(shards.scans[s]) for s in scans]
        known = [a for a in found if a is not None]
        if not known:
            log.warning("the manifest of %s records no scan orientation and the source files are gone: maps are "
                        "written in the canonical (RAS+) grid", shards.root)
            return
        if any(not np.allclose(a, known[0], atol=1e-4) for a in known[1:]):
            log.warning("the scans were stored in different orientations: maps are written in the canonical (RAS+) grid")
            return
        ornt = nib.orientations.io_orientation(known[0])
        source_shape = tuple(self.canonical_shape[int(j)] for j in ornt[:, 0])
        back = known[0] @ nib.orientations.inv_ornt_aff(ornt, source_shape)
        if not np.allclose(back, self.canonical_affine, atol=1e-3):
            log.warning("the scans' own affine does not match the mask's grid: maps are written in the canonical grid")
            return
        self.affine, self.ornt = known[0], ornt

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape of the written maps (the input scans' shape)."""
        return tuple(self.canonical_shape[int(j)] for j in self.ornt[:, 0])  # type: ignore[return-value]

    def to_canonical(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """(n_brain,) -> the full canonical volume (X, Y, Z), ``fill`` outside the brain."""
        values = np.asarray(values)
        if values.shape != (self.n_brain,):
            raise MapError(f"a map needs {self.n_brain} brain voxels, got shape {values.shape}")
        cropped = np.full(int(np.prod(self.cropped_shape)), fill, dtype=values.dtype)
        cropped[self.brain_index] = values
        full = np.full(self.canonical_shape, fill, dtype=values.dtype)
        full[self.box] = cropped.reshape(self.cropped_shape)
        return full

    def to_source(self, volume: np.ndarray) -> np.ndarray:
        """A canonical (X, Y, Z[, ...]) volume -> the scans' on-disk orientation."""
        return nib.orientations.apply_orientation(volume, nib.orientations.ornt_transform(CANONICAL, self.ornt))

    def from_source(self, volume: np.ndarray) -> np.ndarray:
        """A volume in the scans' on-disk orientation -> canonical."""
        return nib.orientations.apply_orientation(volume, self.ornt)

    def smooth(self, values: np.ndarray, fwhm_mm: float) -> np.ndarray:
        """(n_brain,) or (C, n_brain) maps smoothed by a Gaussian of ``fwhm_mm`` full width at half maximum, within the
        brain: voxels outside it neither contribute nor dilute the edge (a normalised convolution, the brain mask
        convolved once with all maps). 0: the values unchanged."""
        values = np.asarray(values)
        if fwhm_mm <= 0:
            return values
        voxel_mm = nib.affines.voxel_sizes(self.canonical_affine)
        maps = values.reshape(-1, values.shape[-1])
        volumes = np.zeros((len(maps) + 1, int(np.prod(self.cropped_shape))))
        volumes[:-1, self.brain_index] = maps
        volumes[-1, self.brain_index] = 1.0                     # the mask: the normalisation
        out = gaussian_filter3d(volumes.reshape(-1, *self.cropped_shape), fwhm_mm / (np.sqrt(8 * np.log(2)) * voxel_mm))
        out = out.reshape(len(volumes), -1)[:, self.brain_index]
        return (out[:-1] / out[-1]).reshape(values.shape).astype(np.float32)

    def pack(self, canonical_volume: np.ndarray) -> np.ndarray:
        """The brain voxels of a full canonical volume, in mask order: (n_brain,)."""
        return np.asarray(canonical_volume)[self.box].reshape(-1)[self.brain_index]

    def unpack(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """(n_brain,) -> the volume in the scans' own grid (shape :attr:`shape`, affine :attr:`affine`)."""
        return np.ascontiguousarray(self.to_source(self.to_canonical(values, fill)))

    def save(self, values: np.ndarray, path: str | Path) -> Path:
        """Write (n_brain,) values as a float32 NIfTI on the scans' grid (atomically); zeros outside the brain."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(self.unpack(np.asarray(values, dtype=np.float32)), self.affine)
        img.header.set_xyzt_units("mm")
        with replacing(path) as tmp:
            nib.save(img, tmp)
        return path

    def load(self, path: str | Path) -> np.ndarray:
        """Read a map written by :meth:`save` back to (n_brain,) float32; its grid must be this one."""
        try:
            data, img = read_volume(path, "map")
        except ScanError as exc:
            raise MapError(str(exc)) from None
        data = np.asarray(data, dtype=np.float32)
        if data.shape != self.shape or not np.allclose(img.affine, self.affine, atol=1e-4):
            raise MapError(f"{path}: shape {data.shape} / affine differ from the scans' grid {self.shape}")
        return self.pack(self.from_source(data))


class GroupMaps:
    """Per-voxel statistics of subject maps over a group, accumulated one subject at a time (Welford).

    ``result()``: ``mean_ig`` (signed), ``mean_abs_ig`` (the mean of the absolute maps: each frame's |IG| summed),
    ``mean_abs_net_ig`` (the mean of |signed map|: a voxel's attributions summed over its frames, then the absolute
    value, so that what cancels within a subject drops out) and ``t_ig``, a one-sample t of the signed maps:
    mean / (sd / sqrt(n)) with the n - 1 standard deviation (0 where sd is 0 or n < 2); each (n_brain,) float32.
    Where the subjects' targets differ also ``contrast_ig``: the slope of the signed maps on the target,
    cov(map, target) / var(target). For a 0/1 class label that is the class 1 mean minus the class 0 mean; for a
    score, the change of the map per unit of score. What all subjects share cancels in it: a region the model reads
    whatever the label, or whose signal is merely large, is near 0 there, where the mean |IG| follows it.
    """

    def __init__(self, n_brain: int) -> None:
        self.n = 0
        self.mean = np.zeros(n_brain, dtype=np.float64)
        self.m2 = np.zeros(n_brain, dtype=np.float64)
        self.abs_sum = np.zeros(n_brain, dtype=np.float64)
        self.net_abs_sum = np.zeros(n_brain, dtype=np.float64)
        self.mean_y, self.m2_y = 0.0, 0.0
        self.co = np.zeros(n_brain, dtype=np.float64)        # co-moment of the signed maps with the target

    def add(self, signed: np.ndarray, absolute: np.ndarray, target: float = 0.0) -> None:
        """Add one subject's signed and absolute maps (n_brain,) and its target."""
        self.n += 1
        delta, dy = signed - self.mean, target - self.mean_y    # against the means before this subject
        self.mean_y += dy / self.n
        self.m2_y += dy * (target - self.mean_y)
        self.co += delta * (target - self.mean_y)
        self.mean += delta / self.n
        self.m2 += delta * (signed - self.mean)
        self.abs_sum += absolute
        self.net_abs_sum += np.abs(signed)

    def result(self) -> dict[str, np.ndarray]:
        """The group's mean, mean |IG|, mean |net IG| and t maps, and the contrast map where the targets differ."""
        if self.n == 0:
            raise MapError("a group without subjects has no maps")
        t = np.zeros_like(self.mean)
        if self.n >= 2:
            sd = np.sqrt(self.m2 / (self.n - 1))
            ok = sd > 1e-12 * (np.abs(self.mean) + 1e-30)
            t[ok] = self.mean[ok] / (sd[ok] / np.sqrt(self.n))
        maps = {"mean_ig": self.mean.astype(np.float32), "mean_abs_ig": (self.abs_sum / self.n).astype(np.float32),
                "mean_abs_net_ig": (self.net_abs_sum / self.n).astype(np.float32), "t_ig": t.astype(np.float32)}
        if self.n >= 2 and self.m2_y > 1e-12:
            maps["contrast_ig"] = (self.co / self.m2_y).astype(np.float32)
        return maps
