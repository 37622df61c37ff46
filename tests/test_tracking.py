"""Experiment tracking (train.loggers): TensorBoard event files, an offline W&B run and an MLflow file store, read
back after a run that is interrupted and resumed; the clear error when an optional logger's extra is missing."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest

from brainmt.config import ConfigError, load_config
from brainmt.train import checkpoint as ckpt
from brainmt.train.loop import run, train
from brainmt.train.trackers import IDS_FILE, make_sink

# 2 epochs of 3 steps (validation at steps 3 and 6), a training record every step
OVERRIDES = ["data.num_frames=8", "model.num_frames=8", "train.epochs=2", "data.samples_per_epoch=12",
             "train.log_every=1", "train.keep_last=2"]


def _cfg(*extra):
    return load_config("debug", OVERRIDES + list(extra))


def _jsonl(run_dir: Path, key: str) -> dict[int, float]:
    """Step -> value of ``key`` in metrics.jsonl (a step logged again after a resume: the last value)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def _test_metrics(run_dir: Path) -> dict[str, float]:
    """metrics.json's point estimates, as the trackers name them (test_<metric>)."""
    return {f"test_{k}": v["value"] for k, v in json.loads((run_dir / "metrics.json").read_text()).items()
            if isinstance(v, dict) and "value" in v}


# --- TensorBoard: the event files, read as TensorBoard reads them ---------------------------------------------

def _events(directory: Path) -> list:
    """Every event of the directory's event files, in TensorBoard's order (files by name, records in order)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):                    # TFRecord: length (u64), its CRC, the event, the event's CRC
            (length,) = struct.unpack("<Q", data[i:i + 8])
            events.append(Event.FromString(data[i + 12:i + 12 + length]))
            i += 16 + length
    return events


def _scalars(directory: Path) -> dict[str, dict[int, float]]:
    """Tag -> step -> value as TensorBoard shows them: a session start at step s hides the earlier events >= s.
    A step shown twice is an error, but for ``epoch`` (a step that ends an epoch has the training record of the
    epoch and the validation record of the next)."""
    from tensorboardX.proto.event_pb2 import SessionLog

    seen: dict[str, list[tuple[int, float]]] = {}
    for event in _events(directory):
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            seen = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in seen.items()}
        for value in event.summary.value:
            if value.HasField("simple_value"):
                seen.setdefault(value.tag, []).append((event.step, value.simple_value))
    for tag, points in seen.items():
        assert tag == "epoch" or len({s for s, _ in points}) == len(points), f"{tag}: a step shown twice: {points}"
    return {tag: dict(points) for tag, points in seen.items()}


def test_tensorboard_scalars_continue_in_the_same_directory_after_resumes(small_shards, tmp_path):
    run_dir, cfg = tmp_path / "run", _cfg("train.loggers=[jsonl,tensorboard]")
    tb = run_dir / "tensorboard"
    assert train(cfg, small_shards, run_dir, stop_at_step=2)["status"] == "interrupted"
    losses = _scalars(tb)["train_loss"]
    assert sorted(losses) == [1, 2]
    assert losses == pytest.approx(_jsonl(run_dir, "train_loss"), rel=1e-6)   # float32 in the event file
    # a second session dies after step 5 before its checkpoint is safe: the third one runs steps 4 and 5 again
    assert train(cfg, small_shards, run_dir, stop_at_step=5)["status"] == "interrupted"
    for step, path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        if step == 5:
            path.unlink()
            ckpt.record_path(path).unlink(missing_ok=True)
    result = run(cfg, small_shards, run_dir)
    assert result["status"] == "finished" and result["step"] == 6
    assert len(list(tb.glob("events.out.tfevents.*"))) == len(list(tb.iterdir())) == 3   # a file a session
    starts = [e.step for e in _events(tb) if e.HasField("session_log")]
    assert starts == [1, 3, 4]                 # each session's first step: TensorBoard hides the repeated 4 and 5
    scalars = _scalars(tb)
    assert sorted(scalars["train_loss"]) == list(range(1, 7))
    assert scalars["train_loss"] == pytest.approx(_jsonl(run_dir, "train_loss"), rel=1e-6)
    assert sorted(scalars["val_loss"]) == [3, 6] and {"lr", "grad_norm", "samples_per_s"} <= set(scalars)
    final = _test_metrics(run_dir)
    assert final and all(scalars[k] == {6: pytest.approx(v, rel=1e-6)} for k, v in final.items())
    tags = {v.tag for e in _events(tb) for v in e.summary.value}
    assert {"config/text_summary", "_hparams_/experiment", "_hparams_/session_start_info"} <= tags


def test_a_callers_sink_takes_metrics_jsonl_s_place_and_the_trackers_still_log(tmp_path):
    """The Ray Tune trial passes its own sink (metrics.jsonl + Tune's reporter): train.loggers still applies."""

    class Recorder:
        def __init__(self) -> None:
            self.records: list[dict] = []

        def log(self, record: dict) -> None:
            self.records.append(record)

    recorder = Recorder()
    sink = make_sink(_cfg("train.loggers=[jsonl,tensorboard]"), tmp_path, recorder)
    sink.log({"step": 3, "epoch": 0, "train_loss": 0.5, "checkpoint": "step-3.pt"})
    sink.end_training("interrupted")
    assert recorder.records == [{"step": 3, "epoch": 0, "train_loss": 0.5, "checkpoint": "step-3.pt"}]
    assert _scalars(tmp_path / "tensorboard")["train_loss"] == {3: 0.5}
    assert not (tmp_path / "metrics.jsonl").exists()
    assert make_sink(_cfg("train.loggers=[jsonl,tensorboard]"), tmp_path, recorder, main=False) is recorder


# --- MLflow: the file store, read back with MLflow's client ---------------------------------------------------

def test_mlflow_keeps_one_run_with_params_metrics_and_the_evaluation(small_shards, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")     # the tracker sets it; undone after the test
    run_dir, cfg = tmp_path / "run", _cfg("train.loggers=[jsonl,mlflow]")
    assert train(cfg, small_shards, run_dir, stop_at_step=2)["status"] == "interrupted"
    run_id = json.loads((run_dir / IDS_FILE).read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=str(run_dir / "mlruns"))
    first = client.get_run(run_id)
    assert first.info.status == "KILLED" and first.info.run_name == "run"
    assert first.data.params["model.embed_dim"] == "32" and first.data.params["train.loggers"] == '["jsonl", "mlflow"]'
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]

    result = run(_cfg("train.loggers=[jsonl,mlflow]", "train.keep_last=3"), small_shards, run_dir)   # resumable change
    assert result["status"] == "finished"
    assert json.loads((run_dir / IDS_FILE).read_text())["mlflow"]["run_id"] == run_id
    experiment = client.get_experiment_by_name("debug")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    done = client.get_run(run_id)
    assert done.info.status == "FINISHED" and done.data.params["train.keep_last"] == "2"   # the first value stays
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    assert history == pytest.approx(_jsonl(run_dir, "train_loss"))
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [3, 6]
    final = _test_metrics(run_dir)
    for key, value in final.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(6, pytest.approx(value))]
    assert f"{next(iter(final))}_ci95_low" in done.data.metrics and done.data.metrics["test_subjects"] > 0


# --- W&B: the offline run files --------------------------------------------------------------------------------

def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline .wandb file (W&B's header, then a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, i, parts = [], 7, b""
    while i + 7 <= len(data):
        if block - i % block < 7:               # a block's tail too short for a header is padding
            i += block - i % block
            continue
        length, kind = int.from_bytes(data[i + 4:i + 6], "little"), data[i + 6]
        parts += data[i + 7:i + 7 + length]
        i += 7 + length
        if kind in (1, 4):                      # a whole record, or the last piece of one
            records.append(pb.Record.FromString(parts))
            parts = b""
    return records


def test_wandb_offline_run_resumes_with_the_stored_id(small_shards, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):   # nothing written outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    run_dir, cfg = tmp_path / "run", _cfg("train.loggers=[jsonl,wandb]")
    assert train(cfg, small_shards, run_dir, stop_at_step=2)["status"] == "interrupted"
    run_id = json.loads((run_dir / IDS_FILE).read_text())["wandb"]["id"]
    assert run(cfg, small_shards, run_dir)["status"] == "finished"
    wandb.teardown()       # W&B's service writes the run file behind finish(); at exit, or here, it is waited for
    assert json.loads((run_dir / IDS_FILE).read_text())["wandb"]["id"] == run_id
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in sessions] == [run_id, run_id]      # one W&B run, two offline pieces
    losses, exits, config, summary = {}, [], {}, {}
    for session in sessions:
        for record in _wandb_records(session / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {"/".join(x.nested_key) or x.key: json.loads(x.value_json) for x in record.history.item}
                if "train_loss" in items:
                    losses[record.history.step.num] = items["train_loss"]
            elif kind == "config":
                config.update({x.key: json.loads(x.value_json) for x in record.config.update})
            elif kind == "summary":
                summary.update({"/".join(x.nested_key) or x.key: json.loads(x.value_json) for x in record.summary.update})
            elif kind == "exit":
                exits.append(record.exit.exit_code)
    assert losses == pytest.approx(_jsonl(run_dir, "train_loss")) and sorted(losses) == list(range(1, 7))
    assert exits == [3, 0]                                   # interrupted (to be resumed), then finished
    assert config["model"]["embed_dim"] == 32 and config["train"]["loggers"] == ["jsonl", "wandb"]
    assert all(summary[k] == pytest.approx(v) for k, v in _test_metrics(run_dir).items())


# --- a missing extra ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_a_missing_extra_is_a_config_error_before_any_step(small_shards, tmp_path, monkeypatch, logger):
    monkeypatch.setitem(sys.modules, logger, None)            # as if the package were not installed
    cfg = _cfg(f"train.loggers=[jsonl,{logger}]")
    message = re.escape(f"pip install 'brainmt[{logger}]'")
    with pytest.raises(ConfigError, match=message):
        train(cfg, small_shards, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=message):            # every rank checks, not only the one that logs
        make_sink(cfg, tmp_path / "run", main=False)
