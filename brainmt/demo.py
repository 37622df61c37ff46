"""The end-to-end demo: a tiny BrainMT learns a planted effect from synthetic scans, as a submitit job."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brainmt.config import Config, config_from_dict, config_to_dict, save_config
from brainmt.data.synthetic import synthetic_scans
from brainmt.models import build_model

log = logging.getLogger(__name__)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a**2).sum() * (b**2).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def run_demo(cfg_dict: dict, run_dir: str, steps: int, num_subjects: int = 48) -> dict:
    """Train the model of ``cfg_dict`` on synthetic scans for ``steps`` steps; write and return metrics."""
    cfg: Config = config_from_dict(cfg_dict, "demo config")
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    scans, targets = synthetic_scans(num_subjects, cfg.data.num_frames, cfg.model.volume_shape, seed=cfg.train.seed)
    n_val = num_subjects // 4
    x_train, y_train = torch.from_numpy(scans[n_val:]), torch.from_numpy(targets[n_val:])
    x_val, y_val = torch.from_numpy(scans[:n_val]), targets[:n_val]
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    start = time.time()
    with (out / "metrics.jsonl").open("w") as sink:
        for step in range(1, steps + 1):
            model.train()
            idx = torch.randint(len(x_train), (cfg.train.batch_size,), generator=gen)
            loss = F.mse_loss(model(x_train[idx]).squeeze(1), y_train[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            if step % cfg.train.log_every == 0 or step == steps:
                sink.write(json.dumps({"step": step, "train_loss": loss.item()}) + "\n")
                log.info("step %d  train loss %.4f", step, loss.item())
    model.eval()
    with torch.no_grad():
        pred = model(x_val).squeeze(1).numpy()
    metrics = {
        "steps": steps,
        "train_seconds": round(time.time() - start, 2),
        "val_mse": float(((pred - y_val) ** 2).mean()),
        "val_mse_of_mean_predictor": float(((y_val - y_train.numpy().mean()) ** 2).mean()),
        "val_pearson_r": _pearson(pred, y_val),
        "num_train_subjects": len(x_train),
        "num_val_subjects": n_val,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def submit_demo(cfg: Config, run_dir: Path, steps: int, cluster: str = "local") -> dict:
    """Run :func:`run_demo` through submitit (``local``: a separate process; ``debug``: in-process)."""
    import submitit

    executor = submitit.AutoExecutor(folder=run_dir / "submitit" / "%j", cluster=cluster)
    executor.update_parameters(timeout_min=30)
    if cluster == "local":
        executor.update_parameters(cpus_per_task=1, tasks_per_node=1)
    job = executor.submit(run_demo, config_to_dict(cfg), str(run_dir), steps)
    print(f"submitted demo job {job.job_id} ({cluster} executor); logs in {run_dir / 'submitit'}", flush=True)
    return job.result()
