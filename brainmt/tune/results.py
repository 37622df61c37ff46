"""What a finished (or interrupted) sweep leaves: results.csv, best.yaml and figures."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import yaml

from brainmt.fileio import atomic_write_text
from brainmt.tune.space import best_config, format_value
from brainmt.tune.trainable import trial_run_dir

STATUS_FINISHED, STATUS_ASHA, STATUS_ERROR, STATUS_UNFINISHED = "finished", "stopped by ASHA", "error", "unfinished"


def collect(grid: Any, sweep_dir: Path, statuses: dict[str, str], space_keys: list[str], metric: str, mode: str,
            max_epochs: int) -> list[dict]:
    """One row per trial from a Ray Tune ResultGrid and the trials' saved statuses ({trial id: TERMINATED, ERROR,
    PENDING, ...}): status, epochs, best metric and its epoch, parameters, history; best first."""
    rows = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial-")
        history = _history(result, metric)
        values = [v for _, v in history if v is not None and math.isfinite(v)]
        best = (min if mode == "min" else max)(values) if values else None
        state = statuses.get(trial_id, "PENDING")
        if state == "ERROR":
            status = STATUS_ERROR
        elif state != "TERMINATED":
            status = STATUS_UNFINISHED
        else:
            status = STATUS_FINISHED if len(history) >= max_epochs else STATUS_ASHA
        rows.append({
            "trial": Path(result.path).name, "status": status, "epochs": len(history),
            metric: best, "best_epoch": next((e for e, v in history if v == best), None) if best is not None else None,
            **{k: (result.config or {}).get(k) for k in space_keys}, "run_dir": str(trial_run_dir(sweep_dir, trial_id)),
            "error": str(result.error).splitlines()[0] if result.error is not None else "", "history": history,
        })
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda r: (r[metric] is None, sign * r[metric] if r[metric] is not None else 0.0, r["trial"]))
    return rows


def _history(result: Any, metric: str) -> list[tuple[int, float | None]]:
    """(epoch, metric) per reported epoch; a report repeated after a restore counts once (the latest)."""
    df = result.metrics_dataframe
    if df is None or df.empty or "training_iteration" not in df:
        return []
    by_epoch: dict[int, float | None] = {}
    for _, rec in df.iterrows():
        value = rec.get(metric)
        by_epoch[int(rec["training_iteration"])] = None if value is None or value != value else float(value)
    return sorted(by_epoch.items())


def format_rows(rows: list[dict], space_keys: list[str], metric: str) -> str:
    """The results as an aligned text table."""
    header = ["rank", "trial", "status", "epochs", metric, "best epoch", *space_keys]
    lines = [[str(i + 1), r["trial"], r["status"], str(r["epochs"]),
              f"{r[metric]:.4f}" if r[metric] is not None else "-", str(r["best_epoch"] or "-"),
              *[format_value(r[k]) for k in space_keys]] for i, r in enumerate(rows)]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines])


def write_csv(rows: list[dict], space_keys: list[str], metric: str, path: Path) -> Path:
    """results.csv: the table's columns plus each trial's run directory and error."""
    fields = ["rank", "trial", "status", "epochs", metric, "best_epoch", *space_keys, "run_dir", "error"]
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for i, r in enumerate(rows):
        w.writerow({**r, "rank": i + 1})
    return atomic_write_text(path, text.getvalue())


def write_best(rows: list[dict], base: dict, space_keys: list[str], metric: str, sweep_dir: Path) -> Path | None:
    """best.yaml: the best trial's full config (the base's epochs and early stopping), for jobs/launch.py --config."""
    best = next((r for r in rows if r[metric] is not None and r["status"] != STATUS_ERROR), None)
    if best is None:
        return None
    params = {k: best[k] for k in space_keys}
    cfg = best_config(base, params, f"{base['name']}-best")
    path = sweep_dir / "best.yaml"
    header = (f"# best trial {best['trial']} of the sweep in {sweep_dir}: {metric} {best[metric]:.6g} at epoch "
              f"{best['best_epoch']}\n# swept values: "
              + ", ".join(f"{k}={format_value(v)}" for k, v in params.items())
              + f"\n# train it: python jobs/launch.py --config {path}   (or: brainmt train --config {path})\n")
    return atomic_write_text(path, header + yaml.safe_dump(cfg, sort_keys=False))


def plot(rows: list[dict], space: dict[str, tuple[str, Any]], metric: str, max_epochs: int, out_dir: Path) -> list[Path]:
    """metric_vs_params.png (best value of each trial against each swept key) and curves.png (each trial's
    validation curve; an x marks a trial ASHA stopped early, a dot one that ran all epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {STATUS_FINISHED: "tab:blue", STATUS_ASHA: "tab:orange", STATUS_ERROR: "tab:red", STATUS_UNFINISHED: "tab:gray"}
    keys = list(space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        kind = space[key][0]
        for status, color in colors.items():
            pts = [(r[key], r[metric]) for r in rows if r["status"] == status and r[metric] is not None]
            if pts:
                xs = [p[0] if isinstance(p[0], int | float) else str(p[0]) for p in pts]
                ax.scatter(xs, [p[1] for p in pts], c=color, label=status, alpha=0.8)
        if kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    scatter = out_dir / "metric_vs_params.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        pts = [(e, v) for e, v in r["history"] if v is not None]
        if not pts:
            continue
        label = ", ".join(f"{k.split('.')[-1]}={format_value(r[k])}" for k in keys)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", alpha=0.8, label=label)
        marker = "x" if r["status"] == STATUS_ASHA else "o"
        ax.plot(pts[-1][0], pts[-1][1], marker, color=line.get_color(), markersize=9)
    ax.set_xlim(0.5, max_epochs + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("validation curves (x: stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    curves = out_dir / "curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [scatter, curves]
