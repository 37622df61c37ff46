"""``python jobs/shard.py`` (or ``brainmt-shard-jobs``): ``brainmt shard`` as a SLURM job array (one task per slice
of the scans), after a mask job when no mask exists yet, then a merge job that writes manifest.json and splits.json.

It takes every sharding option of ``brainmt shard`` with the same defaults, ``--config`` (its ``shard:`` section)
and ``shard.*`` overrides (the result is the same manifest and splits), and the scheduler options of every launcher;
each job of a sharding run asks for no GPU, 2 CPUs and 4 hours unless the command line says otherwise (a --profile
gives the site's partition, account, setup, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from brainmt.config import ClusterConfig, ConfigError, load_config
from brainmt.data.shard_args import add_shard_options, shard_config, shard_option_argv, split_shard_config
from brainmt.launch.cli import add_cluster_arguments, apply_cluster_arguments

if TYPE_CHECKING:
    from brainmt.data.shards import ShardOptions

# the resources of each job of a sharding run (mask, array tasks, merge): set after the profile, before the
# command-line options (which win)
SHARD_JOB_DEFAULTS = {"gpus_per_node": 0, "cpus_per_task": 2, "time_min": 240}


def _shard_part(common: dict, options: ShardOptions, part: tuple[int, int]) -> dict:
    """One array task: slice ``part`` of the scans (``brainmt shard --part i/n``)."""
    from brainmt.data.shards import shard_dataset

    summary = shard_dataset(part=part, options=options, progress=False, **common)
    return {"part": list(part), "written": len(summary.written), "skipped": len(summary.skipped)}


def _mask_only(common: dict, options: ShardOptions) -> str:
    """The mask job: compute and save mask.nii.gz (``brainmt shard --mask-only``)."""
    from brainmt.data.shards import shard_dataset

    shard_dataset(mask_only=True, options=options, progress=False, **common)
    return "mask written"


def _merge(output: str, options: ShardOptions) -> str:
    """The merge job: manifest.json and splits.json from the finished parts (``brainmt shard --merge``)."""
    from brainmt.data.shards import merge_manifest

    return str(merge_manifest(output, options))


def parser() -> argparse.ArgumentParser:
    """Arguments of jobs/shard.py: those of ``brainmt shard`` (less --part/--merge), the array and the scheduler."""
    p = argparse.ArgumentParser(prog="jobs/shard.py", description=__doc__)
    p.add_argument("--input", required=True, help="directory of scans")
    p.add_argument("--phenotypes", required=True, help="participants table: .tsv (tab-separated) or .csv (comma-separated)")
    p.add_argument("--output", required=True, help="shard directory")
    add_shard_options(p)
    p.add_argument("--array-size", type=int, default=8, help="number of slices (array tasks; default %(default)s)")
    p.add_argument("--profile", help="cluster profile YAML (a 'cluster:' section: partition, account, setup, ...)")
    add_cluster_arguments(p)   # each task is one process on one node: --nodes is not used here
    p.add_argument("--job-name", default="brainmt-shard")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the job plan; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the merge job and print the manifest's path")
    return p


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    """The scheduler settings of each job of a sharding run: the profile's, a CPU job's resources, then the command
    line."""
    c = load_config([args.profile]).cluster if args.profile else ClusterConfig()
    for key, value in SHARD_JOB_DEFAULTS.items():
        setattr(c, key, value)
    apply_cluster_arguments(c, args)   # checked: --nodes 0, --time 0, ... exit 2
    c.nodes, c.tasks_per_node = 1, 1
    return c


def _plan(args: argparse.Namespace) -> tuple[ClusterConfig, dict, ShardOptions, Path, list[str]]:
    """Everything checked before a job is queued: the cluster settings, shard_dataset's arguments, options, output,
    the phenotype table, and the sharding options as ``brainmt shard`` words (for re-running one slice)."""
    from brainmt.data.shards import ShardOptionError, shard_phenotypes

    if args.array_size < 1:
        raise ShardOptionError(f"--array-size {args.array_size}: must be at least 1")
    settings = shard_config(args)
    c = cluster_config(args)
    out = Path(args.output).resolve()
    if out.exists() and not out.is_dir():
        raise ShardOptionError(f"--output {out}: exists and is not a directory")
    for flag, path, kind in (("--input", args.input, "directory"), ("--phenotypes", args.phenotypes, "file"),
                             ("--mask", settings.mask, "file")):
        if path and not (Path(path).is_dir() if kind == "directory" else Path(path).is_file()):
            raise ShardOptionError(f"{flag} {path}: no such {kind}")
    if settings.mask:
        settings = dataclasses.replace(settings, mask=str(Path(settings.mask).resolve()))
    options, dataset_args = split_shard_config(settings)
    common = {**dataset_args, "input_dir": str(Path(args.input).resolve()),
              "phenotypes": str(Path(args.phenotypes).resolve()), "output": str(out)}
    shard_phenotypes(out, common["phenotypes"], *(dataset_args[k] for k in ("id_column", "targets", "sex_column",
                                                                          "family_column")))
    return c, common, options, out, shard_option_argv(settings)


def main(argv: list[str] | None = None) -> int:
    """Check every option, then submit the mask job (if needed), the array of slices and the merge job."""
    import submitit

    from brainmt.data.phenotypes import PhenotypeError
    from brainmt.data.shards import ShardError
    from brainmt.launch.slurm import LaunchError, checked_executor, sbatch_preview

    args = parser().parse_args(argv)
    try:
        c, common, options, out, option_words = _plan(args)
        if args.dry_run:
            print(sbatch_preview(c, out / "slurm", args.job_name))
            needs_mask = not common["mask"] and not (out / "mask.nii.gz").exists()
            print(f"# {'a mask job, then ' if needs_mask else ''}{args.array_size} array tasks, then a merge job; "
                  f"shard_dataset arguments: {json.dumps({k: v for k, v in common.items() if v is not None})}")
            return 0
        executor, cluster = checked_executor(c, out / "slurm", args.job_name)
    except (ConfigError, ShardError, PhenotypeError, LaunchError) as exc:
        print(f"jobs/shard.py: error: {exc}", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as exc:
        print(f"jobs/shard.py: the scheduler refused the job: {exc}", file=sys.stderr)
        return 2
    rerun = shlex.join(["brainmt", "shard", "--input", common["input_dir"], "--phenotypes", common["phenotypes"],
                        "--output", str(out), *option_words])
    return _submit(executor, cluster, common, options, out, args.array_size, rerun, args.wait)


def _submit(executor, cluster: str, common: dict, options: ShardOptions, out: Path, k: int, rerun: str,
            wait: bool) -> int:
    """Queue the mask job (unless a mask exists), the k slices and the merge; with ``wait``, their results."""
    from brainmt.launch.slurm import clean_slurm_env, record_submission

    slurm = cluster == "slurm"
    with clean_slurm_env():   # a submission from inside a SLURM job must not inherit its SLURM_*
        after = None
        if not common["mask"] and not (out / "mask.nii.gz").exists():
            after = executor.submit(_mask_only, common, options)
            print(f"mask job {after.job_id}", flush=True)
            if not slurm and wait_in_order([after]) is None:
                return 1
        if slurm:
            executor.update_parameters(array_parallelism=k, **({"dependency": f"afterok:{after.job_id}"} if after else {}))
        parts = executor.map_array(_shard_part, [common] * k, [options] * k, [(i, k) for i in range(k)])
        array_id = parts[0].job_id.split("_")[0]
        print(f"array of {k} slices: array tasks {array_id}_[0-{k - 1}]", flush=True)
        if slurm:
            executor.update_parameters(dependency=f"afterok:{array_id}", array_parallelism=1)
        elif wait_in_order(parts) is None:
            return 1
        merge = executor.submit(_merge, str(out), options)
    record_submission(out / "slurm", mask=after.job_id if after else None, array=array_id, merge=merge.job_id,
                      cluster=cluster)
    print(f"merge job {merge.job_id}; manifest will be {out / 'manifest.json'}; logs in {out / 'slurm'}\n"
          f"a failed slice i can be re-run alone: {rerun} --part i/{k}",
          flush=True)
    if wait:
        results = wait_in_order([*([after] if after else []), *parts, merge])
        if results is None:
            return 1
        print(f"manifest: {results[-1]}")
        print(json.dumps(results[-1 - k:-1]))
    return 0


def wait_in_order(jobs: list) -> list | None:
    """Each job's result, waiting in turn; at the first failure cancel the rest (their dependency can never be
    met, so SLURM would hold them forever), say which job failed, and return None."""
    results = []
    for i, job in enumerate(jobs):
        try:
            results.append(job.result())
        except Exception as exc:  # submitit raises its own errors with the job's log tail
            for later in jobs[i + 1:]:
                later.cancel(check=False)
            print(f"jobs/shard.py: job {job.job_id} failed; the jobs after it were cancelled:\n{exc}", file=sys.stderr)
            return None
    return results


if __name__ == "__main__":   # as the package's module, so the submitted functions pickle by reference
    from brainmt.launch.shard_jobs import main as _main

    sys.exit(_main())
