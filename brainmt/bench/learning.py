"""Does it learn? BrainMT against connectivity baselines on synthetic cohorts with planted effects, over seeds.

``python -m brainmt.bench.learning --device cuda --effects amplitude coupling lagged --seeds 3 --parallel 6``
writes one synthetic cohort per kind of effect (``brainmt synth --effect``), shards it, and for each seed draws
another family-grouped split (and another initialisation); on each split it trains BrainMT (the paper's model on
CUDA, the demo's on the CPU) and fits the connectome and amplitude baselines, for sex (classification) and the
cognitive score (regression). ``--shuffled EFFECT`` repeats sex with labels permuted across subjects (a control that
must stay at chance; drawn on the true labels' split). ``--variant NAME key=value,...`` trains BrainMT once more per
variant (the lever table). ``--restarts K`` trains each BrainMT config K times per split, each from its own
initialisation, and adds a row for the run each split would keep by its best validation value (the restarts recipe,
sweeps/restarts.yaml); ``--ig`` then analyses only those picks. ``--ig`` analyses the shuffled-label runs too, on the
true labels' view: a model that has not learned the effect shows what the maps single out without it.
Every BrainMT run is its own ``brainmt train`` process; ``--parallel`` runs several at once, spread over the visible
GPUs (several on one GPU share it). Results go to ``learning.json`` after every run (a rerun skips finished ones; it
refuses a work dir whose views or cohorts were made otherwise) and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from brainmt.config import DeviceType, literal_values, selection_key
from brainmt.data.synthetic import EFFECTS

TASKS = {"sex": ("classification", "sex"), "score": ("regression", "cognition")}
BASELINES = {"classification": ["connectome-logreg", "amplitude-logreg"], "regression": ["connectome-ridge", "amplitude-ridge"]}
# the IG map's scores against the planted truth (brainmt analyze --truth): group mean |IG|, mean |net IG|, |contrast|,
# class means
IG_SCORES = ("truth_auroc", "effect_vs_control_auroc", "net_truth_auroc", "net_vs_control_auroc",
             "contrast_truth_auroc", "contrast_vs_control_auroc", "class_means_truth_auroc", "class_means_vs_control_auroc")
SHOWN = {"classification": ["auroc", "balanced_accuracy", "accuracy"], "regression": ["pearson_r", "mse", "mae"]}
# the demo model on the CPU needs more epochs than the demo's 10 to find the score's amplitude effect
CPU_OVERRIDES = {"sex": ["train.epochs=20", "train.early_stopping_patience=20"],
                 "score": ["train.epochs=28", "train.early_stopping_patience=28"]}


@dataclass
class BenchRun:
    """One row of the table: a method trained and tested on one effect's cohort, one seed's split, one task."""

    effect: str
    seed: int
    task: str
    labels: str                     # "true" or "shuffled"
    method: str                     # "brainmt", "brainmt:<variant>" or a baseline
    overrides: list[str] = field(default_factory=list)
    restart: int = 0                # BrainMT: which of --restarts initialisations (0: train.seed = seed)

    @property
    def name(self) -> str:
        """The job's folder name."""
        restart = f"-r{self.restart}" if self.restart else ""
        return f"{self.effect}-s{self.seed}-{self.task}-{self.labels}-{self.method.replace(':', '_')}{restart}"


def seed_view(shards: Path, out: Path, seed: int, shuffle: bool = False) -> Path:
    """The same shards with another seed's family-grouped split (and, with ``shuffle``, every target permuted across
    scans after the split is drawn, so that a shuffled view has the same split as its true one): a new manifest and
    splits.json, the shard files and mask linked. A view already there must hold the same split (its runs trained on
    it): else :class:`ReuseError`."""
    from brainmt.data.shards import draw_splits
    from brainmt.fileio import atomic_write_json

    manifest = json.loads((shards / "manifest.json").read_text())
    splits = draw_splits(manifest, seed=seed)
    check_kept_split(out / "splits.json", splits)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "splits.json", splits)
    if shuffle:
        ids = sorted(manifest["scans"])
        order = np.random.default_rng(seed + 7919).permutation(len(ids))
        targets = [manifest["scans"][s]["targets"] for s in ids]
        for scan, j in zip(ids, order, strict=True):
            manifest["scans"][scan]["targets"] = targets[j]
    for name in ("shards", manifest["mask"]["file"]):
        if not (out / name).exists():
            (out / name).symlink_to((shards / name).resolve())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def check_kept_split(path: Path, splits: dict) -> None:
    """A seed view's kept ``splits.json`` must match the split drawn now: the runs kept there trained on it."""
    if not path.exists():
        return
    kept = json.loads(path.read_text())
    if any(kept.get(part) != splits[part] for part in ("train", "validation", "test")):
        raise ReuseError(f"{path}: the split kept there is not the one this benchmark draws for the view (shuffled-label "
                         "views made before 2026-12-01 drew it on the permuted labels), and the runs kept beside it "
                         "trained on it: use another --work-dir")


def threads_per_run(parallel: int) -> int:
    """CPU threads for each of ``parallel`` runs: ``OMP_NUM_THREADS`` if set, else the cores shared out.

    Oversubscribed OpenMP threads made two parallel runs on a 2-core machine 9 times slower than one thread each.
    """
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 2) // parallel))


def visible_gpus(device: str) -> list[str]:
    """The GPUs runs may use: ``CUDA_VISIBLE_DEVICES`` if set, else every GPU torch sees; none off CUDA."""
    if device != "cuda":
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_slots(parallel: int, gpus: list[str]) -> queue.Queue:
    """One environment per concurrent run: its share of the CPU threads and, with GPUs, its own GPU (slot i on
    GPU i mod n), so ``--parallel 6`` on a two-GPU node runs three on each."""
    slots: queue.Queue = queue.Queue()
    for i in range(max(1, parallel)):
        env = {"OMP_NUM_THREADS": str(threads_per_run(parallel))}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        slots.put(env)
    return slots


def run_logged(cmd: list[str], log_path: Path, what: str, slot: dict[str, str]) -> None:
    """Run a brainmt command in its own process with its slot's environment (threads, GPU), its output to
    ``log_path``; an error names the log."""
    env = {**os.environ, **slot, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    if code != 0:
        raise RuntimeError(f"{what} exited with {code} (log {log_path})")


def train_brainmt(job: BenchRun, shards: Path, out: Path, device: str, window: int, log_dir: Path,
                  slot: dict[str, str]) -> dict:
    """``brainmt train`` (the demo config on the CPU, the paper's model on CUDA) in its own process; the test metrics
    of its best checkpoint and its validation curve."""
    task, target = TASKS[job.task]
    base = "demo" if device == "cpu" else "paper"
    frames = [] if device == "cpu" else [f"data.num_frames={window}", f"model.num_frames={window}"]
    cmd = [sys.executable, "-m", "brainmt.cli", "train", "--config", base, "--shards", str(shards), "--run-dir", str(out),
           f"data.task={task}", f"data.target={target}", f"train.device={device}", "data.num_workers=1",
           f"train.seed={job.seed}", *frames, *(CPU_OVERRIDES[job.task] if device == "cpu" else []), *job.overrides]
    run_logged(cmd, log_dir / f"{job.name}.log", f"{job.name}: brainmt train", slot)
    ev = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [{k: r[k] for k in r if k.startswith("val_") or k == "epoch"} for r in records if "val_loss" in r]
    return {"test": ev, "validation": curve, "best_step": ev["step"], "selected_by": ev.get("selected_by")}


def ig_subjects(view: Path, task: str, count: int) -> list[str]:
    """``count`` test subjects of a seed view by sorted id; for classification taken in turn from each class, so that
    a few still hold both and the contrast map is defined."""
    test = sorted(json.loads((view / "splits.json").read_text())["test"])
    if TASKS[task][0] != "classification":
        return test[:count]
    scans = json.loads((view / "manifest.json").read_text())["scans"].values()
    label = {m["subject"]: m["targets"].get(TASKS[task][1]) for m in scans}
    classes = [[s for s in test if label.get(s) == c] for c in sorted({label.get(s) for s in test} - {None})]
    turns = [s for group in itertools.zip_longest(*classes) for s in group if s is not None]
    return turns[:count]


def analyse_brainmt(job: BenchRun, view: Path, out: Path, planted: Path, device: str, subjects: int,
                    log_dir: Path, slot: dict[str, str]) -> dict:
    """``brainmt analyze --truth`` of a trained run on ``subjects`` test subjects of ``view`` (:func:`ig_subjects`; no
    figures, the job's ``analysis.*`` overrides), their classes read from ``view`` (for a shuffled-label run the true
    labels' view): the voxel AUROCs of the group |IG|, net, contrast and class-mean maps for the label's planted
    regions, and against the control region."""
    test = ig_subjects(view, job.task, subjects)
    cmd = [sys.executable, "-m", "brainmt.cli", "analyze", "--run", str(out), "--out", str(out / "ig"),
           "--shards", str(view), "--subjects", *test, "--truth", str(planted), "--device", device, "analysis.figures=false",
           *[o for o in job.overrides if o.startswith("analysis.")]]
    run_logged(cmd, log_dir / f"{job.name}-ig.log", f"{job.name}: brainmt analyze", slot)
    scores = json.loads((out / "ig" / "truth.json").read_text())
    row = {k: scores[k] for k in ("truth_auroc", "effect_vs_control_auroc", "truth_regions", "region_mean")}
    for name in ("net", "contrast", "class_means"):
        found = scores.get(name) or {}
        row |= {f"{name}_truth_auroc": found.get("truth_auroc"),
                f"{name}_vs_control_auroc": found.get("effect_vs_control_auroc")}
    return row | {"subjects": len(test)}


def fit_baseline(job: BenchRun, shards: Path, out: Path, n_boot: int) -> dict:
    """A baseline fitted on the split's training subjects, tested on its test subjects."""
    from brainmt.baseline.fit import run_baseline

    return {"test": run_baseline(shards, job.method, out, target=TASKS[job.task][1], n_boot=n_boot)}


def restart_seed(seed: int, restart: int) -> list[str]:
    """The override that gives restart ``k`` > 0 of a split its own initialisation (none for restart 0)."""
    return [f"train.seed={seed + 1000 * restart}"] if restart else []


def plan(effects: list[str], seeds: Sequence[int], tasks: list[str], variants: dict[str, list[str]],
         shuffled: list[str], baselines: bool, default_run: bool = True, restarts: int = 1) -> list[BenchRun]:
    """Every job of the benchmark, BrainMT runs first (the long ones start early). Each BrainMT config (the plain one
    unless ``default_run`` is False, and each variant) gets its shuffled-label control on the ``shuffled`` effects, and
    runs ``restarts`` times per split: restart k > 0 with ``train.seed = seed + 1000 k``."""
    configs = ([("brainmt", [])] if default_run else []) + [(f"brainmt:{v}", o) for v, o in variants.items()]
    jobs = []
    for effect in effects:
        for seed in seeds:
            for task_name in tasks:
                labels = ("true", "shuffled") if effect in shuffled and task_name == "sex" else ("true",)
                jobs += [BenchRun(effect, seed, task_name, lab, m, [*o, *restart_seed(seed, k)], k)
                         for k in range(max(1, restarts)) for lab in labels for m, o in configs]
    if baselines:
        for effect in effects:
            for seed in seeds:
                for task_name in tasks:
                    task = TASKS[task_name][0]
                    jobs += [BenchRun(effect, seed, task_name, "true", m) for m in BASELINES[task]]
                    if effect in shuffled and task_name == "sex":
                        jobs.append(BenchRun(effect, seed, task_name, "shuffled", BASELINES[task][0]))
    return jobs


def best_validation(row: dict) -> tuple[float, float]:
    """A BrainMT run's best validation point by the metric that picked its checkpoint, as a run ranks its checkpoints
    (:func:`brainmt.config.selection_key`); (-inf, -inf) when it never had a finite value."""
    name = row.get("selected_by") or "val_loss"
    points = [selection_key(name, p[name], p.get("val_loss")) for p in row["validation"]
              if p.get(name) is not None and np.isfinite(p[name])]
    return max(points, default=(float("-inf"), float("-inf")))


def best_of_restarts(rows: list[dict], restarts: int) -> list[dict]:
    """For each split and BrainMT config trained from ``restarts`` initialisations, the run with the best validation
    value (:func:`best_validation`; full ties to the earlier restart), as a row of method ``"<method> best of K"``:
    the restarts recipe's pick, made without looking at the test set. A split whose restarts did not all finish keeps
    its row, picked among those that did (``restarts_found``)."""
    if restarts < 2:
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r.get("restart", 0)):
        if r["method"].startswith("brainmt") and r.get("restart", 0) < restarts:
            groups.setdefault((r["effect"], r["seed"], r["task"], r["labels"], r["method"]), []).append(r)
    return [{**max(members, key=best_validation), "method": f"{members[0]['method']} best of {restarts}",
             "seconds": sum(m["seconds"] for m in members), "restarts_found": len(members)}
            for members in groups.values()]


def picks_to_analyse(rows: list[dict], restarts: int) -> list[dict]:
    """With ``--ig`` and ``--restarts``: the rows (themselves, not copies) of each split's pick, true or shuffled labels,
    that have no IG yet; the other restarts are not analysed."""
    by_name = {r["name"]: r for r in rows}
    return [by_name[p["name"]] for p in best_of_restarts(rows, restarts) if "ig" not in p]


def awaiting_ig(rows: list[dict], restarts: int) -> list[dict]:
    """The rows ``--ig`` has yet to analyse: each split's pick with ``--restarts`` (:func:`picks_to_analyse`), else
    every BrainMT row without IG."""
    if restarts > 1:
        return picks_to_analyse(rows, restarts)
    return [r for r in rows if r["method"].startswith("brainmt") and "ig" not in r]


def summarise(rows: list[dict], restarts: int = 1) -> list[dict]:
    """Mean and sd over seeds (and restarts) of each (effect, task, labels, method): the test metrics and the best
    validation, then the picks of ``restarts`` restarts (:func:`best_of_restarts`). Per-run values are listed in seed
    order (``seed_list``), whatever order the runs finished in."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows + best_of_restarts(rows, restarts), key=lambda r: (r["seed"], r.get("restart", 0))):
        groups.setdefault((r["effect"], r["task"], r["labels"], r["method"]), []).append(r)
    out = []
    for (effect, task, labels, method), members in groups.items():
        kind = TASKS[task][0]
        entry = {"effect": effect, "task": task, "labels": labels, "method": method,
                 "seeds": len({m["seed"] for m in members}), "runs": len(members),
                 "seed_list": [m["seed"] for m in members], "seconds": float(np.mean([m["seconds"] for m in members]))}
        for k in SHOWN[kind]:
            values = [m["test"][k]["value"] for m in members]
            entry[k] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                        "values": values, "ci95": [m["test"][k]["ci95"] for m in members]}
        for k in IG_SCORES:
            values = [m["ig"][k] for m in members if m.get("ig") and m["ig"].get(k) is not None]
            if values:
                entry[f"ig_{k}"] = {"mean": float(np.mean(values)), "values": values}
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    """The summary as a Markdown table (mean ± sd over seeds; the per-seed values in brackets)."""
    lines = ["| effect | task | labels | method | seeds | metric: mean ± sd (per run, in seed order) | s/run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in summary:
        cells = "; ".join(f"{k} {e[k]['mean']:.3f} ± {e[k]['sd']:.3f} ({', '.join(f'{v:.2f}' for v in e[k]['values'])})"
                          for k in SHOWN[TASKS[e["task"]][0]][:2])
        cells += "".join(f"; {k} {e[k]['mean']:.3f} ({', '.join(f'{v:.2f}' for v in e[k]['values'])})"
                         for k in (f"ig_{k}" for k in IG_SCORES) if k in e)
        seeds = f"{e['seeds']}" + (f" ({e['runs']} runs)" if e.get("runs", e["seeds"]) != e["seeds"] else "")
        lines.append(f"| {e['effect']} | {e['task']} | {e['labels']} | {e['method']} | {seeds} | {cells} | "
                     f"{e['seconds']:.0f} |")
    return "\n".join(lines)


def parse_variants(items: list[list[str]]) -> dict[str, list[str]]:
    """``--variant NAME key=value ...`` (repeatable) -> {NAME: overrides}."""
    variants = {}
    for item in items or []:
        name, *overrides = item
        if ":" in name or "=" in name:
            raise SystemExit(f"--variant: the first word is the variant's name, got {name!r}")
        variants[name] = overrides
    return variants


def parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m brainmt.bench.learning``."""
    p = argparse.ArgumentParser(prog="python -m brainmt.bench.learning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=300, help="subjects in each synthetic cohort")
    p.add_argument("--frames", type=int, default=40, help="frames a scan (on CUDA also the training window)")
    p.add_argument("--shape", type=int, nargs=3, default=[20, 24, 20], help="volume grid of the synthetic scans")
    p.add_argument("--window", type=int, help="CUDA: frames a training window (default --frames; shorter windows are "
                   "random crops in time)")
    p.add_argument("--device", choices=list(literal_values(DeviceType)), default="cpu")
    p.add_argument("--effects", nargs="+", choices=EFFECTS, default=["mixed"],
                   help="kinds of planted effect (brainmt synth --effect)")
    p.add_argument("--seeds", type=int, default=1, help="splits and initialisations per effect")
    p.add_argument("--first-seed", type=int, default=0, metavar="K",
                   help="the seeds are K, K+1, ...: more splits added to a work dir without rerunning the first ones")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--shuffled", nargs="*", choices=EFFECTS, default=None, metavar="EFFECT",
                   help="effects whose sex task is repeated with shuffled labels, by every BrainMT config run (default: "
                        "the first effect; none when given without an effect)")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="an extra BrainMT run per seed with these overrides (repeatable)")
    p.add_argument("--no-baselines", action="store_true", help="BrainMT only")
    p.add_argument("--variants-only", action="store_true",
                   help="no BrainMT run with the plain config, shuffled labels included (the variants)")
    p.add_argument("--restarts", type=int, default=1, metavar="K",
                   help="BrainMT runs per split and config, each its own initialisation; the table adds each split's "
                        "pick by validation (the restarts recipe)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--work-dir", default="runs/bench-learning")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic cohorts")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--ig", type=int, default=0, metavar="SUBJECTS",
                   help="after each BrainMT run (shuffled labels too, on the true labels' view), Integrated Gradients "
                        "of this many test subjects, the group maps scored against the planted regions and the control "
                        "(0: none)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every BrainMT run")
    return p


class Bench:
    """One call's runs: each job in its own slot (threads, GPU), its row saved to ``learning.json`` as it finishes."""

    def __init__(self, args: argparse.Namespace, work: Path, jobs: list[BenchRun], done: dict[str, dict],
                 cohorts: dict[str, Path], started: float) -> None:
        self.args, self.work, self.done, self.cohorts = args, work, done, cohorts
        self.by_name = {job.name: job for job in jobs}
        self.rows, self.lock = list(done.values()), threading.Lock()
        self.slots = run_slots(args.parallel, visible_gpus(args.device))
        self.record_path, self.started = work / "learning.json", started

    def view(self, job: BenchRun, labels: str | None = None) -> Path:
        """The seed view (split, labels) a job trains on; with ``labels``, that of the same seed with other labels."""
        return self.work / "views" / f"{job.effect}-s{job.seed}-{labels or job.labels}"

    def ig(self, job: BenchRun, slot: dict[str, str]) -> dict:
        """``brainmt analyze --truth`` of a trained BrainMT run, on the true labels' view (the same split)."""
        planted = self.cohorts[job.effect].parent / "raw" / "derivatives" / "planted"
        return analyse_brainmt(job, self.view(job, "true"), self.work / "runs" / job.name, planted, self.args.device,
                               self.args.ig, self.work / "logs", slot)

    def record(self, row: dict, new: bool, **update: object) -> None:
        """Save ``learning.json`` with a new row, or a row updated with ``update`` (under the lock that the save holds,
        so no row changes while another thread writes them out), and print it."""
        with self.lock:
            row.update(update)
            if new:
                self.rows.append(row)
            save(self.record_path, self.rows, self.args, time.perf_counter() - self.started)
            print(format_row(row), flush=True)

    def analyses(self, job: BenchRun) -> bool:
        """Whether a job gets its IG as soon as it is trained: a BrainMT run under ``--ig`` without restarts (with
        restarts only each split's pick is analysed, once all have finished)."""
        return bool(self.args.ig) and self.args.restarts == 1 and job.method.startswith("brainmt")

    def one(self, job: BenchRun) -> None:
        """Train (or fit) one job and save its row, then with ``--ig`` and no restarts analyse it; a failure is
        reported, not raised. A job an earlier call finished is not run again, only analysed if it has no IG yet."""
        if job.name in self.done:
            if self.analyses(job) and "ig" not in self.done[job.name]:
                self.pick_ig(self.done[job.name])
            return
        a, out, t0, slot = self.args, self.work / "runs" / job.name, time.perf_counter(), self.slots.get()
        try:
            result = (train_brainmt(job, self.view(job), out, a.device, a.window or a.frames, self.work / "logs", slot)
                      if job.method.startswith("brainmt") else fit_baseline(job, self.view(job), out, a.n_boot))
        except Exception as exc:    # one failed run is reported, the others go on
            print(f"FAILED {job.name}: {exc}", flush=True)
            return
        finally:
            self.slots.put(slot)
        row = {**asdict(job), "name": job.name, "seconds": time.perf_counter() - t0, **result}
        self.record(row, new=True)  # kept if the IG fails or the call is stopped during it (a rerun analyses it)
        if self.analyses(job):
            self.pick_ig(row)

    def pick_ig(self, row: dict) -> None:
        """The IG of a saved BrainMT row (a run just trained under ``--ig``, a split's pick with ``--restarts``, or a
        run trained before without ``--ig``), added to the row; a failure is reported and leaves the row without it."""
        slot = self.slots.get()
        try:
            job = self.by_name[row["name"]]
            ig = {**self.ig(job, slot), "settings": ig_settings(job.overrides, self.args.ig)}
        except Exception as exc:
            print(f"FAILED {row['name']}: IG: {exc}", flush=True)
            return
        finally:
            self.slots.put(slot)
        self.record(row, new=False, ig=ig)

    def make_views(self) -> None:
        """Each seed view of this call's jobs, once, before the runs share them (:func:`seed_view`)."""
        for job in {(j.effect, j.seed, j.labels): j for j in self.by_name.values()}.values():
            seed_view(self.cohorts[job.effect], self.view(job), job.seed, shuffle=job.labels == "shuffled")

    def run(self) -> list[dict]:
        """Every job, then (``--ig`` with ``--restarts``) each split's pick analysed; this call's finished rows."""
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max(1, self.args.parallel)) as pool:
            list(pool.map(self.one, self.by_name.values()))
            finished = [r for r in self.rows if r["name"] in self.by_name]   # not the rows of a larger earlier call
            if self.args.ig and self.args.restarts > 1:
                list(pool.map(self.pick_ig, picks_to_analyse(finished, self.args.restarts)))
        return finished


def seeds_of(args: argparse.Namespace) -> range:
    """The seeds this call runs: ``--first-seed`` and the ``--seeds`` - 1 after it."""
    return range(args.first_seed, args.first_seed + args.seeds)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m brainmt.bench.learning``."""
    args, started = parser().parse_args(argv), time.perf_counter()
    work = Path(args.work_dir).resolve()
    shuffled = [args.effects[0]] if args.shuffled is None else args.shuffled
    for name, value, least in (("--restarts", args.restarts, 1), ("--seeds", args.seeds, 1),
                               ("--first-seed", args.first_seed, 0)):
        if value < least:
            print(f"python -m brainmt.bench.learning: {name} must be at least {least}, got {value}", file=sys.stderr)
            return 2
    if args.restarts > 1 and args.first_seed + args.seeds > 1000:
        print("python -m brainmt.bench.learning: with --restarts the seeds must stay below 1000 (restart k of seed s "
              f"trains with train.seed = s + 1000 k), got {args.first_seed}..{args.first_seed + args.seeds - 1}",
              file=sys.stderr)
        return 2
    jobs = plan(args.effects, seeds_of(args), args.tasks, parse_variants(args.variant), shuffled, not args.no_baselines,
                not args.variants_only, args.restarts)
    for job in jobs:
        if job.method.startswith("brainmt"):
            job.overrides = [*args.overrides, *job.overrides]
    record_path = work / "learning.json"
    done = {r["name"]: r for r in json.loads(record_path.read_text())["rows"]} if record_path.exists() else {}
    try:
        check_reuse(jobs, done, record_path)
        settle_ig(jobs, done, args.ig)
        bench = Bench(args, work, jobs, done, prepare_cohorts(work, args), started)
        bench.make_views()
    except ReuseError as exc:
        print(f"python -m brainmt.bench.learning: {exc}", file=sys.stderr)
        return 2
    finished = bench.run()
    summary, seconds = summarise(finished, args.restarts), time.perf_counter() - started
    save(record_path, bench.rows, args, seconds, summary)
    print(f"\n{args.subjects} subjects a cohort ({'x'.join(map(str, args.shape))} voxels, {args.frames} frames), "
          f"device {args.device}, {seconds:.0f} s in all\n{markdown(summary)}", flush=True)
    unanalysed = [r["name"] for r in awaiting_ig(finished, args.restarts)] if args.ig else []
    if unanalysed:
        print(f"python -m brainmt.bench.learning: no IG for {', '.join(unanalysed)}; a rerun with --ig analyses "
              "them without training again", file=sys.stderr)
    return 0 if len(finished) == len(jobs) and not unanalysed else 1


class ReuseError(ValueError):
    """The work directory holds results or a cohort made with other settings than this call's."""


def ig_settings(overrides: list[str], subjects: int) -> dict[str, object]:
    """What a run's IG depends on besides the run: its ``analysis.*`` overrides (the last value of a key wins; not
    ``analysis.figures``, which the benchmark always turns off) and ``--ig``'s number of subjects."""
    found: dict[str, object] = dict(o.split("=", 1) for o in overrides if o.startswith("analysis.") and "=" in o)
    found.pop("analysis.figures", None)
    return found | {"subjects": subjects}


def check_reuse(jobs: list[BenchRun], done: dict[str, dict], record_path: Path) -> None:
    """A finished row is reused only for the same job trained with the same overrides (``analysis.*`` aside);
    anything else is an error."""
    for job in jobs:
        row = done.get(job.name)
        if row is None:
            continue
        if [o for o in row.get("overrides", []) if not o.startswith("analysis.")] != \
                [o for o in job.overrides if not o.startswith("analysis.")]:
            raise ReuseError(f"{record_path} already has {job.name} trained with overrides {row.get('overrides', [])}, "
                             f"not {job.overrides}: use another --work-dir (or remove that one)")


def settle_ig(jobs: list[BenchRun], done: dict[str, dict], subjects: int) -> None:
    """Give each finished row as ``ig`` the IG it has that was made with this call's settings (:func:`ig_settings`;
    without ``--ig``, ``subjects`` 0, any number of subjects), and keep the others in ``ig_superseded``. A row
    without a matching IG is analysed again under ``--ig``; an earlier IG comes back for a call with its settings."""
    def unsized(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k != "subjects"}

    for job in jobs:
        row = done.get(job.name)
        if not row:
            continue
        kept = ([row.pop("ig")] if "ig" in row else []) + row.pop("ig_superseded", [])
        want = ig_settings(job.overrides, subjects)
        made = [ig.get("settings") or ig_settings(row.get("overrides", []), ig.get("subjects", 0)) for ig in kept]
        match = [ig for ig, m in zip(kept, made, strict=True)
                 if (m == want if subjects else unsized(m) == unsized(want))]
        if match:
            row["ig"] = match[0]
        if others := [ig for ig in kept if ig is not row.get("ig")]:
            row["ig_superseded"] = others


def _cohort_settings(effect: str, args: argparse.Namespace) -> dict:
    return {"effect": effect, "subjects": args.subjects, "frames": args.frames, "shape": list(args.shape),
            "data_seed": args.data_seed}


def prepare_cohorts(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """One synthetic cohort per effect (``brainmt synth``, then ``brainmt shard`` as an array of parts and a merge,
    as on a cluster), the effects side by side; each step is skipped when its output exists."""
    cpus = max(1, (os.cpu_count() or 2) // len(args.effects))

    def cli(*argv: str) -> None:
        subprocess.run([sys.executable, "-m", "brainmt.cli", *argv], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def one(effect: str) -> Path:
        raw, shards = work / "data" / effect / "raw", work / "data" / effect / "shards"
        settings, stamp = _cohort_settings(effect, args), work / "data" / effect / "cohort.json"
        if stamp.exists() and json.loads(stamp.read_text()) != settings:
            raise ReuseError(f"{stamp}: the cohort there was made with {json.loads(stamp.read_text())}, this call asks "
                             f"for {settings}: use another --work-dir")
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(settings) + "\n")
        if not (raw / "participants.tsv").exists():
            cli("synth", str(raw), "--effect", effect, "--subjects", str(args.subjects), "--frames", str(args.frames),
                "--shape", *map(str, args.shape), "--seed", str(args.data_seed), "--workers", str(cpus))
        if not (shards / "manifest.json").exists():
            common = ("--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--output", str(shards),
                      "--min-frames", str(args.frames))
            cli("shard", *common, "--mask-only")
            with ThreadPoolExecutor(cpus) as pool:
                list(pool.map(lambda i: cli("shard", *common, "--part", f"{i}/{cpus}"), range(cpus)))
            cli("shard", *common, "--merge")
        return shards

    with ThreadPoolExecutor(len(args.effects)) as pool:
        cohorts = dict(zip(args.effects, pool.map(one, args.effects)))
    print(f"cohorts ready: {', '.join(map(str, cohorts.values()))}", flush=True)
    return cohorts


def format_row(row: dict) -> str:
    """One line: the job and its test metrics."""
    kind = TASKS[row["task"]][0]
    cells = "  ".join(f"{k} {row['test'][k]['value']:.3f}" for k in SHOWN[kind])
    if row.get("ig"):
        control, contrast = row["ig"]["effect_vs_control_auroc"], row["ig"].get("contrast_vs_control_auroc")
        cells += f"  |IG| truth {row['ig']['truth_auroc']:.3f}" + (f" vs control {control:.3f}" if control is not None else "")
        net = row["ig"].get("net_vs_control_auroc")
        cells += f"  |net IG| vs control {net:.3f}" if net is not None else ""
        cells += f"  |contrast| vs control {contrast:.3f}" if contrast is not None else ""
        means = row["ig"].get("class_means_vs_control_auroc")
        cells += f"  |class means| vs control {means:.3f}" if means is not None else ""
    return f"{row['name']:55s} {cells}  ({row['seconds']:.0f} s)"


def save(path: Path, rows: list[dict], args: argparse.Namespace, seconds: float, summary: list | None = None) -> None:
    """learning.json: every finished row, the arguments, the versions and (at the end) the summary."""
    import torch

    from brainmt.fileio import atomic_write_json
    from brainmt.selftest import versions

    atomic_write_json(path, {"rows": rows, "summary": summary, "seconds": seconds, "args": vars(args),
                             "versions": versions(torch.device(args.device))})


if __name__ == "__main__":
    sys.exit(main())
