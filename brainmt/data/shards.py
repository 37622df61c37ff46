"""NIfTI scans + phenotypes -> WebDataset shards of brain-voxel chunks, ``manifest.json`` and ``splits.json``.

Each sample is one chunk of ``chunk_frames`` consecutive frames of one scan: key ``<scan>_c<k>``
(no dots), members ``.json`` (scan, chunk, frame range) and ``.npy`` (float16 ``(frames, n_brain)``,
the z-scored brain voxels in mask order). A scan's chunks are contiguous in one shard, so a window
of T frames is one read of about T frames' bytes through the byte offsets kept in the manifest.

Restartable: a shard is written as ``.tmp`` and renamed when complete, then its index
(``<shard>.json``) is written; a re-run skips scans found in complete shards. ``part=(i, n)`` writes
one slice of the scans (for the tasks of a job array); ``merge_manifest`` gathers the parts.

Integrity: every shard's SHA-256 is in its index and the manifest (``verify_shards``, ``brainmt verify``),
and every chunk's CRC32 in the scan's ``crc32`` list (checked by the loader). ``options.json`` records the
options that change what is stored; a re-run with other values is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainmt import __version__
from brainmt.config import SPLIT_NAMES, ShardBackground, ShardConfig, option_flag, option_text, shard_problems
from brainmt.data.layouts import ScanSource, find_scans
from brainmt.data.nifti import OpenScan, ScanError, bounding_box, load_mask, read_brain_series, save_mask, variation_mask
from brainmt.data.phenotypes import PhenotypeError, Phenotypes, make_splits, read_phenotypes
from brainmt.fileio import atomic_write_json, sha256_file

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class ShardError(ValueError):
    """The sharding run cannot go on; the message names the file and the problem."""


class ShardOptionError(ShardError):
    """An option's value cannot work (a usage error, exit status 2); the message names the option."""


SMALL_SPLIT_SUBJECTS = 10  # fewer subjects than this in a split: a warning (its metrics are mostly noise)
# options that change what is stored (shard.* keys, each the option of the same name); a re-run must repeat them
# (options.json)
STORED_OPTIONS = ("chunk_frames", "background", "min_frames", "mask_fraction", "mask_scans", "layout", "bids_space",
                  "targets", "sex_column", "family_column")
_DEFAULTS = ShardConfig()


def split_text(fractions) -> str:
    """``--split 0.7 0.15 0.15`` as the user would type it."""
    return f"{option_flag('split')} {option_text([float(v) for v in fractions])}"


@dataclass
class ShardOptions:
    """How scans become shards: the Python API's form of :class:`~brainmt.config.ShardConfig` (less the input's
    layout, columns and mask, which are :func:`shard_dataset`'s arguments), with its defaults."""

    chunk_frames: int = _DEFAULTS.chunk_frames
    shard_bytes: int = int(_DEFAULTS.shard_size_gb * 1e9)
    background: ShardBackground = _DEFAULTS.background
    min_frames: int = _DEFAULTS.min_frames
    mask_fraction: float = _DEFAULTS.mask_fraction   # data-derived mask: voxels varying in at least this fraction
    mask_scans: int | None = _DEFAULTS.mask_scans    # data-derived mask from at most this many scans (None: all)
    split_fractions: tuple[float, float, float] = tuple(_DEFAULTS.split)
    split_seed: int = _DEFAULTS.split_seed
    strict: bool = _DEFAULTS.strict                  # stop at the first skipped scan instead of counting it
    # refuse splits (with a fraction above 0) of fewer subjects. Deliberately not ShardConfig's 1 (the command
    # line's and the config's: training or evaluating on an empty split fails): 0 here only warns (small test data)
    min_split_subjects: int = 0

    @classmethod
    def from_config(cls, c: ShardConfig) -> ShardOptions:
        """The options of a (checked) ``shard:`` config section."""
        return cls(chunk_frames=c.chunk_frames, shard_bytes=int(c.shard_size_gb * 1e9), background=c.background,
                   min_frames=c.min_frames, mask_fraction=c.mask_fraction, mask_scans=c.mask_scans,
                   split_fractions=tuple(c.split), split_seed=c.split_seed, strict=c.strict,
                   min_split_subjects=c.min_split_subjects)

    def to_config(self) -> ShardConfig:
        """These options as a ``shard:`` config section (the input's layout, columns and mask at their defaults)."""
        return ShardConfig(chunk_frames=self.chunk_frames, shard_size_gb=self.shard_bytes / 1e9,
                           background=self.background, min_frames=self.min_frames, mask_fraction=self.mask_fraction,
                           mask_scans=self.mask_scans, split=list(self.split_fractions), split_seed=self.split_seed,
                           strict=self.strict, min_split_subjects=self.min_split_subjects)

    def check(self) -> None:
        """Raise ShardOptionError naming every option whose value cannot work (before any work is done)."""
        problems = shard_problems(self.to_config(), as_options=True)
        if problems:
            raise ShardOptionError("; ".join(problems))


# skip reasons, counted when nothing could be written
KIND_NO_ROW = "no phenotype row"
KIND_PHENOTYPE = "missing or invalid phenotype value"
KIND_GRID = "another grid than the mask"
KIND_SCAN = "unreadable or unusable scan"
KIND_FLAT = "no voxel varies over time"


def kind_min_frames(min_frames: int) -> str:
    """The skip reason of a scan shorter than ``--min-frames``."""
    return f"fewer than --min-frames {min_frames} frames"


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

    def nothing_written(self) -> str:
        """The error when no scan was written: the skip reasons counted."""
        return f"0 scans written: {count_skips(self.skipped)}"


def count_skips(skipped: list[dict]) -> str:
    """``12 skipped (fewer than --min-frames 200 frames: 12)``: skip reasons counted, the commonest first."""
    counts = Counter(s.get("kind", "other") for s in skipped)
    detail = ", ".join(f"{kind}: {n}" for kind, n in counts.most_common())
    return f"{len(skipped)} skipped" + (f" ({detail})" if detail else "")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


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


def sample_key(scan_id: str, chunk: int) -> str:
    """The WebDataset key of a scan's chunk: ``<scan>_c<k>``."""
    return f"{scan_id}_c{chunk:05d}"


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
        """Append one scan's chunks (with each chunk's CRC32); close the shard first if this scan would overflow it."""
        size = series.nbytes
        if self.tar is not None and self.scans and self.file.tell() + size > self.max_bytes:
            self.close()
        if self.tar is None:
            self._open()
        keys = []
        for k, start in enumerate(range(0, len(series), chunk_frames)):
            chunk = np.ascontiguousarray(series[start:start + chunk_frames])
            key = sample_key(scan_id, k)
            info = {"scan": scan_id, "chunk": k, "frame_start": start, "frames": len(chunk)}
            self.tar.write({"__key__": key, "json": json.dumps(info).encode(), "npy": _npy_bytes(chunk)})
            keys.append((key, start, len(chunk), zlib.crc32(chunk)))
        self.scans[scan_id] = {**meta, "_keys": keys}
        self.samples += len(keys)
        self.file.flush()
        return size

    def close(self) -> None:
        """Finish the shard: rename it into place, then write its index (offsets, CRC32s, checksum)."""
        if self.tar is None:
            return
        self.tar.close()
        self.file.close()
        final = self.dir / self.name
        self.tmp.replace(final)
        offsets = index_tar(final)
        for meta in self.scans.values():
            keys = meta.pop("_keys")
            meta["chunks"] = [[*offsets[f"{key}.npy"], start, n] for key, start, n, _ in keys]
            meta["crc32"] = [crc for *_, crc in keys]    # of each chunk's array bytes (chunks[k][0:2])
        index = {"shard": self.name, "bytes": final.stat().st_size, "sha256": sha256_file(final),
                 "samples": self.samples, "scans": self.scans}
        atomic_write_json(final.with_suffix(".json"), index)
        self.tar = None


def _done_scans(shard_dir: Path) -> dict[str, dict]:
    """Scan id -> its recorded metadata, for every scan in a complete shard (one with its index written)."""
    done = {}
    for idx in sorted(shard_dir.glob("shard-*.json")):
        if idx.with_suffix(".tar").exists():
            done.update(json.loads(idx.read_text())["scans"])
    return done


def _changes(meta: dict, src: ScanSource, phen) -> list[str]:
    """What differs now from what a complete shard recorded of a scan: its phenotype values (the targets both
    have), its family, its file's size."""
    now = phen.values.get(src.subject)
    if now is None:
        return [f"no row for subject '{src.subject}' now"]
    old = meta.get("targets") or {}
    found = [f"{k} {old[k]!r} -> {'missing' if now[k] is None else repr(now[k])}" for k in sorted(set(old) & set(now))
             if old[k] is not None and old[k] != now[k]]
    if meta.get("family") != phen.families.get(src.subject):
        found.append(f"family {meta.get('family')} -> {phen.families.get(src.subject)}")
    try:
        size = Path(src.path).stat().st_size
    except OSError:
        size = None
    if size is not None and meta.get("source_bytes") not in (None, size):
        found.append(f"file {src.path} of {meta['source_bytes']} bytes is {size} now")
    return found


def _check_unchanged(out: Path, done: dict[str, dict], mine: list[ScanSource], phen) -> None:
    """ShardError naming the scans of ``mine`` (every scan found, usable now or not) already in a complete shard
    (``done``: :func:`_done_scans`) whose phenotype row or file changed since (a rerun would keep their old values or
    data without a word), or whose file is there under another id (ids change when a dataset gains a second task:
    each scan would be written twice)."""
    by_id, by_file, stale = {s.scan_id: s for s in mine}, {str(s.path): s.scan_id for s in mine}, []
    for scan_id, meta in done.items():
        if scan_id in by_id and (found := _changes(meta, by_id[scan_id], phen)):
            stale.append(f"{scan_id} ({', '.join(found)})")
        elif by_file.get(meta.get("source"), scan_id) != scan_id:
            stale.append(f"{by_file[meta['source']]} (sharded as {scan_id} from the same file: the dataset's ids "
                         "changed, e.g. a second task or session added)")
    if stale:
        raise ShardError(f"{out}: {len(stale)} scan(s) already sharded have changed since (against "
                         f"{phen.path}): {'; '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}. Their shards hold "
                         "the old values; shard into a new --output to use the new ones (nothing was written)")


def same_affine(affine: np.ndarray, reference, voxel_size) -> bool:
    """Whether a scan's canonical affine is the reference grid's to a hundredth of a voxel (None: none recorded):
    the same shape and voxel size on a shifted or rotated grid would put the mask on other voxels."""
    return reference is None or bool(np.allclose(affine, reference, atol=0.01 * min(voxel_size)))


def grid_difference(affine: np.ndarray, reference, voxel_size) -> str:
    """How a scan's canonical affine differs from the reference grid's, in words."""
    origin, other = (np.round(np.asarray(a, dtype=float)[:3, 3], 3) for a in (affine, reference))
    if np.allclose(origin, other, atol=0.01 * min(voxel_size)):
        return "its axes differ (a rotated or sheared grid)"
    return f"its origin {origin.tolist()} differs from {other.tolist()}"


def _grid_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(round(float(v), 5) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


# ------------------------------------------------------------------ checks before any work


def _settings(opts: ShardOptions, layout: str, bids_space: str | None, phen, data_mask: bool) -> dict:
    """The options that change what is stored, as options.json records them."""
    return {"chunk_frames": opts.chunk_frames, "background": opts.background, "min_frames": opts.min_frames,
            "mask": "data" if data_mask else "user", "mask_fraction": opts.mask_fraction if data_mask else None,
            "mask_scans": opts.mask_scans if data_mask else None, "layout": layout, "bids_space": bids_space,
            "targets": list(phen.targets), "sex_column": phen.sex_column, "family_column": phen.family_column}


def stored_settings(out: str | Path) -> dict | None:
    """The settings an output was written with: options.json, else what an older manifest.json records, else None."""
    out = Path(out)
    if (out / "options.json").exists():
        return json.loads((out / "options.json").read_text())
    if (out / "manifest.json").exists():
        man = json.loads((out / "manifest.json").read_text())
        pre = man.get("preprocessing", {})
        old = {k: pre[k] for k in ("chunk_frames", "background", "min_frames") if k in pre}
        return old | {k: man[k] for k in ("layout", "targets", "sex_column", "family_column") if k in man}
    return None


def _show(value) -> str:
    if value is None:
        return "(none)"
    return " ".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)


def shard_phenotypes(out: Path, path: str | Path, id_column: str | None, targets: list[str] | None,
                     sex_column: str | None, family_column: str | None) -> Phenotypes:
    """The phenotype table as sharding into ``out`` reads it. A sex column left out of the targets leaves the splits
    unstratified: named on purpose (``--sex-column``, ``shard.sex_column``) for a new output, an error; found by
    its name, or for an output already written so, a warning."""
    phen = read_phenotypes(path, id_column, targets, sex_column, family_column)
    if phen.sex_unused:
        what = (f"{phen.path}: the sex column {phen.sex_unused!r} is not among the targets {phen.targets}, so the "
                "splits are not stratified by sex")
        if sex_column and stored_settings(out) is None:
            raise PhenotypeError(f"{what}; add it to --targets, or leave out --sex-column (shard.sex_column)")
        log.warning("%s; add it to --targets to stratify them", what)
    return phen


def _check_output(out: Path, settings: dict, opts: ShardOptions) -> None:
    """Refuse to add to an output written with other stored options or other split options, naming each one."""
    diffs = []
    stored = stored_settings(out) or {}
    both_data = stored.get("mask") == "data" and settings["mask"] == "data"
    for key in STORED_OPTIONS:
        if key in stored and (both_data or not key.startswith("mask_")) and stored[key] != settings[key]:
            flag = option_flag(key)
            diffs.append(f"{flag} {_show(settings[key])} (it was written with {flag} {_show(stored[key])})")
    splits_path = out / "splits.json"
    if splits_path.exists():
        sp = json.loads(splits_path.read_text())
        old = [float(sp["fractions"][n]) for n in SPLIT_NAMES]
        if any(abs(a - b) > 1e-9 for a, b in zip(old, opts.split_fractions)):
            diffs.append(f"{split_text(opts.split_fractions)} (splits.json was drawn with {split_text(old)})")
        if sp.get("seed") != opts.split_seed:
            diffs.append(f"--split-seed {opts.split_seed} (splits.json was drawn with --split-seed {sp.get('seed')})")
    if diffs:
        raise ShardError(f"{out}: this output was made with other options: {'; '.join(diffs)}. Nothing was written: "
                         "repeat the output's options to continue it, or use a new --output (to redraw the splits: "
                         f"brainmt shard --merge --resplit --output {out} --split ...)")


def check_split_sizes(splits: dict, fractions, where: str, minimum: int, warn: bool = True) -> None:
    """Refuse a split with a fraction above 0 and fewer than ``minimum`` subjects; warn about small ones."""
    total = sum(len(splits[n]) for n in SPLIT_NAMES)
    for name, fraction in zip(SPLIT_NAMES, fractions):
        n = len(splits[name])
        if fraction > 0 and n < minimum:
            raise ShardError(f"{where}: split '{name}' would have {n} of {total} subjects ({split_text(fractions)}, "
                             f"subjects grouped by {splits.get('grouped_by', 'subject')}); each split with a fraction "
                             f"above 0 needs at least {minimum} (--min-split-subjects): shard more subjects or choose "
                             "other fractions with --split")
        if warn and fraction > 0 and n < SMALL_SPLIT_SUBJECTS:
            why = "its metrics will be mostly noise" if n else "training or evaluating on it will fail"
            log.warning("split '%s' has %s%d of %d subjects (%s): %s", name, "only " if n else "", n, total,
                        split_text(fractions), why)


def _predicted_splits(usable: list[ScanSource], phen, opts: ShardOptions) -> dict:
    """The splits merge_manifest will draw if every usable scan is written (the same subjects, families, strata)."""
    subjects = sorted({s.subject for s in usable})
    fam = {s: phen.families[s] for s in subjects if phen.families.get(s)}
    strata = {s: phen.values[s].get(phen.sex_column) for s in subjects} if phen.sex_column else None
    return make_splits(subjects, fam or None, strata, tuple(opts.split_fractions), opts.split_seed)


# ------------------------------------------------------------------ the mask


def _data_mask(scans: list[ScanSource], opts: ShardOptions, summary: ShardSummary, skip) -> tuple:
    """Voxels varying over time in at least ``mask_fraction`` of the scans: (mask, affine, scans used)."""
    use = scans if opts.mask_scans is None else scans[: opts.mask_scans]
    counts, affine, shape, n = None, None, None, 0
    why, longest, skipped_before = Counter(s.get("kind", "other") for s in summary.skipped), 0, len(summary.skipped)
    for src in use:
        try:
            varies, header = variation_mask(src.path)
        except ScanError as exc:
            skip(src, str(exc), KIND_SCAN)
            why[KIND_SCAN] += 1
            continue
        longest = max(longest, header.frames)
        if header.frames < opts.min_frames or not varies.any():  # reported again when the scan itself is read
            why[kind_min_frames(opts.min_frames) if header.frames < opts.min_frames else KIND_FLAT] += 1
            continue
        if shape is None:
            shape, affine, zooms = header.shape, header.affine, header.voxel_size
        if (header.shape != shape or not np.allclose(header.voxel_size, zooms, atol=1e-3)
                or not same_affine(header.affine, affine, zooms)):
            why[KIND_GRID] += 1
            continue  # another grid: reported when the scan itself is read
        counts = varies.astype(np.int32) if counts is None else counts + varies
        n += 1
    if counts is None:
        detail = ", ".join(f"{k}: {v}" for k, v in why.most_common())
        hint = (f"lower --min-frames (the longest scan has {longest} frames) or " if why[kind_min_frames(opts.min_frames)]
                else "see the warnings above for each scan, or ")
        raise ShardError(f"no readable scan to compute a brain mask from: {len(use) + skipped_before} scan(s), "
                         f"none usable ({detail}); {hint}pass --mask FILE")
    mask = counts >= opts.mask_fraction * n
    if not mask.any():
        raise ShardError(f"the data-derived brain mask is empty (no voxel varies in {opts.mask_fraction:.0%} of "
                         f"{n} scans); pass --mask FILE")
    return mask, affine, n


def _prepare_mask(out: Path, scans: list[ScanSource], mask_path: str | None, opts: ShardOptions, n_parts: int,
                  summary: ShardSummary, skip) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """Load, check or compute the brain mask without writing: (mask.json's content, mask and affine to save if new)."""
    mask_file, info_file = out / "mask.nii.gz", out / "mask.json"
    if mask_path:
        mask, affine = load_mask(mask_path)
        source = f"user mask {mask_path}"
        if info_file.exists():
            old_mask, _ = load_mask(mask_file)
            if old_mask.shape != mask.shape or not np.array_equal(old_mask, mask):
                raise ShardError(f"{mask_path}: differs from the mask this output was started with ({mask_file}); "
                                 "use a new output directory")
            return json.loads(info_file.read_text()), None, None
    elif info_file.exists():
        return json.loads(info_file.read_text()), None, None
    else:
        if n_parts > 1:
            raise ShardError(f"{out}: no mask.nii.gz yet. With --part, first compute the mask once "
                             "(brainmt shard ... --mask-only) or pass --mask FILE")
        mask, affine, n = _data_mask(scans, opts, summary, skip)
        source = f"data: voxels varying over time in >= {opts.mask_fraction:.0%} of {n} scans"
    bbox = bounding_box(mask)
    info = {"file": mask_file.name, "source": source, "shape": list(mask.shape), "affine": np.asarray(affine).tolist(),
            "voxel_size": list(_grid_of(affine)), "n_voxels": int(mask.sum()), "bbox": [list(b) for b in bbox],
            "cropped_shape": [b - a for a, b in bbox]}
    return info, mask, affine


# ------------------------------------------------------------------ writing


def _make_dirs(out: Path) -> list[Path]:
    """Create the output, shards/ and parts/ folders; return those this call created (to remove if left empty)."""
    created = []
    for d in [*[p for p in reversed([out, *out.parents]) if not p.exists()], out / "shards", out / "parts"]:
        try:
            d.mkdir()
        except FileExistsError:   # there already, or made meanwhile by another part (array task)
            continue
        created.append(d)
    return created


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders of ``created`` that are still empty, deepest first (never a file)."""
    for d in reversed(created):
        if d.is_dir() and not any(d.iterdir()):
            with contextlib.suppress(OSError):   # another part (array task) wrote into it meanwhile
                d.rmdir()


def _skipper(summary: ShardSummary, strict: bool):
    """skip(src, reason, kind): record a skipped scan once (or stop, with ``strict``)."""
    def skip(src: ScanSource, reason: str, kind: str) -> None:
        if strict:
            raise ShardError(f"{src.path}: {reason}" if str(src.path) not in reason else reason)
        if not any(s["scan_id"] == src.scan_id for s in summary.skipped):
            summary.skipped.append({"scan_id": src.scan_id, "source": str(src.path), "reason": reason, "kind": kind})
            log.warning("skipping %s: %s", src.scan_id, reason)
    return skip


def _with_phenotypes(scans: list[ScanSource], phen, skip) -> list[ScanSource]:
    """The scans whose subject has a phenotype row with usable targets; the others are skipped."""
    usable = []
    for src in scans:
        if src.subject not in phen.values:
            skip(src, f"no row for subject '{src.subject}' in {phen.path}", KIND_NO_ROW)
        elif (problem := phen.target_problem(src.subject)) is not None:
            skip(src, f"phenotype {problem} in {phen.path}", KIND_PHENOTYPE)
        else:
            usable.append(src)
    return usable


def _read_scan(src: ScanSource, mask_info: dict, full_mask: np.ndarray, opts: ShardOptions, skip) -> tuple | None:
    """(header, brain series) of a scan on the mask's grid, or None after skipping it with the reason."""
    voxel_size = tuple(mask_info["voxel_size"])
    try:
        with OpenScan(src.path) as scan:
            h = scan.header
            if list(h.shape) != mask_info["shape"]:
                skip(src, f"{src.path}: shape {list(h.shape)} differs from the mask's {mask_info['shape']} "
                          "(all scans must share one grid)", KIND_GRID)
                return None
            if not np.allclose(h.voxel_size, voxel_size, atol=1e-3):
                skip(src, f"{src.path}: voxel size {list(h.voxel_size)} differs from the mask's {list(voxel_size)}",
                     KIND_GRID)
                return None
            if not same_affine(h.affine, mask_info.get("affine"), voxel_size):
                skip(src, f"{src.path}: {grid_difference(h.affine, mask_info['affine'], voxel_size)}, the mask's grid: "
                          "all scans must share one grid; resample them to one space first", KIND_GRID)
                return None
            if h.frames < opts.min_frames:
                skip(src, f"{src.path}: {h.frames} frames, fewer than the {opts.min_frames} needed (--min-frames)",
                     kind_min_frames(opts.min_frames))
                return None
            return h, read_brain_series(scan, full_mask, opts.background)
    except ScanError as exc:
        skip(src, str(exc), KIND_SCAN)
        return None


def _write_scans(writer: _ShardWriter, todo, mask_info: dict, full_mask: np.ndarray, opts: ShardOptions, phen,
                 summary: ShardSummary, skip) -> None:
    """Read, check and append each scan of ``todo``; bad ones are skipped with the reason."""
    for src in todo:
        got = _read_scan(src, mask_info, full_mask, opts, skip)
        if got is None:
            continue
        h, series = got
        meta = {"subject": src.subject, "source": str(src.path), "source_bytes": h.source_bytes,
                "source_mtime": h.source_mtime, "frames": h.frames, "tr": h.tr, "shape": list(h.shape),
                "voxel_size": list(h.voxel_size), "affine": np.round(h.affine, 6).tolist(),
                "source_affine": np.asarray(h.source_affine).tolist(),   # on-disk orientation: maps go back to it
                "mean": series.mean, "std": series.std,
                "background": series.background, "targets": phen.values[src.subject],
                "family": phen.families.get(src.subject)}
        summary.bytes_written += writer.add_scan(src.scan_id, series.data, opts.chunk_frames, meta)
        summary.written.append(src.scan_id)


def _write_part(out: Path, mine: list[ScanSource], all_scans: list[ScanSource], layout: str, mask_info: dict,
                opts: ShardOptions, phen, part: tuple[int, int], summary: ShardSummary, skip,
                progress: bool | None) -> None:
    """Write this part's scans not yet in a complete shard; record the part (parts/part-i-of-n.json) whatever happens."""
    index, n_parts = part
    shard_dir = out / "shards"
    full_mask, _ = load_mask(out / mask_info["file"])
    done = _done_scans(shard_dir)                 # read once: what to skip, and what to compare with now
    _check_unchanged(out, done, all_scans, phen)
    todo = [s for s in mine if s.scan_id not in done]
    summary.already_done = [s.scan_id for s in mine if s.scan_id in done]
    show = sys.stderr.isatty() if progress is None else progress
    if show:
        from tqdm import tqdm
        todo = tqdm(todo, desc=f"shard part {index}/{n_parts}", unit="scan")
    record = {"part": index, "parts": n_parts, "finished": False, "skipped": summary.skipped,
              "phenotypes": str(phen.path), "layout": layout, "targets": phen.targets, "sex_column": phen.sex_column,
              "family_column": phen.family_column,
              "rows_without_scan": sorted(set(phen.values) - {s.subject for s in all_scans})}
    part_file = out / "parts" / f"part-{index:03d}-of-{n_parts:03d}.json"
    part_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(part_file, record)      # on record from the start: a merge meanwhile goes by this run's count
    writer = _ShardWriter(shard_dir, index, opts.shard_bytes)
    try:
        _write_scans(writer, todo, mask_info, full_mask, opts, phen, summary, skip)
        record["finished"] = True
    finally:
        writer.close()  # every scan added so far is kept, whatever stopped the loop
        atomic_write_json(part_file, record)          # "skipped" is the summary's list, as it now stands


def _start_output(out: Path, settings: dict, mask_info: dict, new_mask: np.ndarray | None, affine, part: int) -> None:
    """Record the options (options.json, once) and a new mask; clear what an interrupted run of this part left
    (never another part's: the parts, one per array task, write side by side)."""
    if not (out / "options.json").exists():
        atomic_write_json(out / "options.json", settings)
    if new_mask is not None:
        save_mask(new_mask, affine, out / "mask.nii.gz")
        atomic_write_json(out / "mask.json", mask_info)
    shard_dir = out / "shards"
    for orphan in shard_dir.glob(f"shard-{part:03d}-*.tar.tmp"):
        orphan.unlink()  # an interrupted shard: its scans are written again
    for index_file in shard_dir.glob(f"shard-{part:03d}-*.json"):
        if not index_file.with_suffix(".tar").exists():
            index_file.unlink()  # its shard was removed: those scans are written again


def shard_dataset(input_dir: str | Path, phenotypes: str | Path, output: str | Path, *, layout: str = _DEFAULTS.layout,
                  glob: str | None = None, subject_regex: str | None = None, bids_space: str | None = None,
                  mask: str | None = None, part: tuple[int, int] = (0, 1), mask_only: bool = False,
                  id_column: str | None = None, targets: list[str] | None = None, sex_column: str | None = None,
                  family_column: str | None = None, options: ShardOptions | None = None,
                  progress: bool | None = None) -> ShardSummary:
    """Shard the scans under ``input_dir``; with one part (the default) also write the manifest and splits.

    Every argument, the phenotypes, the scan list, the mask and the existing output are checked before any
    folder is created; a failure removes the empty folders this call created. Writing no scan at all raises.
    """
    opts = options or ShardOptions()
    t0 = time.perf_counter()
    opts.check()
    index, n_parts = part
    if not 0 <= index < n_parts:
        raise ShardOptionError(f"--part {index}/{n_parts}: the part index must be in 0..{n_parts - 1}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ShardOptionError(f"--output {out}: exists and is not a directory")
    phen = shard_phenotypes(out, phenotypes, id_column, targets, sex_column, family_column)
    layout, scans = find_scans(input_dir, layout, glob, subject_regex, bids_space)
    summary = ShardSummary()
    skip = _skipper(summary, opts.strict)
    usable = _with_phenotypes(scans, phen, skip)
    if not usable:
        raise ShardError(f"{summary.nothing_written()}; nothing was written to {out}")
    settings = _settings(opts, layout, bids_space, phen, data_mask=mask is None)
    _check_output(out, settings, opts)
    if not (out / "splits.json").exists():
        check_split_sizes(_predicted_splits(usable, phen, opts), opts.split_fractions, str(out),
                          opts.min_split_subjects, warn=False)
    mask_info, new_mask, affine = _prepare_mask(out, usable, mask, opts, n_parts, summary, skip)
    created = _make_dirs(out)
    try:
        _start_output(out, settings, mask_info, new_mask, affine, part[0])
        if not mask_only:
            mine = [s for i, s in enumerate(sorted(usable, key=lambda s: s.scan_id)) if i % n_parts == index]
            _write_part(out, mine, scans, layout, mask_info, opts, phen, part, summary, skip, progress)
            if n_parts == 1 and not summary.written and not summary.already_done:
                raise ShardError(f"{summary.nothing_written()}; no manifest written in {out}")
            if n_parts == 1:
                summary.manifest = str(merge_manifest(out, opts))
    except BaseException:
        _remove_empty(created)
        raise
    summary.seconds = time.perf_counter() - t0
    return summary


# ------------------------------------------------------------------ manifest, splits, verification


def merge_manifest(output: str | Path, options: ShardOptions | None = None, resplit: bool = False) -> Path:
    """Gather every part's shards into ``manifest.json``; write ``splits.json`` unless one exists (or ``resplit``).

    The stored options (chunk_frames, background, min_frames) come from options.json when the output has one.
    """
    opts = options or ShardOptions()
    opts.check()
    out = Path(output)
    parts = sorted((out / "parts").glob("part-*.json"))
    if not parts:
        raise ShardError(f"{out}: no parts/part-*.json: nothing was sharded here")
    infos = [json.loads(p.read_text()) for p in parts]
    # the newest run's part count: an earlier run of another count (a stopped single run before an array, or an
    # array before a single run that adds scans) must neither block nor stand in for the current one's parts
    n_parts = max(zip(parts, infos), key=lambda pair: pair[0].stat().st_mtime_ns)[1]["parts"]
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
    if not scans:
        raise ShardError(f"{out}: 0 scans in its shards, {count_skips(skipped)}; no manifest written")
    manifest = _manifest(out, infos, mask_info, scans, shards, skipped, opts)
    path = out / "manifest.json"
    atomic_write_json(path, manifest)
    splits_path = out / "splits.json"
    if resplit or not splits_path.exists():
        splits = draw_splits(manifest, opts.split_fractions, opts.split_seed)
        check_split_sizes(splits, opts.split_fractions, f"{out}: splits.json not written", opts.min_split_subjects)
        atomic_write_json(splits_path, splits)
    else:
        warn_unsplit(manifest, splits_path)
    return path


def warn_unsplit(manifest: dict, splits_path: Path) -> None:
    """Warn when the kept ``splits.json`` has no place for subjects of the manifest: nothing would use their scans."""
    splits = json.loads(splits_path.read_text())
    placed = {s for name in SPLIT_NAMES for s in splits.get(name, [])}
    left = sorted({m["subject"] for m in manifest["scans"].values()} - placed)
    if left:
        log.warning("%s: kept, but %d subject(s) of the manifest are in no split (%s%s), so no training or evaluation "
                    "uses them; --merge --resplit draws the splits again (subjects may change split)", splits_path,
                    len(left), ", ".join(left[:5]), ", ..." if len(left) > 5 else "")


def _manifest(out: Path, infos: list[dict], mask_info: dict, scans: dict, shards: list, skipped: list,
              opts: ShardOptions) -> dict:
    """manifest.json's content; the preprocessing options from options.json when there is one."""
    stored = stored_settings(out) if (out / "options.json").exists() else None
    pre = stored or {"chunk_frames": opts.chunk_frames, "background": opts.background, "min_frames": opts.min_frames}
    first = infos[0]
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "brainmt_version": __version__,
        "preprocessing": {
            "orientation": "RAS+ (nibabel closest canonical)",
            "normalisation": "per scan: global z-score over brain voxels",
            "background": pre["background"],
            "dtype": "float16",
            "storage": "brain voxels only, in mask order (C order of the cropped volume)",
            "chunk_frames": pre["chunk_frames"],
            "min_frames": pre["min_frames"],
            "sample_checksum": "crc32 of each chunk's array bytes (scans.<id>.crc32)",
        },
        "shard_options": stored,
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


def draw_splits(manifest: dict, fractions=tuple(_DEFAULTS.split), seed: int = _DEFAULTS.split_seed) -> dict:
    """Family-grouped, sex-stratified (when a sex column exists) subject splits of a manifest."""
    subjects = sorted({m["subject"] for m in manifest["scans"].values()})
    fam = {m["subject"]: m["family"] for m in manifest["scans"].values() if m.get("family")}
    sex_col = manifest.get("sex_column")
    strata = {m["subject"]: m["targets"].get(sex_col) for m in manifest["scans"].values()} if sex_col else None
    return make_splits(subjects, fam or None, strata, tuple(fractions), seed)


def write_splits(manifest: dict, path: str | Path, fractions=tuple(_DEFAULTS.split), seed: int = _DEFAULTS.split_seed) -> dict:
    """Family-grouped, sex-stratified (when a sex column exists) subject splits of a manifest, as JSON."""
    splits = draw_splits(manifest, fractions, seed)
    atomic_write_json(Path(path), splits)
    return splits


def _bad_samples(path: Path, scans: dict, shard: str) -> list[str]:
    """Keys of the samples of ``shard`` whose bytes do not match their CRC32 (scans written with one)."""
    bad = []
    with path.open("rb") as f:
        for scan_id, meta in sorted(scans.items()):
            if meta.get("shard") != shard or "crc32" not in meta:
                continue
            for k, ((offset, nbytes, *_), crc) in enumerate(zip(meta["chunks"], meta["crc32"])):
                f.seek(offset)
                if zlib.crc32(f.read(nbytes)) != crc:
                    bad.append(f"{sample_key(scan_id, k)} (scan {scan_id})")
    return bad


def verify_shards(root: str | Path) -> tuple[int, list[str]]:
    """Check every shard of ``root``'s manifest: present, its recorded size and SHA-256. Returns (bytes checked,
    problems), one problem a bad or missing file; a damaged shard's problem names the samples whose CRC32 fails."""
    root = Path(root)
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: not found; is {root} a brainmt shard directory (brainmt shard --output)?") from None
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: corrupt manifest ({exc})") from None
    problems, checked = [], 0
    for entry in manifest.get("shards", []):
        shard = root / "shards" / entry["shard"]
        if not shard.exists():
            problems.append(f"{shard}: missing (listed in {path})")
            continue
        size = shard.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{shard}: {size} bytes, the manifest records {entry['bytes']} (truncated or replaced)")
            continue
        digest = sha256_file(shard)
        checked += size
        if digest != entry["sha256"]:
            bad = _bad_samples(shard, manifest["scans"], entry["shard"])
            problems.append(f"{shard}: sha256 {digest} does not match the manifest's {entry['sha256']}"
                            + (f"; damaged samples: {', '.join(bad)}" if bad else ""))
    for name in ("mask.nii.gz", "splits.json"):
        if not (root / name).exists():
            problems.append(f"{root / name}: missing")
    return checked, problems
