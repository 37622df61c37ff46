"""The end-to-end demo: synthetic scans -> shards -> BrainMT trained and evaluated by the launcher's job."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def prepare_data(work_dir: Path, subjects: int, frames: int, shape: list[int], seed: int = 0,
                 effect: str = "mixed") -> Path:
    """``brainmt synth`` then ``brainmt shard`` into ``work_dir`` (both skip what already exists)."""
    from brainmt.data.shards import ShardOptions, shard_dataset
    from brainmt.data.synthetic import write_synthetic_bids

    raw, shards = work_dir / "raw", work_dir / "shards"
    if not (raw / "participants.tsv").exists():
        write_synthetic_bids(raw, subjects, frames, shape, seed=seed, workers=2, effect=effect)
        print(f"synthetic scans: {subjects} subjects, {'x'.join(map(str, shape))} x {frames} frames in {raw}", flush=True)
    summary = shard_dataset(raw, raw / "participants.tsv", shards, options=ShardOptions(min_frames=frames), progress=False)
    print(f"shards: {shards} ({len(summary.written)} scans written, {len(summary.already_done)} already there)", flush=True)
    return shards


def submit_demo(cfg_layers: list[str], overrides: list[str], work_dir: Path, cluster: str = "local",
                subjects: int = 300, frames: int = 40, shape: tuple[int, int, int] = (20, 24, 20), seed: int = 0) -> dict:
    """Prepare the data here, then ``jobs/launch.py --cluster local --wait``; returns the test metrics."""
    import json

    from brainmt.launch.cli import main as launch

    shards = prepare_data(work_dir, subjects, frames, list(shape), seed=seed)
    run_dir = work_dir / "run"
    args = [arg for layer in cfg_layers for arg in ("--config", layer)]
    code = launch([*args, "--cluster", cluster, "--shards", str(shards), "--run-dir", str(run_dir), "--wait", *overrides])
    if code != 0:
        raise RuntimeError(f"jobs/launch.py exited with {code}")
    metrics = run_dir / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else {}
