"""Integrated Gradients analysis: completeness, planted regions found, the scans' grid, bounded memory, errors, jobs.

One demo-size model (synthetic scans with planted regions, the ``demo`` config, trained in-process) and one
``brainmt analyze`` of 24 of its test subjects are shared by the module's tests.
"""

from __future__ import annotations

import csv
import dataclasses
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
from data_helpers import random_scan, write_scan

from brainmt.analysis.attribution import (
    AttributionError,
    PackedModel,
    attribute_windows,
    make_baseline,
    reference_scans,
    reference_windows,
    resolve_baseline,
    training_fluctuation,
    training_mean,
)
from brainmt.analysis.maps import BrainGrid, GroupMaps
from brainmt.analysis.regions import AtlasError, load_atlas, lobe_labels, read_label_file
from brainmt.cli import main
from brainmt.config import load_config
from brainmt.data.loader import ShardSet, eval_windows
from brainmt.models import build_model
from brainmt.train.metrics import auroc

ROOT = Path(__file__).parent.parent
ANALYSED = 24        # test subjects in the shared analysis


def one_thread_env(**extra: str) -> dict:
    """The environment for the jobs: this one (SLURM_CONF included, once the fixture set it), one thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, here and in the jobs: two threads on this shared 2-core machine slow down many times over
    when other work runs beside them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The demo's data (300 synthetic subjects, 20x24x20x40) and its model trained in-process, then analysed."""
    from brainmt.demo import prepare_data
    from brainmt.train.loop import run

    work = tmp_path_factory.mktemp("demo")
    shards = prepare_data(work, 300, 40, [20, 24, 20])
    result = run(load_config("demo"), shards, work / "run")
    assert result["evaluation"]["auroc"]["value"] >= 0.8, result["evaluation"]
    subjects = sorted(json.loads((shards / "splits.json").read_text())["test"])[:ANALYSED]
    code = main(["analyze", "--run", str(work / "run"), "--out", str(work / "ig"), "--subjects", *subjects])
    assert code == 0
    return {"raw": work / "raw", "shards": shards, "run": work / "run", "ig": work / "ig", "subjects": subjects}


def _packed_windows(shards: ShardSet, scans: list[str], frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = eval_windows(shards, scans, frames)
    packed = torch.from_numpy(np.stack([shards.read_frames(s, start, frames) for s, start in windows])).float()
    return packed, torch.tensor([shards.scans[s]["background"] for s, _ in windows])


def _assert_complete(results: list, label: str) -> None:
    for signed, absolute, f_x, f_b, total in results:
        print(f"{label}: f(x) - f(baseline) {f_x - f_b:.3g}, sum IG {total:.3g}, gap {total - (f_x - f_b):.2g}")
        assert abs(f_x - f_b) > 1e-4                      # a real output change to account for
        assert abs(total - (f_x - f_b)) <= 0.01 * abs(f_x - f_b) + 1e-6, (total, f_x - f_b)
        assert np.isclose(signed.sum(), total, rtol=1e-4, atol=1e-6) and (absolute >= np.abs(signed) - 1e-7).all()


@pytest.mark.parametrize("baseline", ["mean", "temporal_mean", "zeros", "noise"])
def test_completeness_holds_on_the_debug_model(small_shards, baseline):
    """sum(IG) = f(input) - f(baseline) within 1% of |f(input) - f(baseline)| + 1e-6, every window (32 steps)."""
    shards = ShardSet(small_shards)
    torch.manual_seed(0)
    cfg = load_config("debug", [f"model.volume_shape={list(shards.volume_shape)}", "model.input_norm=none"])
    model = PackedModel(build_model(cfg.model).eval().requires_grad_(False), shards.brain_index, shards.volume_shape)
    packed, background = _packed_windows(shards, shards.scans_of("test")[:1], 8)
    mean = torch.from_numpy(training_mean(shards, shards.scans_of("train")))
    fluctuation = torch.from_numpy(training_fluctuation(shards, shards.scans_of("train")))
    base = make_baseline(baseline, packed, background, mean, torch.Generator().manual_seed(0), fluctuation)
    results = attribute_windows(model, packed, background, base, steps=32, internal_batch_size=16)
    assert len(results) == len(packed) == 3
    _assert_complete(results, baseline)


@pytest.mark.parametrize("input_norm", ["center", "zscore"])
def test_completeness_holds_for_a_centring_model_from_the_noise_baseline(input_norm):
    """The baseline auto picks for a centring model keeps IG complete (32 steps). On a 40x48x40 grid: on the
    20x24x20 of the other test the stem's last GroupNorm sees 16 values a group, and along some paths their
    variance nearly vanishes, so the random-init model is too sharp for any step count there."""
    from brainmt.data import synthetic

    shape = (40, 48, 40)
    mask, regions = synthetic.brain_mask(shape), synthetic.planted_regions(shape, "coupling")
    rng = np.random.default_rng(0)
    patterns = 0.5 * rng.standard_normal((4, int(mask.sum()))).astype(np.float32)
    scans = [synthetic.synthetic_scan(rng, shape, 16, sex, 0.0, patterns, regions, mask, effect="coupling")
             for sex in (0, 1)]
    packed = torch.from_numpy(np.stack([np.moveaxis(v, -1, 0)[:, mask] for v in scans]))
    packed = (packed - packed.mean()) / packed.std()                  # sharding's global z-score
    background = torch.full((2,), float(packed.min()))
    torch.manual_seed(0)
    cfg = load_config("debug", [f"model.volume_shape={list(shape)}", f"model.input_norm={input_norm}"])
    model = PackedModel(build_model(cfg.model).eval().requires_grad_(False), np.flatnonzero(mask.ravel()), shape)
    baseline = resolve_baseline("auto", input_norm)
    fluctuation = packed.std(dim=1).pow(2).mean(dim=0).sqrt()        # as training_fluctuation, over the two scans
    base = make_baseline(baseline, packed, background, packed.mean(dim=(0, 1)), torch.Generator().manual_seed(0),
                         fluctuation)
    assert baseline == "noise"
    assert abs(float(base.std(dim=1).mean() / fluctuation.mean()) - 1) < 0.1     # the typical voxel's fluctuation
    _assert_complete(attribute_windows(model, packed, background, base, steps=32, internal_batch_size=32), input_norm)


def test_group_abs_map_finds_the_planted_regions(demo):
    """Sex acts through planted region b (its coupling with region a): the group |IG| map ranks them first."""
    group = nib.load(demo["ig"] / "group_mean_abs_ig.nii.gz")
    values = np.asarray(group.dataobj)
    planted = {r: np.asarray(nib.load(demo["raw"] / "derivatives" / "planted" / f"region-{r}_mask.nii.gz").dataobj) > 0
               for r in "abc"}
    brain = values != 0
    scores = {name: auroc((np.logical_or.reduce([planted[r] for r in name]))[brain].astype(float), values[brain])
              for name in ("a", "b", "c", "ab", "abc")}
    print("voxel-level AUROC of the group |IG| map against the planted regions:", json.dumps(scores))
    assert scores["ab"] >= 0.8, scores
    summary = json.loads((demo["ig"] / "summary.json").read_text())
    assert summary["analysed"] == ANALYSED and not summary["failed"] and not summary["missing"]
    assert set(summary["groups"]) == {"all", "female", "male"} and summary["groups"]["all"] == ANALYSED
    for name in ("group_mean_ig", "group_t_ig", "group_male_mean_ig", "group_female_t_ig", "group_male_mean_abs_ig"):
        assert (demo["ig"] / f"{name}.nii.gz").exists(), name
    for figure in ("group_mean_abs_ig.png", "group_male_t_ig.png", "top_regions.png"):
        assert (demo["ig"] / figure).stat().st_size > 10_000, figure
    rows = (demo["ig"] / "regions.csv").read_text().splitlines()
    assert rows[0].startswith("rank,label,name,voxels,mean_abs_ig,share_abs_ig") and len(rows) == 13   # 12 built-in regions
    completeness = (demo["ig"] / "completeness.csv").read_text().splitlines()
    assert len(completeness) == 1 + ANALYSED
    record = json.loads((demo["ig"] / "subjects" / f"{demo['subjects'][0]}_ig.json").read_text())
    assert record["ig_sum"] == pytest.approx(sum(w["ig_sum"] for w in record["windows"]) / len(record["windows"]))


def test_scans_baseline_averages_ig_over_real_reference_windows(small_shards):
    """baseline=scans (expected gradients): each window's IG is the mean of its IG from K real training windows, the
    absolute map taken after the mean; completeness holds against the mean of the K references' outputs."""
    shards = ShardSet(small_shards)
    torch.manual_seed(0)
    cfg = load_config("debug", [f"model.volume_shape={list(shards.volume_shape)}", "model.input_norm=none"])
    model = PackedModel(build_model(cfg.model).eval().requires_grad_(False), shards.brain_index, shards.volume_shape)
    packed, background = _packed_windows(shards, shards.scans_of("test")[:1], 8)
    train = shards.scans_of("train")
    refs = torch.from_numpy(reference_windows(shards, train, 3, 8))
    first = {s: torch.from_numpy(shards.read_frames(s, 0, 8).astype(np.float32)) for s in train}
    matches = [[s for s in train if torch.equal(r, first[s])] for r in refs]
    assert refs.shape == (3, 8, shards.n_brain) and [m[:1] for m in matches] == [[train[0]], matches[1][:1], [train[-1]]]
    assert len({m[0] for m in matches}) == 3                  # three training scans, evenly spaced from first to last
    base = make_baseline("scans", packed, background, None, references=refs)
    assert base.shape == (3, 1, 8, shards.n_brain)
    results = attribute_windows(model, packed, background, base, steps=32, internal_batch_size=16)
    _assert_complete(results, "scans")
    singles = [attribute_windows(model, packed, background, r.expand_as(packed).contiguous(), steps=32,
                                 internal_batch_size=16) for r in refs]
    for w, (signed, absolute, _f_x, f_b, _total) in enumerate(results):
        assert np.allclose(signed, np.mean([one[w][0] for one in singles], axis=0), atol=1e-6)
        assert f_b == pytest.approx(np.mean([one[w][3] for one in singles]))
        assert (absolute <= np.mean([one[w][1] for one in singles], axis=0) + 1e-6).all()    # |mean| <= mean |.|
        assert absolute.sum() < np.mean([one[w][1] for one in singles], axis=0).sum()
    with pytest.raises(AttributionError, match="reference windows of the analysed windows' frames"):
        make_baseline("scans", packed, background, None, references=refs[:, :4])
    with pytest.raises(AttributionError, match="has the 10000 frames a reference window needs"):
        reference_windows(shards, train, 3, 10000)


def _scans_with(targets: dict[str, float | None], frames: int = 40):
    """A stand-in for a ShardSet's scan table: each scan's frames and (when not None) its ``y`` target."""
    from types import SimpleNamespace

    scans = {s: {"frames": frames, "targets": {} if y is None else {"y": y}} for s, y in targets.items()}
    return SimpleNamespace(root=Path("shards"), scans=scans)


def test_scans_baseline_references_come_from_every_class_or_the_scores_range():
    """Evenly spaced ids would pick 4 males of 10 scans (1, 4, 7, 10); the references of a class label are 2 of each
    class, evenly spaced within it; a small class gives what it has; a score's references span its range; scans
    without the target (or no target at all) leave the choice by id."""
    sex = {f"s{i:02d}": float(i in (0, 3, 6, 9)) for i in range(10)}
    shards = _scans_with(sex)
    ids = sorted(sex)
    assert [sex[s] for s in reference_scans(shards, ids, 4, 20)] == [1.0] * 4             # by id: one class
    chosen = reference_scans(shards, ids, 4, 20, "y", classes=True)
    assert chosen == ["s01", "s00", "s08", "s09"]            # females 1..8, males 0..9, in turn
    one_male = _scans_with({s: float(s == "s05") for s in ids})
    assert sorted(reference_scans(one_male, ids, 4, 20, "y", classes=True)) == ["s00", "s04", "s05", "s09"]
    assert sorted(reference_scans(shards, ids, 20, 20, "y", classes=True)) == ids           # more asked than there are
    score = _scans_with({s: float(v) for s, v in zip(ids, [5, 1, 9, 3, 7, 2, 8, 4, 6, 0])})
    assert reference_scans(score, ids, 3, 20, "y") == ["s09", "s07", "s02"]                 # scores 0, 4, 9
    partly = _scans_with({**{s: 1.0 for s in ids[:8]}, "s08": 0.0, "s09": None})
    assert "s09" not in reference_scans(partly, ids, 4, 20, "y", classes=True)
    assert reference_scans(partly, ids, 4, 20, "other", classes=True) == reference_scans(partly, ids, 4, 20)
    short = _scans_with(sex, frames=10)
    with pytest.raises(AttributionError, match="has the 20 frames a reference window needs"):
        reference_scans(short, ids, 4, 20, "y", classes=True)


def test_scans_baseline_through_analyze(demo, tmp_path):
    """brainmt analyze --baseline scans: the references come from the training split, their count is part of the
    settings (another count recomputes the maps), and each subject's record is complete against their mean output."""
    out, subjects = tmp_path / "ig", demo["subjects"][:2]
    args = ["analyze", "--run", str(demo["run"]), "--out", str(out), "--subjects", *subjects, "--baseline", "scans"]
    assert main([*args, "analysis.reference_scans=2", "analysis.figures=false"]) == 0
    record = json.loads((out / "subjects" / f"{subjects[0]}_ig.json").read_text())
    assert record["settings"]["baseline"] == "scans" and record["settings"]["reference_scans"] == 2
    assert record["settings"]["references"] == "spread over the target"   # maps of references by id are redone
    assert record["settings"]["baseline_scans"] is None
    assert record["ig_sum"] == pytest.approx(sum(w["ig_sum"] for w in record["windows"]) / len(record["windows"]))
    assert main([*args, "analysis.reference_scans=3", "analysis.figures=false"]) == 0
    again = json.loads((out / "subjects" / f"{subjects[0]}_ig.json").read_text())
    assert again["settings"]["reference_scans"] == 3 and again["f_baseline"] != record["f_baseline"]
    assert main([*args, "analysis.reference_scans=0"]) == 2


def test_scans_baseline_references_hold_both_classes_where_ids_would_not(demo, tmp_path):
    """The analyzer of a sex model takes as many references from each class as it can, at a count where evenly
    spaced training ids alone would take two or more of one class than of the other."""
    from brainmt.analysis.pipeline import SubjectAnalyzer, open_run

    run = open_run(demo["run"])
    train, sex = run.shards.scans_of("train"), run.stats["target"]

    def excess(scans: list[str]) -> int:
        return abs(sum(2 * run.shards.target(s, sex) - 1 for s in scans))

    lopsided = [k for k in range(2, 17) if excess(reference_scans(run.shards, train, k, run.cfg.data.num_frames)) >= 2]
    assert lopsided, "no count at which the ids alone pick lopsided references: the test shows nothing"
    settings = dataclasses.replace(load_config("demo").analysis, baseline="scans", reference_scans=lopsided[0])
    analyzer = SubjectAnalyzer(run, settings, tmp_path, run.shards.scans_of("test"))
    assert len(analyzer.reference_ids) == lopsided[0] and excess(list(analyzer.reference_ids)) <= 1
    frames = run.cfg.data.num_frames
    chosen = [torch.from_numpy(run.shards.read_frames(s, 0, frames).astype(np.float32)) for s in analyzer.reference_ids]
    assert analyzer.references.shape[0] == lopsided[0]
    assert all(any(torch.equal(r, c) for c in chosen) for r in analyzer.references)    # the windows are theirs


def test_maps_rewritten_with_other_settings_lose_their_old_record_first(demo, tmp_path, monkeypatch):
    """A subject analysed with 8 steps, then with 16 stopped between its two maps: its 8-step record is gone, so an
    8-step run recomputes it instead of taking a 16-step signed map for its own."""
    out, subject = tmp_path / "ig", demo["subjects"][0]
    args = ["analyze", "--run", str(demo["run"]), "--out", str(out), "--subjects", subject, "--maps-only"]
    assert main([*args, "--steps", "8"]) == 0
    original, calls = BrainGrid.save, {"n": 0}

    def stop_after_one(self, values, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("time limit")
        return original(self, values, path)

    monkeypatch.setattr(BrainGrid, "save", stop_after_one)
    main([*args, "--steps", "16"])
    monkeypatch.undo()
    assert not (out / "subjects" / f"{subject}_ig.json").exists()
    assert main([*args, "--steps", "8"]) == 0
    assert json.loads((out / "subjects" / f"{subject}_ig.json").read_text())["settings"]["steps"] == 8


def test_the_settings_name_the_model_by_its_weights(demo):
    """Another run's step-N.pt has the same name: the fingerprint holds the checkpoint's recorded SHA-256; a record
    of a version that did not store it still matches."""
    from brainmt.analysis.pipeline import fingerprint, open_run, settings_match
    from brainmt.train.checkpoint import record_path

    run = open_run(demo["run"])
    want = fingerprint(run, load_config("demo").analysis)
    assert want["weights"] == json.loads(record_path(run.checkpoint).read_text())["sha256"][:16]
    assert settings_match(dict(want), want) and settings_match({k: v for k, v in want.items() if k != "weights"}, want)
    assert not settings_match({**want, "weights": "0" * 16}, want) and not settings_match(None, want)


def test_maps_made_on_another_view_of_the_scans_are_made_again(demo, tmp_path):
    """The subject maps depend on the shards' training split and targets (the baselines' pool, the subject's class):
    a copy of the shards reuses them, the same scans with permuted labels (a shuffled-label view) do not; a record
    of a version that did not store this still matches."""
    from brainmt.analysis.pipeline import fingerprint, open_run, settings_match

    settings = load_config("demo").analysis
    want = fingerprint(open_run(demo["run"]), settings)
    copy, permuted = tmp_path / "copy", tmp_path / "permuted"
    shutil.copytree(demo["shards"], copy)
    shutil.copytree(demo["shards"], permuted)
    manifest = json.loads((permuted / "manifest.json").read_text())
    ids = sorted(manifest["scans"])
    targets = [manifest["scans"][s]["targets"] for s in ids]
    for scan, moved in zip(ids, targets[1:] + targets[:1], strict=True):
        manifest["scans"][scan]["targets"] = moved
    (permuted / "manifest.json").write_text(json.dumps(manifest))
    assert settings_match(fingerprint(open_run(demo["run"], shards_dir=copy), settings), want)
    other = fingerprint(open_run(demo["run"], shards_dir=permuted), settings)
    assert other["data"] != want["data"] and not settings_match(other, want)
    assert settings_match({k: v for k, v in want.items() if k != "data"}, want)
    subject, out = demo["subjects"][0], tmp_path / "ig"
    args = ["analyze", "--run", str(demo["run"]), "--out", str(out), "--subjects", subject, "--steps", "4",
            "--maps-only"]
    assert main([*args, "--shards", str(copy)]) == 0
    record = out / "subjects" / f"{subject}_ig.json"
    first = json.loads(record.read_text())
    assert main([*args, "--shards", str(copy)]) == 0 and json.loads(record.read_text()) == first   # skipped
    assert main([*args, "--shards", str(permuted)]) == 0
    second = json.loads(record.read_text())
    assert second["seconds"] != first["seconds"] and second["settings"]["data"] == other["data"]   # made again


def test_train_split_subjects_are_not_their_own_scans_reference(demo, tmp_path):
    """--split train --baseline scans: the subject of a training scan among the references gets references drawn
    from the other scans, a subject outside them the shared ones. The prediction applies the run's Platt fit."""

    from brainmt.analysis.pipeline import SubjectAnalyzer, open_run

    run = open_run(demo["run"])
    settings = dataclasses.replace(load_config("demo").analysis, baseline="scans", reference_scans=3, split="train")
    train = run.shards.scans_of("train")
    analyzer = SubjectAnalyzer(run, settings, tmp_path, train)
    frames, reference = run.cfg.data.num_frames, sorted(analyzer.reference_ids)[0]
    own = torch.from_numpy(run.shards.read_frames(reference, 0, frames).astype(np.float32))
    refs = analyzer._references_for([reference])
    assert refs.shape == analyzer.references.shape and not any(torch.equal(r, own) for r in refs)
    assert any(torch.equal(r, own) for r in analyzer.references)
    others = reference_windows(run.shards, [s for s in train if s != reference], 3, frames, *analyzer.spread)
    assert torch.equal(refs, torch.from_numpy(others))                    # drawn again over the target too
    outside = next(scan for scan in train if scan not in analyzer.reference_ids)
    assert analyzer._references_for([outside]) is analyzer.references
    analyzer.run_info = dataclasses.replace(run, calibration={"scale": 2.0, "bias": 0.5})
    rows = [{"f_input": 0.3}, {"f_input": -0.1}]
    expected = np.mean(1 / (1 + np.exp(-(2.0 * np.array([0.3, -0.1]) + 0.5))))
    assert analyzer._prediction([reference], rows)["prediction"] == pytest.approx(expected)


@pytest.mark.parametrize("baseline", ["mean", "temporal_mean", "zeros", "background"])
def test_a_centring_model_refuses_baselines_constant_in_time(small_shards, baseline):
    """With model.input_norm=center every point of the path from a static baseline is the input rescaled, which the
    stem's GroupNorm cannot see: the output jumps at the baseline. auto picks noise there, mean otherwise."""
    shards = ShardSet(small_shards)
    cfg = load_config("debug", [f"model.volume_shape={list(shards.volume_shape)}", "model.input_norm=center"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    packed, _ = _packed_windows(shards, shards.scans_of("test")[:1], 8)
    x = torch.zeros(1, 8, 1, *shards.volume_shape)
    x.view(1, 8, -1)[:, :, torch.as_tensor(shards.brain_index)] = packed[:1]
    with torch.no_grad():       # the degeneracy itself: scaled fluctuations give the same output (up to GroupNorm's eps)
        assert torch.allclose(model(x), model(0.3 * x), atol=1e-3)
    with pytest.raises(AttributionError, match=f"analysis.baseline={baseline} is constant in time"):
        resolve_baseline(baseline, "center")
    assert resolve_baseline("auto", "center") == resolve_baseline("auto", "zscore") == "noise"
    assert resolve_baseline("auto", "none") == "mean" and resolve_baseline(baseline, "none") == baseline
    assert resolve_baseline("auto", "center", "none") == "mean"       # no GroupNorm in the stem: not scale-free
    assert resolve_baseline(baseline, "center", "none") == baseline


def test_smoothing_keeps_a_constant_map_and_spreads_a_point_by_its_fwhm(small_shards):
    """BrainGrid.smooth: a normalised Gaussian within the brain. A constant map stays constant up to the brain's edge,
    a point spreads as a Gaussian of the FWHM in mm, the stem's stride-2 checkerboard is gone at 6 mm, and maps
    stacked in one call come out as each would alone."""
    grid = BrainGrid(ShardSet(small_shards))
    voxel = np.sqrt((grid.canonical_affine[:3, :3] ** 2).sum(axis=0))
    assert np.allclose(voxel, 2.0)                                       # synthetic scans: 2 mm voxels
    ones = np.ones(grid.n_brain, dtype=np.float32)
    assert np.allclose(grid.smooth(ones, 6.0), 1.0, atol=1e-6)           # no dilution at the edge
    assert grid.smooth(ones * 3, 0.0) is not None and np.array_equal(grid.smooth(ones * 3, 0.0), ones * 3)
    mask = grid.to_canonical(ones) > 0
    core = np.argwhere(mask)[np.argmax([sum(min(c - 3, s - 4 - c) for c, s in zip(v, mask.shape))
                                        for v in np.argwhere(mask)])]      # the voxel deepest inside the brain
    point = np.zeros(mask.shape, np.float32)
    point[tuple(core)] = 1.0
    smoothed = grid.to_canonical(grid.smooth(grid.pack(point), 4.0))
    sigma = 4.0 / (np.sqrt(8 * np.log(2)) * 2.0)
    for axis in range(3):
        step = np.eye(3, dtype=int)[axis]
        ratio = smoothed[tuple(core + step)] / smoothed[tuple(core)]
        assert ratio == pytest.approx(np.exp(-0.5 / sigma**2), rel=0.02), axis
    idx = np.indices(mask.shape)
    checker = grid.pack(np.where((idx.sum(axis=0) % 2) == 0, 1.0, -1.0).astype(np.float32))
    flat = grid.to_canonical(np.abs(grid.smooth(checker, 6.0)))
    assert flat[tuple(core)] < 0.01 and np.median(flat[mask]) < 0.05    # from +-1 (the brain's edge keeps a little)
    both = grid.smooth(np.stack([checker, ones * 3]), 6.0)              # several maps in one call: each as alone
    assert both.shape == (2, grid.n_brain)
    assert np.allclose(both[0], grid.smooth(checker, 6.0), atol=1e-6) and np.allclose(both[1], 3.0, atol=1e-5)


def test_group_maps_average_the_smoothed_subject_maps(demo, tmp_path, capsys):
    """The group step smooths each subject map by analysis.smooth_fwhm (default 6 mm) before the group voxel maps (the
    contrast map too: male minus female mean of the signed maps); the subject maps on disk and the region table (which
    averages over regions itself) stay unsmoothed; 0 turns smoothing off; a negative width is a config error; a group
    of one class has no contrast map, and the other class's maps and the contrast of an earlier merge are removed."""
    out = tmp_path / "ig"
    shutil.copytree(demo["ig"] / "subjects", out / "subjects")
    args = ["analyze", "--run", str(demo["run"]), "--out", str(out), "--subjects", *demo["subjects"], "--group-only",
            "analysis.figures=false"]
    grid = BrainGrid(ShardSet(demo["shards"]))
    raw = [grid.load(out / "subjects" / f"{s}_abs_ig.nii.gz") for s in demo["subjects"]]
    signed = [grid.load(out / "subjects" / f"{s}_ig.nii.gz") for s in demo["subjects"]]
    male = np.array([json.loads((out / "subjects" / f"{s}_ig.json").read_text())["target"] == 1 for s in demo["subjects"]])
    assert 0 < male.sum() < len(male)
    tables = []
    for fwhm in (None, 0):
        width = 6.0 if fwhm is None else 0
        assert main([*args, *([] if fwhm is None else ["--smooth-fwhm", str(fwhm)])]) == 0
        expected = np.mean([grid.smooth(m, width) for m in raw], axis=0)
        assert np.allclose(grid.load(out / "group_mean_abs_ig.nii.gz"), expected, rtol=1e-4, atol=1e-7)
        smoothed = np.stack([grid.smooth(m, width) for m in signed])
        difference = smoothed[male].mean(axis=0) - smoothed[~male].mean(axis=0)
        assert np.allclose(grid.load(out / "group_contrast_ig.nii.gz"), difference, rtol=1e-4, atol=1e-6)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["smooth_fwhm"] == width
        tables.append((out / "regions.csv").read_text())
    assert tables[0] == tables[1]
    assert np.array_equal(grid.load(out / "subjects" / f"{demo['subjects'][0]}_abs_ig.nii.gz"), raw[0])
    males = [s for s, is_male in zip(demo["subjects"], male) if is_male]
    assert list(out.glob("group_female_*")) and list(out.glob("group_male_*"))
    assert main([*args[:6], *males, *args[6 + len(demo["subjects"]):]]) == 0
    assert not list(out.glob("group_contrast_ig*")) and not list(out.glob("group_female_*"))
    assert list(out.glob("group_male_*")) and (out / "group_mean_abs_ig.nii.gz").exists()
    assert main([*args, "--smooth-fwhm", "-1"]) == 2
    assert "analysis.smooth_fwhm: must be zero or more (mm) (given as --smooth-fwhm -1.0)" in capsys.readouterr().err


def test_contrast_map_is_the_class_difference_and_the_slope_on_a_score():
    """group_contrast_ig: for a 0/1 label the difference of the classes' mean maps (1 minus 0), for a score the
    least-squares slope of each voxel on it; subjects of one class only have no contrast."""
    rng = np.random.default_rng(0)
    maps, labels, scores = rng.normal(size=(9, 5)), np.array([0, 1, 1, 0, 1, 0, 0, 1, 1.0]), rng.normal(size=9) * 15 + 100
    by_class, by_score, one_class = GroupMaps(5), GroupMaps(5), GroupMaps(5)
    for m, label, score in zip(maps, labels, scores):
        by_class.add(m, np.abs(m), label)
        by_score.add(m, np.abs(m), score)
        one_class.add(m, np.abs(m), 1.0)
    expected = maps[labels == 1].mean(axis=0) - maps[labels == 0].mean(axis=0)
    assert np.allclose(by_class.result()["contrast_ig"], expected, atol=1e-6)
    assert np.allclose(by_score.result()["contrast_ig"], [np.polyfit(scores, maps[:, j], 1)[0] for j in range(5)], atol=1e-6)
    assert np.allclose(by_score.result()["mean_ig"], maps.mean(axis=0))           # the other statistics unchanged
    assert np.allclose(by_class.result()["mean_abs_net_ig"], np.abs(maps).mean(axis=0))
    assert "contrast_ig" not in one_class.result()


def test_truth_scores_the_group_map_against_the_planted_regions(demo, tmp_path, capsys):
    """--truth: truth.json holds the voxel AUROC of the group |IG| map for the target's truth mask and, where the
    cohort has a control region, truth against control; the same for the group mean |net IG|, for |contrast| and
    for the classes' mean |mean signed map|; a folder that is not a planted one stops before any work."""
    out = tmp_path / "ig"
    shutil.copytree(demo["ig"] / "subjects", out / "subjects")
    planted = tmp_path / "planted"
    shutil.copytree(demo["raw"] / "derivatives" / "planted", planted)
    info = json.loads((planted / "planted_effects.json").read_text())
    assert info["control"] is None                       # the demo's mixed cohort: region c (cognition) as a control
    info["control"] = {"regions": ["region-c"], "mask": "region-c_mask.nii.gz"}
    (planted / "planted_effects.json").write_text(json.dumps(info))
    args = ["analyze", "--run", str(demo["run"]), "--out", str(out), "--subjects", *demo["subjects"], "--group-only"]
    assert main([*args, "--truth", str(planted)]) == 0
    scores = json.loads((out / "truth.json").read_text())
    values = np.asarray(nib.load(out / "group_mean_abs_ig.nii.gz").dataobj)
    masks = {r: np.asarray(nib.load(planted / f"region-{r}_mask.nii.gz").dataobj) > 0 for r in "abc"}
    brain, truth = values != 0, masks["a"] | masks["b"]
    assert scores["truth_regions"] == ["region-a", "region-b"] and scores["target"] == "sex"
    assert scores["truth_auroc"] == pytest.approx(auroc(truth[brain], values[brain]))
    both = (truth | masks["c"]) & brain
    assert scores["effect_vs_control_auroc"] == pytest.approx(auroc(truth[both], values[both]))
    net = np.asarray(nib.load(out / "group_mean_abs_net_ig.nii.gz").dataobj)
    assert Path(scores["net"]["map"]).name == "group_mean_abs_net_ig.nii.gz"
    assert scores["net"]["truth_auroc"] == pytest.approx(auroc(truth[brain], net[brain]))
    assert scores["net"]["effect_vs_control_auroc"] == pytest.approx(auroc(truth[both], net[both]))
    contrast = np.abs(np.asarray(nib.load(out / "group_contrast_ig.nii.gz").dataobj))
    assert scores["contrast"]["truth_auroc"] == pytest.approx(auroc(truth[brain], contrast[brain]))
    assert scores["contrast"]["effect_vs_control_auroc"] == pytest.approx(auroc(truth[both], contrast[both]))
    class_means = np.mean([np.abs(np.asarray(nib.load(out / f"group_{c}_mean_ig.nii.gz").dataobj))
                           for c in ("female", "male")], axis=0)
    assert [Path(m).name for m in scores["class_means"]["maps"]] == ["group_female_mean_ig.nii.gz",
                                                                     "group_male_mean_ig.nii.gz"]
    assert scores["class_means"]["truth_auroc"] == pytest.approx(auroc(truth[brain], class_means[brain]))
    assert scores["class_means"]["effect_vs_control_auroc"] == pytest.approx(auroc(truth[both], class_means[both]))
    printed = capsys.readouterr().out
    assert f"group |IG|: voxel AUROC {scores['truth_auroc']:.3f}; against the control (region-c)" in printed
    assert f"group |net IG|: voxel AUROC {scores['net']['truth_auroc']:.3f}; against the control" in printed
    assert f"|contrast|: voxel AUROC {scores['contrast']['truth_auroc']:.3f}; against the control" in printed
    assert f"|class means|: voxel AUROC {scores['class_means']['truth_auroc']:.3f}; against the control" in printed
    (out / "truth.json").unlink()
    assert main([*args, "--truth", str(tmp_path / "nowhere")]) == 1
    assert f"{tmp_path / 'nowhere' / 'planted_effects.json'}: not found" in capsys.readouterr().err
    small = nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4))
    nib.save(small, planted / "truth-sex_mask.nii.gz")
    assert main([*args, "--truth", str(planted)]) == 1
    assert f"{planted / 'truth-sex_mask.nii.gz'}: grid (4, 4, 4)" in capsys.readouterr().err
    assert (out / "summary.json").exists() and not (out / "truth.json").exists()   # the maps stay; no half a score


def test_maps_are_on_the_input_scans_grid(demo):
    source = nib.load(next((demo["raw"] / f"sub-{demo['subjects'][0]}" / "func").glob("*_bold.nii.gz")))
    assert np.allclose(source.affine[0, 0], -2.0)       # stored LAS, as FSL writes MNI data
    for name in (f"subjects/{demo['subjects'][0]}_ig.nii.gz", f"subjects/{demo['subjects'][0]}_abs_ig.nii.gz",
                 "group_mean_abs_ig.nii.gz", "group_female_t_ig.nii.gz"):
        img = nib.load(demo["ig"] / name)
        assert img.shape == source.shape[:3], name
        np.testing.assert_array_equal(img.affine, source.affine)
    # a subject map is exactly the attribution vector put back: re-packing it gives the brain voxels only
    grid = BrainGrid(ShardSet(demo["shards"]))
    subject_map = np.asarray(nib.load(demo["ig"] / "subjects" / f"{demo['subjects'][0]}_abs_ig.nii.gz").dataobj)
    outside = grid.unpack(np.ones(grid.n_brain)) == 0
    assert (subject_map[outside] == 0).all() and (grid.pack(grid.from_source(subject_map)) > 0).mean() > 0.99


def _permuted_dataset(root: Path) -> Path:
    """Three scans stored with permuted, flipped axes (the world's y, z, x along the file's first, second, third)."""
    affine = np.array([[0.0, 0.0, -2.0, 11.0], [2.0, 0.0, 0.0, -13.0], [0.0, -2.0, 0.0, 12.0], [0.0, 0.0, 0.0, 1.0]])
    for i in range(3):
        write_scan(root / f"sub-{i:02d}" / "func" / f"sub-{i:02d}_task-rest_bold.nii.gz",
                   random_scan(i, shape=(14, 12, 12), frames=12), affine, dtype=np.int16)
    (root / "participants.tsv").write_text("participant_id\tscore\n" + "".join(f"sub-{i:02d}\t{i}\n" for i in range(3)))
    return root


@pytest.mark.parametrize("layout", ["las-synthetic", "permuted"])
def test_brain_voxel_packing_is_undone_exactly(demo, tmp_path, layout):
    """Every stored brain voxel of a frame lands on its voxel of the source file: bitwise the file's z-scored value."""
    from brainmt.data.shards import ShardOptions, shard_dataset

    if layout == "permuted":
        raw = _permuted_dataset(tmp_path / "raw")
        shard_dataset(raw, raw / "participants.tsv", tmp_path / "shards", options=ShardOptions(min_frames=8),
                      progress=False)
        shards = ShardSet(tmp_path / "shards")
    else:
        shards = ShardSet(demo["shards"])
    scan = sorted(shards.scans)[1]
    meta = shards.scans[scan]
    grid = BrainGrid(shards, [scan])
    source = nib.load(meta["source"])
    assert grid.shape == source.shape[:3] and np.array_equal(grid.affine, source.affine)
    t = 5
    stored = shards.read_frames(scan, t, 1)[0]
    frame = np.asarray(source.dataobj[..., t:t + 1], dtype=np.float32)[..., 0]
    frame -= meta["mean"]
    frame /= meta["std"]
    put_back = grid.unpack(stored)
    brain = grid.unpack(np.ones(grid.n_brain, dtype=bool))
    assert brain.sum() == shards.n_brain and put_back.dtype == np.float16
    np.testing.assert_array_equal(put_back[brain], frame.astype(np.float16)[brain])
    assert (put_back[~brain] == 0).all()
    np.testing.assert_array_equal(grid.pack(grid.from_source(put_back)), stored)     # and back: the round trip is exact
    mask = nib.load(shards.root / "mask.nii.gz")
    np.testing.assert_array_equal(grid.to_canonical(np.ones(grid.n_brain, bool)), np.asarray(mask.dataobj) > 0)


def test_memory_is_bounded_by_internal_batch_size():
    """A 40-frame debug window at 32 steps: captum unbounded pushes all 32 scaled copies through at once; with the
    batch size chosen for a 200 MB budget the added peak memory stays inside the budget, several times lower."""
    def probe(batch: str) -> dict:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "analysis_memory_probe.py"), "40", "32", batch],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    budget = 200_000_000
    unbounded, bounded = probe("none"), probe(f"auto:{budget}")
    print(f"added peak memory: unbounded {unbounded['added_peak_bytes'] / 1e6:.0f} MB (batches {unbounded['batch_sizes']}); "
          f"internal_batch_size {bounded['internal_batch_size']} for a {budget / 1e6:.0f} MB budget "
          f"({bounded['bytes_per_sample'] / 1e6:.1f} MB a sample estimated): {bounded['added_peak_bytes'] / 1e6:.0f} MB")
    assert unbounded["batch_sizes"] == [32] and unbounded["added_peak_bytes"] > 3 * budget
    assert 1 <= bounded["internal_batch_size"] < 32 and max(bounded["batch_sizes"]) <= bounded["internal_batch_size"]
    assert sum(bounded["batch_sizes"]) == 32 and bounded["finite"]
    assert bounded["added_peak_bytes"] <= budget
    assert unbounded["added_peak_bytes"] > 4 * bounded["added_peak_bytes"]


def test_windows_share_a_call_only_when_the_batch_allows(small_shards):
    shards = ShardSet(small_shards)
    cfg = load_config("debug", [f"model.volume_shape={list(shards.volume_shape)}"])
    model = PackedModel(build_model(cfg.model).eval().requires_grad_(False), shards.brain_index, shards.volume_shape)
    seen: list[int] = []
    model.model.register_forward_pre_hook(lambda module, args: seen.append(int(args[0].shape[0])))
    packed, background = _packed_windows(shards, shards.scans_of("test")[:1], 8)
    zeros = torch.zeros_like(packed)
    assert len(packed) == 3
    attribute_windows(model, packed, background, zeros, steps=8, internal_batch_size=3)
    assert seen == [3, 3, 2, 1, 1] * 3            # per window: the 8 path points in 3 batches, then f(input), f(baseline)
    seen.clear()
    attribute_windows(model, packed, background, zeros, steps=8, internal_batch_size=16)
    assert seen == [16, 2, 2, 8, 1, 1]            # two windows' paths in one batch, then the third window's


def test_bad_input_gives_clear_errors(demo, tmp_path, capsys):
    empty = tmp_path / "never-trained"
    (empty / "checkpoints").mkdir(parents=True)
    assert main(["analyze", "--run", str(empty)]) == 1
    assert f"{empty / 'checkpoints'}: no checkpoints" in capsys.readouterr().err
    assert main(["analyze", "--run", str(tmp_path / "missing")]) == 1
    assert f"{tmp_path / 'missing'}: run directory not found" in capsys.readouterr().err
    train_subject = json.loads((demo["shards"] / "splits.json").read_text())["train"][0]
    assert main(["analyze", "--run", str(demo["run"]), "--out", str(tmp_path / "ig"), "--subjects", "9999",
                 f"sub-{train_subject}"]) == 1
    err = capsys.readouterr().err
    assert "'9999' is not in" in err and f"'{train_subject}' is in the train split (pass --split train)" in err
    assert not (tmp_path / "ig").exists()                 # a refused analysis leaves no empty --out behind
    assert main(["analyze", "--run", str(demo["run"]), "--baseline", "mean", "analysis.steps=0"]) == 2
    assert "analysis.steps" in capsys.readouterr().err
    assert main(["analyze", "--run", str(demo["run"]), "--out", str(tmp_path / "ig"), "--baseline", "mean"]) == 1
    assert f"{demo['run']}: analysis.baseline=mean is constant in time" in capsys.readouterr().err   # demo: center
    assert not (tmp_path / "ig").exists()


def test_region_table_with_a_user_atlas(demo, tmp_path, capsys):
    """The planted regions as an atlas, given at 1 mm (resampled to the 2 mm scans): region b or a ranks first."""
    planted = [nib.load(demo["raw"] / "derivatives" / "planted" / f"region-{r}_mask.nii.gz") for r in "abc"]
    labels = sum((i + 1) * (np.asarray(img.dataobj) > 0) for i, img in enumerate(planted)).astype(np.int16)
    fine = np.repeat(np.repeat(np.repeat(labels, 2, 0), 2, 1), 2, 2)
    affine = planted[0].affine @ np.diag([0.5, 0.5, 0.5, 1.0])
    affine[:3, 3] -= affine[:3, :3] @ np.array([0.5, 0.5, 0.5])       # 1 mm voxels centred inside the 2 mm ones
    nib.save(nib.Nifti1Image(fine, affine), tmp_path / "atlas.nii.gz")
    (tmp_path / "labels.tsv").write_text("index\tname\n1\tplanted a\n2\tplanted b\n3\tplanted c\n")
    grid = BrainGrid(ShardSet(demo["shards"]))
    packed, names = load_atlas(tmp_path / "atlas.nii.gz", tmp_path / "labels.tsv", grid)
    coarse, _ = load_atlas(_save(labels, planted[0].affine, tmp_path / "coarse.nii.gz"), None, grid)
    np.testing.assert_array_equal(packed, coarse)                      # nearest neighbour through the affines
    assert names == {1: "planted a", 2: "planted b", 3: "planted c"}
    shutil.copytree(demo["ig"] / "subjects", tmp_path / "ig" / "subjects")
    code = main(["analyze", "--run", str(demo["run"]), "--out", str(tmp_path / "ig"), "--group-only", "--subjects",
                 *demo["subjects"], "--atlas", str(tmp_path / "atlas.nii.gz"), "--atlas-labels", str(tmp_path / "labels.tsv")])
    out = capsys.readouterr().out
    assert code == 0 and "top regions by mean |IG|" in out
    rows = (tmp_path / "ig" / "regions.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].split(",")[2] in ("planted a", "planted b"), rows
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), tmp_path / "float.nii.gz")
    with pytest.raises(AtlasError, match="float.nii.gz: values are not integers"):
        load_atlas(tmp_path / "float.nii.gz", None, grid)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_nilearn_figures_of_subjects_and_group(demo):
    """Stat map over the MNI template and glass brain: the group |IG| map, each class's t-map, the contrast map, the
    first 4 subjects; each thresholded at the 90th percentile of the map's |values| over the brain."""
    out = demo["ig"]
    stems = (["group_mean_abs_ig", "group_female_t_ig", "group_male_t_ig", "group_contrast_ig"]
             + [f"subjects/{s}_ig" for s in demo["subjects"][:4]])
    for stem in stems:
        for kind in ("stat", "glass"):
            assert (out / f"{stem}_{kind}.png").stat().st_size > 20_000, (stem, kind)
    assert not list((out / "subjects").glob(f"{demo['subjects'][4]}_*.png"))       # --subject-figures: 4 by default
    assert not (out / "group_t_ig_stat.png").exists()                                # classes' signs differ: per class
    brain = json.loads((out / "summary.json").read_text())["brain_figures"]
    assert brain["percentile"] == 90 and "MNI152" in brain["template"]
    assert sorted({r["map"] for r in brain["figures"]}) == sorted(stems) and len(brain["figures"]) == 2 * len(stems)
    grid = BrainGrid(ShardSet(demo["shards"]))
    for record in brain["figures"]:
        if record["map"] in ("group_mean_abs_ig", "group_male_t_ig", "group_contrast_ig", f"subjects/{demo['subjects'][0]}_ig"):
            values = grid.load(out / f"{record['map']}.nii.gz")
            assert record["threshold"] == pytest.approx(np.percentile(np.abs(values), 90), rel=1e-5), record


def test_region_table_with_a_named_atlas(demo, tmp_path, monkeypatch, capsys):
    """--atlas harvard-oxford with nilearn's fetcher replaced by a synthetic labelled atlas (image + labels list, as
    a fetcher returns them): the regions, voxel counts and mean |IG| follow the unsmoothed group map."""
    import nilearn.datasets

    source = nib.load(demo["raw"] / "derivatives" / "planted" / "region-a_mask.nii.gz")
    ijk = np.indices(source.shape).reshape(3, -1)
    x, y, _ = source.affine[:3, :3] @ ijk + source.affine[:3, 3:4]
    atlas = np.where(x < 0, 1, np.where(y >= 0, 2, 3)).reshape(source.shape).astype(np.int16)
    names = ["Background", "left half", "right anterior", "right posterior", "not in the image"]
    asked = []

    def fake_fetch(atlas_name: str, verbose: int = 1) -> dict:
        asked.append(atlas_name)
        return {"maps": nib.Nifti1Image(atlas, source.affine), "labels": names}

    monkeypatch.setattr(nilearn.datasets, "fetch_atlas_harvard_oxford", fake_fetch)
    out = tmp_path / "ig"
    subjects = demo["subjects"][:3]
    (out / "subjects").mkdir(parents=True)
    for subject in subjects:
        for suffix in ("_ig.nii.gz", "_abs_ig.nii.gz", "_ig.json"):
            shutil.copy(demo["ig"] / "subjects" / f"{subject}{suffix}", out / "subjects")
    assert main(["analyze", "--run", str(demo["run"]), "--out", str(out), "--group-only", "--subjects", *subjects,
                 "--atlas", "harvard-oxford"]) == 0
    assert "top regions by mean |IG| (Harvard-Oxford cortical atlas" in capsys.readouterr().out
    assert asked == ["cortl-maxprob-thr25-2mm"]
    grid = BrainGrid(ShardSet(demo["shards"]))
    labels = grid.pack(grid.from_source(atlas))
    group = np.mean([grid.load(out / "subjects" / f"{s}_abs_ig.nii.gz") for s in subjects], axis=0)   # unsmoothed
    with (out / "regions.csv").open() as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"left half", "right anterior", "right posterior"}
    for value, name in enumerate(names[1:4], start=1):
        inside = labels == value
        assert int(rows[name]["label"]) == value and int(rows[name]["voxels"]) == inside.sum() > 0
        assert float(rows[name]["mean_abs_ig"]) == pytest.approx(group[inside].mean(), rel=1e-5)
        assert float(rows[name]["share_abs_ig"]) == pytest.approx(group[inside].sum() / group.sum(), rel=1e-5)
    assert [int(r["rank"]) for r in sorted(rows.values(), key=lambda r: -float(r["mean_abs_ig"]))] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["atlas"].startswith("Harvard-Oxford cortical atlas") and summary["regions"] == 3
    assert (out / "group_mean_abs_ig_glass.png").exists() and (out / f"subjects/{subjects[2]}_ig_stat.png").exists()


def test_label_files_and_builtin_lobes(tmp_path):
    files = {"fsl.xml": '<?xml version="1.0"?><atlas><data><label index="0" x="1">Frontal Pole</label>'
                        '<label index="1" x="2">Insular Cortex</label></data></atlas>',
             "lut.txt": "# FreeSurfer-style\n1 7Networks_LH_Vis_1 120 18 134 0\n2 7Networks_LH_Vis_2 120 18 135 0\n",
             "names.txt": "Precuneus\nSuperior temporal gyrus\n",
             "labels.csv": "id,name,colour\n10,MFG,red\n20,STG,blue\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert read_label_file(tmp_path / "fsl.xml") == {1: "Frontal Pole", 2: "Insular Cortex"}
    assert read_label_file(tmp_path / "lut.txt") == {1: "7Networks_LH_Vis_1", 2: "7Networks_LH_Vis_2"}
    assert read_label_file(tmp_path / "names.txt") == {1: "Precuneus", 2: "Superior temporal gyrus"}
    assert read_label_file(tmp_path / "labels.csv") == {10: "MFG", 20: "STG"}
    with pytest.raises(AtlasError, match="labels-missing.txt: label file not found"):
        read_label_file(tmp_path / "labels-missing.txt")
    # MNI points well inside each built-in region
    points = {"left frontal": (-40, 30, 30), "right parietal": (40, -50, 45), "left temporal": (-55, -20, -10),
              "right occipital": (15, -90, 10), "left cerebellum, brainstem": (-20, -60, -40),
              "right deep grey (basal ganglia, thalamus)": (15, -10, 5)}
    names = {1: "left frontal", 8: "right parietal", 3: "left temporal", 10: "right occipital",
             6: "left cerebellum, brainstem", 11: "right deep grey (basal ganglia, thalamus)"}
    got = lobe_labels(*np.array(list(points.values()), dtype=float).T)
    assert [names[int(v)] for v in got] == list(points)


def test_jobs_array_keeps_the_others_when_one_subject_fails(demo, tmp_path):
    """jobs/analyze.py --cluster local: two array tasks and a merge; one subject's shard data is corrupt (NaN)."""
    shards = tmp_path / "shards"
    shutil.copytree(demo["shards"], shards)
    bad = demo["subjects"][1]
    scan = ShardSet(shards).scans_of("test")[1]
    meta = json.loads((shards / "manifest.json").read_text())["scans"][scan]
    assert meta["subject"] == bad
    offset, nbytes = meta["chunks"][0][:2]
    with (shards / "shards" / meta["shard"]).open("r+b") as f:      # same size: only reading the values shows it
        f.seek(offset)
        f.write(b"\xff\x7f" * (nbytes // 2))                        # float16 NaN
    subjects = demo["subjects"][:3]
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "analyze.py"), "--run", str(demo["run"]), "--shards",
                           str(shards), "--out", str(tmp_path / "ig"), "--cluster", "local", "--gpus-per-node", "0",
                           "--array-size", "2", "--steps", "8", "--subjects", *subjects, "--wait"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=one_thread_env())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "array of 2 tasks over 3 subjects" in proc.stdout and f"FAILED subject {bad}" in proc.stdout
    out = tmp_path / "ig"
    for subject in (subjects[0], subjects[2]):
        assert (out / "subjects" / f"{subject}_ig.nii.gz").exists() and (out / "subjects" / f"{subject}_ig.json").exists()
    assert not (out / "subjects" / f"{bad}_ig.nii.gz").exists()
    error = json.loads((out / "subjects" / f"{bad}_error.json").read_text())["error"]
    assert "non-finite values" in error and meta["shard"] in error
    summary = json.loads((out / "summary.json").read_text())
    assert summary["analysed"] == 2 and list(summary["failed"]) == [bad] and summary["settings"]["steps"] == 8
    assert nib.load(out / "group_mean_abs_ig.nii.gz").shape == (20, 24, 20)
    assert len(list((out / "slurm").glob("*/*_log.out"))) >= 3       # two tasks and the merge ran as submitit jobs
    # a re-run resumes: the two good subjects are skipped, the bad one fails again
    again = subprocess.run([sys.executable, "-m", "brainmt.cli", "analyze", "--run", str(demo["run"]), "--shards", str(shards),
                            "--out", str(out), "--steps", "8", "--maps-only", "--subjects", *subjects],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=one_thread_env())
    assert again.returncode == 0 and "0 written, 2 already there, 1 failed" in again.stdout, again.stdout + again.stderr


def test_jobs_container_runs_each_task_and_the_merge_in_the_image(demo, tmp_path):
    """--container with a stand-in runtime (tests/fake_apptainer.sh): it records each call and runs it on the host."""
    profile = tmp_path / "site.yaml"
    profile.write_text(f"cluster:\n  container_runtime: {ROOT / 'tests' / 'fake_apptainer.sh'}\n  binds: ['/data:/data']\n")
    env = one_thread_env(FAKE_APPTAINER_LOG=str(tmp_path / "calls.log"), FAKE_APPTAINER_PYTHON=sys.executable)
    out = tmp_path / "ig"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "analyze.py"), "--run", str(demo["run"]), "--out", str(out),
                           "--profile", str(profile), "--container", "brainmt.sif", "--cluster", "local", "--gpus-per-node",
                           "0", "--array-size", "1", "--steps", "4", "--subjects", demo["subjects"][0], "--wait"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    task, merge = (tmp_path / "calls.log").read_text().splitlines()
    prefix = f"exec --bind /data:/data brainmt.sif python3 -m brainmt.cli analyze --run {demo['run']} --out {out} --config "
    assert task.startswith(prefix) and task.endswith(f"--maps-only --subjects {demo['subjects'][0]}") and "--nv" not in task
    assert merge.startswith(prefix) and "--group-only" in merge
    assert (out / "subjects" / f"{demo['subjects'][0]}_ig.nii.gz").exists() and "IG of 1 of 1 subjects" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["settings"]["steps"] == 4


def test_jobs_array_and_merge_on_a_real_slurm(slurm, demo, tmp_path):
    """The same job array and afterany merge job, submitted to the local single-node SLURM."""
    out = tmp_path / "ig"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "analyze.py"), "--run", str(demo["run"]), "--out", str(out),
                           "--cluster", "slurm", "--partition", "cpu", "--gpus-per-node", "0", "--cpus-per-task", "1",
                           "--time", "10", "--array-size", "2", "--steps", "4", "--subjects", *demo["subjects"][:2], "--wait"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=one_thread_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "array of 2 tasks over 2 subjects" in proc.stdout and "(slurm)" in proc.stdout
    jobs = json.loads((out / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])
    assert jobs["cluster"] == "slurm" and jobs["merge"] != jobs["array"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["analysed"] == 2 and not summary["failed"]
    for subject in demo["subjects"][:2]:
        assert (out / "subjects" / f"{subject}_ig.nii.gz").exists()
    assert (out / "slurm" / f"{jobs['array']}_0").is_dir() and (out / "slurm" / f"{jobs['array']}_1").is_dir()


def test_regression_run_has_one_group_in_target_units(small_shards, tmp_path):
    """A regression target (cognition): one group of all subjects, its t-map figure, predictions in target units."""
    from brainmt.train.loop import train

    run_dir = tmp_path / "run"
    train(load_config("debug", ["data.target=cognition", "train.epochs=1", "data.samples_per_epoch=8", "train.log_every=1"]),
          small_shards, run_dir)
    subjects = sorted(json.loads((small_shards / "splits.json").read_text())["test"])[:2]
    assert main(["analyze", "--run", str(run_dir), "--steps", "4", "--internal-batch-size", "2", "--subjects", *subjects]) == 0
    summary = json.loads((run_dir / "ig" / "summary.json").read_text())
    assert summary["task"] == "regression" and summary["groups"] == {"all": 2}
    assert (run_dir / "ig" / "group_t_ig.png").exists() and not list((run_dir / "ig").glob("group_*_mean_ig.nii.gz"))
    record = json.loads((run_dir / "ig" / "subjects" / f"{subjects[0]}_ig.json").read_text())
    stats = json.loads((run_dir / "target_stats.json").read_text())
    assert record["internal_batch_size"] == 2 and len(record["windows"]) == 3
    assert record["prediction"] == pytest.approx(record["output"] * stats["std"] + stats["mean"])
    assert 40 < record["target"] < 160                                  # cognition in its own units, not z-scored
