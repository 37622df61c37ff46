"""Metrics sinks (one interface: jsonl file, Ray Tune reporter, ...) and per-rank log files."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Protocol


class MetricsSink(Protocol):
    """Receives one dict of metrics at a time (train records every log interval, validation records)."""

    def log(self, record: dict) -> None:
        """Record ``record``."""


class JsonlSink:
    """Appends each record as one JSON line, flushed at once (the file survives preemption)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        """Append ``record``."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class MultiSink:
    """Sends every record to several sinks."""

    def __init__(self, *sinks: MetricsSink) -> None:
        self.sinks = sinks

    def log(self, record: dict) -> None:
        """Forward ``record``."""
        for s in self.sinks:
            s.log(record)


def setup_run_logging(run_dir: Path, rank: int) -> Path:
    """Log 'brainmt' to ``logs/rank-<r>.log`` on every rank and to stdout on rank 0; returns the file."""
    path = Path(run_dir) / "logs" / f"rank-{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("brainmt")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_brainmt_run", False):
            logger.removeHandler(h)
            h.close()
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if rank == 0 and not any(isinstance(h, logging.StreamHandler) for h in logging.getLogger().handlers):
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(fmt)
        h._brainmt_run = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    return path
