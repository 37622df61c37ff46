"""The end-to-end demo: synthetic scans -> shards -> BrainMT trained and evaluated by the launcher's job."""

from __future__ import annotations

import logging
from pathlib import Path

from brainmt.config import Config, config_to_dict

log = logging.getLogger(__name__)


def prepare_data(work_dir: Path, subjects: int, frames: int, shape: list[int], seed: int = 0) -> Path:
    """``brainmt synth`` then ``brainmt shard`` into ``work_dir`` (both skip what already exists)."""
    from brainmt.data.shards import ShardOptions, shard_dataset
    from brainmt.data.synthetic import write_synthetic_bids

    raw, shards = work_dir / "raw", work_dir / "shards"
    if not (raw / "participants.tsv").exists():
        write_synthetic_bids(raw, subjects, frames, shape, seed=seed, workers=2)
        print(f"synthetic scans: {subjects} subjects, {'x'.join(map(str, shape))} x {frames} frames in {raw}", flush=True)
    summary = shard_dataset(raw, raw / "participants.tsv", shards, options=ShardOptions(min_frames=frames), progress=False)
    print(f"shards: {shards} ({len(summary.written)} scans written, {len(summary.already_done)} already there)", flush=True)
    return shards


def submit_demo(cfg: Config, work_dir: Path, cluster: str = "local", subjects: int = 300, frames: int = 40,
                shape: tuple[int, int, int] = (20, 24, 20)) -> dict:
    """Prepare the data here, then train and evaluate as ``jobs/launch.py --cluster local --wait`` does."""
    from brainmt.launch.job import TrainJob
    from brainmt.launch.slurm import make_executor

    shards = prepare_data(work_dir, subjects, frames, list(shape), seed=cfg.train.seed)
    run_dir = work_dir / "run"
    cfg.cluster.cluster = cluster
    executor, cluster = make_executor(cfg.cluster, run_dir / "slurm", f"brainmt-{cfg.name}")
    job = executor.submit(TrainJob(), config_to_dict(cfg), str(shards), str(run_dir))
    print(f"submitted training job {job.job_id} ({cluster} executor, as jobs/launch.py --cluster {cluster}); "
          f"its log: {run_dir / 'slurm' / str(job.job_id)}", flush=True)
    return job.result()
