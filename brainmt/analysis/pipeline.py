"""The analysis of a run: per-subject IG maps (any number of processes, one subject at a time), then the group.

``analyze_subjects`` writes, per subject, into ``OUT/subjects/``: ``<subject>_ig.nii.gz`` (signed IG summed
over frames, averaged over the subject's evaluation windows), ``<subject>_abs_ig.nii.gz`` (|IG| summed over
frames) and ``<subject>_ig.json`` (completeness per window, prediction, settings; written last, it marks the
subject done). A subject that fails leaves ``<subject>_error.json`` and the others go on.
``merge`` reads them back and writes the group maps, ``completeness.csv``, ``regions.csv``, figures and
``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import traceback
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from brainmt.analysis.maps import BrainGrid
from brainmt.config import AnalysisConfig, Config
from brainmt.data.loader import ShardSet, eval_windows
from brainmt.fileio import atomic_write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger("brainmt.analysis")
# completeness holds when |sum(IG) - (f(input) - f(baseline))| <= RTOL * |f(input) - f(baseline)| + ATOL
COMPLETENESS_RTOL, COMPLETENESS_ATOL = 0.01, 1e-4


class AnalysisError(ValueError):
    """The analysis cannot start or finish as asked; the message names the run, subject or file."""


@dataclass
class RunInfo:
    """A trained run opened for analysis: its checkpoint, config, target statistics and shards."""

    run_dir: Path
    checkpoint: Path
    step: int
    cfg: Config
    stats: dict
    shards: ShardSet
    weights: dict
    calibration: dict | None = None     # the checkpoint's Platt fit, applied as ``brainmt evaluate`` applies it


def open_run(run_dir: str | Path, checkpoint: str = "best", shards_dir: str | Path | None = None) -> RunInfo:
    """Resolve and load a run's checkpoint and open its shards; clear errors for a missing run, checkpoint or data."""
    from brainmt.data.shards import ShardError
    from brainmt.train.evaluation import load_run, run_calibration

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir}: run directory not found")
    try:
        loaded = load_run(run_dir, checkpoint, shards_dir)
    except ShardError as exc:
        raise AnalysisError(str(exc)) from None
    return RunInfo(run_dir, loaded.checkpoint, int(loaded.saved["step"]), loaded.cfg, loaded.stats, loaded.shards,
                   loaded.saved["model"], run_calibration(loaded.saved, loaded.cfg))


def subjects_of(shards: ShardSet, split: str, wanted: list[str] | None = None) -> dict[str, list[str]]:
    """Subject -> its scans in ``split``; ``wanted`` (ids, with or without ``sub-``) must all be in that split."""
    try:
        scans = shards.scans_of(split)
    except KeyError as exc:
        raise AnalysisError(f"{shards.root / 'splits.json'}: {exc.args[0]}") from None
    by_subject: dict[str, list[str]] = {}
    for scan in scans:
        by_subject.setdefault(shards.scans[scan]["subject"], []).append(scan)
    if wanted is None:
        return dict(sorted(by_subject.items()))
    names = [w[4:] if w.startswith("sub-") and w not in by_subject else w for w in wanted]
    unknown = [w for w in names if w not in by_subject]
    if unknown:
        splits = {s: name for name, members in shards.splits().items() if isinstance(members, list) for s in members}
        where = [f"'{u}' is in the {splits[u]} split (pass --split {splits[u]})" if u in splits else
                 f"'{u}' is not in {shards.root}" for u in unknown]
        raise AnalysisError(f"unknown subject(s) for the {split} split: {'; '.join(where)}")
    return {w: by_subject[w] for w in dict.fromkeys(names)}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> this process's GPU when one is available, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    from brainmt.distributed import detect, device_for

    if device == "cuda" and not torch.cuda.is_available():
        raise AnalysisError("analysis.device=cuda but no CUDA device is visible")
    return device_for(detect(), device)


def fingerprint(run: RunInfo, settings: AnalysisConfig) -> dict:
    """The settings a subject's maps depend on; maps made with other settings are recomputed."""
    from brainmt.analysis.attribution import AttributionError, resolve_baseline
    from brainmt.train.checkpoint import recorded_sha256

    try:
        baseline = resolve_baseline(settings.baseline, run.cfg.model.input_norm, run.cfg.model.stem_norm)
    except AttributionError as exc:
        raise AnalysisError(f"{run.run_dir}: {exc}") from None
    found = {"checkpoint": run.checkpoint.name, "step": run.step, "steps": settings.steps, "baseline": baseline,
             "method": settings.method, "baseline_scans": settings.baseline_scans if baseline in ("mean", "noise") else None}
    weights = recorded_sha256(run.checkpoint)          # which model: another run's step-N.pt has the same name
    references = {"reference_scans": settings.reference_scans,
                  "references": "spread over the target"}   # maps with references chosen by id alone are recomputed
    return found | (references if baseline == "scans" else {}) | \
        ({"weights": weights} if weights else {}) | {"data": data_identity(run)}


def data_identity(run: RunInfo) -> str:
    """What a subject's maps take from the shards besides its own scans, as a hash: the training split (the baselines'
    and references' pool) and every scan's target (its class; the references' balance). Moved or copied shards keep
    it; another view of the same scans (another split, permuted labels) does not."""
    name = run.stats["target"]
    train = sorted(run.shards.splits().get("train", []))
    targets = sorted((scan, meta["targets"].get(name)) for scan, meta in run.shards.scans.items())
    return hashlib.sha256(json.dumps([train, targets]).encode()).hexdigest()[:16]


# fingerprint keys that older versions did not record: their maps stay valid without them
LATER_KEYS = ("weights", "data")


def settings_match(stored: dict | None, want: dict) -> bool:
    """Whether a subject record's settings are :func:`fingerprint`'s ``want``; a record of a version that did not
    record one of :data:`LATER_KEYS` matches without it."""
    if stored is None:
        return False
    return stored == {k: v for k, v in want.items() if k in stored or k not in LATER_KEYS}


def baseline_scans(shards: ShardSet, split_scans: list[str]) -> list[str]:
    """Scans the 'mean' baseline averages: the training split's, else (no training split) the analysed ones."""
    try:
        return shards.scans_of("train") or split_scans
    except KeyError:
        return split_scans


class SubjectAnalyzer:
    """The run's model, wrapped for packed inputs and loaded once; :meth:`run` attributes one subject."""

    def __init__(self, run: RunInfo, settings: AnalysisConfig, out: Path, split_scans: list[str]) -> None:
        import torch

        from brainmt.analysis.attribution import (
            BASELINES,
            PackedModel,
            reference_scans,
            reference_windows,
            training_fluctuation,
            training_mean,
        )
        from brainmt.train.evaluation import trained_model

        if settings.baseline not in BASELINES:
            raise AnalysisError(f"unknown baseline {settings.baseline!r}; choose one of {', '.join(BASELINES)}")
        self.fingerprint = fingerprint(run, settings)       # refuses a static baseline for a centring model
        self.baseline = self.fingerprint["baseline"]
        self.run_info, self.settings, self.out = run, settings, out
        self.device = resolve_device(settings.device)
        model = trained_model(run.cfg, run.weights)
        model.eval().requires_grad_(False)    # gradients with respect to the input only
        self.model = PackedModel(model, run.shards.brain_index, run.shards.volume_shape).to(self.device)
        self.mean_brain = None
        self.fluctuation = None
        if self.baseline in ("mean", "noise"):
            scans = baseline_scans(run.shards, split_scans)
            self.mean_brain = torch.from_numpy(training_mean(run.shards, scans, settings.baseline_scans)).to(self.device)
        if self.baseline == "noise":
            fluctuation = training_fluctuation(run.shards, scans, settings.baseline_scans)
            self.fluctuation = torch.from_numpy(fluctuation).to(self.device)
        self.references, self.reference_pool, self.reference_ids = None, [], set()
        self.spread = (run.stats["target"], run.stats["task"] == "classification")    # references of every class
        if self.baseline == "scans":
            self.reference_pool = baseline_scans(run.shards, split_scans)
            frames, count = run.cfg.data.num_frames, settings.reference_scans
            self.reference_ids = set(reference_scans(run.shards, self.reference_pool, count, frames, *self.spread))
            windows = reference_windows(run.shards, self.reference_pool, count, frames, *self.spread)
            self.references = torch.from_numpy(windows).to(self.device)
        self.internal_batch_size = settings.internal_batch_size
        self.bytes_per_sample: int | None = None

    def _windows(self, scans: list[str]) -> tuple:
        import torch

        shards, num_frames = self.run_info.shards, self.run_info.cfg.data.num_frames
        windows = eval_windows(shards, scans, num_frames)
        frames = np.stack([shards.read_frames(scan, start, num_frames) for scan, start in windows])
        for (scan, start), block in zip(windows, frames):
            if not np.isfinite(block).all():
                raise AnalysisError(f"scan {scan}: non-finite values in frames {start}-{start + num_frames - 1} of "
                                    f"{shards.root / 'shards' / shards.scans[scan]['shard']} (corrupt shard? check with "
                                    "ShardSet(dir, verify='sha256'))")
        packed = torch.from_numpy(frames).to(self.device, torch.float32)
        background = torch.tensor([shards.scans[s]["background"] for s, _ in windows], dtype=torch.float32,
                                  device=self.device)
        return windows, packed, background

    def run(self, subject: str, scans: list[str]) -> dict:
        """Attribute every window of a subject's scans; write its maps and record; return the record."""
        import torch

        from brainmt.analysis.attribution import attribute_windows, choose_internal_batch_size, make_baseline

        start_time = time.perf_counter()
        windows, packed, background = self._windows(scans)
        noise = torch.Generator().manual_seed(zlib.crc32(subject.encode()))    # the same noise baseline on a rerun
        baseline = make_baseline(self.baseline, packed, background, self.mean_brain, noise, self.fluctuation,
                                 self._references_for(scans))
        if self.internal_batch_size is None:
            self.internal_batch_size, self.bytes_per_sample = choose_internal_batch_size(
                self.model, packed, background, self.settings.steps)
            log.info("internal_batch_size %d (about %.1f MB a sample for the backward pass on %s)",
                     self.internal_batch_size, self.bytes_per_sample / 1e6, self.device)
        results = attribute_windows(self.model, packed, background, baseline, self.settings.steps,
                                    self.internal_batch_size, self.settings.method)
        rows = []
        for (scan, start), (signed, _absolute, f_x, f_b, total) in zip(windows, results):
            if not (np.isfinite(signed).all() and math.isfinite(f_x) and math.isfinite(f_b)):
                raise AnalysisError(f"scan {scan}, window at frame {start}: non-finite attributions or outputs")
            gap = total - (f_x - f_b)
            rows.append({"scan": scan, "start": start, "f_input": f_x, "f_baseline": f_b, "ig_sum": total, "gap": gap,
                         "within_tolerance": abs(gap) <= COMPLETENESS_RTOL * abs(f_x - f_b) + COMPLETENESS_ATOL})
        signed = np.mean([r[0] for r in results], axis=0)
        absolute = np.mean([r[1] for r in results], axis=0)
        grid = BrainGrid(self.run_info.shards, scans)
        subject_dir = self.out / "subjects"
        (subject_dir / f"{subject}_ig.json").unlink(missing_ok=True)   # a record of other settings must not vouch
        grid.save(signed, subject_dir / f"{subject}_ig.nii.gz")             # for maps half rewritten
        grid.save(absolute, subject_dir / f"{subject}_abs_ig.nii.gz")
        record = {"subject": subject, "scans": scans, **self._prediction(scans, rows), "windows": rows,
                  **self._completeness(rows), "internal_batch_size": self.internal_batch_size,
                  "device": str(self.device), "seconds": time.perf_counter() - start_time, "settings": self.fingerprint}
        atomic_write_json(subject_dir / f"{subject}_ig.json", record)
        (subject_dir / f"{subject}_error.json").unlink(missing_ok=True)
        return record

    def _references_for(self, scans: list[str]):
        """The ``scans`` baseline's references without the subject's own scans (``--split train`` analyses subjects
        whose scans the references are drawn from): a reference equal to the input would attribute nothing."""
        import torch

        from brainmt.analysis.attribution import reference_windows

        own = set(scans)
        if not own & self.reference_ids:
            return self.references
        others = [s for s in self.reference_pool if s not in own]
        windows = reference_windows(self.run_info.shards, others, self.settings.reference_scans,
                                    self.run_info.cfg.data.num_frames, *self.spread)
        return torch.from_numpy(windows).to(self.device)

    def _prediction(self, scans: list[str], rows: list[dict]) -> dict:
        from brainmt.train.metrics import to_predictions

        stats, shards = self.run_info.stats, self.run_info.shards
        outputs = np.array([r["f_input"] for r in rows])
        prediction = float(np.mean(to_predictions(outputs, stats, self.run_info.calibration)))   # as evaluation
        return {"target": shards.target(scans[0], stats["target"]), "prediction": prediction, "output": float(outputs.mean())}

    @staticmethod
    def _completeness(rows: list[dict]) -> dict:
        f_x, f_b = np.mean([r["f_input"] for r in rows]), np.mean([r["f_baseline"] for r in rows])
        total = float(np.mean([r["ig_sum"] for r in rows]))
        gap = total - (f_x - f_b)
        return {"f_input": float(f_x), "f_baseline": float(f_b), "ig_sum": total, "gap": float(gap),
                "relative_gap": float(abs(gap) / abs(f_x - f_b)) if f_x != f_b else None,
                "max_window_gap": float(max(abs(r["gap"]) for r in rows)),
                "within_tolerance": all(r["within_tolerance"] for r in rows)}


def _is_done(path: Path, want: dict) -> bool:
    try:
        return settings_match(json.loads(path.read_text()).get("settings"), want)
    except (OSError, json.JSONDecodeError):
        return False


def analyze_subjects(run_dir: str | Path, out: str | Path | None, settings: AnalysisConfig,
                     subjects: list[str] | None = None, shards_dir: str | Path | None = None) -> dict:
    """Per-subject IG maps for ``subjects`` (default: every subject of ``settings.split``); returns what was done.

    Subjects whose maps exist with the same settings are skipped (a re-run or requeued task resumes). A subject
    that fails is logged, recorded in ``<subject>_error.json``, and the next one starts.
    """
    start = time.perf_counter()
    run = open_run(run_dir, settings.checkpoint, shards_dir)
    out = Path(out) if out else run.run_dir / "ig"
    chosen = subjects_of(run.shards, settings.split, subjects)   # bad subjects fail before any folder is made
    want = fingerprint(run, settings)                             # and so does a baseline the model cannot use
    (out / "subjects").mkdir(parents=True, exist_ok=True)
    todo = {s: scans for s, scans in chosen.items() if not _is_done(out / "subjects" / f"{s}_ig.json", want)}
    summary: dict = {"done": [], "failed": {}, "already_done": sorted(set(chosen) - set(todo)), "out": str(out)}
    if todo:
        analyzer = SubjectAnalyzer(run, settings, out, run.shards.scans_of(settings.split))
        for i, (subject, scans) in enumerate(todo.items(), start=1):
            try:
                record = analyzer.run(subject, scans)
            except Exception as exc:   # one subject's failure must not cost the others their maps
                message = f"{type(exc).__name__}: {exc}"
                log.error("subject %s failed: %s", subject, message)
                atomic_write_json(out / "subjects" / f"{subject}_error.json",
                                  {"subject": subject, "error": message, "traceback": traceback.format_exc()})
                summary["failed"][subject] = message
                continue
            summary["done"].append(subject)
            log.info("subject %s (%d/%d): %d windows, f(x) - f(baseline) %.4g, sum IG %.4g, gap %.2g, %.1f s", subject,
                     i, len(todo), len(record["windows"]), record["f_input"] - record["f_baseline"], record["ig_sum"],
                     record["gap"], record["seconds"])
        summary.update(internal_batch_size=analyzer.internal_batch_size, bytes_per_sample=analyzer.bytes_per_sample,
                       device=str(analyzer.device))
    summary["seconds"] = time.perf_counter() - start
    return summary


def settings_to_dict(settings: AnalysisConfig) -> dict:
    """The analysis settings as a plain dict (for job arguments and summary.json)."""
    return asdict(settings)
