"""Helpers for the tests that drive the session's local SLURM (the ``slurm`` fixture in conftest.py)."""

from __future__ import annotations

import subprocess
import time


def queued(job_id: str) -> bool:
    """Whether ``squeue`` still lists the job (pending, running or completing)."""
    return bool(subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=60).stdout.strip())


def scancel_and_check_gone(job_id: str, leave_s: float = 120, requeue_s: float = 10) -> None:
    """A plain ``scancel`` of the job; it must leave the queue within ``leave_s`` and not be back ``requeue_s``
    later (a job that requeued itself would be)."""
    subprocess.run(["scancel", job_id], check=True, timeout=60)
    deadline = time.time() + leave_s
    while queued(job_id):
        assert time.time() < deadline, f"job {job_id} is still queued or running after scancel"
        time.sleep(1)
    time.sleep(requeue_s)
    assert not queued(job_id), f"job {job_id} came back after scancel (requeued)"
