"""Fine-tuning: a run that starts from another run's weights (``train.init_from``) and may keep parts of them frozen
(``train.freeze``).

:func:`open_init_source` resolves and loads the source checkpoint early in ``setup`` and checks that it fits the
model (a bad path or another architecture fails before ``config.yaml`` is written, so the corrected command starts
the same run directory afresh); :func:`prepare_model` then loads its weights into the new model, resizing the
temporal and spatial position embeddings to this run's frame count and token grid as the model itself does at run
time, and freezes the named parts before the optimizer and DDP are built. A run that resumes from its own
checkpoint does not read the source again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from brainmt.config import Config, ConfigError, config_from_dict, config_to_dict
from brainmt.fileio import sha256_file
from brainmt.models import build_model
from brainmt.models.brainmt import resize_spatial, resize_temporal
from brainmt.train import checkpoint as ckpt
from brainmt.train.checkpoint import CheckpointError
from brainmt.train.run_config import TrainingError

log = logging.getLogger("brainmt.train.finetune")

HEAD = ("head", "head_norm")   # the head and the standardisation before it (model.head_norm)
# what train.freeze freezes: the input side (conv stem, spatial and temporal position embeddings, class token: the
# tokens the loaded blocks were trained on), plus the Mamba blocks; all-but-head: everything but the head
FROZEN_PARTS = {
    "none": (),
    "stem": ("stem", "pos_embed", "temporal_embed", "cls_token"),
    "stem+mamba": ("stem", "pos_embed", "temporal_embed", "cls_token", "mamba_blocks"),
}
# model keys a source may differ in without its weights changing shape or meaning (resized, or speed options)
_FREE_MODEL_KEYS = ("volume_shape", "num_frames", "max_frames", "checkpointing", "backend", "scan_chunk_size",
                    "stem_chunk_frames", "fused_kernels", "sdpa_backend", "channels_last", "compile", "drop_rate",
                    "attn_drop_rate", "drop_path_rate", "head_dropout", "dt_min", "dt_max")
# model keys that leave every shape as it is but change what the loaded weights compute
_SEMANTIC_MODEL_KEYS = ("scan_order", "attention", "input_norm")
_MAX_LISTED = 20


@dataclass
class InitSource:
    """The checkpoint ``train.init_from`` names: file, SHA-256 and payload; ``saved`` is None when the run resumes
    from its own checkpoint (the source is then not read at all)."""

    spec: str
    path: Path | None = None
    sha256: str | None = None
    saved: dict | None = None


def resolve_init_path(spec: str) -> Path:
    """``train.init_from`` -> a checkpoint file: a run directory gives its best checkpoint (as ``brainmt evaluate
    --checkpoint best``, damaged ones passed over), a file itself after its SHA-256 check; CheckpointError naming it."""
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if not (path / "checkpoints").is_dir() and ckpt.list_checkpoints(path):
                path = path.parent                     # the run's checkpoints/ folder was named
            return ckpt.resolve_checkpoint(path, "best")
        if path.is_file():
            return ckpt.resolve_checkpoint(path.parent, str(path))
    except CheckpointError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None
    raise CheckpointError(f"train.init_from: {path}: not found (expected a run directory or a checkpoint file)")


def open_init_source(cfg: Config, resuming: bool) -> InitSource | None:
    """The loaded ``train.init_from`` checkpoint (None without one; not loaded when the run resumes from a checkpoint
    of its own that loads); a missing, damaged or foreign file is a CheckpointError naming it."""
    spec = cfg.train.init_from
    if spec is None:
        return None
    if resuming:
        return InitSource(spec)
    path = resolve_init_path(spec)
    try:
        saved = ckpt.load_checkpoint(path, map_location="cpu")
    except CheckpointError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(f"train.init_from: {path}: not a brainmt checkpoint (no 'model' weights in it)")
    record = ckpt.record_path(path)
    digest = None
    if record.exists():              # load_checkpoint has just checked the file against it
        digest = json.loads(record.read_text()).get("sha256")
    check_fits(saved, cfg, path)
    return InitSource(spec, path, digest or sha256_file(path), saved)


def check_fits(saved: dict, cfg: Config, path: Path) -> None:
    """TrainingError listing the source's parameters that cannot be adapted to ``cfg.model`` (checked on a model
    built on the meta device: no memory, no random numbers drawn)."""
    with torch.device("meta"):
        target = build_model(cfg.model).state_dict()
    problems = adapt_weights(saved["model"], target, cfg.train.init_head == "keep")[2]
    if problems:
        raise _mismatch_error(path, problems, _model_differences(saved, cfg, path))


def _resized_embedding(name: str, have: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, str] | None:
    """A position embedding table resized to ``shape`` as :class:`BrainMT` resizes it at run time (temporal: linear,
    spatial: trilinear, corners aligned) and a note saying so; None for any other parameter or an embed_dim change."""
    if have.dim() != len(shape) or have.shape[:2] != shape[:2]:
        return None
    if name == "temporal_embed" and have.dim() == 3:
        out = resize_temporal(have.float(), int(shape[2]))
        return out.to(have.dtype), f"temporal embedding {have.shape[2]} -> {shape[2]} frames interpolated (linear)"
    if name == "pos_embed" and have.dim() == 5:
        out = resize_spatial(have.float(), tuple(int(s) for s in shape[2:]))
        grids = ["x".join(str(int(s)) for s in t[2:]) for t in (have.shape, shape)]
        return out.to(have.dtype), f"spatial embedding {grids[0]} -> {grids[1]} token grid interpolated (trilinear)"
    return None


def _in_head(name: str) -> bool:
    """Whether parameter or buffer ``name`` belongs to the head (``HEAD``)."""
    return name.split(".")[0] in HEAD


def adapt_weights(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                  keep_head: bool) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """``target`` (the new model's state_dict) with the source's weights put in, position embeddings resized, the head
    only with ``keep_head``. Returns the merged state, one note per resizing and one line per parameter that cannot
    be adapted (missing on either side, or another shape)."""
    merged, notes, problems = dict(target), [], []
    for name, want in target.items():
        if _in_head(name) and not keep_head:
            continue
        if name not in source:
            problems.append(f"{name}: {tuple(want.shape)} here, not in the source")
            continue
        have = source[name]
        if have.shape == want.shape:
            merged[name] = have
        elif (resized := _resized_embedding(name, have, want.shape)) is not None:
            merged[name], note = resized
            notes.append(note)
        else:
            problems.append(f"{name}: {tuple(have.shape)} in the source, {tuple(want.shape)} here")
    problems += [f"{name}: {tuple(source[name].shape)} in the source, not in this model" for name in source
                 if name not in target and not (_in_head(name) and not keep_head)]
    return merged, notes, problems


def _model_differences(saved: dict, cfg: Config, path: Path) -> dict[str, tuple]:
    """model.* settings of the source's config that differ from this run's (other than the resized and speed keys)."""
    try:
        source = config_to_dict(config_from_dict(saved["config"], str(path)))["model"]
    except (KeyError, TypeError, ConfigError):
        return {}
    mine = config_to_dict(cfg)["model"]
    return {k: (source.get(k), v) for k, v in mine.items() if k not in _FREE_MODEL_KEYS and source.get(k) != v}


def _mismatch_error(path: Path, problems: list[str], differences: dict[str, tuple]) -> TrainingError:
    """The error listing every parameter that cannot be adapted, with the model settings that explain it."""
    listed = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED
                                       else [])
    hint = ("; the source was trained with " + ", ".join(f"model.{k}={a!r} (here {b!r})" for k, (a, b) in
                                                          differences.items())) if differences else ""
    return TrainingError(f"train.init_from: {path} does not fit this model: {len(problems)} parameter(s) cannot be "
                         "adapted (only the temporal and spatial position embeddings are resized)" + hint + ":\n  "
                         + "\n  ".join(listed))


def load_initial_weights(model: torch.nn.Module, cfg: Config, source: InitSource) -> str:
    """Load ``source``'s weights into ``model`` (embeddings resized, the head per ``train.init_head``); returns what
    was loaded, for the run's log. TrainingError listing the parameters when the architectures differ."""
    if source.saved is None or source.path is None:
        raise ValueError(f"train.init_from={source.spec}: the source checkpoint was not loaded")
    saved, keep = source.saved, cfg.train.init_head == "keep"
    differences = _model_differences(saved, cfg, source.path)
    merged, notes, problems = adapt_weights(saved["model"], model.state_dict(), keep)
    if problems:
        raise _mismatch_error(source.path, problems, differences)
    model.load_state_dict(merged)
    for note in notes:
        log.info("train.init_from: %s", note)
    semantic = {k: v for k, v in differences.items() if k in _SEMANTIC_MODEL_KEYS}
    if semantic:
        log.warning("train.init_from: the source was trained with %s: its weights are loaded into a model that uses "
                    "them differently", ", ".join(f"model.{k}={a!r} (here {b!r})" for k, (a, b) in semantic.items()))
    data = saved.get("config", {}).get("data", {})
    task, target = data.get("task", "?"), data.get("target", "?")
    if keep and task != cfg.data.task:
        log.warning("train.init_head=keep: the head was trained for %s of '%s' and now serves %s of '%s'; its output "
                    "is re-learnt from there (train.init_head=reset starts a fresh head)", task, target,
                    cfg.data.task, cfg.data.target)
    if keep and cfg.data.task == "classification" and cfg.train.head_bias == "prior":
        log.info("train.init_head=keep with train.head_bias=prior: the loaded head's bias is set to this training "
                 "split's log-odds next (train.head_bias=zero keeps the loaded bias)")
    return (f"{source.path} (step {saved.get('step', '?')}, sha256 {source.sha256}; trained for {task} of "
            f"'{target}'); head {'kept' if keep else 'reset'}")


def _frozen(name: str, freeze: str) -> bool:
    """Whether parameter ``name`` belongs to the parts ``train.freeze`` names."""
    if freeze == "all-but-head":
        return not _in_head(name)
    top = name.split(".")[0]
    if freeze not in FROZEN_PARTS:
        raise ValueError(f"train.freeze: unknown part {freeze!r} (one of none, {', '.join(list(FROZEN_PARTS)[1:])}, "
                         "all-but-head)")
    return top in FROZEN_PARTS[freeze]


def freeze_parts(model: torch.nn.Module, freeze: str) -> int:
    """``requires_grad=False`` on the parts ``train.freeze`` names; returns how many values were frozen. Call it
    before the optimizer and DDP are built: frozen parameters then get no optimizer state, weight decay or gradient
    all-reduce (DDP leaves parameters that need no gradient out of its buckets)."""
    frozen = 0
    for name, p in model.named_parameters():
        if freeze != "none" and _frozen(name, freeze):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def prepare_model(model: torch.nn.Module, cfg: Config, source: InitSource | None) -> None:
    """``setup``'s one call: load ``train.init_from`` (unless the run resumes from its own checkpoint) and freeze
    ``train.freeze``'s parts (on resume too, so the optimizer's groups match its saved state), logging both."""
    if source is not None and source.saved is None:
        log.info("train.init_from=%s is not loaded again: this run resumes from its own checkpoint", source.spec)
    elif source is not None:
        log.info("train.init_from: initialised from %s", load_initial_weights(model, cfg, source))
        source.saved = None                           # the payload (optimizer state too) is not needed any more
    frozen = freeze_parts(model, cfg.train.freeze)
    if frozen:
        total = sum(p.numel() for p in model.parameters())
        log.info("train.freeze=%s: %d of %d parameters frozen, %d trained", cfg.train.freeze, frozen, total,
                 total - frozen)
