"""Read brainmt shards: random access to any frames of any scan, a resampled training stream, exact-once evaluation.

A window of T frames is one ``os.pread`` of the contiguous chunks that cover it (offsets from the
manifest), so a training sample reads about the bytes of the frames it uses, not the whole scan.

Reads are checked (``check``; default from ``BRAINMT_SAMPLE_CHECK``, else "crc"):

- "crc" (the default): the first time this process reads a chunk, its bytes are compared with the CRC32 the
  sharder recorded (about 4 ms for 16 MB); later reads of the chunk are not checked again (its bytes do not change
  while its shard file does not), so a training stream, which reads each chunk many times, pays almost nothing;
- "crc-always": every read is compared (opt-in: 12-30% of the loader's CPU, far above the 2% budget; see
  docs/checks.md and ``python -m brainmt.bench.loader --checks``);
- "finite": the first read of a chunk looks for NaN or infinite values only (about 1 ms for 16 MB);
- "none": nothing.

A chunk without a CRC32 (shards of an older brainmt: one warning) gets the "finite" check instead. A failure
raises ShardError naming the shard file, the scan and the sample key.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from brainmt.data.nifti import load_mask
from brainmt.data.shards import FORMAT_VERSION, ShardError, sample_key
from brainmt.fileio import sha256_file

log = logging.getLogger(__name__)
CHECK_ENV = "BRAINMT_SAMPLE_CHECK"
SAMPLE_CHECKS = ("crc", "crc-always", "finite", "none")
DEFAULT_CHECK = "crc"   # once per chunk and process: < 1% of the loader's throughput ("crc-always": 12-30%)


def sample_check(check: str | None = None) -> str:
    """The per-read check: ``check``, else the BRAINMT_SAMPLE_CHECK environment variable, else "crc"."""
    value = check if check is not None else (os.environ.get(CHECK_ENV, "").strip().lower() or DEFAULT_CHECK)
    if value not in SAMPLE_CHECKS:
        where = "check" if check is not None else CHECK_ENV
        raise ValueError(f"{where}={value!r}: the per-read sample check must be one of {', '.join(SAMPLE_CHECKS)}")
    return value


def all_finite16(a: np.ndarray) -> bool:
    """True if a float16 array holds no NaN or inf, by two max reductions over its bits (about 10 GB/s).

    NaN and inf have every exponent bit set: as uint16 a negative one is >= 0xFC00 (above every finite value),
    as int16 a positive one is >= 0x7C00 (negative values are negative there).
    """
    if a.size == 0:
        return True
    return int(a.view(np.uint16).max()) < 0xFC00 and int(a.view(np.int16).max()) < 0x7C00


class ShardSet:
    """A shard directory (``manifest.json``, ``mask.nii.gz``, ``splits.json``, ``shards/``) opened for reading.

    ``verify``: "size" (default; every shard has the size the manifest records), "sha256" (also the
    checksums; reads every byte) or "none". ``check``: what reads check, "crc", "crc-always", "finite" or "none"
    (default: the ``BRAINMT_SAMPLE_CHECK`` environment variable, else "crc"; see the module's docstring).
    """

    def __init__(self, root: str | Path, verify: str = "size", check: str | None = None) -> None:
        self.root = Path(root)
        path = self.root / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise ShardError(f"{path}: not found; is {self.root} a brainmt shard directory (brainmt shard --output)?") from None
        except json.JSONDecodeError as exc:
            raise ShardError(f"{path}: corrupt manifest ({exc})") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{path}: format version {self.manifest.get('format_version')}, this brainmt reads "
                             f"{FORMAT_VERSION}; re-shard the data")
        m = self.manifest["mask"]
        full, _ = load_mask(self.root / m["file"])
        box = tuple(slice(a, b) for a, b in m["bbox"])
        self.volume_shape: tuple[int, int, int] = tuple(m["cropped_shape"])  # type: ignore[assignment]
        self.brain_index = np.flatnonzero(full[box])
        self.n_brain = len(self.brain_index)
        if self.n_brain != m["n_voxels"]:
            raise ShardError(f"{self.root / m['file']}: has {self.n_brain} voxels, the manifest says {m['n_voxels']}")
        self.scans: dict[str, dict] = self.manifest["scans"]
        self.chunk_frames: int = self.manifest["preprocessing"]["chunk_frames"]
        self.bytes_read = 0
        self._fds: dict[str, int] = {}
        self._index_cache: dict[str, torch.Tensor] = {}
        self.check = sample_check(check)
        self._checked: dict[str, np.ndarray] = {}   # scan -> chunks this process has checked
        unchecked = sum("crc32" not in m for m in self.scans.values())
        if self.check.startswith("crc") and unchecked:
            log.warning("%s: %d of %d scans were sharded without per-sample CRC32s (an older brainmt): their reads are "
                        "checked for non-finite values only; re-shard to add them", path, unchecked, len(self.scans))
        if verify != "none":
            self.verify(checksums=verify == "sha256")

    def verify(self, checksums: bool = False) -> None:
        """Check every shard's size (and sha256 if ``checksums``) against the manifest; raise naming the shard."""
        for s in self.manifest["shards"]:
            path = self.root / "shards" / s["shard"]
            if not path.exists():
                raise ShardError(f"{path}: shard listed in the manifest is missing")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise ShardError(f"{path}: {size} bytes, the manifest records {s['bytes']} (truncated or replaced)")
            if checksums:
                digest = sha256_file(path)
                if digest != s["sha256"]:
                    raise ShardError(f"{path}: sha256 {digest} does not match the manifest's {s['sha256']}")

    def splits(self, path: str | Path | None = None) -> dict:
        """The subject splits (``splits.json`` next to the manifest unless ``path``)."""
        p = Path(path) if path else self.root / "splits.json"
        return json.loads(p.read_text())

    def scans_of(self, split: str | None, splits_path: str | Path | None = None) -> list[str]:
        """Scan ids whose subject is in ``split`` ("train", "validation", "test"), or all if None; sorted."""
        if split is None:
            return sorted(self.scans)
        sp = self.splits(splits_path)
        if split not in sp:
            raise KeyError(f"no split {split!r} in splits.json; it has {[k for k in sp if isinstance(sp[k], list)]}")
        subjects = set(sp[split])
        return sorted(s for s, m in self.scans.items() if m["subject"] in subjects)

    def target(self, scan_id: str, name: str) -> float:
        """The phenotype value ``name`` of a scan's subject."""
        targets = self.scans[scan_id]["targets"]
        if name not in targets:
            raise KeyError(f"target {name!r} not in the shards; they hold {sorted(targets)}")
        return float(targets[name])

    def _fd(self, shard: str) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.root / "shards" / shard, os.O_RDONLY)
        return fd

    def read_frames(self, scan_id: str, start: int, count: int) -> np.ndarray:
        """Frames [start, start+count) of a scan as float16 (count, n_brain), in one read of the covering chunks."""
        meta = self.scans[scan_id]
        if start < 0 or count < 1 or start + count > meta["frames"]:
            raise ValueError(f"{scan_id}: frames {start}..{start + count - 1} outside 0..{meta['frames'] - 1}")
        chunks = [(k, c) for k, c in enumerate(meta["chunks"]) if c[2] < start + count and c[2] + c[3] > start]
        base = chunks[0][1][0]
        length = chunks[-1][1][0] + chunks[-1][1][1] - base
        buf = os.pread(self._fd(meta["shard"]), length, base)
        self.bytes_read += len(buf)
        if len(buf) != length:
            raise ShardError(f"{self.root / 'shards' / meta['shard']}: truncated: sample {scan_id} frames "
                             f"{chunks[0][1][2]}-{chunks[-1][1][2] + chunks[-1][1][3] - 1} needs bytes "
                             f"{base}..{base + length}, the file ends at {base + len(buf)}")
        out = np.empty((count, self.n_brain), dtype=np.float16)
        checked = self._checked_of(scan_id)
        for k, (offset, nbytes, first, n) in chunks:
            arr = np.frombuffer(buf, dtype=np.float16, count=n * self.n_brain, offset=offset - base).reshape(n, self.n_brain)
            if not checked[k]:
                self._check_chunk(scan_id, k, arr, memoryview(buf)[offset - base:offset - base + nbytes], first)
                checked[k] = self.check != "crc-always"
            lo, hi = max(start, first), min(start + count, first + n)
            out[lo - start:hi - start] = arr[lo - first:hi - first]
        return out

    def _checked_of(self, scan_id: str) -> np.ndarray:
        """Which chunks of a scan need no check (all with check "none"; those already checked with "crc"/"finite")."""
        checked = self._checked.get(scan_id)
        if checked is None:
            checked = np.full(len(self.scans[scan_id]["chunks"]), self.check == "none")
            self._checked[scan_id] = checked
        return checked

    def _check_chunk(self, scan_id: str, k: int, arr: np.ndarray, raw: memoryview, first: int) -> None:
        """Chunk k's bytes against its CRC32 (with a crc check, when recorded), else its values for NaN or inf."""
        crcs = self.scans[scan_id].get("crc32") if self.check.startswith("crc") else None
        if crcs is not None:
            if zlib.crc32(raw) != crcs[k]:    # bytes as written are finite: the sharder checked them
                self._damaged(scan_id, k, arr)
        elif not all_finite16(arr):
            self._damaged(scan_id, k, None, first + int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0]))

    def _damaged(self, scan_id: str, chunk: int, data: np.ndarray | None, frame: int | None = None) -> None:
        """Raise ShardError naming the shard, scan and sample: its CRC32 fails (``data``) or a frame is non-finite."""
        shard = self.root / "shards" / self.scans[scan_id]["shard"]
        where = f"{shard}: sample {sample_key(scan_id, chunk)} of scan {scan_id}"
        fix = f"the shard is damaged: check every shard with brainmt verify --shards {self.root}, then re-shard"
        if frame is not None:
            raise ShardError(f"{where}: non-finite values (NaN or inf) at frame {frame}; {fix}")
        finite = "" if np.isfinite(data).all() else " and holds non-finite values (NaN or inf)"
        raise ShardError(f"{where}: its bytes do not match the CRC32 recorded when it was written{finite}; {fix}")

    def unpack(self, frames: np.ndarray | torch.Tensor, background: float) -> torch.Tensor:
        """Brain-voxel frames (T, n_brain) -> dense (T, 1, D, H, W) over the cropped grid, background filled."""
        frames = torch.as_tensor(frames)
        dense = torch.full((frames.shape[0], int(np.prod(self.volume_shape))), background, dtype=frames.dtype,
                           device=frames.device)
        dense.index_copy_(1, self._index_on(frames.device), frames)
        return dense.view(frames.shape[0], 1, *self.volume_shape)

    def _index_on(self, device: torch.device) -> torch.Tensor:
        cached = self._index_cache.get(str(device))
        if cached is None:
            cached = self._index_cache[str(device)] = torch.as_tensor(self.brain_index, device=device)
        return cached

    def sample(self, scan_id: str, start: int, num_frames: int, target: str | None, dense: bool = True) -> dict:
        """One sample dict: x (T, 1, D, H, W) or packed (T, n_brain) float16, y, scan, subject, start, bytes_read."""
        before = self.bytes_read
        frames = self.read_frames(scan_id, start, num_frames)
        meta = self.scans[scan_id]
        x = self.unpack(frames, meta["background"]) if dense else torch.from_numpy(frames)
        out = {"x": x, "scan": scan_id, "subject": meta["subject"], "start": start,
               "bytes_read": self.bytes_read - before}
        if target is not None:
            out["y"] = torch.tensor(self.target(scan_id, target), dtype=torch.float32)
        return out

    def close(self) -> None:
        """Close the open shard files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self) -> dict:  # DataLoader workers open their own file descriptors
        state = self.__dict__.copy()
        state["_fds"], state["_index_cache"] = {}, {}
        return state


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_lengths(shards: ShardSet, scan_ids: list[str], num_frames: int) -> None:
    """ShardError when a scan is shorter than one window of ``num_frames``."""
    short = [s for s in scan_ids if shards.scans[s]["frames"] < num_frames]
    if short:
        raise ShardError(f"{len(short)} scan(s) have fewer than num_frames={num_frames} frames (e.g. {short[0]}: "
                         f"{shards.scans[short[0]]['frames']}); lower data.num_frames or re-shard with --min-frames")


class TrainStream(IterableDataset):
    """Endless resampled training samples with a random temporal crop, independent per rank and worker.

    The split's scans are divided between all (rank, worker) streams (as ``split_by_node`` and
    ``split_by_worker`` divide shards); each stream draws scans at random from its own share with
    its own seeded generator, so no shuffle buffer is needed. Crops start at chunk boundaries
    (``align="chunk"``: a window reads exactly its frames when T is a multiple of the chunk) or at
    any frame (``align="frame"``: up to one extra chunk read). To resume where a DataLoader stopped after
    ``skip_batches`` batches of ``batch_size`` (workers hand out batches in turn), each stream draws
    the samples of its share of those batches without reading them.
    """

    def __init__(self, shards: ShardSet, scan_ids: list[str], num_frames: int, target: str | None, seed: int = 0,
                 align: str = "chunk", dense: bool = True, rank: int | None = None, world_size: int | None = None,
                 skip_batches: int = 0, batch_size: int = 1) -> None:
        super().__init__()
        if not scan_ids:
            raise ShardError("the training split has no scans")
        if align not in ("chunk", "frame"):
            raise ValueError(f"align must be 'chunk' or 'frame', got {align!r}")
        check_lengths(shards, scan_ids, num_frames)
        self.shards, self.scan_ids, self.num_frames, self.target = shards, list(scan_ids), num_frames, target
        self.seed, self.align, self.dense = seed, align, dense
        self.skip_batches, self.batch_size = skip_batches, batch_size
        self.rank, self.world_size = _rank_world(rank, world_size)

    def _draws(self, stream: int, streams: int):
        mine = self.scan_ids[stream::streams] if len(self.scan_ids) >= streams else self.scan_ids
        rng = np.random.default_rng([self.seed, stream])
        step = self.shards.chunk_frames if self.align == "chunk" else 1
        while True:
            scan = mine[int(rng.integers(len(mine)))]
            last = self.shards.scans[scan]["frames"] - self.num_frames
            yield scan, int(rng.integers(last // step + 1)) * step

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # a resumed DataLoader asks worker 0 first: it takes the role of the worker whose batch is next
        role = (worker + self.skip_batches) % workers
        draws = self._draws(self.rank * workers + role, self.world_size * workers)
        for _ in range(len(range(role, self.skip_batches, workers)) * self.batch_size):
            next(draws)
        for scan, start in draws:
            yield self.shards.sample(scan, start, self.num_frames, self.target, self.dense)


def window_starts(frames: int, num_frames: int) -> list[int]:
    """The evaluation windows of a scan of ``frames`` frames: starts 0, T, 2T, ... and one last window ending at the
    scan's end (``frames >= num_frames``)."""
    starts = list(range(0, frames - num_frames + 1, num_frames))
    if starts[-1] + num_frames < frames:
        starts.append(frames - num_frames)
    return starts


def eval_windows(shards: ShardSet, scan_ids: list[str], num_frames: int) -> list[tuple[str, int]]:
    """Every window of every scan, in order (:func:`window_starts` of each)."""
    check_lengths(shards, scan_ids, num_frames)
    return [(scan, s) for scan in sorted(scan_ids) for s in window_starts(shards.scans[scan]["frames"], num_frames)]


class EvalWindows(Dataset):
    """Deterministic evaluation windows; rank r of W takes windows r, r+W, ... so each is seen exactly once."""

    def __init__(self, shards: ShardSet, scan_ids: list[str], num_frames: int, target: str | None,
                 dense: bool = True, rank: int | None = None, world_size: int | None = None) -> None:
        rank, world = _rank_world(rank, world_size)
        self.shards, self.num_frames, self.target, self.dense = shards, num_frames, target, dense
        self.windows = eval_windows(shards, scan_ids, num_frames)[rank::world]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        scan, start = self.windows[i]
        return self.shards.sample(scan, start, self.num_frames, self.target, self.dense)
