"""Train one run. Knows nothing of SLURM or Ray: launchers call :func:`train` or :func:`run`.

:func:`train` reads as the algorithm: set up, resume, then for each step a batch, an optimizer step, a log line,
and at the end of an epoch a validation, a checkpoint and the early-stopping test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from brainmt import signals
from brainmt.config import Config, config_to_dict, save_config, select_metric, selection_key
from brainmt.data.loader import ShardSet, TrainStream
from brainmt.distributed import DistEnv, cleanup, detect, device_for, init_distributed
from brainmt.models import build_model
from brainmt.train import checkpoint as ckpt
from brainmt.train import finetune
from brainmt.train.evaluation import dense_batch, evaluate, open_shards, param_digest, validate
from brainmt.train.run_config import TrainingError, check_data, check_global_batch, check_resume_config, resolve
from brainmt.train.runlog import MetricsSink, setup_run_logging
from brainmt.train.state import capture_rng, optimizer_groups, restore_rng, warmup_cosine
from brainmt.train.step import compute_loss, jitter_intensity, normalise, replicas_agree
from brainmt.train.trackers import RunSink, make_sink

log = logging.getLogger("brainmt.train")
FORMAT = 1
__all__ = ["TrainingError", "train", "run", "StopFlag", "TrainState"]


class StopFlag:
    """Set by SIGTERM, SIGUSR2 or SIGINT (or a test hook); the loop checkpoints at the next step boundary and
    returns. A second SIGINT (Ctrl-C twice) stops at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch SIGTERM, SIGUSR2 and SIGINT (main thread only)."""
        self._previous = signals.install((signal.SIGTERM, signal.SIGUSR2, signal.SIGINT), self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.reason == "SIGINT":
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again to quit at once)",
                  file=sys.stderr, flush=True)
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        """Put the previous handlers back."""
        signals.restore(self._previous)
        self._previous = {}


@dataclass
class TrainState:
    """What a checkpoint carries besides the weights: progress, the best validation so far, the loss being averaged."""

    step: int = 0
    epoch: int = 0
    micro_batches: int = 0
    best_metric: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


@dataclass
class Session:
    """Everything a run builds once: its resolved config, data, model, optimizer and where it writes."""

    cfg: Config
    run_dir: Path
    env: DistEnv
    device: torch.device
    precision: str
    shards: ShardSet
    splits: dict[str, list[str]]
    stats: dict
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    total_steps: int
    sink: MetricsSink | None
    calibration: dict | None = None
    resume_from: tuple[Path, dict] | None = None     # the newest readable checkpoint, found before anything is written


def train(cfg: Config, shards_dir: str | Path | None, run_dir: str | Path, sink: MetricsSink | None = None,
          stop_at_step: int | None = None, env: DistEnv | None = None,
          splits: tuple[str, ...] = ("train", "validation")) -> dict:
    """Train (or resume) the run in ``run_dir``; returns {"status", "step", "epoch", "best_metric", "best_step", ...}.

    status is "finished", "early_stopped" or "interrupted" (a signal or ``stop_at_step``: a checkpoint was saved at
    the step boundary and calling train again on the same run_dir resumes). ``cfg`` is not changed.
    """
    s = setup(cfg, shards_dir, Path(run_dir), sink, env or detect(), splits)
    state = resume(s)
    batches = training_iterator(s, state)
    stop, status, saved_step = StopFlag(), stopped_early(s, state), -1
    stop.install()
    meter = Throughput()
    try:
        while status == "finished" and state.step < s.total_steps:
            loss, grad_norm, asked_to_stop = train_step(s, state, batches, meter, stop, stop_at_step)
            meter.step(s, state, loss, grad_norm)
            if state.step % s.steps_per_epoch == 0:
                state.epoch += 1
                if state.epoch % s.cfg.train.eval_every_epochs == 0 or state.step == s.total_steps:
                    early = validate_and_save(s, state)
                    saved_step = state.step
                    if early:
                        status = "early_stopped"
                        break
            if s.cfg.train.checkpoint_every_steps and state.step % s.cfg.train.checkpoint_every_steps == 0 \
                    and saved_step != state.step:
                save(s, state, "periodic")
                saved_step = state.step
            if saved_step == state.step:
                meter.reset()                            # throughput windows leave evaluation and saving out
            if asked_to_stop:
                why = stop.reason or "test hook"
                if saved_step != state.step:
                    save(s, state, f"stop requested ({why})")
                else:
                    log.info("stop requested (%s): the checkpoint of step %d is written", why, state.step)
                status = "interrupted"
                break
        if status == "finished" and saved_step != state.step:
            save(s, state, "end of training")
    finally:
        stop.restore()
        meter.close()
        del batches
    return finish(s, state, status, meter)


def setup(cfg: Config, shards_dir: str | Path | None, run_dir: Path, sink: MetricsSink | None, env: DistEnv,
          splits: tuple[str, ...]) -> Session:
    """Open and check the data, resolve and save the config, build model, optimizer and schedule."""
    shards = open_shards(cfg, shards_dir)               # bad paths and data fail before any work starts
    cfg = resolve(cfg, shards)
    scans, stats = check_data(cfg, shards, splits)
    check_resume_config(run_dir, cfg)
    found = ckpt.latest_checkpoint(run_dir / "checkpoints", map_location="cpu")
    if found:
        check_global_batch(*found, cfg, env.world_size)
    init_source = finetune.open_init_source(cfg, resuming=found is not None)   # a bad one fails before any write
    setup_run_logging(run_dir, env.rank)
    if env.is_main:
        for path in ckpt.set_aside_newer(run_dir / "checkpoints", int(found[1]["step"]) if found else -1):
            log.warning("%s could not be read: renamed to %s.damaged", path, path.name)
    device = device_for(env, cfg.train.device)
    init_distributed(env, device)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "target_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    precision = cfg.train.precision if device.type == "cuda" else "fp32"
    if precision != cfg.train.precision:
        log.info("train.precision=%s applies on GPUs; training on %s in fp32", cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)                    # identical initial weights on every rank
    model = build_model(cfg.model).to(device)
    finetune.prepare_model(model, cfg, init_source)      # train.init_from weights, train.freeze (before optimizer, DDP)
    init_head_bias(model, cfg, stats)
    o = cfg.optim
    opt = torch.optim.AdamW(optimizer_groups(model, o.weight_decay, o.lr, o.layer_decay), lr=o.lr,
                            betas=tuple(o.betas), eps=o.eps)
    global_batch = cfg.train.batch_size * env.world_size * o.accumulate_steps
    samples_per_epoch = cfg.data.samples_per_epoch or sum(
        max(1, shards.scans[s]["frames"] // cfg.data.num_frames) for s in scans["train"])
    steps_per_epoch = max(1, math.ceil(samples_per_epoch / global_batch))
    total = cfg.train.epochs * steps_per_epoch
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total, o.min_lr / o.lr))
    ddp_model = model
    if env.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    log.info("training %s: %d steps (%d a epoch, global batch %d), task %s on '%s', %d train / %d validation scans; "
             "best checkpoint by %s", cfg.name, total, steps_per_epoch, global_batch, stats["task"], stats["target"],
             len(scans["train"]), len(scans["validation"]), select_metric(cfg)[0])
    return Session(cfg, run_dir, env, device, precision, shards, scans, stats, model, ddp_model, opt, sched,
                   torch.amp.GradScaler("cuda", enabled=precision == "fp16"), steps_per_epoch, total,
                   make_sink(cfg, run_dir, sink, main=env.is_main), resume_from=found)


def init_head_bias(model: torch.nn.Module, cfg: Config, stats: dict) -> None:
    """``train.head_bias=prior``: a classifier's output bias starts at the training set's log-odds, so the first
    steps are not spent learning the class balance."""
    if cfg.train.head_bias != "prior" or stats["task"] != "classification":
        return
    p = min(max(stats["positive_fraction"], 1e-3), 1 - 1e-3)
    with torch.no_grad():
        model.head.bias.fill_(math.log(p / (1 - p)))


def resume(s: Session) -> TrainState:
    """The state of the newest readable checkpoint (weights, optimizer, schedule, RNG streams), or a fresh one."""
    found, s.resume_from = s.resume_from, None
    if not found:
        torch.manual_seed(s.cfg.train.seed + s.env.rank)     # dropout / drop-path streams differ per rank
        return TrainState()
    path, saved = found
    s.model.load_state_dict(saved["model"])
    s.opt.load_state_dict(saved["optimizer"])
    s.sched.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):
        s.scaler.load_state_dict(saved["scaler"])
    state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
    s.calibration = saved.get("calibration")
    before, now = saved.get("select_metric", "val_loss"), select_metric(s.cfg)[0]
    if before != now:
        log.warning("%s picked its best checkpoint by %s; from now on by %s", path, before, now)
        state.best_metric = None
    if saved["world_size"] == s.env.world_size:
        restore_rng(saved["rng"][s.env.rank], s.device)
    else:
        log.warning("resuming %d ranks from a checkpoint of %d: RNG streams are reseeded", s.env.world_size,
                    saved["world_size"])
        torch.manual_seed(s.cfg.train.seed + 1000 * state.step + s.env.rank)
    log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
    return state


def stopped_early(s: Session, state: TrainState) -> str:
    """"early_stopped" when the resumed checkpoint is the one where early stopping ended the run (a re-run of an
    early-stopped run does not train on), else "finished"."""
    if state.bad_evals < s.cfg.train.early_stopping_patience:
        return "finished"
    log.info("the run stopped early at step %d (no better %s for %d evaluations): nothing to train", state.step,
             select_metric(s.cfg)[0], state.bad_evals)
    return "early_stopped"


def training_iterator(s: Session, state: TrainState) -> Iterator[dict]:
    """The training batches' iterator, made without moving the CPU random stream that :func:`resume` restored (a
    DataLoader draws its base seed from it): a resumed run then draws the jitter and drop-path of the one it resumes."""
    cpu = torch.get_rng_state()
    batches = iter(training_batches(s, state))
    torch.set_rng_state(cpu)
    return batches


def training_batches(s: Session, state: TrainState) -> torch.utils.data.DataLoader:
    """This rank's endless stream of random training windows, continuing after the batches already used."""
    b = s.cfg.train.batch_size
    stream = TrainStream(s.shards, s.splits["train"], s.cfg.data.num_frames, s.cfg.data.target, seed=s.cfg.train.seed,
                         align=s.cfg.data.crop_align, dense=False, rank=s.env.rank, world_size=s.env.world_size,
                         skip_batches=state.micro_batches, batch_size=b)
    return torch.utils.data.DataLoader(stream, batch_size=b, num_workers=s.cfg.data.num_workers,
                                       pin_memory=s.device.type == "cuda", persistent_workers=False)


def train_step(s: Session, state: TrainState, batches, meter: Throughput, stop: StopFlag,
               stop_at_step: int | None) -> tuple[float, float, bool]:
    """One optimizer step over ``optim.accumulate_steps`` micro-batches; returns the loss (mean over ranks), the
    gradient norm and whether any rank was asked to stop. A non-finite loss, or (without fp16's scaler, which skips
    such steps) a non-finite gradient, stops training before the update."""
    acc, cfg = s.cfg.optim.accumulate_steps, s.cfg
    loss_sum = torch.zeros((), device=s.device)
    for micro in range(acc):
        batch = meter.next_batch(batches)
        x = jitter_intensity(dense_batch(s.shards, batch, s.device), cfg.data.intensity_jitter)
        y = normalise(batch["y"].to(s.device), s.stats)
        last = micro == acc - 1 or not s.env.distributed
        with contextlib.nullcontext() if last else s.ddp_model.no_sync():
            loss = compute_loss(s.ddp_model, x, y, s.stats["task"], s.device, s.precision, cfg.train.label_smoothing)
            s.scaler.scale(loss / acc).backward()
        loss_sum += loss.detach() / acc
    flags = torch.tensor([0.0 if torch.isfinite(loss_sum) else 1.0,
                          1.0 if (stop.reason or stop_at_step == state.step + 1) else 0.0], device=s.device)
    if s.env.distributed:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= s.env.world_size
    if flags[0] > 0:
        raise non_finite(s, state, "training loss")
    s.scaler.unscale_(s.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.optim.grad_clip)
    if not s.scaler.is_enabled() and not torch.isfinite(grad_norm):   # the same on every rank: gradients are reduced
        raise non_finite(s, state, "gradient")
    s.scaler.step(s.opt)
    s.scaler.update()
    s.sched.step()
    s.opt.zero_grad(set_to_none=True)
    state.step += 1
    state.micro_batches += acc
    return float(loss_sum), float(grad_norm), bool(flags[1] > 0)


def non_finite(s: Session, state: TrainState, what: str) -> TrainingError:
    """The error that stops a run at a step whose ``what`` is not finite, before its update: nothing is saved."""
    return TrainingError(
        f"non-finite {what} at step {state.step + 1} (epoch {state.epoch}); stopped without saving. The last "
        f"good checkpoint is kept in {s.run_dir / 'checkpoints'}; lower optim.lr, check the data, or use "
        "train.precision=bf16")


def validate_and_save(s: Session, state: TrainState) -> bool:
    """Validate, update the best (by ``train.select_metric``; ties go to the lower validation loss), checkpoint and
    log; returns True when early stopping ends the run."""
    if not replicas_agree(s.model):
        raise TrainingError(f"the DDP replicas hold different weights at step {state.step}")
    val = validate(s.model, s.shards, s.splits["validation"], s.cfg, s.device, s.env, s.stats)
    s.calibration = val.pop("calibration")
    name, mode = select_metric(s.cfg)
    value = val[name]
    better = state.best_metric is None or \
        selection_key(name, value, val["val_loss"]) > selection_key(name, state.best_metric, state.best_val_loss)
    if better and math.isfinite(value):
        state.best_metric, state.best_val_loss, state.best_step, state.bad_evals = value, val["val_loss"], state.step, 0
    else:
        state.bad_evals += 1
    path = save(s, state, "evaluation", {"name": name, "mode": mode, "value": value})
    if s.env.is_main:      # after the save: a sink may hand the checkpoint on (the Ray Tune reporter does)
        if s.sink:
            s.sink.log({"step": state.step, "epoch": state.epoch, **val, "checkpoint": str(path)})
        log.info("epoch %d: %s", state.epoch, "  ".join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float)))
    if state.bad_evals >= s.cfg.train.early_stopping_patience:
        log.info("early stopping: no better %s for %d evaluations", name, state.bad_evals)
        return True
    return False


def save(s: Session, state: TrainState, reason: str, metric: dict | None = None) -> Path | None:
    """Checkpoint everything :func:`resume` needs (every rank's RNG streams gathered); rank 0 writes it."""
    rngs = [capture_rng(s.device)]
    if s.env.distributed:
        rngs = [None] * s.env.world_size
        torch.distributed.all_gather_object(rngs, capture_rng(s.device))
    if not s.env.is_main:
        return None
    payload = {"format": FORMAT, "model": s.model.state_dict(), "optimizer": s.opt.state_dict(),
               "scheduler": s.sched.state_dict(), "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else None,
               **dataclasses.asdict(state), "rng": rngs, "world_size": s.env.world_size,
               "config": config_to_dict(s.cfg), "target_stats": s.stats, "select_metric": select_metric(s.cfg)[0],
               "calibration": s.calibration}
    path = ckpt.save_checkpoint(s.run_dir / "checkpoints", state.step, payload, s.cfg.train.keep_last, state.best_step,
                                metric)
    log.info("checkpoint %s (%s)", path.name, reason)
    return path


class Throughput:
    """The training loss averaged between log lines, samples per second, time blocked on the loader, the progress
    bar (at a terminal) and the periodic log record."""

    def __init__(self) -> None:
        self.bar = None
        self.wait_total, self.steps_run = 0.0, 0
        self.reset()

    def reset(self) -> None:
        """Start a new measurement window (after a log line, an evaluation or a save)."""
        self.t0, self.samples, self.steps, self.wait = time.perf_counter(), 0, 0, 0.0

    def next_batch(self, batches) -> dict:
        """The next batch, timing the wait for it."""
        t = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - t
        self.wait += waited
        self.wait_total += waited
        return batch

    def step(self, s: Session, state: TrainState, loss: float, grad_norm: float) -> None:
        """Count a finished step; every ``train.log_every`` steps log the record (rank 0) and start a new window."""
        state.loss_sum += loss
        state.loss_count += 1
        self.samples += s.cfg.train.batch_size * s.env.world_size * s.cfg.optim.accumulate_steps
        self.steps += 1
        self.steps_run += 1
        if self.bar is None and s.env.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=s.total_steps, initial=state.step - 1, desc="train", unit="step")
        if self.bar is not None:
            self.bar.update(1)
        if state.step % s.cfg.train.log_every:
            return
        if s.env.is_main:
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            record = {"step": state.step, "epoch": state.epoch, "train_loss": state.loss_sum / max(1, state.loss_count),
                      "lr": s.sched.get_last_lr()[-1], "grad_norm": grad_norm, "samples_per_s": self.samples / elapsed,
                      "step_s": elapsed / max(self.steps, 1), "loader_wait_s": self.wait / max(self.steps, 1)}
            if s.sink:
                s.sink.log(record)
            if self.bar is None:
                log.info("step %d/%d  loss %.4f  lr %.2e  %.2f samples/s  loader wait %.3f s/step", state.step,
                         s.total_steps, record["train_loss"], record["lr"], record["samples_per_s"],
                         record["loader_wait_s"])
        state.loss_sum, state.loss_count = 0.0, 0
        self.reset()

    def close(self) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()


def finish(s: Session, state: TrainState, status: str, meter: Throughput) -> dict:
    """After the last step: every rank waits for rank 0's checkpoints, rank 0 draws the curves; the summary."""
    if s.env.distributed:
        torch.distributed.barrier()
    if s.env.is_main:
        try:
            from brainmt.train.plots import plot_curves

            plot_curves(s.run_dir / "metrics.jsonl", s.run_dir / "curves.png")
        except Exception:  # a figure is not worth failing a finished run for
            log.exception("could not draw %s", s.run_dir / "curves.png")
        if isinstance(s.sink, RunSink):
            s.sink.end_training(status)      # closes the trackers setup() opened; run() closes its own after evaluating
    name, mode = select_metric(s.cfg)
    return {"status": status, "step": state.step, "epoch": state.epoch, "select_metric": name, "select_mode": mode,
            "best_metric": state.best_metric, "best_val_loss": state.best_val_loss, "best_step": state.best_step,
            "total_steps": s.total_steps, "loader_wait_s": meter.wait_total / max(meter.steps_run, 1),
            "param_digest": param_digest(s.model)}


def run(cfg: Config, shards_dir: str | Path | None, run_dir: str | Path, evaluate_split: str | None = "test",
        sink: MetricsSink | None = None) -> dict:
    """The one main: train (resuming), then evaluate the best checkpoint unless the run was interrupted.

    On rank 0 the trackers of ``train.loggers`` (started by setup from the resolved config) also receive the
    evaluation, and are closed here at the end, whatever the outcome."""
    env = detect()
    tracked = RunSink(sink) if env.is_main else sink
    status = "failed"
    try:
        result = train(cfg, shards_dir, run_dir, sink=tracked, env=env,
                       splits=("train", "validation", *([evaluate_split] if evaluate_split else [])))
        if result["status"] != "interrupted" and evaluate_split:
            # the run's own evaluation: a resumed run that trained further replaces it
            result["evaluation"] = evaluate(run_dir, evaluate_split, "best", shards_dir, env=env, force=True)
            if isinstance(tracked, RunSink):
                tracked.log_evaluation(result["evaluation"], result["step"], result["epoch"])
        status = result["status"]
        return result
    finally:
        if isinstance(tracked, RunSink):
            tracked.close(status)
        cleanup()
