"""Gather the part files of a prediction into ``predictions.csv``, ``windows.csv``, ``skipped.csv`` and ``summary.json``.

Window outputs become predictions as ``brainmt evaluate`` makes them (:func:`brainmt.train.metrics.to_predictions`:
the training target statistics undone for regression; probabilities, Platt-calibrated when the run was trained with
``train.calibration=platt``, for classification), then are averaged over a scan's windows (scan rows) and over all
of a subject's windows (subject rows, the average ``brainmt evaluate`` reports). With a phenotype table the metrics
are those of ``brainmt evaluate`` (:func:`brainmt.train.metrics.subject_metrics`), over the subjects with a target.
"""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from brainmt.data.shards import count_skips
from brainmt.fileio import atomic_write_json, atomic_write_text
from brainmt.predict.core import check_phenotypes
from brainmt.predict.parts import PredictError, latest_by_scan, read_records, read_settings
from brainmt.train.metrics import format_table, subject_metrics, to_predictions

N_BOOT = 1000


def _latest(records: list[dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(scan -> its newest record where that is a prediction, scan -> its newest record where that is a skip)."""
    latest = sorted(latest_by_scan(records).items())
    return {s: r for s, r in latest if "windows" in r}, {s: r for s, r in latest if "windows" not in r}


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.9g}"


def _targets(phenotypes: str | None, id_column: str | None, settings: dict, subjects: list[str]) -> dict:
    """subject -> target value (None when the table has no usable value); empty without a table."""
    if not phenotypes:
        return {}
    phen = check_phenotypes(phenotypes, id_column, settings, set(subjects))
    return {s: (phen.values.get(s) or {}).get(settings["target"]) for s in subjects}


def _prediction_rows(settings: dict, predicted: dict, win: dict, targets: dict) -> tuple[list[str], list[list]]:
    """predictions.csv: per subject one row (the average over all its windows), then one row per scan of it."""
    classification = settings["task"] == "classification"
    header = ["level", "subject", "scan", "source", "resampled", "windows"]
    header += ["probability", "class"] if classification else ["prediction"]
    header += ["target"] if targets else []

    def values(p: float) -> list:
        return [_num(p), int(p >= 0.5)] if classification else [_num(p)]

    by_subject: dict[str, list[int]] = defaultdict(list)
    by_scan: dict[str, list[int]] = defaultdict(list)
    for i, (subject, scan) in enumerate(zip(win["subject"], win["scan"])):
        by_subject[subject].append(i)
        by_scan[scan].append(i)
    scans_of: dict[str, list[str]] = defaultdict(list)
    for scan, r in predicted.items():          # sorted by scan id
        scans_of[r["subject"]].append(scan)
    rows = []
    for subject in sorted(by_subject):
        target = [_num(targets.get(subject))] if targets else []
        mine = win["prediction"][by_subject[subject]]
        rows.append(["subject", subject, "", "", "", len(mine), *values(float(mine.mean())), *target])
        for scan in scans_of[subject]:
            r, of_scan = predicted[scan], win["prediction"][by_scan[scan]]
            rows.append(["scan", subject, scan, r["source"], int(r["resampled"]), len(of_scan),
                         *values(float(of_scan.mean())), *target])
    return header, rows


def _metrics(settings: dict, win: dict, targets: dict, n_boot: int) -> tuple[dict | None, int]:
    """``brainmt evaluate``'s metrics over the subjects with a target, and how many subjects that is."""
    keep = np.array([targets.get(s) is not None for s in win["subject"]], dtype=bool)
    subjects = [s for s, k in zip(win["subject"], keep) if k]
    if not subjects:
        return None, 0
    y = np.array([targets[s] for s in subjects], dtype=float)
    metrics, rows = subject_metrics(subjects, y, win["output"][keep], settings["target_stats"], n_boot=n_boot,
                                    calibration=settings["calibration"])
    return metrics, len(rows)


def _distribution(settings: dict, rows: list[list]) -> dict:
    """The subject predictions in brief: classes and mean probability, or mean, sd and range."""
    values = np.array([float(r[6]) for r in rows if r[0] == "subject"])
    if settings["task"] == "classification":
        return {"class_1": int((values >= 0.5).sum()), "class_0": int((values < 0.5).sum()),
                "mean_probability": float(values.mean())}
    return {"mean": float(values.mean()), "sd": float(values.std()), "min": float(values.min()), "max": float(values.max())}


def merge(out: str | Path, phenotypes: str | None = None, id_column: str | None = None, n_boot: int = N_BOOT) -> dict:
    """Write the output's tables from every part file; return the summary. PredictError when no scan was predicted
    (skipped.csv says why)."""
    out = Path(out)
    settings = read_settings(out)
    predicted, skipped = _latest(read_records(out))
    atomic_write_text(out / "skipped.csv", _csv(["scan", "subject", "source", "kind", "reason"],
                                                [[s, r["subject"], r["source"], r["kind"], r["reason"]]
                                                 for s, r in skipped.items()]))
    if not predicted:
        raise PredictError(f"no scan could be predicted: {count_skips(list(skipped.values()))}; the reason for each "
                           f"is in {out / 'skipped.csv'}")
    flat = [(r["subject"], scan, start, output) for scan, r in predicted.items() for start, output in r["windows"]]
    win = {"subject": np.array([f[0] for f in flat], dtype=object), "scan": np.array([f[1] for f in flat], dtype=object),
           "output": np.array([f[3] for f in flat], dtype=float)}
    win["prediction"] = to_predictions(win["output"], settings["target_stats"], settings["calibration"])
    targets = _targets(phenotypes, id_column, settings, sorted(set(win["subject"])))
    header, rows = _prediction_rows(settings, predicted, win, targets)
    atomic_write_text(out / "predictions.csv", _csv(header, rows))
    value = "probability" if settings["task"] == "classification" else "prediction"
    atomic_write_text(out / "windows.csv", _csv(["subject", "scan", "start", "output", value],
                                                [[s, c, st, _num(o), _num(p)] for (s, c, st, o), p
                                                 in zip(flat, win["prediction"])]))
    metrics, metric_subjects = _metrics(settings, win, targets, n_boot) if targets else (None, 0)
    summary = {"run": settings["run"], "checkpoint": settings["checkpoint"], "step": settings["step"],
               "task": settings["task"], "target": settings["target"], "calibration": settings["calibration"],
               "scans": len(predicted), "subjects": len({r["subject"] for r in predicted.values()}),
               "windows": len(flat), "resampled": sum(bool(r["resampled"]) for r in predicted.values()),
               "skipped": len(skipped), "skip_reasons": count_skips(list(skipped.values())),
               "distribution": _distribution(settings, rows), "phenotypes": phenotypes,
               "metric_subjects": metric_subjects, "metrics": metrics, "out": str(out.resolve()),
               "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if metrics is None:
        (out / "metrics.json").unlink(missing_ok=True)     # an earlier merge's, against a table not given now
    else:
        atomic_write_json(out / "metrics.json", {**metrics, "subjects": metric_subjects, "task": settings["task"],
                                                 "target": settings["target"], "checkpoint": settings["checkpoint"],
                                                 "calibration": settings["calibration"], "phenotypes": phenotypes})
    atomic_write_json(out / "summary.json", summary)
    return summary


def summary_text(summary: dict) -> str:
    """The summary printed at the end of ``brainmt predict`` and of the job array's merge."""
    d = summary["distribution"]
    lines = [f"predicted {summary['scans']} scans of {summary['subjects']} subjects ({summary['windows']} windows; "
             f"{summary['resampled']} resampled) with {Path(summary['checkpoint']).name} (step {summary['step']}) of "
             f"{summary['run']}; {summary['skip_reasons']}"]
    if summary["task"] == "classification":
        lines.append(f"{summary['target']}: {d['class_1']} subjects of class 1, {d['class_0']} of class 0 "
                     f"(probability >= 0.5); mean probability {d['mean_probability']:.3f}"
                     + (" (Platt-calibrated)" if summary["calibration"] else ""))
    else:
        lines.append(f"{summary['target']} per subject: mean {d['mean']:.4g}, sd {d['sd']:.4g}, "
                     f"range {d['min']:.4g} to {d['max']:.4g}")
    if summary["metrics"] is not None:
        lines.append(format_table(summary["metrics"], f"against {summary['phenotypes']}: {summary['metric_subjects']} "
                                                      "subjects with a target"))
    elif summary["phenotypes"]:
        lines.append(f"no predicted subject has a usable '{summary['target']}' value in {summary['phenotypes']}")
    out = Path(summary["out"])
    lines.append(f"predictions: {out / 'predictions.csv'} (a row per subject and per scan); windows: "
                 f"{out / 'windows.csv'}; skipped: {out / 'skipped.csv'}")
    return "\n".join(lines)


def part_summary(result: dict) -> str:
    """One line of what one part did."""
    i, n = result["part"]
    return (f"part {i}/{n}: {len(result['predicted'])} scans predicted, {len(result['already'])} already predicted, "
            f"{len(result['skipped'])} skipped")

