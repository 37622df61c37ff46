"""The Ray Tune trial: the training main of ``brainmt train`` with a metrics sink that reports to Tune."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from brainmt.fileio import atomic_write_text, replacing

log = logging.getLogger("brainmt.tune")


class TuneSink:
    """Reports every validation record (with the checkpoint the loop has just saved) to Ray Tune."""

    def __init__(self, run_dir: Path) -> None:
        self.staging = Path(run_dir) / "tune-checkpoint"
        self.last_train: dict = {}

    def log(self, record: dict) -> None:
        """Keep train records; report validation records (one per epoch) as one Tune iteration."""
        from ray import tune

        if "val_loss" not in record:
            self.last_train = record
            return
        metrics = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if "train_loss" in self.last_train:
            metrics["train_loss"] = self.last_train["train_loss"]
        checkpoint = None
        if record.get("checkpoint"):
            source = Path(record["checkpoint"])
            shutil.rmtree(self.staging, ignore_errors=True)   # the previous one was persisted by the last report
            self.staging.mkdir(parents=True)
            for item in (source, source.with_suffix(".json")):   # the checkpoint and its SHA-256 record
                if not item.exists():
                    continue
                try:
                    os.link(item, self.staging / item.name)   # no copy here; Tune copies it into its storage
                except OSError:
                    shutil.copy2(item, self.staging / item.name)
            checkpoint = tune.Checkpoint.from_directory(str(self.staging))
        tune.report(metrics, checkpoint=checkpoint)


def restore_trial_checkpoint(run_dir: Path) -> int | None:
    """Make the trial's run directory agree with Tune's view of it; returns the step resumed from (None: fresh).

    Tune knows the checkpoint of the trial's last persisted report. Checkpoints the loop wrote after it (a trial
    interrupted between a save and its report) are removed, so that the loop, Tune's iteration count and ASHA's
    rungs stay in step; earlier ones stay (the best checkpoint among them: a resumed trial keeps its "best"); the
    reported checkpoint is copied back if it is missing (e.g. a fresh node-local copy).
    """
    from ray import tune

    from brainmt.train import checkpoint as ckpt

    local = Path(run_dir) / "checkpoints"
    reported = tune.get_checkpoint()
    if reported is None:
        shutil.rmtree(local, ignore_errors=True)
        (Path(run_dir) / "metrics.jsonl").unlink(missing_ok=True)
        return None
    with reported.as_directory() as directory:
        found = ckpt.list_checkpoints(Path(directory))
        if not found:
            raise RuntimeError(f"the Tune checkpoint {reported.path} holds no step-*.pt file")
        step, path = found[-1]
        for other_step, other in ckpt.list_checkpoints(local):
            if other_step > step:
                other.unlink()
                ckpt.record_path(other).unlink(missing_ok=True)
        target = ckpt.checkpoint_path(local, step)
        if not target.exists() or target.stat().st_size != path.stat().st_size:   # absent, or a copy cut short
            local.mkdir(parents=True, exist_ok=True)
            ckpt.record_path(target).unlink(missing_ok=True)    # no record vouches for the file while it is copied
            for source, copy in ((path, target), (ckpt.record_path(path), ckpt.record_path(target))):
                if source.exists():
                    with replacing(copy) as partial:     # whole, or not there
                        shutil.copy2(source, partial)
    _truncate_metrics(Path(run_dir) / "metrics.jsonl", step)
    return step


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` from a trial's metrics.jsonl (they will be logged again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def trial_run_dir(sweep_dir: str | Path, trial_id: str) -> Path:
    """A trial's brainmt run directory: in the sweep directory on the shared file system (Ray's own trial
    directory on the worker is a node-local staging area that does not outlive the Ray session)."""
    return Path(sweep_dir) / "trials" / f"trial-{trial_id}"


def trial_main(params: dict, base: dict, sweep_dir: str) -> None:
    """Train one trial: the sweep's base config with ``params`` (dotted keys) applied, reporting each epoch."""
    import torch
    from ray import tune

    from brainmt.distributed import DistEnv
    from brainmt.train.loop import train
    from brainmt.train.runlog import JsonlSink, MultiSink
    from brainmt.tune.space import trial_config

    sweep = base["sweep"]
    cfg = trial_config(base, params, sweep["max_epochs"])
    cfg.train.device = "cuda" if sweep["gpus_per_trial"] > 0 else "cpu"
    torch.set_num_threads(max(1, int(sweep["cpus_per_trial"])))
    run_dir = trial_run_dir(sweep_dir, tune.get_context().get_trial_id())
    step = restore_trial_checkpoint(run_dir)
    log.info("trial %s: %s%s", tune.get_context().get_trial_id(), params,
             f" (resuming at step {step})" if step is not None else "")
    sink = MultiSink(JsonlSink(run_dir / "metrics.jsonl"), TuneSink(run_dir))
    # one process per trial, never the SLURM task layout of the job around it. Tune stops the trial at its last
    # report (ASHA's max_t = sweep.max_epochs, or an early stop), so train() returns only if it fails.
    train(cfg, cfg.data.shards, run_dir, sink=sink, env=DistEnv("single"))
