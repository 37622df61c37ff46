"""Checkpoints: atomic writes (temporary file, fsync, rename), keep the last k and the best, resume the latest.

Each ``step-N.pt`` has a ``step-N.json`` beside it with the file's SHA-256 (and the validation metric of an
evaluation checkpoint): a checkpoint whose bytes changed after it was written is refused on load, and a damaged
best falls back to the next-best intact one.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from brainmt.fileio import atomic_write_json, replacing, sha256_file

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def checkpoint_path(directory: Path, step: int) -> Path:
    """The file of the checkpoint at ``step``."""
    return directory / f"step-{step:09d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place) as (step, path), oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP.match(p.name))]
    return sorted(found)


def record_path(path: Path) -> Path:
    """The JSON record beside a checkpoint file (its SHA-256 and validation metric)."""
    return path.with_suffix(".json")


def recorded_sha256(path: Path) -> str | None:
    """The first 16 hex digits of the SHA-256 recorded beside a checkpoint when it was written (None: no record):
    which model, where another run's step-N.pt has the same name."""
    try:
        return json.loads(record_path(Path(path)).read_text())["sha256"][:16]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def save_checkpoint(directory: Path, step: int, state: dict, keep_last: int, best_step: int | None,
                    metric: dict | None = None) -> Path:
    """Write ``state`` atomically as step-<step>.pt with its record (SHA-256, ``metric`` such as {"name", "mode",
    "value"}), then delete all but the last ``keep_last`` up to ``step`` and the best. Files of later steps (an
    unreadable one the run resumed before) are left alone: they must not count among the last, or pruning would
    delete the run's new checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    with replacing(final) as tmp, tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_json(record_path(final), {"sha256": sha256_file(final), "metric": metric})
    written = [(s, p) for s, p in list_checkpoints(directory) if s <= step]
    keep = {s for s, _ in written[-keep_last:]} | ({best_step} if best_step is not None else set())
    for s, p in written:
        if s not in keep:
            p.unlink(missing_ok=True)
            record_path(p).unlink(missing_ok=True)
    return final


def check_integrity(path: Path) -> None:
    """CheckpointError when the file's SHA-256 differs from the one recorded when it was written (no record: no
    check, as for checkpoints of older versions or copied without it)."""
    record = record_path(path)
    if not record.exists() or not path.exists():
        return
    try:
        expected = json.loads(record.read_text()).get("sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"{path}: its record {record.name} is unreadable (cut short?)") from None
    actual = sha256_file(path)
    if expected and actual != expected:
        raise CheckpointError(f"{path}: damaged: its SHA-256 {actual[:16]}... differs from {expected[:16]}... "
                              f"recorded in {record.name} when it was written")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary pickles), after checking its SHA-256."""
    check_integrity(Path(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


def latest_checkpoint(directory: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; unreadable ones are reported and passed over."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            log.warning("%s; trying an older checkpoint", exc)
    return None


def set_aside_newer(directory: Path, step: int) -> list[Path]:
    """Rename the checkpoints after ``step`` (unreadable ones a run resumes before) and their records to
    ``*.damaged``: kept, but no longer among the checkpoints that pruning counts or ``last`` picks."""
    moved = []
    for s, path in list_checkpoints(directory):
        if s > step:
            for p in (path, record_path(path)):
                if p.exists():
                    p.replace(p.with_name(p.name + ".damaged"))
            moved.append(path)
    return moved


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """``best`` | ``last`` | a path -> the checkpoint file; a damaged one is passed over with a warning (``best``:
    for the next-best intact checkpoint by its recorded metric, else the newest intact one)."""
    directory = run_dir / "checkpoints"
    if which not in ("best", "last"):
        path = Path(which)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        check_integrity(path)
        return path
    intact = []
    for step, path in list_checkpoints(directory):
        try:
            check_integrity(path)
            intact.append((step, path))
        except CheckpointError as exc:
            log.warning("%s; passed over", exc)
    if not intact:
        damaged = len(list_checkpoints(directory))
        raise CheckpointError(f"{directory}: no checkpoints; has this run trained?" if not damaged else
                              f"{directory}: no intact checkpoints ({damaged} damaged)")
    if which == "last":
        return intact[-1][1]
    best = load_checkpoint(intact[-1][1]).get("best_step")
    if best is None:
        log.warning("no validation has run yet: using the last checkpoint as the best")
        return intact[-1][1]
    path = checkpoint_path(directory, best)
    if (best, path) in intact:
        return path
    fallback = _next_best(intact) or intact[-1][1]
    log.warning("the best checkpoint (step %d) is missing or damaged: using %s instead", best, fallback.name)
    return fallback


def _next_best(intact: list[tuple[int, Path]]) -> Path | None:
    """The intact evaluation checkpoint with the best recorded metric (ties: the earlier)."""
    scored = []
    for step, path in intact:
        record = record_path(path)
        metric = json.loads(record.read_text()).get("metric") if record.exists() else None
        if metric and metric.get("value") is not None:
            sign = -1.0 if metric.get("mode") == "max" else 1.0
            scored.append((sign * metric["value"], step, path))
    return min(scored)[2] if scored else None
