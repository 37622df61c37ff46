"""Data-parallel scaling on one host: samples/s per GPU count, loader wait, replica checksums, resume on another count.

``python -m brainmt.bench.ddp --gpus 1 2 [4] [--config paper] [--frames 200] [--steps 20] [--warmup 5]
[--shards DIR | --subjects 8 --scan-frames 250] [--workers N] [--json FILE] [key=value ...]``
(with ``--frames 200`` add ``train.batch_size=2``: paper.yaml's batch of 8 is meant for 20-frame windows)

For each count N the project's own training loop (:func:`brainmt.train.loop.train`) runs as a submitit local
job with one task per GPU: each task finds its rank as every brainmt job does (:func:`brainmt.distributed.detect`
reads the local executor's SUBMITIT_LOCAL_* variables), the tasks meet over NCCL (gloo on CPUs) and train
``warmup + steps`` steps, logging every step (time per step and the time it waited for the data loader), then
save a checkpoint and return a SHA-256 of their parameters. Throughput is the global batch over the median step
time after the warm-up. Then the checkpoint of the largest count resumes on the smallest and the other way
round, for a few steps each. Without ``--shards`` synthetic scans are written and sharded first (full MNI size
by default). ``--device cpu`` runs the same with gloo and CPU processes (the test suite does, with tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import submitit

from brainmt.config import DeviceType, literal_values

#: the issue's scaling targets (samples/s over one GPU's); other counts: 0.875 per GPU
SCALING_TARGETS = {2: 1.8, 4: 3.5}


def scaling_target(n: int) -> float:
    """The samples/s ratio over one GPU that ``n`` GPUs should reach."""
    return SCALING_TARGETS.get(n, 1.0 if n == 1 else 0.875 * n)


class BenchTask(submitit.helpers.Checkpointable):
    """One task of a benchmark job: the training main up to ``stop_at`` steps, then its parameters' digest."""

    def __call__(self, cfg_dict: dict, shards: str, run_dir: str, stop_at: int) -> dict:
        """Train (or resume) ``run_dir`` until step ``stop_at``; returns train()'s result with this task's rank."""
        import logging

        from brainmt.config import config_from_dict
        from brainmt.distributed import cleanup, detect
        from brainmt.train.loop import train

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        env = detect()
        try:
            result = train(config_from_dict(cfg_dict, "benchmark config"), shards, run_dir, stop_at_step=stop_at, env=env)
        finally:
            cleanup()
        return {**result, "rank": env.rank, "world_size": env.world_size, "launcher": env.launcher}


def bench_config(args: argparse.Namespace, count: int) -> dict:
    """The run config of one count: the chosen base with the benchmark's frames, logging every step, one long epoch."""
    from brainmt.config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    cfg.data.num_frames = cfg.model.num_frames = args.frames
    cfg.name = f"bench-ddp-{count}"
    cfg.train.device = args.device
    cfg.train.log_every = 1
    cfg.train.epochs = 1
    cfg.train.checkpoint_every_steps = 0
    cfg.train.keep_last = 2
    # one epoch longer than anything the benchmark runs: no evaluation falls inside it
    cfg.data.samples_per_epoch = 4 * (args.warmup + args.steps + args.resume_steps) * cfg.train.batch_size * max(args.gpus) \
        * cfg.optim.accumulate_steps
    if args.workers is not None:
        cfg.data.num_workers = args.workers
    c = cfg.cluster
    c.cluster, c.nodes, c.tasks_per_node = "local", 1, count
    c.gpus_per_node = count if args.device == "cuda" else 0
    c.cpus_per_task = max(1, (os.cpu_count() or 1) // max(args.gpus))
    c.time_min = args.timeout_min
    return config_to_dict(cfg)


def run_job(cfg_dict: dict, shards: Path, run_dir: Path, count: int, stop_at: int) -> list[dict]:
    """Run one benchmark job of ``count`` tasks to step ``stop_at``; every task's result, by rank."""
    from brainmt.config import config_from_dict
    from brainmt.launch.slurm import clean_slurm_env, make_executor

    cfg = config_from_dict(cfg_dict, "benchmark config")
    ex, _ = make_executor(cfg.cluster, run_dir.parent / "jobs", cfg.name)
    with clean_slurm_env():
        job = ex.submit(BenchTask(), cfg_dict, str(shards), str(run_dir), stop_at)
    try:
        results = job.results()
    except Exception as e:
        raise RuntimeError(f"the {count}-task benchmark job failed; its logs: {run_dir.parent / 'jobs' / str(job.job_id)}"
                           f"\n{e}") from e
    return sorted(results, key=lambda r: r["rank"])


def _records(run_dir: Path, after_step: int, upto: int) -> list[dict]:
    """Rank 0's per-step training records with after_step < step <= upto."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "step_s" in r and after_step < r["step"] <= upto:
            out.append(r)
    return out


def checkpoint_digest(run_dir: Path, step: int) -> tuple[str, int]:
    """(parameter digest, world size) of the checkpoint of ``step`` in ``run_dir``, hashed as the replicas hash theirs."""
    import torch

    from brainmt.config import config_from_dict
    from brainmt.models import build_model
    from brainmt.train.checkpoint import checkpoint_path, load_checkpoint
    from brainmt.train.evaluation import param_digest

    path = checkpoint_path(run_dir / "checkpoints", step)
    saved = load_checkpoint(path)
    with torch.device("meta"):                            # the parameters' names, without allocating the model
        names = [n for n, _ in build_model(config_from_dict(saved["config"], str(path)).model).named_parameters()]
    return param_digest({n: saved["model"][n] for n in names}), int(saved["world_size"])


def measure_count(args: argparse.Namespace, shards: Path, work: Path, count: int) -> dict:
    """Train ``warmup + steps`` steps on ``count`` GPUs (tasks); the row of the table."""
    cfg_dict = bench_config(args, count)
    run_dir = work / f"run-{count}"
    if run_dir.exists():                                  # a reused --workdir: measure from step 0, not a resume
        shutil.rmtree(run_dir)
    stop_at = args.warmup + args.steps
    t0 = time.perf_counter()
    results = run_job(cfg_dict, shards, run_dir, count, stop_at)
    wall = time.perf_counter() - t0
    records = _records(run_dir, args.warmup, stop_at)
    if len(records) < args.steps:
        raise RuntimeError(f"{run_dir / 'metrics.jsonl'}: {len(records)} step records after the warm-up, wanted {args.steps}")
    digests = [r["param_digest"] for r in results]
    saved_digest, saved_world = checkpoint_digest(run_dir, stop_at)
    b = cfg_dict["train"]["batch_size"] * cfg_dict["optim"]["accumulate_steps"]
    step_s = statistics.median(r["step_s"] for r in records)
    waits = [r["loader_wait_s"] for r in records]
    return {"gpus": count, "world_size": results[0]["world_size"], "launcher": results[0]["launcher"],
            "global_batch": b * count, "steps_measured": len(records), "step_s_median": step_s,
            "step_s_mean": statistics.fmean(r["step_s"] for r in records),
            "samples_per_s": b * count / step_s, "loader_wait_s_median": statistics.median(waits),
            "loader_wait_s_mean": statistics.fmean(waits), "loader_wait_fraction": statistics.fmean(waits) / step_s,
            "loader_wait_s_per_rank": [r["loader_wait_s"] for r in results],
            "final_train_loss": records[-1]["train_loss"], "param_digests": digests,
            "replicas_identical": len(set(digests)) == 1, "checkpoint_matches_replicas": saved_digest == digests[0],
            "checkpoint_world_size": saved_world, "step": results[0]["step"], "job_seconds": wall,
            "run_dir": str(run_dir)}


def keep_global_batch(cfg_dict: dict, saved_on: int, count: int) -> dict:
    """The config with the per-task batch, or accumulation, that keeps the global batch of ``saved_on`` tasks on
    ``count`` (a resume requires it): the fewest accumulation steps whose micro-batch is no larger than before."""
    from brainmt.train.run_config import batch_for

    train, optim = cfg_dict["train"], cfg_dict["optim"]
    total = train["batch_size"] * optim["accumulate_steps"] * saved_on
    keep = batch_for(total, count, train["batch_size"])
    if keep is None:
        raise ValueError(f"a global batch of {total} does not divide among {count} tasks: choose --gpus whose "
                         "counts divide train.batch_size x the largest count")
    train["batch_size"], optim["accumulate_steps"] = keep
    return cfg_dict


def resume_on(args: argparse.Namespace, shards: Path, work: Path, saved_on: int, count: int) -> dict:
    """Copy the ``saved_on``-GPU run and continue it on ``count`` GPUs for ``resume_steps`` steps."""
    source = work / f"run-{saved_on}"
    run_dir = work / f"resume-{saved_on}-on-{count}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shutil.copytree(source, run_dir)
    start = args.warmup + args.steps
    cfg_dict = keep_global_batch(bench_config(args, count), saved_on, count)
    results = run_job(cfg_dict, shards, run_dir, count, start + args.resume_steps)
    digests = [r["param_digest"] for r in results]
    saved_digest, saved_world = checkpoint_digest(run_dir, start + args.resume_steps)
    records = _records(run_dir, start, start + args.resume_steps)
    log0 = (run_dir / "logs" / "rank-0.log").read_text() if (run_dir / "logs" / "rank-0.log").exists() else ""
    resumed_line = any("resumed from" in line and f"at step {start} " in line for line in log0.splitlines())
    ok = (all(r["step"] == start + args.resume_steps for r in results) and len(set(digests)) == 1
          and saved_digest == digests[0] and saved_world == count and len(records) == args.resume_steps
          and all(math.isfinite(r["train_loss"]) for r in records) and resumed_line)
    return {"saved_on": saved_on, "resumed_on": count, "from_step": start, "to_step": results[0]["step"],
            "replicas_identical": len(set(digests)) == 1, "checkpoint_world_size": saved_world,
            "train_loss": [r["train_loss"] for r in records], "ok": ok, "run_dir": str(run_dir)}


def synthetic_shards(args: argparse.Namespace, work: Path) -> Path:
    """Write and shard synthetic scans of ``--shape`` x ``--scan-frames`` (reused when already there)."""
    from brainmt.data.shards import ShardOptions, shard_dataset
    from brainmt.data.synthetic import write_synthetic_bids

    raw, out = work / "raw", work / "shards"
    if not (out / "manifest.json").exists():
        write_synthetic_bids(raw, args.subjects, args.scan_frames, args.shape, seed=0,
                             workers=max(1, min(8, os.cpu_count() or 1)), compress=False)
        shard_dataset(raw, raw / "participants.tsv", out,
                      options=ShardOptions(min_frames=args.frames, chunk_frames=args.chunk_frames), progress=False)
    return out


def run(args: argparse.Namespace) -> dict:
    """Every count, then the cross-count resumes; the whole record."""
    import torch

    from brainmt.bench.model import save_record, versions

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here (use --device cpu for gloo processes)")
        if max(args.gpus) > torch.cuda.device_count():
            raise SystemExit(f"--gpus {max(args.gpus)}: only {torch.cuda.device_count()} GPUs are visible")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="brainmt-bench-ddp-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = Path(args.shards) if args.shards else synthetic_shards(args, work)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    record: dict = {"benchmark": "ddp", "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU",
                    "device_count": torch.cuda.device_count() if args.device == "cuda" else 0,
                    "versions": versions(device), "config": args.config, "overrides": args.overrides,
                    "frames": args.frames, "steps": args.steps, "warmup": args.warmup, "shards": str(shards),
                    "nccl_env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
                    "rows": [], "resumes": []}
    for count in sorted(set(args.gpus)):
        row = measure_count(args, shards, work, count)
        record["rows"].append(row)
        save_record(record, args.json)
    base = next((r for r in record["rows"] if r["gpus"] == 1), None)
    for row in record["rows"]:
        row["scaling"] = row["samples_per_s"] / base["samples_per_s"] if base else None
        row["scaling_target"] = scaling_target(row["gpus"])
        row["scaling_met"] = None if base is None else row["scaling"] >= row["scaling_target"]
    counts = sorted(set(args.gpus))
    if len(counts) > 1 and args.resume_steps > 0:
        for a, b in ((counts[-1], counts[0]), (counts[0], counts[-1])):
            record["resumes"].append(resume_on(args, shards, work, a, b))
            save_record(record, args.json)
    record["work_dir"] = str(work)
    save_record(record, args.json)
    return record


def format_report(record: dict) -> str:
    """The table: one row per GPU count, then the resumes."""
    lines = [f"{record['device']} x{record['device_count'] or '-'}; config {record['config']} {' '.join(record['overrides'])}; "
             f"T={record['frames']}; median of {record['steps']} steps after {record['warmup']}",
             f"{'GPUs':>4s} {'batch':>5s} {'step ms':>8s} {'samples/s':>9s} {'scaling':>7s} {'target':>6s} "
             f"{'loader wait ms/step':>19s} {'replicas':>9s} {'ckpt':>5s}"]
    for r in record["rows"]:
        scaling = f"{r['scaling']:.2f}x" if r.get("scaling") is not None else "-"
        lines.append(f"{r['gpus']:>4d} {r['global_batch']:>5d} {1000 * r['step_s_median']:>8.1f} {r['samples_per_s']:>9.2f} "
                     f"{scaling:>7s} {r['scaling_target']:>5.2f}x {1000 * r['loader_wait_s_median']:>19.1f} "
                     f"{'identical' if r['replicas_identical'] else 'DIFFER':>9s} "
                     f"{'same' if r['checkpoint_matches_replicas'] else 'DIFF':>5s}")
    for r in record["resumes"]:
        lines.append(f"checkpoint of step {r['from_step']} saved on {r['saved_on']} resumed on {r['resumed_on']}: "
                     f"{'ok' if r['ok'] else 'FAILED'} (to step {r['to_step']}, losses "
                     f"{', '.join(f'{x:.4f}' for x in r['train_loss'])})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts (processes with --device cpu)")
    p.add_argument("--device", choices=list(literal_values(DeviceType)), default="cuda")
    p.add_argument("--config", default="paper")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--steps", type=int, default=20, help="measured steps a count")
    p.add_argument("--warmup", type=int, default=5, help="steps before the measured ones")
    p.add_argument("--resume-steps", type=int, default=3, help="steps after a resume on another count (0: no resumes)")
    p.add_argument("--shards", help="existing shards (default: synthetic scans written under --workdir)")
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--scan-frames", type=int, default=None, help="frames of a synthetic scan (default: --frames + 50)")
    p.add_argument("--shape", type=int, nargs=3, default=[91, 109, 91])
    p.add_argument("--chunk-frames", type=int, default=10)
    p.add_argument("--workers", type=int, default=None, help="data loader workers a GPU (default: the config's)")
    p.add_argument("--workdir", help="where data and runs go (default: a new temporary directory)")
    p.add_argument("--timeout-min", type=int, default=60)
    p.add_argument("--json", help="write the record here")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if args.scan_frames is None:
        args.scan_frames = args.frames + 50
    if min(args.gpus) < 1 or args.steps < 1 or args.warmup < 0 or args.resume_steps < 0:
        p.error("--gpus, --steps need positive numbers; --warmup, --resume-steps zero or more")
    if args.scan_frames < args.frames:
        p.error(f"--scan-frames {args.scan_frames} is shorter than --frames {args.frames}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    record = run(args)
    print(format_report(record), flush=True)
    return record


if __name__ == "__main__":
    main()
