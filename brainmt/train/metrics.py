"""Metrics researchers report, per subject, with bootstrap intervals over subjects."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


def pearson_r(y: np.ndarray, p: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant."""
    y, p = np.asarray(y, float) - np.mean(y), np.asarray(p, float) - np.mean(p)
    denom = np.sqrt((y**2).sum() * (p**2).sum())
    return float((y * p).sum() / denom) if denom > 0 else 0.0


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan with one class only."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def regression_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """MSE, MAE and Pearson r."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    return {"mse": float(np.mean((y - p) ** 2)), "mae": float(np.mean(np.abs(y - p))), "pearson_r": pearson_r(y, p)}


def classification_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy at probability 0.5, and AUROC."""
    y = np.asarray(y).astype(int)
    pred = (np.asarray(prob, float) >= 0.5).astype(int)
    recalls = [float(np.mean(pred[y == c] == c)) for c in (0, 1) if np.any(y == c)]
    return {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": float(np.mean(recalls)),
            "auroc": auroc(y, prob)}


def per_subject(subjects: list[str], targets: np.ndarray, outputs: np.ndarray) -> OrderedDict:
    """Average window outputs per subject: subject -> (target, mean output, number of windows), sorted by subject."""
    sums: dict[str, list] = {}
    for s, t, o in zip(subjects, np.asarray(targets, float), np.asarray(outputs, float)):
        entry = sums.setdefault(s, [t, 0.0, 0])
        if entry[0] != t:
            raise ValueError(f"subject {s} has windows with different targets ({entry[0]} and {t})")
        entry[1] += o
        entry[2] += 1
    return OrderedDict((s, (v[0], v[1] / v[2], v[2])) for s, v in sorted(sums.items()))


def with_intervals(metric_fn, y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Each metric of ``metric_fn(y, p)`` with a percentile bootstrap 95% interval over subjects (resampled rows)."""
    y, p = np.asarray(y), np.asarray(p)
    point = metric_fn(y, p)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        for k, v in metric_fn(y[idx], p[idx]).items():
            if np.isfinite(v):
                draws[k].append(v)
    out = {}
    for k, v in point.items():
        lo, hi = (np.percentile(draws[k], [2.5, 97.5]) if len(draws[k]) >= 10 else (float("nan"), float("nan")))
        out[k] = {"value": float(v), "ci95": [float(lo), float(hi)]}
    return out


def format_table(metrics: dict, title: str) -> str:
    """A terminal table of metric, value and 95% interval."""
    lines = [title, f"  {'metric':20s} {'value':>9s}   95% interval"]
    for k, v in metrics.items():
        if isinstance(v, dict) and "value" in v:
            lo, hi = v["ci95"]
            lines.append(f"  {k:20s} {v['value']:>9.4f}   [{lo:.4f}, {hi:.4f}]")
        elif isinstance(v, float):
            lines.append(f"  {k:20s} {v:>9.4f}")
    return "\n".join(lines)


def target_stats(shards, scans: list[str], target: str, task: str) -> dict:
    """The task, target and (regression) the training subjects' mean and std that targets are z-scored with."""
    from brainmt.config import ConfigError

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


def to_predictions(outputs: np.ndarray, stats: dict, calibration: dict | None = None) -> np.ndarray:
    """Model outputs (one per window) -> predictions in the target's units: probabilities (classification, through
    the validation-fitted ``calibration`` if given) or de-z-scored values (regression); callers average per subject."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if stats["task"] == "regression":
        return outputs * stats["std"] + stats["mean"]
    if calibration and calibration["scale"] > 0:      # a reversing fit saved by an older version is not applied
        outputs = calibration["scale"] * outputs + calibration["bias"]
    return 1.0 / (1.0 + np.exp(-outputs))


def fit_platt(targets: np.ndarray, outputs: np.ndarray) -> dict | None:
    """Platt scaling: the logistic fit p = sigmoid(scale * logit + bias) of 0/1 ``targets`` on window logits.

    None (the model's own probabilities) with one class only, or when the fit's scale is not positive: a calibration
    keeps the order of the outputs. A negative scale would reverse the ranking on the evidence of the very split that
    scores and selects checkpoints (seen on the GPU: runs at chance got validation AUROC 1 - AUROC, and their test
    predictions reversed), and a zero scale would make every probability equal (AUROC exactly 0.5).
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(targets).astype(int)
    if len(set(y.tolist())) < 2:
        return None
    fit = LogisticRegression(C=1e4).fit(np.asarray(outputs, dtype=np.float64).reshape(-1, 1), y)
    scale = float(fit.coef_[0, 0])
    return {"scale": scale, "bias": float(fit.intercept_[0])} if scale > 0 else None


def subject_metrics(subjects: list[str], targets: np.ndarray, outputs: np.ndarray, stats: dict,
                    n_boot: int = 0, calibration: dict | None = None) -> tuple[dict, list[dict]]:
    """Per-subject averaged predictions and the task's metrics (with bootstrap intervals if ``n_boot``)."""
    fn = regression_metrics if stats["task"] == "regression" else classification_metrics
    table = per_subject(subjects, targets, to_predictions(outputs, stats, calibration))
    y = np.array([v[0] for v in table.values()])
    p = np.array([v[1] for v in table.values()])
    rows = [{"subject": s, "target": t, "prediction": pr, "windows": n} for s, (t, pr, n) in table.items()]
    if n_boot:
        return with_intervals(fn, y, p, n_boot=n_boot), rows
    return fn(y, p), rows
