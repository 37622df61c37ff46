"""NIfTI scans + phenotypes -> WebDataset shards of brain-voxel chunks, ``manifest.json`` and ``splits.json``.

Each sample is one chunk of ``chunk_frames`` consecutive frames of one scan: key ``<scan>_c<k>``
(no dots), members ``.json`` (scan, chunk, frame range) and ``.npy`` (float16 ``(frames, n_brain)``,
the z-scored brain voxels in mask order). A scan's chunks are contiguous in one shard, so a window
of T frames is one read of about T frames' bytes through the byte offsets kept in the manifest.

Restartable: a shard is written as ``.tmp`` and renamed when complete, then its index
(``<shard>.json``) is written; a re-run skips scans found in complete shards. ``part=(i, n)`` writes
one slice of the scans (for array jobs); ``merge_manifest`` gathers the parts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainmt import __version__
from brainmt.data.layouts import ScanSource, find_scans
from brainmt.data.nifti import OpenScan, ScanError, bounding_box, load_mask, read_brain_series, save_mask, variation_mask
from brainmt.data.phenotypes import make_splits, read_phenotypes
from brainmt.fileio import atomic_write_json

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class ShardError(ValueError):
    """The sharding run cannot go on; the message names the file and the problem."""


@dataclass
class ShardOptions:
    """How scans become shards."""

    chunk_frames: int = 10
    shard_bytes: int = 1_000_000_000
    background: str = "min"            # "min" (paper) or "zero"
    min_frames: int = 200
    mask_fraction: float = 0.9         # data-derived mask: voxels varying in at least this fraction of scans
    mask_scans: int | None = None      # data-derived mask from at most this many scans (None: all)
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    strict: bool = False               # stop at the first skipped scan instead of counting it


@dataclass
class ShardSummary:
    """What a sharding run did."""

    written: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    manifest: str | None = None

    def text(self) -> str:
        """A human summary for the end of the run."""
        lines = [f"scans written: {len(self.written)} ({self.bytes_written / 1e9:.2f} GB) in {self.seconds:.1f} s",
                 f"scans already in complete shards: {len(self.already_done)}",
                 f"scans skipped: {len(self.skipped)}"]
        lines += [f"  {s['scan_id']}: {s['reason']}" for s in self.skipped]
        if self.manifest:
            lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def index_tar(path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of the array data, its bytes) for every ``.npy`` member of a tar."""
    out = {}
    with tarfile.open(path, "r:") as tar, path.open("rb") as raw:
        for member in tar:
            if member.name.endswith(".npy"):
                raw.seek(member.offset_data)
                version = np.lib.format.read_magic(raw)
                if version == (1, 0):
                    np.lib.format.read_array_header_1_0(raw)
                elif version == (2, 0):
                    np.lib.format.read_array_header_2_0(raw)
                else:
                    raise ShardError(f"{path}: {member.name} has .npy format {version}, expected 1.0 or 2.0")
                header_len = raw.tell() - member.offset_data
                out[member.name] = (member.offset_data + header_len, member.size - header_len)
    return out


class _ShardWriter:
    """Writes chunks into ``shard-<part>-<n>.tar``; a scan never straddles two shards."""

    def __init__(self, shard_dir: Path, part: int, max_bytes: int) -> None:
        import webdataset as wds

        self._wds = wds
        self.dir, self.part, self.max_bytes = shard_dir, part, max_bytes
        existing = sorted(shard_dir.glob(f"shard-{part:03d}-*.tar"))
        self.next_index = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in existing), default=-1)
        self.tar = None
        self.scans: dict[str, dict] = {}
        self.samples = 0

    def _open(self) -> None:
        self.name = f"shard-{self.part:03d}-{self.next_index:05d}.tar"
        self.next_index += 1
        self.tmp = self.dir / (self.name + ".tmp")
        self.file = self.tmp.open("wb")
        # USTAR with an integer mtime: no PAX header records, so chunks of a scan sit 1.5 KiB apart
        self.tar = self._wds.TarWriter(self.file, encoder=False, mtime=0, format=tarfile.USTAR_FORMAT)
        self.scans, self.samples = {}, 0

    def add_scan(self, scan_id: str, series: np.ndarray, chunk_frames: int, meta: dict) -> int:
        """Append one scan's chunks; close the shard first if this scan would overflow it."""
        size = series.nbytes
        if self.tar is not None and self.scans and self.file.tell() + size > self.max_bytes:
            self.close()
        if self.tar is None:
            self._open()
        keys = []
        for k, start in enumerate(range(0, len(series), chunk_frames)):
            chunk = np.ascontiguousarray(series[start:start + chunk_frames])
            key = f"{scan_id}_c{k:05d}"
            info = {"scan": scan_id, "chunk": k, "frame_start": start, "frames": len(chunk)}
            self.tar.write({"__key__": key, "json": json.dumps(info).encode(), "npy": _npy_bytes(chunk)})
            keys.append((key, start, len(chunk)))
        self.scans[scan_id] = {**meta, "_keys": keys}
        self.samples += len(keys)
        self.file.flush()
        return size

    def close(self) -> None:
        """Finish the shard: rename it into place, then write its index (offsets, checksum)."""
        if self.tar is None:
            return
        self.tar.close()
        self.file.close()
        final = self.dir / self.name
        self.tmp.replace(final)
        offsets = index_tar(final)
        for meta in self.scans.values():
            keys = meta.pop("_keys")
            meta["chunks"] = [[*offsets[f"{key}.npy"], start, n] for key, start, n in keys]
        index = {"shard": self.name, "bytes": final.stat().st_size, "sha256": sha256_file(final),
                 "samples": self.samples, "scans": self.scans}
        atomic_write_json(final.with_suffix(".json"), index)
        self.tar = None


def _done_scans(shard_dir: Path) -> dict[str, str]:
    """Scan id -> shard name, for every scan in a complete shard (one with its index written)."""
    done = {}
    for idx in sorted(shard_dir.glob("shard-*.json")):
        if not idx.with_suffix(".tar").exists():
            continue
        for scan_id in json.loads(idx.read_text())["scans"]:
            done[scan_id] = idx.with_suffix(".tar").name
    return done


def _grid_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(round(float(v), 5) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def _prepare_mask(out: Path, scans: list[ScanSource], mask_path: str | None, opts: ShardOptions, n_parts: int,
                  skip) -> dict:
    """Load, copy or compute the brain mask; returns mask.json's content (shape, affine, bbox, ...)."""
    mask_file, info_file = out / "mask.nii.gz", out / "mask.json"
    if mask_path:
        mask, affine = load_mask(mask_path)
        source = f"user mask {mask_path}"
        if info_file.exists():
            old = json.loads(info_file.read_text())
            old_mask, _ = load_mask(mask_file)
            if old_mask.shape != mask.shape or not np.array_equal(old_mask, mask):
                raise ShardError(f"{mask_path}: differs from the mask this output was started with ({mask_file}); "
                                 "use a new output directory")
            return old
    elif info_file.exists():
        return json.loads(info_file.read_text())
    else:
        if n_parts > 1:
            raise ShardError(f"{out}: no mask.nii.gz yet. With --part, first compute the mask once "
                             "(brainmt shard ... --mask-only) or pass --mask FILE")
        use = scans if opts.mask_scans is None else scans[: opts.mask_scans]
        counts, affine, shape, n = None, None, None, 0
        for src in use:
            try:
                varies, header = variation_mask(src.path)
            except ScanError as exc:
                skip(src, str(exc))
                continue
            if not varies.any() or header.frames < opts.min_frames:
                continue  # no signal or too short: reported when the scan itself is read
            if shape is None:
                shape, affine, zooms = header.shape, header.affine, header.voxel_size
            if header.shape != shape or not np.allclose(header.voxel_size, zooms, atol=1e-3):
                continue  # another grid: reported when the scan itself is read
            counts = varies.astype(np.int32) if counts is None else counts + varies
            n += 1
        if counts is None:
            raise ShardError("no readable scan to compute a brain mask from")
        mask = counts >= opts.mask_fraction * n
        if not mask.any():
            raise ShardError(f"the data-derived brain mask is empty (no voxel varies in {opts.mask_fraction:.0%} of "
                             f"{n} scans); pass --mask FILE")
        source = f"data: voxels varying over time in >= {opts.mask_fraction:.0%} of {n} scans"
    bbox = bounding_box(mask)
    save_mask(mask, affine, mask_file)
    info = {"file": mask_file.name, "source": source, "shape": list(mask.shape), "affine": np.asarray(affine).tolist(),
            "voxel_size": list(_grid_of(affine)), "n_voxels": int(mask.sum()), "bbox": [list(b) for b in bbox],
            "cropped_shape": [b - a for a, b in bbox]}
    atomic_write_json(info_file, info)
    return info


def shard_dataset(input_dir: str | Path, phenotypes: str | Path, output: str | Path, *, layout: str = "auto",
                  glob: str | None = None, subject_regex: str | None = None, bids_space: str | None = None,
                  mask: str | None = None, part: tuple[int, int] = (0, 1), mask_only: bool = False,
                  id_column: str | None = None, targets: list[str] | None = None, sex_column: str | None = None,
                  family_column: str | None = None, options: ShardOptions | None = None,
                  progress: bool | None = None) -> ShardSummary:
    """Shard the scans under ``input_dir``; with one part (the default) also write the manifest and splits."""
    opts = options or ShardOptions()
    t0 = time.perf_counter()
    out = Path(output)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    for orphan in shard_dir.glob("*.tar.tmp"):
        orphan.unlink()  # an interrupted shard: its scans are written again
    for index_file in shard_dir.glob("shard-*.json"):
        if not index_file.with_suffix(".tar").exists():
            index_file.unlink()  # its shard was removed: those scans are written again
    phen = read_phenotypes(phenotypes, id_column, targets, sex_column, family_column)
    layout, scans = find_scans(input_dir, layout, glob, subject_regex, bids_space)
    summary = ShardSummary()

    def skip(src: ScanSource, reason: str) -> None:
        if opts.strict:
            raise ShardError(f"{src.path}: {reason}" if str(src.path) not in reason else reason)
        if not any(s["scan_id"] == src.scan_id for s in summary.skipped):
            summary.skipped.append({"scan_id": src.scan_id, "source": str(src.path), "reason": reason})
            log.warning("skipping %s: %s", src.scan_id, reason)

    usable = []
    for src in scans:
        if src.subject not in phen.values:
            skip(src, f"no row for subject '{src.subject}' in {phen.path}")
        elif (problem := phen.target_problem(src.subject)) is not None:
            skip(src, f"phenotype {problem} in {phen.path}")
        else:
            usable.append(src)
    index, n_parts = part
    if not 0 <= index < n_parts:
        raise ShardError(f"--part {index}/{n_parts}: the part index must be in 0..{n_parts - 1}")
    mask_info = _prepare_mask(out, usable, mask, opts, n_parts, skip)
    if mask_only:
        summary.seconds = time.perf_counter() - t0
        return summary
    full_mask, _ = load_mask(out / mask_info["file"])
    voxel_size = tuple(mask_info["voxel_size"])
    mine = [s for i, s in enumerate(sorted(usable, key=lambda s: s.scan_id)) if i % n_parts == index]
    done = _done_scans(shard_dir)
    writer = _ShardWriter(shard_dir, index, opts.shard_bytes)
    todo = [s for s in mine if s.scan_id not in done]
    summary.already_done = [s.scan_id for s in mine if s.scan_id in done]
    show = sys.stderr.isatty() if progress is None else progress
    if show:
        from tqdm import tqdm
        todo_iter = tqdm(todo, desc=f"shard part {index}/{n_parts}", unit="scan")
    else:
        todo_iter = todo
    finished = False
    try:
        for src in todo_iter:
            try:
                with OpenScan(src.path) as scan:
                    h = scan.header
                    if list(h.shape) != mask_info["shape"]:
                        raise ScanError(f"{src.path}: shape {list(h.shape)} differs from the mask's {mask_info['shape']} "
                                        "(all scans must share one grid)")
                    if not np.allclose(h.voxel_size, voxel_size, atol=1e-3):
                        raise ScanError(f"{src.path}: voxel size {list(h.voxel_size)} differs from the mask's "
                                        f"{list(voxel_size)}")
                    if h.frames < opts.min_frames:
                        raise ScanError(f"{src.path}: {h.frames} frames, fewer than the {opts.min_frames} needed "
                                        "(--min-frames)")
                    series = read_brain_series(scan, full_mask, opts.background)
            except ScanError as exc:
                skip(src, str(exc))
                continue
            meta = {"subject": src.subject, "source": str(src.path), "source_bytes": h.source_bytes,
                    "source_mtime": h.source_mtime, "frames": h.frames, "tr": h.tr, "shape": list(h.shape),
                    "voxel_size": list(h.voxel_size), "affine": np.round(h.affine, 6).tolist(),
                    "source_affine": np.asarray(h.source_affine).tolist(),   # on-disk orientation: maps go back to it
                    "mean": series.mean, "std": series.std,
                    "background": series.background, "targets": phen.values[src.subject],
                    "family": phen.families.get(src.subject)}
            summary.bytes_written += writer.add_scan(src.scan_id, series.data, opts.chunk_frames, meta)
            summary.written.append(src.scan_id)
        finished = True
    finally:
        writer.close()  # every scan added so far is kept, whatever stopped the loop
        atomic_write_json(out / "parts" / f"part-{index:03d}-of-{n_parts:03d}.json",
                          {"part": index, "parts": n_parts, "finished": finished,
                           "skipped": summary.skipped, "phenotypes": str(phen.path), "layout": layout,
                           "targets": phen.targets, "sex_column": phen.sex_column, "family_column": phen.family_column,
                           "rows_without_scan": sorted(set(phen.values) - {s.subject for s in scans})})
    if n_parts == 1:
        summary.manifest = str(merge_manifest(out, opts))
    summary.seconds = time.perf_counter() - t0
    return summary


def merge_manifest(output: str | Path, options: ShardOptions | None = None, resplit: bool = False) -> Path:
    """Gather every part's shards into ``manifest.json``; write ``splits.json`` unless one exists (or ``resplit``)."""
    opts = options or ShardOptions()
    out = Path(output)
    parts = sorted((out / "parts").glob("part-*.json"))
    if not parts:
        raise ShardError(f"{out}: no parts/part-*.json: nothing was sharded here")
    infos = [json.loads(p.read_text()) for p in parts]
    n_parts = infos[0]["parts"]
    have = {i["part"] for i in infos if i["finished"] and i["parts"] == n_parts}
    missing = sorted(set(range(n_parts)) - have)
    if missing:
        raise ShardError(f"{out}: part(s) {missing} of {n_parts} have not finished; run them before --merge")
    mask_info = json.loads((out / "mask.json").read_text())
    scans, shards = {}, []
    for idx in sorted((out / "shards").glob("shard-*.json")):
        index = json.loads(idx.read_text())
        tar = idx.with_suffix(".tar")
        if not tar.exists() or tar.stat().st_size != index["bytes"]:
            raise ShardError(f"{tar}: missing or not the size its index {idx.name} records")
        shards.append({k: index[k] for k in ("shard", "bytes", "sha256", "samples")})
        for scan_id, meta in index["scans"].items():
            scans[scan_id] = {**meta, "shard": index["shard"]}
    skipped = [s for i in infos for s in i["skipped"] if s["scan_id"] not in scans]
    first = infos[0]
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "brainmt_version": __version__,
        "preprocessing": {
            "orientation": "RAS+ (nibabel closest canonical)",
            "normalisation": "per scan: global z-score over brain voxels",
            "background": opts.background,
            "dtype": "float16",
            "storage": "brain voxels only, in mask order (C order of the cropped volume)",
            "chunk_frames": opts.chunk_frames,
            "min_frames": opts.min_frames,
        },
        "layout": first["layout"],
        "phenotypes": first["phenotypes"],
        "targets": first["targets"],
        "sex_column": first["sex_column"],
        "family_column": first["family_column"],
        "mask": mask_info,
        "scans": dict(sorted(scans.items())),
        "shards": shards,
        "skipped": skipped,
        "phenotype_rows_without_scan": sorted({r for i in infos for r in i["rows_without_scan"]}),
    }
    path = out / "manifest.json"
    atomic_write_json(path, manifest)
    splits_path = out / "splits.json"
    if resplit or not splits_path.exists():
        write_splits(manifest, splits_path, opts.split_fractions, opts.split_seed)
    return path


def write_splits(manifest: dict, path: str | Path, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict:
    """Family-grouped, sex-stratified (when a sex column exists) subject splits of a manifest, as JSON."""
    subjects = sorted({m["subject"] for m in manifest["scans"].values()})
    fam = {m["subject"]: m["family"] for m in manifest["scans"].values() if m.get("family")}
    sex_col = manifest.get("sex_column")
    strata = {m["subject"]: m["targets"].get(sex_col) for m in manifest["scans"].values()} if sex_col else None
    splits = make_splits(subjects, fam or None, strata, tuple(fractions), seed)
    atomic_write_json(Path(path), splits)
    return splits


