"""Synthetic scans: each kind of planted effect shows where its truth masks say, the controls carry no label, the
default ('mixed') scans are unchanged, and ``brainmt synth`` rejects bad arguments before writing anything."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainmt.cli import main
from brainmt.data import synthetic
from brainmt.data.synthetic import EFFECTS, SynthArgumentError, brain_mask, planted_regions, write_synthetic_bids

SHAPE = (16, 20, 16)
FRAMES, SUBJECTS, LAG = 100, 40, 4
# _digest of write_synthetic_bids(out, 4, 12, (16, 20, 16), seed=0), recorded before the effect kinds were added
MIXED_DIGEST = "6f59fb19354ee79fb8e37564fd933cfe7f988a767df83b46d8d60baa11d5b4d6"


def _digest(root: Path) -> str:
    """sha256 of every scan's and region mask's decoded array (float32) and participants.tsv."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.nii.gz")):
        if "derivatives" in f.parts and not f.name.startswith("region-"):
            continue
        h.update(f.relative_to(root).as_posix().encode())
        h.update(np.ascontiguousarray(np.asarray(nib.load(f).dataobj, dtype=np.float32)).tobytes())
    h.update((root / "participants.tsv").read_bytes())
    return h.hexdigest()


def _load(root: Path) -> dict:
    """The json, masks (as stored, LAS), sexes, scores and each region's mean time series (subjects, T)."""
    planted = root / "derivatives" / "planted"
    info = json.loads((planted / "planted_effects.json").read_text())
    masks = {f.name.removesuffix("_mask.nii.gz"): np.asarray(nib.load(f).dataobj) > 0 for f in planted.glob("*_mask.nii.gz")}
    table = [line.split("\t") for line in (root / "participants.tsv").read_text().splitlines()[1:]]
    ts, brain = {name: [] for name in info["masks"]}, None
    for sid, *_ in table:
        data = np.asarray(nib.load(root / sid / "func" / f"{sid}_task-rest_bold.nii.gz").dataobj, dtype=np.float64)
        brain = data[..., 0] != 0
        for name in ts:
            ts[name].append(data[masks[name]].mean(axis=0))
    return {"root": root, "info": info, "masks": masks, "brain": brain, "ts": {k[-1]: np.array(v) for k, v in ts.items()},
            "male": np.array([row[1] == "M" for row in table]), "score": np.array([float(row[2]) for row in table])}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """cohort(effect): a 40-subject, 100-frame 16x20x16 dataset of ``effect``, written once for the module."""
    cache: dict[str, dict] = {}

    def get(effect: str) -> dict:
        if effect not in cache:
            root = write_synthetic_bids(tmp_path_factory.mktemp(effect) / "raw", SUBJECTS, FRAMES, SHAPE, seed=7,
                                        effect=effect)
            cache[effect] = _load(root)
        return cache[effect]
    return get


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-subject Pearson correlation of (subjects, T) series."""
    x, y = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    return (x * y).sum(1) / np.sqrt((x**2).sum(1) * (y**2).sum(1))


def _lag_asymmetry(x: np.ndarray, y: np.ndarray, lag: int = LAG) -> np.ndarray:
    """corr(x(t), y(t + lag)) - corr(x(t + lag), y(t)): > 0 when y lags x."""
    return _corr(x[:, :-lag], y[:, lag:]) - _corr(x[:, lag:], y[:, :-lag])


def _by_sex(c: dict, values: np.ndarray) -> tuple[float, float]:
    return float(values[c["male"]].mean()), float(values[~c["male"]].mean())


def _t(c: dict, values: np.ndarray) -> float:
    """Welch's t of males against females: how far apart the sexes are, in standard errors."""
    m, f = values[c["male"]], values[~c["male"]]
    return float((m.mean() - f.mean()) / np.sqrt(m.var(ddof=1) / len(m) + f.var(ddof=1) / len(f)))


def _r(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def _std_ratio(c: dict, region: str) -> float:
    male, female = _by_sex(c, c["ts"][region].std(1))
    return male / female


# ------------------------------------------------------------------ the default output


def test_default_mixed_output_is_unchanged(tmp_path):
    root = write_synthetic_bids(tmp_path / "raw", 4, 12, SHAPE, seed=0)
    assert _digest(root) == MIXED_DIGEST
    c = _load(root)
    assert c["info"]["effect"] == "mixed" and c["info"]["control"] is None and "control_note" in c["info"]
    assert not (root / "derivatives" / "planted" / "control_mask.nii.gz").exists()
    assert np.array_equal(c["masks"]["truth-sex"], c["masks"]["region-a"] | c["masks"]["region-b"])
    assert np.array_equal(c["masks"]["truth-score"], c["masks"]["region-c"])


# ------------------------------------------------------------------ each effect, measured on the region means


def test_amplitude_effect(cohort):
    c = cohort("amplitude")
    sex_ratio, control_ratio = _std_ratio(c, "a"), _std_ratio(c, "e")
    score_r = _r(c["ts"]["c"].std(1), c["score"])
    print(f"amplitude: std a M/F {sex_ratio:.3f}, std e (control) M/F {control_ratio:.3f}, r(std c, score) {score_r:.3f}")
    assert 1.8 < sex_ratio < 2.2                     # sex doubles region a's amplitude
    assert score_r > 0.9                             # the score scales region c's
    assert abs(control_ratio - 1) < 0.05             # the control's amplitude carries no sex
    assert abs(_r(c["ts"]["e"].std(1), c["score"])) < 0.4


def test_coupling_effect(cohort):
    c = cohort("coupling")
    ab_m, ab_f = _by_sex(c, _corr(c["ts"]["a"], c["ts"]["b"]))
    ef = _corr(c["ts"]["e"], c["ts"]["f"])
    ef_m, ef_f = _by_sex(c, ef)
    ratios = {r: _std_ratio(c, r) for r in "abcdef"}
    score_r = _r(_corr(c["ts"]["c"], c["ts"]["d"]), c["score"])
    std_score_r = {r: round(_r(c["ts"][r].std(1), c["score"]), 3) for r in "cd"}
    print(f"coupling: corr a-b M {ab_m:.3f} F {ab_f:.3f}; control corr e-f M {ef_m:.3f} F {ef_f:.3f} (t {_t(c, ef):.2f}); "
          f"std M/F { {k: round(v, 3) for k, v in ratios.items()} }; r(corr c-d, score) {score_r:.3f}; "
          f"r(std, score) {std_score_r}")
    assert ab_m > 0.9 and abs(ab_f) < 0.2           # one shared signal in males, independent ones in females
    assert all(abs(v - 1) < 0.05 for v in ratios.values())     # no region's amplitude carries sex
    assert score_r > 0.6                             # the score scales the c-d coupling ...
    assert all(abs(v) < 0.4 for v in std_score_r.values())     # ... not c's or d's amplitude
    assert abs(_t(c, ef)) < 3 and 0.3 < ef_m < 0.7 and 0.3 < ef_f < 0.7      # the control pair: coupled alike


def test_lagged_effect(cohort):
    c = cohort("lagged")
    a, b, cc, d, e, f = (c["ts"][r] for r in "abcdef")
    zero_ab, lag_ab, zero_ef, lag_ef = _corr(a, b), _lag_asymmetry(a, b), _corr(e, f), _lag_asymmetry(e, f)
    (zero_m, zero_f), (lag_m, lag_f) = _by_sex(c, zero_ab), _by_sex(c, lag_ab)
    ratios = {r: _std_ratio(c, r) for r in "abcdef"}
    score_lag_r, score_zero_r = _r(_lag_asymmetry(cc, d), c["score"]), _r(_corr(cc, d), c["score"])
    matches = float(np.mean((lag_ab > 0) == c["male"]))
    print(f"lagged: zero-lag corr a-b M {zero_m:.3f} F {zero_f:.3f} (t {_t(c, zero_ab):.2f}); lag-{LAG} asymmetry a->b "
          f"M {lag_m:.3f} F {lag_f:.3f} (t {_t(c, lag_ab):.1f}, sign matches sex in {matches:.2f}); std M/F "
          f"{ {k: round(v, 3) for k, v in ratios.items()} }; r(asymmetry c->d, score) {score_lag_r:.3f}, "
          f"r(zero-lag corr c-d, score) {score_zero_r:.3f}; control e-f zero-lag M/F {_by_sex(c, zero_ef)} "
          f"(t {_t(c, zero_ef):.2f}), asymmetry M/F {_by_sex(c, lag_ef)} (t {_t(c, lag_ef):.2f})")
    assert abs(_t(c, zero_ab)) < 3 and abs(zero_m - zero_f) < 0.15 and zero_m > 0.3   # zero-lag: alike in both sexes
    assert lag_m > 0.4 and lag_f < -0.4 and matches > 0.9          # only the lag's direction carries sex
    assert all(abs(v - 1) < 0.05 for v in ratios.values())
    assert score_lag_r > 0.7 and abs(score_zero_r) < 0.35           # the score: the lag's direction, not zero-lag
    assert abs(_t(c, zero_ef)) < 3 and abs(_t(c, lag_ef)) < 3 and lag_ef.mean() > 0.4   # the control: f lags e in all


@pytest.mark.parametrize("effect", [e for e in EFFECTS if e != "mixed"])
def test_truth_and_control_masks(cohort, effect):
    c = cohort(effect)
    info, masks, planted = c["info"], c["masks"], c["root"] / "derivatives" / "planted"
    assert info["effect"] == effect and set(info["effects"]) == set(info["masks"])
    assert all((planted / name).exists() for name in info["masks"].values())
    control = masks["control"]
    assert info["control"]["mask"] == "control_mask.nii.gz" and control.any() and not (control & ~c["brain"]).any()
    for role, column in (("sex", "sex"), ("score", "cognition")):
        truth = info["truth"][role]
        mask = masks[truth["mask"].removesuffix("_mask.nii.gz")]
        assert truth["column"] == column and mask.any()
        assert np.array_equal(mask, np.logical_or.reduce([masks[r] for r in truth["regions"]]))
        assert not (mask & ~c["brain"]).any() and not (mask & control).any()


@pytest.mark.parametrize("shape", [(8, 8, 8), SHAPE, (48, 56, 48), (91, 109, 91)])
def test_regions_are_inside_the_brain_and_apart_at_every_size(shape):
    brain = brain_mask(shape)
    for effect in EFFECTS:
        regions = planted_regions(shape, effect)
        assert all(r.any() and not (r & ~brain).any() for r in regions.values()), (effect, shape)
        if effect != "mixed" or min(shape) > 8:          # mixed's original layout overlaps at 8x8x8 (c with a and b)
            assert sum(r.astype(int) for r in regions.values()).max() == 1, (effect, shape)
        for name, region in regions.items() if effect != "mixed" else ():    # mixed: the original layout, as it was
            grown = region.copy()        # the region and its 6 face neighbours: no other region touches it
            for axis in range(3):
                grown |= np.roll(region, 1, axis) | np.roll(region, -1, axis)
            assert not any((grown & other).any() for o, other in regions.items() if o != name), (effect, shape, name)


# ------------------------------------------------------------------ command line and errors


def test_synth_command_writes_the_effect(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["synth", str(out), "--subjects", "2", "--frames", "12", "--shape", *map(str, SHAPE), "--workers", "1",
                 "--effect", "lagged", "--lag", "3"]) == 0
    info = json.loads((out / "derivatives" / "planted" / "planted_effects.json").read_text())
    assert info["effect"] == "lagged" and info["lag_frames"] == 3 and "effect lagged" in capsys.readouterr().out


@pytest.mark.parametrize("out, options, flag", [
    ("ds/x", ["--frames", "0"], "--frames"),
    ("ds/x", ["--effect", "lagged", "--frames", "9"], "--frames"),          # a lag of 4 needs 10 frames
    ("ds/x", ["--subjects", "0"], "--subjects"),
    ("ds/x", ["--shape", "7", "20", "16"], "--shape"),
    ("ds/x", ["--lag", "0"], "--lag"),
    ("file", [], "out"),                                                   # an existing file
    ("file/ds", [], "out"),                                                # a folder under a file
])
def test_synth_rejects_bad_arguments_before_writing(tmp_path, capsys, out, options, flag):
    (tmp_path / "file").write_text("keep\n")
    code = main(["synth", str(tmp_path / out), "--subjects", "2", "--frames", "12", "--shape", *map(str, SHAPE),
                 "--workers", "1", *options])
    err = capsys.readouterr().err
    print(err.strip())
    assert code == 2 and f"brainmt synth: error: argument {flag}:" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "keep\n"


def test_synth_bad_effect_and_exit_code(tmp_path):
    with pytest.raises(SystemExit) as exc:                        # argparse's choices, read from EFFECTS
        main(["synth", str(tmp_path / "ds"), "--effect", "bogus"])
    assert exc.value.code == 2
    proc = subprocess.run([sys.executable, "-m", "brainmt.cli", "synth", str(tmp_path / "ds"), "--frames", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "argument --frames" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ds").exists()
    with pytest.raises(SynthArgumentError) as err:                # the API checks too
        write_synthetic_bids(tmp_path / "ds", 2, 12, (16, 20, 7))
    assert err.value.option == "shape" and not (tmp_path / "ds").exists()


def test_failed_synth_removes_the_folders_it_created(tmp_path, monkeypatch):
    calls = []

    def fail_second(args: tuple) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        write_one(args)

    write_one = synthetic._write_one
    monkeypatch.setattr(synthetic, "_write_one", fail_second)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_bids(tmp_path / "new" / "deeper" / "ds", 3, 12, SHAPE, effect="coupling")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()                                   # a folder that was there already stays
    calls.clear()
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_bids(tmp_path / "mine", 3, 12, SHAPE)
    assert (tmp_path / "mine").is_dir()
