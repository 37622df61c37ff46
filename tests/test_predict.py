"""``brainmt predict``: new scans through a run's preprocessing and model, checked against ``brainmt evaluate`` on the
same scans sharded the usual way; bad input skipped and reported; other grids refused or resampled; the job array.

Two debug-size runs (sex with Platt calibration, cognition) are trained in-process on the shared small shards; the
new scans are synthetic subjects of another seed, 30 frames (windows of 8 start at 0, 8, 16 and 22).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_from_to

from brainmt.config import load_config
from brainmt.data.nifti import OpenScan, ResampledScan
from brainmt.data.shards import ShardOptions, shard_dataset
from brainmt.data.synthetic import write_synthetic_bids
from brainmt.distributed import DistEnv
from brainmt.launch import predict_jobs
from brainmt.predict import main
from brainmt.train.evaluation import evaluate, load_run, predict, trained_model
from brainmt.train.loop import train

OVERRIDES = ["data.num_frames=8", "model.num_frames=8", "train.epochs=2", "data.samples_per_epoch=24",
             "train.log_every=1"]
RUNS = {"sex": ["data.task=classification", "data.target=sex", "train.calibration=platt"],
        "cognition": ["data.task=regression", "data.target=cognition"]}
ROOT = Path(__file__).parent.parent
GLOB = ["--layout", "glob", "--glob", "*.nii.gz", "--subject-regex", r"^([A-Za-z0-9]+)\.nii"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the machine is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def runs(small_shards: Path, tmp_path_factory) -> dict[str, Path]:
    """A classification run (sex, Platt-calibrated) and a regression run (cognition) of the debug model."""
    root = tmp_path_factory.mktemp("predict-runs")
    for name, extra in RUNS.items():
        train(load_config("debug", OVERRIDES + extra), small_shards, root / name)
    return {name: root / name for name in RUNS}


@pytest.fixture(scope="module")
def new(tmp_path_factory) -> dict[str, Path]:
    """Six new synthetic subjects (another seed, 30 frames); their phenotype table kept apart from the scans."""
    root = tmp_path_factory.mktemp("predict-new")
    raw = write_synthetic_bids(root / "raw", 6, 30, (20, 24, 20), seed=7)
    (raw / "participants.tsv").rename(root / "participants.tsv")
    return {"raw": raw, "phenotypes": root / "participants.tsv"}


@pytest.fixture(scope="module")
def sex_predictions(runs, new, tmp_path_factory) -> Path:
    """``brainmt predict`` of the new scans with the sex run, no phenotypes."""
    out = tmp_path_factory.mktemp("predict-sex") / "out"
    assert main(["--run", str(runs["sex"]), "--input", str(new["raw"]), "--out", str(out), "--device", "cpu"]) == 0
    return out


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _predict(*args: str) -> int:
    return main([*map(str, args), "--device", "cpu"])


def _evaluated_like_brainmt_evaluate(run: Path, new: dict, tmp_path: Path) -> tuple[dict, list[float]]:
    """The new scans sharded the usual way (with phenotypes, the run's mask), all in the test split, then evaluated
    by ``evaluate`` (metrics) and ``predict`` (window outputs)."""
    run_shards = Path(load_config(run / "config.yaml").data.shards)
    background = json.loads((run_shards / "manifest.json").read_text())["preprocessing"]["background"]
    shards = tmp_path / "shards"
    shard_dataset(new["raw"], new["phenotypes"], shards, mask=str(run_shards / "mask.nii.gz"),
                  options=ShardOptions(min_frames=8, chunk_frames=4, background=background), progress=False)
    splits = json.loads((shards / "splits.json").read_text())
    everyone = sorted(splits["train"] + splits["validation"] + splits["test"])
    (shards / "splits.json").write_text(json.dumps({**splits, "train": [], "validation": [], "test": everyone}))
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics = evaluate(copy, "test", shards_dir=shards, force=True)
    loaded = load_run(copy, "best", shards)
    model = trained_model(loaded.cfg, loaded.saved["model"])
    _, _, outputs = predict(model, loaded.shards, loaded.shards.scans_of("test"), loaded.cfg, torch.device("cpu"),
                            DistEnv("single"))
    return metrics, outputs.tolist()


@pytest.mark.parametrize("name", list(RUNS))
def test_predictions_match_brainmt_evaluate(runs, new, tmp_path, capsys, name):
    out = tmp_path / "out"
    assert _predict("--run", runs[name], "--input", new["raw"], "--out", out) == 0     # no phenotype table
    printed = capsys.readouterr().out
    assert "predicted 6 scans of 6 subjects (24 windows; 0 resampled)" in printed and "0 skipped" in printed
    assert not (out / "metrics.json").exists()
    rows = _rows(out / "predictions.csv")
    assert [r["level"] for r in rows] == ["subject", "scan"] * 6
    # the same scans sharded with phenotypes and evaluated as brainmt evaluate does
    ev, outputs = _evaluated_like_brainmt_evaluate(runs[name], new, tmp_path)
    windows = _rows(out / "windows.csv")
    assert [int(w["start"]) for w in windows[:4]] == [0, 8, 16, 22]
    assert [float(w["output"]) for w in windows] == pytest.approx(outputs, abs=1e-6)
    copy_rows = _rows(tmp_path / "run" / "predictions.csv")          # brainmt evaluate's (6 significant digits)
    value = "probability" if name == "sex" else "prediction"
    ours = {r["subject"]: float(r[value]) for r in rows if r["level"] == "subject"}
    assert ours == pytest.approx({r["subject"]: float(r["prediction"]) for r in copy_rows}, rel=1e-5)
    if name == "sex":
        settings = json.loads((out / "predict.json").read_text())
        # the run's own Platt fit (None when the tiny run's fit would reverse the ranking: test_levers.py)
        assert settings["calibration"] == load_run(runs[name]).saved.get("calibration")
        assert all(r["class"] == str(int(float(r["probability"]) >= 0.5)) for r in rows)
    # the table given afterwards: the metrics of brainmt evaluate, to float tolerance
    assert _predict("--run", runs[name], "--out", out, "--merge-only", "--phenotypes", new["phenotypes"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    keys = ["auroc", "accuracy", "balanced_accuracy"] if name == "sex" else ["mse", "mae", "pearson_r"]
    for key in keys:
        assert metrics[key]["value"] == pytest.approx(ev[key]["value"], rel=1e-6, abs=1e-9), key
        assert metrics[key]["ci95"] == pytest.approx(ev[key]["ci95"], rel=1e-6, abs=1e-9), key
    assert "6 subjects with a target" in capsys.readouterr().out


def test_rerun_skips_predicted_scans_and_survives_a_cut_line(runs, new, sex_predictions, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(sex_predictions, out)
    before = (out / "predictions.csv").read_text()
    assert _predict("--run", runs["sex"], "--input", new["raw"], "--out", out) == 0
    assert "0 scans predicted, 6 already predicted, 0 skipped" in capsys.readouterr().out
    part = out / "parts" / "part-000-of-001.jsonl"
    text = part.read_text()
    part.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])   # the last scan's line cut short
    assert _predict("--run", runs["sex"], "--input", new["raw"], "--out", out) == 0
    assert "1 scans predicted, 5 already predicted, 0 skipped" in capsys.readouterr().out
    assert (out / "predictions.csv").read_text() == before
    # another checkpoint into the same output is refused before anything is written
    used = json.loads((out / "predict.json").read_text())["checkpoint"]
    (other,) = [c for c in (runs["sex"] / "checkpoints").glob("step-*.pt") if str(c.resolve()) != used]
    assert _predict("--run", runs["sex"], "--input", new["raw"], "--out", out, "--checkpoint", other) == 1
    assert "holds the predictions of another model: checkpoint" in capsys.readouterr().err


def test_a_scan_broken_or_replaced_since_its_prediction_is_not_reported_as_predicted(runs, new, tmp_path, capsys):
    """The newest record of a scan decides: one that a rerun skips (its file cut short since) leaves the predictions
    and is reported skipped; one predicted from another file since is predicted again from this one."""
    raw, other, out = tmp_path / "raw", tmp_path / "other", tmp_path / "out"
    shutil.copytree(new["raw"], raw)
    assert _predict("--run", runs["sex"], "--input", raw, "--out", out) == 0
    first = sorted(raw.glob("sub-*/func/*_bold.nii.gz"))[0]
    subject = first.name.split("_")[0][len("sub-"):]
    shutil.copytree(raw, other)
    assert _predict("--run", runs["sex"], "--input", other, "--out", out) == 0           # every scan from other/
    assert "6 scans predicted, 0 already predicted" in capsys.readouterr().out
    assert _predict("--run", runs["sex"], "--input", raw, "--out", out) == 0
    assert "6 scans predicted, 0 already predicted" in capsys.readouterr().out           # not "6 already predicted"
    assert {r["source"] for r in _rows(out / "predictions.csv") if r["level"] == "scan"} == {
        str(p.resolve()) for p in raw.glob("sub-*/func/*_bold.nii.gz")}
    first.write_bytes(first.read_bytes()[:3000])
    os.utime(first, (1, 1))                                                            # surely another mtime
    assert _predict("--run", runs["sex"], "--input", raw, "--out", out) == 0
    assert "0 scans predicted, 5 already predicted, 1 skipped" in capsys.readouterr().out
    assert subject not in {r["subject"] for r in _rows(out / "predictions.csv")}
    assert [r["scan"] for r in _rows(out / "skipped.csv")] == [f"sub-{subject}"]


def _good_scan(new: dict) -> nib.Nifti1Image:
    return nib.load(sorted(new["raw"].glob("sub-*/func/*_bold.nii.gz"))[0])


def _write_bad(kind: str, img: nib.Nifti1Image, path: Path) -> str:
    """Write one bad scan of ``kind`` at ``path``; returns a phrase its skip reason must hold."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    if kind == "3-D":
        nib.save(nib.Nifti1Image(data[..., 0], img.affine), path)
        return "expected a 4-D image"
    if kind == "nan":
        data[10, 12, 10, 3] = np.nan                       # the middle of the brain, frame 3
        nib.save(nib.Nifti1Image(data, img.affine), path)
        return "NaN or infinite values inside the brain mask"
    if kind == "short":
        nib.save(nib.Nifti1Image(data[..., :5], img.affine), path)
        return "5 frames, fewer than one window of the run (data.num_frames 8)"
    full = path.with_name("full.nii")
    nib.save(nib.Nifti1Image(data, img.affine), full)
    path.write_bytes(gzip.compress(full.read_bytes())[: full.stat().st_size // 6])   # a .nii.gz cut short
    full.unlink()
    return "truncated or corrupt data"


@pytest.mark.parametrize("kind", ["3-D", "nan", "short", "unreadable"])
def test_bad_scan_is_skipped_and_reported(runs, new, tmp_path, capsys, kind):
    scans = tmp_path / "scans"
    scans.mkdir()
    img = _good_scan(new)
    shutil.copy(img.get_filename(), scans / "good.nii.gz")
    phrase = _write_bad(kind, img, scans / "bad.nii.gz")
    out = tmp_path / "out"
    assert _predict("--run", runs["sex"], "--input", scans, *GLOB, "--out", out) == 0
    captured = capsys.readouterr()
    assert "skipping bad: " in captured.err and phrase in captured.err
    assert "predicted 1 scans of 1 subjects" in captured.out and "1 skipped" in captured.out
    (skipped,) = _rows(out / "skipped.csv")
    assert skipped["scan"] == "bad" and phrase in skipped["reason"] and str(scans / "bad.nii.gz") in skipped["reason"]
    assert [r["subject"] for r in _rows(out / "predictions.csv")] == ["good", "good"]


def _regridded(img: nib.Nifti1Image, voxel: float) -> nib.Nifti1Image:
    """The scan resampled onto a grid of ``voxel`` mm covering the same field of view."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    shape = tuple(int(round(s * 2.0 / voxel)) for s in data.shape[:3])
    affine = img.affine.copy()
    affine[:3, :3] *= voxel / 2.0
    frames = [resample_from_to(nib.Nifti1Image(data[..., t], img.affine), (shape, affine), order=1).get_fdata()
              for t in range(data.shape[3])]
    return nib.Nifti1Image(np.stack(frames, -1).astype(np.float32), affine)


def test_other_grid_is_refused_naming_both_or_resampled(runs, new, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    img = _good_scan(new)
    nib.save(_regridded(img, 2.5), scans / "coarse.nii.gz")
    out = tmp_path / "out"
    assert _predict("--run", runs["sex"], "--input", scans, *GLOB, "--out", out) == 1
    err = capsys.readouterr().err
    assert "grid 16x19x16 voxels of 2.5x2.5x2.5 mm differs from the run's 20x24x20 voxels of 2x2x2 mm" in err
    assert "pass --resample" in err
    assert "brainmt predict: error: no scan could be predicted: 1 skipped (another grid than the mask: 1)" in err
    # with --resample it is predicted; a scan already on the run's grid is read exactly as without it
    shutil.copy(img.get_filename(), scans / "good.nii.gz")
    assert _predict("--run", runs["sex"], "--input", scans, *GLOB, "--out", out, "--resample") == 0
    assert "predicted 2 scans of 2 subjects (8 windows; 1 resampled)" in capsys.readouterr().out
    rows = {r["scan"]: r for r in _rows(out / "predictions.csv") if r["level"] == "scan"}
    assert rows["coarse"]["resampled"] == "1" and rows["good"]["resampled"] == "0"
    assert 0.0 <= float(rows["coarse"]["probability"]) <= 1.0
    plain = tmp_path / "plain"
    (plain / "in").mkdir(parents=True)
    shutil.copy(img.get_filename(), plain / "in" / "good.nii.gz")
    assert _predict("--run", runs["sex"], "--input", plain / "in", *GLOB, "--out", plain / "out") == 0
    (again,) = [r for r in _rows(plain / "out" / "predictions.csv") if r["level"] == "scan"]
    assert again["probability"] == rows["good"]["probability"]


def test_a_moved_grid_is_refused_then_resampled_into_the_same_output(runs, new, tmp_path, capsys):
    """The run's matrix and voxel size with the origin 4 mm off: the mask would fall on other voxels, so the scan is
    skipped naming both origins; --resample into the same output then predicts it (the skip is not "done")."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    img = _good_scan(new)
    moved = img.affine.copy()
    moved[0, 3] += 4.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), moved), scans / "moved.nii.gz")
    assert _predict("--run", runs["sex"], "--input", scans, *GLOB, "--out", out) == 1
    err = capsys.readouterr().err
    assert "moved.nii.gz: its origin [" in err and "the run's grid" in err and "--resample" in err
    assert _predict("--run", runs["sex"], "--input", scans, *GLOB, "--out", out, "--resample") == 0
    assert "predicted 1 scans of 1 subjects (4 windows; 1 resampled)" in capsys.readouterr().out
    (row,) = [r for r in _rows(out / "predictions.csv") if r["level"] == "scan"]
    assert row["resampled"] == "1"
    noise = img.affine.copy()
    noise[:3, 3] += 0.005                                      # float noise in the affine: the run's grid, as is
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), noise), scans / "moved.nii.gz")
    assert _predict("--run", runs["sex"], "--input", scans, *GLOB, "--out", tmp_path / "noise") == 0
    (row,) = [r for r in _rows(tmp_path / "noise" / "predictions.csv") if r["level"] == "scan"]
    assert row["resampled"] == "0"


def test_a_class_label_other_than_0_or_1_is_refused_naming_the_table(tmp_path):
    """A run that classifies dx (0/1) given a table coding it 1/2: every metric would be wrong, so it stops."""
    from brainmt.data.phenotypes import PhenotypeError
    from brainmt.predict.core import check_phenotypes

    table = tmp_path / "dx.tsv"
    table.write_text("participant_id\tdx\nsub-01\t1\nsub-02\t2\nsub-03\tn/a\n")
    settings = {"target": "dx", "task": "classification", "sex_column": "sex"}
    with pytest.raises(PhenotypeError, match=r"dx.tsv: the run classifies dx as 0 or 1, but 1 subject\(s\) have other "
                                             r"values \(subject 02: 2\)"):
        check_phenotypes(str(table), None, settings)
    assert check_phenotypes(str(table), None, settings, {"01", "03"}).values["01"]["dx"] == 1.0   # 02 not predicted
    table.write_text("participant_id\tdx\nsub-01\t1\nsub-02\t0\nsub-03\tn/a\n")
    assert check_phenotypes(str(table), None, settings).values["02"]["dx"] == 0.0
    assert check_phenotypes(str(table), None, {**settings, "task": "regression"}).values["01"]["dx"] == 1.0


def test_the_printed_merge_command_keeps_the_phenotype_table():
    """Without --phenotypes a merge writes no metrics and removes metrics.json: the hint must carry the table."""
    from brainmt.predict.core import PredictRequest

    plain = PredictRequest(run="runs/a", out="pred", input="scans")
    assert predict_jobs.merge_command(plain) == "brainmt predict --run runs/a --out pred --merge-only"
    table = PredictRequest(run="runs/a", out="pred", input="scans", phenotypes="my table.tsv", id_column="eid")
    assert predict_jobs.merge_command(table).endswith("--merge-only --phenotypes 'my table.tsv' --id-column eid")


def test_job_array_merges_the_parts_and_a_rerun_skips_done_scans(runs, new, sex_predictions, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--run", str(runs["sex"]), "--input", str(new["raw"]), "--out", str(out), "--device", "cpu",
            "--cluster", "debug", "--array-size", "2"]
    assert predict_jobs.main([*args, "--dry-run"]) == 0
    assert "# 2 array tasks over 6 scans (0 already predicted), then a merge job" in capsys.readouterr().out
    assert not out.exists()
    assert predict_jobs.main([*args, "--wait"]) == 0
    printed = capsys.readouterr().out
    assert "array of 2 tasks over 6 scans (0 already predicted)" in printed
    assert printed.count("3 scans predicted, 0 already predicted, 0 skipped") == 2
    assert "predicted 6 scans of 6 subjects (24 windows; 0 resampled)" in printed
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part-000-of-002.jsonl", "part-001-of-002.jsonl"]
    assert (out / "predictions.csv").read_text() == (sex_predictions / "predictions.csv").read_text()
    assert (out / "windows.csv").read_text() == (sex_predictions / "windows.csv").read_text()
    assert json.loads((out / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])["scans"] == 6
    assert predict_jobs.main([*args, "--wait"]) == 0                     # a rerun: every scan is already there
    printed = capsys.readouterr().out
    assert "(6 already predicted)" in printed and printed.count("0 scans predicted, 3 already predicted") == 2
    assert (out / "predictions.csv").read_text() == (sex_predictions / "predictions.csv").read_text()


def test_job_array_and_merge_on_a_real_slurm(slurm, runs, new, sex_predictions, tmp_path):
    """``jobs/predict.py`` submitted to the local single-node SLURM: two array tasks and an afterany merge job, whose
    tables equal the single command's."""
    import os

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "predict.py"), "--run", str(runs["sex"]), "--input",
                           str(new["raw"]), "--out", str(out), "--device", "cpu", "--cluster", "slurm", "--partition",
                           "cpu", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--array-size", "2",
                           "--wait"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "array of 2 tasks over 6 scans (0 already predicted)" in proc.stdout and "(slurm)" in proc.stdout
    jobs = json.loads((out / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])
    assert jobs["cluster"] == "slurm" and jobs["merge"] != jobs["array"]
    assert (out / "predictions.csv").read_text() == (sex_predictions / "predictions.csv").read_text()
    assert (out / "windows.csv").read_text() == (sex_predictions / "windows.csv").read_text()


def test_resampled_scan_onto_its_own_grid_is_the_scan(new):
    path = _good_scan(new).get_filename()
    with OpenScan(path) as scan:
        header, frames = scan.header, np.concatenate(list(scan.frames()))
    with ResampledScan(path, header.shape, header.affine) as same:
        assert (same.header.shape, same.header.voxel_size) == (header.shape, header.voxel_size)
        np.testing.assert_allclose(np.concatenate(list(same.frames())), frames, rtol=1e-6, atol=1e-3)


def test_python_m_brainmt_predict_is_the_command():
    proc = subprocess.run([sys.executable, "-m", "brainmt.predict", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: brainmt predict") and "--resample" in proc.stdout


def test_job_array_runs_each_slice_in_the_container(runs, new, sex_predictions, tmp_path, capsys, monkeypatch):
    """--container with the stand-in runtime (tests/fake_apptainer.sh): each slice is `brainmt predict --part i/n`
    inside the image, the merge on the host; the tables equal the single command's."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("FAKE_APPTAINER_PYTHON", sys.executable)
    profile = tmp_path / "site.yaml"
    profile.write_text(f"cluster:\n  container_runtime: {root / 'tests' / 'fake_apptainer.sh'}\n  binds: ['/data:/data']\n")
    out = tmp_path / "out"
    assert predict_jobs.main(["--run", str(runs["sex"]), "--input", str(new["raw"]), "--out", str(out), "--device", "cpu",
                              "--cluster", "debug", "--array-size", "2", "--gpus-per-node", "0", "--profile", str(profile),
                              "--container", "brainmt.sif", "--wait"]) == 0
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 2 and all(c.startswith("exec --bind /data:/data brainmt.sif python3 -m brainmt.cli predict --run ")
                                   for c in calls)
    assert [c.split("--part ")[1] for c in calls] == ["0/2 --no-merge", "1/2 --no-merge"] and "--nv" not in calls[0]
    assert capsys.readouterr().out.count("ran in brainmt.sif") == 2
    assert (out / "predictions.csv").read_text() == (sex_predictions / "predictions.csv").read_text()
