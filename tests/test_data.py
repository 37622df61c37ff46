"""The data layer on real NIfTI files and real WebDataset tars: shard, read, split, restart, bad input."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from data_helpers import FRAMES, SHAPE, bids_dataset, random_scan, write_scan

from brainmt.data.layouts import LayoutError, find_scans
from brainmt.data.loader import EvalWindows, ShardSet, TrainStream, eval_windows
from brainmt.data.phenotypes import PhenotypeError, make_splits, read_phenotypes
from brainmt.data.shards import ShardError, ShardOptions, merge_manifest, shard_dataset

# mask_fraction 0.5: a voxel made NaN in one scan of a few stays in the data-derived mask (and is caught)
OPTS = ShardOptions(min_frames=10, chunk_frames=4, shard_bytes=200_000, mask_fraction=0.5)


def _z(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    vals = data[mask].T.astype(np.float64)           # (T, n_brain)
    return (vals - vals.mean()) / vals.std()


def _canonical(path: Path) -> np.ndarray:
    return nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)


def _shard(tmp_path: Path, n: int = 6, **kw) -> tuple[Path, Path]:
    raw = bids_dataset(tmp_path / "raw", n)
    out = tmp_path / "shards"
    shard_dataset(raw, raw / "participants.tsv", out, options=kw.pop("options", OPTS), progress=False, **kw)
    return raw, out


# ------------------------------------------------------------------ round trips


def test_values_survive_the_round_trip(tmp_path):
    raw, out = _shard(tmp_path)
    shards = ShardSet(out, verify="sha256")
    mask = nib.load(out / "mask.nii.gz").get_fdata() > 0
    assert shards.n_brain == mask.sum()
    for scan in shards.scans:
        sub = scan.split("_")[0]
        expected = _z(_canonical(raw / sub / "func" / f"{sub}_task-rest_bold.nii.gz"), mask)
        got = shards.read_frames(scan, 0, FRAMES).astype(np.float64)
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-3)    # fp16
        np.testing.assert_allclose(shards.read_frames(scan, 5, 7), got[5:12], atol=0)
    meta = shards.scans["sub-01"]
    assert meta["tr"] == 2.0 and meta["frames"] == FRAMES and meta["voxel_size"] == [2.0, 2.0, 2.0]
    assert meta["targets"] == {"sex": 1.0, "score": 11.0} and meta["family"] == "fam0"


def test_dense_sample_fills_background_with_min_z(tmp_path):
    _, out = _shard(tmp_path)
    shards = ShardSet(out)
    s = shards.sample("sub-02", 4, 8, "score")
    assert s["x"].shape == (8, 1, *shards.volume_shape) and s["x"].dtype == torch.float16
    assert s["y"].item() == 12.0 and s["subject"] == "02"
    flat = s["x"].view(8, -1).float()
    outside = np.setdiff1d(np.arange(flat.shape[1]), shards.brain_index)
    bg = shards.scans["sub-02"]["background"]
    assert torch.all(flat[:, outside] == torch.tensor(bg, dtype=torch.float16).float())
    whole_scan = shards.read_frames("sub-02", 0, FRAMES).astype(np.float32)
    assert bg == pytest.approx(float(whole_scan.min()), abs=2e-3)       # the scan's minimum z, not the window's


def test_nibabel_example4d_int16_oblique(tmp_path):
    src = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    img = nib.load(src)
    assert img.get_data_dtype() == np.int16 and img.shape == (128, 96, 24, 2)
    raw = tmp_path / "raw" / "subjA"
    raw.mkdir(parents=True)
    shutil.copy(src, raw / "bold.nii.gz")
    (tmp_path / "pheno.csv").write_text("subject,score\nsubjA,3.5\n")
    out = tmp_path / "shards"
    shard_dataset(tmp_path / "raw", tmp_path / "pheno.csv", out, glob="*/bold.nii.gz", subject_regex=r"^([^/]+)/",
                  options=ShardOptions(min_frames=2, chunk_frames=1), progress=False)
    shards = ShardSet(out)
    mask = nib.load(out / "mask.nii.gz").get_fdata() > 0
    expected = _z(_canonical(src), mask)
    np.testing.assert_allclose(shards.read_frames("subjA", 0, 2).astype(np.float64), expected, atol=3e-3, rtol=1e-3)
    canon = nib.as_closest_canonical(img)
    np.testing.assert_allclose(shards.manifest["mask"]["affine"], canon.affine, atol=1e-4)


def test_las_scan_equals_its_ras_twin(tmp_path):
    data = random_scan(7)
    ras_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    las_affine = ras_affine.copy()
    las_affine[0, 0] = -2.0
    las_affine[0, 3] = 2.0 * (SHAPE[0] - 1)     # the same world coordinates, x axis stored reversed
    outs = {}
    for name, arr, aff in (("ras", data, ras_affine), ("las", np.flip(data, 0), las_affine)):
        root = tmp_path / name
        write_scan(root / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz", arr, aff)
        (root / "participants.tsv").write_text("participant_id\tscore\nsub-01\t1\n")
        shard_dataset(root, root / "participants.tsv", tmp_path / f"{name}-shards", options=OPTS, progress=False)
        outs[name] = ShardSet(tmp_path / f"{name}-shards")
    np.testing.assert_array_equal(outs["ras"].read_frames("sub-01", 0, FRAMES), outs["las"].read_frames("sub-01", 0, FRAMES))
    np.testing.assert_allclose(outs["ras"].manifest["mask"]["affine"], outs["las"].manifest["mask"]["affine"])


def test_shards_are_real_webdataset_tars(tmp_path):
    import webdataset as wds

    _, out = _shard(tmp_path)
    shards = ShardSet(out)
    first = shards.manifest["shards"][0]["shard"]
    ds = wds.WebDataset(str(out / "shards" / first), shardshuffle=False).decode()
    n = 0
    for sample in ds:
        assert "." not in sample["__key__"]
        info = sample["json"]
        np.testing.assert_array_equal(sample["npy"], shards.read_frames(info["scan"], info["frame_start"], info["frames"]))
        n += 1
    assert n == shards.manifest["shards"][0]["samples"]


# ------------------------------------------------------------------ splits


def test_splits_never_share_a_subject_or_family(tmp_path):
    families = {f"s{i:03d}": f"f{i // 3}" for i in range(90)}        # families of three
    sex = {s: float(i % 2) for i, s in enumerate(sorted(families))}
    sp = make_splits(sorted(families), families, sex, seed=3)
    sets = [set(sp[k]) for k in ("train", "validation", "test")]
    assert set().union(*sets) == set(families) and sum(map(len, sets)) == 90
    fam_sets = [{families[s] for s in group} for group in sets]
    assert not (fam_sets[0] & fam_sets[1] or fam_sets[0] & fam_sets[2] or fam_sets[1] & fam_sets[2])
    assert 55 <= len(sets[0]) <= 70 and 9 <= len(sets[1]) <= 20
    assert sp == make_splits(sorted(families), families, sex, seed=3)          # seeded
    assert sp != make_splits(sorted(families), families, sex, seed=4)
    _, out = _shard(tmp_path, n=8)
    written = json.loads((out / "splits.json").read_text())
    assert written["grouped_by"] == "family" and written["stratified"] is True
    merge_manifest(out, OPTS)                                                     # reused, not redrawn
    assert json.loads((out / "splits.json").read_text()) == written


def test_a_kept_split_file_without_some_subjects_is_warned_of(tmp_path, caplog):
    """Scans added after the splits were drawn are in no split: the merge that keeps splits.json says so."""
    _, out = _shard(tmp_path, n=8)
    splits = json.loads((out / "splits.json").read_text())
    dropped = splits["train"].pop()
    (out / "splits.json").write_text(json.dumps(splits))
    with caplog.at_level("WARNING", logger="brainmt.data.shards"):
        merge_manifest(out, OPTS)
    assert any(f"1 subject(s) of the manifest are in no split ({dropped})" in r.getMessage() and "--resplit" in
               r.getMessage() for r in caplog.records)
    caplog.clear()
    merge_manifest(out, OPTS, resplit=True)
    assert not any("in no split" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ restart, parts


def test_rerun_refuses_scans_whose_phenotypes_or_file_changed_since(tmp_path):
    """A rerun after a phenotype was corrected (or a scan reprocessed) would keep the shards' old values without a
    word: it stops naming each scan and what changed, and writes nothing; an unchanged rerun goes on."""
    raw, out = _shard(tmp_path)
    table = raw / "participants.tsv"
    original = table.read_text()
    indexes = {p: p.read_text() for p in (out / "shards").glob("*.json")}
    table.write_text(original.replace("sub-01\tM\t11\tfam0", "sub-01\tF\t11\tfam0").replace(
        "sub-02\tF\t12\tfam1", "sub-02\tF\t12\tfam9"))
    with pytest.raises(ShardError, match=r"2 scan\(s\) already sharded have changed since \(against .*participants."
                                         r"tsv\): sub-01 \(sex 1.0 -> 0.0\); sub-02 \(family fam1 -> fam9\)\..*new --output"):
        shard_dataset(raw, table, out, options=OPTS, progress=False)
    table.write_text(original.replace("sub-04\tF\t14\tfam2\n", "").replace("sub-05\tM\t15", "sub-05\tM\tn/a"))
    with pytest.raises(ShardError, match=r"sub-04 \(no row for subject '04' now\); sub-05 \(score 15.0 -> missing\)"):
        shard_dataset(raw, table, out, options=OPTS, progress=False)       # a row withdrawn: not kept unseen
    table.write_text(original)
    scan = raw / "sub-03" / "func" / "sub-03_task-rest_bold.nii.gz"
    write_scan(scan, random_scan(99))                                            # reprocessed: other bytes
    with pytest.raises(ShardError, match=r"sub-03 \(file .*sub-03_task-rest_bold.nii.gz of \d+ bytes is \d+ now\)"):
        shard_dataset(raw, table, out, options=OPTS, progress=False)
    assert {p: p.read_text() for p in (out / "shards").glob("*.json")} == indexes     # nothing rewritten
    write_scan(scan, random_scan(3))                                             # the data it was sharded from
    assert shard_dataset(raw, table, out, options=OPTS, progress=False).written == []
    write_scan(raw / "sub-00" / "func" / "sub-00_task-movie_bold.nii.gz", random_scan(50))   # a second task:
    with pytest.raises(ShardError, match=r"sub-00_task-rest \(sharded as sub-00 from the same file: the dataset's "
                                         r"ids changed"):                        # every id gains its task
        shard_dataset(raw, table, out, options=OPTS, progress=False)


def test_rerun_skips_written_scans_and_restores_a_lost_shard(tmp_path):
    raw, out = _shard(tmp_path)
    tars = sorted((out / "shards").glob("*.tar"))
    assert len(tars) > 1
    before = {p.name: p.stat().st_mtime_ns for p in tars}
    again = shard_dataset(raw, raw / "participants.tsv", out, options=OPTS, progress=False)
    assert again.written == [] and len(again.already_done) == 6
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "shards").glob("*.tar"))} == before
    lost = json.loads(tars[0].with_suffix(".json").read_text())["scans"]
    tars[0].unlink()
    (out / "shards" / "shard-000-00099.tar.tmp").write_bytes(b"partial")
    third = shard_dataset(raw, raw / "participants.tsv", out, options=OPTS, progress=False)
    assert sorted(third.written) == sorted(lost)
    assert not list((out / "shards").glob("*.tmp"))
    assert len(ShardSet(out, verify="sha256").scans) == 6


def test_parts_then_merge(tmp_path):
    raw = bids_dataset(tmp_path / "raw", 6)
    out = tmp_path / "shards"
    args = (raw, raw / "participants.tsv", out)
    with pytest.raises(ShardError, match="first compute the mask once"):
        shard_dataset(*args, part=(0, 2), options=OPTS, progress=False)
    shard_dataset(*args, mask_only=True, options=OPTS, progress=False)
    assert (out / "mask.nii.gz").exists() and not list((out / "shards").glob("*.tar"))
    s0 = shard_dataset(*args, part=(0, 2), options=OPTS, progress=False)
    assert len(s0.written) == 3 and s0.manifest is None
    with pytest.raises(ShardError, match=r"part\(s\) \[1\] of 2 have not finished"):
        merge_manifest(out, OPTS)
    s1 = shard_dataset(*args, part=(1, 2), options=OPTS, progress=False)
    assert not set(s0.written) & set(s1.written)
    merge_manifest(out, OPTS)
    assert len(ShardSet(out).scans) == 6


def _part_file(out: Path, part: int, parts: int, finished: bool, age_s: float) -> None:
    """A part record as another run of ``parts`` parts would have left it, written ``age_s`` seconds ago."""
    import os
    import time

    record = json.loads((out / "parts" / "part-000-of-002.json").read_text())
    path = out / "parts" / f"part-{part:03d}-of-{parts:03d}.json"
    path.write_text(json.dumps({**record, "part": part, "parts": parts, "finished": finished}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_merge_goes_by_the_newest_run_s_part_count(tmp_path, monkeypatch):
    """An older run of another part count (a stopped single run) neither blocks the merge of the newest run nor
    stands in for it: a newer run with a part not finished is refused. A part is on record from its start, so a
    part still running (or killed) counts as not finished."""
    import brainmt.data.shards as shards_module

    raw = bids_dataset(tmp_path / "raw", 6)
    out = tmp_path / "shards"
    shard_dataset(raw, raw / "participants.tsv", out, mask_only=True, options=OPTS, progress=False)
    original, seen = shards_module._write_scans, []

    def watching(*args, **kwargs):
        seen.append(json.loads((out / "parts" / "part-000-of-002.json").read_text())["finished"])
        return original(*args, **kwargs)

    monkeypatch.setattr(shards_module, "_write_scans", watching)
    for i in range(2):
        shard_dataset(raw, raw / "participants.tsv", out, part=(i, 2), options=OPTS, progress=False)
    monkeypatch.undo()
    assert seen[0] is False                                                    # written before the first scan
    _part_file(out, 0, 1, finished=False, age_s=3600)                        # a single run stopped an hour ago
    merge_manifest(out, OPTS)
    assert len(ShardSet(out).scans) == 6
    (out / "parts" / "part-000-of-001.json").unlink()
    for i in range(2):
        _part_file(out, i, 3, finished=True, age_s=0)                         # a newer run of 3: part 2 not done
    with pytest.raises(ShardError, match=r"part\(s\) \[2\] of 3 have not finished"):
        merge_manifest(out, OPTS)


# ------------------------------------------------------------------ loader


def test_train_stream_is_seeded_split_by_rank_and_resumable(tmp_path):
    _, out = _shard(tmp_path, n=8)
    shards = ShardSet(out)
    scans = shards.scans_of(None)

    def draws(rank, world, seed=0, skip=0, n=12):
        it = iter(TrainStream(shards, scans, 8, "score", seed=seed, rank=rank, world_size=world, skip_batches=skip))
        return [(s["scan"], s["start"]) for s in (next(it) for _ in range(n))]

    assert draws(0, 1) == draws(0, 1) and draws(0, 1) != draws(0, 1, seed=1)
    r0, r1 = draws(0, 2, n=30), draws(1, 2, n=30)
    assert not {s for s, _ in r0} & {s for s, _ in r1}                  # each rank draws from its own share
    assert all(start % shards.chunk_frames == 0 and start + 8 <= FRAMES for _, start in r0)
    assert draws(0, 1, skip=5, n=7) == draws(0, 1, n=12)[5:]           # resume after 5 samples
    sample = next(iter(TrainStream(shards, scans, 8, "score", align="chunk")))
    assert 8 * shards.n_brain * 2 <= sample["bytes_read"] <= 8 * shards.n_brain * 2 + 2048
    loader = torch.utils.data.DataLoader(TrainStream(shards, scans, 8, "score"), batch_size=3, num_workers=2)
    it = iter(loader)
    batches = [next(it) for _ in range(5)]
    assert batches[0]["x"].shape == (3, 8, 1, *shards.volume_shape) and batches[0]["y"].shape == (3,)
    resumed = iter(torch.utils.data.DataLoader(TrainStream(shards, scans, 8, "score", skip_batches=3, batch_size=3),
                                               batch_size=3, num_workers=2))
    for expected in batches[3:]:                                       # two workers, resumed after 3 batches
        got = next(resumed)
        assert got["scan"] == expected["scan"] and torch.equal(got["start"], expected["start"])


def test_aligned_windows_read_only_their_frames(tmp_path):
    _, out = _shard(tmp_path)
    shards = ShardSet(out)
    used = 8 * shards.n_brain * 2
    gap = 1536 + 512                          # between two chunks' arrays: .json header+data, .npy header, padding
    before = shards.bytes_read
    shards.read_frames("sub-00", 4, 8)        # chunks 1 and 2 exactly
    assert used <= shards.bytes_read - before <= used + gap
    before = shards.bytes_read
    shards.read_frames("sub-00", 5, 8)        # unaligned: three chunks
    assert shards.bytes_read - before >= 1.5 * used


def test_eval_windows_cover_each_scan_once_across_ranks(tmp_path):
    _, out = _shard(tmp_path)
    shards = ShardSet(out)
    scans = shards.scans_of("test") + shards.scans_of("validation")
    every = eval_windows(shards, scans, 10)
    assert every == eval_windows(shards, scans, 10)
    assert [s for s, _ in every if s == scans[0]] == [scans[0]] * 3   # 0, 10 and the tail 14
    assert [st for s, st in every if s == scans[0]] == [0, 10, 14]
    per_rank = [EvalWindows(shards, scans, 10, "sex", rank=r, world_size=3).windows for r in range(3)]
    union = [w for ws in per_rank for w in ws]
    assert sorted(union) == sorted(every) and len(set(union)) == len(union)


# ------------------------------------------------------------------ bad input


def _skips(summary) -> dict[str, str]:
    return {s["scan_id"]: s["reason"] for s in summary.skipped}


def test_bad_scans_are_skipped_counted_and_named(tmp_path):
    raw = bids_dataset(tmp_path / "raw", 4)
    f = lambda sid: raw / sid / "func" / f"{sid}_task-rest_bold.nii.gz"  # noqa: E731
    write_scan(f("sub-10"), random_scan(10)[..., 0])                                  # 3-D
    write_scan(f("sub-11"), random_scan(11)[..., None])                               # 5-D
    nan = random_scan(12)
    nan[6, 7, 6, 3] = np.nan
    write_scan(f("sub-12"), nan)                                                      # NaN in the brain
    write_scan(f("sub-13"), np.zeros_like(random_scan(13)))                           # all zero
    write_scan(f("sub-14"), random_scan(14, frames=6))                                # too few frames
    write_scan(f("sub-15"), random_scan(15, shape=(12, 14, 10)))                      # other shape
    write_scan(f("sub-16"), random_scan(16), affine=np.diag([3.0, 3.0, 3.0, 1.0]))   # other voxel size
    good = f("sub-00").read_bytes()
    f("sub-17").parent.mkdir(parents=True)
    f("sub-17").write_bytes(good[: len(good) // 2])                                   # truncated .nii.gz
    write_scan(f("sub-18"), random_scan(18))                                          # no phenotype row
    write_scan(f("sub-19"), random_scan(19))                                          # missing target
    write_scan(f("sub-20"), random_scan(20))                                          # non-numeric target
    write_scan(f("sub-21"), random_scan(21))                                          # unknown sex
    f("sub-22").parent.mkdir(parents=True)
    f("sub-22").symlink_to(tmp_path / "annex" / "not-fetched")                       # a dangling link (DataLad)
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[0, 3] = 20.0
    write_scan(f("sub-23"), random_scan(23), affine=shifted)                          # same grid size, moved
    noisy = np.diag([2.0, 2.0, 2.0, 1.0])
    noisy[:3, 3] = 0.005                                                              # float noise: the same grid
    write_scan(f("sub-24"), random_scan(24), affine=noisy)
    rows = [f"sub-{i:02d}\tF\t1\tfam{i}" for i in [0, 1, 2, 3, *range(10, 18), 22, 23, 24]]
    rows += ["sub-19\tM\t\tf19", "sub-20\tM\thigh\tf20", "sub-21\tX\t2\tf21", "sub-99\tF\t3\tf99"]
    (raw / "participants.tsv").write_text("participant_id\tsex\tscore\tfamily_id\n" + "\n".join(rows) + "\n")
    summary = shard_dataset(raw, raw / "participants.tsv", tmp_path / "out", options=OPTS, progress=False)
    skips = _skips(summary)
    expect = {
        "sub-10": "expected a 4-D image", "sub-11": "expected a 4-D image (x, y, z, time), got 5-D",
        "sub-12": "NaN or infinite values inside the brain mask", "sub-13": "every brain voxel is zero",
        "sub-14": "6 frames, fewer than the 10 needed", "sub-15": "differs from the mask's",
        "sub-16": "voxel size [3.0, 3.0, 3.0] differs", "sub-17": "truncated or corrupt",
        "sub-18": "no row for subject '18'", "sub-19": "score: missing value",
        "sub-20": "score: non-numeric value 'high'", "sub-21": "unrecognised sex value 'X'",
        "sub-22": "file not found", "sub-23": "its origin [20.0, 0.0, 0.0] differs from [0.0, 0.0, 0.0], the mask's grid",
    }
    assert set(skips) == set(expect), skips
    for sid, text in expect.items():
        assert text in skips[sid], (sid, skips[sid])
        if sid not in ("sub-18", "sub-19", "sub-20", "sub-21"):
            assert str(f(sid)) in skips[sid]                       # the message names the file
    assert sorted(summary.written) == ["sub-00", "sub-01", "sub-02", "sub-03", "sub-24"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {s["scan_id"] for s in manifest["skipped"]} == set(expect)
    assert manifest["phenotype_rows_without_scan"] == ["99"]


def test_table_wide_problems_stop_with_the_file_named(tmp_path):
    raw = bids_dataset(tmp_path / "raw", 2)
    table = raw / "participants.tsv"
    table.write_text("participant_id\tscore\nsub-00\t1\nsub-01\t2\nsub-00\t3\n")
    with pytest.raises(PhenotypeError, match=r"participants.tsv: duplicate subject id 'sub-00' on lines 2 and 4"):
        shard_dataset(raw, table, tmp_path / "out", options=OPTS, progress=False)
    table.write_text("participant_id\tscore\nsub-00\t1\n\nsub-01\t2\nsub-00\t3\n")       # a blank line counts
    with pytest.raises(PhenotypeError, match=r"duplicate subject id 'sub-00' on lines 2 and 5"):
        read_phenotypes(table)
    table.write_text("participant_id\tscore\tage\tscore\nsub-00\t1\t30\t2\n")
    with pytest.raises(PhenotypeError, match=r"participants.tsv: column\(s\) \['score'\] appear more than once"):
        read_phenotypes(table)
    table.write_text("participant_id\tscore\nsub-00\t1\nsub-01\t2\t7\n")                  # values shifted?
    with pytest.raises(PhenotypeError, match=r"participants.tsv: line 3 has 3 fields, the header 2"):
        read_phenotypes(table)
    trailing = tmp_path / "excel.csv"                                   # empty trailing columns and fields: fine
    trailing.write_text("participant_id,score,,\nsub-00,1,,\nsub-01,2,,,\n")
    assert read_phenotypes(trailing, targets=["score"]).values == {"00": {"score": 1.0}, "01": {"score": 2.0}}
    table.write_text("name\tscore\nsub-00\t1\n")
    with pytest.raises(PhenotypeError, match="no subject id column"):
        read_phenotypes(table)
    with pytest.raises(PhenotypeError, match=r"target column\(s\) \['iq'\] not in the table"):
        read_phenotypes(raw / "participants.tsv", id_column="name", targets=["iq"])
    with pytest.raises(PhenotypeError, match="phenotype file not found"):
        read_phenotypes(tmp_path / "nope.tsv")
    with pytest.raises(LayoutError, match="found no scans"):
        find_scans(tmp_path / "raw" / "sub-00" / "func" / "..")
    dup = tmp_path / "dup"
    write_scan(dup / "a" / "x_bold.nii.gz", random_scan(1))
    write_scan(dup / "b" / "x_bold.nii.gz", random_scan(2))
    with pytest.raises(LayoutError, match="two scans map to the same id 'x'"):
        find_scans(dup, "glob", glob="*/*.nii.gz", subject_regex=r"/(x)_bold")
    with pytest.raises(LayoutError, match=r"x_bold.nii.gz: --subject-regex .* with an empty subject"):
        find_scans(dup, "glob", glob="*/*.nii.gz", subject_regex=r"(?P<subject>zzz)?")


def test_strict_stops_but_keeps_what_was_written(tmp_path):
    raw = bids_dataset(tmp_path / "raw", 5)
    bad = raw / "sub-04" / "func" / "sub-04_task-rest_bold.nii.gz"
    data = random_scan(4)
    data[5, 5, 5, 0] = np.inf
    write_scan(bad, data)
    strict = ShardOptions(min_frames=10, chunk_frames=4, shard_bytes=10**9, mask_fraction=0.5, strict=True)
    with pytest.raises(ShardError, match="sub-04_task-rest_bold.nii.gz: 1 NaN or infinite"):
        shard_dataset(raw, raw / "participants.tsv", tmp_path / "out", mask=None, options=strict, progress=False)
    index = json.loads(next((tmp_path / "out" / "shards").glob("*.json")).read_text())
    assert sorted(index["scans"]) == ["sub-00", "sub-01", "sub-02", "sub-03"]      # kept, indexed
    summary = shard_dataset(raw, raw / "participants.tsv", tmp_path / "out", options=OPTS, progress=False)
    assert summary.written == [] and len(summary.already_done) == 4 and "sub-04" in _skips(summary)


def test_truncated_shard_and_bad_checksum_are_caught_at_read(tmp_path):
    _, out = _shard(tmp_path)
    shards = ShardSet(out)
    entry = shards.manifest["shards"][0]
    path = out / "shards" / entry["shard"]
    scan = [s for s, m in shards.scans.items() if m["shard"] == entry["shard"]][-1]   # the shard's last scan
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    ShardSet(out)                                                      # same size: the size check passes
    with pytest.raises(ShardError, match=f"{entry['shard']}: sha256 .* does not match the manifest"):
        ShardSet(out, verify="sha256")
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ShardError, match=f"{entry['shard']}: .* bytes, the manifest records"):
        ShardSet(out)
    with pytest.raises(ShardError, match=f"{entry['shard']}: truncated: sample {scan}"):
        shards.read_frames(scan, FRAMES - 8, 8)                        # opened before the truncation


def _save_masks(path: str, rounds: int, start) -> None:
    from brainmt.data.nifti import save_mask

    start.wait()                                       # all at once, as the tasks of an array
    for _ in range(rounds):
        save_mask(np.ones(SHAPE, dtype=bool), np.eye(4), path)


def test_a_mask_saved_by_parallel_parts_at_once_lands_whole(tmp_path):
    """The parts of an array given one --mask each save it as they start: none may fail or leave it truncated."""
    import multiprocessing

    path, ctx = tmp_path / "mask.nii.gz", multiprocessing.get_context("spawn")
    start = ctx.Barrier(8)
    procs = [ctx.Process(target=_save_masks, args=(str(path), 20, start)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    assert nib.load(path).get_fdata().sum() == np.prod(SHAPE)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]                # no temporary left


def test_data_mask_and_user_mask(tmp_path):
    raw = bids_dataset(tmp_path / "raw", 3)
    user = np.zeros(SHAPE, dtype=np.uint8)
    user[3:9, 4:10, 3:9] = 1
    write_scan(tmp_path / "mask.nii.gz", user, dtype=np.uint8)
    shard_dataset(raw, raw / "participants.tsv", tmp_path / "out", mask=str(tmp_path / "mask.nii.gz"), options=OPTS,
                  progress=False)
    shards = ShardSet(tmp_path / "out")
    assert shards.n_brain == 216 and shards.volume_shape == (6, 6, 6)
    other = user.copy()
    other[3, 4, 3] = 0
    write_scan(tmp_path / "mask2.nii.gz", other, dtype=np.uint8)
    with pytest.raises(ShardError, match="differs from the mask this output was started with"):
        shard_dataset(raw, raw / "participants.tsv", tmp_path / "out", mask=str(tmp_path / "mask2.nii.gz"),
                      options=OPTS, progress=False)


def test_a_sex_column_left_out_of_the_targets_is_named(tmp_path, caplog):
    """Splits are stratified by sex only when sex is a target: a --sex-column left out of --targets stops a new
    output before anything is written (jobs/shard.py before anything is queued); a sex column found by its name
    and left out, or an output already written so, is a warning, and the splits say unstratified."""
    from brainmt.launch import shard_jobs

    raw = bids_dataset(tmp_path / "raw", 4)
    table, out = raw / "participants.tsv", tmp_path / "out"
    named = "the sex column 'sex' is not among the targets ['score'], so the splits are not stratified by sex"
    with pytest.raises(PhenotypeError, match=r"participants.tsv: " + re.escape(named) + "; add it to --targets, or"):
        shard_dataset(raw, table, out, targets=["score"], sex_column="sex", options=OPTS, progress=False)
    job = ["--input", str(raw), "--phenotypes", str(table), "--output", str(out), "--cluster", "debug", "--dry-run"]
    assert shard_jobs.main([*job, "--targets", "score", "--sex-column", "sex"]) == 2
    assert not out.exists()
    assert read_phenotypes(table, targets=["score", "sex"]).sex_unused is None
    with caplog.at_level("WARNING", logger="brainmt.data.shards"):
        shard_dataset(raw, table, out, targets=["score"], options=OPTS, progress=False)
    assert f"{named}; add it to --targets to stratify them" in caplog.text
    assert json.loads((out / "splits.json").read_text())["stratified"] is False
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainmt.data.shards"):                  # continuing that output
        shard_dataset(raw, table, out, targets=["score"], sex_column="sex", options=OPTS, progress=False)
    assert named in caplog.text


def test_gzip_truncated_at_the_end_is_named(tmp_path):
    raw = bids_dataset(tmp_path / "raw", 2)
    path = raw / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz"
    full = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(full[: len(full) - 5000]))        # valid gzip, data too short
    summary = shard_dataset(raw, raw / "participants.tsv", tmp_path / "out", options=OPTS, progress=False)
    assert str(path) in _skips(summary)["sub-01"]


def _corrupt_stored_gzip(path: Path) -> None:
    """Rewrite a .nii.gz as stored (uncompressed) deflate blocks with one byte of its voxel data flipped: the stream
    still inflates, and only the gzip checksum shows the damage."""
    raw = gzip.decompress(path.read_bytes())
    packed = bytearray(gzip.compress(raw, compresslevel=0))
    packed[len(packed) - len(raw) // 4] ^= 0xFF
    path.write_bytes(bytes(packed))


def test_gzip_checksum_mismatch_is_named(tmp_path):
    """A .nii.gz whose checksum does not match, or whose gzip trailer is cut off, is skipped and named; bytes after
    the gzip stream (which gzip -d ignores) are not an error."""
    raw = bids_dataset(tmp_path / "raw", 4)
    f = lambda sid: raw / sid / "func" / f"{sid}_task-rest_bold.nii.gz"  # noqa: E731
    _corrupt_stored_gzip(f("sub-02"))
    f("sub-03").write_bytes(f("sub-03").read_bytes()[:-4])                    # the trailer's length field gone
    f("sub-01").write_bytes(f("sub-01").read_bytes() + b"JUNKJUNK")
    summary = shard_dataset(raw, raw / "participants.tsv", tmp_path / "out", options=OPTS, progress=False)
    skips = _skips(summary)
    assert str(f("sub-02")) in skips["sub-02"] and "corrupt gzip data, its checksum does not match" in skips["sub-02"]
    assert str(f("sub-03")) in skips["sub-03"] and "truncated gzip data" in skips["sub-03"]
    assert sorted(summary.written) == ["sub-00", "sub-01"]          # the others are sharded


def test_mask_with_a_gzip_checksum_mismatch_is_named(tmp_path):
    from brainmt.data.nifti import ScanError, load_mask

    write_scan(tmp_path / "mask.nii.gz", np.ones((6, 6, 6)), dtype=np.uint8)
    _corrupt_stored_gzip(tmp_path / "mask.nii.gz")
    with pytest.raises(ScanError, match=r"mask\.nii\.gz: corrupt gzip data, its checksum does not match"):
        load_mask(tmp_path / "mask.nii.gz")


# ------------------------------------------------------------------ command line


def test_synth_and_shard_commands(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "brainmt.cli", *a], capture_output=True, text=True)  # noqa: E731
    p = run("synth", str(tmp_path / "syn"), "--subjects", "8", "--frames", "30", "--shape", "16", "18", "16",
            "--workers", "1")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "syn" / "derivatives" / "planted" / "region-c_mask.nii.gz").exists()
    header = (tmp_path / "syn" / "participants.tsv").read_text().splitlines()[0]
    assert header.split("\t") == ["participant_id", "sex", "cognition", "family_id"]
    p = run("shard", "--input", str(tmp_path / "syn"), "--phenotypes", str(tmp_path / "syn" / "participants.tsv"),
            "--output", str(tmp_path / "sh"), "--min-frames", "20", "--split", "0.5", "0.25", "0.25")
    assert p.returncode == 0, p.stderr
    assert "scans written: 8" in p.stdout and (tmp_path / "sh" / "splits.json").exists()
    p = run("shard", "--input", str(tmp_path / "syn"), "--phenotypes", str(tmp_path / "missing.tsv"),
            "--output", str(tmp_path / "sh2"))
    assert p.returncode == 1 and "missing.tsv: phenotype file not found" in p.stderr


def test_synthetic_effects_are_planted_where_the_masks_say(tmp_path):
    from brainmt.data.synthetic import write_synthetic_bids

    root = write_synthetic_bids(tmp_path / "syn", 16, 60, (20, 24, 20), seed=5)
    planted = root / "derivatives" / "planted"
    regions = {n: nib.as_closest_canonical(nib.load(planted / f"region-{n}_mask.nii.gz")).get_fdata() > 0 for n in "abc"}
    table = [line.split("\t") for line in (root / "participants.tsv").read_text().splitlines()[1:]]
    coupling, amplitude = {"M": [], "F": []}, []
    for sid, sex, cog, _ in table:
        data = _canonical(root / sid / "func" / f"{sid}_task-rest_bold.nii.gz")
        a, b, c = (data[regions[n]].mean(axis=0) for n in "abc")
        coupling[sex].append(np.corrcoef(a, b)[0, 1])
        amplitude.append((float(cog), c.std()))
    assert np.mean(coupling["M"]) > np.mean(coupling["F"]) + 0.4          # sex changes the a-b coupling
    cog, amp = np.array(amplitude).T
    assert np.corrcoef(cog, amp)[0, 1] > 0.6                              # cognition scales region c


def test_shard_command_takes_its_options_from_the_shard_section_of_a_config(tmp_path, capsys):
    from brainmt.cli import main

    raw = bids_dataset(tmp_path / "raw", 8)
    (tmp_path / "data.yaml").write_text("shard:\n  chunk_frames: 4\n  min_frames: 10\n  mask_fraction: 0.5\n"
                                        "  split: [0.5, 0.25, 0.25]\n  split_seed: 3\n  background: zero\n")
    common = ["shard", "--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--config",
              str(tmp_path / "data.yaml")]
    assert main([*common, "--output", str(tmp_path / "sh"), "--chunk-frames", "6"]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert manifest["preprocessing"]["chunk_frames"] == 6                     # the option given wins
    assert manifest["preprocessing"]["background"] == "zero" and manifest["preprocessing"]["min_frames"] == 10
    splits = json.loads((tmp_path / "sh" / "splits.json").read_text())
    assert splits["seed"] == 3 and splits["fractions"] == {"train": 0.5, "validation": 0.25, "test": 0.25}
    # a re-run through the options alone (no config) with the same values continues the output
    again = ["--chunk-frames", "6", "--min-frames", "10", "--mask-fraction", "0.5", "--split", "0.5", "0.25", "0.25",
             "--split-seed", "3", "--background", "zero"]
    capsys.readouterr()
    assert main([*common[:5], "--output", str(tmp_path / "sh"), *again]) == 0
    assert "scans already in complete shards: 8" in capsys.readouterr().out
