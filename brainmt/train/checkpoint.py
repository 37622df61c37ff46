"""Checkpoints: atomic writes (temporary file, fsync, rename), keep the last k and the best, resume the latest."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

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


def save_checkpoint(directory: Path, step: int, state: dict, keep_last: int, best_step: int | None) -> Path:
    """Write ``state`` atomically as step-<step>.pt, then delete all but the last ``keep_last`` and the best."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    tmp = directory / f".tmp-{final.name}.{os.getpid()}"
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    keep = {s for s, _ in list_checkpoints(directory)[-keep_last:]} | ({best_step} if best_step is not None else set())
    for s, p in list_checkpoints(directory):
        if s not in keep:
            p.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary pickles)."""
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


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """``best`` | ``last`` | a path -> the checkpoint file."""
    directory = run_dir / "checkpoints"
    if which not in ("best", "last"):
        path = Path(which)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        return path
    found = list_checkpoints(directory)
    if not found:
        raise CheckpointError(f"{directory}: no checkpoints; has this run trained?")
    if which == "last":
        return found[-1][1]
    best = load_checkpoint(found[-1][1]).get("best_step")
    if best is None:
        log.warning("no validation has run yet: using the last checkpoint as the best")
        return found[-1][1]
    path = checkpoint_path(directory, best)
    if not path.exists():
        raise CheckpointError(f"{path}: the best checkpoint (step {best}) is missing")
    return path
