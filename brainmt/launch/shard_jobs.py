"""``python jobs/shard.py``: sharding as a SLURM job array (one task per slice of scans), then a merge job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from brainmt.config import ClusterConfig


def _shard_part(kwargs: dict, part: tuple[int, int]) -> dict:
    from brainmt.data.shards import ShardOptions, shard_dataset

    opts = ShardOptions(**kwargs.pop("options"))
    summary = shard_dataset(part=part, options=opts, progress=False, **kwargs)
    return {"part": list(part), "written": len(summary.written), "skipped": len(summary.skipped)}


def _mask_only(kwargs: dict) -> str:
    from brainmt.data.shards import ShardOptions, shard_dataset

    shard_dataset(mask_only=True, options=ShardOptions(**kwargs.pop("options")), progress=False, **kwargs)
    return "mask written"


def _merge(output: str, options: dict) -> str:
    from brainmt.data.shards import ShardOptions, merge_manifest

    return str(merge_manifest(output, ShardOptions(**options)))


def parser() -> argparse.ArgumentParser:
    """Arguments of jobs/shard.py."""
    p = argparse.ArgumentParser(prog="jobs/shard.py", description=__doc__)
    p.add_argument("--input", required=True)
    p.add_argument("--phenotypes", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--array-size", type=int, default=8, help="number of slices (array tasks)")
    p.add_argument("--mask", help="brain mask NIfTI (default: computed by a first job)")
    p.add_argument("--layout", default="auto")
    p.add_argument("--min-frames", type=int, default=200)
    p.add_argument("--chunk-frames", type=int, default=10)
    p.add_argument("--cluster", default="auto", choices=["auto", "slurm", "local", "debug"])
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--cpus-per-task", type=int, default=2)
    p.add_argument("--time", type=int, default=240, help="minutes per task")
    p.add_argument("--wait", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Submit the mask job (if needed), the array of slices and the merge job that depends on them."""
    from brainmt.launch.slurm import LaunchError, clean_slurm_env, make_executor

    args = parser().parse_args(argv)
    out = Path(args.output).resolve()
    options = {"min_frames": args.min_frames, "chunk_frames": args.chunk_frames}
    common = {"input_dir": str(Path(args.input).resolve()), "phenotypes": str(Path(args.phenotypes).resolve()),
              "output": str(out), "layout": args.layout, "mask": args.mask}
    c = ClusterConfig(cluster=args.cluster, partition=args.partition, account=args.account, gpus_per_node=0,
                      cpus_per_task=args.cpus_per_task, time_min=args.time)
    try:
        executor, cluster = make_executor(c, out / "slurm", "brainmt-shard")
    except LaunchError as exc:
        print(f"jobs/shard.py: error: {exc}", file=sys.stderr)
        return 2
    slurm = cluster == "slurm"
    k = args.array_size
    with clean_slurm_env():
        after = None
        if not args.mask and not (out / "mask.nii.gz").exists():
            job = executor.submit(_mask_only, {**common, "options": options})
            print(f"mask job {job.job_id}", flush=True)
            if not slurm:
                job.result()
            after = job
        if slurm:
            executor.update_parameters(array_parallelism=k, **({"dependency": f"afterok:{after.job_id}"} if after else {}))
        parts = executor.map_array(_shard_part, [{**common, "options": options}] * k, [(i, k) for i in range(k)])
        print(f"array of {k} slices: jobs {parts[0].job_id.split('_')[0]}_[0-{k - 1}]", flush=True)
        if slurm:
            executor.update_parameters(dependency=f"afterok:{parts[0].job_id.split('_')[0]}", array_parallelism=1)
        else:
            [p.result() for p in parts]
        merge = executor.submit(_merge, str(out), options)
    print(f"merge job {merge.job_id}; manifest will be {out / 'manifest.json'}; logs in {out / 'slurm'}\n"
          f"a failed slice i can be re-run alone: brainmt shard --input ... --output {out} --part i/{k}", flush=True)
    if args.wait:
        print(f"manifest: {merge.result()}")
        print(json.dumps([p.result() for p in parts]))
    return 0
