"""``python sweeps/tune.py``: a Ray Tune sweep (ASHA) as one submitit job on SLURM (or locally), resumable."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

from brainmt.config import ConfigError, config_to_dict, load_config, save_config
from brainmt.launch.cli import add_cluster_arguments, apply_cluster_arguments, follow_log


def parser() -> argparse.ArgumentParser:
    """Arguments of sweeps/tune.py."""
    p = argparse.ArgumentParser(prog="sweeps/tune.py", description=__doc__)
    p.add_argument("--sweep", help="sweep file: a run config with a 'sweep:' section (see sweeps/*.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the sweep in RUN_DIR (its saved sweep.yaml)")
    p.add_argument("--run-dir", help="sweep directory (default runs/sweep-<name>); an existing one is continued")
    p.add_argument("--profile", help="cluster profile YAML (a 'cluster:' section)")
    p.add_argument("--shards", help="shard directory (default: data.shards of the sweep file)")
    add_cluster_arguments(p)   # --nodes: nodes for Ray (one task each); --cpus-per-task: all go to Ray
    p.add_argument("--job-name")
    p.add_argument("--num-samples", type=int, help="sweep.num_samples")
    p.add_argument("--max-concurrent", type=int, help="sweep.max_concurrent_trials")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, the config and the search space")
    p.add_argument("--wait", action="store_true", help="follow the job's log and print the results table")
    p.add_argument("--force", action="store_true", help="the run directory holds a different sweep: move it aside")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _comparable(cfg_dict: dict) -> dict:
    """What must not change when a sweep is continued (everything but the job's resources)."""
    return {k: v for k, v in cfg_dict.items() if k != "cluster"}


def resolve(args: argparse.Namespace) -> tuple[dict, Path, list[str]]:
    """The checked sweep config (as a dict), its directory and the swept keys; handles --resume and --force."""
    from brainmt.launch.slurm import LaunchError, move_aside, shard_dir
    from brainmt.tune.space import check_sweep

    if bool(args.sweep) == bool(args.resume):
        raise LaunchError("give one of --sweep FILE (a new or continued sweep) or --resume RUN_DIR")
    if args.resume:
        sweep_dir = Path(args.resume).resolve()
        source = sweep_dir / "sweep.yaml"
        if not source.is_file():
            raise LaunchError(f"{source}: not found; is {sweep_dir} a sweep directory (made by sweeps/tune.py)?")
        if args.overrides:
            raise LaunchError("--resume continues the saved sweep as it is: key=value overrides are not allowed")
        cfg = load_config([source] + ([args.profile] if args.profile else []))
        changed = [flag for flag, given, saved in (("--num-samples", args.num_samples, cfg.sweep.num_samples),
                                                   ("--max-concurrent", args.max_concurrent, cfg.sweep.max_concurrent_trials))
                   if given is not None and given != saved]
        if changed:     # Tune restores its own sample count and searcher: the sweep would wait for trials never made
            raise LaunchError(f"--resume continues the saved sweep as it is ({source}): {' and '.join(changed)} cannot "
                              "change it; start a new sweep (--sweep FILE --run-dir NEW) for another count")
    else:
        source = Path(args.sweep)
        cfg = load_config([source] + ([args.profile] if args.profile else []), args.overrides)
        sweep_dir = Path(args.run_dir or f"runs/sweep-{cfg.name}").resolve()
    apply_cluster_arguments(cfg.cluster, args)
    if args.num_samples is not None:
        cfg.sweep.num_samples = args.num_samples
    if args.max_concurrent is not None:
        cfg.sweep.max_concurrent_trials = args.max_concurrent
    cfg.data.shards = shard_dir(args.shards or cfg.data.shards)
    space = check_sweep(cfg, str(source))
    check_sweep_data(cfg, space)
    cfg_dict = config_to_dict(cfg)
    saved = sweep_dir / "sweep.yaml"
    if saved.is_file() and not args.resume:
        before = config_to_dict(load_config(saved))
        if _comparable(before) != _comparable(cfg_dict):
            if not args.force:
                raise LaunchError(f"{sweep_dir} holds a different sweep ({saved} differs from {source}); continue it "
                                  f"with --resume {sweep_dir}, pick another --run-dir, or pass --force to move it aside")
            print(f"--force: moved the other sweep to {move_aside(sweep_dir)}", flush=True)
    return cfg_dict, sweep_dir, list(space)


def check_sweep_data(cfg, space: dict) -> None:
    """The checks a trial's training makes before step 0, before the queue: the splits, the target and task, and
    windows of the longest data.num_frames the space can draw."""
    from brainmt.data.loader import ShardSet
    from brainmt.train.run_config import check_data, resolve

    shards = ShardSet(cfg.data.shards)
    frames = [cfg.data.num_frames]
    if "data.num_frames" in space:
        kind, values = space["data.num_frames"]
        frames = [max(values) if kind in ("choice", "grid") else int(values[1]) - (kind == "randint")]
    for n in frames:
        trial = copy.deepcopy(cfg)
        trial.data.num_frames = n
        check_data(resolve(trial, shards), shards, ("train", "validation"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of sweeps/tune.py; exit status 0 when the sweep finished, 3 when it was interrupted."""
    import submitit

    from brainmt.config import config_from_dict
    from brainmt.data.shards import ShardError
    from brainmt.launch.slurm import LaunchError, checked_executor, clean_slurm_env, record_submission, sbatch_preview
    from brainmt.tune.sweep import SweepTask

    args = parser().parse_args(argv)
    try:
        cfg_dict, sweep_dir, keys = resolve(args)
        cfg = config_from_dict(cfg_dict, "sweep")
        job_cluster = copy.deepcopy(cfg.cluster)
        job_cluster.tasks_per_node = 1                    # one task a node: Ray's head or a worker
        job_name = args.job_name or f"brainmt-sweep-{cfg.name}"
        if args.dry_run:
            print(sbatch_preview(job_cluster, sweep_dir / "slurm", job_name))
            print("# resolved sweep config\n" + yaml.safe_dump(cfg_dict, sort_keys=False))
            print(f"# {len(keys)} swept keys: {', '.join(keys)}; {cfg.sweep.num_samples} sample(s) of the space")
            return 0
        save_config(cfg, sweep_dir / "sweep.yaml")
        executor, cluster = checked_executor(job_cluster, sweep_dir / "slurm", job_name)
        with clean_slurm_env():
            job = executor.submit(SweepTask(), cfg_dict, str(sweep_dir))
    except (ConfigError, LaunchError, ShardError) as exc:
        print(f"sweeps/tune.py: error: {exc}", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as exc:
        print(f"sweeps/tune.py: the scheduler refused the job: {exc}", file=sys.stderr)
        return 2
    print(f"submitted sweep job {job.job_id} ({cluster}); sweep directory {sweep_dir}\n"
          f"  job log: {sweep_dir / 'slurm' / str(job.job_id)}/{job.job_id}_0_log.out", flush=True)
    record_submission(sweep_dir / "slurm", job_id=job.job_id, cluster=cluster)
    if not (args.wait or cluster == "debug"):
        return 0
    if cluster != "debug":   # the debug executor runs the job inside result()
        follow_log(Path(job.paths.stdout), job)
    try:
        summary = job.results()[0] if hasattr(job, "results") else job.result()   # task 0: the driver
    except (RuntimeError, submitit.core.utils.UncompletedJobError) as exc:   # FailedJobError is a RuntimeError
        print(f"sweeps/tune.py: the sweep job {job.job_id} failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:                      # a second Ctrl-C: the driver was ended without waiting
        print(f"sweeps/tune.py: interrupted ({exc}); continue with: python sweeps/tune.py --resume {sweep_dir}",
              file=sys.stderr)
        return 3
    print(f"sweep job {job.job_id}: {summary['status']}, {summary['trials']} trials; results {summary['results']}; "
          f"best config {summary['best_config']}", flush=True)
    return 0 if summary["status"] == "finished" else 3


if __name__ == "__main__":
    sys.exit(main())
