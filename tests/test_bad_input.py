"""Bad input and misuse of the data commands (issue 16): each one exits non-zero with a message naming the file,
option or key, prints no traceback, loses nothing already written and leaves no empty folder behind."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import bids_dataset, random_scan, write_scan

from brainmt.cli import main
from brainmt.data.loader import EvalWindows, ShardSet
from brainmt.data.shards import ShardError, ShardOptions, sample_key, shard_dataset

N = 10          # subjects: the default 70/15/15 split of bids_dataset's families gives 6/2/2
SMALL = ["--chunk-frames", "4", "--min-frames", "10", "--mask-fraction", "0.5"]


def _shard_cli(raw: Path, out: Path, *extra: str, table: Path | None = None) -> int:
    return main(["shard", "--input", str(raw), "--phenotypes", str(table or raw / "participants.tsv"),
                 "--output", str(out), *SMALL, *extra])


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err


def _snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time: what 'nothing rewritten' compares."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _empty_dirs(root: Path) -> list[Path]:
    return [p for p in [root, *root.rglob("*")] if p.is_dir() and not any(p.iterdir())]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """(raw, shards) of N small subjects, written once through the CLI; tests copy what they change."""
    root = tmp_path_factory.mktemp("bad-input")
    raw = bids_dataset(root / "raw", N)
    assert _shard_cli(raw, root / "shards", "--shard-size-gb", "0.0002") == 0
    return raw, root / "shards"


@pytest.fixture
def shards(made, tmp_path) -> Path:
    """A private copy of the module's shards."""
    return Path(shutil.copytree(made[1], tmp_path / "shards"))


# ------------------------------------------------------------------ item 1: damaged shards


def _chunk(out: Path, scan: str | None = None, k: int = 1) -> tuple[str, dict, Path, int, int]:
    manifest = json.loads((out / "manifest.json").read_text())
    scan = scan or sorted(manifest["scans"])[0]
    meta = manifest["scans"][scan]
    offset, nbytes = meta["chunks"][k][:2]
    return scan, meta, out / "shards" / meta["shard"], offset, nbytes


def _poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:                      # same size: only the checksums or the values show it
        f.seek(offset)
        f.write(data)


def test_verify_names_each_bad_or_missing_shard_and_the_damaged_sample(shards, capsys):
    assert main(["verify", "--shards", str(shards)]) == 0
    assert "every shard matches manifest.json" in capsys.readouterr().out
    manifest = json.loads((shards / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 2
    scan, meta, path, offset, _ = _chunk(shards, k=2)
    _poke(path, offset + 100, b"\x13\x57")
    missing = shards / "shards" / next(s["shard"] for s in manifest["shards"] if s["shard"] != meta["shard"])
    missing.unlink()
    assert main(["verify", "--shards", str(shards)]) == 1
    err = capsys.readouterr().err
    _no_traceback(err)
    assert f"{path}: sha256" in err and f"damaged samples: {sample_key(scan, 2)} (scan {scan})" in err
    assert f"{missing}: missing" in err and "2 bad or missing file(s)" in err
    assert main(["verify", "--shards", str(shards / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "nowhere/manifest.json: not found" in err
    _no_traceback(err)


def test_manifest_records_sha256_and_a_crc32_per_sample(made):
    manifest = json.loads((made[1] / "manifest.json").read_text())
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    for meta in manifest["scans"].values():
        assert len(meta["crc32"]) == len(meta["chunks"]) and all(isinstance(c, int) for c in meta["crc32"])


def test_crc_check_names_scan_shard_and_sample(shards):
    scan, _, path, offset, _ = _chunk(shards)
    _poke(path, offset + 10, b"\x00\x3c")           # a finite value (1.0): only the CRC32 sees it
    ShardSet(shards, check="finite").read_frames(scan, 0, 12)
    with pytest.raises(ShardError) as err:
        ShardSet(shards).read_frames(scan, 0, 12)                  # the default check: CRC32
    text = str(err.value)
    assert str(path) in text and f"sample {sample_key(scan, 1)} of scan {scan}" in text and "CRC32" in text
    assert f"brainmt verify --shards {shards}" in text and "non-finite" not in text
    ShardSet(shards).read_frames(scan, 8, 4)                       # chunk 2 is intact


def test_crc_is_checked_once_per_chunk_or_on_every_read(shards):
    scan, _, path, offset, _ = _chunk(shards)
    once, always = ShardSet(shards, check="crc"), ShardSet(shards, check="crc-always")
    once.read_frames(scan, 0, 12)
    always.read_frames(scan, 0, 12)
    _poke(path, offset + 10, b"\x00\x3c")           # damaged after this process checked the chunk
    once.read_frames(scan, 0, 12)                     # "crc": checked at its first read only
    with pytest.raises(ShardError, match=f"sample {sample_key(scan, 1)} of scan {scan}: its bytes do not match"):
        always.read_frames(scan, 0, 12)


def test_nonfinite_values_stop_the_read_naming_scan_shard_and_sample(shards):
    scan, meta, path, offset, nbytes = _chunk(shards)
    _poke(path, offset + 2 * 7, b"\xff\x7f")        # one float16 NaN in chunk 1 (frames 4-7)
    for check in ("finite", "crc"):
        with pytest.raises(ShardError, match="non-finite values") as err:
            ShardSet(shards, check=check).read_frames(scan, 0, 12)
        assert str(path) in str(err.value) and sample_key(scan, 1) in str(err.value) and scan in str(err.value)
    _poke(path, offset + 2 * 7, b"\x00\xfc")        # -inf
    with pytest.raises(ShardError, match="non-finite values .* at frame 4"):
        EvalWindows(ShardSet(shards, check="finite"), [scan], 8, "score")[0]
    with pytest.raises(ShardError, match="CRC32 .* and holds non-finite values"):
        EvalWindows(ShardSet(shards), [scan], 8, "score")[0]
    ShardSet(shards, check="none").read_frames(scan, 0, 12)        # asked for no check: none


def test_old_shards_without_crc32_load_with_one_warning(shards, caplog):
    manifest = json.loads((shards / "manifest.json").read_text())
    for meta in manifest["scans"].values():
        del meta["crc32"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="brainmt.data.loader"):
        old = ShardSet(shards, check="crc")
    warned = [r for r in caplog.records if "without per-sample CRC32s" in r.getMessage()]
    assert len(warned) == 1 and f"{N} of {N} scans" in warned[0].getMessage()
    scan, _, _, _, _ = _chunk(shards)
    assert old.read_frames(scan, 0, 24).shape == (24, old.n_brain)
    _, _, path, offset, _ = _chunk(shards)
    _poke(path, offset, b"\xff\x7f")
    with pytest.raises(ShardError, match="non-finite values"):    # unchecked by CRC, still checked for NaN
        ShardSet(shards, check="crc").read_frames(scan, 0, 8)


def test_unknown_sample_check_is_named(shards, monkeypatch):
    with pytest.raises(ValueError, match="check='md5'"):
        ShardSet(shards, check="md5")
    monkeypatch.setenv("BRAINMT_SAMPLE_CHECK", "sometimes")
    with pytest.raises(ValueError, match="BRAINMT_SAMPLE_CHECK='sometimes'"):
        ShardSet(shards)


# ------------------------------------------------------------------ item 3: re-sharding with other options


@pytest.mark.parametrize(("option", "value", "old"), [
    ("--chunk-frames", "5", "4"), ("--background", "zero", "min"), ("--min-frames", "12", "10"),
    ("--mask-fraction", "0.6", "0.5"), ("--targets", "sex", "sex score"), ("--split", "0.6 0.2 0.2", "0.7 0.15 0.15"),
    ("--split-seed", "3", "0"),
])
def test_resharding_with_other_options_is_refused(made, shards, capsys, option, value, old):
    before = _snapshot(shards)
    args = [*SMALL, "--shard-size-gb", "0.0002"]
    i = args.index(option) if option in args else None
    if i is not None:
        args[i + 1] = value
    else:
        args += [option, *value.split()]
    code = main(["shard", "--input", str(made[0]), "--phenotypes", str(made[0] / "participants.tsv"),
                 "--output", str(shards), *args])
    err = capsys.readouterr().err
    assert code == 1, err
    _no_traceback(err)
    shown = "--split" if option == "--split" else option
    assert f"{shown} {value}" in err and f"{shown} {old}" in err and "Nothing was written" in err
    assert _snapshot(shards) == before


def test_rerun_with_the_same_options_continues(made, shards, capsys):
    before = _snapshot(shards)
    assert _shard_cli(made[0], shards, "--shard-size-gb", "0.0002") == 0
    assert f"scans already in complete shards: {N}" in capsys.readouterr().out
    kept = lambda snap: {k: v for k, v in snap.items() if not k.startswith(("manifest", "parts/"))}  # noqa: E731
    assert kept(_snapshot(shards)) == kept(before)         # shards, mask, options and splits untouched


# ------------------------------------------------------------------ item 4: empty or tiny splits


def test_an_empty_split_is_refused_before_any_work(tmp_path, capsys, caplog):
    raw = bids_dataset(tmp_path / "raw", 8)           # the default split leaves the test split empty
    out = tmp_path / "out"
    assert _shard_cli(raw, out) == 1
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "split 'test' would have 0 of 8 subjects" in err and "--split 0.7 0.15 0.15" in err
    assert not out.exists()
    with caplog.at_level(logging.WARNING):
        assert _shard_cli(raw, out, "--split", "0.5", "0.25", "0.25") == 0
    assert any("split 'test' has only 2 of 8 subjects" in r.getMessage() for r in caplog.records)
    assert _shard_cli(raw, tmp_path / "out2", "--min-split-subjects", "0") == 0     # asked for: allowed


# ------------------------------------------------------------------ item 5: nothing written


def test_nothing_written_exits_1_with_the_skips_counted(tmp_path, capsys):
    raw = bids_dataset(tmp_path / "raw", N)
    out = tmp_path / "out"
    code = main(["shard", "--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    _no_traceback(err)
    assert "no readable scan to compute a brain mask from" in err
    assert f"fewer than --min-frames 200 frames: {N}" in err and "lower --min-frames (the longest scan has 24" in err
    assert not out.exists()
    mask = tmp_path / "mask.nii.gz"
    write_scan(mask, (random_scan(0)[..., 0] > 0).astype(np.uint8), dtype=np.uint8)
    code = main(["shard", "--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--output", str(out),
                 "--mask", str(mask)])
    err = capsys.readouterr().err
    assert code == 1
    _no_traceback(err)
    assert f"0 scans written: {N} skipped (fewer than --min-frames 200 frames: {N})" in err
    assert not (out / "manifest.json").exists() and not _empty_dirs(out)


def test_no_phenotype_row_for_any_scan_writes_nothing(tmp_path, capsys):
    raw = bids_dataset(tmp_path / "raw", 4, rows=["sub-77\tF\t1\tf"])
    assert _shard_cli(raw, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "0 scans written: 4 skipped (no phenotype row: 4)" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ item 9: arguments before any work


def test_bad_split_exits_2_naming_split_before_any_work(tmp_path, capsys):
    raw = bids_dataset(tmp_path / "raw", 2)
    assert _shard_cli(raw, tmp_path / "out", "--split", "0.7", "0.7", "0.7") == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "--split 0.7 0.7 0.7: the fractions must sum to 1 (they sum to 2.1)" in err
    assert not (tmp_path / "out").exists()


def test_every_bad_option_is_named_at_once(tmp_path, capsys):
    raw = bids_dataset(tmp_path / "raw", 2)
    code = main(["shard", "--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--output",
                 str(tmp_path / "out"), "--chunk-frames", "0", "--min-frames", "1", "--mask-fraction", "1.5",
                 "--shard-size-gb", "0", "--split", "0", "0.5", "0.5", "--mask-scans", "0"])
    err = capsys.readouterr().err
    assert code == 2
    _no_traceback(err)
    for text in ("--chunk-frames 0", "--min-frames 1", "--mask-fraction 1.5", "--shard-size-gb 0",
                 "--split 0 0.5 0.5: the train fraction", "--mask-scans 0"):
        assert text in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", [float("nan"), float("inf"), -1.0])
def test_shard_size_must_be_a_positive_number(tmp_path, capsys, size):
    raw = bids_dataset(tmp_path / "raw", 2)
    assert _shard_cli(raw, tmp_path / "out", "--shard-size-gb", str(size)) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert f"--shard-size-gb {size:g}: must be" in err and not (tmp_path / "out").exists()


def test_bad_options_are_refused_by_the_python_api_too(tmp_path):
    raw = bids_dataset(tmp_path / "raw", 2)
    with pytest.raises(ShardError, match=r"--split 0.5 0.5 0.5"):
        shard_dataset(raw, raw / "participants.tsv", tmp_path / "out",
                      options=ShardOptions(split_fractions=(0.5, 0.5, 0.5)), progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ smaller


def test_evaluate_unknown_split_lists_the_splits(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--run", str(tmp_path), "--split", "tset"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "--split: invalid choice: 'tset'" in err and all(s in err for s in ("train", "validation", "test"))


def test_output_naming_a_file_is_refused(tmp_path, capsys):
    raw = bids_dataset(tmp_path / "raw", 2)
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    assert _shard_cli(raw, target) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert f"--output {target}: exists and is not a directory" in err
    assert target.read_text() == "keep me\n"


def test_missing_phenotype_file_leaves_no_folder(tmp_path, capsys):
    raw = bids_dataset(tmp_path / "raw", 2)
    out = tmp_path / "new" / "out"
    assert _shard_cli(raw, out, table=tmp_path / "missing.tsv") == 1
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "missing.tsv: phenotype file not found" in err
    assert not (tmp_path / "new").exists()


def test_missing_input_directory_leaves_no_folder(tmp_path, capsys):
    raw = bids_dataset(tmp_path / "raw", 2)
    out = tmp_path / "out"
    code = main(["shard", "--input", str(tmp_path / "nope"), "--phenotypes", str(raw / "participants.tsv"),
                 "--output", str(out)])
    assert code == 1 and "nope: input directory not found" in capsys.readouterr().err
    assert not out.exists()


def test_comma_separated_tsv_gets_a_hint(tmp_path, capsys):
    raw = bids_dataset(tmp_path / "raw", 2)
    table = raw / "participants.tsv"
    table.write_text("participant_id,sex,score\nsub-00,F,1\nsub-01,M,2\n")
    assert _shard_cli(raw, tmp_path / "out") == 1
    err = capsys.readouterr().err
    _no_traceback(err)
    assert f"{table}:" in err and "participants.tsv looks comma-separated" in err and "name it .csv" in err
    assert not (tmp_path / "out").exists()


def test_missing_value_in_an_automatic_target_says_so_and_names_targets(tmp_path, capsys):
    rows = [f"sub-{i:02d}\t{'M' if i % 2 else 'F'}\t{'' if i == 3 else 10 + i}\tfam{i}" for i in range(N)]
    raw = bids_dataset(tmp_path / "raw", N, rows=rows)
    assert _shard_cli(raw, tmp_path / "out", "--split", "0.6", "0.2", "0.2") == 0
    out = capsys.readouterr().out
    assert "sub-03: phenotype score: missing value" in out
    assert "['score'] were picked as targets automatically" in out and "--targets" in out
    assert _shard_cli(raw, tmp_path / "sex-only", "--targets", "sex", "--split", "0.6", "0.2", "0.2") == 0
    assert "sub-03" in json.loads((tmp_path / "sex-only" / "manifest.json").read_text())["scans"]


def _subparsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of ``brainmt``, caught when main() parses."""
    caught = {}

    def grab(self, args=None, namespace=None):
        caught.update(next(a for a in self._actions if isinstance(a, argparse._SubParsersAction)).choices)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(SystemExit):
        main(["info"])
    return caught


@pytest.mark.parametrize("command", ["shard", "evaluate", "verify"])
def test_every_option_has_help(monkeypatch, command):
    parser = _subparsers(monkeypatch)[command]
    missing = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not missing, f"brainmt {command}: options without help: {missing}"


def test_an_output_of_an_older_brainmt_is_checked_against_its_manifest(made, shards, capsys):
    (shards / "options.json").unlink()                 # written before options.json existed
    before = _snapshot(shards)
    assert _shard_cli(made[0], shards, "--shard-size-gb", "0.0002", "--background", "zero") == 1
    err = capsys.readouterr().err
    assert "--background zero (it was written with --background min)" in err
    assert _snapshot(shards) == before
