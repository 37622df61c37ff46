"""The baselines' models: L2 logistic or ridge regression on standardised features, penalty chosen on validation."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from brainmt.config import ConfigError
from brainmt.data.loader import ShardSet

log = logging.getLogger("brainmt.baseline")
METHODS = {  # method -> (feature kind, task)
    "connectome-logreg": ("connectome", "classification"),
    "connectome-ridge": ("connectome", "regression"),
    "amplitude-logreg": ("amplitude", "classification"),
    "amplitude-ridge": ("amplitude", "regression"),
}
C_GRID = np.logspace(-4, 2, 7)          # logistic regression: inverse L2 strength
ALPHA_GRID = np.logspace(-3, 5, 9)      # ridge: L2 strength (features standardised)


def _model(task: str, penalty: float):
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = LogisticRegression(C=penalty, max_iter=5000) if task == "classification" else Ridge(alpha=penalty)
    return make_pipeline(StandardScaler(), head)


def _outputs(model, x: np.ndarray, task: str) -> np.ndarray:
    """Logits (classification) or z-scored predictions (regression): what BrainMT's head outputs."""
    return model.decision_function(x) if task == "classification" else model.predict(x)


def _loss(outputs: np.ndarray, y: np.ndarray, task: str) -> float:
    """BCE on logits or MSE on z-scored targets: the validation loss BrainMT selects with."""
    if task == "classification":
        return float(np.mean(np.logaddexp(0.0, outputs) - y * outputs))
    return float(np.mean((outputs - y) ** 2))


def run_baseline(shards_dir: str | Path, method: str, out: str | Path, target: str | None = None,
                 atlas: str | None = None, atlas_labels: str | None = None, parcel_mm: float = 25.0,
                 split: str = "test", n_boot: int = 1000) -> dict:
    """Features on every train/validation/``split`` scan, the penalty chosen by validation loss, then the model fit on
    the training split evaluated on ``split``: writes predictions.csv, metrics.json and baseline.json into ``out``
    (the files ``brainmt evaluate`` writes) and returns the result."""
    from brainmt.baseline.features import extract, parcel_labels, parcellation
    from brainmt.train.evaluation import write_evaluation
    from brainmt.train.metrics import subject_metrics, target_stats

    if method not in METHODS:
        raise ConfigError(f"--method: unknown method {method!r} (one of {', '.join(METHODS)})")
    kind, task = METHODS[method]
    target = target or ("sex" if task == "classification" else "cognition")
    out = Path(out)
    shards = ShardSet(shards_dir)
    scans = {name: shards.scans_of(name) for name in ("train", "validation", split)}
    for name, ids in scans.items():
        if not ids:
            raise ConfigError(f"{shards.root / 'splits.json'}: split '{name}' has no scans")
    stats = target_stats(shards, scans["train"], target, task)
    started = time.perf_counter()
    labels, names, description = parcellation(shards, atlas, atlas_labels, parcel_mm)
    feats = {name: extract(shards, ids, labels, kind, out / f"features-{kind}.npz") for name, ids in scans.items()}
    feature_s = time.perf_counter() - started

    def y_of(ids: list[str]) -> np.ndarray:
        y = np.array([shards.target(s, target) for s in ids], dtype=np.float64)
        return (y - stats["mean"]) / stats["std"] if task == "regression" else y

    y_train, y_val = y_of(scans["train"]), y_of(scans["validation"])
    grid = C_GRID if task == "classification" else ALPHA_GRID
    curve, best = {}, None
    for penalty in grid:
        model = _model(task, float(penalty)).fit(feats["train"], y_train)
        curve[float(penalty)] = _loss(_outputs(model, feats["validation"], task), y_val, task)
        if best is None or curve[float(penalty)] < curve[best[0]]:
            best = (float(penalty), model)
    penalty, model = best
    outputs = _outputs(model, feats[split], task)
    targets = np.array([shards.target(s, target) for s in scans[split]])
    subjects = [shards.scans[s]["subject"] for s in scans[split]]
    metrics, rows = subject_metrics(subjects, targets, outputs, stats, n_boot=n_boot)
    result = {**metrics, "split": split, "method": method, "subjects": len(rows), "windows": len(subjects),
              "task": task, "target": target, "penalty": penalty, "seconds": time.perf_counter() - started}
    write_evaluation(out, split, rows, result)
    parcels = len(parcel_labels(labels))
    (out / "baseline.json").write_text(json.dumps({
        "method": method, "features": kind, "parcellation": description, "parcels": parcels,
        "features_per_scan": int(feats["train"].shape[1]), "penalty_name": "C" if task == "classification" else "alpha",
        "validation_loss": curve, "chosen_penalty": penalty, "feature_seconds": feature_s,
        "train_scans": len(scans["train"]), "validation_scans": len(scans["validation"]), "shards": str(shards.root),
        "region_names": {str(k): v for k, v in names.items()}}, indent=1) + "\n")
    log.info("%s: %d parcels (%s), %d features, %s=%g chosen on validation", method, parcels, description,
             feats["train"].shape[1], "C" if task == "classification" else "alpha", penalty)
    return result
