"""Training and evaluation: exact resume, DDP on gloo, checkpoints, NaN, metrics, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_helpers import ddp_step_worker, running_standardize_worker, sgd_steps

from brainmt.config import ConfigError, load_config
from brainmt.data.shards import ShardError
from brainmt.train import checkpoint as ckpt
from brainmt.train.evaluation import evaluate
from brainmt.train.loop import TrainingError, train
from brainmt.train.metrics import auroc, classification_metrics, per_subject, regression_metrics, with_intervals
from brainmt.tune.ray_cluster import free_port

OVERRIDES = ["data.num_frames=8", "model.num_frames=8", "train.epochs=2", "data.samples_per_epoch=24",
             "train.log_every=1", "train.keep_last=2"]


@pytest.fixture
def shards(small_shards: Path) -> Path:
    return small_shards


def _cfg(*extra):
    return load_config("debug", OVERRIDES + list(extra))


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


def _weights(run_dir: Path) -> dict:
    return ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir / "checkpoints")[-1][1])["model"]


class SignalAt:
    """A metrics sink that sends this process SIGUSR2 when step ``k`` is logged (a real preemption signal)."""

    def __init__(self, path: Path, k: int) -> None:
        from brainmt.train.runlog import JsonlSink

        self.inner, self.k = JsonlSink(path), k

    def log(self, record: dict) -> None:
        self.inner.log(record)
        if record.get("step") == self.k and "train_loss" in record:
            os.kill(os.getpid(), signal.SIGUSR2)


@pytest.mark.parametrize("extra", [[], ["data.intensity_jitter=0.1"]], ids=["plain", "jitter"])
def test_interrupted_run_resumes_to_the_same_result(shards, tmp_path, extra):
    """Also with draws from the CPU generator each step (jitter), which a resume must continue where it left off."""
    full = train(_cfg(*extra), shards, tmp_path / "full")
    assert full["status"] == "finished" and full["step"] == 12
    first = train(_cfg(*extra), shards, tmp_path / "resumed",
                  sink=SignalAt(tmp_path / "resumed" / "metrics.jsonl", 4))
    assert first["status"] == "interrupted" and first["step"] == 5       # the signal is honoured at the next step
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [5]
    second = train(_cfg(*extra), shards, tmp_path / "resumed", stop_at_step=9)
    assert second["status"] == "interrupted" and second["step"] == 9
    third = train(_cfg(*extra), shards, tmp_path / "resumed")
    assert third["status"] == "finished" and third["step"] == 12
    # same data order, RNG and optimizer state: bitwise equal on the CPU
    assert _train_losses(tmp_path / "resumed") == _train_losses(tmp_path / "full")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert third["best_metric"] == full["best_metric"]
    for name in ("config.yaml", "curves.png", "target_stats.json", "logs/rank-0.log"):
        assert (tmp_path / "full" / name).exists(), name


def test_evaluate_writes_per_subject_predictions_and_intervals(shards, tmp_path):
    train(_cfg("data.task=classification", "data.target=sex"), shards, tmp_path / "run")
    result = evaluate(tmp_path / "run", "test", "best", n_boot=200)
    assert set(result) >= {"accuracy", "balanced_accuracy", "auroc", "subjects", "windows"}
    for key in ("accuracy", "balanced_accuracy", "auroc"):
        lo, hi = result[key]["ci95"]
        assert lo <= result[key]["value"] <= hi
    lines = (tmp_path / "run" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "subject,target,prediction,windows" and len(lines) == 1 + result["subjects"]
    assert all(int(line.split(",")[3]) == 3 for line in lines[1:])          # 24 frames: windows at 0, 8, 16
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["task"] == "classification"
    reg = evaluate(tmp_path / "run", "validation", "last", n_boot=50)
    assert (tmp_path / "run" / "predictions-validation.csv").exists() and reg["split"] == "validation"


def test_ddp_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    torch.manual_seed(1)
    x, y = torch.randn(4, 4, 1, 20, 24, 20), torch.randn(4)
    port = free_port("127.0.0.1")
    torch.multiprocessing.spawn(ddp_step_worker, args=(2, port, x, y, str(tmp_path / "ddp.pt")), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    rank0, rank1 = ddp["params"]
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))        # replicas identical
    from brainmt.models import build_model

    torch.manual_seed(0)
    model = build_model(load_config("debug").model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = [loss.item() for loss in sgd_steps(model, opt, x, y)]
    # the mean of two half-batch losses is the full-batch loss; the gradient all-reduce sums in another order
    # (float32 rounding). SGD, not Adam: Adam divides by sqrt(v), so parameters whose gradient is ~1e-9
    # would turn that rounding into a whole step of difference.
    np.testing.assert_allclose(ddp["losses"], losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(rank0, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_head_norm_statistics_under_ddp_are_the_global_batch_s_on_every_rank(tmp_path):
    """``model.head_norm: running`` under two gloo processes, each with its own part of every batch (3 and 2 rows):
    both ranks hold the same running mean and variance, equal to one process's that saw the whole batches."""
    from brainmt.models.layers import RunningStandardize

    torch.manual_seed(2)
    batches = [torch.randn(5, 6) * 3 + 7 for _ in range(4)]
    torch.multiprocessing.spawn(running_standardize_worker, args=(2, free_port("127.0.0.1"), batches, str(tmp_path / "b")),
                                nprocs=2)
    ranks = [torch.load(tmp_path / f"b.{r}", weights_only=True) for r in (0, 1)]
    one = RunningStandardize(6).train()
    for x in batches:
        one(x)
    for rank in ranks:
        assert int(rank["updates"]) == 4
        for name in ("mean", "var"):
            torch.testing.assert_close(rank[name], getattr(one, name), rtol=1e-5, atol=1e-6)


def test_ddp_training_under_torchrun(shards, tmp_path):
    """Two processes under torchrun train one model (with ``head_norm: running``, whose statistics all-reduce inside
    DDP's forward); the last checkpoint's statistics have seen every step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "brainmt.cli", "train", "--config", "debug", "--shards", str(shards), "--run-dir", str(tmp_path / "ddp"),
           *OVERRIDES, "model.head_norm=running"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "logs" / "rank-1.log").exists()
    assert "init gloo process group: rank 1/2" in (tmp_path / "ddp" / "logs" / "rank-1.log").read_text()
    assert "training finished at step 6/6" in proc.stdout                  # global batch 8: half the steps
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["subjects"] > 0
    last = max((tmp_path / "ddp" / "checkpoints").glob("step-*.pt"))
    assert int(torch.load(last, weights_only=False)["model"]["head_norm.updates"]) == 6


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    ckpt.save_checkpoint(directory, 1, {"w": torch.ones(3), "step": 1}, keep_last=2, best_step=None)

    def half_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="quota"):
        ckpt.save_checkpoint(directory, 2, {"w": torch.zeros(3), "step": 2}, keep_last=2, best_step=None)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(directory)] == [1]
    assert sorted(directory.iterdir()) == [ckpt.record_path(ckpt.checkpoint_path(directory, 1)),
                                           ckpt.checkpoint_path(directory, 1)]   # no temporary left
    path, state = ckpt.latest_checkpoint(directory)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_pruning_after_resuming_before_an_unreadable_checkpoint_keeps_the_new_ones(tmp_path):
    """Resumed at 900 past a damaged 1000: the new 950 and 960 are the last two, not 960 and the damaged file."""
    directory = tmp_path / "checkpoints"
    for step in (900, 1000):
        ckpt.save_checkpoint(directory, step, {"step": step}, keep_last=2, best_step=None)
    ckpt.checkpoint_path(directory, 1000).write_bytes(b"garbage")
    assert ckpt.latest_checkpoint(directory)[1]["step"] == 900
    for step in (950, 960):
        ckpt.save_checkpoint(directory, step, {"step": step}, keep_last=2, best_step=None)
    assert [s for s, _ in ckpt.list_checkpoints(directory)] == [950, 960, 1000]   # the damaged one is not deleted
    assert ckpt.latest_checkpoint(directory)[1]["step"] == 960


def test_unreadable_checkpoints_after_the_resumed_one_are_set_aside(shards, tmp_path):
    """Stopped at step 6 with checkpoints 5 and 6; 6 damaged (its file, or its record cut short): the run resumes
    from 5, renames 6 to *.damaged (kept, not counted or picked) and finishes."""
    for damage in ("file", "record"):
        run_dir = tmp_path / damage
        cfg = _cfg("train.checkpoint_every_steps=1")
        assert train(cfg, shards, run_dir, stop_at_step=6)["step"] == 6
        six = ckpt.checkpoint_path(run_dir / "checkpoints", 6)
        (six if damage == "file" else ckpt.record_path(six)).write_text("garbage" if damage == "file" else '{"sha2')
        assert train(cfg, shards, run_dir)["step"] == 12
        assert six.with_name(six.name + ".damaged").exists() and 6 not in dict(ckpt.list_checkpoints(six.parent))
        assert [s for s, _ in ckpt.list_checkpoints(six.parent)][-2:] == [11, 12]


def test_a_rerun_of_an_early_stopped_run_does_not_train_on(shards, tmp_path, monkeypatch):
    """Validation that never improves stops the run at its second evaluation (patience 1); running it again keeps
    that end instead of training past it."""
    import brainmt.train.loop as loop

    flat = {"val_loss": 0.7, "val_accuracy": 0.5, "val_balanced_accuracy": 0.5, "val_auroc": 0.5, "calibration": None}
    monkeypatch.setattr(loop, "validate", lambda *args, **kwargs: dict(flat))
    cfg = _cfg("data.task=classification", "data.target=sex", "train.epochs=4", "train.early_stopping_patience=1")
    first = train(cfg, shards, tmp_path / "run")
    assert first["status"] == "early_stopped" and first["step"] == 12 and first["best_step"] == 6
    again = train(cfg, shards, tmp_path / "run")
    assert again["status"] == "early_stopped" and again["step"] == 12
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [6, 12]


def test_a_split_of_one_class_is_refused_before_any_work(shards, tmp_path):
    """Validation of one class: AUROC, which picks the best checkpoint, is undefined; training of one class: nothing
    to learn. Each names splits.json, the split and the class; with val_loss picking, one-class validation is fine."""
    import shutil

    from brainmt.data.loader import ShardSet
    from brainmt.train.run_config import check_data

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    splits = json.loads((copy / "splits.json").read_text())
    sex = {s["subject"]: s["targets"]["sex"] for s in json.loads((copy / "manifest.json").read_text())["scans"].values()}
    held_out = splits["validation"] + splits["test"]
    ones = [s for s in held_out if sex[s] == 1.0]
    splits["validation"], splits["test"] = ones, [s for s in held_out if s not in ones]
    (copy / "splits.json").write_text(json.dumps(splits))
    cfg = _cfg("data.task=classification", "data.target=sex")
    with pytest.raises(ShardError, match=r"splits.json: every scan of the validation split has sex = 1 .*val_auroc"):
        train(cfg, copy, tmp_path / "run")
    assert not (tmp_path / "run").exists()                                 # nothing written
    check_data(_cfg("data.task=classification", "data.target=sex", "train.select_metric=val_loss"), ShardSet(copy),
               ("train", "validation"))
    splits["train"] = [s for s in splits["train"] if sex[s] == 0.0]
    (copy / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(ShardError, match=r"every scan of the train split has sex = 0 .*nothing to learn"):
        train(cfg, copy, tmp_path / "run")


def test_resume_with_another_global_batch_is_refused_and_names_the_setting_that_keeps_it(shards, tmp_path):
    """Batch 4 on one rank, then batch 2: refused before anything is written, naming optim.accumulate_steps=2;
    batch 2 with 2 accumulation steps (the same global batch) resumes and ends where an unchanged run ends."""
    from brainmt.train.run_config import ResumeConflict

    run_dir = tmp_path / "run"
    assert train(_cfg(), shards, run_dir, stop_at_step=3)["status"] == "interrupted"
    config_before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ResumeConflict, match=r"global batch of 4 .* now 2\. .*optim\.accumulate_steps=2"):
        train(_cfg("train.batch_size=2"), shards, run_dir)
    assert (run_dir / "config.yaml").read_text() == config_before
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [3]
    done = train(_cfg("train.batch_size=2", "optim.accumulate_steps=2"), shards, run_dir)
    assert done["status"] == "finished" and done["step"] == done["total_steps"] == 12


def test_keep_last_and_best_and_weights_only(shards, tmp_path):
    train(_cfg("train.checkpoint_every_steps=1", "train.keep_last=2"), shards, tmp_path / "run")
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    last = torch.load(ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", steps[-1]), weights_only=True)
    assert steps[-2:] == [11, 12] and last["best_step"] in steps and len(steps) <= 3
    assert ckpt.resolve_checkpoint(tmp_path / "run", "best").name == f"step-{last['best_step']:09d}.pt"
    # an unreadable newest checkpoint: resume falls back to the previous complete one
    ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 12).write_bytes(b"garbage")
    path, state = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert state["step"] == 11


@pytest.mark.parametrize("what", ["training loss", "gradient"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch, what):
    """At step 4 the output is NaN (the loss), or only its gradient is infinite (a finite loss whose update would
    write NaN weights into the next checkpoint)."""
    from brainmt.models.brainmt import BrainMT

    original = BrainMT.forward
    calls = {"n": 0}

    def sometimes_bad(self, x):
        calls["n"] += 1
        out = original(self, x)
        if calls["n"] != 4:
            return out
        if what == "gradient":
            out.register_hook(lambda grad: grad * float("inf"))
            return out
        return out * float("nan")

    monkeypatch.setattr(BrainMT, "forward", sometimes_bad)
    with pytest.raises(TrainingError, match=f"non-finite {what} at step 4.*last good checkpoint is kept"):
        train(_cfg("train.checkpoint_every_steps=1"), shards, tmp_path / "run")
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert kept[-1][0] == 3
    assert all(torch.isfinite(w).all() for w in ckpt.load_checkpoint(kept[-1][1])["model"].values() if w.is_floating_point())


def test_bad_configuration_and_missing_shards_fail_before_work(shards, tmp_path):
    with pytest.raises(ShardError, match="nope: shard directory not found"):
        train(_cfg(), tmp_path / "nope", tmp_path / "run")
    with pytest.raises(ConfigError, match="no shard directory"):
        train(_cfg(), None, tmp_path / "run")
    with pytest.raises(ConfigError, match="needs a 0/1 target; 'cognition' has values"):
        train(_cfg("data.task=classification", "data.target=cognition"), shards, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data.target: 'iq' is not a target in .*; the shards hold \['sex', 'cognition'\]"):
        train(_cfg("data.target=iq"), shards, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    train(_cfg("train.epochs=1"), shards, tmp_path / "run2")
    with pytest.raises(TrainingError, match=r"another configuration \(optim.lr: 0.001 -> 0.5\)"):
        train(_cfg("optim.lr=0.5"), shards, tmp_path / "run2")
    assert train(_cfg("train.epochs=2"), shards, tmp_path / "run2")["step"] == 12      # more epochs may resume
    proc = subprocess.run([sys.executable, "-m", "brainmt.cli", "train", "--config", "debug", "--shards",
                           str(tmp_path / "missing"), "--run-dir", str(tmp_path / "r3"), "optim.lr=-1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "optim.lr: must be positive" in proc.stderr


def test_metrics_against_hand_computation():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 1.5, 3.5, 5.0])
    m = regression_metrics(y, p)
    assert m["mse"] == pytest.approx((0.25 + 0.25 + 0.25 + 1.0) / 4)
    assert m["mae"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)
    yc, pc = y - y.mean(), p - p.mean()
    assert m["pearson_r"] == pytest.approx((yc * pc).sum() / np.sqrt((yc**2).sum() * (pc**2).sum()))
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.6, 0.6, 0.8, 0.4])
    c = classification_metrics(labels, probs)
    assert c["accuracy"] == pytest.approx(3 / 5)                  # predictions 0 1 1 1 0
    assert c["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # positive/negative pairs: (0.6,0.1)=1 (0.6,0.6)=.5 (0.8,*)=2 (0.4,0.1)=1 (0.4,0.6)=0 -> 4.5/6
    assert c["auroc"] == pytest.approx(4.5 / 6)
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))
    table = per_subject(["b", "a", "b", "b", "a"], [1, 0, 1, 1, 0], [0.9, 0.2, 0.6, 0.3, 0.4])
    assert list(table) == ["a", "b"]
    assert table["a"] == (0.0, pytest.approx(0.3), 2) and table["b"] == (1.0, pytest.approx(0.6), 3)
    with pytest.raises(ValueError, match="different targets"):
        per_subject(["a", "a"], [0, 1], [0.1, 0.2])
    ci = with_intervals(regression_metrics, y, p, n_boot=200)
    assert ci["mse"]["ci95"][0] <= ci["mse"]["value"] <= ci["mse"]["ci95"][1]
