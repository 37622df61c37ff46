"""A run's configuration resolved against its data once, saved as ``config.yaml``, and compared on resume."""

from __future__ import annotations

import copy
from pathlib import Path

from brainmt.config import Config, config_to_dict, load_config, select_metric, validate
from brainmt.data.loader import ShardSet, check_lengths
from brainmt.data.shards import ShardError

# keys that may change when a run resumes; anything else must match the run's config.yaml
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.checkpoint_every_steps", "train.keep_last",
                     "train.device", "train.loggers", "data.shards", "data.num_workers", "cluster", "sweep", "analysis",
                     "shard", "name", "train.batch_size", "optim.accumulate_steps")   # the last two: see check_global_batch


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible resume); the message says why and what was kept."""


class ResumeConflict(TrainingError):
    """The run directory holds a run of another configuration."""


def resolve(cfg: Config, shards: ShardSet) -> Config:
    """A new config with the data-derived settings filled in: the shard directory's absolute path and the token
    grid of the shards' (cropped) volumes. ``cfg`` is left as it was."""
    resolved = copy.deepcopy(cfg)
    resolved.data.shards = str(Path(shards.root).resolve())
    resolved.model.volume_shape = [int(s) for s in shards.volume_shape]
    validate(resolved)
    return resolved


def check_splits(shards: ShardSet, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """The scans of each of ``splits``; ShardError naming splits.json when one is empty."""
    scans = {name: shards.scans_of(name) for name in splits}
    empty = [name for name, found in scans.items() if not found]
    if empty:
        counts = ", ".join(f"{name} {len(found)}" for name, found in scans.items())
        raise ShardError(f"{Path(shards.root) / 'splits.json'}: split(s) {', '.join(empty)} have no scans ({counts}); "
                         "re-shard with more subjects or other --split fractions")
    return scans


def check_data(cfg: Config, shards: ShardSet, splits: tuple[str, ...]) -> tuple[dict[str, list[str]], dict]:
    """Everything the data must satisfy before step 0 (the launchers' dry runs check the same): the splits have
    scans, every scan holds a window of ``data.num_frames``, the target exists and suits the task. Returns the
    scans of each split and the target statistics."""
    from brainmt.train.metrics import target_stats

    scans = check_splits(shards, tuple(dict.fromkeys(("train", "validation", *splits))))
    for found in scans.values():
        check_lengths(shards, found, cfg.data.num_frames)
    stats = target_stats(shards, scans["train"], cfg.data.target, cfg.data.task)
    if cfg.data.task == "classification":
        check_classes(cfg, shards, scans)
    return scans, stats


def check_classes(cfg: Config, shards: ShardSet, scans: dict[str, list[str]]) -> None:
    """ShardError naming splits.json when the training split holds one class only (nothing to learn), or the
    validation split does while AUROC picks the best checkpoint (it would be undefined at every evaluation, and
    early stopping would end the run however it trained)."""
    metric = select_metric(cfg)[0]
    for split in ("train", "validation"):
        values = sorted({shards.target(s, cfg.data.target) for s in scans[split]})
        if len(values) > 1 or (split == "validation" and metric != "val_auroc"):
            continue
        why = ("a classifier has nothing to learn" if split == "train" else
               "val_auroc, which picks the best checkpoint, needs both; set train.select_metric=val_loss to keep it")
        raise ShardError(f"{Path(shards.root) / 'splits.json'}: every scan of the {split} split has "
                         f"{cfg.data.target} = {values[0]:g} ({len(scans[split])} scans): {why}, or re-split "
                         "(brainmt shard --split/--split-seed)")


def batch_for(global_batch: int, ranks: int, max_batch: int) -> tuple[int, int] | None:
    """(train.batch_size, optim.accumulate_steps) that make ``global_batch`` on ``ranks``: the fewest accumulation
    steps whose batch is at most ``max_batch`` (what fits now); None when it does not divide among the ranks."""
    if global_batch % ranks:
        return None
    per_rank = global_batch // ranks
    steps = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= max(1, max_batch))
    return per_rank // steps, steps


def check_global_batch(path: Path, saved: dict, cfg: Config, world_size: int) -> None:
    """ResumeConflict unless the run resumes with the global batch its checkpoint ``saved`` (at ``path``) was trained
    with: the schedule, the epochs and the early-stopping count are counted in steps of that batch. On another number
    of ranks it is kept by changing ``train.batch_size`` or ``optim.accumulate_steps``; the message says how."""
    old_cfg = saved.get("config") or {}
    b, a = old_cfg.get("train", {}).get("batch_size"), old_cfg.get("optim", {}).get("accumulate_steps", 1)
    if b is None:
        return
    ranks = saved["world_size"]
    old, new = b * a * ranks, cfg.train.batch_size * cfg.optim.accumulate_steps * world_size
    if old == new:
        return
    keep = batch_for(old, world_size, cfg.train.batch_size)
    hint = (f"on {world_size} ranks pass train.batch_size={keep[0]} optim.accumulate_steps={keep[1]}" if keep else
            f"{old} does not divide among {world_size} ranks: resume on a number of ranks that divides it")
    raise ResumeConflict(f"{path}: trained with a global batch of {old} ({ranks} ranks x train.batch_size {b} x "
                         f"optim.accumulate_steps {a}), now {new}. Its learning-rate schedule and epochs count steps "
                         f"of that batch: {hint}")


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """Raise ResumeConflict if ``run_dir`` was started with settings that may not change on resume
    (``cfg`` must be resolved with :func:`resolve`, as the saved one was)."""
    stored_path = Path(run_dir) / "config.yaml"
    if not stored_path.exists():
        return
    stored = config_to_dict(load_config(stored_path))
    diffs = []
    for section, values in config_to_dict(cfg).items():
        if section in RESUMABLE_CHANGES:
            continue
        if not isinstance(values, dict):
            if values != stored.get(section):
                diffs.append(section)
            continue
        for key, value in values.items():
            full = f"{section}.{key}"
            if value != stored[section].get(key) and full not in RESUMABLE_CHANGES:
                diffs.append(f"{full}: {stored[section].get(key)!r} -> {value!r}")
    if diffs:
        raise ResumeConflict(f"{stored_path}: this run was started with another configuration ({'; '.join(diffs)}). "
                             "Resume it unchanged, train into a new --run-dir, or (jobs/launch.py) pass --force to move "
                             "it aside")
