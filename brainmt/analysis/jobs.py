"""``python jobs/analyze.py``: the analysis as a SLURM job array over subjects, then a merge job (or locally).

Each array task runs :func:`brainmt.analysis.pipeline.analyze_subjects` on its share of the subjects (one GPU
a task unless ``--gpus-per-node 0``); the merge job runs after the whole array has ended (``afterany``), so a
failed subject or task is reported by the merge instead of blocking it. A task that is requeued or re-run
skips the subjects whose maps are already written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import submitit

from brainmt.analysis.cli import add_analysis_options, config_from_args
from brainmt.config import AnalysisConfig, ClusterConfig, ConfigError, save_config
from brainmt.launch.cli import add_cluster_arguments, apply_cluster_arguments


def parser() -> argparse.ArgumentParser:
    """Arguments of jobs/analyze.py."""
    p = argparse.ArgumentParser(prog="jobs/analyze.py", description=__doc__)
    add_analysis_options(p)
    p.add_argument("--array-size", type=int, default=8, help="array tasks (each takes a share of the subjects)")
    p.add_argument("--profile", help="cluster profile YAML (a 'cluster:' section: partition, account, setup, binds, ...)")
    add_cluster_arguments(p)   # each array task is one process on one node: --nodes is not used here
    p.add_argument("--job-name", default="brainmt-analyze")
    p.add_argument("--container", metavar="IMAGE", help="run each task inside this Apptainer image (binds: cluster.binds)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the task plan; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the merge and print its summary")
    return p


def _cluster_config(args: argparse.Namespace, profile_cluster: ClusterConfig) -> ClusterConfig:
    c = dataclasses.replace(profile_cluster)
    if args.gpus_per_node is None:
        c.gpus_per_node = min(1, c.gpus_per_node)      # a training profile's GPUs a node: one a task here
    apply_cluster_arguments(c, args)
    c.nodes, c.tasks_per_node = 1, 1
    return c


def _in_container(c: ClusterConfig, cli_args: list[str]) -> None:
    """Run ``brainmt analyze <cli_args>`` inside the image as a child process (scheduler signals forwarded)."""
    from brainmt.launch.container import exec_command, run_in_container

    cmd = exec_command(c.container_runtime, str(c.container), c.binds, c.gpus_per_node > 0, ["analyze", *cli_args])
    run_in_container(cmd, Path(cli_args[cli_args.index("--out") + 1]))


def _common_args(run: str, out: str, config_path: str, shards: str | None) -> list[str]:
    return ["--run", run, "--out", out, "--config", config_path] + (["--shards", shards] if shards else [])


class AnalyzeTask(submitit.helpers.Checkpointable):
    """One array task: the subject maps of its share of the subjects; requeued on preemption (done ones are skipped)."""

    def __call__(self, run: str, out: str, subjects: list[str], settings: dict, shards: str | None,
                 cluster: dict, config_path: str) -> dict:
        """Attribute ``subjects``; returns the done and failed subjects."""
        c = ClusterConfig(**cluster)
        if c.container:
            _in_container(c, [*_common_args(run, out, config_path, shards), "--maps-only", "--subjects", *subjects])
            return {"subjects": subjects, "container": c.container}
        from brainmt.analysis.pipeline import analyze_subjects

        return analyze_subjects(run, out, AnalysisConfig(**settings), subjects, shards)


def merge_task(run: str, out: str, subjects: list[str] | None, settings: dict, shards: str | None, cluster: dict,
               config_path: str) -> dict:
    """What the merge job runs: group maps, tables and figures from the subject maps; returns the summary."""
    c = ClusterConfig(**cluster)
    if c.container:
        extra = ["--subjects", *subjects] if subjects else []
        try:
            _in_container(c, [*_common_args(run, out, config_path, shards), "--group-only", *extra])
        except RuntimeError:   # `brainmt analyze` exits 1 when subjects failed: summary.json says which
            if not (Path(out) / "summary.json").exists():
                raise
        return json.loads((Path(out) / "summary.json").read_text())
    from brainmt.analysis.group import merge

    return merge(run, out, AnalysisConfig(**settings), subjects, shards)


def main(argv: list[str] | None = None) -> int:
    """Check the run and the subjects here, then submit the array of subject tasks and the merge job."""
    from brainmt.analysis.atlases import check_atlas
    from brainmt.analysis.group import summary_text
    from brainmt.analysis.pipeline import fingerprint, open_run, subjects_of
    from brainmt.data.loader import check_lengths
    from brainmt.launch.slurm import (
        LaunchError,
        checked_executor,
        clean_slurm_env,
        make_executor,
        record_submission,
        sbatch_preview,
        wait_for_tasks,
    )
    from brainmt.train.checkpoint import CheckpointError

    args = parser().parse_args(argv)
    try:
        cfg = config_from_args(args, [args.profile] if args.profile else None)
        settings = cfg.analysis
        c = _cluster_config(args, cfg.cluster)                              # the options first, then the run
        if args.array_size < 1:
            raise ConfigError("--array-size must be at least 1")
        check_atlas(settings.atlas, settings.atlas_labels)   # a named atlas is fetched here, on the login node
        info = open_run(args.run, settings.checkpoint, args.shards)          # errors here, before anything is queued
        by_subject = subjects_of(info.shards, settings.split, args.subjects)
        fingerprint(info, settings)                                          # a baseline the model cannot use
        # each subject's windows are of the run's data.num_frames: a shorter scan would fail after the queue
        check_lengths(info.shards, [scan for scans in by_subject.values() for scan in scans], info.cfg.data.num_frames)
        chosen = list(by_subject)
        run, out = str(info.run_dir.resolve()), Path(args.out or info.run_dir / "ig").resolve()
        shards = str(Path(args.shards).resolve()) if args.shards else None
        merge_cluster = dataclasses.replace(c, gpus_per_node=0)
        chunks = [list(part) for part in np.array_split(np.array(chosen, dtype=object), min(args.array_size, len(chosen)))]
        if args.dry_run:
            print(sbatch_preview(c, out / "slurm", args.job_name))
            print(f"# {len(chunks)} array tasks over {len(chosen)} subjects of the {settings.split} split, then a merge job")
            for i, chunk in enumerate(chunks):
                print(f"#   task {i}: {len(chunk)} subjects ({chunk[0]} .. {chunk[-1]})")
            return 0
        (out / "slurm").mkdir(parents=True, exist_ok=True)
        config_path = str(save_config(cfg, out / "slurm" / "analysis-config.yaml"))
        executor, cluster = checked_executor(c, out / "slurm", args.job_name)
        merger, _ = make_executor(merge_cluster, out / "slurm", f"{args.job_name}-merge")
        settings_dict, n = dataclasses.asdict(settings), len(chunks)
        with clean_slurm_env():   # a submission from inside a SLURM job must not inherit its SLURM_*
            if cluster == "slurm":
                executor.update_parameters(array_parallelism=n)
            parts = executor.map_array(AnalyzeTask(), [run] * n, [str(out)] * n, chunks, [settings_dict] * n, [shards] * n,
                                       [dataclasses.asdict(c)] * n, [config_path] * n)
            array_id = parts[0].job_id.split("_")[0]
            print(f"array of {n} tasks over {len(chosen)} subjects: job {array_id} ({cluster})", flush=True)
            if cluster == "slurm":
                merger.update_parameters(dependency=f"afterany:{array_id}")
            else:
                wait_for_tasks(parts, _describe_task)
            merge_job = merger.submit(merge_task, run, str(out), chosen if args.subjects else None, settings_dict, shards,
                                      dataclasses.asdict(merge_cluster), config_path)
    except ConfigError as exc:
        print(f"jobs/analyze.py: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, CheckpointError, LaunchError, OSError) as exc:
        print(f"jobs/analyze.py: error: {exc}", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as exc:
        print(f"jobs/analyze.py: the scheduler refused the job: {exc}", file=sys.stderr)
        return 2
    record_submission(out / "slurm", array=array_id, merge=merge_job.job_id, cluster=cluster, subjects=len(chosen))
    print(f"merge job {merge_job.job_id} (after the array); maps, regions.csv and figures in {out}; logs in {out / 'slurm'}",
          flush=True)
    if not args.wait:
        return 0
    try:
        summary = merge_job.result()
    except Exception as exc:
        print(f"jobs/analyze.py: the merge job failed: {exc}", file=sys.stderr)
        return 1
    print(summary_text(summary, settings.top_regions), flush=True)
    return 1 if summary["failed"] or summary["missing"] else 0


def _describe_task(result: dict) -> str:
    """One line (and a line per failed subject) for a finished analysis task."""
    failed = result.get("failed") or {}
    return (f"{len(result.get('done', []))} subjects done, {len(failed)} failed"
            + "".join(f"\n  {s}: {e}" for s, e in failed.items()))


if __name__ == "__main__":   # as the package's module, so the submitted task and merge pickle by reference
    from brainmt.analysis.jobs import main as _main

    sys.exit(_main())
