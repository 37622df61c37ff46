"""Trained runs opened, predicted and scored: ``load_run``, ``predict``, ``evaluate`` (shared by the training loop's
validation, ``brainmt evaluate``, the analysis and the benchmarks)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainmt.config import Config, ConfigError, config_from_dict
from brainmt.data.loader import EvalWindows, ShardSet
from brainmt.data.shards import ShardError
from brainmt.distributed import DistEnv, detect, device_for, init_distributed
from brainmt.models import build_model
from brainmt.train import checkpoint as ckpt
from brainmt.train.metrics import fit_platt, format_table, subject_metrics
from brainmt.train.step import autocast, normalise, task_loss


def open_shards(cfg: Config, shards_dir: str | Path | None) -> ShardSet:
    """The shard set of ``shards_dir`` (else ``data.shards``); a clear error when there is none."""
    path = shards_dir or cfg.data.shards
    if not path:
        raise ConfigError("no shard directory: pass --shards DIR or set data.shards")
    if not Path(path).is_dir():
        raise ShardError(f"{path}: shard directory not found (pass --shards DIR if the shards moved; make them with "
                         f"brainmt shard --output {path})")
    return ShardSet(path)


@dataclass
class LoadedRun:
    """A trained run's checkpoint opened: its path, the loaded payload, config, shards and target statistics."""

    checkpoint: Path
    saved: dict
    cfg: Config
    shards: ShardSet
    stats: dict


def load_run(run_dir: str | Path, checkpoint: str = "best", shards_dir: str | Path | None = None,
             map_location: str | torch.device = "cpu") -> LoadedRun:
    """Resolve and load a run's checkpoint (``best``, ``last`` or a path), its config and its shards (``shards_dir``,
    else the run's own); ShardError when the shards' volumes differ from those the run was trained on."""
    path = ckpt.resolve_checkpoint(Path(run_dir), checkpoint)
    saved = ckpt.load_checkpoint(path, map_location)
    cfg = config_from_dict(saved["config"], str(path))
    shards = open_shards(cfg, shards_dir)
    if list(cfg.model.volume_shape) != list(shards.volume_shape):
        raise ShardError(f"{shards.root}: volumes of {list(shards.volume_shape)} voxels, but run {run_dir} was trained "
                         f"on {list(cfg.model.volume_shape)}; pass the run's own shards")
    return LoadedRun(path, saved, cfg, shards, saved["target_stats"])


def run_calibration(saved: dict, cfg: Config) -> dict | None:
    """The checkpoint's Platt fit when the run calibrates (``train.calibration=platt``), else None."""
    return saved.get("calibration") if cfg.train.calibration == "platt" else None


def trained_model(cfg: Config, weights: Mapping[str, torch.Tensor], device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of ``cfg`` with a checkpoint's ``weights``, on ``device``."""
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    return model.to(device)


def param_digest(params: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of parameters, bit for bit (DDP replicas must give the same): a module's named_parameters(), or every
    entry of a name -> tensor mapping in its order (the same names and tensors give the same digest).

    A state_dict holds buffers too (and tied weights under each name): to match a module's digest, pass only its
    parameters, e.g. ``{n: state[n] for n, _ in model.named_parameters()}``.
    """
    named = params.named_parameters() if isinstance(params, torch.nn.Module) else params.items()
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in named:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dense_batch(shards: ShardSet, batch: dict, device: torch.device) -> torch.Tensor:
    """Packed float16 (B, T, n_brain) from the loader -> dense float32 (B, T, 1, D, H, W) on ``device``."""
    return torch.stack([shards.unpack(f.to(device, non_blocking=True), shards.scans[s]["background"])
                        for f, s in zip(batch["x"], batch["scan"])]).float()


@torch.no_grad()
def predict(model: torch.nn.Module, shards: ShardSet, scans: list[str], cfg: Config, device: torch.device,
            env: DistEnv) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Outputs for every evaluation window of ``scans`` on this rank's share, gathered on every rank.

    Returns (subjects, raw targets, model outputs) over all windows, in a fixed order.
    """
    model.eval()
    data = EvalWindows(shards, scans, cfg.data.num_frames, cfg.data.target, dense=False,
                       rank=env.rank, world_size=env.world_size)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers)
    rows: list[tuple[str, int, float, float]] = []
    for batch in loader:
        x = dense_batch(shards, batch, device)
        with autocast(device, cfg.train.precision):
            out = model(x).squeeze(1).float().cpu()
        rows += [(s, int(st), float(y), float(o)) for s, st, y, o in zip(batch["scan"], batch["start"], batch["y"], out)]
    if env.distributed:
        gathered: list = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    rows.sort(key=lambda r: (r[0], r[1]))
    bad = [r for r in rows if not np.isfinite(r[3])]
    if bad:
        scan, start = bad[0][0], bad[0][1]
        raise ShardError(f"{shards.root / 'shards' / shards.scans[scan]['shard']}: the model's output is not finite for "
                         f"scan {scan} (window from frame {start}; {len(bad)} window(s) in all); nothing was written. "
                         f"Check the shards with `brainmt verify --shards {shards.root}` and the checkpoint")
    subjects = [shards.scans[r[0]]["subject"] for r in rows]
    model.train()
    return subjects, np.array([r[2] for r in rows]), np.array([r[3] for r in rows])


def validate(model: torch.nn.Module, shards: ShardSet, scans: list[str], cfg: Config, device: torch.device,
             env: DistEnv, stats: dict) -> dict:
    """Validation loss and metrics (per subject); with ``train.calibration=platt`` the Platt fit, kept with the
    checkpoint and applied to the metrics. ``val_output_sd``: the raw outputs' sd across windows; near 0, the model
    gives every scan the same answer (a run "at the prior")."""
    subjects, targets, outputs = predict(model, shards, scans, cfg, device, env)
    y = normalise(torch.tensor(targets, dtype=torch.float32), stats)
    val_loss = float(task_loss(torch.tensor(outputs, dtype=torch.float32), y, stats["task"]))
    calibration = None
    if stats["task"] == "classification" and cfg.train.calibration == "platt":
        calibration = fit_platt(targets, outputs)
    metrics, _ = subject_metrics(subjects, targets, outputs, stats, calibration=calibration)
    return {"val_loss": val_loss, **{f"val_{k}": v for k, v in metrics.items()}, "val_windows": len(subjects),
            "val_output_sd": float(np.std(outputs)),
            "calibration": calibration}


def evaluate(run_dir: str | Path, split: str = "test", checkpoint: str = "best", shards_dir: str | Path | None = None,
             env: DistEnv | None = None, n_boot: int = 1000, force: bool = False) -> dict:
    """Evaluate a run's checkpoint on every window of a split; write predictions and metrics; return the metrics.

    Results of another checkpoint or other shards already written for the split are not replaced unless ``force``."""
    env = env or detect()
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError(f"{cfg_path}: not found; is {run_dir} a brainmt run directory?")
    loaded = load_run(run_dir, checkpoint, shards_dir)
    path, saved, cfg, shards, stats = loaded.checkpoint, loaded.saved, loaded.cfg, loaded.shards, loaded.stats
    scans = shards.scans_of(split)
    if not scans:
        raise ShardError(f"split {split!r} has no scans in {shards.root}")
    device = device_for(env, cfg.train.device)
    init_distributed(env, device)
    model = trained_model(cfg, saved["model"], device)
    subjects, targets, outputs = predict(model, shards, scans, cfg, device, env)
    calibration = run_calibration(saved, cfg)
    metrics, rows = subject_metrics(subjects, targets, outputs, stats, n_boot=n_boot, calibration=calibration)
    result = {**metrics, "split": split, "checkpoint": str(path), "step": saved["step"], "subjects": len(rows),
              "windows": len(subjects), "task": stats["task"], "target": stats["target"],
              "selected_by": saved.get("select_metric", "val_loss"), "calibration": calibration,
              "weights": ckpt.recorded_sha256(Path(path))}
    result["shards"] = str(Path(shards.root).resolve())
    if env.is_main:
        if not force:
            check_overwrite(run_dir, split, result)
        write_evaluation(run_dir, split, rows, result)
        print(format_table(metrics, f"{split} split: {len(rows)} subjects, {len(subjects)} windows, "
                                    f"checkpoint {path.name}"), flush=True)
    return result


def check_overwrite(run_dir: Path, split: str, result: dict) -> None:
    """ShardError when the split's metrics file holds the evaluation of another checkpoint (by name and, where both
    recorded it, by SHA-256: another run's step-N.pt) or other shards (the same one again, e.g. the end of a resumed
    run, may be rewritten)."""
    path = result_paths(run_dir, split)[1]
    if not path.exists():
        return
    old = json.loads(path.read_text())
    weights = old.get("weights"), result.get("weights")          # None: recorded by an older version, or no record
    same_checkpoint = Path(old.get("checkpoint", "")).name == Path(result["checkpoint"]).name and \
        (None in weights or weights[0] == weights[1])
    if same_checkpoint and old.get("shards", result["shards"]) == result["shards"]:
        return
    raise ShardError(f"{path}: holds the evaluation of {Path(old.get('checkpoint', '?')).name} on "
                     f"{old.get('shards', 'the run shards')}; this one ({Path(result['checkpoint']).name} on "
                     f"{result['shards']}) would replace it. Pass --force to replace it, or copy the run first")


def write_evaluation(run_dir: str | Path, split: str, rows: list[dict], result: dict) -> None:
    """predictions[-split].csv (one row a subject) and metrics[-split].json, as ``brainmt evaluate`` writes them."""
    predictions, metrics = result_paths(run_dir, split)
    predictions.parent.mkdir(parents=True, exist_ok=True)
    with predictions.open("w") as f:
        f.write("subject,target,prediction,windows\n")
        f.writelines(f"{r['subject']},{r['target']:.6g},{r['prediction']:.6g},{r['windows']}\n" for r in rows)
    metrics.write_text(json.dumps(result, indent=1) + "\n")


def result_paths(run_dir: str | Path, split: str) -> tuple[Path, Path]:
    """predictions[-split].csv and metrics[-split].json of a run (the test split's without a suffix)."""
    suffix = "" if split == "test" else f"-{split}"
    return Path(run_dir) / f"predictions{suffix}.csv", Path(run_dir) / f"metrics{suffix}.json"

