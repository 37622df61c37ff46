"""Experiment trackers behind the loop's metrics sink (``train.loggers``): TensorBoard, Weights & Biases, MLflow.

:func:`make_sink` builds the loop's sink on rank 0: ``metrics.jsonl`` (or the caller's sink, such as the Ray Tune
reporter) plus one tracker per extra logger. Each tracker logs the config when it starts, every record the loop
logs, the final evaluation, and is closed at the end. A resumed run continues the same tracker run: TensorBoard
writes to the same directory, W&B and MLflow reopen the run whose id ``trackers.json`` in the run directory keeps.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import yaml

from brainmt.config import Config, ConfigError, config_to_dict, select_metric
from brainmt.fileio import atomic_write_text
from brainmt.signals import INTERRUPTED_EXIT
from brainmt.train.runlog import JsonlSink, MetricsSink

log = logging.getLogger("brainmt.train")

IDS_FILE = "trackers.json"          # in the run directory: the W&B and MLflow run ids a resumed run continues
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}     # optional logger -> the module its extra installs
MLFLOW_STATUS = {"finished": "FINISHED", "early_stopped": "FINISHED", "interrupted": "KILLED"}
MAX_PARAM_CHARS = 6000              # MLflow's limit on a parameter's value
_writer_numbers = itertools.count()


class Tracker(Protocol):
    """One experiment tracker: receives the loop's records, the final evaluation, and the end of the run."""

    def log(self, record: dict) -> None:
        """Record a training or validation record."""

    def log_final(self, record: dict) -> None:
        """Record the final evaluation's metrics."""

    def close(self, status: str) -> None:
        """End the run ("finished", "early_stopped", "interrupted" or "failed") and flush."""


def missing_extra(logger: str) -> ConfigError:
    """The error for a logger whose optional dependency is not installed."""
    return ConfigError(f"train.loggers has {logger}, but the {EXTRAS[logger]} package is not installed: "
                       f"pip install 'brainmt[{logger}]' (or remove {logger} from train.loggers)")


def require_extras(loggers: list[str]) -> None:
    """ConfigError naming the extra to install when an optional logger's package is missing (every rank checks)."""
    for name in loggers:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name]) is None:
            raise missing_extra(name)


def _import(logger: str) -> Any:
    """Import an optional logger's package, or raise the missing-extra error."""
    try:
        return importlib.import_module(EXTRAS[logger])
    except ImportError as exc:
        raise missing_extra(logger) from exc


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a record, but its step (strings such as a checkpoint path and booleans left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def flat_config(cfg: Config) -> dict[str, str | int | float | bool]:
    """The config as dotted keys (``model.embed_dim``); lists and nulls as JSON text."""
    out: dict[str, str | int | float | bool] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value if isinstance(value, str | int | float | bool) else json.dumps(value)

    walk("", config_to_dict(cfg))
    return out


def evaluation_record(evaluation: dict, step: int, epoch: int) -> dict:
    """The final evaluation as one record: ``<split>_<metric>`` with its 95% interval, at the last training step."""
    split = evaluation.get("split", "test")
    record: dict = {"step": step, "epoch": epoch}
    for key, value in evaluation.items():
        if isinstance(value, dict) and "value" in value:
            record[f"{split}_{key}"] = value["value"]
            low, high = value.get("ci95", (float("nan"), float("nan")))
            record[f"{split}_{key}_ci95_low"], record[f"{split}_{key}_ci95_high"] = low, high
    for key in ("subjects", "windows"):
        if isinstance(evaluation.get(key), int):
            record[f"{split}_{key}"] = evaluation[key]
    if isinstance(evaluation.get("step"), int):
        record[f"{split}_checkpoint_step"] = evaluation["step"]
    return record


def stored_ids(run_dir: Path) -> dict:
    """The tracker run ids kept in the run directory ({} before the first start)."""
    path = Path(run_dir) / IDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def store_id(run_dir: Path, logger: str, value: dict) -> None:
    """Keep a tracker's run id in the run directory (atomically), for the resumed run to continue."""
    ids = stored_ids(run_dir)
    if ids.get(logger) != value:
        atomic_write_text(Path(run_dir) / IDS_FILE, json.dumps({**ids, logger: value}, indent=1) + "\n")


def tensorboard_backend() -> tuple[Any, Any]:
    """SummaryWriter and hparams: torch's when the tensorboard package is installed, else tensorboardX's."""
    if importlib.util.find_spec("tensorboard") is not None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        return SummaryWriter, hparams
    try:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams
    except ImportError as exc:
        raise ConfigError("train.loggers has tensorboard, but neither tensorboard nor tensorboardX is installed: "
                          "pip install tensorboard") from exc
    return SummaryWriter, hparams


class TensorBoardTracker:
    """Event files under ``RUN_DIR/tensorboard``: every numeric value of a record as a scalar at its step, the
    config as text and as hyper-parameters. The writer opens at the first record; a resumed run's first step is
    its purge step, so TensorBoard hides what an earlier session logged from that step on (steps run again)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.directory = Path(run_dir) / "tensorboard"
        self.writer_class, self.hparams = tensorboard_backend()
        self.params = flat_config(cfg)
        self.text = "\n".join("    " + line for line in yaml.safe_dump(config_to_dict(cfg), sort_keys=False).splitlines())
        self.metric_tags = list(dict.fromkeys([select_metric(cfg)[0], "val_loss"]))
        self.writer: Any = None

    def _open(self, purge_step: int | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # a session of its own file: two sessions of one process in the same second must not share a name
        self.writer = self.writer_class(str(self.directory), purge_step=purge_step, flush_secs=30,
                                        filename_suffix=f".{os.getpid()}.{next(_writer_numbers)}")
        step = purge_step or 0
        self.writer.add_text("config", self.text, global_step=step)
        experiment, session_start, _ = self.hparams(self.params, {tag: 0.0 for tag in self.metric_tags})
        file_writer = self.writer._get_file_writer()   # the run's own directory (add_hparams would make a new one)
        file_writer.add_summary(experiment, step)
        file_writer.add_summary(session_start, step)

    def _write(self, record: dict, purge: bool) -> None:
        step = record.get("step")
        if self.writer is None:
            self._open(step if purge else None)
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()                             # a killed job keeps what it logged

    def log(self, record: dict) -> None:
        """Write the record's scalars at its step."""
        self._write(record, purge=True)

    def log_final(self, record: dict) -> None:
        """Write the evaluation's scalars (never a purge step: a finished run's evaluation may be repeated)."""
        self._write(record, purge=False)

    def close(self, status: str) -> None:
        """Flush and close the event file (writing the config if nothing was logged)."""
        if self.writer is None:
            self._open(None)
        self.writer.close()
        self.writer = None


class WandbTracker:
    """A Weights & Biases run (``brainmt[wandb]``): offline unless WANDB_MODE says otherwise, files under
    ``RUN_DIR/wandb``, the id kept in the run directory and resumed with ``resume="allow"``."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        wandb = _import("wandb")
        run_id = stored_ids(run_dir).get("wandb", {}).get("id") or uuid.uuid4().hex[:12]
        store_id(run_dir, "wandb", {"id": run_id})     # before init: a start that fails still resumes this id
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "brainmt", name=Path(run_dir).name,
                              id=run_id, resume="allow", dir=str(run_dir),
                              mode=os.environ.get("WANDB_MODE") or "offline",
                              settings=wandb.Settings(console="off"))    # logs/rank-0.log has the console
        self.run.config.update(config_to_dict(cfg), allow_val_change=True)   # a resumed run may change e.g. epochs

    def log(self, record: dict) -> None:
        """Log the record's numbers at its step (W&B drops steps below its last one: a resumed run's repeats)."""
        self.run.log(scalars(record), step=int(record["step"]))

    def log_final(self, record: dict) -> None:
        """Log the evaluation and put it in the run's summary."""
        values = scalars(record)
        self.run.log(values, step=int(record["step"]))
        self.run.summary.update(values)

    def close(self, status: str) -> None:
        """Finish the run: exit code 0 when training ended, marked preempting when interrupted."""
        if status == "interrupted":
            self.run.mark_preempting()
        code = {"finished": 0, "early_stopped": 0, "interrupted": INTERRUPTED_EXIT}.get(status, 1)
        self.run.finish(exit_code=code)


class MlflowTracker:
    """An MLflow run (``brainmt[mlflow]``) in the file store ``RUN_DIR/mlruns`` unless MLFLOW_TRACKING_URI is set;
    the experiment is MLFLOW_EXPERIMENT_NAME or the config's name; the run id is kept in the run directory."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        _import("mlflow")
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        own_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        uri = own_uri or (run_dir / "mlruns").resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3.x refuses file stores without it
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._resume(run_dir, own_uri) or self._create(cfg, run_dir, own_uri)
        self._log_params(flat_config(cfg))

    def _resume(self, run_dir: Path, own_uri: str | None) -> str | None:
        """The stored run's id, set running again, if it is in this tracking store."""
        from mlflow.exceptions import MlflowException

        stored = stored_ids(run_dir).get("mlflow", {})
        if not stored.get("run_id") or stored.get("tracking_uri") != own_uri:
            return None
        try:
            self.client.update_run(stored["run_id"], status="RUNNING")
        except MlflowException as exc:
            log.warning("MLflow run %s not found (%s): starting a new run", stored["run_id"], exc)
            return None
        return stored["run_id"]

    def _create(self, cfg: Config, run_dir: Path, own_uri: str | None) -> str:
        """A new run in the experiment (created if needed); its id is stored."""
        from mlflow.exceptions import MlflowException

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:                    # another run (a sweep's trial) created it meanwhile
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"brainmt.run_dir": str(run_dir.resolve())})
        store_id(run_dir, "mlflow", {"run_id": run.info.run_id, "tracking_uri": own_uri})
        return run.info.run_id

    def _log_params(self, params: dict) -> None:
        """Log the config's keys not logged yet (MLflow keeps a parameter's first value)."""
        from mlflow.entities import Param

        text = {k: (v if isinstance(v, str) else json.dumps(v))[:MAX_PARAM_CHARS] for k, v in params.items()}
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in text.items() if k not in logged]
        for i in range(0, len(new), 100):               # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        changed = sorted(k for k, v in text.items() if k in logged and logged[k] != v)
        if changed:
            log.info("MLflow keeps the first values of %s (config.yaml holds the new ones)", ", ".join(changed))

    def log(self, record: dict) -> None:
        """Log the record's numbers as metrics at its step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record.get("step", 0))
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars(record).items()])

    def log_final(self, record: dict) -> None:
        """Log the evaluation's metrics at the last training step."""
        self.log(record)

    def close(self, status: str) -> None:
        """End the run as FINISHED, KILLED (interrupted, to be resumed) or FAILED."""
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class RunSink:
    """The loop's sink on rank 0: ``metrics.jsonl`` (or the caller's sink) and the trackers of ``train.loggers``.

    :func:`make_sink` starts it from the resolved config. It closes with training when the loop made it;
    :func:`brainmt.train.loop.run` makes its own, which stays open for the final evaluation."""

    def __init__(self, base: MetricsSink | None = None, closes_with_training: bool = False) -> None:
        self.base = base
        self.closes_with_training = closes_with_training
        self.trackers: dict[str, Tracker] = {}
        self.started = False
        self._failed: set[str] = set()

    def start(self, cfg: Config, run_dir: Path) -> None:
        """Open metrics.jsonl (unless the caller gave a sink) and each tracker, which logs the config."""
        if self.started:
            return
        if self.base is None:
            self.base = JsonlSink(Path(run_dir) / "metrics.jsonl")
        try:
            for name in cfg.train.loggers:
                if name in TRACKERS:
                    self.trackers[name] = TRACKERS[name](cfg, Path(run_dir))
        except BaseException:
            self.close("failed")                        # the trackers already opened
            raise
        self.started = True

    def _each(self, method: str, record: dict) -> None:
        """Call a method of every tracker; a tracker that fails is reported once and does not stop training."""
        for name, tracker in self.trackers.items():
            try:
                getattr(tracker, method)(record)
            except Exception:
                if name not in self._failed:
                    log.exception("the %s logger failed (training goes on; metrics.jsonl has every record)", name)
                self._failed.add(name)

    def log(self, record: dict) -> None:
        """Send ``record`` to metrics.jsonl (or the caller's sink) and to the trackers."""
        if self.base is not None:
            self.base.log(record)
        self._each("log", record)

    def log_evaluation(self, evaluation: dict, step: int, epoch: int) -> None:
        """Send the final evaluation (``evaluate()``'s result) to the trackers; metrics.json already holds it."""
        self._each("log_final", evaluation_record(evaluation, step, epoch))

    def end_training(self, status: str) -> None:
        """The loop has finished training: close the trackers if the loop opened them."""
        if self.closes_with_training:
            self.close(status)

    def close(self, status: str) -> None:
        """Close every tracker (flushing it); later calls do nothing."""
        for name, tracker in self.trackers.items():
            try:
                tracker.close(status)
            except Exception:
                log.exception("could not close the %s logger", name)
        self.trackers = {}


def make_sink(cfg: Config, run_dir: str | Path, base: MetricsSink | None = None, main: bool = True) -> MetricsSink | None:
    """The loop's metrics sink: metrics.jsonl (or ``base``) and the trackers of ``cfg.train.loggers``, started.

    Every rank checks that the optional loggers' extras are installed (a ConfigError names the one to install);
    only the main rank (``main``) gets trackers, the others get ``base``. A :class:`RunSink` passed as ``base``
    (``run()``'s) is started and returned: its caller closes it."""
    require_extras(cfg.train.loggers)
    if not main:
        return base
    sink = base if isinstance(base, RunSink) else RunSink(base, closes_with_training=True)
    sink.start(cfg, Path(run_dir))
    return sink
