"""Read and validate 4-D NIfTI scans with nibabel: canonical (RAS+) orientation, brain mask, z-scoring.

Scans are read through nibabel's data proxy in blocks of frames, never as one float64 array; a
gzip file is opened here and kept open between blocks, so that it is decompressed once and its checksum is
checked once the last frame has been read (nibabel stops before the gzip trailer, so a corrupt byte that still
inflates would otherwise pass unseen).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brainmt.fileio import replacing

FRAME_BLOCK = 16


class ScanError(ValueError):
    """A scan cannot be used; the message names the file and the problem."""


@dataclass
class ScanHeader:
    """What the header of a 4-D scan says, in canonical (RAS+) orientation."""

    path: str
    shape: tuple[int, int, int]          # canonical spatial shape
    frames: int
    voxel_size: tuple[float, float, float]
    tr: float | None                     # seconds
    affine: np.ndarray                   # canonical affine, 4x4
    source_bytes: int
    source_mtime: float
    source_affine: np.ndarray | None = None   # the file's own affine (its orientation on disk), 4x4


def _open_image(path: str, keep_file_open: bool = False) -> tuple[nib.Nifti1Image, gzip.GzipFile | None]:
    """The image at ``path`` and, for a gzip file, the open stream its data proxy reads from (an uncompressed file
    is nibabel's to open, and to keep open between reads with ``keep_file_open``)."""
    if not path.endswith(".gz"):
        return nib.load(path, keep_file_open=keep_file_open), None
    stream = gzip.open(path, "rb")
    try:
        header = stream.read(nib.Nifti2Header.sizeof_hdr)
        stream.seek(0)
        image_class = nib.Nifti2Image if nib.Nifti2Header.may_contain_header(header) else nib.Nifti1Image
        return image_class.from_file_map(image_class.make_file_map({"image": stream, "header": stream})), stream
    except BaseException:
        stream.close()
        raise


def _check_gzip_end(stream: gzip.GzipFile | None, path: str) -> None:
    """Read a gzip stream to its end, so that its CRC and length are checked; a mismatch, or a stream that ends
    early, is a :class:`ScanError`. Bytes after the last gzip member that are not gzip are ignored, as gzip -d does."""
    if stream is None:
        return
    try:
        chunk = stream.read(1 << 20)
        while chunk:
            chunk = stream.read(1 << 20)
    except EOFError as exc:
        raise ScanError(f"{path}: truncated gzip data, the stream ends before its end marker ({exc})") from None
    except gzip.BadGzipFile as exc:
        if not str(exc).startswith("Not a gzipped file"):      # CPython's words for trailing bytes after a member
            raise ScanError(f"{path}: corrupt gzip data, its checksum does not match ({exc})") from None
    except (zlib.error, OSError) as exc:
        raise ScanError(f"{path}: corrupt gzip data ({exc})") from None


class OpenScan:
    """A 4-D scan opened lazily; :meth:`frames` yields canonical float32 blocks (t, X, Y, Z)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            stat = os.stat(self.path)
            self.img, self._stream = _open_image(self.path, keep_file_open=True)
        except FileNotFoundError:
            raise ScanError(f"{self.path}: file not found") from None
        except Exception as exc:  # nibabel raises many types for a bad header or a truncated gzip
            raise ScanError(f"{self.path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from None
        try:
            self.header = self._read_header(stat)
        except BaseException:
            self.close()
            raise

    def _read_header(self, stat: os.stat_result) -> ScanHeader:
        """The header in canonical orientation (sets ``ornt``); a scan that is not a time series is a ScanError."""
        shape = self.img.shape
        if len(shape) != 4:
            raise ScanError(f"{self.path}: expected a 4-D image (x, y, z, time), got {len(shape)}-D shape {shape}")
        if shape[3] < 2:
            raise ScanError(f"{self.path}: a 4-D image with {shape[3]} frame(s) is not a time series")
        self.ornt = nib.orientations.io_orientation(self.img.affine)
        to_canonical = nib.orientations.inv_ornt_aff(self.ornt, shape[:3])
        affine = self.img.affine @ to_canonical
        zooms = self.img.header.get_zooms()
        spatial_zooms = np.abs(np.asarray(zooms[:3], dtype=float))[self.ornt[:, 0].astype(int).argsort()]
        canon_shape = tuple(int(shape[int(i)]) for i in self.ornt[:, 0].argsort())
        return ScanHeader(
            path=self.path, shape=canon_shape, frames=int(shape[3]),  # type: ignore[arg-type]
            voxel_size=tuple(round(float(z), 5) for z in spatial_zooms),  # type: ignore[arg-type]
            tr=_tr_seconds(self.img), affine=affine, source_bytes=stat.st_size, source_mtime=stat.st_mtime,
            source_affine=np.asarray(self.img.affine, dtype=float),
        )

    def frames(self, start: int = 0, stop: int | None = None, block: int = FRAME_BLOCK) -> Iterator[np.ndarray]:
        """Yield float32 blocks (t, X, Y, Z) of frames [start, stop) in canonical orientation."""
        stop = self.header.frames if stop is None else stop
        proxy = self.img.dataobj
        for t0 in range(start, stop, block):
            t1 = min(stop, t0 + block)
            try:
                data = np.asarray(proxy[..., t0:t1], dtype=np.float32)
            except (EOFError, zlib.error, OSError, ValueError) as exc:
                raise ScanError(f"{self.path}: truncated or corrupt data at frames {t0}-{t1 - 1} ({exc})") from None
            if t1 == self.header.frames:
                _check_gzip_end(self._stream, self.path)
            data = nib.orientations.apply_orientation(data, self.ornt)
            yield np.moveaxis(data, 3, 0)

    def close(self) -> None:
        """Release the open file handle."""
        self.img.uncache()
        self.img = None  # type: ignore[assignment]
        if self._stream is not None:
            self._stream.close()

    def __enter__(self) -> OpenScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ResampledScan(OpenScan):
    """A 4-D scan whose frames are resampled onto another grid (``shape`` with canonical ``affine``), frame by frame
    with nibabel's ``resample_from_to`` (spline ``order``; 0 outside the scan's field of view).

    ``header`` describes the target grid (``source_header`` the file's own), so :func:`read_brain_series` reads it
    like a scan on that grid.
    """

    def __init__(self, path: str | Path, shape: tuple[int, int, int], affine: np.ndarray, order: int = 1) -> None:
        super().__init__(path)
        self.source_header = self.header
        self.target = (tuple(int(s) for s in shape), np.asarray(affine, dtype=float))
        self.order = order
        zooms = nib.affines.voxel_sizes(self.target[1])
        self.header = dataclasses.replace(self.header, shape=self.target[0], affine=self.target[1],
                                          voxel_size=tuple(round(float(z), 5) for z in zooms))

    def frames(self, start: int = 0, stop: int | None = None, block: int = FRAME_BLOCK) -> Iterator[np.ndarray]:
        """Yield float32 blocks (t, X, Y, Z) of frames [start, stop) on the target grid."""
        from nibabel.processing import resample_from_to

        source_affine = self.source_header.affine
        for data in super().frames(start, stop, block):
            yield np.stack([np.asarray(resample_from_to(nib.Nifti1Image(frame, source_affine), self.target,
                                                        order=self.order).dataobj, dtype=np.float32)
                            for frame in data])


def _tr_seconds(img: nib.Nifti1Image) -> float | None:
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not zooms[3]:
        return None
    unit = img.header.get_xyzt_units()[1] if hasattr(img.header, "get_xyzt_units") else "sec"
    scale = {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    return round(float(zooms[3]) * scale, 6)


def variation_mask(path: str | Path) -> tuple[np.ndarray, ScanHeader]:
    """Voxels of one scan that are finite and vary over time: bool (X, Y, Z) in canonical orientation."""
    with OpenScan(path) as scan:
        lo = hi = None
        finite = None
        for block in scan.frames():
            ok = np.isfinite(block).all(axis=0)
            b = np.where(np.isfinite(block), block, 0.0)
            bmin, bmax = b.min(axis=0), b.max(axis=0)
            lo = bmin if lo is None else np.minimum(lo, bmin)
            hi = bmax if hi is None else np.maximum(hi, bmax)
            finite = ok if finite is None else finite & ok
        return (hi > lo) & finite, scan.header  # type: ignore[operator]


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Per axis (start, stop) of the smallest box holding every True voxel of ``mask``."""
    if not mask.any():
        raise ValueError("the brain mask is empty")
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


@dataclass
class BrainSeries:
    """One scan's brain voxels, z-scored, as fp16 (frames, n_brain), and what normalisation used."""

    data: np.ndarray
    mean: float
    std: float
    background: float


def read_brain_series(scan: OpenScan, mask: np.ndarray, background: str = "min") -> BrainSeries:
    """Read the masked voxels of every frame, check them, z-score globally over brain voxels, cast to fp16.

    ``background``: "min" (the paper: the background takes the minimum z of the scan) or "zero".
    """
    path = scan.path
    n_brain = int(mask.sum())
    out = np.empty((scan.header.frames, n_brain), dtype=np.float32)
    t, total, total_sq = 0, 0.0, 0.0
    for block in scan.frames():
        vals = block[:, mask]
        if not np.isfinite(vals).all():
            bad = int((~np.isfinite(vals)).sum())
            raise ScanError(f"{path}: {bad} NaN or infinite values inside the brain mask (frames {t}-{t + len(block) - 1})")
        out[t:t + len(block)] = vals
        v64 = vals.astype(np.float64)
        total += float(v64.sum())
        total_sq += float(np.square(v64).sum())
        t += len(block)
    mean = total / out.size
    std = float(np.sqrt(max(0.0, total_sq / out.size - mean**2)))
    if not np.any(out):
        raise ScanError(f"{path}: every brain voxel is zero in every frame")
    if std == 0.0 or not np.isfinite(std):
        raise ScanError(f"{path}: brain voxels are constant (standard deviation 0); cannot z-score")
    out -= mean
    out /= std
    zmin = float(out.min())
    z16 = out.astype(np.float16)
    if not np.isfinite(z16).all():
        raise ScanError(f"{path}: z-scores overflow float16")
    return BrainSeries(z16, float(mean), std, zmin if background == "min" else 0.0)


def save_mask(mask: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a bool mask as a uint8 NIfTI (atomically, through a temporary file of this process: the parts of a
    sharding job array given one --mask may write it at the same time)."""
    with replacing(path) as tmp:
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), tmp)
    return Path(path)


def read_volume(path: str | Path, what: str = "volume") -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a 3-D NIfTI (a 4-D one with one volume is squeezed) as stored: (data, image); ``what`` names it in errors."""
    try:
        img, stream = _open_image(str(path))
        try:
            data = np.asanyarray(img.dataobj)
            _check_gzip_end(stream, str(path))
        finally:
            if stream is not None:
                stream.close()
    except ScanError:
        raise
    except FileNotFoundError:
        raise ScanError(f"{path}: {what} file not found") from None
    except Exception as exc:
        raise ScanError(f"{path}: unreadable {what} NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ScanError(f"{path}: the {what} must be 3-D, got shape {data.shape}")
    return data, img


def load_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D mask NIfTI into canonical orientation: (bool array, canonical affine)."""
    data, img = read_volume(path, "mask")
    ornt = nib.orientations.io_orientation(img.affine)
    mask = nib.orientations.apply_orientation(np.asarray(data) > 0, ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    if not mask.any():
        raise ScanError(f"{path}: the mask is empty")
    return np.ascontiguousarray(mask), affine
