"""submitit executors from the ``cluster`` config: SLURM, local processes, or in-process (debug)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import submitit

from brainmt.config import ClusterConfig


class LaunchError(ValueError):
    """A job cannot be submitted as asked; the message says why and how to fix it."""


def resolve_cluster(requested: str) -> str:
    """``auto`` -> ``slurm`` when sbatch is on PATH, else ``local``."""
    if requested != "auto":
        if requested == "slurm" and shutil.which("sbatch") is None:
            raise LaunchError("--cluster slurm but sbatch is not on PATH; run on a login node or use --cluster local")
        return requested
    return "slurm" if shutil.which("sbatch") else "local"


def tasks_per_node(c: ClusterConfig) -> int:
    """Tasks a node: one per GPU unless set (CPU-only nodes: one, or cluster.tasks_per_node)."""
    return c.tasks_per_node or max(1, c.gpus_per_node)


def slurm_parameters(c: ClusterConfig, job_name: str) -> dict:
    """SlurmExecutor parameters for the cluster config (partition, nodes, tasks, GPUs, time, account, ...)."""
    params: dict = {
        "job_name": job_name, "partition": c.partition, "nodes": c.nodes, "ntasks_per_node": tasks_per_node(c),
        "cpus_per_task": c.cpus_per_task, "time": c.time_min, "signal_delay_s": c.signal_delay_s,
        "setup": list(c.setup), "stderr_to_stdout": False,
    }
    if c.gpus_per_node > 0:
        if c.gpu_request == "gres":
            params["gres"] = f"gpu:{c.gpus_per_node}"
        else:
            params["gpus_per_node"] = c.gpus_per_node
    for key in ("account", "qos", "constraint"):
        if getattr(c, key):
            params[key] = getattr(c, key)
    if c.mem_gb:
        params["mem"] = f"{int(c.mem_gb)}GB"
    return {k: v for k, v in params.items() if v is not None}


def make_executor(c: ClusterConfig, folder: Path, job_name: str) -> tuple[submitit.Executor, str]:
    """The executor for ``c.cluster`` (auto: slurm if sbatch exists, else local) and the cluster chosen."""
    cluster = resolve_cluster(c.cluster)
    folder = Path(folder) / "%j"
    if cluster == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=c.max_requeues)
        ex.update_parameters(**slurm_parameters(c, job_name))
    elif cluster == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=c.max_requeues)
        ex.update_parameters(timeout_min=c.time_min, tasks_per_node=tasks_per_node(c) * c.nodes,
                             cpus_per_task=c.cpus_per_task, gpus_per_node=c.gpus_per_node)
    else:
        ex = submitit.DebugExecutor(folder=folder)
    return ex, cluster


def sbatch_preview(c: ClusterConfig, folder: Path, job_name: str) -> str:
    """The sbatch script a SLURM submission would use (for --dry-run); submits nothing."""
    ex = submitit.SlurmExecutor(folder=Path(folder) / "%j", max_num_timeout=c.max_requeues)
    ex.update_parameters(**slurm_parameters(c, job_name))
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")  # noqa: SLF001


@contextlib.contextmanager
def clean_slurm_env():
    """Hide the SLURM_* / SUBMITIT_* variables of an enclosing job from a submission (SLURM_CONF stays: it is
    the client's configuration, not the job's)."""
    keep = {"SLURM_CONF"}
    hidden = {k: os.environ.pop(k) for k in list(os.environ)
              if (k.startswith("SLURM_") or k.startswith("SUBMITIT_")) and k not in keep}
    try:
        yield
    finally:
        os.environ.update(hidden)


def check_submittable(c: ClusterConfig, folder: Path, job_name: str) -> None:
    """``sbatch --test-only`` the job's script: an unknown partition or an impossible request fails here, unsubmitted."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(sbatch_preview(c, folder, job_name))
    try:
        proc = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise LaunchError(f"the scheduler refused the job (sbatch --test-only): {proc.stderr.strip() or proc.stdout.strip()}")


def shard_dir(shards: str | None) -> str:
    """The absolute shard directory a job will read; LaunchError when it is not a directory."""
    if not shards or not Path(shards).is_dir():
        raise LaunchError(f"shard directory not found: {shards!r} (pass --shards DIR; make one with brainmt shard)")
    return str(Path(shards).resolve())


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.replaced-<time>`` (--force: keep the other run or sweep, out of the way)."""
    aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    return aside


def checked_executor(c: ClusterConfig, folder: Path, job_name: str) -> tuple[submitit.Executor, str]:
    """:func:`make_executor`, with the SLURM script checked by ``sbatch --test-only`` before anything is queued."""
    executor, cluster = make_executor(c, folder, job_name)
    if cluster == "slurm":
        check_submittable(c, folder, job_name)
    return executor, cluster


def record_submission(folder: Path, **fields: object) -> None:
    """Append the submission (job ids, cluster, time) to ``folder/jobs.jsonl``: what ``--status`` and people read."""
    from brainmt.train.runlog import JsonlSink

    JsonlSink(Path(folder) / "jobs.jsonl").log({**fields, "submitted": time.time()})


def wait_for_tasks(parts: list, describe: Callable[[dict], str]) -> None:
    """Wait for local array tasks in order, printing ``describe(result)`` for each; a task that failed as a whole is
    reported with the last line of its error (its items then show as missing in the merge)."""
    for part in parts:
        try:
            result = part.result()
        except Exception as exc:
            print(f"task {part.job_id} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}",
                  file=sys.stderr, flush=True)
            continue
        print(f"task {part.job_id}: {describe(result)}", flush=True)
