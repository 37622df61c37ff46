"""Apply a trained run to new scans: every evaluation window of each scan through the run's model, one part file.

The windows are those ``brainmt evaluate`` averages (:func:`brainmt.data.loader.window_starts`: starts 0, T, 2T, ...
and one window ending at the last frame, T = the run's ``data.num_frames``), built into dense volumes by the run's
own :meth:`ShardSet.unpack <brainmt.data.loader.ShardSet.unpack>` and put through the checkpoint's model under the
run's precision, as :func:`brainmt.train.evaluation.predict` does.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainmt.data.layouts import ScanSource, find_scans
from brainmt.data.loader import window_starts
from brainmt.data.phenotypes import PhenotypeError, Phenotypes, read_phenotypes
from brainmt.predict.parts import PartWriter, PredictError, done_scans, start_output
from brainmt.predict.scans import KIND_OUTPUT, ReadScan, RunGrid, SkipScan, read_scan
from brainmt.train.evaluation import LoadedRun, load_run, run_calibration, trained_model
from brainmt.train.step import autocast

log = logging.getLogger("brainmt.predict")


@dataclass
class PredictRequest:
    """What to predict: the run and checkpoint, the scans (directory and layout), the output, and how."""

    run: str
    out: str
    input: str | None = None
    checkpoint: str = "best"
    shards: str | None = None
    layout: str = "auto"
    glob: str | None = None
    subject_regex: str | None = None
    bids_space: str | None = None
    phenotypes: str | None = None
    id_column: str | None = None
    device: str = "auto"
    resample: bool = False


def find_inputs(req: PredictRequest) -> list[ScanSource]:
    """The scans under ``req.input`` (``brainmt shard``'s layouts), sorted by scan id."""
    if not req.input:
        raise PredictError("--input DIR is needed (the directory of the scans to predict)")
    _, scans = find_scans(req.input, req.layout, req.glob, req.subject_regex, req.bids_space)
    return sorted(scans, key=lambda s: s.scan_id)


def part_of(sources: list[ScanSource], part: tuple[int, int]) -> list[ScanSource]:
    """Slice ``i`` of ``n`` of the sorted scans (every n-th from the i-th), as ``brainmt shard --part`` slices."""
    index, n_parts = part
    return sources[index::n_parts]


def open_run(req: PredictRequest) -> LoadedRun:
    """The run's checkpoint, config and shards (their manifest and mask hold the preprocessing); clear errors."""
    run_dir = Path(req.run)
    if not (run_dir / "config.yaml").exists():
        raise PredictError(f"{run_dir}: not a brainmt run directory (no config.yaml; make one with brainmt train)")
    return load_run(run_dir, req.checkpoint, req.shards)


def model_settings(req: PredictRequest, loaded: LoadedRun) -> dict:
    """What identifies the model and turns its outputs into predictions (kept in ``OUT/predict.json``)."""
    cfg, saved = loaded.cfg, loaded.saved
    m = loaded.shards.manifest
    return {"run": str(Path(req.run).resolve()), "checkpoint": str(loaded.checkpoint.resolve()),
            "step": int(saved["step"]), "task": loaded.stats["task"], "target": loaded.stats["target"],
            "num_frames": int(cfg.data.num_frames), "target_stats": loaded.stats,
            "calibration": run_calibration(saved, cfg),
            "shards": str(Path(loaded.shards.root).resolve()), "sex_column": m.get("sex_column"),
            "grid": {k: m["mask"][k] for k in ("shape", "voxel_size", "affine")},
            "background": m["preprocessing"]["background"]}


def check_phenotypes(path: str, id_column: str | None, settings: dict,
                     subjects: Collection[str] | None = None) -> Phenotypes:
    """The phenotype table read for the run's target (sex coded as ``brainmt shard`` codes it); PhenotypeError if
    the table or its target column cannot be used (for a classification run: a value other than 0 or 1 among
    ``subjects``, default every row)."""
    target = settings["target"]
    sex = target if target == settings.get("sex_column") else None
    phen = read_phenotypes(path, id_column, [target], sex_column=sex)
    if settings["task"] == "classification":
        bad = {s: v[target] for s, v in phen.values.items()
               if v.get(target) not in (None, 0.0, 1.0) and (subjects is None or s in subjects)}
        if bad:
            example = next(iter(bad.items()))
            raise PhenotypeError(f"{path}: the run classifies {target} as 0 or 1, but {len(bad)} subject(s) have "
                                 f"other values (subject {example[0]}: {example[1]:g}); recode the column")
    return phen


def check_request(req: PredictRequest) -> tuple[dict, list[ScanSource]]:
    """Everything a prediction needs, checked without loading the model onto a device: (the model's settings, the
    scans found). Raises on a bad run, checkpoint, input directory or phenotype table."""
    settings = model_settings(req, open_run(req))
    sources = find_inputs(req)
    if req.phenotypes:
        check_phenotypes(req.phenotypes, req.id_column, settings, {s.subject for s in sources})
    return settings, sources


def resolve_device(requested: str) -> torch.device:
    """``auto``: a GPU when there is one, else the CPU; ``cuda`` without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda, but CUDA is not available here; use --device cpu or auto")
    return torch.device("cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu")


@dataclass
class Predictor:
    """A run opened for prediction: its settings, checkpoint, preprocessing grid and model on a device."""

    settings: dict
    loaded: LoadedRun
    grid: RunGrid
    model: torch.nn.Module
    device: torch.device


def open_predictor(req: PredictRequest) -> Predictor:
    """Load the run's checkpoint and model onto ``req.device`` and its preprocessing from its shard manifest."""
    loaded = open_run(req)
    device = resolve_device(req.device)
    model = trained_model(loaded.cfg, loaded.saved["model"], device).eval()
    return Predictor(model_settings(req, loaded), loaded, RunGrid.of(loaded.shards, loaded.cfg.data.num_frames), model,
                     device)


@torch.no_grad()
def window_outputs(p: Predictor, scan: ReadScan) -> list[tuple[int, float]]:
    """(start, model output) of every evaluation window of one scan, in order; SkipScan if an output is not finite."""
    cfg, shards = p.loaded.cfg, p.loaded.shards
    frames, T = scan.series.data, cfg.data.num_frames
    starts = window_starts(len(frames), T)
    outputs: list[float] = []
    for i in range(0, len(starts), cfg.train.batch_size):
        x = torch.stack([shards.unpack(torch.from_numpy(frames[s:s + T]).to(p.device), scan.series.background)
                         for s in starts[i:i + cfg.train.batch_size]]).float()
        with autocast(p.device, cfg.train.precision):
            outputs += p.model(x).squeeze(1).float().cpu().tolist()
    bad = [s for s, o in zip(starts, outputs) if not np.isfinite(o)]
    if bad:
        raise SkipScan(KIND_OUTPUT, f"{scan.source.path}: the model's output is not finite in {len(bad)} window(s) "
                                    f"(the first from frame {bad[0]}); check the scan's values and the checkpoint")
    return list(zip(starts, outputs))


def _read_ahead(todo: list[ScanSource], grid: RunGrid, resample: bool) -> Iterator[tuple[ScanSource, ReadScan | SkipScan]]:
    """Each scan read (or its SkipScan), the next one read in a thread while the caller predicts this one."""
    def read(src: ScanSource) -> ReadScan | SkipScan:
        try:
            return read_scan(src, grid, resample)
        except SkipScan as exc:
            return exc

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, todo[0]) if todo else None
        for i, src in enumerate(todo):
            got = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(read, todo[i + 1]) if i + 1 < len(todo) else None
            yield src, got


def predict_part(p: Predictor, out: str | Path, sources: list[ScanSource], part: tuple[int, int] = (0, 1),
                 resample: bool = False, progress: bool | None = None) -> dict:
    """Predict the scans of ``sources`` not yet predicted into ``out``, appending each to this part's file; a scan
    that cannot be predicted is recorded with the reason (and printed on stderr). Returns what was done."""
    done = done_scans(out, sources)
    todo = [s for s in sources if s.scan_id not in done]
    result: dict = {"part": list(part), "predicted": [], "already": sorted(done), "skipped": {}}
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"predict part {part[0]}/{part[1]}", unit="scan")
    with PartWriter(out, part) as writer:
        for src, got in _read_ahead(todo, p.grid, resample):
            try:
                if isinstance(got, SkipScan):
                    raise got
                writer.predicted(src, got.header.frames, got.resampled, window_outputs(p, got))
                result["predicted"].append(src.scan_id)
            except SkipScan as exc:
                writer.skipped(src, exc.kind, exc.reason)
                result["skipped"][src.scan_id] = exc.reason
                print(f"brainmt predict: skipping {src.scan_id}: {exc.reason}", file=sys.stderr, flush=True)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return result


def run_part(req: PredictRequest, part: tuple[int, int] = (0, 1), progress: bool | None = None) -> dict:
    """One process's work: open the run, find the scans, check the phenotype table (if any), start (or continue) the
    output, then predict slice ``part`` of the scans. Every check runs before anything is written."""
    p = open_predictor(req)
    sources = find_inputs(req)
    if req.phenotypes:
        check_phenotypes(req.phenotypes, req.id_column, p.settings)
    start_output(req.out, p.settings)
    return predict_part(p, req.out, part_of(sources, part), part, req.resample, progress)
