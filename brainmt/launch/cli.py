"""``python jobs/launch.py``: submit one training job through submitit (SLURM, local or in-process); each of its
tasks runs the training main (:class:`~brainmt.launch.job.TrainTask`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from brainmt.config import SPLIT_NAMES, ClusterConfig, Config, ConfigError, config_choices, config_to_dict, load_config


def parse_part(text: str) -> tuple[int, int]:
    """``--part i/n`` (one slice of an array job: brainmt shard, brainmt predict) -> (i, n), 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part must look like i/n (e.g. 0/8), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part {text}: need 0 <= i < n")
    return i, n


OPTION_KEYS = {  # command-line option -> cluster config key
    "partition": "partition", "nodes": "nodes", "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb", "time": "time_min", "account": "account", "qos": "qos",
    "constraint": "constraint", "max_requeues": "max_requeues", "cluster": "cluster", "gpu_request": "gpu_request",
    "container": "container",
}


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The scheduler options every launcher shares (cluster.* keys): jobs/launch.py, jobs/shard.py, jobs/analyze.py,
    sweeps/tune.py."""
    p.add_argument("--cluster", choices=config_choices(ClusterConfig, "cluster"),
                   help="auto: SLURM when sbatch is found, else local processes; debug: in this process")
    p.add_argument("--partition")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--gpu-request", choices=config_choices(ClusterConfig, "gpu_request"),
                   help="how the site asks for GPUs")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem-gb", type=float)
    p.add_argument("--time", type=int, help="time limit in minutes (the job is requeued and resumes after it)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--max-requeues", type=int)


def _name_options(message: str, given: dict[str, str]) -> str:
    """``message`` (``key: must be ...; ...``) with each failing key followed by the option that set it."""
    parts = []
    for part in message.split("; "):
        keys = part.split(":", 1)[0].strip().split("/")   # "analysis.baseline_scans/top_regions": two keys
        section = keys[0].rsplit(".", 1)[0] + "." if "." in keys[0] else ""
        full = [keys[0]] + [section + k for k in keys[1:]]
        flags = [given[k] for k in full if k in given]
        parts.append(part + (f" (given as {', '.join(flags)})" if flags else ""))
    return "; ".join(parts)


def apply_options(target: Any, table: dict[str, str], args: argparse.Namespace, check: Callable[[Any], None],
                  prefix: str = "") -> None:
    """Set each option given in ``args`` (``table``: option dest -> key of ``target``) through ``set_value``, then
    run ``check(target)``; a ConfigError names the command-line options behind the failing keys.

    ``prefix`` is what the checks put before the keys (``"cluster."`` when ``target`` is a ClusterConfig)."""
    from brainmt.config import set_value

    given = {}
    for dest, key in table.items():
        value = getattr(args, dest, None)
        if value is not None:
            flag = f"--{dest.replace('_', '-')}"
            set_value(target, key, value, flag)
            given[prefix + key] = f"{flag} {value}"
    try:
        check(target)
    except ConfigError as exc:
        raise ConfigError(_name_options(str(exc), given)) from None


def apply_cluster_arguments(cluster: ClusterConfig, args: argparse.Namespace) -> None:
    """Copy the scheduler options given on the command line into ``cluster``, each checked like its config key."""
    from brainmt.config import validate_cluster

    apply_options(cluster, OPTION_KEYS, args, validate_cluster, "cluster.")


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


def check_run_dir(run_dir: Path, cfg: Config, force: bool, dry_run: bool) -> None:
    """A run directory of another configuration is refused (TrainingError), or moved aside with ``--force``; a run
    to resume must keep its global batch on this job's number of tasks."""
    from brainmt.launch.slurm import move_aside, tasks_per_node
    from brainmt.train.checkpoint import latest_checkpoint
    from brainmt.train.run_config import TrainingError, check_global_batch, check_resume_config

    try:
        check_resume_config(run_dir, cfg)
    except TrainingError:
        if not force:
            raise
        if dry_run:
            print(f"# --force: the run directory {run_dir} (another configuration) would be moved aside")
        else:
            print(f"--force: moved the run directory of the other configuration to {move_aside(run_dir)}", flush=True)
        return
    found = latest_checkpoint(run_dir / "checkpoints")
    if found:       # --cluster debug runs one task in this process
        ranks = 1 if cfg.cluster.cluster == "debug" else cfg.cluster.nodes * tasks_per_node(cfg.cluster)
        check_global_batch(*found, cfg, ranks)


def main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/launch.py."""
    import submitit

    from brainmt.data.loader import ShardSet
    from brainmt.data.shards import ShardError
    from brainmt.launch.job import TrainTask
    from brainmt.launch.slurm import LaunchError, checked_executor, clean_slurm_env, record_submission, sbatch_preview, shard_dir
    from brainmt.train.run_config import TrainingError, check_data, resolve

    args = parser().parse_args(argv)
    if args.status:
        return show_status(Path(args.status))
    try:
        layers = list(args.config or ["paper"]) + ([args.profile] if args.profile else [])
        cfg = load_config(layers, args.overrides)
        apply_cluster_arguments(cfg.cluster, args)
        run_dir = Path(args.run_dir or f"runs/{cfg.name}").resolve()
        shards = ShardSet(shard_dir(args.shards or cfg.data.shards))
        cfg = resolve(cfg, shards)                      # as the job will: compare alike
        check_data(cfg, shards, SPLIT_NAMES)   # what the job would find after the queue
        if cfg.train.device == "cpu" and cfg.cluster.gpus_per_node > 0:
            print(f"warning: train.device=cpu, but {cfg.cluster.gpus_per_node} GPU(s) a node are requested",
                  file=sys.stderr)
        job_name = args.job_name or f"brainmt-{cfg.name}"
        check_run_dir(run_dir, cfg, args.force, args.dry_run)
        if args.dry_run:
            print(sbatch_preview(cfg.cluster, run_dir / "slurm", job_name))
            print("# resolved config\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            return 0
        executor, cluster = checked_executor(cfg.cluster, run_dir / "slurm", job_name)
        if cluster == "local" and args.cluster is None and cfg.cluster.cluster == "auto":
            print("no SLURM here (sbatch not found): running with submitit's local executor", flush=True)
        with clean_slurm_env():   # a submission from inside a SLURM job must not inherit its SLURM_*
            job = executor.submit(TrainTask(), config_to_dict(cfg), cfg.data.shards, str(run_dir))
    except (ConfigError, LaunchError, TrainingError, ShardError) as exc:
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


if __name__ == "__main__":
    sys.exit(main())
