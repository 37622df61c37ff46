"""``python jobs/launch.py``: submit the training main as one submitit job (SLURM, local or in-process)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from brainmt.config import ClusterConfig, ConfigError, config_to_dict, load_config

OPTION_KEYS = {  # command-line option -> cluster config key
    "partition": "partition", "nodes": "nodes", "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb", "time": "time_min", "account": "account", "qos": "qos",
    "constraint": "constraint", "max_requeues": "max_requeues", "cluster": "cluster", "gpu_request": "gpu_request",
    "container": "container",
}


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The scheduler options that jobs/launch.py, sweeps/tune.py and jobs/analyze.py share (cluster.* keys)."""
    p.add_argument("--cluster", choices=["auto", "slurm", "local", "debug"])
    p.add_argument("--partition")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--gpu-request", choices=["gpus_per_node", "gres"], help="how the site asks for GPUs")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem-gb", type=float)
    p.add_argument("--time", type=int, help="time limit in minutes (the job is requeued and resumes after it)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--max-requeues", type=int)


def apply_cluster_arguments(cluster: ClusterConfig, args: argparse.Namespace) -> None:
    """Copy the scheduler options given on the command line into ``cluster``."""
    for opt, key in OPTION_KEYS.items():
        if getattr(args, opt, None) is not None:
            setattr(cluster, key, getattr(args, opt))


def parser() -> argparse.ArgumentParser:
    """Arguments of jobs/launch.py."""
    p = argparse.ArgumentParser(prog="jobs/launch.py", description=__doc__)
    p.add_argument("--config", action="append", help="run config (YAML or built-in name); repeat to layer")
    p.add_argument("--profile", help="cluster profile YAML (a 'cluster:' section: partition, account, setup, ...)")
    p.add_argument("--run-dir", help="run directory (default runs/<config name>); an existing one is resumed")
    p.add_argument("--shards", help="shard directory (default: data.shards of the config)")
    add_cluster_arguments(p)
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU")
    p.add_argument("--job-name")
    p.add_argument("--container", metavar="IMAGE", help="train inside this Apptainer image (binds: cluster.binds)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the resolved config; submit nothing")
    p.add_argument("--wait", action="store_true", help="follow the job (rank 0's log) and print its evaluation")
    p.add_argument("--force", action="store_true",
                   help="the run directory was started with another configuration: move it aside and start anew")
    p.add_argument("--status", metavar="RUN_DIR", help="show the run's last job, its state, requeues and last metrics")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _stream(path: Path, position: int) -> int:
    """Print what was appended to ``path`` since ``position``; return the new position."""
    if not path.exists():
        return position
    with path.open() as f:
        f.seek(position)
        text = f.read()
    if text:
        print(text, end="", flush=True)
    return position + len(text.encode())


def follow_log(path: Path, job) -> None:
    """Print ``path`` as it grows until the submitit ``job`` is done."""
    position = 0
    while not job.done():
        position = _stream(path, position)
        time.sleep(2)
    _stream(path, position)


def _scheduler_state(job_id: str) -> tuple[str, str]:
    """(state, restarts) of a SLURM job from scontrol, else sacct; ('unknown', '?') without SLURM."""
    import re
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
        state = re.search(r"JobState=(\S+)", out)
        restarts = re.search(r"Restarts=(\d+)", out)
        if state:
            return state.group(1), restarts.group(1) if restarts else "?"
        out = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                             timeout=30).stdout.split()
        return (out[-1] if out else "unknown"), "?"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", "?"


def show_status(run_dir: Path) -> int:
    """Print the run's last submitted job, its scheduler state and requeues, and the last metrics."""
    jobs_file = run_dir / "slurm" / "jobs.jsonl"
    if not jobs_file.exists():
        print(f"jobs/launch.py: error: {jobs_file}: no job was submitted for this run directory", file=sys.stderr)
        return 2
    last = json.loads(jobs_file.read_text().splitlines()[-1])
    state, restarts = _scheduler_state(last["job_id"]) if last["cluster"] == "slurm" else ("(local)", "?")
    print(f"run {run_dir}: job {last['job_id']} ({last['cluster']}) state {state}, requeues {restarts}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = next((r for r in reversed(records) if "train_loss" in r), None)
        val = next((r for r in reversed(records) if "val_loss" in r), None)
        for r in (train, val):
            if r:
                print("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if (run_dir / "metrics.json").exists():
        ev = json.loads((run_dir / "metrics.json").read_text())
        print("  test: " + "  ".join(f"{k} {v['value']:.4f}" for k, v in ev.items() if isinstance(v, dict)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/launch.py."""
    import submitit

    from brainmt.launch.job import TrainJob
    from brainmt.launch.slurm import (
        LaunchError,
        checked_executor,
        clean_slurm_env,
        move_aside,
        record_submission,
        sbatch_preview,
        shard_dir,
    )
    from brainmt.train.loop import TrainingError, check_resume_config

    args = parser().parse_args(argv)
    if args.status:
        return show_status(Path(args.status))
    try:
        layers = list(args.config or ["paper"]) + ([args.profile] if args.profile else [])
        cfg = load_config(layers, args.overrides)
        apply_cluster_arguments(cfg.cluster, args)
        run_dir = Path(args.run_dir or f"runs/{cfg.name}").resolve()
        cfg.data.shards = shard_dir(args.shards or cfg.data.shards)
        job_name = args.job_name or f"brainmt-{cfg.name}"
        if args.dry_run:
            print(sbatch_preview(cfg.cluster, run_dir / "slurm", job_name))
            print("# resolved config\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            return 0
        try:
            check_resume_config(run_dir, cfg)
        except TrainingError:
            if not args.force:
                raise
            print(f"--force: moved the run directory of the other configuration to {move_aside(run_dir)}", flush=True)
        executor, cluster = checked_executor(cfg.cluster, run_dir / "slurm", job_name)
        if cluster == "local" and args.cluster is None and cfg.cluster.cluster == "auto":
            print("no SLURM here (sbatch not found): running with submitit's local executor", flush=True)
        with clean_slurm_env():   # a submission from inside a SLURM job must not inherit its SLURM_*
            job = executor.submit(TrainJob(), config_to_dict(cfg), cfg.data.shards, str(run_dir))
    except (ConfigError, LaunchError, TrainingError) as exc:
        print(f"jobs/launch.py: error: {exc}", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as exc:
        print(f"jobs/launch.py: the scheduler refused the job: {exc}", file=sys.stderr)
        return 2
    logs = run_dir / "slurm" / str(job.job_id)
    print(f"submitted job {job.job_id} ({cluster}); run directory {run_dir}\n"
          f"  job logs: {logs}/{job.job_id}_<task>_log.out|err\n  training logs: {run_dir / 'logs'}", flush=True)
    record_submission(run_dir / "slurm", job_id=job.job_id, cluster=cluster)
    if args.wait:
        if cluster != "debug":   # the debug executor runs the job inside result()
            follow_log(run_dir / "logs" / "rank-0.log", job)
        results = job.results() if hasattr(job, "results") else [job.result()]
        result = results[0]
        ev = result.get("evaluation") or {}
        print(f"job {job.job_id}: training {result['status']} at step {result.get('step', '?')}; "
              f"test metrics: {json.dumps({k: v['value'] for k, v in ev.items() if isinstance(v, dict)})}")
    return 0
