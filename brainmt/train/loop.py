"""Train and evaluate one run. Knows nothing of SLURM or Ray: launchers call :func:`train` and :func:`evaluate`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brainmt import signals
from brainmt.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config
from brainmt.data.loader import EvalWindows, ShardSet, TrainStream
from brainmt.data.shards import ShardError
from brainmt.distributed import DistEnv, cleanup, detect, device_for, init_distributed
from brainmt.models import build_model
from brainmt.train import checkpoint as ckpt
from brainmt.train.logging import JsonlSink, MetricsSink, setup_run_logging
from brainmt.train.metrics import (
    classification_metrics,
    format_table,
    per_subject,
    regression_metrics,
    with_intervals,
)
from brainmt.train.state import capture_rng, optimizer_groups, restore_rng, warmup_cosine

log = logging.getLogger("brainmt.train")
FORMAT = 1
# keys that may change when a run resumes; anything else must match the run's config.yaml
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.checkpoint_every_steps", "train.keep_last",
                     "train.device", "data.shards", "data.num_workers", "cluster", "sweep", "analysis", "name")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible resume); the message says why and what was kept."""


class StopFlag:
    """Set by SIGTERM / SIGUSR2 (or a test hook); the loop checkpoints at the next step boundary and returns."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGUSR2 (main thread only)."""
        self._previous = signals.install((signal.SIGTERM, signal.SIGUSR2), self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        """Put the previous handlers back."""
        signals.restore(self._previous)
        self._previous = {}


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """Raise TrainingError if ``run_dir`` was started with settings that may not change on resume."""
    stored_path = run_dir / "config.yaml"
    if not stored_path.exists():
        return
    stored = config_to_dict(load_config(stored_path))
    new = config_to_dict(cfg)
    diffs = []
    for section, values in new.items():
        if not isinstance(values, dict):
            if values != stored.get(section) and section not in RESUMABLE_CHANGES:
                diffs.append(section)
            continue
        for key, value in values.items():
            full = f"{section}.{key}"
            if value != stored[section].get(key) and full not in RESUMABLE_CHANGES and section not in RESUMABLE_CHANGES:
                diffs.append(f"{full}: {stored[section].get(key)!r} -> {value!r}")
    if diffs:
        raise TrainingError(f"{stored_path}: this run was started with another configuration ({'; '.join(diffs)}). "
                            "Resume it unchanged, train into a new --run-dir, or (jobs/launch.py) pass --force to move it aside")


def target_stats(shards: ShardSet, scans: list[str], target: str, task: str) -> dict:
    """The task, target and (regression) the training subjects' mean and std that targets are z-scored with."""
    held = shards.manifest.get("targets") or sorted(shards.scans[scans[0]]["targets"])
    if target not in held:
        raise ConfigError(f"data.target: '{target}' is not a target in {shards.root}; the shards hold {held}")
    values = {shards.scans[s]["subject"]: shards.target(s, target) for s in scans}
    arr = np.array(list(values.values()), dtype=np.float64)
    if task == "classification":
        bad = sorted(set(arr.tolist()) - {0.0, 1.0})
        if bad:
            raise ConfigError(f"data.task=classification needs a 0/1 target; '{target}' has values {bad[:5]}")
        return {"task": "classification", "target": target, "positive_fraction": float(arr.mean())}
    std = float(arr.std())
    return {"task": "regression", "target": target, "mean": float(arr.mean()), "std": std if std > 0 else 1.0}


def _normalise(y: torch.Tensor, stats: dict) -> torch.Tensor:
    return (y - stats["mean"]) / stats["std"] if stats["task"] == "regression" else y


def _loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    return F.mse_loss(out, y) if task == "regression" else F.binary_cross_entropy_with_logits(out, y)


def replicas_agree(model: torch.nn.Module) -> bool:
    """True when every rank holds the same weights (compares a float64 checksum across ranks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
        device = next(model.parameters()).device
        lo, hi = total.clone().to(device), total.clone().to(device)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    return bool(lo == hi)


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


def compute_loss(forward, x: torch.Tensor, y: torch.Tensor, task: str, device: torch.device, precision: str) -> torch.Tensor:
    """Model output (autocast as configured) -> the task's loss in fp32."""
    with autocast(device, precision):
        out = forward(x).squeeze(1).float()
    return _loss(out, y, task)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` ("bf16" or "fp16") on a CUDA device; a no-op for fp32 or another device."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _open_shards(cfg: Config, shards_dir: str | Path | None) -> ShardSet:
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
    shards = _open_shards(cfg, shards_dir)
    if list(cfg.model.volume_shape) != list(shards.volume_shape):
        raise ShardError(f"{shards.root}: volumes of {list(shards.volume_shape)} voxels, but run {run_dir} was trained "
                         f"on {list(cfg.model.volume_shape)}; pass the run's own shards")
    return LoadedRun(path, saved, cfg, shards, saved["target_stats"])


def trained_model(cfg: Config, weights: Mapping[str, torch.Tensor], device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of ``cfg`` with a checkpoint's ``weights``, on ``device``."""
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    return model.to(device)


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
    subjects = [shards.scans[r[0]]["subject"] for r in rows]
    model.train()
    return subjects, np.array([r[2] for r in rows]), np.array([r[3] for r in rows])


def to_predictions(outputs: np.ndarray, stats: dict) -> np.ndarray:
    """Model outputs (one per window) -> predictions in the target's units: probabilities (classification) or
    de-z-scored values (regression); callers average them per subject."""
    outputs = np.asarray(outputs)
    if stats["task"] == "regression":
        return outputs * stats["std"] + stats["mean"]
    return 1.0 / (1.0 + np.exp(-outputs))


def subject_metrics(subjects: list[str], targets: np.ndarray, outputs: np.ndarray, stats: dict,
                    n_boot: int = 0) -> tuple[dict, list[dict]]:
    """Per-subject averaged predictions and the task's metrics (with bootstrap intervals if ``n_boot``)."""
    fn = regression_metrics if stats["task"] == "regression" else classification_metrics
    table = per_subject(subjects, targets, to_predictions(outputs, stats))
    y = np.array([v[0] for v in table.values()])
    p = np.array([v[1] for v in table.values()])
    rows = [{"subject": s, "target": t, "prediction": pr, "windows": n} for s, (t, pr, n) in table.items()]
    if n_boot:
        return with_intervals(fn, y, p, n_boot=n_boot), rows
    return fn(y, p), rows


def _validate(model, shards, scans, cfg, device, env, stats) -> dict:
    subjects, targets, outputs = predict(model, shards, scans, cfg, device, env)
    y = _normalise(torch.tensor(targets, dtype=torch.float32), stats)
    val_loss = float(_loss(torch.tensor(outputs, dtype=torch.float32), y, stats["task"]))
    metrics, _ = subject_metrics(subjects, targets, outputs, stats)
    return {"val_loss": val_loss, **{f"val_{k}": v for k, v in metrics.items()}, "val_windows": len(subjects)}


def train(cfg: Config, shards_dir: str | Path | None, run_dir: str | Path, sink: MetricsSink | None = None,
          stop_at_step: int | None = None, env: DistEnv | None = None) -> dict:
    """Train (or resume) the run in ``run_dir``; returns {"status", "step", "epoch", "best_val_loss", "best_step"}.

    status is "finished", "early_stopped" or "interrupted" (a signal or ``stop_at_step``: a checkpoint was
    saved at the step boundary and the run can be resumed by calling train again on the same run_dir).
    """
    env = env or detect()
    run_dir = Path(run_dir)
    shards = _open_shards(cfg, shards_dir)               # bad paths fail before any work starts
    cfg.data.shards = str(Path(shards.root).resolve())
    if list(cfg.model.volume_shape) != list(shards.volume_shape):
        cfg.model.volume_shape = list(shards.volume_shape)   # the token grid follows the data's cropped grid
    train_scans, val_scans = shards.scans_of("train"), shards.scans_of("validation")
    if not train_scans or not val_scans:
        raise ShardError(f"{shards.root / 'splits.json'}: the train and validation splits need scans "
                         f"(have {len(train_scans)} and {len(val_scans)})")
    stats = target_stats(shards, train_scans, cfg.data.target, cfg.data.task)
    check_resume_config(run_dir, cfg)
    setup_run_logging(run_dir, env.rank)
    device = device_for(env, cfg.train.device)
    init_distributed(env, device)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "target_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    sink = sink or (JsonlSink(run_dir / "metrics.jsonl") if env.is_main else None)
    precision = cfg.train.precision if device.type == "cuda" else "fp32"
    if precision != cfg.train.precision:
        log.info("train.precision=%s applies on GPUs; training on %s in fp32", cfg.train.precision, device)

    torch.manual_seed(cfg.train.seed)                    # identical initial weights on every rank
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(optimizer_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    b, w, acc = cfg.train.batch_size, env.world_size, cfg.optim.accumulate_steps
    samples_per_epoch = cfg.data.samples_per_epoch or sum(
        max(1, shards.scans[s]["frames"] // cfg.data.num_frames) for s in train_scans)
    steps_per_epoch = max(1, math.ceil(samples_per_epoch / (b * w * acc)))
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total_steps, cfg.optim.min_lr / cfg.optim.lr))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    state = {"step": 0, "epoch": 0, "micro_batches": 0, "best_metric": None, "best_step": None, "bad_evals": 0,
             "loss_sum": 0.0, "loss_count": 0}

    resumed = ckpt.latest_checkpoint(run_dir / "checkpoints", map_location="cpu")
    if resumed:
        path, saved = resumed
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state.update({k: saved[k] for k in state})
        rng = saved["rng"]
        if saved["world_size"] == w:
            restore_rng(rng[env.rank], device)
        else:
            log.warning("resuming %d ranks from a checkpoint of %d: RNG streams are reseeded", w, saved["world_size"])
            torch.manual_seed(cfg.train.seed + 1000 * state["step"] + env.rank)
        log.info("resumed from %s at step %d (epoch %d)", path, state["step"], state["epoch"])
    else:
        torch.manual_seed(cfg.train.seed + env.rank)     # dropout / drop-path streams differ per rank
    ddp_model = model
    if env.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    stream = TrainStream(shards, train_scans, cfg.data.num_frames, cfg.data.target, seed=cfg.train.seed,
                         align=cfg.data.crop_align, dense=False, rank=env.rank, world_size=w,
                         skip_batches=state["micro_batches"], batch_size=b)
    loader = torch.utils.data.DataLoader(stream, batch_size=b, num_workers=cfg.data.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    batches = iter(loader)

    last_saved = {"step": -1}

    def save(reason: str) -> Path | None:
        last_saved["step"] = state["step"]
        rngs = capture_rng(device)
        if env.distributed:
            gathered: list = [None] * w
            torch.distributed.all_gather_object(gathered, rngs)
            rngs_all = gathered
        else:
            rngs_all = [rngs]
        if not env.is_main:
            return None
        payload = {"format": FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                   **state, "rng": rngs_all, "world_size": w, "config": config_to_dict(cfg), "target_stats": stats}
        path = ckpt.save_checkpoint(run_dir / "checkpoints", state["step"], payload, cfg.train.keep_last,
                                    state["best_step"])
        log.info("checkpoint %s (%s)", path.name, reason)
        return path

    stop = StopFlag()
    stop.install()
    status = "finished"
    show_bar = env.is_main and sys.stderr.isatty()
    bar = None
    if show_bar:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step")
    log.info("training %s: %d steps (%d a epoch, global batch %d), task %s on '%s', %d train / %d validation scans",
             cfg.name, total_steps, steps_per_epoch, b * w * acc, stats["task"], stats["target"],
             len(train_scans), len(val_scans))
    model.train()
    t_log, samples_since, steps_since = time.perf_counter(), 0, 0
    wait_since, wait_total, steps_run = 0.0, 0.0, 0          # loader wait: time blocked on the next batch
    try:
        while state["step"] < total_steps:
            loss_sum = torch.zeros((), device=device)
            for micro in range(acc):
                t_wait = time.perf_counter()
                batch = next(batches)
                waited = time.perf_counter() - t_wait
                wait_since += waited
                wait_total += waited
                x = dense_batch(shards, batch, device)
                y = _normalise(batch["y"].to(device), stats)
                sync = contextlib.nullcontext() if (micro == acc - 1 or not env.distributed) else ddp_model.no_sync()
                with sync:
                    loss = compute_loss(ddp_model, x, y, stats["task"], device, precision) / acc
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            flags = torch.tensor([0.0 if torch.isfinite(loss_sum) else 1.0,
                                  1.0 if (stop.reason or stop_at_step == state["step"] + 1) else 0.0], device=device)
            if env.distributed:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= w
            if flags[0] > 0:
                raise TrainingError(
                    f"non-finite training loss at step {state['step'] + 1} (epoch {state['epoch']}); stopped without "
                    f"saving. The last good checkpoint is kept in {run_dir / 'checkpoints'}; lower optim.lr, check the "
                    "data, or use train.precision=bf16")
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["micro_batches"] += acc
            state["loss_sum"] += float(loss_sum)
            state["loss_count"] += 1
            samples_since += b * w * acc
            steps_since += 1
            steps_run += 1
            if bar is not None:
                bar.update(1)
            if state["step"] % cfg.train.log_every == 0:
                if env.is_main:
                    now = time.perf_counter()
                    record = {"step": state["step"], "epoch": state["epoch"],
                              "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
                              "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                              "samples_per_s": samples_since / max(now - t_log, 1e-9),
                              "step_s": (now - t_log) / max(steps_since, 1),
                              "loader_wait_s": wait_since / max(steps_since, 1)}
                    if sink:
                        sink.log(record)
                    if not show_bar:
                        log.info("step %d/%d  loss %.4f  lr %.2e  %.2f samples/s  loader wait %.3f s/step", state["step"],
                                 total_steps, record["train_loss"], record["lr"], record["samples_per_s"],
                                 record["loader_wait_s"])
                state["loss_sum"], state["loss_count"] = 0.0, 0
                t_log, samples_since, steps_since, wait_since = time.perf_counter(), 0, 0, 0.0
            saved_now = False
            if state["step"] % steps_per_epoch == 0:
                state["epoch"] += 1
                if state["epoch"] % cfg.train.eval_every_epochs == 0 or state["step"] == total_steps:
                    if not replicas_agree(model):
                        raise TrainingError(f"the DDP replicas hold different weights at step {state['step']}")
                    val = _validate(model, shards, val_scans, cfg, device, env, stats)
                    improved = state["best_metric"] is None or val["val_loss"] < state["best_metric"]
                    if improved:
                        state["best_metric"], state["best_step"], state["bad_evals"] = val["val_loss"], state["step"], 0
                    else:
                        state["bad_evals"] += 1
                    saved_path = save("evaluation")
                    saved_now = True
                    if env.is_main:   # after the save: a sink may hand the checkpoint on (the Ray Tune reporter does)
                        if sink:
                            sink.log({"step": state["step"], "epoch": state["epoch"], **val,
                                      "checkpoint": str(saved_path)})
                        log.info("epoch %d: %s", state["epoch"],
                                 "  ".join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float)))
                    if state["bad_evals"] >= cfg.train.early_stopping_patience:
                        status = "early_stopped"
                        log.info("early stopping: no better validation loss for %d evaluations", state["bad_evals"])
                        break
            if cfg.train.checkpoint_every_steps and state["step"] % cfg.train.checkpoint_every_steps == 0 and not saved_now:
                save("periodic")
                saved_now = True
            if saved_now:                                 # throughput windows leave evaluation and saving out
                t_log, samples_since, steps_since, wait_since = time.perf_counter(), 0, 0, 0.0
            if flags[1] > 0:
                if not saved_now:
                    save(f"stop requested ({stop.reason or 'test hook'})")
                else:
                    log.info("stop requested (%s): the checkpoint of step %d is written", stop.reason or "test hook",
                             state["step"])
                status = "interrupted"
                break
        if status == "finished" and last_saved["step"] != state["step"]:
            save("end of training")
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        del batches
    if env.distributed:
        torch.distributed.barrier()   # rank 0 has finished writing (and pruning) checkpoints before anyone reads them
    if env.is_main:
        try:
            from brainmt.train.plots import plot_curves

            plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        except Exception:  # a figure is not worth failing a finished run for
            log.exception("could not draw %s", run_dir / "curves.png")
    return {"status": status, "step": state["step"], "epoch": state["epoch"],
            "best_val_loss": state["best_metric"], "best_step": state["best_step"], "total_steps": total_steps,
            "loader_wait_s": wait_total / max(steps_run, 1), "param_digest": param_digest(model)}


def evaluate(run_dir: str | Path, split: str = "test", checkpoint: str = "best", shards_dir: str | Path | None = None,
             env: DistEnv | None = None, n_boot: int = 1000) -> dict:
    """Evaluate a run's checkpoint on every window of a split; write predictions and metrics; return the metrics."""
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
    metrics, rows = subject_metrics(subjects, targets, outputs, stats, n_boot=n_boot)
    result = {**metrics, "split": split, "checkpoint": str(path), "step": saved["step"], "subjects": len(rows),
              "windows": len(subjects), "task": stats["task"], "target": stats["target"]}
    if env.is_main:
        write_evaluation(run_dir, split, rows, result)
        print(format_table(metrics, f"{split} split: {len(rows)} subjects, {len(subjects)} windows, "
                                    f"checkpoint {path.name}"), flush=True)
    return result


def write_evaluation(run_dir: str | Path, split: str, rows: list[dict], result: dict) -> None:
    """predictions[-split].csv (one row a subject) and metrics[-split].json, as ``brainmt evaluate`` writes them."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if split == "test" else f"-{split}"
    with (run_dir / f"predictions{suffix}.csv").open("w") as f:
        f.write("subject,target,prediction,windows\n")
        f.writelines(f"{r['subject']},{r['target']:.6g},{r['prediction']:.6g},{r['windows']}\n" for r in rows)
    (run_dir / f"metrics{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")


def run(cfg: Config, shards_dir: str | Path | None, run_dir: str | Path, evaluate_split: str | None = "test",
        sink: MetricsSink | None = None) -> dict:
    """The one main: train (resuming), then evaluate the best checkpoint unless the run was interrupted."""
    env = detect()
    try:
        result = train(cfg, shards_dir, run_dir, sink=sink, env=env)
        if result["status"] != "interrupted" and evaluate_split:
            result["evaluation"] = evaluate(run_dir, evaluate_split, "best", shards_dir, env=env)
        return result
    finally:
        cleanup()
