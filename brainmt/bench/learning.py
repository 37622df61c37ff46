"""Does it learn? BrainMT against connectivity baselines on a synthetic cohort with planted effects.

``python -m brainmt.bench.learning [--subjects 300] [--device cpu|cuda]`` writes synthetic scans, shards them,
trains BrainMT and fits the baselines on the same split for sex (classification) and the cognitive score
(regression), and repeats both with labels shuffled across subjects (a control that must stay at chance).
Prints one table (metrics with bootstrap 95% intervals, seconds each took) and writes ``learning.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

TASKS = {"sex": ("classification", "sex"), "score": ("regression", "cognition")}
# longer than the demo's 10 epochs: on the default cohort the tiny CPU model's validation loss keeps falling to
# epoch ~17 for sex, and the score's planted effect (an amplitude) is found only after 7-8 epochs, best by ~16
TASK_OVERRIDES = {"sex": ["train.epochs=20", "train.early_stopping_patience=20"],
                  "score": ["train.epochs=28", "train.early_stopping_patience=28"]}
BASELINES = {"classification": ["connectome-logreg", "amplitude-logreg"], "regression": ["connectome-ridge", "amplitude-ridge"]}
SHOWN = {"classification": ["accuracy", "balanced_accuracy", "auroc"], "regression": ["mse", "mae", "pearson_r"]}


def shuffled_view(shards: Path, out: Path, seed: int) -> Path:
    """The same shards with every target permuted across scans (the control): a new manifest, the shard files and
    mask linked, the same splits."""
    manifest = json.loads((shards / "manifest.json").read_text())
    ids = sorted(manifest["scans"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    targets = [manifest["scans"][s]["targets"] for s in ids]
    for scan, j in zip(ids, order, strict=True):
        manifest["scans"][scan]["targets"] = targets[j]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("shards", manifest["mask"]["file"], "splits.json"):
        link = out / name
        if not link.exists():
            link.symlink_to((shards / name).resolve())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def train_brainmt(shards: Path, run_dir: Path, task: str, target: str, device: str, overrides: list[str]) -> dict:
    """Train and evaluate BrainMT (demo config on the CPU, the paper's model on CUDA) in this process."""
    from brainmt.config import load_config
    from brainmt.train.loop import run

    base = "demo" if device == "cpu" else "paper"
    cfg = load_config(base, [f"data.task={task}", f"data.target={target}", f"train.device={device}",
                             "data.num_workers=0", *overrides])
    if device == "cuda":
        frames = min(s["frames"] for s in json.loads((shards / "manifest.json").read_text())["scans"].values())
        cfg.data.num_frames = cfg.model.num_frames = min(cfg.data.num_frames, frames)
    if run_dir.exists():
        shutil.rmtree(run_dir)             # a benchmark measures a whole training run
    result = run(cfg, shards, run_dir, evaluate_split="test")
    return result["evaluation"]


def run_bench(work: Path, subjects: int, frames: int, shape: list[int], device: str, seed: int, n_boot: int,
              overrides: list[str], tasks: list[str]) -> list[dict]:
    """Every (task, method, labels) row of the table."""
    from brainmt.baseline.fit import run_baseline
    from brainmt.demo import prepare_data

    started = time.perf_counter()
    real = prepare_data(work / "data", subjects, frames, shape, seed=seed)
    data_s = time.perf_counter() - started
    views = {"true": real, "shuffled": shuffled_view(real, work / "data" / "shuffled", seed + 1)}
    rows = []
    for task_name in tasks:
        task, target = TASKS[task_name]
        for labels, shards in views.items():
            methods = ["brainmt", *BASELINES[task]] if labels == "true" else ["brainmt", BASELINES[task][0]]
            for method in methods:
                t0 = time.perf_counter()
                out = work / f"{task_name}-{labels}-{method}"
                if method == "brainmt":
                    ev = train_brainmt(shards, out, task, target, device, [*TASK_OVERRIDES[task_name], *overrides])
                else:
                    ev = run_baseline(shards, method, out, target=target, n_boot=n_boot)
                rows.append({"task": task_name, "labels": labels, "method": method, "seconds": time.perf_counter() - t0,
                             "metrics": {k: ev[k] for k in SHOWN[task]}, "subjects": ev["subjects"]})
                print(format_row(rows[-1]), flush=True)
    rows.append({"task": "data", "labels": "-", "method": "synth + shard", "seconds": data_s, "metrics": {},
                 "subjects": subjects})
    return rows


def format_row(row: dict) -> str:
    """One line: task, labels, method, each metric with its interval, seconds."""
    cells = [f"{k} {v['value']:.3f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]" for k, v in row["metrics"].items()]
    return f"{row['task']:6s} {row['labels']:8s} {row['method']:18s} {'  '.join(cells)}  ({row['seconds']:.0f} s)"


def markdown(rows: list[dict]) -> str:
    """The table as Markdown (for the README)."""
    lines = ["| task | labels | method | metrics (95% bootstrap interval) | time |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = "; ".join(f"{k} {v['value']:.3f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]" for k, v in r["metrics"].items())
        lines.append(f"| {r['task']} | {r['labels']} | {r['method']} | {cells or '-'} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m brainmt.bench.learning``."""
    p = argparse.ArgumentParser(prog="python -m brainmt.bench.learning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=300)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--shape", type=int, nargs=3, default=[20, 24, 20])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--work-dir", default="runs/bench-learning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for BrainMT (e.g. train.epochs=4)")
    args = p.parse_args(argv)
    work = Path(args.work_dir).resolve()
    started = time.perf_counter()
    rows = run_bench(work, args.subjects, args.frames, args.shape, args.device, args.seed, args.n_boot, args.overrides,
                     args.tasks)
    total = time.perf_counter() - started
    print(f"\n{args.subjects} synthetic subjects ({'x'.join(map(str, args.shape))} voxels, {args.frames} frames), "
          f"device {args.device}, {total:.0f} s in all\n{markdown(rows)}")
    (work / "learning.json").write_text(json.dumps({"rows": rows, "seconds": total, "args": vars(args)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
