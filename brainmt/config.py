"""One typed configuration for every part of brainmt: dataclass schema, layered YAML, dot-list overrides.

``load_config(path_or_name, overrides=["model.embed_dim=64"])`` reads a YAML file (or a built-in
config by name: ``paper``, ``debug``, ``demo``), follows its ``base:`` chain (each file holds only
its differences from its base), applies ``key=value`` overrides last, and checks every key and
type against the schema. Unknown keys and wrong types raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
# validation metrics a run can be selected by, each with the direction that is better
SelectMetric = Literal["auto", "val_loss", "val_auroc", "val_balanced_accuracy", "val_accuracy", "val_pearson_r",
                       "val_mse", "val_mae"]
LOWER_IS_BETTER = ("val_loss", "val_mse", "val_mae")


# global: every token of every frame (the official code); spatial: each location averaged over time first;
# frame: the locations of each frame attend to one another, the class token's outputs averaged over frames
AttentionScope = Literal["global", "spatial", "frame"]
# the order of the Mamba scan: time (each location's whole time course, then the next location: the paper's)
# or space (every location of frame 0, then of frame 1, ...: regions of the same frame are neighbours)
ScanOrder = Literal["time", "space"]
# what the model does to each voxel's time course within a window before the stem: nothing (the paper), subtract
# its mean over the window's frames (center: the static anatomy goes, the fluctuations stay at their scale), or
# also divide by its standard deviation over the frames (zscore: each voxel's fluctuations at unit variance)
InputNorm = Literal["none", "center", "zscore"]
# where training metrics go besides metrics.jsonl (always written): TensorBoard event files, Weights & Biases
# (offline without a network), MLflow (a file store); the last two are optional extras
Logger = Literal["jsonl", "tensorboard", "wandb", "mlflow"]
# fine-tuning: the parts of the model kept frozen at the weights of train.init_from (none; the stem; stem and Mamba
# blocks; everything but the head: a linear probe)
Freeze = Literal["none", "stem", "stem+mamba", "all-but-head"]
# the subject splits of a shard directory's splits.json, in their order
SplitName = Literal["train", "validation", "test"]
# a torch device type; Device adds auto (a GPU when torch sees one, else the CPU)
DeviceType = Literal["cpu", "cuda"]
Device = Literal["auto", DeviceType]
# submitit's executors on this machine, without a scheduler: local (separate processes) or debug (this process)
LocalCluster = Literal["local", "debug"]
# where jobs run: auto (SLURM when sbatch is found, else local), SLURM, or a local executor
ClusterKind = Literal["auto", "slurm", LocalCluster]
# sharding: the value outside the brain (the scan's minimum z, as the paper; or 0) and the input's directory layout
# (auto: whichever of BIDS, UK Biobank and HCP is found; glob: shard.glob and shard.subject_regex)
ShardBackground = Literal["min", "zero"]
ShardLayout = Literal["auto", "bids", "ukb", "hcp", "glob"]


class ConfigError(ValueError):
    """A configuration key, value or file is wrong; the message names which."""


@dataclass
class ModelConfig:
    """BrainMT architecture. Input (B, T, in_channels, *volume_shape); output (B, 1)."""

    volume_shape: list[int] = field(default_factory=lambda: [91, 109, 91])
    in_channels: int = 1
    stem_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    # group: GroupNorm over each frame after every stem convolution (the paper); none: no normalisation in the stem,
    # so no region's signal rescales every other token of its frame (docs/model.md)
    stem_norm: Literal["group", "none"] = "group"
    embed_dim: int = 512
    num_frames: int = 200          # length of the learned temporal embedding table (frames per training window)
    max_frames: int = 1200         # longest input accepted; other lengths interpolate the table
    mamba_depth: int = 12
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None     # None: ceil(embed_dim / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    bidirectional: bool = True
    scan_order: ScanOrder = "time"
    input_norm: InputNorm = "none"
    attention_depth: int = 8
    attention: AttentionScope = "spatial"
    num_heads: int = 8
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    # > 0: every residual branch (Mamba, attention, MLP) scaled by a learned per-channel gamma starting at this value
    # (CaiT's LayerScale: 0.1 up to depth 18, smaller deeper); 0: off, as the paper (docs/model.md)
    layer_scale: float = 0.0
    head_dropout: float = 0.0
    # running: the head reads the class feature standardised per dimension across scans (running statistics), so a
    # class token that is nearly the same for every scan still gives the head a signal; none: as it is (docs/model.md)
    head_norm: Literal["none", "running"] = "none"
    checkpointing: Literal["none", "mamba", "attention", "all"] = "none"
    backend: Literal["auto", "cuda", "torch"] = "auto"
    scan_chunk_size: int | None = None  # pure-PyTorch scan only; None: ceil(sqrt(L))
    # speed and memory on CUDA only; the same model and weights (docs/performance.md)
    stem_chunk_frames: int = 0          # > 0: the stem runs this many frames at a time, recomputed in the backward pass
    fused_kernels: bool = True          # one fused bidirectional Mamba op (recomputes conv and dt) + fused add+RMSNorm
    sdpa_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"   # first choice for attention
    channels_last: bool = False         # the stem's 3-D convolutions in channels-last layout
    compile: bool = False               # torch.compile the stem


@dataclass
class DataConfig:
    """Where the shards are and what a sample is."""

    shards: str | None = None
    target: str = "cognition"            # phenotype column to predict (sex for classification)
    task: Literal["regression", "classification"] = "regression"
    num_frames: int = 200
    num_workers: int = 4
    crop_align: Literal["chunk", "frame"] = "chunk"   # training crops start at stored-chunk boundaries or any frame
    samples_per_epoch: int | None = None              # None: training scans x windows per scan
    intensity_jitter: float = 0.0   # training only: each window scaled by 1 + N(0, s) and shifted by N(0, s) (z units)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, stepped every optimizer step."""

    lr: float = 2e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_epochs: float = 5.0
    grad_clip: float = 1.0
    accumulate_steps: int = 1
    layer_decay: float = 1.0        # < 1: block i of N learns at lr * layer_decay^(N + 1 - i), stem and embeddings at ^(N + 1)


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 20
    batch_size: int = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 42
    log_every: int = 20
    eval_every_epochs: int = 1
    early_stopping_patience: int = 5
    keep_last: int = 3
    checkpoint_every_steps: int | None = None         # besides every evaluation; None: only then
    device: Device = "auto"
    # the validation metric that picks the "best" checkpoint and drives early stopping; auto: val_auroc for
    # classification, val_pearson_r for regression (docs/training.md says why)
    select_metric: SelectMetric = "auto"
    label_smoothing: float = 0.0    # classification: targets 0/1 become eps/2 and 1 - eps/2
    head_bias: Literal["zero", "prior"] = "prior"   # prior: the head's bias starts at the training set's log-odds
    calibration: Literal["none", "platt"] = "none"  # platt: probabilities recalibrated on the validation split
    loggers: list[Logger] = field(default_factory=lambda: ["jsonl"])
    init_from: str | None = None        # fine-tuning: a run directory or checkpoint whose weights start this run
    init_head: Literal["keep", "reset"] = "reset"   # with init_from: the head's weights kept, or newly initialised
    freeze: Freeze = "none"             # with init_from: parts kept at the loaded weights


@dataclass
class ClusterConfig:
    """How jobs are asked of the scheduler. Site specifics belong in a cluster profile YAML."""

    cluster: ClusterKind = "auto"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None       # None: one task per GPU (one on a CPU-only node)
    gpu_request: Literal["gpus_per_node", "gres"] = "gpus_per_node"
    cpus_per_task: int = 8
    mem_gb: float | None = None
    time_min: int = 24 * 60
    max_requeues: int = 20
    signal_delay_s: int = 120               # SIGUSR2 this long before the time limit: time to checkpoint
    setup: list[str] = field(default_factory=list)
    container: str | None = None            # an Apptainer image: each task trains inside it
    container_runtime: str = "apptainer"
    binds: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    """Ray Tune sweep: search space over config keys, metric, ASHA and per-trial resources."""

    space: dict[str, Any] = field(default_factory=dict)
    metric: str = "auto"                           # auto: train.select_metric (val_auroc / val_pearson_r by task)
    mode: Literal["auto", "min", "max"] = "auto"   # auto: the metric's own direction
    num_samples: int = 8
    grace_period: int = 2
    reduction_factor: int = 3
    max_epochs: int = 20
    gpus_per_trial: float = 1.0
    cpus_per_trial: float = 4.0
    max_concurrent_trials: int | None = None
    max_failures: int = 1                          # a trial that fails is retried this often from its checkpoint
    ray_auth: Literal["token", "disabled"] = "token"   # token: a per-sweep secret that every Ray process needs
    dashboard: bool = False                        # Ray's dashboard, on 127.0.0.1 of the head node only


@dataclass
class AnalysisConfig:
    """Integrated Gradients settings (``brainmt analyze``; docs/analysis.md)."""

    steps: int = 32
    # auto: noise for a model that centres its input (model.input_norm center/zscore; stem_norm group), else mean;
    # mean: the training split's average brain (static); noise: that brain plus white noise at each voxel's typical
    # fluctuation in the training scans; temporal_mean: the window's own voxel means over its frames;
    # zeros / background: every brain voxel 0 / at the scan's background (far from any scan: docs/analysis.md)
    # scans: IG from each of reference_scans real training windows, averaged (expected gradients; docs/analysis.md)
    baseline: Literal["auto", "mean", "noise", "temporal_mean", "zeros", "background", "scans"] = "auto"
    baseline_scans: int = 64             # baseline=mean or noise: averaged over at most this many training scans
    reference_scans: int = 8             # baseline=scans: this many references (IG's cost grows with it)
    method: Literal["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"] = "gausslegendre"
    internal_batch_size: int | None = None   # None: chosen from the free memory of the device
    device: Device = "auto"
    split: SplitName = "test"
    checkpoint: str = "best"
    atlas: str | None = None             # None: lobes; a named atlas (harvard-oxford, schaefer-400, aal...); a labelled NIfTI
    atlas_labels: str | None = None
    top_regions: int = 20
    # mm; the group step smooths each subject map (Gaussian, within the brain) before the group voxel maps: unsmoothed
    # IG maps carry the stem's stride-2 grid (docs/analysis.md); 0: none. Subject maps and regions.csv are unsmoothed
    smooth_fwhm: float = 6.0
    figure_percentile: float = 90.0      # nilearn figures draw a map where |value| reaches this percentile of its brain voxels
    subject_figures: int = 4             # nilearn figures of the first N analysed subjects' signed maps (0: none)
    figures: bool = True                 # false: maps, tables and summary only (no matplotlib or nilearn needed)


@dataclass
class ShardConfig:
    """How ``brainmt shard`` and ``jobs/shard.py`` turn scans into shards (docs/data.md).

    Each key is the command-line option of the same name (``chunk_frames``: ``--chunk-frames``); an option given
    on the command line wins over the ``shard:`` section of ``--config``. The Python API's form is
    :class:`brainmt.data.shards.ShardOptions`, whose defaults come from here."""

    # where the scans and their phenotype columns are
    layout: ShardLayout = "auto"
    glob: str | None = None                 # layout glob: file pattern relative to --input
    subject_regex: str | None = None        # with glob: regex on the relative path; group 'subject' or group 1
    bids_space: str | None = None           # BIDS/fMRIPrep: the space- entity (None: MNI*)
    id_column: str | None = None            # None: participant_id, eid, ...
    targets: list[str] | None = None        # None: sex + every numeric column
    sex_column: str | None = None           # None: sex or gender
    family_column: str | None = None        # None: family_id; a family never spans two splits
    # the brain mask
    mask: str | None = None                 # a mask NIfTI; None: computed from the data
    mask_fraction: float = 0.9              # computed mask: voxels varying over time in at least this fraction of scans
    mask_scans: int | None = None           # computed mask: from at most this many scans (None: all)
    # what is stored
    chunk_frames: int = 10
    shard_size_gb: float = 1.0              # a new shard file when one would grow past this (a scan is never split)
    background: ShardBackground = "min"
    min_frames: int = 200                   # shorter scans are skipped
    # the subject splits
    split: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])   # train, validation, test fractions
    split_seed: int = 0
    min_split_subjects: int = 1             # refuse splits (of a fraction above 0) with fewer subjects; 0: only warn
    strict: bool = False                    # stop at the first bad scan instead of skipping it


@dataclass
class Config:
    """The whole configuration; written as ``config.yaml`` into every run directory."""

    name: str = "brainmt"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)


def literal_values(tp: Any) -> tuple:
    """The values a ``Literal`` type allows, in order (nested ``Literal`` types flattened); () for any other type."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def config_choices(section: type, key: str) -> list:
    """The allowed values of a ``Literal``-typed config key (e.g. ``ClusterConfig``, ``"cluster"``): CLI choices."""
    return list(literal_values(typing.get_type_hints(section)[key]))


SPLIT_NAMES: tuple[str, ...] = literal_values(SplitName)


# ---------------------------------------------------------------- typed merging


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float where a float is due)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _merge(obj: Any, updates: dict, prefix: str, source: str, errors: list[str] | None = None) -> None:
    """Apply a nested mapping of updates to the dataclass ``obj`` in place, checking keys and types; with an
    ``errors`` list every bad key is collected there (and skipped) instead of raising at the first."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        try:
            if key not in hints:
                raise ConfigError(f"{source}: {_unknown_key(full, names)}")
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: {full}: expected a mapping of {tp.__name__} keys, got {value!r}")
                _merge(getattr(obj, key), value, f"{full}.", source, errors)
                continue
            try:
                setattr(obj, key, _coerce(value, tp, full))
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        except ConfigError as exc:
            if errors is None:
                raise
            errors.append(str(exc))


def _resolve_path(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A config file from a path, a path relative to the including file, or a built-in name."""
    ref = Path(ref)
    candidates = [ref]
    if relative_to is not None and not ref.is_absolute():
        candidates.insert(0, relative_to.parent / ref)
    candidates += [CONFIG_DIR / ref, CONFIG_DIR / f"{ref}.yaml"]
    for cand in candidates:
        if cand.is_file():
            return cand
    builtin = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file not found: {ref} (built-in configs: {', '.join(builtin)})")


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The chain of YAML layers, base first, following ``base:`` keys."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base:' chain: {' -> '.join(map(str, seen + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    layers: list[tuple[Path, dict]] = []
    for ref in [base] if isinstance(base, str) else (base or []):
        layers += _read_layers(_resolve_path(ref, path), seen + (path.resolve(),))
    return layers + [(path, data)]


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``a.b=value`` into the key and the YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def set_value(cfg: Any, key: str, value: Any, source: str) -> None:
    """Set one dotted key (``model.mamba_depth``) of ``cfg`` in place, checked like a YAML layer (no cross-field checks)."""
    _merge(cfg, _nest(key, value), "", source)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], errors: list[str] | None = None) -> Config:
    """Apply ``key=value`` overrides to ``cfg`` in place and return it; every bad key is reported at once (with
    those already in ``errors``)."""
    errors = [] if errors is None else errors
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        _merge(cfg, _nest(key, value), "", f"override '{item}'", errors)
    if errors:
        raise ConfigError("\n  ".join(errors) if len(errors) == 1 else
                          f"{len(errors)} errors:\n  " + "\n  ".join(errors))
    validate(cfg)
    return cfg


def load_config(path: str | Path | list[str | Path] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load the typed config from YAML layers (``path`` may be a list, applied in order) and overrides."""
    cfg, errors = Config(), []
    paths = [] if path is None else path if isinstance(path, list) else [path]
    for p in paths:
        for layer_path, data in _read_layers(_resolve_path(p)):
            _merge(cfg, data, "", str(layer_path), errors)
    return apply_overrides(cfg, overrides, errors)


def config_to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts and lists."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build a checked config from nested dicts (e.g. the copy stored in a checkpoint)."""
    cfg = Config()
    _merge(cfg, data, "", source)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); ``load_config`` reads it back unchanged."""
    from brainmt.fileio import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def task_metrics(task: str) -> tuple[str, ...]:
    """The validation metrics that exist for ``task``."""
    own = ("val_auroc", "val_balanced_accuracy", "val_accuracy") if task == "classification" else (
        "val_pearson_r", "val_mse", "val_mae")
    return ("val_loss", *own)


def select_metric(cfg: Config) -> tuple[str, str]:
    """The metric that picks the best checkpoint and its mode ("min" or "max"), with ``auto`` resolved by task."""
    name = cfg.train.select_metric
    if name == "auto":
        name = "val_auroc" if cfg.data.task == "classification" else "val_pearson_r"
    return name, "min" if name in LOWER_IS_BETTER else "max"


def selection_key(name: str, value: float, val_loss: float | None) -> tuple[float, float]:
    """How checkpoints (and runs) rank by the metric ``name``: its value signed so that higher is better, then the lower
    validation loss (a missing or non-finite loss ranks last); compare keys with ``>``."""
    loss = val_loss if val_loss is not None and math.isfinite(val_loss) else math.inf
    return (-value if name in LOWER_IS_BETTER else value), -loss


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    m = cfg.model
    checks = [
        (len(m.volume_shape) == 3 and all(s > 0 for s in m.volume_shape), "model.volume_shape", "three positive sizes"),
        (len(m.stem_channels) == 4 and all(c > 0 for c in m.stem_channels), "model.stem_channels", "four positive widths"),
        (m.num_heads > 0, "model.num_heads", "positive"),
        (m.embed_dim > 0 and m.embed_dim % max(1, m.num_heads) == 0, "model.embed_dim",
         f"a positive multiple of model.num_heads ({m.num_heads})"),
        (0 < m.num_frames <= m.max_frames, "model.num_frames", f"between 1 and model.max_frames ({m.max_frames})"),
        (m.mamba_depth >= 0 and m.attention_depth >= 0, "model.mamba_depth/attention_depth", "zero or more"),
        (m.d_state > 0 and m.d_conv > 0 and m.expand > 0, "model.d_state/d_conv/expand", "positive"),
        (0 < m.dt_min <= m.dt_max, "model.dt_min", "positive and at most model.dt_max"),
        (0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", "in [0, 1)"),
        (0 <= m.layer_scale < math.inf, "model.layer_scale", "zero (off) or a positive, finite initial scale"),
        (0 < cfg.data.num_frames <= m.max_frames, "data.num_frames", f"between 1 and model.max_frames ({m.max_frames})"),
        (m.scan_chunk_size is None or m.scan_chunk_size > 0, "model.scan_chunk_size", "positive or null"),
        (cfg.optim.lr > 0, "optim.lr", "positive"),
        (len(cfg.optim.betas) == 2, "optim.betas", "two numbers"),
        (cfg.optim.accumulate_steps >= 1, "optim.accumulate_steps", "at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size", "at least 1"),
        (cfg.train.epochs >= 1, "train.epochs", "at least 1"),
        (cfg.train.log_every >= 1, "train.log_every", "at least 1"),
        (cfg.train.keep_last >= 1, "train.keep_last", "at least 1"),
        (cfg.train.eval_every_epochs >= 1, "train.eval_every_epochs", "at least 1"),
        (cfg.data.samples_per_epoch is None or cfg.data.samples_per_epoch >= 1, "data.samples_per_epoch", "positive or null"),
        (0 <= cfg.optim.warmup_epochs <= cfg.train.epochs, "optim.warmup_epochs", "between 0 and train.epochs"),
        (0 <= cfg.optim.min_lr <= cfg.optim.lr, "optim.min_lr", "between 0 and optim.lr"),
        (0 < cfg.optim.layer_decay <= 1, "optim.layer_decay", "in (0, 1] (1: no decay)"),
        (0 <= cfg.train.label_smoothing < 1, "train.label_smoothing", "in [0, 1)"),
        (cfg.data.intensity_jitter >= 0, "data.intensity_jitter", "zero or more"),
        ("jsonl" in cfg.train.loggers and len(set(cfg.train.loggers)) == len(cfg.train.loggers), "train.loggers",
         "a list with jsonl and no repeats (e.g. [jsonl, tensorboard])"),
        (cfg.train.freeze == "none" or cfg.train.init_from is not None, "train.freeze",
         "none unless train.init_from is set (freezing randomly initialised weights trains nothing useful)"),
        (cfg.train.select_metric in ("auto", *task_metrics(cfg.data.task)), "train.select_metric",
         f"auto or one of {list(task_metrics(cfg.data.task))} for data.task={cfg.data.task}"),
        (cfg.analysis.steps >= 1, "analysis.steps", "at least 1"),
        (cfg.analysis.internal_batch_size is None or cfg.analysis.internal_batch_size >= 1, "analysis.internal_batch_size",
         "at least 1 or null"),
        (min(cfg.analysis.baseline_scans, cfg.analysis.reference_scans, cfg.analysis.top_regions) >= 1,
         "analysis.baseline_scans/reference_scans/top_regions", "at least 1"),
        (0 <= cfg.analysis.figure_percentile < 100, "analysis.figure_percentile", "in [0, 100)"),
        (cfg.analysis.smooth_fwhm >= 0, "analysis.smooth_fwhm", "zero or more (mm)"),
        (cfg.analysis.subject_figures >= 0, "analysis.subject_figures", "zero or more"),
    ]
    errors = [f"{key}: must be {want}" for ok, key, want in checks if not ok]
    try:
        validate_cluster(cfg.cluster)
    except ConfigError as exc:
        errors.append(str(exc))
    errors += shard_problems(cfg.shard)
    if errors:
        raise ConfigError("; ".join(errors))


def validate_cluster(c: ClusterConfig) -> None:
    """Checks of the scheduler settings (also applied to command-line options)."""
    checks = [
        (c.nodes >= 1, "cluster.nodes", "at least 1"),
        (c.gpus_per_node >= 0, "cluster.gpus_per_node", "zero or more"),
        (c.tasks_per_node is None or c.tasks_per_node >= 1, "cluster.tasks_per_node", "at least 1 or null"),
        (c.cpus_per_task >= 1, "cluster.cpus_per_task", "at least 1"),
        (c.mem_gb is None or c.mem_gb > 0, "cluster.mem_gb", "positive or null"),
        (c.time_min >= 1, "cluster.time_min", "at least 1 minute"),
        (c.max_requeues >= 0, "cluster.max_requeues", "zero or more"),
        (c.signal_delay_s >= 0, "cluster.signal_delay_s", "zero or more"),
    ]
    errors = [f"{key}: must be {want}" for ok, key, want in checks if not ok]
    if errors:
        raise ConfigError("; ".join(errors))


def option_flag(key: str) -> str:
    """The command-line option of a config key of the same name: ``shard.chunk_frames`` -> ``--chunk-frames``."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def option_text(value: Any) -> str:
    """A value as it is typed after its option: a list space-separated, a float in short form (``0.7 0.15 0.15``)."""
    if isinstance(value, (list, tuple)):
        return " ".join(option_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def split_problems(fractions: list[float] | tuple[float, ...]) -> list[str]:
    """What is wrong with three split fractions (train, validation, test), without naming them; empty if nothing."""
    f = tuple(float(v) for v in fractions)
    if len(f) != 3:
        return ["needs three fractions (train, validation, test)"]
    if not all(math.isfinite(v) and v >= 0 for v in f):
        return ["each fraction must be a number >= 0"]
    problems = ["the train fraction must be more than 0"] if f[0] == 0 else []
    if abs(sum(f) - 1.0) > 1e-6:
        problems.append(f"the fractions must sum to 1 (they sum to {sum(f):g})")
    return problems


def shard_problems(c: ShardConfig, as_options: bool = False) -> list[str]:
    """What is wrong with sharding settings, every problem at once: each named by its key (``shard.chunk_frames: must
    be at least 1, got 0``) or, with ``as_options``, by its option as typed (``--chunk-frames 0: must be at least 1``)."""
    hints = typing.get_type_hints(ShardConfig)
    size = c.shard_size_gb
    checks = [
        ("chunk_frames", c.chunk_frames >= 1, "must be at least 1"),
        ("shard_size_gb", math.isfinite(size) and size > 0, "must be a finite number more than 0"),
        ("min_frames", c.min_frames >= 2, "must be at least 2 (a scan is a time series)"),
        ("mask_fraction", 0 < c.mask_fraction <= 1, "must be more than 0 and at most 1"),
        ("mask_scans", c.mask_scans is None or c.mask_scans >= 1, "must be at least 1"),
        ("min_split_subjects", c.min_split_subjects >= 0, "must be at least 0"),
    ]
    found = [(key, want) for key, ok, want in checks if not ok]
    found += [(f.name, f"must be one of {list(literal_values(hints[f.name]))}") for f in dataclasses.fields(c)
              if literal_values(hints[f.name]) and getattr(c, f.name) not in literal_values(hints[f.name])]
    found += [("split", problem) for problem in split_problems(c.split)]
    if as_options:
        return [f"{option_flag(key)} {option_text(getattr(c, key))}: {want}" for key, want in found]
    return [f"shard.{key}: {want}, got {getattr(c, key)!r}" for key, want in found]
