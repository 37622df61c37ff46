"""The group step: subject maps -> group maps per class (or for the regression target), region table, figures.

Reads what :func:`brainmt.analysis.pipeline.analyze_subjects` wrote; subjects that failed or never ran are
reported (``summary.json``, the printed summary) and left out of the group.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import time
from pathlib import Path

import numpy as np

from brainmt.analysis.maps import BrainGrid, GroupMaps
from brainmt.analysis.pipeline import (
    COMPLETENESS_ATOL,
    COMPLETENESS_RTOL,
    AnalysisError,
    RunInfo,
    baseline_scans,
    fingerprint,
    open_run,
    settings_match,
    settings_to_dict,
    subjects_of,
)
from brainmt.config import AnalysisConfig
from brainmt.data.loader import ShardSet
from brainmt.fileio import atomic_write_json

log = logging.getLogger("brainmt.analysis")


def class_names(manifest: dict, stats: dict) -> dict[float, str]:
    """Names of the classes of a classification target: female/male for the sex column, else '<target>-<value>'."""
    if stats["task"] != "classification":
        return {}
    if stats["target"] == manifest.get("sex_column") or stats["target"] == "sex":
        return {0.0: "female", 1.0: "male"}
    return {0.0: f"{stats['target']}-0", 1.0: f"{stats['target']}-1"}


def _map_path(out: Path, group: str, kind: str) -> Path:
    return out / (f"group_{kind}.nii.gz" if group == "all" else f"group_{group}_{kind}.nii.gz")


def _collect(out: Path, chosen: dict[str, list[str]], want: dict) -> tuple[dict, dict, list]:
    done, failed, missing = {}, {}, []
    for subject in chosen:
        record_path = out / "subjects" / f"{subject}_ig.json"
        error_path = out / "subjects" / f"{subject}_error.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if record is not None and settings_match(record.get("settings"), want):
            done[subject] = record
        elif error_path.exists():
            failed[subject] = json.loads(error_path.read_text())["error"]
        else:
            missing.append(subject)
    return done, failed, missing


def _write_completeness(done: dict, path: Path) -> dict:
    keys = ("subject", "target", "prediction", "output", "f_input", "f_baseline", "ig_sum", "gap", "relative_gap",
            "max_window_gap", "within_tolerance")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "windows"])
        for record in done.values():
            writer.writerow([f"{record[k]:.6g}" if isinstance(record[k], float) else record[k] for k in keys]
                            + [len(record["windows"])])
    gaps = np.array([abs(r["gap"]) for r in done.values()])
    rel = np.array([r["relative_gap"] for r in done.values() if r["relative_gap"] is not None])
    return {"median_abs_gap": float(np.median(gaps)), "max_abs_gap": float(gaps.max()),
            "median_relative_gap": float(np.median(rel)) if rel.size else None,
            "within_tolerance": int(sum(r["within_tolerance"] for r in done.values())), "subjects": len(done),
            "tolerance": f"|sum IG - (f(input) - f(baseline))| <= {COMPLETENESS_RTOL:g} * |f(input) - f(baseline)| + "
                         f"{COMPLETENESS_ATOL:g} in every window"}


def _accumulate(out: Path, shards: ShardSet, chosen: dict[str, list[str]], done: dict, names: dict[float, str],
                keep: int, fwhm_mm: float) -> tuple[dict[str, GroupMaps], dict[str, GroupMaps], dict]:
    """Group statistics over the subject maps (all subjects, and each class): of the maps smoothed by ``fwhm_mm``
    (the voxel maps) and of the maps as written (for the region table, which averages over regions itself); the
    signed maps of the first ``keep`` subjects (with their grids) are kept for figures."""
    def fresh() -> dict[str, GroupMaps]:
        return {"all": GroupMaps(shards.n_brain)} | {name: GroupMaps(shards.n_brain) for name in names.values()}

    smoothed, raw = fresh(), fresh()
    kept: dict[str, tuple[BrainGrid, np.ndarray]] = {}
    for subject, record in done.items():
        own = BrainGrid(shards, chosen[subject])
        signed = own.load(out / "subjects" / f"{subject}_ig.nii.gz")
        absolute = own.load(out / "subjects" / f"{subject}_abs_ig.nii.gz")
        smooth_signed, smooth_absolute = own.smooth(np.stack([signed, absolute]), fwhm_mm)
        target = float(record["target"])
        for group in ["all", *([names[target]] if names else [])]:
            raw[group].add(signed, absolute, target)
            smoothed[group].add(smooth_signed, smooth_absolute, target)
        if len(kept) < keep:
            kept[subject] = (own, signed)
    return smoothed, raw, kept


def _t_groups(maps: dict, names: dict) -> list[str]:
    """The groups whose t-map is drawn: each class for a classification target (signs differ between classes),
    else all subjects."""
    return [g for g in maps if g != "all" or not names]


def _slice_figures(out: Path, run: RunInfo, settings: AnalysisConfig, grid: BrainGrid, maps: dict, groups: dict,
                   names: dict) -> list[Path]:
    """The hand-drawn slices (over the training subjects' mean image, in the scans' own grid)."""
    from brainmt.analysis.attribution import training_mean
    from brainmt.analysis.figures import orthogonal_slices

    shards = run.shards
    mean_brain = training_mean(shards, baseline_scans(shards, shards.scans_of(settings.split)), settings.baseline_scans)
    underlay = grid.to_canonical(mean_brain)
    mask = grid.to_canonical(np.ones(grid.n_brain, dtype=bool))
    figures = [orthogonal_slices(grid.to_canonical(maps["all"]["mean_abs_ig"]), underlay, mask, grid.canonical_affine,
                                 out / "group_mean_abs_ig.png", f"mean |IG| of {groups['all'].n} subjects "
                                 f"({settings.split} split), target '{run.stats['target']}'")]
    for group in _t_groups(maps, names):
        figures.append(orthogonal_slices(grid.to_canonical(maps[group]["t_ig"]), underlay, mask, grid.canonical_affine,
                                         _map_path(out, group, "t_ig").with_suffix("").with_suffix(".png"),
                                         f"t of signed IG, {group} ({groups[group].n} subjects); > 0: toward a higher "
                                         f"{'class' if names else 'prediction'}", signed=True))
    return figures


def _brain_figures(out: Path, grid: BrainGrid, maps: dict, groups: dict, names: dict, kept: dict, done: dict,
                   percentile: float, contrast: np.ndarray | None = None) -> list[dict]:
    """nilearn stat-map and glass-brain figures of the group |IG| map, the t-maps, the contrast map (if any) and the
    kept subjects' signed maps."""
    from brainmt.analysis.figures import brain_map_figures

    def stem(group: str, kind: str) -> Path:
        return _map_path(out, group, kind).with_suffix("").with_suffix("")

    jobs = [(grid, maps["all"]["mean_abs_ig"], stem("all", "mean_abs_ig"), f"mean |IG|, {groups['all'].n} subjects",
             False, "group_mean_abs_ig")]
    jobs += [(grid, maps[g]["t_ig"], stem(g, "t_ig"), f"t of IG, {g} ({groups[g].n} subjects)", True, stem(g, "t_ig").name)
             for g in _t_groups(maps, names)]
    if contrast is not None:
        higher = f"higher in {names[1.0]}" if names else "higher with the target"
        jobs.append((grid, contrast, out / "group_contrast_ig", f"contrast of IG, {groups['all'].n} subjects; > 0: {higher}",
                     True, "group_contrast_ig"))
    for subject, (own, signed) in kept.items():
        target = float(done[subject]["target"])
        title = f"IG of {subject} ({names.get(target, f'target {target:g}')}, prediction {done[subject]['prediction']:.3g})"
        jobs.append((own, signed, out / "subjects" / f"{subject}_ig", title, True, f"subjects/{subject}_ig"))
    records = []
    for on_grid, values, path, title, signed, name in jobs:
        records += [{"map": name, **r} for r in brain_map_figures(on_grid, values, path, title, signed, percentile)]
    return records


def _remove_stale(out: Path, absent_classes: list[str], has_contrast: bool) -> None:
    """Remove the group maps and figures an earlier merge wrote for a class (or a contrast) this merge has none of."""
    patterns = [f"group_{glob.escape(name)}_*" for name in absent_classes] + ([] if has_contrast else ["group_contrast_ig*"])
    for pattern in patterns:
        for stale in out.glob(pattern):
            stale.unlink()


def merge(run_dir: str | Path, out: str | Path | None, settings: AnalysisConfig, subjects: list[str] | None = None,
          shards_dir: str | Path | None = None) -> dict:
    """Group maps, completeness table, region table, figures and ``summary.json`` from the subject maps."""
    from brainmt.analysis.atlases import resolve_atlas
    from brainmt.analysis.figures import FIGURE_PERCENTILE, SUBJECT_FIGURES, top_regions_chart
    from brainmt.analysis.regions import region_table, write_region_table

    start = time.perf_counter()
    run = open_run(run_dir, settings.checkpoint, shards_dir)
    out = Path(out) if out else run.run_dir / "ig"
    shards = run.shards
    chosen = subjects_of(shards, settings.split, subjects)
    want = fingerprint(run, settings)
    done, failed, missing = _collect(out, chosen, want)
    if not done:
        reasons = "".join(f"; {s}: {e}" for s, e in failed.items())
        raise AnalysisError(f"{out / 'subjects'}: no subject maps for these settings ({len(failed)} failed, "
                            f"{len(missing)} not run{reasons})")
    grid = BrainGrid(shards, [s for subject in done for s in chosen[subject]])
    parcellation = resolve_atlas(settings.atlas, settings.atlas_labels, grid)   # a bad atlas stops before any file
    # analysis.figure_percentile / analysis.subject_figures (docs/analysis.md); the defaults when the config has none
    percentile = float(getattr(settings, "figure_percentile", FIGURE_PERCENTILE))
    names = class_names(shards.manifest, run.stats)
    groups, unsmoothed, kept = _accumulate(out, shards, chosen, done, names,
                                           int(getattr(settings, "subject_figures", SUBJECT_FIGURES)), settings.smooth_fwhm)
    maps = {g: acc.result() for g, acc in groups.items() if acc.n}
    # every map of every group: mean, mean |IG|, t, and the contrast where the group's targets differ (only "all")
    files = [str(grid.save(m, _map_path(out, group, kind))) for group, result in maps.items() for kind, m in result.items()]
    contrast_map = maps["all"].get("contrast_ig")
    _remove_stale(out, [n for n in names.values() if n not in maps], contrast_map is not None)
    completeness = _write_completeness(done, out / "completeness.csv")
    region_maps = {g: acc.result() for g, acc in unsmoothed.items() if acc.n}
    rows = region_table(parcellation.labels, parcellation.names, region_maps["all"],
                        {g: m["mean_ig"] for g, m in region_maps.items() if g != "all"})
    write_region_table(rows, out / "regions.csv")

    figures, brain = [], []
    if settings.figures:
        figures = _slice_figures(out, run, settings, grid, maps, groups, names)
        figures.append(top_regions_chart(rows, out / "top_regions.png", settings.top_regions,
                                         f"top regions by mean |IG| ({parcellation.short})"))
        brain = _brain_figures(out, grid, maps, groups, names, kept, done, percentile, contrast_map)
    summary = {"run": str(run.run_dir), "checkpoint": str(run.checkpoint), "step": run.step, "task": run.stats["task"],
               "target": run.stats["target"], "split": settings.split,
               "settings": {**settings_to_dict(settings), "baseline": want["baseline"]},
               "subjects": len(chosen), "analysed": len(done), "failed": failed, "missing": missing,
               "groups": {g: acc.n for g, acc in groups.items()}, "completeness": completeness,
               "atlas": parcellation.description, "regions": len(rows), "top_regions": rows[:settings.top_regions],
               "maps": files, "figures": [str(f) for f in figures] + [r["file"] for r in brain],
               "brain_figures": {"template": "MNI152 (ICBM 2009a nonlinear symmetric, 1 mm; bundled with nilearn)",
                                 "percentile": percentile, "figures": brain},
               "grid": {"shape": list(grid.shape), "affine": grid.affine.tolist()}, "seconds": time.perf_counter() - start}
    atomic_write_json(out / "summary.json", summary)
    return summary


def summary_text(summary: dict, top: int | None = None) -> str:
    """The printed summary of :func:`merge`: subjects, completeness, top regions, files, failures."""
    c = summary["completeness"]
    rel = f", median relative {c['median_relative_gap']:.2g}" if c["median_relative_gap"] is not None else ""
    lines = [f"IG of {summary['analysed']} of {summary['subjects']} subjects ({summary['split']} split, "
             f"target '{summary['target']}', checkpoint step {summary['step']}, baseline {summary['settings']['baseline']}, "
             f"{summary['settings']['steps']} steps); groups: "
             + ", ".join(f"{g} {n}" for g, n in summary["groups"].items()),
             f"completeness gap |sum IG - (f(x) - f(baseline))|: median {c['median_abs_gap']:.2g}, max "
             f"{c['max_abs_gap']:.2g}{rel}; {c['within_tolerance']} of {c['subjects']} subjects within the tolerance "
             f"({c['tolerance']})"]
    if c["within_tolerance"] < c["subjects"]:
        lines.append("  the path integral is coarse for the others: raise --steps (or try --method riemann_trapezoid, "
                     "or another --baseline); see completeness.csv")
    shown = summary["top_regions"][:top] if top else summary["top_regions"]
    lines.append(f"top regions by mean |IG| ({summary['atlas']}):")
    lines += [f"  {r['rank']:>3}  {r['name'][:48]:48s} {r['mean_abs_ig']:.4g}  ({100 * r['share_abs_ig']:.1f}% of |IG|, "
              f"{r['voxels']} voxels)" for r in shown]
    out = Path(summary["maps"][0]).parent if summary["maps"] else None
    lines.append(f"maps, regions.csv, completeness.csv, {'figures ' if summary['figures'] else ''}and summary.json in {out}")
    for subject, error in summary["failed"].items():
        lines.append(f"FAILED subject {subject}: {error} (see subjects/{subject}_error.json)")
    if summary["missing"]:
        lines.append(f"NOT RUN: {len(summary['missing'])} subject(s) have no maps: {', '.join(summary['missing'][:10])}"
                     f"{' ...' if len(summary['missing']) > 10 else ''}")
    return "\n".join(lines)
