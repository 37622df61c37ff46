"""Sweep files: a run config with a ``sweep:`` section; its search space checked against the config schema.

A search-space entry maps a dotted config key to one distribution::

    model.mamba_depth: {choice: [6, 12]}       # sampled uniformly from the list
    data.num_frames:   {grid: [100, 200]}      # every value (a grid; multiplied by num_samples)
    optim.lr:          {loguniform: [5.0e-5, 5.0e-4]}
    optim.weight_decay: {uniform: [0.0, 0.1]}
    model.d_state:     {randint: [8, 33]}      # integers in [low, high)
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from brainmt.config import LOWER_IS_BETTER as VAL_LOWER_IS_BETTER
from brainmt.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    select_metric,
    set_value,
    task_metrics,
    validate,
)

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
LOWER_IS_BETTER = (*VAL_LOWER_IS_BETTER, "train_loss")
HIGHER_IS_BETTER = ("val_accuracy", "val_balanced_accuracy", "val_auroc", "val_pearson_r")
NOT_SWEPT = ("sweep", "cluster", "data.shards", "name")   # sections and keys a trial cannot change


def _candidates(key: str, kind: str, args: Any, source: str) -> list:
    """The values to type-check for one entry: the list of a choice/grid, the bounds of a range."""
    where = f"{source}: sweep.space.{key}"
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
        return args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                           for v in args)):
        raise ConfigError(f"{where}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs positive bounds, got {args!r}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in args):
            raise ConfigError(f"{where}: randint needs integer bounds, got {args!r}")
        return [low, high - 1]
    return [low, high]


def check_space(cfg: Config, source: str) -> dict[str, tuple[str, Any]]:
    """Check every entry of ``cfg.sweep.space`` (key exists, one known distribution, values fit the key's type and
    the config's cross-field rules); returns {key: (kind, args)}."""
    space = cfg.sweep.space
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{source}: sweep.space is empty: give at least one key to sweep, "
                          "e.g. 'model.mamba_depth: {choice: [6, 12]}'")
    checked: dict[str, tuple[str, Any]] = {}
    for key, entry in space.items():
        if any(key == k or key.startswith(f"{k}.") for k in NOT_SWEPT):
            raise ConfigError(f"{source}: sweep.space.{key}: this key cannot be swept (a trial's {key} is fixed)")
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in KINDS:
            raise ConfigError(f"{source}: sweep.space.{key}: expected one of {{{', '.join(f'{k}: ...' for k in KINDS)}}}, "
                              f"got {entry!r}")
        kind, args = next(iter(entry.items()))
        for value in _candidates(key, kind, args, source):
            trial = copy.deepcopy(cfg)
            try:
                set_value(trial, key, value, f"{source}: sweep.space")
                apply_coupled(trial, {key: value})
                validate(trial)
            except ConfigError as exc:
                text = str(exc) if str(exc).startswith(source) else f"{source}: {exc}"
                raise ConfigError(f"{text} (value {value!r} of sweep.space.{key})") from None
        checked[key] = (kind, args)
    return checked


def apply_coupled(cfg: Config, params: dict[str, Any]) -> None:
    """Keys that follow a swept one: a swept data.num_frames sets model.num_frames (the temporal embedding
    length) unless that is swept too."""
    if "data.num_frames" in params and "model.num_frames" not in params:
        cfg.model.num_frames = int(params["data.num_frames"])


def check_sweep(cfg: Config, source: str) -> dict[str, tuple[str, Any]]:
    """All checks of a sweep config: the space, the metric and its direction, ASHA and resources."""
    s = cfg.sweep
    space = check_space(cfg, source)
    if s.metric == "auto":                 # the metric the trials pick their own best checkpoint by
        s.metric = select_metric(cfg)[0]
    if s.mode == "auto":
        s.mode = "min" if s.metric in LOWER_IS_BETTER else "max"
    known = LOWER_IS_BETTER + HIGHER_IS_BETTER
    if s.metric not in known:
        raise ConfigError(f"{source}: sweep.metric: {s.metric!r} is not reported by the training loop "
                          f"(one of {', '.join(known)})")
    if (s.metric in LOWER_IS_BETTER) != (s.mode == "min"):
        raise ConfigError(f"{source}: sweep.mode: {s.metric} is better when "
                          f"{'lower' if s.metric in LOWER_IS_BETTER else 'higher'}: use mode "
                          f"{'min' if s.metric in LOWER_IS_BETTER else 'max'}")
    if s.metric.startswith("val_") and s.metric not in task_metrics(cfg.data.task):
        raise ConfigError(f"{source}: sweep.metric: {s.metric} is not reported for data.task={cfg.data.task}")
    checks = [
        (s.num_samples >= 1, "sweep.num_samples", "at least 1"),
        (s.max_epochs >= 1, "sweep.max_epochs", "at least 1"),
        (1 <= s.grace_period <= s.max_epochs, "sweep.grace_period", "between 1 and sweep.max_epochs"),
        (s.reduction_factor >= 2, "sweep.reduction_factor", "at least 2"),
        (0 <= s.gpus_per_trial <= 1, "sweep.gpus_per_trial",
         "between 0 and 1 (a trial trains on one GPU or a share of one; train the best config on more with jobs/launch.py)"),
        (s.cpus_per_trial > 0, "sweep.cpus_per_trial", "positive"),
        (s.max_concurrent_trials is None or s.max_concurrent_trials >= 1, "sweep.max_concurrent_trials",
         "at least 1 or null"),
        (0 <= cfg.optim.warmup_epochs <= s.max_epochs, "optim.warmup_epochs", "at most sweep.max_epochs in a sweep"),
    ]
    for ok, key, want in checks:
        if not ok:
            raise ConfigError(f"{source}: {key}: must be {want}")
    return space


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict]:
    """Load and check a sweep file; returns the config and its checked space."""
    cfg = load_config(path, overrides)
    return cfg, check_sweep(cfg, str(path))


def ray_space(space: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """The Ray Tune param_space of a checked space."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "randint": lambda a: tune.randint(*a),
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a)}
    return {key: make[kind](args) for key, (kind, args) in space.items()}


def trial_count(space: dict[str, tuple[str, Any]], num_samples: int) -> int:
    """How many trials a sweep has in all: num_samples times every combination of the grid entries."""
    count = num_samples
    for kind, args in space.values():
        if kind == "grid":
            count *= len(args)
    return count


def with_params(base: dict, params: dict[str, Any], source: str) -> Config:
    """The base config (a dict) with the swept values (dotted keys) and the keys that follow them applied, unchecked."""
    from brainmt.config import config_from_dict

    cfg = config_from_dict(copy.deepcopy(base), "sweep base config")
    for key, value in params.items():
        set_value(cfg, key, value, source)
    apply_coupled(cfg, params)
    return cfg


def trial_config(base: dict, params: dict[str, Any], max_epochs: int) -> Config:
    """The config a trial trains: the base with the sampled values, ``max_epochs`` epochs, validation every epoch,
    no early stopping of its own (ASHA decides), and only its newest checkpoint kept."""
    cfg = with_params(base, params, "sweep trial")
    cfg.train.epochs = max_epochs
    cfg.train.eval_every_epochs = 1
    cfg.train.early_stopping_patience = max_epochs + 1
    cfg.train.keep_last = 1
    validate(cfg)
    return cfg


def best_config(base: dict, params: dict[str, Any], name: str) -> dict:
    """The best trial's config for a full training run: the base (its own epochs and early stopping) with the best
    values, without the sweep section; what ``jobs/launch.py --config`` and ``brainmt train --config`` read."""
    cfg = with_params(base, params, "best trial")
    cfg.name = name
    validate(cfg)
    out = config_to_dict(cfg)
    out.pop("sweep")
    return out


def format_value(value: Any) -> str:
    """Short, exact-enough text of a hyperparameter value for tables and labels."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value))
    return str(value)
