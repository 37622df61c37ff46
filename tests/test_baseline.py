"""Connectivity baselines (brainmt baseline) and the learning benchmark's smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainmt.baseline.features import builtin_parcels, connectome, roi_timeseries
from brainmt.baseline.fit import run_baseline
from brainmt.config import ConfigError
from brainmt.data.loader import ShardSet

ROOT = Path(__file__).parent.parent


def test_features_are_parcel_means_and_fisher_z_correlations(small_shards):
    shards = ShardSet(small_shards)
    labels, names = builtin_parcels(shards, size_mm=40.0)
    assert labels.shape == (shards.n_brain,) and labels.min() == 1 and set(names) == set(np.unique(labels).tolist())
    scan = sorted(shards.scans)[0]
    ts = roi_timeseries(shards, scan, labels, block=5)                  # blocks that do not divide the frames
    frames = shards.read_frames(scan, 0, shards.scans[scan]["frames"]).astype(np.float64)
    for parcel in (1, int(labels.max())):
        np.testing.assert_allclose(ts[:, parcel - 1], frames[:, labels == parcel].mean(axis=1), rtol=1e-10)
    feats = connectome(ts)
    r = np.corrcoef(ts.T)
    np.testing.assert_allclose(feats, np.arctanh(r[np.triu_indices(len(r), 1)]), rtol=1e-6, atol=1e-9)


def test_connectome_logreg_writes_what_evaluate_writes(small_shards, tmp_path):
    result = run_baseline(small_shards, "connectome-logreg", tmp_path / "b", parcel_mm=30.0, n_boot=50)
    assert result["task"] == "classification" and result["target"] == "sex" and result["subjects"] > 0
    for name in ("predictions.csv", "metrics.json", "baseline.json"):
        assert (tmp_path / "b" / name).exists()
    written = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert set(written["auroc"]) == {"value", "ci95"}
    info = json.loads((tmp_path / "b" / "baseline.json").read_text())
    assert info["features_per_scan"] == info["parcels"] * (info["parcels"] - 1) // 2
    assert info["chosen_penalty"] in info["validation_loss"] or str(info["chosen_penalty"]) in info["validation_loss"]
    lines = (tmp_path / "b" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "subject,target,prediction,windows" and len(lines) == result["subjects"] + 1


def test_a_user_atlas_is_used_and_bad_inputs_are_named(small_shards, tmp_path):
    shards = ShardSet(small_shards)
    meta = next(iter(shards.scans.values()))
    shape, affine = meta["shape"], np.asarray(meta["affine"])
    atlas = np.zeros(shape, dtype=np.int16)
    atlas[: shape[0] // 2] = 10                                          # two hemispheres, in the scans' space,
    atlas[shape[0] // 2:] = 20                                           # labelled as atlases do: not 1..R
    path = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(atlas, affine), path)
    (tmp_path / "atlas.txt").write_text("10 left\n20 right\n")
    result = run_baseline(small_shards, "amplitude-ridge", tmp_path / "a", atlas=str(path),
                          atlas_labels=str(tmp_path / "atlas.txt"), n_boot=20)
    info = json.loads((tmp_path / "a" / "baseline.json").read_text())
    assert info["parcels"] == 2 and info["region_names"] == {"10": "left", "20": "right"} and result["target"] == "cognition"
    assert info["features_per_scan"] == 2                               # one amplitude a parcel, not one a label number

    with pytest.raises(ConfigError, match="unknown method 'connectome-svm'"):
        run_baseline(small_shards, "connectome-svm", tmp_path / "x")
    with pytest.raises(ConfigError, match="'age' is not a target"):
        run_baseline(small_shards, "connectome-ridge", tmp_path / "x", target="age")
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.int16), affine), empty)
    with pytest.raises(ValueError, match=f"{empty}.*no labelled atlas voxel"):
        run_baseline(small_shards, "connectome-ridge", tmp_path / "x", atlas=str(empty))


def test_baseline_command_line(small_shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "brainmt.cli", "baseline", "--shards", str(small_shards), "--task", "sex",
                           "--method", "connectome-logreg", "--parcel-mm", "30", "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "auroc" in proc.stdout and (tmp_path / "cli" / "metrics.json").exists()
    bad = subprocess.run([sys.executable, "-m", "brainmt.cli", "baseline", "--shards", str(small_shards), "--task", "sex",
                          "--method", "connectome-ridge", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "connectome-ridge is a regression method" in bad.stderr


def test_learning_benchmark_smoke(tmp_path):
    """A reduced learning benchmark: the sex task only, few subjects, short training, two seeds' splits, a variant, two
    restarts (IG of each split's pick only, shuffled labels' picks on the true labels); loose thresholds."""
    from brainmt.bench.learning import best_of_restarts, main

    work = tmp_path / "bench"
    args = ["--subjects", "60", "--frames", "24", "--work-dir", str(work), "--tasks", "sex", "--n-boot", "50",
            "--effects", "coupling", "--seeds", "2", "--parallel", "2", "--variant", "ld", "optim.layer_decay=0.75",
            "analysis.baseline=scans", "analysis.reference_scans=2", "--shuffled", "coupling", "--variants-only",
            "--ig", "4", "train.epochs=3", "data.num_frames=8", "model.num_frames=8"]
    assert main([*args, "--restarts", "2"]) == 0
    record = json.loads((work / "learning.json").read_text())
    by = {(r["seed"], r["labels"], r["method"]): r["test"] for r in record["rows"]}
    assert set(by) == {(seed, labels, method) for seed in (0, 1) for labels, method in [
        ("true", "brainmt:ld"), ("true", "connectome-logreg"), ("true", "amplitude-logreg"),
        ("shuffled", "brainmt:ld"), ("shuffled", "connectome-logreg")]}     # --variants-only: the variant's control
    assert all(by[(seed, "true", "connectome-logreg")]["auroc"]["value"] >= 0.75 for seed in (0, 1))
    splits = [json.loads((work / "views" / f"coupling-s{seed}-true" / "splits.json").read_text()) for seed in (0, 1)]
    assert splits[0]["test"] != splits[1]["test"]                # each seed its own split
    for seed in (0, 1):                                          # the shuffled control keeps its seed's split
        shuffled = json.loads((work / "views" / f"coupling-s{seed}-shuffled" / "splits.json").read_text())
        parts = ("train", "validation", "test")
        assert {k: shuffled[k] for k in parts} == {k: splits[seed][k] for k in parts}
    summary = {(e["labels"], e["method"]): e for e in record["summary"]}
    assert summary[("true", "brainmt:ld")]["seeds"] == 2 and summary[("true", "brainmt:ld")]["runs"] == 4
    assert len(summary[("true", "brainmt:ld best of 2")]["auroc"]["values"]) == 2
    assert len(summary[("shuffled", "brainmt:ld best of 2")]["auroc"]["values"]) == 2
    picks = {p["name"] for p in best_of_restarts(record["rows"], 2)}
    assert len(picks) == 4 and {r["name"] for r in record["rows"] if "ig" in r} == picks   # IG of the picks only
    for r in record["rows"]:
        assert r["seconds"] > 0
        if r["method"].startswith("brainmt"):
            assert r["selected_by"] == "val_auroc" and r["validation"]
        if r["name"] in picks:                                       # --ig: the group |IG| map scored on the truth
            ig = r["ig"]
            assert ig["subjects"] == 4 and ig["truth_regions"] == ["region-a", "region-b"]
            assert 0 <= ig["truth_auroc"] <= 1 and 0 <= ig["effect_vs_control_auroc"] <= 1
            truth = json.loads((work / "runs" / r["name"] / "ig" / "truth.json").read_text())
            assert ig["contrast_vs_control_auroc"] == truth["contrast"]["effect_vs_control_auroc"]   # both classes
            assert 0 <= ig["contrast_truth_auroc"] <= 1 and 0 <= ig["contrast_vs_control_auroc"] <= 1
            assert ig["class_means_vs_control_auroc"] == truth["class_means"]["effect_vs_control_auroc"]
            assert ig["net_vs_control_auroc"] == truth["net"]["effect_vs_control_auroc"]
            assert not list((work / "runs" / r["name"] / "ig").rglob("*.png"))     # analysis.figures=false
            subject = json.loads(next((work / "runs" / r["name"] / "ig" / "subjects").glob("*_ig.json")).read_text())
            assert subject["settings"]["baseline"] == "scans" and subject["settings"]["reference_scans"] == 2
            true_sex = {m["subject"]: m["targets"]["sex"] for m in json.loads(
                (work / "views" / f"coupling-s{r['seed']}-true" / "manifest.json").read_text())["scans"].values()}
            assert subject["target"] == true_sex[subject["subject"]]     # shuffled runs too: classes by true labels
        else:
            assert "ig" not in r                            # not for other restarts or baselines
    assert {"ig_effect_vs_control_auroc", "ig_contrast_vs_control_auroc",
            "ig_class_means_vs_control_auroc", "ig_net_vs_control_auroc"} <= set(summary[("true", "brainmt:ld")])
    assert "ig_net_vs_control_auroc" in summary[("shuffled", "brainmt:ld best of 2")]
    # a rerun without restarts trains nothing and analyses the first restarts that were not picks
    trained = {r["name"]: r["test"] for r in record["rows"]}
    assert main([*args, "--restarts", "1"]) == 0
    again = json.loads((work / "learning.json").read_text())["rows"]
    assert {r["name"]: r["test"] for r in again} == trained
    assert all("ig" in r for r in again if r["method"] == "brainmt:ld" and r.get("restart", 0) == 0)
    _learning_benchmark_refuses_mixing(work, main, common=["--n-boot", "50", "--tasks", "sex", "--effects", "coupling",
                                                               "--seeds", "2", "--variants-only", "--no-baselines"])


def test_learning_benchmark_shares_the_cores_among_parallel_runs(monkeypatch):
    """Each parallel run gets its share of the cores (oversubscribed OpenMP threads slow CPU runs ninefold), unless
    OMP_NUM_THREADS says otherwise."""
    import os

    from brainmt.bench.learning import threads_per_run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [threads_per_run(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_run(2) == 3


def test_learning_benchmark_spreads_parallel_runs_over_the_visible_gpus(monkeypatch):
    """``--parallel 3`` with GPUs 2 and 5 visible: slots on 2, 5, 2, each with its share of the cores; no GPU on the
    CPU; a slot taken by a run is not handed to another until it is given back."""
    import os

    from brainmt.bench.learning import run_slots, visible_gpus

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert visible_gpus("cuda") == ["2", "5"] and visible_gpus("cpu") == []
    slots = run_slots(3, visible_gpus("cuda"))
    taken = [slots.get_nowait() for _ in range(3)]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in taken] == ["2", "5", "2"]
    assert {s["OMP_NUM_THREADS"] for s in taken} == {"2"} and slots.empty()
    slots.put(taken[1])
    assert slots.get_nowait()["CUDA_VISIBLE_DEVICES"] == "5"
    assert run_slots(2, []).get_nowait() == {"OMP_NUM_THREADS": "3"}


def test_learning_benchmark_lists_per_seed_values_in_seed_order():
    """Runs finish in any order; the summary's per-seed values follow the seeds, so a table's (a, b, c) is seeds 0-2."""
    from brainmt.bench.learning import summarise

    def row(seed, auroc):
        test = {k: {"value": auroc, "ci95": [auroc, auroc]} for k in ("auroc", "balanced_accuracy", "accuracy")}
        return {"effect": "coupling", "task": "sex", "labels": "true", "method": "brainmt", "seed": seed,
                "seconds": 1.0, "test": test}

    [entry] = summarise([row(2, 0.7), row(0, 0.9), row(1, 0.8)])
    assert entry["seed_list"] == [0, 1, 2] and entry["auroc"]["values"] == [0.9, 0.8, 0.7]


def test_learning_benchmark_restarts_pick_each_split_by_validation_not_test(tmp_path):
    """--restarts 3: each split's BrainMT config runs from three initialisations (restart k > 0 with train.seed =
    seed + 1000 k); the "best of 3" row keeps per split the run with the best validation value of the metric that
    picked its checkpoint (lower is better for a loss), never the best test value."""
    from brainmt.bench.learning import main, plan, summarise

    jobs = plan(["lagged"], range(2), ["sex"], {}, [], False, restarts=3)
    assert [(j.seed, j.restart, j.overrides) for j in jobs] == [
        (0, 0, []), (0, 1, ["train.seed=1000"]), (0, 2, ["train.seed=2000"]),
        (1, 0, []), (1, 1, ["train.seed=1001"]), (1, 2, ["train.seed=2001"])]
    assert len({j.name for j in jobs}) == 6 and jobs[0].name == "lagged-s0-sex-true-brainmt"

    def row(seed, restart, curve, test, metric="val_auroc", loss=None):
        scores = {k: {"value": test, "ci95": [test, test]} for k in ("auroc", "balanced_accuracy", "accuracy")}
        validation = [{"epoch": i, metric: v} | ({"val_loss": loss[i]} if loss else {}) for i, v in enumerate(curve)]
        return {"effect": "lagged", "task": "sex", "labels": "true", "method": "brainmt", "seed": seed,
                "restart": restart, "seconds": 10.0, "test": scores, "selected_by": metric, "validation": validation}

    rows = [row(0, 0, [0.5, 0.6], 0.9), row(0, 1, [0.5, 0.95, 0.7], 0.6), row(0, 2, [float("nan"), 0.55], 0.99),
            row(1, 0, [0.7, 0.4], 0.5, "val_loss"), row(1, 1, [0.69, 0.3], 0.8, "val_loss"),
            row(1, 2, [0.69, 0.3], 0.7, "val_loss"),
            row(2, 0, [0.5, 1.0], 0.7, loss=[0.7, 0.4]), row(2, 1, [1.0, 1.0], 0.95, loss=[0.5, 0.1]),
            row(2, 2, [0.9, 0.8], 1.0, loss=[0.05, 0.01])]
    by = {e["method"]: e for e in summarise(rows, 3)}
    assert by["brainmt"]["runs"] == 9 and by["brainmt"]["seeds"] == 3
    picked = by["brainmt best of 3"]
    # seed 0: restart 1 (validation 0.95); seed 1: restart 1 (a full tie: the first); seed 2: restart 1 (AUROC 1.0 as
    # restart 0, at a lower validation loss)
    assert picked["auroc"]["values"] == [0.6, 0.8, 0.95]
    assert picked["runs"] == 3 and picked["seconds"] == 30.0     # the pick costs its three trainings
    # a split whose restart failed keeps its place in the row, picked among the two that finished
    partial = {e["method"]: e for e in summarise([r for r in rows if (r["seed"], r["restart"]) != (0, 1)], 3)}
    assert set(partial) == {"brainmt", "brainmt best of 3"}
    assert partial["brainmt best of 3"]["auroc"]["values"] == [0.9, 0.8, 0.95]
    assert [e["method"] for e in summarise(rows)] == ["brainmt"]         # no restarts asked for: no pick
    assert main(["--restarts", "0", "--work-dir", str(tmp_path / "none")]) == 2 and not (tmp_path / "none").exists()


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    """The learning benchmark with training and IG replaced by fakes that log their calls (``failures``: how many
    analyses fail first): the bookkeeping of learning.json, tested without training anything."""
    from brainmt.bench import learning

    calls = {"trained": [], "analysed": [], "failures": 0}
    scores = {k: {"value": 0.9, "ci95": [0.8, 1.0]} for k in ("auroc", "balanced_accuracy", "accuracy")}

    def train(job, *args):
        calls["trained"].append(job.name)
        return {"test": scores, "validation": [{"epoch": 1, "val_auroc": 0.9}], "best_step": 7, "selected_by": "val_auroc"}

    def analyse(job, *args):
        calls["analysed"].append(job.overrides)
        if len(calls["analysed"]) <= calls["failures"]:
            raise RuntimeError("brainmt analyze exited 1: CUDA out of memory")
        return {"truth_auroc": 0.9, "effect_vs_control_auroc": 0.8, "subjects": 2}

    monkeypatch.setattr(learning, "train_brainmt", train)
    monkeypatch.setattr(learning, "analyse_brainmt", analyse)
    monkeypatch.setattr(learning, "prepare_cohorts", lambda work, args: {"coupling": work / "data" / "coupling" / "shards"})
    monkeypatch.setattr(learning.Bench, "make_views", lambda self: None)

    def run(*extra: str, ig: int = 2) -> tuple[int, dict]:
        code = learning.main(["--work-dir", str(tmp_path), "--effects", "coupling", "--seeds", "1", "--tasks", "sex",
                              "--no-baselines", "--shuffled", "--ig", str(ig), *extra])
        [row] = json.loads((tmp_path / "learning.json").read_text())["rows"]
        assert row["test"] == scores
        return code, row

    return calls, run


def test_learning_benchmark_keeps_a_trained_run_whose_analysis_fails(fake_bench, capsys):
    """--ig: a run's row is saved once it has trained, so an analysis that fails (or a call stopped during it) loses
    no training; the failure is named and the call exits 1, and a rerun analyses the row without training again."""
    calls, run = fake_bench
    calls["failures"] = 1
    code, row = run()
    assert code == 1 and calls["trained"] == ["coupling-s0-sex-true-brainmt"] and "ig" not in row
    out, err = capsys.readouterr()
    assert "FAILED coupling-s0-sex-true-brainmt: IG: brainmt analyze exited 1: CUDA out of memory" in out
    assert "no IG for coupling-s0-sex-true-brainmt; a rerun with --ig analyses them" in err
    code, row = run()                                               # the rerun analyses it, training nothing
    assert code == 0 and calls["trained"] == ["coupling-s0-sex-true-brainmt"] and row["ig"]["truth_auroc"] == 0.9


def test_learning_benchmark_analyses_again_with_other_analysis_settings(fake_bench, capsys):
    """A rerun whose only new overrides are analysis.* ones reuses the trained runs; with --ig it analyses them again
    with those settings (or --ig's number of subjects), keeping the earlier IG in ig_superseded, which comes back for
    a call with its settings; without --ig an IG of other settings leaves the table. New training overrides are
    still refused."""
    calls, run = fake_bench
    scans = ["analysis.baseline=scans", "analysis.reference_scans=4"]
    assert run("analysis.baseline=mean")[0] == 0
    code, row = run(*scans)
    assert code == 0 and calls["trained"] == ["coupling-s0-sex-true-brainmt"] and calls["analysed"][-1] == scans
    assert row["ig"]["settings"] == {"analysis.baseline": "scans", "analysis.reference_scans": "4", "subjects": 2}
    assert [ig["settings"]["analysis.baseline"] for ig in row["ig_superseded"]] == ["mean"]
    code, row = run(*reversed(scans), "analysis.figures=false")     # the same settings: nothing to do
    assert code == 0 and len(calls["analysed"]) == 2
    code, row = run("analysis.baseline=mean")                       # the earlier IG comes back
    assert code == 0 and len(calls["analysed"]) == 2 and row["ig"]["settings"]["analysis.baseline"] == "mean"
    code, row = run("analysis.baseline=mean", ig=3)                 # more subjects: analysed again
    assert code == 0 and len(calls["analysed"]) == 3 and row["ig"]["settings"]["subjects"] == 3
    assert len(row["ig_superseded"]) == 2
    code, row = run("analysis.baseline=zeros", ig=0)                # no IG of these settings, none made
    assert code == 0 and "ig" not in row and len(calls["analysed"]) == 3 and len(row["ig_superseded"]) == 3
    capsys.readouterr()
    assert run("analysis.baseline=scans", "train.epochs=2")[0] == 2         # training settings: another work dir
    assert "already has coupling-s0-sex-true-brainmt trained with overrides" in capsys.readouterr().err
    assert calls["trained"] == ["coupling-s0-sex-true-brainmt"] and len(calls["analysed"]) == 3


def test_learning_benchmark_first_seed_adds_splits_after_the_first(tmp_path):
    """--first-seed 3 --seeds 2 plans splits 3 and 4 only (added to a work dir without retraining 0-2); a negative
    first seed, no seeds, or seeds that would share a restart's train.seed (s + 1000 k) stop before anything is
    written."""
    from brainmt.bench.learning import main, parser, plan, seeds_of

    args = parser().parse_args(["--first-seed", "3", "--seeds", "2", "--effects", "lagged", "--shuffled", "lagged",
                                "--tasks", "sex", "--no-baselines"])
    assert list(seeds_of(args)) == [3, 4]
    jobs = plan(args.effects, seeds_of(args), args.tasks, {}, ["lagged"], False)
    assert [j.name for j in jobs] == ["lagged-s3-sex-true-brainmt", "lagged-s3-sex-shuffled-brainmt",
                                      "lagged-s4-sex-true-brainmt", "lagged-s4-sex-shuffled-brainmt"]
    for bad in (["--first-seed", "-1"], ["--seeds", "0"], ["--first-seed", "999", "--seeds", "2", "--restarts", "2"]):
        assert main([*bad, "--work-dir", str(tmp_path / "none")]) == 2 and not (tmp_path / "none").exists()


def test_learning_benchmark_gives_each_brainmt_config_its_shuffled_control():
    """--shuffled repeats sex with every BrainMT config that runs on true labels: under --variants-only the variants,
    not the plain config the user left out (a lever's control must carry the lever)."""
    from brainmt.bench.learning import plan

    def runs(default_run, baselines=False):
        return {(j.seed, j.task, j.labels, j.method, tuple(j.overrides))
                for j in plan(["coupling"], range(1), ["sex", "score"], {"ls": ["model.layer_scale=0.1"]}, ["coupling"],
                              baselines, default_run)}

    variant = ("brainmt:ls", ("model.layer_scale=0.1",))
    assert runs(False) == {(0, "sex", "true", *variant), (0, "score", "true", *variant), (0, "sex", "shuffled", *variant)}
    assert runs(True) == runs(False) | {(0, "sex", "true", "brainmt", ()), (0, "score", "true", "brainmt", ()),
                                        (0, "sex", "shuffled", "brainmt", ())}
    assert (0, "sex", "shuffled", "connectome-logreg", ()) in runs(False, baselines=True)
    assert not [j for j in plan(["coupling"], range(1), ["sex"], {}, [], False) if j.labels == "shuffled"]


def _learning_benchmark_refuses_mixing(work, main, common):
    """A rerun in the same work dir with other overrides or another cohort stops before training, naming why;
    overrides swallowed by --shuffled are an argparse error, not a silent plain run."""
    import contextlib
    import io

    for extra, needle in ((["--subjects", "60", "--frames", "24", "--variant", "ld", "optim.layer_decay=0.5"],
                           "already has coupling-s0-sex-true-brainmt_ld trained with overrides"),
                          (["--subjects", "61", "--frames", "24"], "cohort.json: the cohort there was made with")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["--work-dir", str(work), *common, *extra, "train.epochs=3", "data.num_frames=8",
                         "model.num_frames=8"]) == 2
        assert needle in err.getvalue(), err.getvalue()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main(["--work-dir", str(work), "--shuffled", "coupling", "train.epochs=3"])
    # a view whose kept split is not the one drawn now (a shuffled view of an older brainmt): its runs trained on it
    kept = work / "views" / "coupling-s0-shuffled" / "splits.json"
    splits = json.loads(kept.read_text())
    splits["train"][0], splits["test"][0] = splits["test"][0], splits["train"][0]
    kept.write_text(json.dumps(splits))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["--work-dir", str(work), *common, "--subjects", "60", "--frames", "24", "--shuffled", "coupling",
                     "--variant", "other", "optim.layer_decay=0.5", "train.epochs=3", "data.num_frames=8",
                     "model.num_frames=8"]) == 2
    assert "the split kept there is not the one this benchmark draws" in err.getvalue(), err.getvalue()
    assert json.loads(kept.read_text()) == splits                         # left as it was
    assert not (work / "runs" / "coupling-s0-sex-true-brainmt_other").exists()
