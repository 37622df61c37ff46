"""``python jobs/predict.py``: ``brainmt predict`` as a SLURM job array over the scans, then a merge job (or locally).

Task i of n predicts slice i of the scans (``brainmt predict --part i/n --no-merge``) into its own part file
(``OUT/parts/part-<i>-of-<n>.jsonl``; one GPU a task unless ``--gpus-per-node 0``); the merge job runs after the
whole array has ended (``afterany``) and writes ``predictions.csv``, ``windows.csv``, ``skipped.csv`` and
``summary.json`` from every part file. A requeued task, or a re-run of the whole command, skips the scans already
predicted.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import submitit

from brainmt.config import ClusterConfig, ConfigError, load_config
from brainmt.launch.cli import add_cluster_arguments, apply_cluster_arguments
from brainmt.predict.cli import add_predict_options, expected_errors, request_from_args


def parser() -> argparse.ArgumentParser:
    """Arguments of jobs/predict.py: those of ``brainmt predict`` (less --part and the merge switches), the array and
    the scheduler."""
    p = argparse.ArgumentParser(prog="jobs/predict.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_options(p)
    p.add_argument("--array-size", type=int, default=8, help="array tasks (each predicts a slice of the scans)")
    p.add_argument("--profile", help="cluster profile YAML (a 'cluster:' section: partition, account, setup, ...)")
    add_cluster_arguments(p)   # each array task is one process on one node: --nodes is not used here
    p.add_argument("--container", metavar="IMAGE", help="run each slice inside this Apptainer image (binds: cluster.binds)")
    p.add_argument("--job-name", default="brainmt-predict")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the task plan; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the merge and print its summary")
    return p


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    """The scheduler settings of a task: the profile's (one GPU at most), then the command line; one process a task."""
    c = load_config([args.profile]).cluster if args.profile else ClusterConfig()
    if args.gpus_per_node is None:
        c.gpus_per_node = min(1, c.gpus_per_node)      # a training profile's GPUs a node: one a task here
    apply_cluster_arguments(c, args)
    c.nodes, c.tasks_per_node = 1, 1
    return c


class PredictTask(submitit.helpers.Checkpointable):
    """One array task: predict slice ``part`` of the scans; requeued on preemption (predicted scans are skipped).
    With ``cluster.container`` the slice runs as ``brainmt predict --part i/n --no-merge`` inside the image."""

    def __call__(self, request: dict, part: tuple[int, int], cluster: dict | None = None) -> dict:
        """Predict this task's scans into its part file; returns what it did."""
        from brainmt.predict.core import PredictRequest, run_part

        req, c = PredictRequest(**request), ClusterConfig(**(cluster or {}))
        if c.container:
            from brainmt.launch.container import exec_command, run_in_container

            args = ["predict", *predict_argv(req, f"{part[0]}/{part[1]}")]
            run_in_container(exec_command(c.container_runtime, str(c.container), c.binds, c.gpus_per_node > 0, args),
                             Path(req.out))
            return {"part": list(part), "container": str(c.container)}
        return run_part(req, tuple(part), progress=False)  # type: ignore[arg-type]


def describe_part(result: dict) -> str:
    """One line of what a finished array task did."""
    from brainmt.predict.merge import part_summary

    if "container" in result:
        return f"part {result['part'][0]}/{result['part'][1]} ran in {result['container']}"
    return part_summary(result)


def merge_task(out: str, phenotypes: str | None, id_column: str | None) -> dict:
    """The merge job: the tables and summary from every part file; returns the summary."""
    from brainmt.predict.merge import merge

    return merge(out, phenotypes, id_column)


def _absolute(request) -> None:
    """The paths of a request made absolute: the tasks run in the scheduler's working directory."""
    for key in ("run", "out", "input", "shards", "phenotypes"):
        value = getattr(request, key)
        if value:
            setattr(request, key, str(Path(value).resolve()))
    if request.checkpoint not in ("best", "last"):
        request.checkpoint = str(Path(request.checkpoint).resolve())


def rerun_command(request, part: str) -> str:
    """The ``brainmt predict`` command that redoes one slice (``part`` like ``i/n``) by hand."""
    return shlex.join(["brainmt", "predict", *predict_argv(request, part)])


def merge_command(request) -> str:
    """The ``brainmt predict --merge-only`` command that merges the parts again, with the phenotype table (without
    it the merge writes no metrics and removes an earlier metrics.json)."""
    table = [w for flag, value in (("--phenotypes", request.phenotypes), ("--id-column", request.id_column)) if value
             for w in (flag, value)]
    return shlex.join(["brainmt", "predict", "--run", request.run, "--out", request.out, "--merge-only", *table])


def predict_argv(request, part: str) -> list[str]:
    """The ``brainmt predict`` arguments of one slice (``part`` like ``i/n``) of ``request``, without the merge."""
    words = ["--run", request.run, "--input", request.input, "--out", request.out]
    for key in ("checkpoint", "shards", "layout", "glob", "subject_regex", "bids_space", "device"):
        value = getattr(request, key)
        if value and value != {"checkpoint": "best", "layout": "auto", "device": "auto"}.get(key):
            words += [f"--{key.replace('_', '-')}", value]
    return words + (["--resample"] if request.resample else []) + ["--part", part, "--no-merge"]


def main(argv: list[str] | None = None) -> int:
    """Check the run, the scans and the table here, then submit the array of slices and the merge job."""
    from brainmt.launch.slurm import LaunchError, checked_executor, make_executor, record_submission, sbatch_preview
    from brainmt.predict.core import check_request
    from brainmt.predict.merge import summary_text
    from brainmt.predict.parts import done_scans, start_output

    args = parser().parse_args(argv)
    try:
        c = cluster_config(args)                                   # the options first, then the run
        if args.array_size < 1:
            raise ConfigError(f"--array-size {args.array_size}: must be at least 1")
        request = request_from_args(args)
        _absolute(request)
        settings, sources = check_request(request)                 # errors here, before anything is queued
        n, out = min(args.array_size, len(sources)), Path(request.out)
        done = done_scans(out, sources)
        if args.dry_run:
            print(sbatch_preview(c, out / "slurm", args.job_name))
            print(f"# {n} array tasks over {len(sources)} scans ({len(done)} already predicted), then a merge job")
            return 0
        start_output(out, settings)
        executor, cluster = checked_executor(c, out / "slurm", args.job_name)
        merger, _ = make_executor(dataclasses.replace(c, gpus_per_node=0), out / "slurm", f"{args.job_name}-merge")
        array_id, merge_job = _submit(executor, merger, cluster, request, c, n, (len(sources), len(done)))
    except ConfigError as exc:
        print(f"jobs/predict.py: config error: {exc}", file=sys.stderr)
        return 2
    except (*expected_errors(), LaunchError) as exc:
        print(f"jobs/predict.py: error: {exc}", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as exc:
        print(f"jobs/predict.py: the scheduler refused the job: {exc}", file=sys.stderr)
        return 2
    record_submission(out / "slurm", array=array_id, merge=merge_job.job_id, cluster=cluster, scans=len(sources))
    print(f"merge job {merge_job.job_id} (after the array); predictions in {out / 'predictions.csv'}; logs in "
          f"{out / 'slurm'}\na failed slice i can be re-run alone: {rerun_command(request, f'i/{n}')}, then "
          f"{merge_command(request)}", flush=True)
    if not args.wait:
        return 0
    try:
        summary = merge_job.result()
    except Exception as exc:   # submitit raises its own errors with the job's log tail
        print(f"jobs/predict.py: the merge job failed: {exc}", file=sys.stderr)
        return 1
    print(summary_text(summary), flush=True)
    return 0


def _submit(executor, merger, cluster: str, request, c: ClusterConfig, n: int, counts: tuple[int, int]) -> tuple[str, object]:
    """Queue the n slices, then the merge (after the array on SLURM; locally once the slices have ended); ``counts``:
    the scans in all and those already predicted."""
    from brainmt.launch.slurm import clean_slurm_env, wait_for_tasks

    total, done = counts

    with clean_slurm_env():   # a submission from inside a SLURM job must not inherit its SLURM_*
        if cluster == "slurm":
            executor.update_parameters(array_parallelism=n)
        parts = executor.map_array(PredictTask(), [dataclasses.asdict(request)] * n, [(i, n) for i in range(n)],
                                   [dataclasses.asdict(c)] * n)
        array_id = parts[0].job_id.split("_")[0]
        print(f"array of {n} tasks over {total} scans ({done} already predicted): job {array_id} ({cluster})", flush=True)
        if cluster == "slurm":
            merger.update_parameters(dependency=f"afterany:{array_id}")
        else:
            wait_for_tasks(parts, describe_part)
        return array_id, merger.submit(merge_task, request.out, request.phenotypes, request.id_column)


if __name__ == "__main__":   # as the package's module, so the submitted task and merge pickle by reference
    from brainmt.launch.predict_jobs import main as _main

    sys.exit(_main())
