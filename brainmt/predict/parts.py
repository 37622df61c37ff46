"""The output directory of ``brainmt predict``: its settings (``predict.json``) and the part files the tasks append to.

Each process (one ``brainmt predict``, or one task of the job array) appends one JSON line a scan to its own
``parts/part-<i>-of-<n>.jsonl``: the scan's window outputs, or why it was skipped. A line is flushed and fsynced
before the next scan starts, so an interruption loses at most the scan in progress; a re-run skips every scan that
has a predicted line in any part file (and whose source file has not changed since).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from brainmt.data.layouts import ScanSource
from brainmt.fileio import atomic_write_json

SETTINGS = "predict.json"
# what must match for a re-run to add to an output: the same trained model
SAME_MODEL = ("run", "checkpoint", "step", "task", "target", "num_frames")


class PredictError(ValueError):
    """Prediction cannot start or finish as asked; the message names the run, the output or the file."""


def part_path(out: str | Path, part: tuple[int, int]) -> Path:
    """The part file of part ``i`` of ``n``: ``OUT/parts/part-<i>-of-<n>.jsonl``."""
    i, n = part
    return Path(out) / "parts" / f"part-{i:03d}-of-{n:03d}.jsonl"


def start_output(out: str | Path, settings: dict) -> dict:
    """Write ``OUT/predict.json`` (the model's settings), or check that an existing one is of the same model."""
    out = Path(out)
    path = out / SETTINGS
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [f"{k} {settings.get(k)!r} (it holds {old.get(k)!r})" for k in SAME_MODEL if old.get(k) != settings.get(k)]
        if diffs:
            raise PredictError(f"{out}: holds the predictions of another model: {'; '.join(diffs)}. Nothing was "
                               "written: use another --out, or the same --run and --checkpoint to continue it")
        return old
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {out}: exists and is not a directory")
    (out / "parts").mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)
    return settings


def read_settings(out: str | Path) -> dict:
    """The settings of an output started by :func:`start_output`."""
    path = Path(out) / SETTINGS
    if not path.exists():
        raise PredictError(f"{path}: not found; nothing was predicted into {out} yet")
    return json.loads(path.read_text())


def read_records(out: str | Path) -> list[dict]:
    """Every complete line of every part file, oldest first (a line cut short by an interruption is left out)."""
    records = []
    for path in sorted((Path(out) / "parts").glob("part-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "scan" in record:
                records.append(record)
    return sorted(records, key=lambda r: r.get("time", 0.0))


def _resolved(src: ScanSource) -> str:
    return str(Path(src.path).resolve())


def _source_stat(path: Path) -> tuple[int, float] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime


def latest_by_scan(records: list[dict]) -> dict[str, dict]:
    """scan -> its newest record, predicted or skipped (a scan that a later run skipped is skipped now)."""
    return {r["scan"]: r for r in records}           # records oldest first: a later one replaces an earlier one


def done_scans(out: str | Path, sources: list[ScanSource]) -> set[str]:
    """The scans of ``sources`` whose newest record in ``out`` is a prediction from the same, unchanged file."""
    wanted = {s.scan_id: s for s in sources}
    done = set()
    for r in latest_by_scan(read_records(out)).values():
        src = wanted.get(r["scan"])
        if src is None or "windows" not in r or r.get("source") != _resolved(src):
            continue
        if _source_stat(src.path) == (r.get("source_bytes"), r.get("source_mtime")):
            done.add(r["scan"])
    return done


class PartWriter:
    """Appends scan records to one part file, each line flushed and fsynced before the next."""

    def __init__(self, out: str | Path, part: tuple[int, int]) -> None:
        self.path = part_path(out, part)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        interrupted = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                interrupted = f.read(1) != b"\n"
        self.file = self.path.open("a")
        if interrupted:
            self.file.write("\n")        # a line cut short: the next record starts on a line of its own

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def predicted(self, src: ScanSource, frames: int, resampled: bool, windows: list[tuple[int, float]]) -> None:
        """Record a predicted scan: its source file (size, mtime) and each window's (start, model output)."""
        stat = _source_stat(src.path) or (None, None)
        self._write({"scan": src.scan_id, "subject": src.subject, "source": _resolved(src), "source_bytes": stat[0],
                     "source_mtime": stat[1], "frames": frames, "resampled": resampled,
                     "windows": [[int(s), float(o)] for s, o in windows]})

    def skipped(self, src: ScanSource, kind: str, reason: str) -> None:
        """Record a scan that could not be predicted, with the reason."""
        self._write({"scan": src.scan_id, "subject": src.subject, "source": _resolved(src), "kind": kind,
                     "reason": reason})

    def close(self) -> None:
        """Close the part file."""
        self.file.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
