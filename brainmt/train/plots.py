"""``curves.png``: training loss, validation loss and the validation metric over steps."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
    """Draw the curves from ``metrics.jsonl``; returns the PNG path, or None if there is nothing to draw."""
    if not metrics_path.exists():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((k for k in ("val_auroc", "val_pearson_r") if val and k in val[0]), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    if metric:
        ax2 = axes[0][1]
        ax2.plot([r["step"] for r in val], [r[metric] for r in val], "o-", color="C2")
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel(metric.replace("val_", "validation "))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
