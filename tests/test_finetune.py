"""Fine-tuning (train.init_from, train.init_head, train.freeze): weights carried over, position embeddings resized,
parts frozen, clear errors, exact resume, DDP with frozen parameters."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import OVERRIDES, SignalAt, _train_losses, _weights

from brainmt.config import config_from_dict, load_config
from brainmt.distributed import detect
from brainmt.fileio import sha256_file
from brainmt.models import build_model
from brainmt.train import checkpoint as ckpt
from brainmt.train import finetune
from brainmt.train.checkpoint import CheckpointError
from brainmt.train.evaluation import trained_model
from brainmt.train.loop import Session, TrainingError, setup, train

FROZEN_BY_STEM_MAMBA = ("stem.", "mamba_blocks.", "pos_embed", "temporal_embed", "cls_token")


def _cfg(*extra: str):
    return load_config("debug", OVERRIDES + list(extra))


def _setup(cfg, shards: Path, run_dir: Path) -> Session:
    """A run set up to step 0 (weights loaded, frozen, optimizer built), without training."""
    return setup(cfg, shards, run_dir, None, detect(), ("train", "validation"))


def _optimized(s: Session) -> set[int]:
    return {id(p) for group in s.opt.param_groups for p in group["params"]}


@pytest.fixture(scope="module")
def sex_run(small_shards: Path, tmp_path_factory) -> Path:
    """A short run classifying sex: the source the fine-tuning runs start from."""
    run = tmp_path_factory.mktemp("sex") / "run"
    train(_cfg("data.task=classification", "data.target=sex", "train.epochs=1"), small_shards, run)
    return run


@pytest.fixture(scope="module")
def source(sex_run: Path) -> tuple[Path, dict]:
    """The sex run's best checkpoint file and its weights."""
    path = ckpt.resolve_checkpoint(sex_run, "best")
    return path, ckpt.load_checkpoint(path)["model"]


def test_a_sex_run_initialises_a_score_run(sex_run, source, small_shards, tmp_path):
    path, weights = source
    s = _setup(_cfg(f"train.init_from={sex_run}"), small_shards, tmp_path / "score")
    state = s.model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in state if not k.startswith("head."))
    torch.manual_seed(s.cfg.train.seed)
    fresh = build_model(s.cfg.model).state_dict()
    for k in ("head.weight", "head.bias"):                     # reset: the head a run from scratch starts with
        assert torch.equal(state[k], fresh[k]) and not torch.equal(state[k], weights[k])
    assert _optimized(s) == {id(p) for p in s.model.parameters()}
    assert s.cfg.train.init_from == str(sex_run) and f"init_from: {sex_run}" in (tmp_path / "score" / "config.yaml").read_text()
    logged = (tmp_path / "score" / "logs" / "rank-0.log").read_text()
    assert f"initialised from {path} (step 6, sha256 {sha256_file(path)}; trained for classification of 'sex'); " \
           "head reset" in logged

    # keep: the head is loaded too; a classification head serving regression is allowed, with a warning
    s = _setup(_cfg(f"train.init_from={sex_run}", "train.init_head=keep"), small_shards, tmp_path / "keep")
    assert all(torch.equal(v, weights[k]) for k, v in s.model.state_dict().items())
    assert "WARNING brainmt.train.finetune: train.init_head=keep: the head was trained for classification of 'sex' " \
           "and now serves regression of 'cognition'" in (tmp_path / "keep" / "logs" / "rank-0.log").read_text()

    # sex again, head reset: train.head_bias=prior still sets the fresh head's bias to the training log-odds
    s = _setup(_cfg(f"train.init_from={path}", "data.task=classification", "data.target=sex"), small_shards,
               tmp_path / "sex")
    p = s.stats["positive_fraction"]
    assert s.model.head.bias.item() == pytest.approx(torch.log(torch.tensor(p / (1 - p))).item())
    assert torch.equal(s.model.head.weight, fresh["head.weight"])


def test_another_frame_count_and_grid_are_interpolated(sex_run, source, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="brainmt")
    path, weights = source
    cfg = load_config("debug", ["model.num_frames=12", "model.volume_shape=[36,24,20]", f"train.init_from={sex_run}"])
    init = finetune.open_init_source(cfg, resuming=False)
    model = build_model(cfg.model)
    assert model.grid == (3, 2, 2)
    finetune.load_initial_weights(model, cfg, init)
    expected = F.interpolate(weights["temporal_embed"], size=12, mode="linear", align_corners=True)
    assert model.temporal_embed.shape == (1, 32, 12) and torch.equal(model.temporal_embed.detach(), expected)
    expected = F.interpolate(weights["pos_embed"], size=(3, 2, 2), mode="trilinear", align_corners=True)
    assert model.pos_embed.shape == (1, 32, 3, 2, 2) and torch.equal(model.pos_embed.detach(), expected)
    assert "temporal embedding 8 -> 12 frames interpolated (linear)" in caplog.text
    grid = "x".join(str(n) for n in weights["pos_embed"].shape[2:])      # the shards' cropped volume: 1x2x1
    assert f"spatial embedding {grid} -> 3x2x2 token grid interpolated (trilinear)" in caplog.text

    # a 12-frame table loaded from an 8-frame one computes what the source computes on 12 frames at run time
    trained = config_from_dict(ckpt.load_checkpoint(path)["config"])
    cfg = load_config("debug", ["model.num_frames=12", f"model.volume_shape={trained.model.volume_shape}",
                                f"train.init_from={sex_run}", "train.init_head=keep"])
    tuned = build_model(cfg.model)
    finetune.load_initial_weights(tuned, cfg, finetune.open_init_source(cfg, resuming=False))
    original = trained_model(trained, weights)
    x = torch.randn(2, 12, 1, *trained.model.volume_shape)
    with torch.no_grad():
        torch.testing.assert_close(tuned.eval()(x), original.eval()(x))


def test_bad_init_from_fails_before_anything_is_written(sex_run, source, small_shards, tmp_path):
    assert finetune.resolve_init_path(str(sex_run / "checkpoints")) == source[0]    # the run's folder named
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"train.init_from: .*nowhere: not found \(expected a run directory or a "):
        train(_cfg(f"train.init_from={tmp_path / 'nowhere'}"), small_shards, run)
    (tmp_path / "untrained").mkdir()
    with pytest.raises(CheckpointError, match=r"train.init_from: .*untrained/checkpoints: no checkpoints"):
        train(_cfg(f"train.init_from={tmp_path / 'untrained'}"), small_shards, run)
    damaged = tmp_path / "copy" / "step-000000006.pt"         # a copy with its record, one byte changed
    damaged.parent.mkdir()
    shutil.copy(source[0], damaged)
    shutil.copy(ckpt.record_path(source[0]), ckpt.record_path(damaged))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"train.init_from: .*step-000000006.pt: damaged: its SHA-256"):
        train(_cfg(f"train.init_from={damaged}"), small_shards, run)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"train.init_from: .*garbage.pt: unreadable checkpoint"):
        train(_cfg(f"train.init_from={tmp_path / 'garbage.pt'}"), small_shards, run)
    assert not (run / "config.yaml").exists()
    # the corrected path starts the same run directory (no clash with a config of the failed attempts)
    assert train(_cfg(f"train.init_from={sex_run}"), small_shards, run, stop_at_step=1)["step"] == 1


def test_a_shape_mismatch_lists_the_parameters(sex_run, small_shards, tmp_path):
    with pytest.raises(TrainingError, match=r"(?s)does not fit this model: 17 parameter\(s\) cannot be adapted .*"
                                            r"model.mamba_depth=2 \(here 3\).*mamba_blocks.2.norm.weight: \(32,\) here, "
                                            "not in the source"):
        train(_cfg(f"train.init_from={sex_run}", "model.mamba_depth=3"), small_shards, tmp_path / "deeper")
    assert not (tmp_path / "deeper" / "config.yaml").exists()
    with pytest.raises(TrainingError, match=r"(?s)model.embed_dim=32 \(here 64\).*pos_embed: \(1, 32, 1, 2, 1\) in the "
                                            r"source, \(1, 64, 1, 2, 1\) here.*\.\.\. and \d+ more"):
        train(_cfg(f"train.init_from={sex_run}", "model.embed_dim=64"), small_shards, tmp_path / "wider")


def test_freeze_stem_mamba_and_exact_resume(source, small_shards, tmp_path):
    copy = tmp_path / "source.pt"                  # a checkpoint file named directly
    shutil.copy(source[0], copy)
    weights = source[1]
    cfg = _cfg(f"train.init_from={copy}", "train.freeze=stem+mamba", "data.num_frames=12", "model.num_frames=12")
    full = train(cfg, small_shards, tmp_path / "full")
    assert full["status"] == "finished" and full["step"] == 12
    first = train(cfg, small_shards, tmp_path / "resumed", sink=SignalAt(tmp_path / "resumed" / "metrics.jsonl", 4))
    assert first["status"] == "interrupted" and first["step"] == 5
    copy.unlink()                                  # a resuming run reads its own checkpoint, not init_from
    second = train(cfg, small_shards, tmp_path / "resumed")
    assert second["status"] == "finished" and second["step"] == 12
    assert "is not loaded again: this run resumes from its own checkpoint" in \
        (tmp_path / "resumed" / "logs" / "rank-0.log").read_text()
    assert _train_losses(tmp_path / "resumed") == _train_losses(tmp_path / "full")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # frozen: bit-identical to the source (the temporal table as interpolated to 12 frames); the rest trained
    start = dict(weights, temporal_embed=F.interpolate(weights["temporal_embed"], size=12, mode="linear",
                                                       align_corners=True))
    frozen = [k for k in a if k.startswith(FROZEN_BY_STEM_MAMBA)]
    assert len(frozen) == 26 + 3 + 2 * 17 and all(torch.equal(a[k], start[k]) for k in frozen)
    assert all(not torch.equal(a[k], start[k]) for k in a if k not in frozen)
    saved = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "full" / "checkpoints")[-1][1])
    assert len(saved["optimizer"]["state"]) == len(a) - len(frozen)          # no optimizer state for frozen ones


def test_all_but_head_is_a_linear_probe(sex_run, source, small_shards, tmp_path):
    cfg = _cfg(f"train.init_from={sex_run}", "train.freeze=all-but-head", "train.epochs=1")
    s = _setup(cfg, small_shards, tmp_path / "probe")
    assert [n for n, p in s.model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert _optimized(s) == {id(s.model.head.weight), id(s.model.head.bias)}
    assert train(cfg, small_shards, tmp_path / "probe")["step"] == 6
    w, weights = _weights(tmp_path / "probe"), source[1]
    assert all(torch.equal(w[k], weights[k]) for k in w if not k.startswith("head."))
    assert not torch.equal(w["head.weight"], s.model.head.weight.detach())


def test_frozen_parameters_under_ddp(sex_run, source, small_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "brainmt.cli", "train", "--config", "debug", "--shards", str(small_shards), "--run-dir",
           str(tmp_path / "ddp"), "--no-evaluate", *OVERRIDES, "train.epochs=1", f"train.init_from={sex_run}",
           "train.freeze=stem+mamba"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training finished at step 3/3" in proc.stdout    # replicas were compared before the evaluation
    w, weights = _weights(tmp_path / "ddp"), source[1]
    assert all(torch.equal(w[k], weights[k]) == k.startswith(FROZEN_BY_STEM_MAMBA) for k in w)
    for rank in (0, 1):
        assert "train.freeze=stem+mamba: " in (tmp_path / "ddp" / "logs" / f"rank-{rank}.log").read_text()


def test_head_norm_counts_as_part_of_the_head():
    """A run with ``model.head_norm=running`` starts from a source without it: its standardisation starts fresh with
    the reset head; keeping the head asks for the source's, which is not there."""
    source = build_model(load_config("debug").model).state_dict()
    target = build_model(load_config("debug", ["model.head_norm=running"]).model).state_dict()
    merged, _, problems = finetune.adapt_weights(source, target, keep_head=False)
    assert problems == [] and torch.equal(merged["head_norm.updates"], target["head_norm.updates"])
    assert torch.equal(merged["cls_token"], source["cls_token"])
    _, _, problems = finetune.adapt_weights(source, target, keep_head=True)
    assert problems and all(p.startswith("head_norm.") for p in problems)
