"""Signal handlers that are put in place for a while and then given back (main thread only, as Python requires),
and whether a SLURM job's SIGTERM was a ``scancel``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

Handler = Callable[[int, Any], None]
# the exit status of a command that stopped at a safe point on a signal (SIGTERM, SIGUSR2, Ctrl-C) and can be resumed
INTERRUPTED_EXIT = 3


def install(signals: Iterable[int], handler: Handler) -> dict[int, Any]:
    """Route ``signals`` to ``handler``; returns the previous handlers (none changed outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers ``install`` returned."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextmanager
def handled(signals: Iterable[int], handler: Handler) -> Iterator[None]:
    """``signals`` go to ``handler`` inside the block; the previous handlers come back after it."""
    previous = install(signals, handler)
    try:
        yield
    finally:
        restore(previous)


def cancelled(job_id: str | None = None) -> bool:
    """Whether the job is ending because someone cancelled it (``scancel``): SLURM shows it ``COMPLETING`` (or
    ``CANCELLED``) with ``Reason=None`` and no ``PreemptTime``, where a preemption sets ``PreemptTime`` and a time
    limit ``Reason=TimeLimit`` (read from a real SLURM 22.05). False when it cannot be asked (no SLURM job,
    ``scontrol`` missing or failing): a stop is then treated as a preemption. ``job_id``: this job's by default."""
    job_id = job_id if job_id is not None else os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:                                          # well within SLURM's KillWait (30 s by default)
        shown = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    fields: dict[str, str] = {}
    record = (shown.stdout.splitlines() or [""])[0]          # one line a record; the job's own comes first
    for key, value in re.findall(r"(?:^|\s)(JobState|Reason|PreemptTime)=(\S+)", record):
        fields.setdefault(key, value)             # the first: a later WorkDir= or Command= may hold spaces
    return (shown.returncode == 0 and fields.get("JobState") in ("COMPLETING", "CANCELLED")
            and fields.get("Reason") == "None" and fields.get("PreemptTime", "None") == "None")
