"""The launchers agree: jobs/shard.py takes every `brainmt shard` option, every launcher checks the shared scheduler
options, and each launcher runs from the package (python -m, console scripts). Fast: no SLURM, no Ray."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from brainmt.cli import add_shard_parser
from brainmt.config import ShardConfig, config_choices, literal_values, option_flag, option_text
from brainmt.data.layouts import LAYOUTS
from brainmt.data.shard_args import shard_arguments, shard_config, shard_option_argv
from brainmt.data.shards import ShardOptionError, ShardOptions
from brainmt.data.synthetic import write_synthetic_bids
from brainmt.launch import shard_jobs
from brainmt.launch.cli import add_cluster_arguments

ROOT = Path(__file__).parent.parent
BRAINMT_SHARD_ONLY = {"--part", "--merge", "--mask-only", "--resplit"}
LAUNCHER_ONLY = {"--array-size", "--profile", "--job-name", "--dry-run", "--wait"}


def _console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts] (name -> module:function); no tomllib on Python 3.10."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.]+:\w+)"$', section, re.MULTILINE))


SCRIPTS = _console_scripts()


def _brainmt_shard_parser() -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser(prog="brainmt").add_subparsers()
    add_shard_parser(sub)
    return sub.choices["shard"]


def _options(p: argparse.ArgumentParser) -> dict[str, tuple]:
    """Each option string -> what a user sees of it: destination, default, type, choices, nargs, metavar, help."""
    return {s: (a.dest, a.default, a.type, a.choices, a.nargs, a.metavar, a.help)
            for a in p._actions for s in a.option_strings}


def _cluster_options() -> set[str]:
    p = argparse.ArgumentParser(add_help=False)
    add_cluster_arguments(p)
    return set(_options(p))


def test_jobs_shard_takes_every_brainmt_shard_option_with_the_same_default_and_help():
    cli, launcher = _options(_brainmt_shard_parser()), _options(shard_jobs.parser())
    assert BRAINMT_SHARD_ONLY <= set(cli) and LAUNCHER_ONLY | _cluster_options() <= set(launcher)
    shared = set(cli) - BRAINMT_SHARD_ONLY
    assert shared == set(launcher) - LAUNCHER_ONLY - _cluster_options()
    assert {"--targets", "--id-column", "--glob", "--split", "--strict", "--shard-size-gb"} <= shared
    assert {s: cli[s] for s in shared} == {s: launcher[s] for s in shared}


def test_sharding_defaults_are_those_of_shard_options():
    args = _brainmt_shard_parser().parse_args(["--output", "out"])
    options, dataset_args = shard_arguments(args)
    assert options == ShardOptions(min_split_subjects=1)     # the command line refuses an empty split
    assert dataset_args == {"layout": "auto", "glob": None, "subject_regex": None, "bids_space": None, "mask": None,
                            "id_column": None, "targets": None, "sex_column": None, "family_column": None}


def test_every_shard_config_key_is_the_option_of_the_same_name_with_its_default():
    p = _brainmt_shard_parser()
    actions = {a.dest: a for a in p._actions}
    keys = [f.name for f in dataclasses.fields(ShardConfig)]
    assert set(keys) <= set(actions)
    for key in keys:
        assert actions[key].option_strings == [option_flag(key)], key
        assert actions[key].default is None, key              # not given: the config's value (ShardConfig's default)
        default = getattr(ShardConfig(), key)
        if isinstance(default, bool):
            assert default is False and isinstance(actions[key], argparse._StoreTrueAction), key   # a flag turns it on
        elif default is not None:
            assert f"default {option_text(default)}" in actions[key].help, key
        if literal_values(typing.get_type_hints(ShardConfig)[key]):
            assert actions[key].choices == config_choices(ShardConfig, key), key
    assert shard_config(p.parse_args(["--output", "out"])) == ShardConfig()
    assert config_choices(ShardConfig, "layout") == ["auto", *LAYOUTS]
    # the Python API's defaults are ShardConfig's, but for the empty-split refusal (0: only a warning)
    assert ShardOptions.from_config(ShardConfig()) == ShardOptions(min_split_subjects=ShardConfig().min_split_subjects)
    assert ShardOptions().to_config() == ShardConfig(min_split_subjects=0)


def test_options_given_win_over_the_config_and_overrides(tmp_path):
    (tmp_path / "data.yaml").write_text("base: debug\nshard:\n  chunk_frames: 4\n  split: [0.5, 0.25, 0.25]\n"
                                        "  targets: [sex]\n  strict: true\n")
    p = _brainmt_shard_parser()
    args = p.parse_args(["--output", "o", "--config", str(tmp_path / "data.yaml"), "--chunk-frames", "6",
                         "--min-frames", "12", "shard.split_seed=3", "shard.min_frames=30"])
    settings = shard_config(args)
    assert (settings.chunk_frames, settings.min_frames, settings.split_seed) == (6, 12, 3)
    assert settings.split == [0.5, 0.25, 0.25] and settings.targets == ["sex"] and settings.strict
    assert shard_option_argv(settings) == ["--targets", "sex", "--chunk-frames", "6", "--min-frames", "12", "--split",
                                           "0.5", "0.25", "0.25", "--split-seed", "3", "--strict"]
    options, _ = shard_arguments(args)
    assert (options.chunk_frames, options.split_fractions, options.split_seed) == (6, (0.5, 0.25, 0.25), 3)
    with pytest.raises(ShardOptionError, match="^--chunk-frames 0: must be at least 1$"):   # named as typed
        shard_config(p.parse_args(["--output", "o", "--config", str(tmp_path / "data.yaml"), "--chunk-frames", "0"]))


def test_brainmt_shard_refuses_a_bad_choice_a_bad_shard_section_and_other_keys(tmp_path, capsys):
    from brainmt.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["shard", "--output", str(out), "--background", "bogus"])
    assert exc.value.code == 2
    assert "argument --background: invalid choice: 'bogus' (choose from 'min', 'zero')" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("shard:\n  background: bogus\n  chunk_frames: 4\n")
    assert main(["shard", "--output", str(out), "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config error: " in err and "bad.yaml: shard.background: must be one of ['min', 'zero'], got 'bogus'" in err
    assert main(["shard", "--output", str(out), "shard.split=[0.7, 0.7, 0.7]"]) == 2
    assert "shard.split: the fractions must sum to 1 (they sum to 2.1), got [0.7, 0.7, 0.7]" in capsys.readouterr().err
    assert main(["shard", "--output", str(out), "model.embed_dim=64"]) == 2
    assert "override 'model.embed_dim=64': only shard.* keys set sharding options" in capsys.readouterr().err
    assert not out.exists()


def test_jobs_shard_takes_the_shard_section_of_a_config(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "participants.tsv").write_text("participant_id\tsex\nsub-01\tM\n")
    (tmp_path / "data.yaml").write_text("shard:\n  chunk_frames: 4\n  background: zero\n")
    base = ["--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--output", str(tmp_path / "out"),
            "--cluster", "debug", "--config", str(tmp_path / "data.yaml")]
    _, _, options, _, words = shard_jobs._plan(shard_jobs.parser().parse_args([*base, "--min-frames", "10"]))
    assert (options.chunk_frames, options.background, options.min_frames) == (4, "zero", 10)
    assert words == ["--chunk-frames", "4", "--background", "zero", "--min-frames", "10"]   # the re-run of one slice
    (tmp_path / "data.yaml").write_text("shard:\n  background: bogus\n")
    assert shard_jobs.main(base) == 2
    assert "shard.background: must be one of ['min', 'zero'], got 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _content(manifest: dict) -> dict:
    """A manifest without what depends on where and when scans were written (timestamps, shard names, offsets)."""
    scans = {s: {k: v for k, v in m.items() if k not in ("shard", "chunks")} | {"frames_in_chunks": [c[2:] for c in m["chunks"]]}
             for s, m in manifest["scans"].items()}
    return {**{k: v for k, v in manifest.items() if k not in ("created", "shards", "scans")}, "scans": scans}


def test_array_sharding_job_reproduces_brainmt_shard(tmp_path):
    from brainmt.cli import main

    raw = write_synthetic_bids(tmp_path / "raw", 20, 20, (16, 18, 16), seed=4)
    same = ["--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--targets", "cognition", "--split",
            "0.6", "0.2", "0.2", "--split-seed", "3", "--chunk-frames", "5", "--min-frames", "10"]
    assert main(["shard", *same, "--output", str(tmp_path / "single")]) == 0
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "shard.py"), *same, "--output", str(tmp_path / "array"),
                           "--cluster", "debug", "--array-size", "2", "--wait"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mask job" in proc.stdout and "array of 2 slices" in proc.stdout
    assert "--targets cognition --chunk-frames 5 --min-frames 10 --split 0.6 0.2 0.2 --split-seed 3" in proc.stdout
    single, array = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("single", "array"))
    assert array["targets"] == ["cognition"] and array["preprocessing"]["chunk_frames"] == 5
    assert len({s["shard"].split("-")[1] for s in array["shards"]}) == 2            # both slices wrote shards
    assert _content(array) == _content(single)
    splits = [json.loads((tmp_path / d / "splits.json").read_text()) for d in ("single", "array")]
    assert splits[0] == splits[1] and len(splits[0]["test"]) > 0


@pytest.mark.parametrize(("option", "message"), [
    (["--nodes", "0"], "cluster.nodes: must be at least 1 (given as --nodes 0)"),
    (["--time", "0"], "cluster.time_min: must be at least 1 minute (given as --time 0)"),
    (["--cpus-per-task", "0"], "(given as --cpus-per-task 0)"),
    (["--split", "0.5", "0.5", "0.5"], "--split 0.5 0.5 0.5: the fractions must sum to 1"),
    (["--array-size", "0"], "--array-size 0: must be at least 1"),
])
def test_jobs_shard_refuses_bad_options_before_queueing(tmp_path, capsys, option, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "participants.tsv").write_text("participant_id\tsex\n")
    code = shard_jobs.main(["--input", str(raw), "--phenotypes", str(raw / "participants.tsv"), "--output",
                            str(tmp_path / "out"), "--cluster", "debug", *option])
    assert code == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_jobs_shard_without_gpus_unless_asked(tmp_path):
    raw = tmp_path / "raw"
    base = ["--input", str(raw), "--phenotypes", str(raw / "p.tsv"), "--output", str(tmp_path / "out")]
    c = shard_jobs.cluster_config(shard_jobs.parser().parse_args(base))
    assert (c.gpus_per_node, c.cpus_per_task, c.time_min, c.nodes) == (0, 2, 240, 1)
    c = shard_jobs.cluster_config(shard_jobs.parser().parse_args([*base, "--time", "30", "--gpus-per-node", "1"]))
    assert (c.gpus_per_node, c.time_min) == (1, 30)


@pytest.mark.parametrize(("option", "message"), [
    (["--nodes", "0"], "cluster.nodes: must be at least 1 (given as --nodes 0)"),
    (["--mem-gb", "0"], "cluster.mem_gb: must be positive or null (given as --mem-gb 0.0)"),
    (["--steps", "0"], "analysis.steps: must be at least 1 (given as --steps 0)"),
    (["--top", "0"], "(given as --top 0)"),
])
def test_jobs_analyze_refuses_bad_options_before_reading_the_run(tmp_path, capsys, option, message):
    from brainmt.analysis.jobs import main

    assert main(["--run", str(tmp_path / "no-run"), "--dry-run", *option]) == 2
    assert message in capsys.readouterr().err


def test_brainmt_analyze_checks_its_options_through_the_config(tmp_path, capsys):
    from brainmt.cli import main

    assert main(["analyze", "--run", str(tmp_path / "no-run"), "--internal-batch-size", "0"]) == 2
    assert "analysis.internal_batch_size: must be at least 1 or null (given as --internal-batch-size 0)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_modules_run_from_another_directory(tmp_path, script):
    module = SCRIPTS[script].split(":")[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stdout + proc.stderr
    assert not proc.stderr, proc.stderr


def test_launcher_scripts_name_their_entry_points():
    assert {"brainmt-launch", "brainmt-shard-jobs", "brainmt-analyze-jobs", "brainmt-sweep"} <= set(SCRIPTS)
    for wrapper in ("jobs/launch.py", "jobs/shard.py", "jobs/analyze.py", "sweeps/tune.py"):
        module = re.search(r"^from ([\w.]+) import main$", (ROOT / wrapper).read_text(), re.MULTILINE).group(1)
        assert f"{module}:main" in SCRIPTS.values(), wrapper
        proc = subprocess.run([sys.executable, wrapper, "--help"], capture_output=True, text=True, timeout=120,
                              cwd=ROOT, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stdout + proc.stderr
